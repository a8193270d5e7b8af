"""Benchmark of the train CLIs under accelerate: 2 processes vs 1 process at the same global batch, and the time one
pair (or video) costs per stage. Prints side-by-side numbers; never a timed test.

    python bench/bench_accelerate.py [--steps 40] [--batch 4] [--repeats 2] [--size 16] [--frames 4]

1. `train-dpo --stage head` (Stage III) on a tiny Wan I2V transformer and a picker-format dataset of 12 pairs:
   1 process x batch B vs `accelerate launch` 2 processes x batch B/2 (DDP over gloo on CPU, one thread each),
   pairs per second from the run's own timer (the training loop, not start-up), and the ratio 2 / 1.
2. seconds per pair (per video) of each stage on 1 process: sft, dpo-lora, dpo-head.
On a 2-core machine shared with other jobs the ratio measures how well 2 processes use 2 cores; it cannot exceed 2.
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import train_data as td  # noqa: E402

RATE = re.compile(r"trained (\d+) steps in ([\d.]+) s: ([\d.]+) (pairs|videos)/s, ([\d.]+) s per")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args: list[str], processes: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if processes == 1:
        cmd = [sys.executable, "-m", "physmaster", *args, "--device", "cpu"]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               str(_port()), "-m", "physmaster", *args, "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    m = RATE.search(proc.stdout)
    if proc.returncode != 0 or not m:
        raise SystemExit(f"run failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    return float(m.group(3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--size", type=int, default=16, help="latent height and width")
    ap.add_argument("--frames", type=int, default=4, help="latent frames")
    ap.add_argument("--batch", type=int, default=4, help="global batch (even)")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    td.T, td.H, td.W = a.frames, a.size, a.size  # the test data's latent size (read when the data is written)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = td.write_model(tmp / "tiny-wan")
        pairs = td.write_preferences(tmp, "prefs", groups=4).path  # 12 pairs
        videos = td.write_videos(tmp, "videos", files=3, per_file=4).path  # 12 videos
        common = ["--model", str(model), "--tokens", "4", "--head-width", "32", "--latent-norm", "none",
                  "--checkpoint-every", "0", "--steps", str(a.steps), "--no-resume"]
        rates = {1: [], 2: []}
        for r in range(a.repeats):  # interleaved, so drifting machine load hits both alike
            for n in (1, 2):
                out = tmp / f"dpo{n}_{r}"
                rates[n].append(run(["train-dpo", "--pairs", str(pairs), "--stage", "head", "--out", str(out),
                                     "--batch-size", str(a.batch // n), *common], n))
        one, two = statistics.median(rates[1]), statistics.median(rates[2])
        print(f"Stage III (dpo-head), latents [{td.C}, {a.frames}, {a.size}, {a.size}], global batch {a.batch}, "
              f"{a.steps} steps, medians of {a.repeats}:")
        print(f"  1 process  x batch {a.batch}: {one:8.3f} pairs/s")
        print(f"  2 processes x batch {a.batch // 2}: {two:8.3f} pairs/s")
        print(f"  ratio 2 processes / 1 process: {two / one:.2f}x  (ideal on {os.cpu_count()} cores: "
              f"{min(2, os.cpu_count() or 1)}x)")
        print("seconds per item on 1 process (batch 1):")
        for stage, extra in (("sft", ["train-sft", "--videos", str(videos), "--lora-rank", "4"]),
                             ("dpo-lora", ["train-dpo", "--pairs", str(pairs), "--stage", "lora", "--lora-rank", "4"]),
                             ("dpo-head", ["train-dpo", "--pairs", str(pairs), "--stage", "head"])):
            per = [1.0 / run([*extra, "--out", str(tmp / f"{stage}_{r}"), "--batch-size", "1", *common], 1)
                   for r in range(a.repeats)]
            unit = "video" if stage == "sft" else "pair"
            print(f"  {stage:9s} {statistics.median(per):.4f} s per {unit}")


if __name__ == "__main__":
    main()
