"""`accelerate launch -m physmaster train-...` on 2 CPU processes (DDP over gloo): the same result as 1 process with
the global batch, resume after a kill, and processes started with different arguments refused.

The 2-process runs are real subprocesses started by `accelerate launch` (torchrun underneath; on a machine without
GPUs each process uses the CPU and gloo), so they also prove the command the README gives."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import train_data as td
from train_data import assert_same, assert_same_head
from physmaster.cli import main
from physmaster.encoder import load_encoder

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=str(ROOT), **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        e.pop(k, None)
    e.update(extra)
    return e


def launch(args: list[str], timeout=600, **extra_env) -> subprocess.CompletedProcess:
    """`accelerate launch` with 2 processes (torchrun underneath; CPU + gloo on a machine without GPUs)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(free_port()), "-m", "physmaster", *args, "--device", "cpu"]
    return subprocess.run(cmd, cwd=ROOT, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def dpo_args(model, pairs, out, batch, steps=4, *extra):
    return ["train-dpo", "--model", str(model), "--pairs", str(pairs), "--out", str(out), "--steps", str(steps),
            "--batch-size", str(batch), "--tokens", "2", "--head-width", "16", "--seed", "5", "--lr", "3e-3",
            "--beta", "50", "--latent-norm", "none", "--checkpoint-every", "2", *extra]


def sft_args(model, videos, out, batch, steps=6, *extra):
    return ["train-sft", "--model", str(model), "--videos", str(videos), "--out", str(out), "--steps", str(steps),
            "--batch-size", str(batch), "--tokens", "2", "--head-width", "16", "--lora-rank", "2", "--seed", "7",
            "--lr", "3e-3", "--latent-norm", "none", "--checkpoint-every", "2", *extra]


def head(out) -> dict[str, torch.Tensor]:
    return load_encoder(Path(out) / "encoder.safetensors").head.state_dict()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    model = td.write_model(root / "tiny-wan")
    ds = td.write_preferences(root, "prefs", groups=2)  # 6 pairs
    vs = td.write_videos(root, "videos", files=2, per_file=2)  # 4 videos
    return model, ds.path, vs.path


def test_two_processes_batch_b_equal_one_process_batch_2b(data, tmp_path, capsys):
    model, pairs, _ = data
    one = tmp_path / "one"
    assert main(dpo_args(model, pairs, one, 4, 4, "--device", "cpu")) == 0
    two = tmp_path / "two"
    proc = launch(dpo_args(model, pairs, two, 2, 4))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 processes x batch 2 x accumulation 1 = global batch 4" in proc.stdout
    assert_same_head(one, two)
    b = head(two)
    start = load_encoder(one / "encoder.safetensors")
    # it trained: the head moved away from its seeded start
    from physmaster.encoder import HeadConfig, PhysEncoder
    cfg = start.config
    fresh = PhysEncoder.new(HeadConfig(in_dim=cfg.in_dim, context_dim=cfg.context_dim, num_tokens=cfg.num_tokens,
                                       hidden_dim=cfg.hidden_dim, heads=cfg.heads), seed=5, name="physmaster")
    moved = max(float((v - fresh.head.state_dict()[k]).abs().max()) for k, v in b.items())
    assert moved > 1e-3
    stage = load_encoder(two / "encoder.safetensors").provenance["stages"][-1]
    assert stage["processes"] == 2 and stage["global_batch"] == 4 and stage["batch_size"] == 2
    assert stage["dataset"] == "prefs" and stage["dataset_size"] == 6 and stage["steps"] == 4
    # only the main process wrote: one encoder, one checkpoint, no stray temp files
    assert sorted(p.name for p in two.iterdir()) == [".physmaster_train.lock", "checkpoints", "encoder.safetensors"]
    assert [p.name for p in (two / "checkpoints").iterdir()] == ["physmaster_train_state.safetensors"]


def test_a_killed_two_process_run_resumes_to_the_same_result(data, tmp_path):
    model, _, videos = data
    ref = tmp_path / "ref"
    assert main(sft_args(model, videos, ref, 4, 6, "--device", "cpu")) == 0  # 1 process, global batch 4
    out = tmp_path / "cut"
    # process 1 kills itself (SIGKILL) after step 3: the last checkpoint is step 2's, torchrun stops process 0
    proc = launch(sft_args(model, videos, out, 2, 6), PHYSMASTER_FAULT_KILL="1:3")
    assert proc.returncode != 0
    assert not (out / "encoder.safetensors").exists() and not (out / "lora.safetensors").exists()
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["physmaster_train_state.safetensors"]
    proc = launch(sft_args(model, videos, out, 2, 6))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resuming sft from step 2" in proc.stdout
    assert_same_head(out, ref)
    from safetensors.torch import load_file
    lora, lora_ref = load_file(str(out / "lora.safetensors")), load_file(str(ref / "lora.safetensors"))
    assert_same(lora, lora_ref, atol=1e-4)  # no LoRA weight has an exactly-zero gradient here
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in lora.items())


def test_processes_started_with_different_arguments_are_refused(data, tmp_path):
    model, pairs, _ = data
    out = tmp_path / "mixed"
    port = str(free_port())
    procs = []
    for rank, steps in ((0, 2), (1, 3)):
        e = env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port)
        procs.append(subprocess.Popen([sys.executable, "-m", "physmaster", *dpo_args(model, pairs, out, 1, steps),
                                       "--device", "cpu"], cwd=ROOT, env=e, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True, start_new_session=True))
    results = []
    for p in procs:
        try:
            results.append(p.communicate(timeout=300))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            raise
    assert [p.returncode for p in procs] == [2, 2]
    for _, err in results:
        assert "different arguments" in err and "--steps 2 in process 0 but 3 in process 1" in err, err
    assert not out.exists() or not any(out.rglob("*.safetensors"))


def test_mixed_precision_bf16_runs_and_keeps_float32_weights(data, tmp_path):
    model, pairs, _ = data
    out = tmp_path / "bf16"
    proc = subprocess.run([sys.executable, "-m", "physmaster", *dpo_args(model, pairs, out, 2, 2), "--device", "cpu",
                           "--mixed-precision", "bf16", "--stage", "lora", "--lora-rank", "2"], cwd=ROOT, env=env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    stage = load_encoder(out / "encoder.safetensors").provenance["stages"][-1]
    assert stage["mixed_precision"] == "bf16" and stage["stage"] == "dpo-lora"
    from safetensors.torch import load_file
    lora = load_file(str(out / "lora.safetensors"))
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values())
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in lora.items())
