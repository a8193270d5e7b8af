"""Stage III's variants from one Stage II: the demo's flow to Stage II and its candidates (as `python -m physmaster demo
--seed S --eval-seed E --set ...` makes them), then Stage III (Flow-DPO on the head alone) once per `--variant`, each
from a copy of the same Stage II model, each scored on the demo's held-out drops against Stage II: avg L2 (seen /
unseen), the paired bootstrap 95% interval, the part of the difference that lost frames make, the difference where
both rows find the object (`*`: interval below 0, `+`: above 0), and Stage III / Stage I. A variant changes only the
head's Flow-DPO settings (`HEAD_FIELDS`); the rest, and the Stage II candidates, are the run's (`--set`), so every
variant learns from the same draws, but for a variant that changes `stage_three_recoloured` or
`stage_three_relooked`, which draws Stage III's candidates anew with those shares of recoloured and relooked start
images (once per pair of shares).

    python bench/demo_stage3_variants.py --seed 0 --variant default: --variant beta2k:head_beta=2000 \\
        --variant steps100:head_dpo_steps=100

bench/FINDINGS.md ("Stage III on three quarters recoloured"; "Stage II from every pair at beta 500", its part
"Stage III after this Stage II") lists what it printed. On 2 cores: about 6 minutes
for Stage I, Stage II and their candidates, then about a minute a variant. `--fast`: the demo's smoke settings
(numbers mean nothing).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# what a --variant may change: the head's Flow-DPO settings (the Stage II candidates they learn from are the run's;
# a variant's `stage_three_recoloured` / `stage_three_relooked` draws Stage III's candidates anew with those shares)
HEAD_FIELDS = ("head_dpo_steps", "lr_head", "head_beta", "head_anchor", "head_t_min", "head_soup", "head_bag",
               "head_pairs_whole", "head_pairs_per_image", "head_pairs_all", "head_margin_use", "min_margin",
               "label_coherence", "dpo_motion_weight", "dpo_batch", "head_dpo_positive", "head_rounds",
               "head_modules", "stage_three_recoloured", "stage_three_relooked")


def main() -> int:
    from demo_args import stage_three_start, variants_parser, variants_settings, versus, write_json

    from physmaster.demo import pipeline as P

    ap = variants_parser(__doc__, HEAD_FIELDS, "the head's Flow-DPO settings", "beta=2000")
    args = ap.parse_args()
    st, runs = variants_settings(args)
    log = lambda m: print(m, flush=True)  # noqa: E731
    w = stage_three_start(args, st, log)
    vm, backbone, evaluate, n, seed, encoder, r1, r2, rows = (w.vm, w.backbone, w.evaluate, w.n, w.seed, w.encoder,
                                                              w.r1, w.r2, w.rows)
    draws = {(st.stage_three_recoloured, st.stage_three_relooked): w.cands}
    for name, items, sv in runs:
        anchor = P.anchor_videos(vm, backbone, sv) if sv.head_anchor > 0 else None
        share = (sv.stage_three_recoloured, sv.stage_three_relooked)
        if share not in draws:
            draws[share] = P.stage_three_candidates(vm, encoder.head, backbone, dataclasses.replace(
                st, stage_three_recoloured=share[0], stage_three_relooked=share[1]), seed)
        pairs = P.head_pairs(draws[share], sv, lambda m: None, "Stage II")
        enc = encoder.clone()
        t0 = time.perf_counter()
        P.stage_three_rounds(vm, enc, pairs, sv, seed, lambda m: None, backbone, anchor=anchor)
        r = evaluate(enc.head)
        row, text = versus(r, r2, n, "vs_stage_two")
        log(f"{name}: Stage III avg L2 {row['l2']:.4f} (seen {row['seen']:.4f}, unseen {row['unseen']:.4f}) vs "
            f"Stage II {text}; III / I {row['l2'] / r1['l2'].mean():.3f}; coherence {row['coherence']:.3f}; "
            f"{len(pairs)} pairs ({time.perf_counter() - t0:.0f}s)")
        rows[name] = {**row, "pairs": len(pairs), "set": items}
    if args.out:
        write_json(args.out, {"seed": seed, "eval_seed": w.eval_seed, "set": args.set, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
