"""Benchmark the physics judge against rendering one scene; `--validate` ranks true videos above corruptions.

    python bench/bench_judge.py [--runs 15] [--size 64 --frames 32 --fps 16]
    python bench/bench_judge.py --validate [--count 200]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from physmaster.physics import judge, pisa_metrics, render_scene  # noqa: E402
from physmaster.physics.corrupt import CORRUPTIONS  # noqa: E402
from physmaster.physics.validation import validate_judge  # noqa: E402


def _median_ms(fn, runs: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def bench(args) -> None:
    torch.set_num_threads(1)
    scenes = [render_scene(s, "seen" if s % 2 == 0 else "unseen", args.size, args.frames, args.fps)
              for s in range(args.runs)]
    it = iter(range(10**9))
    render_ms = _median_ms(lambda: render_scene(next(it), "seen", args.size, args.frames, args.fps), args.runs)
    k = iter(range(10**9))
    judge_ms = _median_ms(lambda: judge(scenes[next(k) % len(scenes)].frames, fps=args.fps), args.runs)
    k2 = iter(range(10**9))

    def judge_gt():
        sc = scenes[next(k2) % len(scenes)]
        return judge(sc.frames, gt_masks=sc.masks, fps=args.fps)

    judge_gt_ms = _median_ms(judge_gt, args.runs)
    sc = scenes[0]
    metrics_ms = _median_ms(lambda: pisa_metrics(sc.object_masks(), sc.object_masks()), args.runs)
    print(f"{args.size}x{args.size}, {args.frames} frames, 1 torch thread, median of {args.runs} runs")
    print(f"  render one scene                 {render_ms:8.2f} ms")
    print(f"  judge (no ground truth)          {judge_ms:8.2f} ms   ratio to render {judge_ms / render_ms:6.2f}x")
    print(f"  judge + PISA metrics (with gt)   {judge_gt_ms:8.2f} ms   ratio to render {judge_gt_ms / render_ms:6.2f}x")
    print(f"  pisa_metrics alone               {metrics_ms:8.2f} ms")


def validate(args) -> int:
    t0 = time.perf_counter()
    out = validate_judge(args.count, start_seed=args.seed, size=args.size, frames=args.frames, fps=args.fps)
    print(f"{out['count']} scenes (seen and unseen alternating, seeds {args.seed}..{args.seed + args.count - 1}), "
          f"judge without ground truth, {time.perf_counter() - t0:.0f} s")
    ok = True
    for k in CORRUPTIONS:
        rate = out["rates"][k]
        ok &= rate >= 0.95
        fails = out["failures"][k][:5]
        print(f"  true > {k:28s} {100 * rate:6.1f}%  ({out['totals'][k]} scenes)"
              + (f"  e.g. {fails}" if fails else ""))
    ts = sorted(out["true_scores"])
    print(f"  true-video scores: median {ts[len(ts) // 2]:.3f}, min {ts[0]:.3f}")
    print("PASS (>= 95% for every corruption)" if ok else "FAIL (a corruption below 95%)")
    return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--validate", action="store_true", help="rank true videos against corruptions")
    p.add_argument("--count", type=int, default=200, help="scenes for --validate (default 200)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", type=int, default=15, help="timed runs per benchmark (medians)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", type=int, default=32)
    p.add_argument("--fps", type=float, default=16.0)
    args = p.parse_args()
    if args.validate:
        return validate(args)
    bench(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
