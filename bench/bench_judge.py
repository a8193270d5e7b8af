"""Benchmark the physics judges against rendering one scene; `--validate` ranks true videos above corruptions;
`--candidates` measures the candidate judge's agreement with ground-truth L2 on generated candidates.

    python bench/bench_judge.py [--runs 15] [--size 64 --frames 32 --fps 16]
    python bench/bench_judge.py --validate [--count 200]
    python bench/bench_judge.py --candidates cands.npz [--fps 6] [--min-gap 0.02]

A candidates file (npz) holds `videos` uint8 [S, K, T, H, W, 3] (K candidates of S start images), `gt_frames`
uint8 [S, T, H, W, 3] (frame 0 is the start image; nothing else of it is shown to the judge), `l2` [S, K] (each
candidate's ground-truth PISA L2) and `seeds` [S]. Scenes are split into two halves by (seed // 2) % 2, a
development half (0) and a held-out half (1), both reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from physmaster.physics import corrupt, judge, pisa_metrics, rank_candidates, render_scene  # noqa: E402
from physmaster.physics.corrupt import CORRUPTIONS  # noqa: E402
from physmaster.physics.validation import validate_judge  # noqa: E402


def _median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def _group(seed: int, args) -> list:
    """Eight candidates of one start image: the true drop and corruptions of it (what the candidate judge sees)."""
    sc = render_scene(seed, "seen" if seed % 2 == 0 else "unseen", args.size, args.frames, args.fps)
    out = [sc.frames]
    for kind in ("gravity_x0.5", "gravity_x2", "teleport", "size_change", "constant_velocity", "pass_through_floor"):
        out.append(corrupt(sc, kind).frames)
    out.append(sc.frames[:, :, ::-1].copy())  # mirrored: another object position than the start image's
    return out


def bench(args) -> None:
    torch.set_num_threads(1)
    scenes = [render_scene(s, "seen" if s % 2 == 0 else "unseen", args.size, args.frames, args.fps)
              for s in range(args.runs)]
    it = iter(range(10**9))
    render_ms = _median_ms(lambda: render_scene(next(it), "seen", args.size, args.frames, args.fps), args.runs)
    k = iter(range(10**9))
    judge_ms = _median_ms(lambda: judge(scenes[next(k) % len(scenes)].frames, fps=args.fps), args.runs)
    k2 = iter(range(10**9))

    def judge_gt():
        sc = scenes[next(k2) % len(scenes)]
        return judge(sc.frames, gt_masks=sc.masks, fps=args.fps)

    judge_gt_ms = _median_ms(judge_gt, args.runs)
    groups = [_group(s, args) for s in range(max(2, args.runs // 5))]
    g = iter(range(10**9))
    n = len(groups[0])
    cand_ms = _median_ms(lambda: rank_candidates(groups[next(g) % len(groups)], fps=args.fps), max(3, args.runs // 3))
    sc = scenes[0]
    metrics_ms = _median_ms(lambda: pisa_metrics(sc.object_masks(), sc.object_masks()), args.runs)
    print(f"{args.size}x{args.size}, {args.frames} frames, 1 torch thread, median of {args.runs} runs")
    print(f"  render one scene                 {render_ms:8.2f} ms")
    print(f"  judge (no ground truth)          {judge_ms:8.2f} ms   ratio to render {judge_ms / render_ms:6.2f}x")
    print(f"  judge + PISA metrics (with gt)   {judge_gt_ms:8.2f} ms   ratio to render {judge_gt_ms / render_ms:6.2f}x")
    print(f"  candidate judge, per video       {cand_ms / n:8.2f} ms   ratio to render {cand_ms / n / render_ms:6.2f}x"
          f"   (rank_candidates on {n} videos: {cand_ms:.1f} ms; goal <= 50 ms per video)")
    print(f"  pisa_metrics alone               {metrics_ms:8.2f} ms")


def validate(args) -> int:
    t0 = time.perf_counter()
    out = validate_judge(args.count, start_seed=args.seed, size=args.size, frames=args.frames, fps=args.fps)
    print(f"{out['count']} scenes (seen and unseen alternating, seeds {args.seed}..{args.seed + args.count - 1}), "
          f"judge without ground truth, {time.perf_counter() - t0:.0f} s")
    ok = True
    for k in CORRUPTIONS:
        rate = out["rates"][k]
        ok &= rate >= 0.95
        fails = out["failures"][k][:5]
        print(f"  true > {k:28s} {100 * rate:6.1f}%  ({out['totals'][k]} scenes)"
              + (f"  e.g. {fails}" if fails else ""))
    ts = sorted(out["true_scores"])
    print(f"  true-video scores: median {ts[len(ts) // 2]:.3f}, min {ts[0]:.3f}")
    print("PASS (>= 95% for every corruption)" if ok else "FAIL (a corruption below 95%)")
    return 0 if ok else 1


def candidates(args) -> int:
    from physmaster.demo.judging import judge_agreement

    torch.set_num_threads(1)
    with np.load(args.candidates) as d:
        videos, gt_frames, l2, seeds = d["videos"], d["gt_frames"], d["l2"], d["seeds"]
    refs = gt_frames[:, 0].astype(np.float32) / 255.0  # the start image only
    half = (seeds // 2) % 2
    print(f"{args.candidates}: {len(seeds)} start images x {videos.shape[1]} candidates, "
          f"{videos.shape[3]}x{videos.shape[4]}, {videos.shape[2]} frames at {args.fps:g} fps; pairs whose "
          f"ground-truth L2 differs by >= {args.min_gap}")
    t0 = time.perf_counter()
    for name, sel in (("development half ((seed // 2) % 2 == 0)", half == 0), ("held-out half", half == 1),
                      ("all", np.ones_like(half, bool))):
        idx = np.nonzero(sel)[0]
        out = judge_agreement([videos[j].astype(np.float32) / 255.0 for j in idx], l2[idx], refs[idx], args.fps,
                              args.min_gap)
        terc = "  ".join(f"[{t['confidence_range'][0]:.2f}, {t['confidence_range'][1]:.2f}]: "
                         f"{100 * t['agreement']:.1f}% ({t['n_pairs']})" for t in out["terciles"])
        print(f"  {name:42s} agreement {100 * out['overall']:5.1f}% of {out['n_pairs']} pairs; "
              f"per confidence tercile {terc}")
    n = 2 * videos.shape[0] * videos.shape[1]
    print(f"  ({1000 * (time.perf_counter() - t0) / n:.1f} ms per video judged)")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--validate", action="store_true", help="rank true videos against corruptions")
    p.add_argument("--candidates", metavar="PATH.npz", help="agreement with ground-truth L2 on a candidates file")
    p.add_argument("--min-gap", type=float, default=0.02, help="--candidates: least L2 difference of a pair")
    p.add_argument("--count", type=int, default=200, help="scenes for --validate (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=15, help="timed runs per benchmark (medians)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--fps", type=float, default=None, help="frame rate (default 16; 6 for --candidates)")
    args = p.parse_args()
    if args.fps is None:
        args.fps = 6.0 if args.candidates else 16.0
    if args.validate:
        return validate(args)
    if args.candidates:
        return candidates(args)
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
