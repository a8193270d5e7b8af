"""Stage III's variants from one Stage II: the demo's flow to Stage II and its candidates (as `python -m physmaster demo
--seed S --eval-seed E --set ...` makes them), then Stage III (Flow-DPO on the head alone) once per `--variant`, each
from a copy of the same Stage II model, each scored on the demo's held-out drops against Stage II: avg L2 (seen /
unseen), the paired bootstrap 95% interval, the part of the difference that lost frames make, the difference where
both rows find the object (`*`: interval below 0, `+`: above 0), and Stage III / Stage I. A variant changes only the
head's Flow-DPO settings (`HEAD_FIELDS`); the rest, and the Stage II candidates, are the run's (`--set`), so every
variant learns from the same draws, but for a variant that changes `stage_three_recoloured`, which draws Stage III's
candidates anew with that share of recoloured start images (once per share).

    python bench/demo_stage3_variants.py --seed 0 --variant default: --variant beta2k:head_beta=2000 \\
        --variant steps100:head_dpo_steps=100

bench/FINDINGS.md ("Stage III on three quarters recoloured"; "Stage II from every pair at beta 500", its part
"Stage III after this Stage II") lists what it printed. On 2 cores: about 6 minutes
for Stage I, Stage II and their candidates, then about a minute a variant. `--fast`: the demo's smoke settings
(numbers mean nothing).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# what a --variant may change: the head's Flow-DPO settings (the Stage II candidates they learn from are the run's;
# a variant's `stage_three_recoloured` draws Stage III's candidates anew with that share recoloured)
HEAD_FIELDS = ("head_dpo_steps", "lr_head", "head_beta", "head_anchor", "head_t_min", "head_soup", "head_bag",
               "head_pairs_whole", "head_pairs_per_image", "head_pairs_all", "head_margin_use", "min_margin",
               "label_coherence", "dpo_motion_weight", "dpo_batch", "head_dpo_positive", "head_rounds",
               "head_modules", "stage_three_recoloured")


def main() -> int:
    import numpy as np
    import torch

    from demo_args import add_set, variant_type, variants_world, write_json

    from physmaster.demo import pipeline as P
    from physmaster.demo.cli import checked_settings
    from physmaster.demo.evaluation import bootstrap_ci, paired_found

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="training seed (as the demo's --seed)")
    ap.add_argument("--eval-seed", type=int, default=None, help="held-out scenes (default: the training seed)")
    ap.add_argument("--variant", type=variant_type(HEAD_FIELDS, "the head's Flow-DPO settings"),
                    action="append", required=True, metavar="NAME:SET,SET")
    ap.add_argument("--fast", action="store_true", help="the demo's smoke settings (numbers mean nothing)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    add_set(ap, "beta=2000")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    st = checked_settings(P.Settings.fast() if args.fast else P.Settings(), args.set)
    runs = [(name, items, checked_settings(st, items)) for name, items in args.variant]
    seed = int(args.seed)
    eval_seed = seed if args.eval_seed is None else int(args.eval_seed)

    def log(msg):
        print(msg, flush=True)

    vm, backbone, scenes, evaluate = variants_world(args, st)
    n = st.eval_scenes

    # the demo's Stage I and Stage II (`cli.run_once`; a candidate's noise depends on its index alone, so the plain
    # draw of Stage II's start images is the demo's, and Stage II's model the demo's, to the digit)
    encoder = P.stage_one(vm, backbone, st, seed, log)
    shared = st.head_recoloured == 0
    draw = P.sample_candidates(vm, encoder.head, backbone, st, seed, "Stage I",
                               scenes=max(st.dpo_scenes, st.head_scenes) if shared else st.dpo_scenes)
    if st.lora_recoloured and not shared:
        draw = P.sample_candidates(vm, encoder.head, backbone, st, seed, "Stage I", scenes=st.head_scenes,
                                   recoloured=st.head_recoloured, reuse=draw)
    r1 = evaluate(encoder.head)
    P.stage_two_rounds(vm, encoder, P.lora_pairs(draw.first(st.dpo_scenes), st, log, "Stage I"), st, seed, log,
                       backbone)
    del draw
    r2 = evaluate(encoder.head)
    log(f"Stage I: avg L2 {r1['l2'].mean():.4f}; Stage II: avg L2 {r2['l2'].mean():.4f} (seen "
        f"{r2['l2'][:n].mean():.4f}, unseen {r2['l2'][n:].mean():.4f}), coherence {r2['coherence'].mean():.3f}")
    P.freeze_dit(vm, seed)
    cands = P.sample_candidates(vm, encoder.head, backbone, st, seed, "Stage II", scenes=st.head_scenes,
                                recoloured=st.stage_three_recoloured)
    rows = {"Stage I": {"l2": float(r1["l2"].mean())},
            "Stage II": {"l2": float(r2["l2"].mean()), "coherence": float(r2["coherence"].mean())}}
    draws = {st.stage_three_recoloured: cands}
    for name, items, sv in runs:
        anchor = P.anchor_videos(vm, backbone, sv) if sv.head_anchor > 0 else None
        share = sv.stage_three_recoloured
        if share not in draws:
            draws[share] = P.sample_candidates(vm, encoder.head, backbone, st, seed, "Stage II", scenes=st.head_scenes,
                                               recoloured=share)
        pairs = P.head_pairs(draws[share], sv, lambda m: None, "Stage II")
        enc = encoder.clone()
        t0 = time.perf_counter()
        P.stage_three_rounds(vm, enc, pairs, sv, seed, lambda m: None, backbone, anchor=anchor)
        r = evaluate(enc.head)
        d = r["l2"] - r2["l2"]
        lost = r["l2_lost"] - r2["l2_lost"]
        found = paired_found(r["frame_l2"], r2["frame_l2"])
        (lo, hi), (llo, lhi), (flo, fhi) = (bootstrap_ci(x) for x in (d, lost, found))

        def mark(a, b):
            return "*" if b < 0 else "+" if a > 0 else ""

        log(f"{name}: Stage III avg L2 {r['l2'].mean():.4f} (seen {r['l2'][:n].mean():.4f}, unseen "
            f"{r['l2'][n:].mean():.4f}) vs Stage II {100 * d.mean() / r2['l2'].mean():+.1f}%{mark(lo, hi)} "
            f"[{lo:+.4f}, {hi:+.4f}]; lost frames {lost.mean():+.4f}{mark(llo, lhi)} [{llo:+.4f}, {lhi:+.4f}]; "
            f"where found {found.mean():+.4f}{mark(flo, fhi)} [{flo:+.4f}, {fhi:+.4f}]; III / I "
            f"{r['l2'].mean() / r1['l2'].mean():.3f}; coherence {r['coherence'].mean():.3f}; {len(pairs)} pairs "
            f"({time.perf_counter() - t0:.0f}s)")
        rows[name] = {"l2": float(r["l2"].mean()), "seen": float(r["l2"][:n].mean()),
                      "unseen": float(r["l2"][n:].mean()), "vs_stage_two": [float(d.mean()), lo, hi],
                      "lost": [float(lost.mean()), llo, lhi], "found": [float(np.mean(found)), flo, fhi],
                      "coherence": float(r["coherence"].mean()), "pairs": len(pairs), "set": items}
    if args.out:
        write_json(args.out, {"seed": seed, "eval_seed": eval_seed, "set": args.set, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
