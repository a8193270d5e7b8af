"""Memory of training in a real ComfyUI over inference, on one mid-size random Wan 2.1 I2V-class DiT (width 1536, 8
blocks, 12 heads, ffn 8960: ~1.6 GiB of fp32 weights), latent [16, 5, 16, 16] (a 128x128, 17-frame video), one
pair, on CPU: KSampler (inference), PhysMasterTrainDPO Stage III, Stage II, PhysMasterTrainSFT.

Each run gets a fresh server (so every peak is its own). Columns:
- peak RSS: the server's VmHWM after the run (loading included) and its ratio to inference's;
- step-phase peak: the same prompt run again with another seed (the model and everything upstream cached, so only
  the sampler / train node runs), VmHWM reset just before; absolute RSS, model included;
- step time over one sampling step (KSampler: (t(8 steps) − t(2 steps)) / 6 on the warm server; training: the
  trainer's own clock, seconds per step);
- the pre-flight's estimate of what a training step adds, against the step phase's measured increase.
The servers run with MALLOC_MMAP_THRESHOLD_=65536 (freed activations go back to the OS, so RSS follows what is
live). Goals (issue 10): Stage III <= 1.25x, Stage II <= 1.5x, Stage III's step-phase peak <= 1.2x sampling's.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_host_memory.py [--steps 3] [--checkpointing 1]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "host")]

import harness  # noqa: E402
import tiny_models as tm  # noqa: E402
from test_host_smoke import FAMILIES  # noqa: E402
from test_physmaster_nodes import with_physmaster  # noqa: E402
from test_picker_host import picker_prompt, post_pick  # noqa: E402

SIZE, LENGTH = 128, 17  # latent [16, 5, 16, 16]
MODEL = "wan21_i2v_bench"
ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def sampling_prompt(steps: int, seed: int) -> dict:
    build, _ = FAMILIES["wan21_i2v"]
    p = with_physmaster(build("bench/infer"), 1.0)
    p["unet"]["inputs"]["unet_name"] = tm.MODELS[MODEL][1]
    p["image"]["inputs"].update({"width": SIZE, "height": SIZE})
    p["i2v"]["inputs"].update({"width": SIZE, "height": SIZE, "length": LENGTH})
    p["sampler"]["inputs"].update({"steps": steps, "seed": seed})
    return p


def train_prompt(kind: str, steps: int, seed: int, checkpointing: bool, split: bool) -> dict:
    common = {"steps": steps, "learning_rate": 1e-3, "lora_rank": 8, "batch_size": 1, "training_seed": seed,
              "gradient_checkpointing": checkpointing, "split_passes": split}
    if kind == "sft":
        p = sampling_prompt(2, 0)
        p["train"] = {"class_type": "PhysMasterTrainSFT", "inputs": {
            "model": ["unet", 0], "encoder": ["enc", 0], "latents": ["i2v", 2], "positive": ["apply", 0],
            "train": "head and lora", **common}}
        del p["sampler"], p["save"]
    else:
        build, _ = FAMILIES["wan21_i2v"]
        p = {"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": tm.MODELS[MODEL][1],
                                                             "weight_dtype": "default"}},
             "prefs": {"class_type": "PhysMasterPreferenceDataset", "inputs": {"dataset_name": "bench_mem",
                                                                                "sources": "human and judge"}},
             "enc": with_physmaster(build("x"), 1.0)["enc"],
             "train": {"class_type": "PhysMasterTrainDPO", "inputs": {
                 "model": ["unet", 0], "encoder": ["enc", 0], "preferences": ["prefs", 0],
                 "stage": "head (Stage III)" if kind == "stage3" else "dit lora (Stage II)", "beta": 500.0,
                 **common}}}
    p["summary"] = {"class_type": "PreviewAny", "inputs": {"source": ["train", 3]}}
    return p


def make_pair(comfy: str, models: dict) -> Path:
    """One pair (two of three candidates ranked) at the bench's latent size, sampled by the tiny Wan."""
    with harness.ComfyHost(comfy, models=models) as host:
        p = picker_prompt("bench_mem", batch=2, size=SIZE)
        p["i2v"]["inputs"]["length"] = LENGTH
        with host.listen() as ws:
            prompt_id = host.queue(p)
            event = ws.wait_for("physmaster.pick", timeout=900)
            post_pick(host, {"request_id": event["request_id"], "choice": {"ranking": [1, 0]}})
            host.wait(prompt_id, timeout=900)
        keep = Path(os.environ.get("TMPDIR", "/tmp")) / "physmaster_bench_mem_pairs"
        if keep.exists():
            shutil.rmtree(keep)
        shutil.copytree(host.output_dir / "physmaster" / "preferences" / "bench_mem", keep)
    return keep


def measure(comfy: str, models: dict, kind: str, pairs: Path, args) -> dict:
    with harness.ComfyHost(comfy, models=models, env=ENV) as host:
        shutil.copytree(pairs, host.output_dir / "physmaster" / "preferences" / "bench_mem")
        pid = host.proc.pid
        if kind == "infer":
            host.run(sampling_prompt(2, 1), timeout=1800)
            peak = status_kib(pid, "VmHWM") * 1024
            reset_peak(pid)
            t0 = time.monotonic()
            host.run(sampling_prompt(8, 2), timeout=1800)
            t8 = time.monotonic() - t0
            step_peak = status_kib(pid, "VmHWM") * 1024
            t0 = time.monotonic()
            host.run(sampling_prompt(2, 3), timeout=1800)
            t2 = time.monotonic() - t0
            return {"peak": peak, "step_peak": step_peak, "step_seconds": (t8 - t2) / 6}
        host.run(train_prompt(kind, args.steps, 0, args.checkpointing, args.split), timeout=3600)
        peak = status_kib(pid, "VmHWM") * 1024
        reset_peak(pid)
        base = status_kib(pid, "VmRSS") * 1024
        entry = host.run(train_prompt(kind, args.steps, 1, args.checkpointing, args.split), timeout=3600)
        step_peak = status_kib(pid, "VmHWM") * 1024
        (run,) = json.loads(entry["outputs"]["train"]["physmaster_train"][0])
        return {"peak": peak, "step_peak": step_peak, "step_seconds": run["seconds"] / len(run["history"]),
                "estimate": run["memory"].get("without_weights"), "added": step_peak - base,
                "weights": run["weights"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--checkpointing", type=int, default=1)
    ap.add_argument("--split", type=int, default=0, help="split_passes on the train nodes")
    args = ap.parse_args()
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        print("set COMFYUI_PATH to a ComfyUI checkout", file=sys.stderr)
        return 2
    files = tm.ensure_tiny_models(["wan21_i2v", "wan21_vae", MODEL], comfyui_path=comfy)
    models = tm.model_folders(files)
    pairs = make_pair(comfy, models)
    rows = {}
    for kind in ("infer", "stage3", "stage2", "sft"):
        rows[kind] = measure(comfy, models, kind, pairs, args)
        print(kind, json.dumps({k: v for k, v in rows[kind].items()}), flush=True)
    gib = 2 ** 30
    inf = rows["infer"]
    print(f"\nWan 2.1 I2V-class DiT 1536 wide, 8 blocks ({files[MODEL].stat().st_size / gib:.2f} GiB fp32), latent "
          f"[16, 5, 16, 16], one pair, CPU, {args.steps} steps, gradient_checkpointing={bool(args.checkpointing)}, "
          f"split_passes={bool(args.split)}")
    print(f"{'run':<22} {'peak RSS':>9} {'÷ infer':>8} {'step-phase':>11} {'÷ infer':>8} {'step ÷ sampling':>16} "
          f"{'est. added':>11} {'measured':>9}")
    names = {"infer": "KSampler (inference)", "stage3": "TrainDPO, Stage III", "stage2": "TrainDPO, Stage II",
             "sft": "TrainSFT"}
    for kind, r in rows.items():
        est = f"{r['estimate'] / gib:.2f}" if r.get("estimate") else "-"
        added = f"{r['added'] / gib:.2f}" if "added" in r else "-"
        print(f"{names[kind]:<22} {r['peak'] / gib:>9.2f} {r['peak'] / inf['peak']:>8.2f} {r['step_peak'] / gib:>11.2f} "
              f"{r['step_peak'] / inf['step_peak']:>8.2f} {r['step_seconds'] / inf['step_seconds']:>16.2f} "
              f"{est:>11} {added:>9}")
    print(f"goals: Stage III peak <= 1.25x ({rows['stage3']['peak'] / inf['peak']:.2f}), Stage II <= 1.5x "
          f"({rows['stage2']['peak'] / inf['peak']:.2f}), Stage III step-phase <= 1.2x "
          f"({rows['stage3']['step_peak'] / inf['step_peak']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
