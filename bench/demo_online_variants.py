"""Online round 2's variants from one round 1: the demo's flow to Stage II and its first online round (as
`python -m physmaster demo --seed S --eval-seed E --online 2 --set ...` makes them: fresh candidates of the Stage II
model, labelled by the physics judge alone, Flow-DPO on the head), then round 2 once per `--variant`, each from a copy
of the same round 1 model, on fresh candidates of that model (drawn once per choice of the draw's fields), each
scored on the demo's held-out drops against round 1: avg L2 (seen / unseen), the paired bootstrap 95% interval
(`*`: below 0, `+`: above 0; issue 11's goal: round 2 better than round 1 with its interval below 0), the part lost
frames make, the change where both rows find the object. A variant changes only round 2 (`ONLINE_FIELDS`: its draw,
the judge's pairs and the head's Flow-DPO); round 1 keeps the run's settings (`--set`).

    python bench/demo_online_variants.py --seed 2 --eval-seed 0 --variant default: \\
        --variant s192:online_later_scenes=192 --variant conf:judge_margin=confidence

bench/FINDINGS.md ("Online round 2 from one round 1") lists what it printed. On 2 cores: 6 to 7 minutes for
Stage I, Stage II and round 1, then about a minute a variant (more for a larger draw). `--fast`: the demo's smoke
settings (numbers mean nothing).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# what a --variant may change: round 2's draw of candidates (DRAW_FIELDS: drawn once per choice of them), its judge's
# pairs and its Flow-DPO on the head (round 1 keeps the run's settings)
DRAW_FIELDS = ("candidates", "head_scenes", "stage_three_recoloured", "online_later_relooked")
ONLINE_FIELDS = DRAW_FIELDS + ("online_steps", "online_later_batch", "online_later_scenes", "judge_margin",
                               "judge_min_confidence", "min_margin", "judge_pairs_all", "head_margin_use", "head_beta",
                               "lr_head", "head_anchor", "head_soup", "head_dpo_positive")


def main() -> int:
    from demo_args import demo_to_stage_two, variants_parser, variants_settings, variants_world, versus, write_json

    import numpy as np
    import torch

    from physmaster.demo import pipeline as P
    from physmaster.demo.report import online_row

    ap = variants_parser(__doc__, ONLINE_FIELDS, "online round 2's draw, pairs and Flow-DPO", "online_steps=100")
    args = ap.parse_args()
    st, runs = variants_settings(args)
    log = lambda m: print(m, flush=True)  # noqa: E731
    seed = int(args.seed)
    vm, backbone, scenes, evaluate = variants_world(args, st)
    encoder, r1, r2 = demo_to_stage_two(vm, backbone, st, seed, log, evaluate)
    n = st.eval_scenes
    with torch.no_grad():
        features = backbone(torch.from_numpy(np.stack([s.frames[0] for s in scenes])).float())

    @torch.no_grad()
    def tokens(head):
        return head(features).flatten(1)

    start = tokens(encoder.head)

    def drift(head):
        """How far a head's physical tokens of the held-out start images moved from the Stage II head's: the
        norm of the change over the Stage II tokens' norm, seen / unseen drops."""
        d = (tokens(head) - start).norm(dim=1) / start.norm(dim=1)
        return float(d[:n].mean()), float(d[n:].mean())

    def round_(r, enc, sv, cands):
        """The demo's online round r (`cli.run_once`) on `cands`: the judge's pairs, Flow-DPO on enc's head at the
        round's seed; the number of pairs."""
        pairs = P.judge_pairs(cands, sv, log, "Stage II" if r == 1 else online_row(r - 1))
        if pairs is not None:
            anchor = P.anchor_videos(vm, backbone, sv) if sv.head_anchor > 0 else None
            P.dpo("dpo-head", vm, enc, pairs, P.online_dpo_settings(sv, r), seed + 3 + r, lambda m: None, online_row(r),
                  anchor=anchor)
        return 0 if pairs is None else len(pairs)

    def draw(r, head, sv):
        return P.online_candidates(vm, head, backbone, sv, seed, r, online_row(r))

    t0 = time.perf_counter()
    first = encoder.clone()
    n1 = round_(1, first, st, draw(1, first.head, st))
    ra = evaluate(first.head)
    row, text = versus(ra, r2, n, "vs_previous")
    moved = drift(first.head)
    log(f"online round 1: avg L2 {row['l2']:.4f} vs Stage II {text}; token drift from Stage II "
        f"{moved[0]:.3f} / {moved[1]:.3f} (seen / unseen); {n1} pairs ({time.perf_counter() - t0:.0f}s)")
    rows = {"Stage I": {"l2": float(r1["l2"].mean())},
            "Stage II": {"l2": float(r2["l2"].mean()), "coherence": float(r2["coherence"].mean())},
            online_row(1): {**row, "pairs": n1, "token_drift": list(moved)}}
    draws = {}
    for name, items, sv in runs:
        t0 = time.perf_counter()
        key = tuple(getattr(sv, f) for f in DRAW_FIELDS) + (P.online_scenes(sv, 2),)
        if key not in draws:
            draws[key] = draw(2, first.head, sv)
        enc = first.clone()
        k = round_(2, enc, sv, draws[key])
        row, text = versus(evaluate(enc.head), ra, n, "vs_previous")
        moved = drift(enc.head)
        log(f"{name}: round 2 avg L2 {row['l2']:.4f} (seen {row['seen']:.4f}, unseen {row['unseen']:.4f}) vs round 1 "
            f"{text}; coherence {row['coherence']:.3f}; token drift from Stage II {moved[0]:.3f} / {moved[1]:.3f}; "
            f"{k} pairs ({time.perf_counter() - t0:.0f}s)")
        rows[name] = {**row, "pairs": k, "set": items, "token_drift": list(moved)}
    if args.out:
        write_json(args.out, {"seed": seed, "eval_seed": seed if args.eval_seed is None else int(args.eval_seed),
                              "set": args.set, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
