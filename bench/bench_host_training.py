"""Training in a real ComfyUI (tiny random Wan 2.1 I2V on CPU): one Flow-DPO step of PhysMasterTrainDPO over one
SFT step of PhysMasterTrainSFT on the same model and resolution (goal <= 2.5), and the server's peak memory with
and without gradient checkpointing.

Step times come from the trainer's own clock (the stage loop only, not model loading), several interleaved runs,
medians. Peak memory is the ComfyUI server process's high-water mark (VmHWM) after one training run, each setting
in a fresh server.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_host_training.py [--runs 3] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "host")]

import harness  # noqa: E402
import tiny_models as tm  # noqa: E402
from test_physmaster_nodes import with_physmaster  # noqa: E402
from test_host_smoke import FAMILIES  # noqa: E402
from test_picker_host import picker_prompt, post_pick  # noqa: E402


def make_pairs(host, dataset: str) -> None:
    with host.listen() as ws:
        prompt_id = host.queue(picker_prompt(dataset))
        event = ws.wait_for("physmaster.pick", timeout=600)
        post_pick(host, {"request_id": event["request_id"], "choice": {"ranking": [2, 0, 1]}})
        host.wait(prompt_id, timeout=600)


def train_prompt(kind: str, dataset: str, steps: int, seed: int, checkpointing: bool) -> dict:
    build, _ = FAMILIES["wan21_i2v"]
    common = {"steps": steps, "learning_rate": 1e-3, "lora_rank": 4, "batch_size": 1, "training_seed": seed,
              "gradient_checkpointing": checkpointing}
    if kind == "sft":
        p = with_physmaster(build("bench/sft"), 1.0)
        p["i2v"]["inputs"]["batch_size"] = 3
        p["train"] = {"class_type": "PhysMasterTrainSFT", "inputs": {
            "model": ["unet", 0], "encoder": ["enc", 0], "latents": ["sampler", 0], "positive": ["apply", 0],
            "train": "head and lora", **common}}
        del p["save"]
    else:
        p = {"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": tm.MODELS["wan21_i2v"][1],
                                                             "weight_dtype": "default"}},
             "prefs": {"class_type": "PhysMasterPreferenceDataset", "inputs": {"dataset_name": dataset,
                                                                                "sources": "human and judge"}},
             "enc": with_physmaster(build("x"), 1.0)["enc"],
             "train": {"class_type": "PhysMasterTrainDPO", "inputs": {
                 "model": ["unet", 0], "encoder": ["enc", 0], "preferences": ["prefs", 0],
                 "stage": "head (Stage III)", "beta": 500.0, **common}}}
    p["summary"] = {"class_type": "PreviewAny", "inputs": {"source": ["train", 3]}}
    return p


def step_seconds(entry: dict) -> float:
    (run,) = json.loads(entry["outputs"]["train"]["physmaster_train"][0])
    return run["seconds"] / len(run["history"])


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        print("set COMFYUI_PATH to a ComfyUI checkout", file=sys.stderr)
        return 2
    models = tm.model_folders(tm.ensure_tiny_models(["wan21_i2v", "wan21_vae"], comfyui_path=comfy))
    with harness.ComfyHost(comfy, models=models) as host:
        make_pairs(host, "bench_pairs")
        dpo, sft = [], []
        for i in range(args.runs):
            for kind in (("dpo", "sft") if i % 2 == 0 else ("sft", "dpo")):
                entry = host.run(train_prompt(kind, "bench_pairs", args.steps, i, True), timeout=1800)
                (dpo if kind == "dpo" else sft).append(step_seconds(entry))
        pairs_dir = host.output_dir / "physmaster" / "preferences" / "bench_pairs"
        peaks = {}
        for checkpointing in (False, True):
            with harness.ComfyHost(comfy, models=models) as fresh:
                import shutil
                shutil.copytree(pairs_dir, fresh.output_dir / "physmaster" / "preferences" / "bench_pairs")
                fresh.run(train_prompt("dpo", "bench_pairs", args.steps, 0, checkpointing), timeout=1800)
                peaks[checkpointing] = peak_rss_mb(fresh.proc.pid)
    md, ms = statistics.median(dpo), statistics.median(sft)
    print(f"tiny Wan 2.1 I2V 64x64x5, {args.steps} steps per run, {args.runs} interleaved runs, CPU")
    print(f"Stage III DPO step (one pair): median {md * 1000:.1f} ms  {[round(x * 1000, 1) for x in dpo]}")
    print(f"Stage I SFT step (one video):  median {ms * 1000:.1f} ms  {[round(x * 1000, 1) for x in sft]}")
    print(f"ratio DPO step / SFT step: {md / ms:.2f}   goal <= 2.5")
    print(f"server peak memory (VmHWM) after one DPO run: {peaks[False]:.0f} MB without gradient checkpointing, "
          f"{peaks[True]:.0f} MB with")
    return 0


if __name__ == "__main__":
    sys.exit(main())
