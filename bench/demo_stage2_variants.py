"""Stage II's variants from one Stage I: the demo's flow to Stage I and its candidates (as `python -m physmaster demo
--seed S --eval-seed E --motion-weight W --set ...` makes them), then Stage II (Flow-DPO on a fresh DiT LoRA) once per
`--variant`, each from a copy of the same Stage I, each scored on the demo's held-out drops against Stage I: avg L2
(seen / unseen), the paired bootstrap 95% interval, the part of the difference that lost frames make, and the
difference where both rows find the object (`*`: interval below 0, `+`: above 0). A variant changes only Stage II's
settings (`STAGE_TWO_FIELDS`); the rest, and the candidates, are the run's (`--set`), so every variant learns from
the same draws.

    python bench/demo_stage2_variants.py --seed 2 --motion-weight 10 --variant default: \\
        --variant steps50:dpo_steps=50 --variant anchor:lora_anchor=3000 --variant recol:lora_recoloured=1,dpo_steps=50

bench/FINDINGS.md ("Stage I's loss where the object moves") lists what it printed. On 2 cores: about 5 minutes for
Stage I and the candidates, then about a minute a variant. `--fast`: the demo's smoke settings (numbers mean nothing).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# what a --variant may change: Stage II's own settings (the candidates they learn from are the run's)
STAGE_TWO_FIELDS = ("dpo_steps", "lr_lora", "beta", "lora_anchor", "lora_recoloured", "dpo_scenes", "pairs_per_image",
                    "min_margin", "label_coherence", "dpo_motion_weight", "dpo_batch", "lora_modules", "lora_rounds",
                    "lora_pairs_all", "lora_margin_use")


def main() -> int:
    from demo_args import variants_parser, variants_settings, variants_world, versus, write_json

    from physmaster.demo import pipeline as P

    ap = variants_parser(__doc__, STAGE_TWO_FIELDS, "Stage II's settings", "head_scenes=192", seed=2)
    ap.add_argument("--motion-weight", type=float, default=None,
                    help="Stage I's, as the demo's --motion-weight (default: the demo's)")
    args = ap.parse_args()
    base = P.Settings.fast() if args.fast else P.Settings()
    if args.motion_weight is not None:
        base.motion_weight = float(args.motion_weight)
    st, runs = variants_settings(args, base)
    seed = int(args.seed)
    eval_seed = seed if args.eval_seed is None else int(args.eval_seed)

    def log(msg):
        print(msg, flush=True)

    vm, backbone, scenes, evaluate = variants_world(args, st)
    n = st.eval_scenes

    encoder = P.stage_one(vm, backbone, st, seed, log)
    # the plain draw as far as a variant reads it; the head's draw (as the demo makes it, `cli.run_once`) only when
    # a variant reads it, sampling only what the plain draw lacks (a candidate's noise depends on its index alone)
    plain = P.sample_candidates(vm, encoder.head, backbone, st, seed, "Stage I",
                                scenes=max(s.dpo_scenes for *_, s in runs))
    recol = None
    if any(s.lora_recoloured for *_, s in runs):
        recol = P.sample_candidates(vm, encoder.head, backbone, st, seed, "Stage I", scenes=st.head_scenes,
                                    recoloured=st.head_recoloured, reuse=plain)
    r1 = evaluate(encoder.head)
    log(f"Stage I: avg L2 {r1['l2'].mean():.4f} (seen {r1['l2'][:n].mean():.4f}, unseen {r1['l2'][n:].mean():.4f}), "
        f"coherence {r1['coherence'].mean():.3f}")
    den0 = copy.deepcopy(vm.den)
    rows = {"Stage I": {"l2": float(r1["l2"].mean()), "coherence": float(r1["coherence"].mean())}}
    for name, items, sv in runs:
        cands = (recol if sv.lora_recoloured else plain).first(sv.dpo_scenes)
        pairs = P.lora_pairs(cands, sv, lambda m: None, "Stage I")
        vm.den = copy.deepcopy(den0)
        enc = encoder.clone()
        t0 = time.perf_counter()
        P.stage_two_rounds(vm, enc, pairs, sv, seed, lambda m: None, backbone)
        r = evaluate(enc.head)
        row, text = versus(r, r1, n, "vs_stage_one")
        log(f"{name}: Stage II avg L2 {row['l2']:.4f} (seen {row['seen']:.4f}, unseen {row['unseen']:.4f}) vs "
            f"Stage I {text}; coherence {row['coherence']:.3f}; {len(pairs)} pairs "
            f"({time.perf_counter() - t0:.0f}s)")
        rows[name] = {**row, "pairs": len(pairs), "set": items}
    if args.out:
        write_json(args.out, {"seed": seed, "eval_seed": eval_seed, "motion_weight": st.motion_weight,
                              "set": args.set, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
