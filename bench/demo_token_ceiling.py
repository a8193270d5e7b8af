"""What the physical tokens' physics is worth on the proxy world, and how much of it the trained models take.

The one physics the start image shows and the first-frame latent keeps only in part is the material (the bounce).
This script measures, on the demo's held-out drops:

1. **The material-blind floor**: the avg L2 of a model perfect in everything but the material, every object
   bounced with one restitution (`evaluation.material_blind_l2`). However well the tokens carry the material,
   they cannot take more than this off a perfect model.
2. For the demo's Stage I and Stage II models (trained as `python -m physmaster demo` trains them), sampled with
   the physical tokens scaled by each of `--scales` (0: zeroed; 1: as trained; > 1: the head's output
   amplified, a move Flow-DPO on the head could make): avg L2 (all / seen / unseen drops; against x1, paired
   per-scene bootstrap 95% interval, the same noises for every scale), coherence, the
   **material confusion** (which material's bounce each video is closest to,
   `evaluation.material_confusion`) and its **bound**: what reading every material right could take off the
   row's avg L2, the rest equal (the L2 between the rendering a video is read as and the truth, averaged), on
   all held-out drops.

If the bound is smaller than what a head that learned nothing moves avg L2 by (`bench/demo_placebo.py`), no
Stage III on this world can show a gain that a placebo could not.

    python bench/demo_token_ceiling.py [--seed 0] [--eval-seeds 0,1] [--eval-videos 4] [--scales 0,1,1.5,2,3]
                                       [--base shipped|drop --cache DIR] [--set NAME=VALUE ...] [--json FILE]

About 9 minutes on 2 cores with 30 held-out drops per split (Stage I, Stage II, 20 evaluations of 240 videos), the
size of the runs in bench/FINDINGS.md: `--set eval_scenes=30` repeats them; the demo's default is now 100.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    import numpy as np

    from demo_args import add_base, add_set, floats, ints, load_world, settings, write_json

    from physmaster.demo.cli import held_out_set
    from physmaster.demo.evaluation import bootstrap_ci, material_blind_l2, material_confusion, score_scenes
    from physmaster.demo.pipeline import Settings, lora_pairs, sample_candidates, stage_one, stage_two
    from physmaster.demo.world import MATERIALS, material_renderings

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--eval-seeds", type=ints, default=[0, 1], help="held-out sets, e.g. 0,1")
    ap.add_argument("--eval-videos", type=int, default=4,
                    help=f"videos per held-out drop (the demo: {Settings.eval_videos})")
    ap.add_argument("--scales", type=floats, default=[0.0, 1.0, 1.5, 2.0, 3.0],
                    help="factors on the physical tokens when sampling")
    add_base(ap)
    add_set(ap)
    ap.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    args = ap.parse_args()
    st = settings(args)
    if args.eval_videos < 1 or not args.scales or min(args.scales) < 0 or not args.eval_seeds:
        raise SystemExit("--eval-videos must be >= 1, --scales non-empty and >= 0, --eval-seeds non-empty")
    t_start = time.perf_counter()
    vm0, backbone = load_world(args)
    ref_scale = 1.0 if 1.0 in args.scales else args.scales[0]
    k, n_seen = args.eval_videos, st.eval_scenes  # held_out: the seen drops, then as many unseen ones
    held = {es: held_out_set(vm0, backbone, st.eval_scenes, es, k) for es in args.eval_seeds}
    restitutions = sorted(r for _, r in MATERIALS.values())
    renderings = {es: [material_renderings(s) for s in held[es][0]] for es in held}
    report = {"settings": dataclasses.asdict(st), "args": {k_: str(v) for k_, v in vars(args).items()},
              "floor": {}, "rows": []}

    def split(v):
        return float(v.mean()), float(v[:n_seen].mean()), float(v[n_seen:].mean())

    print("the material-blind floor: avg L2 of the truth with every object bounced with one restitution "
          "(all / seen / unseen drops):")
    for es, (scenes, _, _) in held.items():
        floors = {r: split(material_blind_l2(scenes, r, renderings[es])) for r in restitutions}
        report["floor"][es] = {str(r): f for r, f in floors.items()}
        print(f"  eval seed {es}: " + "; ".join(f"restitution {r}: {a:.4f} / {s:.4f} / {u:.4f}"
                                                 for r, (a, s, u) in floors.items()))

    def evaluate(name, vm, head):
        print(f"{name} ({k} videos per held-out drop; each scale's avg L2 against x{ref_scale:g}'s, paired "
              "bootstrap 95% interval):", flush=True)
        ref = {}
        for scale in sorted(args.scales, key=lambda x: x != ref_scale):  # the reference scale first
            for es, (scenes, rep, noises) in held.items():
                vids = vm.decode(vm.sample(head, rep, noises, st.sample_steps, token_scale=scale))
                r = score_scenes(vids, scenes, k)
                ref.setdefault(es, r["l2"])
                d = r["l2"] - ref[es]
                lo, hi = bootstrap_ci(d)
                conf = material_confusion(vids, scenes, k, renderings[es])
                counts = conf["counts"]
                row = {"model": name, "scale": scale, "eval_seed": es, "l2": split(r["l2"]),
                       "coherence": split(r["coherence"]),
                       "material_read": float(np.trace(counts) / counts.sum()) if counts.sum() else None,
                       "confusion": counts.tolist(), "order": list(conf["order"]), "bound": split(conf["gap"]),
                       "against_reference": {"relative": float(d.mean() / ref[es].mean()), "ci": [lo, hi]},
                       "per_scene_l2": r["l2"].tolist()}
                report["rows"].append(row)
                by_own = "; ".join(f"{own}: " + "/".join(f"{c / max(1, counts[i].sum()):.0%}" for c in counts[i])
                                   for i, own in enumerate(conf["order"]))
                (a, s, u), (ba, bs, bu) = row["l2"], row["bound"]
                vs = "" if scale == ref_scale else f" {d.mean() / ref[es].mean():+.1%} [{lo:+.4f}, {hi:+.4f}]"
                print(f"  tokens x{scale:<4g} eval seed {es}: avg L2 {a:.4f}{vs} (seen {s:.4f}, unseen {u:.4f}), "
                      f"coherence {row['coherence'][0]:.3f}; material read {row['material_read'] or 0:.0%} "
                      f"(own -> read as {'/'.join(map(str, conf['order']))}: {by_own}); misread bounces cost at "
                      f"most {ba:.4f} = {ba / a:.1%} of avg L2 (seen {bs:.4f}, unseen {bu:.4f})", flush=True)

    quiet = lambda m: None  # noqa: E731
    vm = dataclasses.replace(vm0, den=copy.deepcopy(vm0.den))
    encoder = stage_one(vm, backbone, st, args.seed, quiet)
    evaluate("Stage I", vm, encoder.head)
    pairs = lora_pairs(sample_candidates(vm, encoder.head, backbone, st, args.seed, "Stage I"), st, quiet, "")
    stage_two(vm, encoder, pairs, st, args.seed, quiet, backbone=backbone)
    evaluate("Stage II", vm, encoder.head)
    report["seconds"] = time.perf_counter() - t_start
    print(f"({report['seconds']:.0f}s)")
    if args.json is not None:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
