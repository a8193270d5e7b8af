"""The PhysMaster nodes inside a real ComfyUI: schema, the shipped workflow, tokens on four model families (Wan 2.1
I2V, Wan 2.2 TI2V, LTX-Video, HunyuanVideo I2V), the strength-0 bypass, save/load, clear errors, the proxy-task
nodes, and settings that would need more memory than the machine has."""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch

import harness
import tiny_models as tm
from test_host_smoke import FAMILIES, SIZE, _run_and_load

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import schema_snapshot  # noqa: E402
from physmaster.encoder import HeadConfig, PhysEncoder  # noqa: E402
from workflow_api import SCHEMA_PATH, load_schema, ui_to_api  # noqa: E402

pytestmark = [pytest.mark.host, pytest.mark.slow]

OUR_NODES = ["PhysMasterEncoderLoader", "PhysMasterEncoderNew", "PhysMasterEncoderSave", "PhysMasterEncode",
             "PhysMasterApply", "PhysMasterDropScene", "PhysMasterPhysicsScore", "PhysMasterPreferencePicker",
             "PhysMasterPreferenceDataset", "PhysMasterTrainSFT", "PhysMasterTrainDPO", "PhysMasterSaveTrainingVideos",
             "PhysMasterPreferenceReview"]
TOKENS = 8


def _encoder_nodes(context_dim=4096, in_dim=1280, cvo_width=1280, seed=0) -> dict:
    return {
        "cvo": {"class_type": "PhysMasterTest_RandomClipVisionOutput",
                "inputs": {"seed": 5, "tokens": 257, "width": cvo_width, "batch": 1}},
        "enc": {"class_type": "PhysMasterEncoderNew", "inputs": {
            "in_dim": in_dim, "context_dim": context_dim, "num_tokens": TOKENS, "hidden_dim": 64, "depth": 1,
            "heads": 4, "feature": "penultimate", "init_seed": seed}},
        "tok": {"class_type": "PhysMasterEncode", "inputs": {"encoder": ["enc", 0], "clip_vision_output": ["cvo", 0]}},
    }


def with_physmaster(prompt: dict, strength: float, apply_to: str = "positive and negative", **enc) -> dict:
    """`prompt` with PhysMasterApply between the sampler and whatever fed its positive/negative."""
    p = copy.deepcopy(prompt)
    p.update(_encoder_nodes(**enc))
    s = p["sampler"]["inputs"]
    p["apply"] = {"class_type": "PhysMasterApply", "inputs": {
        "positive": s["positive"], "negative": s["negative"], "physical_tokens": ["tok", 0],
        "strength": strength, "apply_to": apply_to}}
    s["positive"], s["negative"] = ["apply", 0], ["apply", 1]
    return p


def test_object_info_lists_every_physmaster_node(host):
    info = host.object_info(refresh=True)
    missing = [n for n in OUR_NODES if n not in info]
    assert not missing, f"missing from /object_info: {missing}"
    for node in OUR_NODES:
        assert info[node]["category"].startswith("PhysMaster"), node
    assert info["PhysMasterTrainDPO"]["experimental"] and info["PhysMasterTrainSFT"]["experimental"]
    assert host.import_failures() == [], "\n".join(host.import_failures())


def test_live_schema_matches_snapshot(host):
    live = schema_snapshot.build(host.object_info(refresh=True))
    if os.environ.get("PHYSMASTER_UPDATE_SCHEMA"):
        schema_snapshot.write(host.object_info())
    snap = load_schema(SCHEMA_PATH)
    assert set(live["nodes"]) == set(snap["nodes"]), "node set differs from tests/node_schema.json " \
        "(PHYSMASTER_UPDATE_SCHEMA=1 rewrites it: only append to landed nodes)"
    diffs = [n for n in live["nodes"] if live["nodes"][n] != snap["nodes"][n]]
    assert not diffs, f"schema of {diffs} differs from tests/node_schema.json"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tokens_change_sampling_and_strength_zero_bypasses(host, family):
    build, shape = FAMILIES[family]
    base, _ = _run_and_load(host, build(f"pm/{family}_base"))
    applied_prompt = with_physmaster(build(f"pm/{family}_on"), 1.0)
    applied_prompt["save_cond"] = {"class_type": "PhysMasterTest_SaveTensors", "inputs": {
        "filename_prefix": f"pm/{family}_cond", "conditioning": ["apply", 0]}}
    entry = host.run(applied_prompt, timeout=600)
    files = host.output_files(entry)
    applied = harness.load_latent(next(p for p in files if p.suffix == ".latent"))
    cond = harness.load_tensors(next(p for p in files if p.suffix == ".safetensors"))
    bypass, _ = _run_and_load(host, with_physmaster(build(f"pm/{family}_zero"), 0.0))

    assert tuple(applied.shape) == shape and applied.isfinite().all()
    assert not torch.equal(applied, base), f"{family}: physical tokens did not change the sampled latent"
    assert (applied - base).abs().max() > 1e-4
    assert torch.equal(bypass, base), f"{family}: strength 0 is not a bit-identical bypass " \
                                      f"(max |diff| {(bypass - base).abs().max().item()})"
    # the conditioning the sampler got: N tokens appended; LTX's int64 attention_mask extended with ones
    base_len = 128 if family == "ltxv_i2v" else 32
    assert tuple(cond["conditioning.0.cond"].shape) == (1, base_len + TOKENS, 4096)
    if family == "ltxv_i2v":
        mask = cond["conditioning.0.attention_mask"]
        assert mask.dtype == torch.int64 and tuple(mask.shape) == (1, base_len + TOKENS)
        assert mask[0, :20].eq(1).all() and mask[0, 20:base_len].eq(0).all() and mask[0, base_len:].eq(1).all()


def _apply_conditionings(host, name: str, strength: float, apply_to: str):
    """Run the tiny Wan I2V graph through PhysMasterApply(apply_to); -> ({"pos", "neg", "in": its cond tensor}
    (what Apply gave the sampler, and the negative it was given), the sampled latent)."""
    build, _ = FAMILIES["wan21_i2v"]
    p = with_physmaster(build(f"pm/{name}"), strength, apply_to=apply_to)
    for what, link in (("pos", ["apply", 0]), ("neg", ["apply", 1]), ("in", p["apply"]["inputs"]["negative"])):
        p[f"save_{what}"] = {"class_type": "PhysMasterTest_SaveTensors", "inputs": {
            "filename_prefix": f"pm/{name}_{what}", "conditioning": link}}
    files = host.output_files(host.run(p, timeout=600))
    conds = {f.name.split("_")[1]: harness.load_tensors(f)["conditioning.0.cond"] for f in files
             if f.suffix == ".safetensors"}
    return conds, harness.load_latent(next(f for f in files if f.suffix == ".latent"))


def test_positive_only_leaves_negative_alone(host):
    conds, _ = _apply_conditionings(host, "posonly", 1.0, "positive only")
    assert conds["pos"].shape[1] == 32 + TOKENS
    assert conds["neg"].shape[1] == 32 and torch.equal(conds["neg"], conds["in"])


def test_negative_zeroed_gives_the_negative_as_many_zero_tokens(host):
    """apply_to "positive, negative zeroed": the negative is the input's with TOKENS zero rows appended (so the
    sampler's CFG scales what the tokens change), the positive as with "positive and negative"."""
    conds, latent = _apply_conditionings(host, "negzero", 1.5, "positive, negative zeroed")
    pos, neg, given = conds["pos"], conds["neg"], conds["in"]
    assert tuple(pos.shape) == tuple(neg.shape) == (1, 32 + TOKENS, 4096)
    assert torch.equal(neg[:, :32], given) and neg[:, 32:].eq(0).all()
    assert pos[:, 32:].abs().max() > 0
    assert tuple(latent.shape) == FAMILIES["wan21_i2v"][1] and latent.isfinite().all()


def _encoder_file(tmp_path: Path, **kw) -> Path:
    cfg = HeadConfig(in_dim=1280, context_dim=4096, num_tokens=TOKENS, hidden_dim=64, depth=1, heads=4,
                     backbone="clip_vision_h", **kw)
    return PhysEncoder.new(cfg, seed=11, name="hosttest").save(tmp_path / "PhysEncoder_00001_.safetensors")


def with_tiny_models(prompt: dict, host, tmp_path: Path, image_name: str = "physmaster_start.png") -> dict:
    """A shipped Wan workflow (API format) with the harness's tiny models, a small start image and size, and the
    harness's random conditioning standing in for CLIPLoader + CLIPTextEncode (no text encoder fits here)."""
    from PIL import Image

    host.add_model_file("physmaster", _encoder_file(tmp_path))
    image = tmp_path / "start.png"
    Image.new("RGB", (SIZE, SIZE), (90, 140, 200)).save(image)
    image_name = host.upload_image(image, image_name)
    swaps = {"UNETLoader": {"unet_name": tm.MODELS["wan21_i2v"][1]},
             "VAELoader": {"vae_name": tm.MODELS["wan21_vae"][1]},
             "CLIPVisionLoader": {"clip_name": tm.MODELS["clip_vision_h"][1]},
             "PhysMasterEncoderLoader": {"encoder_name": "PhysEncoder_00001_.safetensors"},
             "LoadImage": {"image": image_name},
             "WanImageToVideo": {"width": SIZE, "height": SIZE, "length": 5},
             "KSampler": {"steps": 2, "seed": 1}}
    for nid in list(prompt):
        node = prompt[nid]
        node["inputs"].update(swaps.get(node["class_type"], {}))
        if node["class_type"] == "CLIPLoader":
            del prompt[nid]
        elif node["class_type"] == "CLIPTextEncode":
            prompt[nid] = {"class_type": "PhysMasterTest_RandomConditioning",
                           "inputs": {"seed": int(nid), "length": 32, "width": 4096, "batch": 1, "scale": 1.0}}
    return prompt


def test_shipped_workflow_runs_with_tiny_models(host, tmp_path):
    """workflows/physmaster_wan_i2v.json, converted by the harness, tiny models swapped in, end to end."""
    workflow = json.loads((ROOT / "workflows" / "physmaster_wan_i2v.json").read_text())
    prompt = with_tiny_models(ui_to_api(workflow, host.object_info()), host, tmp_path)
    entry = host.run(prompt, timeout=900)
    videos = [p for p in host.output_files(entry) if p.suffix in (".mp4", ".webm", ".mkv")]
    assert len(videos) == 1 and videos[0].stat().st_size > 0, host.output_files(entry)
    import av
    with av.open(str(videos[0])) as container:
        frames = [f for f in container.decode(video=0)]
    assert len(frames) == 5 and frames[0].width == SIZE


def test_save_then_load_gives_the_same_tokens(host):
    enc_prompt = _encoder_nodes(seed=3)
    enc_prompt["save"] = {"class_type": "PhysMasterEncoderSave", "inputs": {
        "encoder": ["enc", 0], "filename_prefix": "hosttest/roundtrip"}}
    entry = host.run(enc_prompt, timeout=300)
    saved = json.loads(entry["outputs"]["save"]["text"][0])["saved"]
    # PhysMasterEncoderSave writes to the first physmaster folder: ComfyUI's own models/physmaster
    path = host.base_dir / "models" / "physmaster" / saved
    assert path.is_file(), f"{path} not written"
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]

    def tokens_of(encoder_node: dict, prefix: str) -> torch.Tensor:
        p = _encoder_nodes(seed=3)
        p["enc"] = encoder_node
        p["cond"] = {"class_type": "PhysMasterTest_RandomConditioning",
                     "inputs": {"seed": 1, "length": 4, "width": 4096, "batch": 1, "scale": 1.0}}
        p["apply"] = {"class_type": "PhysMasterApply", "inputs": {
            "positive": ["cond", 0], "negative": ["cond", 0], "physical_tokens": ["tok", 0], "strength": 1.0,
            "apply_to": "positive only"}}
        p["save"] = {"class_type": "PhysMasterTest_SaveTensors", "inputs": {
            "filename_prefix": prefix, "conditioning": ["apply", 0]}}
        e = host.run(p, timeout=300)
        return harness.load_tensors(next(f for f in host.output_files(e) if f.suffix == ".safetensors"))[
            "conditioning.0.cond"][:, 4:]

    fresh = tokens_of(_encoder_nodes(seed=3)["enc"], "pm/tok_new")
    loaded = tokens_of({"class_type": "PhysMasterEncoderLoader", "inputs": {"encoder_name": saved}}, "pm/tok_loaded")
    assert fresh.shape == (1, TOKENS, 4096)
    assert torch.equal(fresh, loaded)


def test_save_never_shadows_an_encoder_in_another_physmaster_folder(host, tmp_path):
    """Issue 9 item 12: with X_00001_ in the extra_model_paths folder, saving prefix X wrote X_00001_ in the first
    folder, and the Loader then loaded the new file for workflows that named the old one."""
    extra = host.models_dir / "physmaster"  # registered by extra_model_paths.yaml: the second folder
    first = host.base_dir / "models" / "physmaster"
    old = PhysEncoder.new(HeadConfig(in_dim=1280, context_dim=4096, num_tokens=3, hidden_dim=64, depth=1, heads=4),
                          seed=1, name="old")
    for rel in ("hosttest_shadow/X_00001_.safetensors", "hosttest_shadow/X_00002_.safetensors",
                "hosttestshadowtop_00001_.safetensors"):
        (extra / rel).parent.mkdir(parents=True, exist_ok=True)
        old.save(extra / rel)
    for prefix, want in (("hosttest_shadow/X", "hosttest_shadow/X_00003_.safetensors"),
                         ("hosttestshadowtop", "hosttestshadowtop_00002_.safetensors")):
        p = _encoder_nodes(seed=4)
        p["save"] = {"class_type": "PhysMasterEncoderSave", "inputs": {"encoder": ["enc", 0],
                                                                       "filename_prefix": prefix}}
        saved = json.loads(host.run(p, timeout=300)["outputs"]["save"]["text"][0])["saved"]
        assert saved == want
        assert (first / saved).is_file() and not (extra / saved).exists()
    assert not (first / "hosttest_shadow" / "X_00001_.safetensors").exists()
    assert not (first / "hosttestshadowtop_00001_.safetensors").exists()
    # a workflow that names the old file still gets the old encoder (3 tokens), the new name the new one (8)
    for name, tokens in (("hosttest_shadow/X_00001_.safetensors", 3), ("hosttest_shadow/X_00003_.safetensors", TOKENS)):
        p = {"enc": {"class_type": "PhysMasterEncoderLoader", "inputs": {"encoder_name": name}},
             "save": {"class_type": "PhysMasterEncoderSave", "inputs": {"encoder": ["enc", 0],
                                                                        "filename_prefix": "hosttest_shadow_copy/c"}}}
        summary = json.loads(host.run(p, timeout=300)["outputs"]["save"]["text"][0])
        assert summary["config"]["num_tokens"] == tokens, (name, summary)


def _expect_failure(host, prompt, node: str, *needles: str):
    with pytest.raises(harness.ExecutionFailed) as err:
        host.run(prompt, timeout=300)
    msg = err.value.exception_message
    assert err.value.node_id == node, str(err.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in: {msg}"
    return msg


def test_token_width_mismatch_is_a_clear_error(host):
    build, _ = FAMILIES["wan21_i2v"]
    prompt = with_physmaster(build("pm/badwidth"), 1.0, context_dim=2048)
    _expect_failure(host, prompt, "apply", "2048", "4096", "positive", "PhysMasterEncoderNew")


def test_clip_width_mismatch_names_the_backbone(host):
    p = _encoder_nodes(in_dim=1024, cvo_width=1280)
    p["save"] = {"class_type": "PhysMasterTest_SaveTensors", "inputs": {"filename_prefix": "pm/x"}}
    p["cond"] = {"class_type": "PhysMasterTest_RandomConditioning",
                 "inputs": {"seed": 1, "length": 4, "width": 4096, "batch": 1, "scale": 1.0}}
    p["apply"] = {"class_type": "PhysMasterApply", "inputs": {
        "positive": ["cond", 0], "negative": ["cond", 0], "physical_tokens": ["tok", 0], "strength": 1.0,
        "apply_to": "positive only"}}
    p["save"]["inputs"]["conditioning"] = ["apply", 0]
    _expect_failure(host, p, "tok", "1280", "1024", "CLIPVisionLoader")


def test_bad_checkpoints_are_named(host, tmp_path):
    good = _encoder_file(tmp_path).read_bytes()
    folder = host.models_dir / "physmaster"
    (folder / "hosttest_truncated.safetensors").write_bytes(good[: len(good) // 3])
    from safetensors.torch import save_file
    save_file({"lora_down.weight": torch.zeros(2, 2)}, str(folder / "hosttest_lora.safetensors"))
    for name, needle in (("hosttest_truncated.safetensors", "truncated"),
                         ("hosttest_lora.safetensors", "not a PhysMaster encoder")):
        p = {"enc": {"class_type": "PhysMasterEncoderLoader", "inputs": {"encoder_name": name}},
             "save": {"class_type": "PhysMasterEncoderSave", "inputs": {"encoder": ["enc", 0],
                                                                        "filename_prefix": "hosttest/never"}}}
        _expect_failure(host, p, "enc", name, needle)
    assert not list(folder.glob("hosttest/never*"))


def test_drop_scene_and_physics_score(host):
    p = {"scene": {"class_type": "PhysMasterDropScene", "inputs": {"seed": 3, "split": "unseen", "size": 64,
                                                                   "frames": 24, "fps": 16.0}},
         "score": {"class_type": "PhysMasterPhysicsScore", "inputs": {
             "frames": ["scene", 1], "fps": 16.0, "ground_truth_masks": ["scene", 2], "ground_truth_fps": 16.0}},
         "save": {"class_type": "PhysMasterTest_SaveTensors", "inputs": {
             "filename_prefix": "pm/scene", "image": ["scene", 0]}}}
    entry = host.run(p, timeout=300)
    report = json.loads(entry["outputs"]["score"]["text"][0])
    assert report["found"] is True and 0.0 < report["score"] <= 1.0
    assert report["metrics"]["iou"] > 0.8 and report["metrics"]["l2"] < 0.02  # the truth against itself
    previews = entry["outputs"]["score"]["images"]
    assert len(previews) == 24 and all(i["type"] == "temp" for i in previews)
    start = harness.load_tensors(next(f for f in host.output_files(entry) if f.suffix == ".safetensors"))["image"]
    assert tuple(start.shape) == (1, 64, 64, 3)


def test_widget_maxima_are_refused_up_front_with_the_estimate(host):
    """Issue 9 item 6: EncoderNew at its maxima needs ~74 GiB, DropScene > 12 GiB; both died in the allocator."""
    import psutil

    from physmaster.memory import head_bytes, scene_bytes

    info = host.object_info()
    req = info["PhysMasterEncoderNew"]["input"]["required"]
    top = {k: req[k][1]["max"] for k in ("in_dim", "context_dim", "num_tokens", "hidden_dim", "depth", "heads")}
    need = head_bytes(HeadConfig(feature="penultimate", **top))
    scene = info["PhysMasterDropScene"]["input"]["required"]
    size, frames = scene["size"][1]["max"], scene["frames"][1]["max"]
    if psutil.virtual_memory().available > min(need, scene_bytes(size, frames)):
        pytest.skip("this machine has the memory the widget maxima need")
    rss_before = psutil.Process(host.proc.pid).memory_info().rss
    p = {"enc": {"class_type": "PhysMasterEncoderNew", "inputs": dict(top, feature="penultimate", init_seed=0)},
         "save": {"class_type": "PhysMasterEncoderSave", "inputs": {"encoder": ["enc", 0],
                                                                    "filename_prefix": "hosttest/huge"}}}
    msg = _expect_failure(host, p, "enc", f"{need / 2**30:.1f} GiB", "free", "hidden_dim 8192", "depth 24",
                          "lower hidden_dim")
    assert "M parameters" in msg
    p = {"scene": {"class_type": "PhysMasterDropScene", "inputs": {"seed": 0, "split": "seen", "size": size,
                                                                   "frames": frames, "fps": 16.0}},
         "save": {"class_type": "PhysMasterTest_SaveTensors", "inputs": {"filename_prefix": "pm/huge",
                                                                         "image": ["scene", 0]}}}
    _expect_failure(host, p, "scene", f"{scene_bytes(size, frames) / 2**30:.1f} GiB", f"{frames} frames",
                    f"{size}x{size}", "lower size or frames")
    # refused before allocating: the server did not grow by anything like those sizes
    assert psutil.Process(host.proc.pid).memory_info().rss - rss_before < 2**30
