"""The judge-labelled row's variants from one Stage II: the demo's flow to Stage II and Stage III's candidates (as
`python -m physmaster demo --seed S --eval-seed E --set ...` makes them), Stage III on the ground truth's pairs of
those candidates, then the row "Stage III (judge labels)" (Flow-DPO on the head alone, every pair labelled by the
physics judge without ground truth) once per `--variant`, each from a copy of the same Stage II model and on the same
candidates, each scored on the demo's held-out drops against Stage II: avg L2 (seen / unseen), the paired bootstrap
95% interval (`*`: below 0, `+`: above 0), the part lost frames make, the change where both rows find the object,
and the share of ground truth's Stage III gain it reaches (issue 11's goal: 70%, with the interval below 0). A variant
changes only how the judge's pairs are made and weighed (`JUDGE_FIELDS`); the ground-truth row keeps the run's
settings (`--set`).

    python bench/demo_judge_variants.py --seed 1 --variant confidence:judge_margin=confidence \\
        --variant gap:judge_margin=gap --variant gap02:judge_margin=gap,min_margin=0.02

bench/FINDINGS.md ("The judge's pairs weigh by its score gap") lists what it printed. On 2 cores: about 7 minutes
for Stage I, Stage II, their candidates and the ground truth's Stage III, then about 40 s a variant. `--fast`: the
demo's smoke settings (numbers mean nothing).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# what a --variant may change: how the judge's pairs are made and weighed (`pipeline.judge_pairs`) and the head's
# Flow-DPO settings they train with (the ground-truth row keeps the run's)
JUDGE_FIELDS = ("judge_margin", "judge_min_confidence", "min_margin", "judge_pairs_all", "head_pairs_whole",
                "head_pairs_per_image", "head_margin_use", "head_beta", "head_dpo_steps", "lr_head")


def main() -> int:
    from demo_args import stage_three_start, variants_parser, variants_settings, versus, write_json

    from physmaster.demo import pipeline as P

    ap = variants_parser(__doc__, JUDGE_FIELDS, "the judge's pairs and the head's Flow-DPO", "head_beta=1000")
    args = ap.parse_args()
    st, runs = variants_settings(args)
    log = lambda m: print(m, flush=True)  # noqa: E731
    w = stage_three_start(args, st, log)
    vm, evaluate, n, seed, encoder, r1, r2, rows, cands = (w.vm, w.evaluate, w.n, w.seed, w.encoder, w.r1, w.r2,
                                                           w.rows, w.cands)

    def score(name, head, n_pairs, t0, items=None):
        row, text = versus(evaluate(head), r2, n, "vs_stage_two")
        truth = rows.get("Stage III")
        share = "" if truth is None or truth["vs_stage_two"][0] >= 0 else \
            f" ({row['vs_stage_two'][0] / truth['vs_stage_two'][0]:.0%} of the ground truth's gain)"
        log(f"{name}: avg L2 {row['l2']:.4f} (seen {row['seen']:.4f}, unseen {row['unseen']:.4f}) vs Stage II "
            f"{text}{share}; III / I {row['l2'] / r1['l2'].mean():.3f}; coherence {row['coherence']:.3f}; "
            f"{n_pairs} pairs ({time.perf_counter() - t0:.0f}s)")
        rows[name] = {**row, "pairs": n_pairs, "set": items or []}

    # the ground truth's Stage III on these candidates (the demo's row), then each judge-labelled variant from the
    # same Stage II, at the demo's judge-labelled row's seed (`cli.run_once`: seed + 3, Stage III's)
    t0 = time.perf_counter()
    truth = encoder.clone()
    pairs = P.head_pairs(cands, st, log, "Stage II")
    P.stage_three(vm, truth, pairs, st, seed, lambda m: None)
    score("Stage III", truth.head, len(pairs), t0)
    for name, items, sv in runs:
        t0 = time.perf_counter()
        enc = encoder.clone()
        pairs = P.judge_pairs(cands, sv, log, "Stage II")
        if pairs is not None:
            P.dpo("dpo-head", vm, enc, pairs, sv, seed + 3, lambda m: None, name)
        score(name, enc.head, 0 if pairs is None else len(pairs), t0, items)
    if args.out:
        write_json(args.out, {"seed": seed, "eval_seed": w.eval_seed, "set": args.set, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
