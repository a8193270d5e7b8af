"""Training in a real ComfyUI on its own loaded MODEL: Flow-DPO on pairs marked in the graph, Stage I SFT, the
LoRA through core SaveLoRA / LoraLoaderModelOnly, pre-flight errors, and Cancel mid-training."""

from __future__ import annotations

import json
import time

import pytest
import torch

import harness
import tiny_models as tm
from test_host_smoke import FAMILIES, _run_and_load
from test_physmaster_nodes import TOKENS, _encoder_nodes, with_physmaster, with_tiny_models
from test_picker_host import judge_prompt, pairs_on_disk, picker_prompt, post_pick

pytestmark = [pytest.mark.host, pytest.mark.slow]

DATASET = "train_pairs"


@pytest.fixture(scope="module")
def marked_dataset(host):
    """Two groups of 3 tiny-Wan candidates, ranked in the picker over HTTP: 6 human pairs."""
    if len(pairs_on_disk(host, DATASET)) >= 6:
        return DATASET
    with host.listen() as ws:
        for seed, ranking in ((42, [2, 0, 1]), (43, [1, 2, 0])):
            p = picker_prompt(DATASET)
            p["sampler"]["inputs"]["seed"] = seed
            prompt_id = host.queue(p)
            event = ws.wait_for("physmaster.pick", timeout=300)
            assert post_pick(host, {"request_id": event["request_id"], "choice": {"ranking": ranking}})[0] == 200
            host.wait(prompt_id, timeout=300)
    assert len(pairs_on_disk(host, DATASET)) == 6
    return DATASET


def dpo_prompt(dataset: str, stage: str, steps: int, lr: float = 3e-3, unet: str = "wan21_i2v",
               context_dim: int = 4096) -> dict:
    p = {"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": tm.MODELS[unet][1], "weight_dtype": "default"}},
         "prefs": {"class_type": "PhysMasterPreferenceDataset", "inputs": {"dataset_name": dataset,
                                                                            "sources": "human and judge"}},
         **{k: v for k, v in _encoder_nodes(context_dim=context_dim).items() if k == "enc"},
         "train": {"class_type": "PhysMasterTrainDPO", "inputs": {
             "model": ["unet", 0], "encoder": ["enc", 0], "preferences": ["prefs", 0], "stage": stage,
             "steps": steps, "learning_rate": lr, "lora_rank": 4, "batch_size": 2, "training_seed": 0,
             "gradient_checkpointing": True, "beta": 500.0}},
         "save_enc": {"class_type": "PhysMasterEncoderSave", "inputs": {"encoder": ["train", 0],
                                                                        "filename_prefix": f"hosttest/{dataset}"}},
         "loss_graph": {"class_type": "LossGraphNode", "inputs": {"loss": ["train", 2],
                                                                  "filename_prefix": "hosttest/loss"}}}
    return p


def _history(entry) -> list[dict]:
    return json.loads(entry["outputs"]["train"]["physmaster_train"][0])


def _mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)



def assert_core_lora_loader_applies(host, lora_name: str, tag: str) -> torch.Tensor:
    """Core LoraLoaderModelOnly loads `lora_name` on the tiny Wan with no 'lora key not loaded', and the sample
    changes. Returns the sample without the LoRA."""
    build, _ = FAMILIES["wan21_i2v"]
    base, _ = _run_and_load(host, build(f"train/{tag}_base"))
    with_lora = build(f"train/{tag}_lora")
    with_lora["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["unet", 0], "lora_name": lora_name, "strength_model": 1.0}}
    with_lora["sampler"]["inputs"]["model"] = ["lora", 0]
    log_start = len(host.log())
    latent, _ = _run_and_load(host, with_lora)
    assert "lora key not loaded" not in host.log()[log_start:]
    assert latent.shape == base.shape and not torch.equal(latent, base)
    return base


def test_dpo_on_marked_pairs_learns_the_preferences(host, marked_dataset):
    t0 = time.monotonic()
    entry = host.run(dpo_prompt(marked_dataset, "head (Stage III)", steps=40), timeout=900)
    seconds = time.monotonic() - t0
    (run,) = _history(entry)
    h = run["history"]
    assert run["stage"] == "dpo-head" and len(h) == 40 and run["stopped"] is None
    first, last = h[:5], h[-5:]
    print(f"Stage III on {marked_dataset}: {seconds:.1f} s; loss {_mean(first, 'loss'):.4f} -> "
          f"{_mean(last, 'loss'):.4f}, accuracy {_mean(first, 'accuracy'):.2f} -> {_mean(last, 'accuracy'):.2f}")
    assert abs(h[0]["loss"] - 0.6931) < 0.01  # policy == reference at step 1: log 2
    assert _mean(last, "loss") < _mean(first, "loss") - 0.05
    assert _mean(last, "accuracy") > _mean(first, "accuracy")
    assert _mean(last, "accuracy") >= 0.75
    summary = entry["outputs"]["train"]["text"][0]
    assert "6 pairs" in summary and "dpo-head: 40 steps" in summary and "implicit accuracy" in summary
    saved = json.loads(entry["outputs"]["save_enc"]["text"][0])
    assert saved["stages"] == ["dpo-head"]
    from physmaster.encoder import load_encoder
    enc = load_encoder(host.base_dir / "models" / "physmaster" / saved["saved"])
    assert enc.provenance["stages"][0]["dataset"] == marked_dataset and enc.provenance["stages"][0]["steps"] == 40
    assert entry["outputs"]["loss_graph"]["images"], "core LossGraph drew no plot"


def test_lora_stage_saves_a_lora_that_core_loads(host, marked_dataset, tmp_path):
    p = dpo_prompt(marked_dataset, "dit lora (Stage II)", steps=6)
    p["save_lora"] = {"class_type": "SaveLoRA", "inputs": {"lora": ["train", 1], "prefix": "loras/hosttest_dpo"}}
    entry = host.run(p, timeout=900)
    (run,) = _history(entry)
    assert run["stage"] == "dpo-lora" and len(run["history"]) == 6
    lora_files = sorted((host.output_dir / "loras").glob("hosttest_dpo*.safetensors"))
    assert lora_files, "SaveLoRA wrote nothing"
    tensors = harness.load_tensors(lora_files[-1])
    assert any(k.endswith("lora_up.weight") for k in tensors) and any(k.endswith("lora_down.weight") for k in tensors)
    assert all(torch.isfinite(v).all() for v in tensors.values())
    host.add_model_file("loras", lora_files[-1])
    build, _ = FAMILIES["wan21_i2v"]
    base, _ = _run_and_load(host, build("train/base"))
    with_lora = build("train/lora")
    with_lora["lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["unet", 0], "lora_name": lora_files[-1].name, "strength_model": 1.0}}
    with_lora["sampler"]["inputs"]["model"] = ["lora", 0]
    entry = host.run(with_lora, timeout=600)
    assert "lora key not loaded" not in host.log_tail(200)
    lora_latent = harness.load_latent(next(p for p in host.output_files(entry) if p.suffix == ".latent"))
    assert lora_latent.shape == base.shape and not torch.equal(lora_latent, base)


def test_sft_on_graph_latents(host):
    build, _ = FAMILIES["wan21_i2v"]
    p = with_physmaster(build("train/sft_src"), 1.0)
    p["i2v"]["inputs"]["batch_size"] = 2
    p["train"] = {"class_type": "PhysMasterTrainSFT", "inputs": {
        "model": ["unet", 0], "encoder": ["enc", 0], "latents": ["sampler", 0], "positive": ["apply", 0],
        "train": "head and lora", "steps": 20, "learning_rate": 2e-3, "lora_rank": 4, "batch_size": 2, "training_seed": 1,
        "gradient_checkpointing": False, "token_dropout": 0.25}}
    p["save_enc"] = {"class_type": "PhysMasterEncoderSave", "inputs": {"encoder": ["train", 0],
                                                                       "filename_prefix": "hosttest/sft"}}
    entry = host.run(p, timeout=900)
    (run,) = _history(entry)
    h = run["history"]
    assert run["stage"] == "sft" and len(h) == 20 and all(r["loss"] == r["loss"] for r in h)
    assert _mean(h[-5:], "loss") < _mean(h[:5], "loss")
    saved = json.loads(entry["outputs"]["save_enc"]["text"][0])
    assert saved["stages"] == ["sft"]
    from physmaster.encoder import load_encoder
    stage = load_encoder(host.base_dir / "models" / "physmaster" / saved["saved"]).provenance["stages"][0]
    assert stage["token_dropout"] == 0.25  # the widget reached the trainer (condition dropout, for token CFG)


def test_preflight_names_the_mismatch(host, marked_dataset):
    with pytest.raises(harness.ExecutionFailed) as err:
        host.run(dpo_prompt(marked_dataset, "head (Stage III)", steps=2, context_dim=2048), timeout=300)
    msg = err.value.exception_message
    assert err.value.node_id == "train" and "2048" in msg and "4096" in msg and "context_dim" in msg
    with pytest.raises(harness.ExecutionFailed) as err:
        host.run(dpo_prompt(marked_dataset, "head (Stage III)", steps=2, unet="wan22_ti2v"), timeout=300)
    msg = err.value.exception_message
    assert "16 channels" in msg and "48" in msg and "another model" in msg


def test_empty_dataset_is_a_clear_error(host):
    # an empty dataset folder (opening with create=True makes none: a folder is made by the first write)
    (host.output_dir / "physmaster" / "preferences" / "empty_one").mkdir(parents=True, exist_ok=True)
    with pytest.raises(harness.ExecutionFailed) as err:
        host.run(dpo_prompt("empty_one", "head (Stage III)", steps=2), timeout=300)
    assert err.value.node_id == "prefs" and "no usable" in err.value.exception_message


def _new_files(folder, before):
    return sorted(set(folder.rglob("*.safetensors")) - before) if folder.exists() else []


def _cancel_after(host, prompt, progress_value: int):
    """Queue, wait until the train node's progress bar reaches `progress_value`, Cancel; the run must fail."""
    with host.listen() as ws:
        prompt_id = host.queue(prompt)
        ws.wait_for("progress", timeout=600,
                    where=lambda d: d.get("node") == "train" and d.get("value", 0) >= progress_value)
        host.interrupt()
        with pytest.raises(harness.HostError):
            host.wait(prompt_id, timeout=300)


def _interrupted_folders(host):
    # the first registered folders: ComfyUI's own models/physmaster and models/loras
    return host.base_dir / "models" / "physmaster" / "interrupted", \
        host.base_dir / "models" / "loras" / "physmaster_interrupted"


def _lora_provenance(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["physmaster.provenance"])


def test_cancel_mid_training_keeps_a_usable_encoder(host, marked_dataset):
    enc_dir, lora_dir = _interrupted_folders(host)
    before = set(enc_dir.rglob("*.safetensors")) if enc_dir.exists() else set()
    lora_before = set(lora_dir.rglob("*.safetensors")) if lora_dir.exists() else set()
    # the training node's progress bar reaches the browser: wait for a few completed steps, then Cancel
    _cancel_after(host, dpo_prompt(marked_dataset, "head (Stage III)", steps=5000), 3)
    new = _new_files(enc_dir, before)
    assert len(new) == 1, f"no interrupted encoder written in {enc_dir}"
    assert _new_files(lora_dir, lora_before) == []  # Stage III trains no LoRA: none written
    from physmaster.encoder import load_encoder
    enc = load_encoder(new[0])
    stage = enc.provenance["stages"][-1]
    assert stage["stage"] == "dpo-head" and stage["trains"] == "head" and stage["interrupted"]
    assert 3 <= stage["steps"] < 5000 and stage["steps_planned"] == 5000
    assert enc.config.num_tokens == TOKENS


def test_cancel_in_stage_two_keeps_the_lora_loadable_and_the_provenance_exact(host, marked_dataset):
    """Issue 9 item 1: Cancel in Stage II wrote the unchanged encoder claiming 'dpo-lora, 26 steps' and no LoRA."""
    enc_dir, lora_dir = _interrupted_folders(host)
    before, lora_before = (set(d.rglob("*.safetensors")) if d.exists() else set() for d in (enc_dir, lora_dir))
    _cancel_after(host, dpo_prompt(marked_dataset, "dit lora (Stage II)", steps=5000), 3)
    (lora_file,) = _new_files(lora_dir, lora_before)
    (enc_file,) = _new_files(enc_dir, before)
    lora_name = lora_file.relative_to(host.base_dir / "models" / "loras").as_posix()
    enc_name = enc_file.relative_to(host.base_dir / "models" / "physmaster").as_posix()
    prov = _lora_provenance(lora_file)
    (entry,) = prov["stages"]
    steps = entry["steps"]
    assert entry["stage"] == "dpo-lora" and entry["interrupted"] and 3 <= steps < 5000
    assert prov["encoder_file"] == enc_name and prov["kind"] == "dit lora"
    from physmaster.encoder import load_encoder
    enc = load_encoder(enc_file)
    last = enc.provenance["stages"][-1]
    assert last == dict(last, stage="dpo-lora", trains="dit lora", steps=steps, interrupted=True, lora_file=lora_name)
    # the file holds exactly `steps` steps: the same as an uninterrupted run of that many steps (same seed)
    p = dpo_prompt(marked_dataset, "dit lora (Stage II)", steps=steps)
    p["save_lora"] = {"class_type": "SaveLoRA", "inputs": {"lora": ["train", 1], "prefix": "loras/hosttest_k_steps"}}
    host.run(p, timeout=900)
    reference = harness.load_tensors(sorted((host.output_dir / "loras").glob("hosttest_k_steps*.safetensors"))[-1])
    kept = harness.load_tensors(lora_file)
    assert set(kept) == set(reference) and any(k.endswith("lora_up.weight") for k in kept)
    assert all(torch.equal(kept[k], reference[k]) for k in kept), "the interrupted LoRA is not the k-step LoRA"
    # and the person's loaders take both: core LoraLoaderModelOnly lists and applies the LoRA ...
    assert_core_lora_loader_applies(host, lora_name, "cut")
    # ... and PhysMasterEncoderLoader the encoder
    p = {"enc": {"class_type": "PhysMasterEncoderLoader", "inputs": {"encoder_name": enc_name}},
         "save": {"class_type": "PhysMasterEncoderSave", "inputs": {"encoder": ["enc", 0],
                                                                    "filename_prefix": "hosttest/cut_copy"}}}
    saved = json.loads(host.run(p, timeout=300)["outputs"]["save"]["text"][0])
    assert saved["stages"][-1] == "dpo-lora"


def test_cancel_in_stage_three_of_lora_then_head_keeps_the_finished_lora(host, marked_dataset):
    enc_dir, lora_dir = _interrupted_folders(host)
    before, lora_before = (set(d.rglob("*.safetensors")) if d.exists() else set() for d in (enc_dir, lora_dir))
    steps = 12
    _cancel_after(host, dpo_prompt(marked_dataset, "lora then head (II + III)", steps=steps), steps + 2)
    (lora_file,) = _new_files(lora_dir, lora_before)
    (enc_file,) = _new_files(enc_dir, before)
    lora_name = lora_file.relative_to(host.base_dir / "models" / "loras").as_posix()
    (lora_entry,) = _lora_provenance(lora_file)["stages"]
    assert lora_entry["stage"] == "dpo-lora" and lora_entry["steps"] == steps and not lora_entry["interrupted"]
    tensors = harness.load_tensors(lora_file)
    assert all(torch.isfinite(v).all() for v in tensors.values())
    assert any(k.endswith("lora_up.weight") and v.abs().max() > 0 for k, v in tensors.items())
    from physmaster.encoder import load_encoder
    stages = load_encoder(enc_file).provenance["stages"]
    two, three = stages[-2], stages[-1]
    assert (two["stage"], two["steps"], two["interrupted"], two["lora_file"]) == ("dpo-lora", steps, False, lora_name)
    assert three["stage"] == "dpo-head" and three["trains"] == "head" and three["interrupted"]
    assert 1 <= three["steps"] < steps


def _copy_dataset(host, src: str, dst: str):
    import shutil

    root = host.output_dir / "physmaster" / "preferences"
    if (root / dst).exists():
        shutil.rmtree(root / dst)
    shutil.copytree(root / src, root / dst)
    from physmaster.preferences import PreferenceDataset
    return PreferenceDataset.open(root, dst)


def _rewrite_group(ds, group, **changes):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = ds.group_path(group)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        data = {k: f.get_tensor(k) for k in f.keys()}
    for key, fn in changes.items():
        data[key] = fn(data[key])
    save_file(data, str(path), metadata=meta)


def test_nonfinite_features_skip_and_name_the_group_and_training_goes_on(host, marked_dataset):
    """Issue 9 item 10: NaN features in one group stopped the whole run without naming it."""
    ds = _copy_dataset(host, marked_dataset, "poisoned_pairs")
    bad = ds.group_ids()[0]
    _rewrite_group(ds, bad, features=lambda t: t.index_fill(1, torch.tensor([0]), float("nan")))
    entry = host.run(dpo_prompt("poisoned_pairs", "head (Stage III)", steps=3), timeout=900)
    summary = entry["outputs"]["train"]["text"][0]
    assert summary.startswith(f"6 pairs, 3 skipped: non-finite features in group {bad[:8]} (3 pairs)"), summary
    (run,) = _history(entry)
    assert run["stopped"] is None and len(run["history"]) == 3
    assert all(r["loss"] == r["loss"] for r in run["history"])


def test_tampered_groups_are_named_by_the_dataset_node_and_skipped(host, marked_dataset):
    """Issue 9 item 11: a group with fewer latents than its metadata passed the Dataset node, then training died
    with 'index 2 is out of bounds'."""
    ds = _copy_dataset(host, marked_dataset, "tampered_pairs")
    bad = ds.group_ids()[1]
    _rewrite_group(ds, bad, latents=lambda t: t[:2].clone())
    p = dpo_prompt("tampered_pairs", "head (Stage III)", steps=2)
    p["show"] = {"class_type": "PreviewAny", "inputs": {"source": ["prefs", 1]}}
    entry = host.run(p, timeout=900)
    stats = entry["outputs"]["prefs"]["text"][0]
    assert (f"1 group unusable for training: group file groups/{bad}.safetensors in dataset 'tampered_pairs' holds 2 "
            "candidate latents but its metadata says 3 candidates: its 3 pairs skipped; 3 pairs left to train on") \
        in stats, stats
    summary = entry["outputs"]["train"]["text"][0]
    assert summary.startswith("3 pairs") and "dpo-head: 2 steps" in summary
    # another latent shape in a group is named the same way
    _rewrite_group(ds, bad, latents=lambda t: torch.zeros(3, t.shape[1], t.shape[2], t.shape[3], t.shape[4] + 2))
    entry = host.run(p, timeout=900)
    stats = entry["outputs"]["prefs"]["text"][0]
    assert f"group file groups/{bad}.safetensors in dataset 'tampered_pairs': its latents are shaped" in stats, stats
    assert "its 3 pairs skipped; 3 pairs left to train on" in stats, stats


def test_a_run_stopped_at_step_one_still_plots_saves_and_says_why(host, marked_dataset, tmp_path):
    """Issue 9 item 9: a stop at step 1 gave an empty LOSS_MAP, core LossGraph failed and nothing was saved."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tm.model_path("wan21_i2v")))
    weights["head.head.weight"] = torch.full_like(weights["head.head.weight"], float("nan"))
    broken = tmp_path / "physmaster_test_wan21_i2v_nan.safetensors"
    save_file(weights, str(broken))
    host.add_model_file("diffusion_models", broken)
    p = dpo_prompt(marked_dataset, "lora then head (II + III)", steps=5)
    p["unet"]["inputs"]["unet_name"] = broken.name
    p["save_lora"] = {"class_type": "SaveLoRA", "inputs": {"lora": ["train", 1], "prefix": "loras/hosttest_stopped"}}
    entry = host.run(p, timeout=900)
    summary = entry["outputs"]["train"]["text"][0]
    assert "TRAINING STOPPED EARLY in dpo-lora: stopped at step 1" in summary and "Not run: dpo-head" in summary
    assert "not finite" in summary
    (run,) = _history(entry)
    assert run["stage"] == "dpo-lora" and run["history"] == [] and "step 1" in run["stopped"]
    assert entry["outputs"]["loss_graph"]["images"], "core LossGraph drew no plot"
    saved = json.loads(entry["outputs"]["save_enc"]["text"][0])
    from physmaster.encoder import load_encoder
    stage = load_encoder(host.base_dir / "models" / "physmaster" / saved["saved"]).provenance["stages"][-1]
    assert stage["stage"] == "dpo-lora" and stage["steps"] == 0 and "step 1" in stage["stopped"]
    assert sorted((host.output_dir / "loras").glob("hosttest_stopped*.safetensors"))


def test_shipped_marking_and_training_workflows_run(host, tmp_path):
    from workflow_api import ui_to_api

    root = harness.Path(__file__).resolve().parents[2] / "workflows"
    mark = with_tiny_models(ui_to_api(json.loads((root / "physmaster_mark_preferences.json").read_text()),
                                      host.object_info(refresh=True)), host, tmp_path, "physmaster_start_pref.png")
    picker = next(k for k, v in mark.items() if v["class_type"] == "PhysMasterPreferencePicker")
    mark[picker]["inputs"]["dataset_name"] = "workflow_pairs"
    with host.listen() as ws:
        prompt_id = host.queue(mark)
        event = ws.wait_for("physmaster.pick", timeout=600)
        assert len(event["candidates"]) == 4  # the workflow samples 4 candidates
        assert post_pick(host, {"request_id": event["request_id"], "choice": {"best": 3, "worst": 1}})[0] == 200
        entry = host.wait(prompt_id, timeout=600)
    assert [(p["winner"], p["loser"]) for p in pairs_on_disk(host, "workflow_pairs")] == [(3, 1)]
    assert any(p.suffix == ".mp4" for p in host.output_files(entry)), "the winner video was not saved"

    train = ui_to_api(json.loads((root / "physmaster_train_dpo.json").read_text()), host.object_info())
    for node in train.values():
        node["inputs"].update({"UNETLoader": {"unet_name": tm.MODELS["wan21_i2v"][1]},
                               "PhysMasterEncoderLoader": {"encoder_name": "PhysEncoder_00001_.safetensors"},
                               "PhysMasterPreferenceDataset": {"dataset_name": "workflow_pairs"},
                               "PhysMasterTrainDPO": {"steps": 5}}.get(node["class_type"], {}))
    entry = host.run(train, timeout=900)
    outputs = entry["outputs"]
    by_type = {v["class_type"]: k for k, v in train.items()}
    assert "dpo-head: 5 steps" in outputs[by_type["PhysMasterTrainDPO"]]["text"][0]
    saved = json.loads(outputs[by_type["PhysMasterEncoderSave"]]["text"][0])
    assert saved["stages"] == ["dpo-head"]
    assert outputs[by_type["LossGraphNode"]]["images"]


def test_cli_trained_lora_and_encoder_load_in_comfyui(host, marked_dataset, tmp_path):
    """Issue 12: the pairs marked in the graph train outside it (`accelerate launch -m physmaster train-dpo`, 2
    processes, on the very Wan file UNETLoader loads), and what the CLI writes comes back: core LoraLoaderModelOnly
    loads the LoRA with no 'lora key not loaded' and the sample changes; PhysMasterEncoderLoader loads the encoder
    with its provenance, and its tokens condition a sample."""
    import os
    import shutil
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from physmaster.encoder import load_encoder

    root = Path(__file__).resolve().parents[2]
    dataset = host.output_dir / "physmaster" / "preferences" / marked_dataset
    out = tmp_path / "cli"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
           "-m", "physmaster", "train-dpo", "--model", str(tm.model_path("wan21_i2v")), "--pairs", str(dataset),
           "--out", str(out), "--stage", "lora", "--steps", "3", "--batch-size", "1", "--lora-rank", "4",
           "--lr", "2e-3", "--tokens", str(TOKENS), "--head-width", "64", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    assert "6 pairs from train_pairs; 2 processes x batch 1" in proc.stdout

    lora = tmp_path / "physmaster_cli_dpo_lora.safetensors"
    shutil.copyfile(out / "lora.safetensors", lora)
    lora_name = host.add_model_file("loras", lora).name
    base = assert_core_lora_loader_applies(host, lora_name, "cli")

    enc_file = tmp_path / "physmaster_cli_encoder.safetensors"
    shutil.copyfile(out / "encoder.safetensors", enc_file)
    enc_name = host.add_model_file("physmaster", enc_file).name
    p = {"enc": {"class_type": "PhysMasterEncoderLoader", "inputs": {"encoder_name": enc_name}},
         "save": {"class_type": "PhysMasterEncoderSave", "inputs": {"encoder": ["enc", 0],
                                                                    "filename_prefix": "hosttest/cli_copy"}}}
    saved = json.loads(host.run(p, timeout=300)["outputs"]["save"]["text"][0])
    assert saved["stages"] == ["dpo-lora"]
    stage = load_encoder(host.base_dir / "models" / "physmaster" / saved["saved"]).provenance["stages"][-1]
    assert (stage["stage"], stage["dataset"], stage["dataset_size"], stage["processes"], stage["global_batch"],
            stage["steps"]) == ("dpo-lora", marked_dataset, 6, 2, 2, 3)
    # the loaded encoder's tokens condition a sample in the graph
    with_tokens = with_physmaster(FAMILIES["wan21_i2v"][0]("train/cli_tokens"), 1.0)
    with_tokens["enc"] = {"class_type": "PhysMasterEncoderLoader", "inputs": {"encoder_name": enc_name}}
    tokens_latent, _ = _run_and_load(host, with_tokens)
    assert tokens_latent.shape == base.shape and not torch.equal(tokens_latent, base)


def test_videos_saved_in_the_graph_train_with_the_sft_cli(host, tmp_path):
    """Issue 12: PhysMasterSaveTrainingVideos exports latents + their conditioning as a video set that
    `python -m physmaster train-sft` reads (through physmaster.videoset, conditioning via comfy_inputs)."""
    from physmaster.cli import main
    from physmaster.encoder import load_encoder

    build, _ = FAMILIES["wan21_i2v"]
    p = with_physmaster(build("train/videos_src"), 1.0)
    p["i2v"]["inputs"]["batch_size"] = 2
    p["save_videos"] = {"class_type": "PhysMasterSaveTrainingVideos", "inputs": {
        "latents": ["sampler", 0], "positive": ["apply", 0], "dataset_name": "cli_videos"}}
    entry = host.run(p, timeout=600)
    report = json.loads(entry["outputs"]["save_videos"]["text"][0])
    assert report["saved_videos"] == 2 and report["files"] == 1 and report["videos_in_set"] >= 2
    folder = host.output_dir / "physmaster" / "videos" / "cli_videos"
    out = tmp_path / "sft"
    assert main(["train-sft", "--model", str(tm.model_path("wan21_i2v")), "--videos", str(folder), "--out", str(out),
                 "--steps", "2", "--tokens", str(TOKENS), "--head-width", "64", "--lora-rank", "2",
                 "--device", "cpu"]) == 0
    stage = load_encoder(out / "encoder.safetensors").provenance["stages"][0]
    assert stage["stage"] == "sft" and stage["dataset"] == "cli_videos" and stage["dataset_size"] >= 2
    assert stage["processes"] == 1 and (out / "lora.safetensors").is_file()


# -- issue 10: nothing copied, the user's model untouched, reproducible, memory options and accounting -------------

def _sample(host, prefix: str):
    build, _ = FAMILIES["wan21_i2v"]
    latent, _ = _run_and_load(host, build(prefix))
    return latent


def test_training_shares_the_weights_and_leaves_the_users_model_bit_identical(host, marked_dataset):
    """Stage III trains on the user's loaded weights (no deep copy, no reload), Stage II adds the LoRA in bypass
    mode: sampling the same model with the same latent before and after gives bit-identical latents."""
    before = _sample(host, "share/before")  # loads the model (cached by UNETLoader for what follows)
    for stage in ("head (Stage III)", "dit lora (Stage II)"):
        entry = host.run(dpo_prompt(marked_dataset, stage, steps=3), timeout=900)
        (run,) = _history(entry)
        assert run["weights"] == "the loaded weights, shared" and len(run["history"]) == 3
        mem = run["memory"]
        assert mem["stage"] == run["stage"] and mem["peak"] > mem["without_weights"] > 0
        summary = entry["outputs"]["train"]["text"][0]
        assert "estimated peak" in summary and "activations" in summary, summary
        after = _sample(host, f"share/after_{run['stage']}")
        assert torch.equal(before, after), f"sampling changed after {stage}"


def test_two_identical_runs_give_identical_losses_and_files(fresh_host_cache, marked_dataset):
    """The LoRA's initial values follow training_seed: two identical Stage II runs (caches emptied between)
    give the same losses and bit-identical LoRA files; alpha is saved and stays rank (frozen)."""
    host = fresh_host_cache
    runs = []
    for i in range(2):
        host.free()
        p = dpo_prompt(marked_dataset, "dit lora (Stage II)", steps=3)
        p["save_lora"] = {"class_type": "SaveLoRA", "inputs": {"lora": ["train", 1],
                                                               "prefix": f"loras/hosttest_repro{i}"}}
        entry = host.run(p, timeout=900)
        (run,) = _history(entry)
        (path,) = sorted((host.output_dir / "loras").glob(f"hosttest_repro{i}_*.safetensors"))[-1:]
        runs.append(([h["loss"] for h in run["history"]], harness.load_tensors(path)))
    (losses0, lora0), (losses1, lora1) = runs
    assert losses0 == losses1 and len(losses0) == 3 and losses0[1] != losses0[0]
    assert set(lora0) == set(lora1) and all(torch.equal(lora0[k], lora1[k]) for k in lora0)
    alphas = [v for k, v in lora0.items() if k.endswith(".alpha")]
    assert alphas and all(float(a) == 4.0 for a in alphas)  # lora_rank 4: alpha = rank, not trained


def test_memory_options_this_machine_cannot_use_are_named_before_training(host, marked_dataset):
    for option, words in (("offloading", "set offloading off"), ("quantized_backward", "set quantized_backward off"),
                          ("activations_on_cpu", "set activations_on_cpu off")):
        p = dpo_prompt(marked_dataset, "head (Stage III)", steps=2)
        p["train"]["inputs"][option] = True
        with pytest.raises(harness.ExecutionFailed) as err:
            host.run(p, timeout=300)
        msg = err.value.exception_message
        assert err.value.node_id == "train" and words in msg and "CPU" in msg, msg


def test_a_latent_too_big_for_any_option_is_refused_with_the_numbers(host):
    """SFT on a 1920x1920, 201-frame latent (734,400 video tokens) would need more than the machine's RAM: the
    pre-flight says so, with the estimate, before anything is trained."""
    build, _ = FAMILIES["wan21_i2v"]
    p = with_physmaster(build("toobig"), 1.0)
    del p["image"], p["sampler"], p["save"]
    p["i2v"]["inputs"].update({"width": 1920, "height": 1920, "length": 201})
    del p["i2v"]["inputs"]["start_image"]
    p["apply"]["inputs"].update({"positive": ["i2v", 0], "negative": ["i2v", 1]})
    p["train"] = {"class_type": "PhysMasterTrainSFT", "inputs": {
        "model": ["unet", 0], "encoder": ["enc", 0], "latents": ["i2v", 2], "positive": ["apply", 0],
        "train": "head and lora", "steps": 2, "learning_rate": 1e-3, "lora_rank": 4, "batch_size": 1,
        "training_seed": 0, "gradient_checkpointing": False}}
    p["summary"] = {"class_type": "PreviewAny", "inputs": {"source": ["train", 3]}}
    t0 = time.monotonic()
    with pytest.raises(harness.ExecutionFailed) as err:
        host.run(p, timeout=600)
    msg = err.value.exception_message
    assert err.value.node_id == "train", msg
    assert "needs estimated peak" in msg and "free RAM" in msg and "GiB" in msg, msg
    assert "gradient_checkpointing" in msg, msg  # the option that fits, or that none does
    print(f"refused in {time.monotonic() - t0:.1f} s: {msg[:300]}")


def _status_kib(pid: int, key: str) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def sft_memory_prompt(size: int, length: int, steps: int, seed: int, checkpointing: bool, split: bool = False) -> dict:
    """Stage I SFT on the mid-size Wan (WanImageToVideo's latent of a size x size, `length`-frame video)."""
    build, _ = FAMILIES["wan21_i2v"]
    p = with_physmaster(build("mem"), 1.0)
    del p["sampler"], p["save"]
    p["unet"]["inputs"]["unet_name"] = tm.MODELS["wan21_i2v_mid"][1]
    p["image"]["inputs"].update({"width": size, "height": size})
    p["i2v"]["inputs"].update({"width": size, "height": size, "length": length})
    p["apply"]["inputs"].update({"positive": ["i2v", 0], "negative": ["i2v", 1]})
    p["train"] = {"class_type": "PhysMasterTrainSFT", "inputs": {
        "model": ["unet", 0], "encoder": ["enc", 0], "latents": ["i2v", 2], "positive": ["apply", 0],
        "train": "head and lora", "steps": steps, "learning_rate": 1e-4, "lora_rank": 4, "batch_size": 1,
        "training_seed": seed, "gradient_checkpointing": checkpointing, "split_passes": split}}
    p["summary"] = {"class_type": "PreviewAny", "inputs": {"source": ["train", 3]}}
    return p


@pytest.mark.parametrize("checkpointing", [False, True])
def test_memory_estimate_matches_the_measured_peak(comfyui_path, checkpointing):
    """The pre-flight's estimate of what a training step adds (activations, trainable weights and AdamW) against
    the server's measured peak RSS over its RSS with the model loaded, on a mid-size Wan 2.1 I2V (512 wide, 4
    blocks) at 256x256x17 (1,280 video tokens): within ±25%. The server runs with a fixed malloc mmap threshold so
    freed activations go back to the OS and RSS follows what is live."""
    models = tm.model_folders(tm.ensure_tiny_models(["wan21_i2v_mid", "wan21_vae"], comfyui_path=str(comfyui_path)))
    with harness.ComfyHost(comfyui_path, models=models, env={"MALLOC_MMAP_THRESHOLD_": "65536"}) as host:
        host.run(sft_memory_prompt(256, 17, 1, 0, checkpointing), timeout=900)  # loads, encodes, caches
        pid = host.proc.pid
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = _status_kib(pid, "VmRSS") * 1024
        entry = host.run(sft_memory_prompt(256, 17, 3, 1, checkpointing), timeout=900)  # only the train node
        peak = _status_kib(pid, "VmHWM") * 1024
    (run,) = _history(entry)
    estimate = run["memory"]["without_weights"]
    measured = peak - base
    print(f"checkpointing={checkpointing}: estimated {estimate / 2**20:.0f} MiB, measured {measured / 2**20:.0f} MiB "
          f"(ratio {measured / estimate:.2f}); profile {run['memory']['profile']}")
    assert 0.75 * estimate <= measured <= 1.25 * estimate


# -- issue 11 item 4: Train DPO filters or weights the pairs by their margins ---------------------------------------
JUDGED = "train_judged"


@pytest.fixture(scope="module")
def judged_dataset(host):
    """One group labelled by the judge in the picker with no threshold: 3 judge pairs whose margins are the judge's
    confidences (see test_picker_host.judge_prompt): the two drops against the still video (a lost object, about 1)
    and the two drops against each other (less sure), so at least two different margins."""
    if len(pairs_on_disk(host, JUDGED)) < 3:
        host.run(judge_prompt(JUDGED, 0.0), timeout=600)
    pairs = pairs_on_disk(host, JUDGED)
    assert len(pairs) == 3 and all(p["source"] == "judge" for p in pairs)
    assert len({p["margin"] for p in pairs}) >= 2 and min(p["margin"] for p in pairs) < 0.9, pairs
    return JUDGED


def test_dpo_filter_by_margin_drops_the_unsure_judge_pairs_and_says_how_many(host, judged_dataset):
    margins = sorted(p["margin"] for p in pairs_on_disk(host, judged_dataset))
    cut = round((margins[0] + margins[1]) / 2, 4)
    p = dpo_prompt(judged_dataset, "head (Stage III)", steps=3)
    p["train"]["inputs"].update(margin_use="filter", min_margin=cut)
    entry = host.run(p, timeout=900)
    (run,) = _history(entry)
    assert len(run["history"]) == 3 and run["stopped"] is None
    summary = entry["outputs"]["train"]["text"][0]
    assert f"margin_use 'filter': filter dropped 1 machine-labelled pair with margin below min_margin {cut:g}, " \
           "kept 2" in summary, summary
    from physmaster.encoder import load_encoder
    saved = json.loads(entry["outputs"]["save_enc"]["text"][0])
    (stage,) = load_encoder(host.base_dir / "models" / "physmaster" / saved["saved"]).provenance["stages"]
    assert (stage["margin_use"], stage["min_margin"], stage["dataset_size"]) == ("filter", cut, 2)
    # (a threshold above every margin is an error naming the widgets: with the candidate judge, confidences reach
    # 1.0, the widget's maximum, so that case is covered by tests/test_margins.py on the core, not here)


def test_dpo_weight_by_margin_scales_each_pairs_loss(host, judged_dataset):
    """At step 1 the policy is the reference, so each pair's loss is log 2 and the weighted batch loss is
    log 2 x the mean weight of the batch's pairs: margin / mean margin (one source here)."""
    import math

    from physmaster.preferences import PreferenceDataset
    from physmaster.training.stages import batch_indices

    pairs, _ = PreferenceDataset.open(host.output_dir / "physmaster" / "preferences", judged_dataset).read_pairs()
    margins = [p.margin for p in pairs]  # the order training sees them in
    weights = [m / (sum(margins) / len(margins)) for m in margins]
    idx = batch_indices(len(pairs), 2, 0, 0)
    p = dpo_prompt(judged_dataset, "head (Stage III)", steps=3)
    p["train"]["inputs"].update(margin_use="weight")
    entry = host.run(p, timeout=900)
    (run,) = _history(entry)
    first = run["history"][0]["loss"]
    assert first == pytest.approx(math.log(2) * sum(weights[i] for i in idx) / 2, abs=2e-3)
    assert abs(first - math.log(2)) > 0.01  # the weights really changed the loss
    summary = entry["outputs"]["train"]["text"][0]
    assert f"loss weighted by margin over its source's mean (weights: judge 3 pairs {min(weights):.2f}.." \
           f"{max(weights):.2f})" in summary, summary
