"""What a run prints and writes: the Table-1-style table with paired intervals, the GIF, results.json."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..fileio import atomic_path
from .evaluation import bootstrap_ci
from .world import FPS, FRAMES, SIZE

JUDGE_ROW = "Stage III (judge labels)"  # `--judge-labels`: Stage III on the judge's labels alone
ONLINE = "online round"  # `--online K`: one row per round


def online_row(r: int) -> str:
    return f"{ONLINE} {r} (judge)"


ROWS = ("base", "Stage I", "Stage I + DPO encoder", "Stage II", "Stage III")
#: each row against the row it builds on (PhysMaster Table 1), and the paper's headline last
COMPARISONS = (("Stage I", "base"), ("Stage I + DPO encoder", "Stage I"), ("Stage II", "Stage I"),
               ("Stage III", "Stage II"), ("Stage III", "Stage I"), (JUDGE_ROW, "Stage II"))


def comparisons(names) -> list[tuple[str, str]]:
    """The paper's comparisons, then each online round against the model it started from."""
    out = [c for c in COMPARISONS if c[0] in names and c[1] in names]
    online = [n for n in names if n.startswith(ONLINE)]
    return out + list(zip(online, ["Stage II"] + online[:-1]))
COLUMNS = (("l2", "L2"), ("chamfer", "CD"), ("iou", "IoU"))


def split_means(values: np.ndarray, n_seen: int) -> tuple[float, float, float]:
    seen, unseen = float(values[:n_seen].mean()), float(values[n_seen:].mean())
    return seen, unseen, 0.5 * (seen + unseen)


def format_table(results: dict, n_seen: int) -> str:
    """Seen / unseen / average L2, CD, IoU and coherence per row, then the paired differences."""
    w = max([22] + [len(n) for n in results])
    lines = [f"{'':{w}s}|{'seen':^27s}|{'unseen':^27s}|{'average':^27s}|{'coherence':>10s}",
             f"{'model':{w}s}|" + "|".join(f"{'L2':>9s}{'CD':>9s}{'IoU':>9s}" for _ in range(3)) + "|"]
    lines.append("-" * len(lines[1]) + "-" * 10)
    for name, r in results.items():
        cells = []
        for part in range(3):
            cells.append("".join(f"{split_means(r[k], n_seen)[part]:9.4f}" for k, _ in COLUMNS))
        coh = f"{r['coherence'].mean():10.3f}" if "coherence" in r else ""
        lines.append(f"{name:{w}s}|" + "|".join(cells) + "|" + coh)
    lines += ["", "paired per-scene difference against the row it builds on (all held-out scenes), "
              "mean (relative) [bootstrap 95% interval]:"]
    for cur, prev in comparisons(list(results)):
        parts = []
        for k, label in COLUMNS:
            d = results[cur][k] - results[prev][k]
            lo, hi = bootstrap_ci(d)
            base = results[prev][k].mean()
            rel = 100 * d.mean() / base if base else float("nan")
            parts.append(f"{label} {d.mean():+.4f} ({rel:+.1f}%) [{lo:+.4f}, {hi:+.4f}]")
        lines.append(f"  {cur} - {prev}: " + "; ".join(parts))
    return "\n".join(lines)


def format_sources(results: dict, n_seen: int | None = None) -> str:
    """Where each row's avg L2 comes from (`evaluation`: lost frames + located frames) and the mean centroid error
    where the object is found; then, per comparison, the paired differences of the lost part and of the centroid
    error over the frames where both rows find the object (`evaluation.paired_found`). With `n_seen` (the first
    n_seen scenes are the seen drops), the lost frames' share per split too."""
    from ..physics.metrics import SCALE
    from .evaluation import paired_found

    if not all(k in r for r in results.values() for k in ("l2_lost", "l2_found", "frame_l2")):
        return ""
    lines = [f"where avg L2 comes from: frames where the object is lost (each costs {SCALE:.3f}, more than any "
             "centroid error) + the other frames' centroid errors; and the mean error where the object is found:"]
    for name, r in results.items():
        lost, l2 = r["l2_lost"].mean(), r["l2"].mean()
        split = "" if n_seen is None else (f": seen {r['l2_lost'][:n_seen].mean() / SCALE:.1%}, unseen "
                                           f"{r['l2_lost'][n_seen:].mean() / SCALE:.1%}")
        lines.append(f"  {name}: {l2:.4f} = lost {lost:.4f} ({lost / SCALE:.1%} of frames{split}) + located "
                     f"{l2 - lost:.4f}; where found {np.nanmean(r['l2_found']):.4f}")
    for cur, prev in comparisons(list(results)):
        d_lost = results[cur]["l2_lost"] - results[prev]["l2_lost"]
        lo, hi = bootstrap_ci(d_lost)
        line = f"  {cur} - {prev}: lost {d_lost.mean():+.4f} [{lo:+.4f}, {hi:+.4f}]; where both find it "
        d = paired_found(results[cur]["frame_l2"], results[prev]["frame_l2"])
        if len(d):
            (flo, fhi), base = bootstrap_ci(d), np.nanmean(results[prev]["l2_found"])
            line += f"{d.mean():+.4f} ({100 * d.mean() / base:+.1f}%) [{flo:+.4f}, {fhi:+.4f}] ({len(d)} scenes)"
        else:
            line += "n/a (no frame where both find the object)"
        lines.append(line)
    return "\n".join(lines)


def format_coherence(results: dict, n_seen: int) -> str:
    """Why each row's frames are not coherent (`evaluation.coherence_parts`), as shares of all frames, and its
    coherence per split."""
    from .evaluation import MISSES

    if not all(f"miss_{m}" in r for r in results.values() for m in MISSES):
        return ""
    lines = ["why frames are not coherent (share of all held-out frames; then coherence of the seen | unseen drops):"]
    for name, r in results.items():
        misses = ", ".join(f"{m.replace('_', ' ')} {r[f'miss_{m}'].mean():.1%}" for m in MISSES)
        seen, unseen, _ = split_means(r["coherence"], n_seen)
        lines.append(f"  {name}: coherent {r['coherence'].mean():.1%}; {misses}; seen {seen:.3f} | unseen {unseen:.3f}")
    return "\n".join(lines)


def format_influence(influence: dict) -> str:
    if not influence:
        return ""
    def split(v):
        b = v.get("by_split")
        return f"; seen {b['seen']:+.4f}, unseen {b['unseen']:+.4f}" if b else ""

    parts = [f"{name} {v['l2_zeroed'] - v['l2']:+.4f} (L2 {v['l2']:.4f} with tokens, {v['l2_zeroed']:.4f} zeroed"
             f"{split(v)})" for name, v in influence.items()]
    n = next(iter(influence.values())).get("videos_per_scene")  # one run's rows share it
    on = ("" if n is None else ", on the first video of each drop" if n == 1
          else f", on the first {n} videos of each drop")
    text = (f"token influence (held-out avg L2 with the physical tokens zeroed minus with them{on}): "
            + "; ".join(parts))
    reads = [f"{name} {v['material_read']:.0%} with tokens, {v['material_read_zeroed']:.0%} zeroed"
             for name, v in influence.items() if v.get("material_videos")]
    if reads:
        n = max(v.get("material_videos", 0) for v in influence.values())
        text += ("\nmaterial read (held-out videos closest to their drop rendered with their own material's "
                 f"restitution rather than another's; chance 33%; {n} videos): " + "; ".join(reads))
    return text


def format_run(run: dict, n_seen: int) -> str:
    """One `cli.run_once` result as the demo prints it: the table, where avg L2 comes from, why frames are not
    coherent, token influence and material read, judge agreement."""
    return "\n".join([format_table(run["results"], n_seen), format_sources(run["results"], n_seen),
                      format_coherence(run["results"], n_seen), format_influence(run["influence"]),
                      format_judge(run["results"], run["judge_agreement"])])


def format_judge(results: dict, agreement: dict) -> str:
    """The judge's agreement with the ground truth on each candidate set, and how much of the ground-truth-labelled
    Stage III's avg-L2 gain (over Stage II) the judge-labelled one reaches."""
    lines = []
    for name, a in agreement.items():
        which = "pairs of candidates that both keep the object in every frame and" if a.get("kept_only") else "pairs"
        if not a["n_pairs"]:
            lines.append(f"judge vs ground-truth L2 on the {name}: no {which} whose L2 differs by >= {a['min_gap']}")
            continue
        lines.append(f"judge vs ground-truth L2 on the {name} ({a['n_pairs']} {which} whose L2 differs by >= "
                     f"{a['min_gap']}): {a['overall']:.1%} agree; by confidence tercile (low to high): "
                     + ", ".join(f"{t['agreement']:.0%} (n={t['n_pairs']}, confidence {t['confidence_range'][0]:.2f}"
                                 f"-{t['confidence_range'][1]:.2f})" for t in a["terciles"]))
    judged = JUDGE_ROW
    if judged in results and "Stage III" in results and "Stage II" in results:
        base = results["Stage II"]["l2"].mean()
        gt_gain = base - results["Stage III"]["l2"].mean()
        j_gain = base - results[judged]["l2"].mean()
        share = f"{100 * j_gain / gt_gain:.0f}%" if gt_gain > 0 else "n/a (the ground-truth-labelled row has no gain)"
        lines.append(f"avg-L2 gain over Stage II: ground-truth labels {gt_gain:+.4f}, judge labels {j_gain:+.4f} "
                     f"(judge / ground truth: {share})")
    return "\n".join(lines)


def write_gif(path: Path, gt_videos, columns: dict, n: int, scale: int = 3) -> Path:
    from PIL import Image, ImageDraw

    names = ["ground truth"] + list(columns)
    vids = [gt_videos] + list(columns.values())
    n = min(n, len(gt_videos))
    label_h = 12
    cell = SIZE * scale
    frames = []
    for t in range(FRAMES):
        canvas = Image.new("RGB", (cell * len(vids) + 2 * (len(vids) - 1), label_h + n * (cell + 2)), (24, 24, 24))
        draw = ImageDraw.Draw(canvas)
        for c, name in enumerate(names):
            draw.text((c * (cell + 2) + 2, 0), name, fill=(230, 230, 230))
            for r in range(n):
                img = (np.clip(vids[c][r][t], 0, 1) * 255).astype(np.uint8)
                canvas.paste(Image.fromarray(img).resize((cell, cell), Image.NEAREST),
                             (c * (cell + 2), label_h + r * (cell + 2)))
        frames.append(canvas)
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / FPS * 1.5),
                       loop=0)
    return path


def write_results(path: Path, summary: dict) -> Path:
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(summary, indent=1, default=float), encoding="utf-8")
    return path


def seeds_table(runs: list[dict], n_seen: int) -> str:
    """Each row's average metrics as mean ± sd across training seeds (`--seeds K`)."""
    w = max([22] + [len(n) for n in runs[0]])
    lines = [f"{'model':{w}s}" + "".join(f"{label:>20s}" for _, label in COLUMNS) + f"{'coherence':>18s}"]
    for name in runs[0]:
        cells = []
        for k, _ in COLUMNS + (("coherence", ""),):
            vals = [split_means(r[name][k], n_seen)[2] for r in runs]
            cells.append(f"{np.mean(vals):11.4f} ± {np.std(vals, ddof=1) if len(vals) > 1 else 0.0:.4f}")
        lines.append(f"{name:{w}s}" + "".join(f"{c:>20s}" for c in cells[:3]) + f"{cells[3]:>18s}")
    return "\n".join(lines)
