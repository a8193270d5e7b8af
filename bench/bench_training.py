"""Benchmark of the stage loops on the demo's tiny Wan model (CPU or GPU), printing medians.

    python bench/bench_training.py [--repeats 7] [--device cpu]

1. time of one Stage III Flow-DPO step (one pair) / one Stage I SFT step (one video): goal <= 2.5.
   (DPO runs the policy on winner+loser batched in one forward, the reference under no_grad.)
2. steps per second of each stage (sft, dpo-lora, dpo-head), batch 1.
3. peak memory of training with and without gradient checkpointing (subprocesses; ru_maxrss on CPU,
   torch.cuda.max_memory_allocated on GPU), minus the process's memory before the first step.
Runs are interleaved (sft, dpo-lora, dpo-head, sft, ...) so that drifting machine load hits all alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from physmaster.demo.autoencoder import DOWN, LATENT_CHANNELS, FrameAutoencoder  # noqa: E402
from physmaster.demo.backbone import GeometryBackbone  # noqa: E402
from physmaster.demo.generator import LORA_TARGETS, VideoModel, new_dit  # noqa: E402
from physmaster.demo.pipeline import Settings, new_head  # noqa: E402
from physmaster.demo.world import FRAMES, SIZE  # noqa: E402
from physmaster.training import (PreferencePair, PreferenceSet, StageTrainer, TrainConfig,  # noqa: E402
                                 VideoSample, VideoSet)


def build(stage: str, device: str, frames: int = FRAMES, gc: bool = False, batch: int = 1):
    torch.manual_seed(0)
    den = new_dit(0)
    den.model.to(device)
    den.add_lora(16, targets=LORA_TARGETS, seed=0)
    enc = new_head(Settings(), 0)
    enc.head.to(device)
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(batch, SIZE, SIZE, 3, generator=g).numpy()
    cond = VideoModel(FrameAutoencoder(), den).conditioning(imgs, GeometryBackbone())
    if frames != FRAMES:
        from physmaster.backends.diffusers_wan import make_i2v_condition
        cond.image_cond = make_i2v_condition(cond.image_cond[:, 4:, 0], frames)
    shape = (LATENT_CHANNELS, frames, SIZE // DOWN, SIZE // DOWN)
    if stage == "sft":
        data = VideoSet(VideoSample(torch.randn(shape, generator=g), cond.map(lambda x, i=i: x[i:i + 1]))
                        for i in range(batch))
    else:
        data = PreferenceSet(PreferencePair(cond.map(lambda x, i=i: x[i:i + 1]), torch.randn(shape, generator=g),
                                            torch.randn(shape, generator=g)) for i in range(batch))
    if stage == "dpo-head":
        den.set_lora_enabled(False)  # as in the demo: Stage II's LoRA folded, the adapter off
    cfg = TrainConfig(steps=10**9, lr=1e-4, batch_size=batch, beta=500.0, gradient_checkpointing=gc)
    return StageTrainer(stage, den, enc, data, cfg)


def step_time(tr: StageTrainer, n: int = 3) -> float:
    """Median seconds of one full training step (forward(s), backward, optimizer)."""
    times = []
    for _ in range(n):
        tr.config.steps = tr.step + 1
        t0 = time.perf_counter()
        tr.run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def memory_child(stage: str, gc: bool, device: str, frames: int, batch: int) -> None:
    import resource

    tr = build(stage, device, frames=frames, gc=gc, batch=batch)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device != "cpu":
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()
    tr.config.steps = 2
    tr.run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"cpu_rss_delta_mb": (peak - before) / 1024}
    if device != "cpu":
        out["cuda_peak_delta_mb"] = (torch.cuda.max_memory_allocated() - base_cuda) / 2**20
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--mem-frames", type=int, default=16, help="frames of the memory runs (longer = clearer)")
    ap.add_argument("--mem-batch", type=int, default=4)
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        memory_child(args._child[0], args._child[1] == "1", args.device, args.mem_frames, args.mem_batch)
        return

    stages = ("sft", "dpo-lora", "dpo-head")
    trainers = {s: build(s, args.device) for s in stages}
    for tr in trainers.values():  # warm-up
        step_time(tr, 2)
    times: dict[str, list[float]] = {s: [] for s in stages}
    for _ in range(args.repeats):
        for s in stages:
            times[s].append(step_time(trainers[s], 1))
    med = {s: statistics.median(v) for s, v in times.items()}
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, tiny Wan (demo config), "
          f"{FRAMES}x{SIZE}x{SIZE} pixel latent, batch 1, {args.repeats} interleaved repeats")
    for s in stages:
        print(f"  {s:9s} step median {med[s] * 1000:8.1f} ms  ({1 / med[s]:6.2f} steps/s)  "
              f"[min {min(times[s]) * 1000:.1f}, max {max(times[s]) * 1000:.1f}]")
    ratios = [d / s for d, s in zip(times["dpo-head"], times["sft"])]
    print(f"  Stage III DPO step / Stage I SFT step: median of paired ratios {statistics.median(ratios):.2f} "
          f"(ratio of medians {med['dpo-head'] / med['sft']:.2f}; goal <= 2.5)")
    print(f"  Stage II DPO step / Stage I SFT step: {med['dpo-lora'] / med['sft']:.2f}")

    print(f"peak training memory, batch {args.mem_batch}, {args.mem_frames} frames (subprocess, above the "
          "memory before the first step; median of 3):")
    for s in stages:
        row = []
        for gc in (False, True):
            vals = []
            for _ in range(3):
                cmd = [sys.executable, __file__, "--device", args.device, "--mem-frames", str(args.mem_frames),
                       "--mem-batch", str(args.mem_batch), "--_child", s, "1" if gc else "0"]
                res = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                     env={**os.environ, "PYTHONWARNINGS": "ignore"})
                vals.append(json.loads(res.stdout.strip().splitlines()[-1]))
            key = "cuda_peak_delta_mb" if args.device != "cpu" else "cpu_rss_delta_mb"
            row.append(statistics.median(v[key] for v in vals))
        print(f"  {s:9s} without checkpointing {row[0]:8.1f} MB   with {row[1]:8.1f} MB   "
              f"({row[1] / row[0] if row[0] else float('nan'):.2f}x)")


if __name__ == "__main__":
    main()
