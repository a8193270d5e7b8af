"""Is a stage's gain more than a placebo's? The demo's paired per-scene bootstrap intervals say whether two *fixed
models* differ on the held-out drops. They do not say whether a *training stage* helps: any change to the model
moves which frames lose the object, and each such frame costs 0.707 of avg L2. This script measures that floor.

1. **Fresh heads against the base**: the base with the physical tokens of an untrained head appended (what Stage I
   starts from: LoRA zero, head at init), for `--heads` head seeds. Nothing is learned; any difference is the
   model being perturbed.
2. Per training seed: Stage I, Stage II (Flow-DPO on the DiT LoRA) against Stage I, then **Stage III on the true
   labels against Stage III on placebo labels**: the same Stage II candidates and pairs, each pair's winner and
   loser swapped at random (`pipeline.flipped_pairs`, `--flips` draws), the same Flow-DPO on the head. Both
   against Stage II.
3. With `--pair-margins D`: each Stage III head's Flow-DPO implicit reward margin against the Stage II head
   (`training.validation.preference_margins`, D draws of t and noise), on its training pairs (true labels) and on
   **held-out pairs**: the Stage II model's candidates on 96 other start images, labelled by the ground truth as
   the training pairs are. Accuracy above 50% there means the head learned a preference that holds on start
   images it never trained on; 50% means it memorised its pairs.
4. With `--variant NAME:SET,SET`: Stage III on the true labels again from the same Stage II with these settings
   changed; a variant that changes the candidates or pairs (`CANDIDATE_FIELDS`, `PAIR_FIELDS`) samples or labels
   its own.

Every figure is held-out avg L2 against the row it builds on, with the paired bootstrap 95% interval, on each
eval seed, with `--eval-videos` videos per held-out drop (the demo uses 4); `*` marks an interval below 0, `+`
one above 0. A stage whose gain is real beats its placebos; one whose gain is what any perturbation gives does not.
The held-out drops per split are the demo's `eval_scenes` (100; the runs in bench/FINDINGS.md made before the
demo's held-out set grew used 30 per split: `--set eval_scenes=30` repeats them).

    python bench/demo_placebo.py [--base drop --cache DIR | --assets FILE] [--seeds 0,1,2] [--eval-seeds 0,1,2]
                                 [--eval-videos 8] [--heads 5] [--flips 2] [--pair-margins 16] [--set beta=500 ...]
                                 [--variant soup4:head_soup=4 --variant s192:head_scenes=192 ...]

`--base drop` uses `bench/demo_drop_base.py`'s wrong-physics drop base (11 minutes to pretrain, once with
`--cache`); `shipped` the demo's base. On 2 cores: about 3 minutes for the fresh heads and 10 per training seed.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the settings that change Stage III's candidates, and those that change only its pairs: a --variant that changes
# one samples (or labels) its own
CANDIDATE_FIELDS = ("head_scenes", "candidates")
PAIR_FIELDS = ("min_margin", "head_pairs_whole", "head_pairs_per_image")
PAIR_CHECK_SEED = 700_000  # held-out pairs' start images (the DPO stages' are 500_000 on, online rounds' 601_000 on)


def main() -> int:
    import numpy as np

    from demo_args import add_base, add_set, ints, load_world, settings, write_json

    from physmaster.demo.backbone import head_input
    from physmaster.demo.cli import checked_settings, held_out_set
    from physmaster.demo.evaluation import bootstrap_ci, score_scenes
    from physmaster.demo.pipeline import (Settings, flipped_pairs, freeze_dit, head_pairs, lora_pairs, new_head,
                                          sample_candidates, stage_one, stage_three, stage_two)
    from physmaster.training.validation import margin_summary, preference_margins

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_base(ap)
    ap.add_argument("--seeds", type=ints, default=[0, 1, 2], help="training seeds, e.g. 0,1,2")
    ap.add_argument("--eval-seeds", type=ints, default=[0, 1, 2], help="held-out sets, e.g. 0,1,2")
    ap.add_argument("--eval-videos", type=int, default=8,
                    help=f"videos per held-out drop (the demo: {Settings.eval_videos})")
    ap.add_argument("--heads", type=int, default=5, help="fresh (untrained) heads compared with the base")
    ap.add_argument("--flips", type=int, default=2, help="placebo label draws per training seed")
    ap.add_argument("--pair-margins", type=int, default=0, metavar="D",
                    help="also each Stage III head's Flow-DPO margin on its training pairs and on held-out pairs, "
                    "over D draws of t and noise (0 = off)")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME:SET,SET",
                    help="also Stage III on the true labels with these settings changed (repeatable), e.g. "
                    "soup4:head_soup=4 or slow:lr_head=2.5e-4,dpo_steps=400; from the same Stage II and pairs")
    add_set(ap)
    ap.add_argument("--json", type=Path, default=None, help="also write every comparison to this file")
    args = ap.parse_args()
    st = settings(args)
    if args.eval_videos < 1 or args.heads < 0 or args.flips < 0 or args.pair_margins < 0:
        raise SystemExit("--eval-videos must be >= 1, --heads, --flips and --pair-margins >= 0")
    variants = []
    for v in args.variant:
        name, _, items = v.partition(":")
        if not name or not items:
            raise SystemExit(f"--variant {v!r}: use NAME:SET,SET (e.g. soup4:head_soup=4)")
        vst = checked_settings(st, items.split(","))
        if vst.head_reads != st.head_reads:
            raise SystemExit(f"--variant {v!r}: head_reads changes Stage I's input too; give it with --set")
        variants.append((name, vst))
    t_start = time.perf_counter()
    vm0, backbone = load_world(args)
    backbone = head_input(backbone, st.head_reads)
    k = args.eval_videos
    held = {es: held_out_set(vm0, backbone, st.eval_scenes, es, k) for es in args.eval_seeds}

    def evaluate(vm, head):
        out = {}
        for es, (scenes, rep, noises) in held.items():
            out[es] = score_scenes(vm.decode(vm.sample(head, rep, noises, st.sample_steps)), scenes, k)["l2"]
        return out

    records, margins = [], []

    def compare(kind, new, ref, **what):
        for es in held:
            d = new[es] - ref[es]
            lo, hi = bootstrap_ci(d)
            mark = "*" if hi < 0 else "+" if lo > 0 else " "
            rec = {"kind": kind, **what, "eval_seed": es, "l2": float(new[es].mean()), "ref": float(ref[es].mean()),
                   "relative": float(d.mean() / ref[es].mean()), "ci": [lo, hi]}
            records.append(rec)
            label = " ".join(f"{n} {v}" for n, v in what.items())
            print(f"  {kind:<22} {label:<24} eval seed {es}: {rec['l2']:.4f} vs {rec['ref']:.4f} "
                  f"{rec['relative']:+6.1%} [{lo:+.4f}, {hi:+.4f}]{mark}", flush=True)

    base = evaluate(vm0, None)
    print(f"fresh heads against the base ({args.base} base, {k} videos per held-out drop):")
    for h in range(args.heads):
        compare("fresh head - base", evaluate(vm0, new_head(st, h).head), base, head_seed=h)
    quiet = lambda m: None  # noqa: E731
    for seed in args.seeds:
        t0 = time.perf_counter()
        print(f"training seed {seed}:", flush=True)
        vm = dataclasses.replace(vm0, den=copy.deepcopy(vm0.den))
        encoder = stage_one(vm, backbone, st, seed, quiet)
        r1 = evaluate(vm, encoder.head)
        pairs_1 = lora_pairs(sample_candidates(vm, encoder.head, backbone, st, seed, "Stage I"), st, quiet, "")
        stage_two(vm, encoder, pairs_1, st, seed, quiet, backbone=backbone)
        r2 = evaluate(vm, encoder.head)
        compare("Stage II - Stage I", r2, r1, seed=seed)
        freeze_dit(vm, seed)
        cands_2 = sample_candidates(vm, encoder.head, backbone, st, seed, "Stage II", scenes=st.head_scenes)
        pairs_2 = head_pairs(cands_2, st, quiet, "")
        if args.pair_margins:
            held_pairs = head_pairs(sample_candidates(vm, encoder.head, backbone, st, seed, "held-out pairs",
                                                      scene_base=PAIR_CHECK_SEED), st, quiet, "")
        for f in range(args.flips + 1):
            pairs = pairs_2 if f == 0 else flipped_pairs(pairs_2, [seed, f])
            head = encoder.clone()
            stage_three(vm, head, pairs, st, seed, quiet)
            labels = "true" if f == 0 else f"placebo {f}"
            compare("Stage III - Stage II", evaluate(vm, head.head), r2, seed=seed, labels=labels)
            if args.pair_margins:
                figs = {name: margin_summary(preference_margins(vm.den, ps, head.head, encoder.head, st.beta,
                                                                args.pair_margins, seed=seed))
                        for name, ps in (("training pairs", pairs_2), ("held-out pairs", held_pairs))}
                margins.append({"seed": seed, "labels": labels, **figs})
                print("  its Flow-DPO margin against Stage II, on true-labelled pairs: " + "; ".join(
                    f"{name} ({g['pairs']}) {g['accuracy']:.0%} right, mean {g['margin']:+.3f} +- {g['se']:.3f}"
                    for name, g in figs.items()), flush=True)
        for name, vst in variants:
            head = encoder.clone()
            same_cands = all(getattr(vst, f) == getattr(st, f) for f in CANDIDATE_FIELDS)
            vcands = cands_2 if same_cands else sample_candidates(vm, encoder.head, backbone, vst, seed, "Stage II",
                                                                  scenes=vst.head_scenes)
            same_pairs = same_cands and all(getattr(vst, f) == getattr(st, f) for f in PAIR_FIELDS)
            vpairs = pairs_2 if same_pairs else head_pairs(vcands, vst, quiet, "")
            stage_three(vm, head, vpairs, vst, seed, quiet)
            compare("Stage III - Stage II", evaluate(vm, head.head), r2, seed=seed, labels=f"variant {name}")
        print(f"  ({time.perf_counter() - t0:.0f}s)", flush=True)
    print("summary (intervals below 0 | across 0 | above 0, mean relative change):")
    groups = {}
    for r in records:
        labels = r.get("labels", "")
        key = r["kind"] + ("" if not labels else f", {labels}" if labels.startswith("variant")
                           else f", {'true' if labels == 'true' else 'placebo'} labels")
        groups.setdefault(key, []).append(r)
    for key, rs in groups.items():
        below = sum(r["ci"][1] < 0 for r in rs)
        above = sum(r["ci"][0] > 0 for r in rs)
        print(f"  {key:<40} {below} | {len(rs) - below - above} | {above}   "
              f"{np.mean([r['relative'] for r in rs]):+.1%}")
    for kind in ("true", "placebo"):
        ms = [m for m in margins if (m["labels"] == "true") == (kind == "true")]
        if ms:
            print(f"  Stage III heads on {kind} labels, Flow-DPO margin: " + "; ".join(
                f"{name} {np.mean([m[name]['accuracy'] for m in ms]):.0%} right, mean "
                f"{np.mean([m[name]['margin'] for m in ms]):+.3f}" for name in ("training pairs", "held-out pairs")))
    if args.json is not None:
        write_json(args.json, {"settings": vars(st), "base": args.base, "eval_videos": k, "comparisons": records,
                               "pair_margins": margins})
    print(f"settings changed: {', '.join(args.set) or 'none'} ({time.perf_counter() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
