"""`python -m physmaster scenes`: write a split of drop scenes (frames, masks, metadata) to a folder."""

from __future__ import annotations

import argparse
import time

HELP = "write a seen/unseen split of PISA-style drop scenes (PNG frames, masks, metadata) to a folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--split", choices=["seen", "unseen"], default="seen",
                        help="seen, or unseen (held-out shapes, colours and backgrounds)")
    parser.add_argument("--count", type=int, default=30, help="number of scenes (default 30)")
    parser.add_argument("--out", required=True, help="output folder (created; must be empty unless --force)")
    parser.add_argument("--size", type=int, default=64, help="frame width and height in pixels (default 64)")
    parser.add_argument("--frames", type=int, default=32, help="frames per scene (default 32)")
    parser.add_argument("--fps", type=float, default=16.0, help="frames per second (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="first seed; scene i uses seed+i (default 0)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty output folder")


def run(args) -> int:
    from .dataset import write_split

    t0 = time.perf_counter()
    index = write_split(args.split, args.count, args.out, size=args.size, frames=args.frames, fps=args.fps,
                        start_seed=args.seed, force=args.force)
    n = index["count"]
    print(f"wrote {n} {args.split} scene(s) (seeds {args.seed}..{args.seed + n - 1}, {args.size}x{args.size}, "
          f"{args.frames} frames at {args.fps:g} fps) to {index['path']} in {time.perf_counter() - t0:.1f} s")
    print(f"  index: {index['path']}/index.json; per scene: frames/*.png, masks.safetensors, meta.json")
    return 0
