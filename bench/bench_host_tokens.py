"""Sampling with vs without PhysMaster tokens, in a real ComfyUI (tiny random Wan 2.1 I2V on CPU).

Runs the same I2V sampling with and without PhysMasterApply, interleaved (A B A B ...), each pair with a fresh
sampler seed so ComfyUI's cache never skips the work, and prints the median of each and the ratio of medians
(goal <= 1.02; the paper's own overhead is 1.13). Sampling time is the KSampler node's own time, from the
websocket events the frontend gets (executing sampler -> executing the next node). Also prints, per video, the
PhysMaster nodes' time (Encoder (new), Encode, Apply: they run once per start image) and the physical head's
forward time (default head, CLIP-H features), as fractions of one sampling run.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_host_tokens.py [--runs 7] [--steps 8] [--size 128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "host")]

import harness  # noqa: E402
import tiny_models as tm  # noqa: E402


def prompt(seed: int, steps: int, size: int, frames: int, context: int, with_tokens: bool) -> dict:
    cond = lambda s: {"class_type": "PhysMasterTest_RandomConditioning",  # noqa: E731
                      "inputs": {"seed": s, "length": context, "width": 4096, "batch": 1, "scale": 1.0}}
    p = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": tm.MODELS["wan21_i2v"][1],
                                                        "weight_dtype": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": tm.MODELS["wan21_vae"][1]}},
        "image": {"class_type": "PhysMasterTest_RandomImage", "inputs": {"seed": 7, "width": size, "height": size,
                                                                         "batch": 1}},
        "pos": cond(1), "neg": cond(2),
        "i2v": {"class_type": "WanImageToVideo", "inputs": {
            "positive": ["pos", 0], "negative": ["neg", 0], "vae": ["vae", 0], "width": size, "height": size,
            "length": frames, "batch_size": 1, "start_image": ["image", 0]}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["unet", 0], "seed": seed, "steps": steps, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ["i2v", 0], "negative": ["i2v", 1], "latent_image": ["i2v", 2],
            "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": "bench/x"}},
    }
    if with_tokens:
        p["cvo"] = {"class_type": "PhysMasterTest_RandomClipVisionOutput",
                    "inputs": {"seed": 5, "tokens": 257, "width": 1280, "batch": 1}}
        p["enc"] = {"class_type": "PhysMasterEncoderNew", "inputs": {
            "in_dim": 1280, "context_dim": 4096, "num_tokens": 16, "hidden_dim": 512, "depth": 2, "heads": 8,
            "feature": "penultimate", "init_seed": 0}}
        p["tok"] = {"class_type": "PhysMasterEncode", "inputs": {"encoder": ["enc", 0], "clip_vision_output": ["cvo", 0]}}
        p["apply"] = {"class_type": "PhysMasterApply", "inputs": {
            "positive": ["i2v", 0], "negative": ["i2v", 1], "physical_tokens": ["tok", 0], "strength": 1.0,
            "apply_to": "positive and negative"}}
        p["sampler"]["inputs"]["positive"], p["sampler"]["inputs"]["negative"] = ["apply", 0], ["apply", 1]
    return p


def head_forward_seconds(repeats: int = 20) -> float:
    import torch

    from physmaster.encoder import HeadConfig, PhysHead

    head = PhysHead.create(HeadConfig(in_dim=1280), seed=0).eval()
    x = torch.randn(1, 257, 1280)
    with torch.no_grad():
        head(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            head(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7, help="pairs of runs (interleaved)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--frames", type=int, default=9)
    ap.add_argument("--context", type=int, default=512, help="text tokens (umT5 pads Wan prompts to 512)")
    args = ap.parse_args()
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        print("set COMFYUI_PATH to a ComfyUI checkout", file=sys.stderr)
        return 2
    models = tm.model_folders(tm.ensure_tiny_models(["wan21_i2v", "wan21_vae"], comfyui_path=comfy))
    base, tokens, physmaster_nodes = [], [], []
    with harness.ComfyHost(comfy, models=models) as host, host.listen() as ws:
        def run(seed: int, with_tokens: bool) -> dict[str, float]:
            host.wait(host.queue(prompt(seed, args.steps, args.size, args.frames, args.context, with_tokens)), 900)
            done = ws.wait_for("executing", timeout=60, where=lambda d: d.get("node") is None)
            events = [e for e in ws.seen if e.get("type") == "executing"]
            ws.seen.clear()
            starts = [(e["data"].get("node"), e["received"]) for e in events]
            times = {node: nxt[1] - t for (node, t), nxt in zip(starts, starts[1:])}
            return times if done is not None else {}

        for warm in (False, True):  # load models, first-run costs
            run(10_000, warm)
        for i in range(args.runs):
            order = (False, True) if i % 2 == 0 else (True, False)
            for with_tokens in order:
                t = run(i, with_tokens)
                (tokens if with_tokens else base).append(t["sampler"])
                if with_tokens:
                    physmaster_nodes.append(sum(t.get(n, 0.0) for n in ("enc", "tok", "apply")))
    mb, mt = statistics.median(base), statistics.median(tokens)
    pair_ratios = [t / b for b, t in zip(base, tokens)]
    head = head_forward_seconds()
    print(f"tiny Wan 2.1 I2V, {args.size}x{args.size}x{args.frames}, {args.steps} steps, cfg on, "
          f"{args.context} text tokens + 16 physical tokens, {args.runs} interleaved pairs")
    print(f"without tokens: median {mb:.3f} s (min {min(base):.3f}, max {max(base):.3f})")
    print(f"with tokens:    median {mt:.3f} s (min {min(tokens):.3f}, max {max(tokens):.3f})")
    print(f"ratio with/without (medians): {mt / mb:.3f}   pairwise median: {statistics.median(pair_ratios):.3f}"
          f"   goal <= 1.02")
    mp = statistics.median(physmaster_nodes)
    print(f"PhysMaster nodes per start image (Encoder new + Encode + Apply, uncached): {mp * 1000:.1f} ms = "
          f"{mp / mb:.3f} of one sampling run")
    print(f"physical head forward (default head, 257x1280 CLIP-H features): {head * 1000:.2f} ms = "
          f"{head / mb:.4f} of one sampling run")
    return 0


if __name__ == "__main__":
    sys.exit(main())
