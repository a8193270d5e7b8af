"""The demo on a base DiT pretrained on *wrong-physics drops* instead of generic motion (tried, not shipped:
bench/FINDINGS.md, "A base that keeps the object").

The shipped base learned generic motion: random directions, random (even upward) gravity, any restitution. From
one start image that motion cannot be told, so the tiny DiT samples the mean of many futures, a blob that smears
and splits, and it keeps the object whole in only a quarter of the frames (coherence 0.26 on the held-out drops).
Most of the demo's avg L2 is then frames where the object is lost, and every DPO gain is a gain there. A real I2V
base keeps objects whole and gets their physics wrong. This script pretrains the base DiT the way
`--make-base` does (same autoencoder, seed, steps, 1500 videos), but on `base_scene`s: drops of both splits'
objects from rest, under *half* the nominal gravity and with *one* restitution for every material. The start
image fully determines that motion, so the base keeps the object (coherence 0.85-0.90) and is wrong only in its
physics: how fast things fall, how they bounce. Then it runs the demo's rows (`physmaster.demo.cli.run_once`) and
prints the demo's table.

    python bench/demo_drop_base.py [--seed 0] [--eval-seed 0] [--cache DIR] [--set lora_rank=16 ...]

`--set NAME=VALUE` changes one of the demo's `Settings` (e.g. `beta=500`, `lora_rank=16`, `lr_sft=5e-4`).

Pretraining takes about 11 minutes on 2 cores (with `--cache DIR`, once), the rows about 8.5.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


BASE_GRAVITY, BASE_RESTITUTION = 0.5, 0.55  # x the nominal gravity; one bounce for every material
N_VIDEOS = 1500


def base_scene(seed: int):
    """A drop of either split's object from rest, under half the nominal gravity, bouncing the same whatever its
    material: wrong physics, and a motion that the start image fully determines."""
    import numpy as np

    from physmaster.demo.world import MATERIALS, NOMINAL_GRAVITY, SIZE, render

    rng = np.random.default_rng([seed, 78])
    split = "seen" if rng.random() < 0.5 else "unseen"
    texture = list(MATERIALS)[int(rng.integers(len(MATERIALS)))]
    return render(seed, split, initial_velocity=(0.0, 0.0), gravity=NOMINAL_GRAVITY * SIZE * BASE_GRAVITY,
                  texture=texture, restitution=BASE_RESTITUTION)


def drop_base(vm, cache: Path | None) -> None:
    """Replace vm's base DiT (and the guide) by one pretrained on `base_scene`s, or read it from `cache`."""
    from physmaster.demo.assets import ASSET_SEEDS, ASSET_STEPS
    from physmaster.demo.generator import pretrain_dit, pretraining_condition, rebase

    def pretrain(vm_):
        lat = vm_.encode([base_scene(ASSET_SEEDS[0] + i).frames for i in range(N_VIDEOS)])
        return pretrain_dit(lat, pretraining_condition(lat), ASSET_STEPS["dit"], seed=0)

    rebase(vm, None if cache is None else cache / "drop_base.safetensors", pretrain, "wrong-physics drop base")


def main() -> int:
    from demo_args import add_base, add_set, load_world, settings

    from physmaster.demo.cli import run_once
    from physmaster.demo.report import format_run

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seed", type=int, default=0)
    add_base(ap, choose=False)
    add_set(ap, "beta=500 or lora_rank=16")
    args = ap.parse_args()
    st = settings(args)
    t0 = time.perf_counter()
    vm, backbone = load_world(args, drop=True)
    r = run_once((vm, backbone), st, args.seed, args.eval_seed, lambda m: print(m, flush=True))
    print(format_run(r, st.eval_scenes))
    print(f"settings changed: {', '.join(args.set) or 'none'} ({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
