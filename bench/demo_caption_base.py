"""The demo on a base DiT that also learned from captions (tried, not shipped: bench/FINDINGS.md, "A base pretrained on
captions").

A real I2V model is pretrained with text that describes the motion, so its cross-attention, the path the physical
tokens take, is a live route from context to video; the demo's base saw one constant prompt. This script gives the
shipped base a caption phase: 2000 more steps (lr 5e-4) of flow matching on its generic-motion videos, each with a
*caption* of its motion (gravity, initial velocity, floor collisions, restitution: `FIELDS`, each in about
[-1, 1], a quarter of them left unsaid = 0), embedded by a fixed random linear map into the 4 context tokens.
The demo's prompt becomes the drop's caption with the restitution unsaid (the material is what the physical
tokens can add). Then it runs the demo's rows (`physmaster.demo.cli.run_once`) and prints the demo's table.

    python bench/demo_caption_base.py [--seed 0] [--eval-seed 0] [--cache DIR]

The caption phase takes about 4.5 minutes on 2 cores (with `--cache DIR`, once), the rows about 9.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

FIELDS = ("gravity", "vx", "vy", "floor", "restitution")
UNSAID = 0.25  # the share of a generic video's caption fields left unsaid (0)
DROP_CAPTION = (1.0, 0.0, 0.0, 1.0, 0.0)  # nominal gravity, from rest, onto the floor; restitution unsaid
STEPS, LR = 2000, 5e-4


def caption_context(fields) -> torch.Tensor:
    """Captions [B, 5] -> text contexts [B, 4, 32]: the demo's constant prompt (the empty caption) plus a fixed
    random linear map of the fields."""
    from physmaster.demo.generator import PROMPT_LEN, TEXT_DIM, prompt_context

    proj = torch.randn(len(FIELDS), PROMPT_LEN * TEXT_DIM, generator=torch.Generator().manual_seed(98765))
    proj = proj / len(FIELDS) ** 0.5 * 2
    fields = torch.as_tensor(np.asarray(fields, np.float32)).reshape(-1, len(FIELDS))
    return prompt_context()[0] + (fields @ proj).view(-1, PROMPT_LEN, TEXT_DIM)


def generic_captions(scenes, seed: int = 5) -> np.ndarray:
    """Captions [N, 5] of `world.generic_scene`s, an `UNSAID` share of the fields zeroed, drawn scene by scene."""
    from physmaster.demo.world import FPS, FRAMES, SIZE

    rng = np.random.default_rng(seed)
    out = []
    for s in scenes:
        m, o = s.meta, s.meta["overrides"]
        v = np.asarray(o["initial_velocity"], np.float64) / (0.5 * SIZE / ((FRAMES - 1) / FPS))
        c = np.array([m["gravity_norm"] / 3.0, v[0], v[1], 1.0 if o["floor_collisions"] else -1.0,
                      (o["restitution"] - 0.5) / 0.4])
        out.append(c * (rng.random(len(c)) >= UNSAID))
    return np.array(out, np.float32)


def caption_phase(vm, cache: Path | None) -> None:
    """Train vm.den on from the shipped base with captions (or read it from `cache`); the guide follows."""
    from physmaster.demo.assets import ASSET_SEEDS
    from physmaster.demo.generator import pretrain_dit, pretraining_condition, rebase
    from physmaster.demo.world import generic_scene

    def pretrain(vm_):
        generic = [generic_scene(ASSET_SEEDS[0] + i) for i in range(1500)]  # the base's own videos
        lat = vm_.encode([s.frames for s in generic])
        cond = pretraining_condition(lat, caption_context(generic_captions(generic)))
        return pretrain_dit(lat, cond, STEPS, seed=0, lr=LR, den=vm_.den, name="captions")  # frozen after

    rebase(vm, None if cache is None else cache / "caption_base.safetensors", pretrain, "caption base")
    vm.prompt = caption_context([DROP_CAPTION])


def main() -> int:
    from physmaster.demo.assets import load_assets
    from physmaster.demo.cli import run_once
    from demo_args import add_set, settings
    from physmaster.demo.report import format_run

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=None, help="folder for the caption base (saved once, then read)")
    add_set(ap, "eval_scenes=30 (and --set eval_videos=2: the held-out set of the runs in bench/FINDINGS.md)")
    args = ap.parse_args()
    st = settings(args)
    t0 = time.perf_counter()
    vm, backbone, _ = load_assets()
    caption_phase(vm, args.cache)
    r = run_once((vm, backbone), st, args.seed, args.eval_seed, lambda m: print(m, flush=True))
    print(format_run(r, st.eval_scenes))
    print(f"({time.perf_counter() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
