"""Candidate files for `bench_judge.py --candidates`: the demo's Stage I and Stage II models' own candidates (its
start images x candidates, as `python -m physmaster demo` samples them for its DPO stages), with the ground truth
that the judge never sees, so the judge's agreement can be measured and developed without training again.

    python bench/demo_candidates.py --seed 0 --out DIR [--set NAME=VALUE ...]
    python bench/bench_judge.py --candidates DIR/stage1_candidates.npz
    python bench/bench_judge.py --candidates DIR/stage2_candidates.npz

Each file: `videos` uint8 [S, K, T, H, W, 3], `gt_frames` uint8 [S, T, H, W, 3] (the true drop; frame 0 is the
start image, the only part the judge is shown), `l2` [S, K] (each candidate's ground-truth PISA L2, as the demo
scores it) and `seeds` [S] (the drops' scene seeds). The first `dpo_scenes` start images, the ones the demo's
judge agreement is printed on. Stage I and Stage II are trained as the demo trains them (`pipeline.stage_one`,
`stage_two`); with the demo's thread count (the machine's cores) they are the demo's models. About 9 minutes on 2
cores.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_args, also when imported (tests)

import numpy as np  # noqa: E402

from demo_args import add_set, load_world, settings  # noqa: E402


def write(path: Path, c) -> None:
    """`Candidates` -> a candidates file, never half-written."""
    from physmaster.fileio import atomic_path

    S, K = c.l2.shape
    to8 = lambda x: (np.clip(np.asarray(x, np.float32), 0, 1) * 255 + 0.5).astype(np.uint8)  # noqa: E731
    videos = np.stack([to8(v) for v in c.videos]).reshape(S, K, *np.shape(c.videos[0]))
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, videos=videos, gt_frames=np.stack([to8(s.frames) for s in c.scenes]),
                                l2=c.l2.astype(np.float64), seeds=np.array([s.meta["seed"] for s in c.scenes]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0, help="training seed, as the demo's --seed")
    ap.add_argument("--out", type=Path, required=True, help="folder for stage1_candidates.npz, stage2_candidates.npz")
    add_set(ap, "candidates=16")
    args = ap.parse_args(argv)
    st = settings(args)
    from physmaster.demo import pipeline as P
    from physmaster.demo.backbone import head_input

    t0 = time.perf_counter()
    log = lambda m: print(f"[{time.perf_counter() - t0:5.0f}s] {m}", flush=True)  # noqa: E731
    vm, backbone = load_world(args, drop=False)
    backbone = head_input(backbone, st.head_reads)
    vm = dataclasses.replace(vm, den=copy.deepcopy(vm.den))
    vm.guidance = float(st.guidance)
    encoder = P.stage_one(vm, backbone, st, args.seed, log)
    c1 = P.sample_candidates(vm, encoder.head, backbone, st, args.seed, "Stage I",
                             scenes=max(st.dpo_scenes, st.head_scenes))
    write(args.out / "stage1_candidates.npz", c1.first(st.dpo_scenes))
    log(f"wrote {args.out / 'stage1_candidates.npz'}")
    P.stage_two(vm, encoder, P.lora_pairs(c1.first(st.dpo_scenes), st, log, "Stage I"), st, args.seed, log,
                backbone=backbone)
    del c1
    P.freeze_dit(vm, args.seed)
    c2 = P.sample_candidates(vm, encoder.head, backbone, st, args.seed, "Stage II")
    write(args.out / "stage2_candidates.npz", c2.first(st.dpo_scenes))
    log(f"wrote {args.out / 'stage2_candidates.npz'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
