"""Smoke tests of the host harness on core ComfyUI nodes only (no PhysMaster node is needed here).

For each model family an I2V run goes through the HTTP API (tiny random model, random conditioning, the
family's core I2V node with a tiny start image, KSampler 2 steps on CPU, core SaveLatent), and running it again
on emptied caches gives bit-identical latents: the base of the strength-0 bypass tests.
"""

from __future__ import annotations

import time

import pytest

import harness
import tiny_models as tm

pytestmark = [pytest.mark.host, pytest.mark.slow]

SIZE = 64  # start image and video width/height (the smallest multiple of 32 that LTXVImgToVideo takes)


def _name(key: str) -> str:
    return tm.MODELS[key][1]


def _cond(seed: int, length: int, **extra) -> dict:
    inputs = {"seed": seed, "length": length, "width": 4096, "batch": 1, "scale": 1.0}
    inputs.update(extra)
    return {"class_type": "PhysMasterTest_RandomConditioning", "inputs": inputs}


def _ksampler(model, positive, negative, latent, seed=42) -> dict:
    return {"class_type": "KSampler", "inputs": {
        "model": model, "seed": seed, "steps": 2, "cfg": 2.0, "sampler_name": "euler", "scheduler": "simple",
        "positive": positive, "negative": negative, "latent_image": latent, "denoise": 1.0}}


def wan21_i2v_prompt(prefix: str, clip_vision: bool = True) -> dict:
    p = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": _name("wan21_i2v"), "weight_dtype": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": _name("wan21_vae")}},
        "image": {"class_type": "PhysMasterTest_RandomImage", "inputs": {"seed": 7, "width": SIZE, "height": SIZE,
                                                                         "batch": 1}},
        # like umT5-XXL: padded tokens zeroed, no attention_mask (real prompts give 512 tokens; 32 keeps it quick)
        "pos": _cond(1, 32, valid_length=20, zero_out_masked=True),
        "neg": _cond(2, 32, valid_length=12, zero_out_masked=True),
        "i2v": {"class_type": "WanImageToVideo", "inputs": {
            "positive": ["pos", 0], "negative": ["neg", 0], "vae": ["vae", 0], "width": SIZE, "height": SIZE,
            "length": 5, "batch_size": 1, "start_image": ["image", 0]}},
        "sampler": _ksampler(["unet", 0], ["i2v", 0], ["i2v", 1], ["i2v", 2]),
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": prefix}},
    }
    if clip_vision:
        p["clip_vision"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": _name("clip_vision_h")}}
        p["clip_vision_encode"] = {"class_type": "CLIPVisionEncode", "inputs": {
            "clip_vision": ["clip_vision", 0], "image": ["image", 0], "crop": "none"}}
        p["i2v"]["inputs"]["clip_vision_output"] = ["clip_vision_encode", 0]
    return p


def wan22_ti2v_prompt(prefix: str) -> dict:
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": _name("wan22_ti2v"), "weight_dtype": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": _name("wan22_vae")}},
        "image": {"class_type": "PhysMasterTest_RandomImage", "inputs": {"seed": 7, "width": SIZE, "height": SIZE,
                                                                         "batch": 1}},
        "pos": _cond(1, 32, valid_length=20, zero_out_masked=True),
        "neg": _cond(2, 32, valid_length=12, zero_out_masked=True),
        "latent": {"class_type": "Wan22ImageToVideoLatent", "inputs": {
            "vae": ["vae", 0], "width": SIZE, "height": SIZE, "length": 5, "batch_size": 1,
            "start_image": ["image", 0]}},
        "sampler": _ksampler(["unet", 0], ["pos", 0], ["neg", 0], ["latent", 0]),
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": prefix}},
    }


def ltxv_i2v_prompt(prefix: str) -> dict:
    return {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": _name("ltxv"), "weight_dtype": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": _name("ltxv_vae")}},
        "image": {"class_type": "PhysMasterTest_RandomImage", "inputs": {"seed": 7, "width": SIZE, "height": SIZE,
                                                                         "batch": 1}},
        # like LTX-Video's T5-XXL encoder: 128 tokens (its minimum), an int64 attention_mask (LTXV requires one)
        "pos": _cond(1, 128, attention_mask=True, valid_length=20),
        "neg": _cond(2, 128, attention_mask=True, valid_length=12),
        "i2v": {"class_type": "LTXVImgToVideo", "inputs": {
            "positive": ["pos", 0], "negative": ["neg", 0], "vae": ["vae", 0], "image": ["image", 0],
            "width": SIZE, "height": SIZE, "length": 9, "batch_size": 1, "strength": 1.0}},
        "sampler": _ksampler(["unet", 0], ["i2v", 0], ["i2v", 1], ["i2v", 2]),
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": prefix}},
    }


def hunyuan_i2v_prompt(prefix: str) -> dict:
    p = {
        "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": _name("hunyuan_i2v"), "weight_dtype": "default"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": _name("hunyuan_vae")}},
        "image": {"class_type": "PhysMasterTest_RandomImage", "inputs": {"seed": 7, "width": SIZE, "height": SIZE,
                                                                         "batch": 1}},
        # like HunyuanVideo's LLaVA-Llama-3 + CLIP-L encoder on one prompt: no padding (so no attention_mask),
        # the CLIP-L pooled output for vector_in
        "pos_text": _cond(1, 32),
        "neg_text": _cond(2, 32),
        "pos": {"class_type": "PhysMasterTest_AddPooledOutput", "inputs": {
            "conditioning": ["pos_text", 0], "seed": 3, "width": tm.HUNYUAN_POOLED_DIM}},
        "neg": {"class_type": "PhysMasterTest_AddPooledOutput", "inputs": {
            "conditioning": ["neg_text", 0], "seed": 4, "width": tm.HUNYUAN_POOLED_DIM}},
        "i2v": {"class_type": "HunyuanImageToVideo", "inputs": {
            "positive": ["pos", 0], "vae": ["vae", 0], "width": SIZE, "height": SIZE, "length": 5,
            "batch_size": 1, "guidance_type": "v1 (concat)", "start_image": ["image", 0]}},
        "sampler": _ksampler(["unet", 0], ["i2v", 0], ["neg", 0], ["i2v", 1]),
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sampler", 0], "filename_prefix": prefix}},
    }
    p["sampler"]["inputs"]["cfg"] = 1.0  # guidance-distilled, as ComfyUI's HunyuanVideo workflows (embedded 6.0)
    return p


FAMILIES = {
    # family -> (prompt builder, expected latent shape [B, C, T, H, W]). Wan 2.1 runs without CLIP vision here:
    # a CLIP-H encode costs ~17 s on 2 CPU cores; test_clip_vision_h_encode_and_wan21_uses_it covers it once.
    "wan21_i2v": (lambda prefix: wan21_i2v_prompt(prefix, clip_vision=False), (1, 16, 2, SIZE // 8, SIZE // 8)),
    "wan22_ti2v": (wan22_ti2v_prompt, (1, 48, 2, SIZE // 16, SIZE // 16)),
    "ltxv_i2v": (ltxv_i2v_prompt, (1, 128, 2, SIZE // 32, SIZE // 32)),
    "hunyuan_i2v": (hunyuan_i2v_prompt, (1, 16, 2, SIZE // 8, SIZE // 8)),
}


def _run_and_load(host, prompt, timeout=600):
    t0 = time.monotonic()
    entry = host.run(prompt, timeout=timeout)
    seconds = time.monotonic() - t0
    files = [p for p in host.output_files(entry) if p.suffix == ".latent"]
    assert len(files) == 1, f"expected one saved latent, got {files}"
    return harness.load_latent(files[0]), seconds


def test_object_info_has_core_nodes(host):
    info = host.object_info()
    for node in ("KSampler", "UNETLoader", "VAELoader", "CLIPVisionLoader", "CLIPVisionEncode", "SaveLatent",
                 "WanImageToVideo", "Wan22ImageToVideoLatent", "LTXVImgToVideo", "HunyuanImageToVideo",
                 "PhysMasterTest_RandomConditioning", "PhysMasterTest_RandomImage", "PhysMasterTest_SaveTensors"):
        assert node in info, f"{node} missing from /object_info"
    for key in ("wan21_i2v", "wan22_ti2v", "ltxv", "hunyuan_i2v"):
        assert _name(key) in info["UNETLoader"]["input"]["required"]["unet_name"][0]
    assert host.import_failures() == [], "\n".join(host.import_failures())


@pytest.mark.parametrize("family", list(FAMILIES))
def test_i2v_sampling_is_deterministic(host, family):
    build, shape = FAMILIES[family]
    host.free()
    first, t_first = _run_and_load(host, build(f"smoke/{family}_a"))
    host.free()
    second, t_second = _run_and_load(host, build(f"smoke/{family}_b"))
    print(f"{family}: first run {t_first:.1f} s, second run {t_second:.1f} s, latent {tuple(first.shape)}")
    assert tuple(first.shape) == shape
    assert first.isfinite().all()
    assert first.abs().sum() > 0
    assert first.dtype == second.dtype
    assert (first == second).all(), f"{family}: two runs on emptied caches differ " \
                                    f"(max |diff| {(first - second).abs().max().item()})"


def test_clip_vision_h_encode_and_wan21_uses_it(host):
    host.free()
    save = {"class_type": "PhysMasterTest_SaveTensors", "inputs": {
        "filename_prefix": "smoke/clip_vision", "clip_vision_output": ["clip_vision_encode", 0]}}
    with_cv = wan21_i2v_prompt("smoke/wan21_cv")
    with_cv["save_cv"] = save
    t0 = time.monotonic()
    entry = host.run(with_cv, timeout=600)
    print(f"wan21 i2v with CLIP-H load+encode: {time.monotonic() - t0:.1f} s")
    files = host.output_files(entry)
    tensors = harness.load_tensors(next(p for p in files if p.suffix == ".safetensors"))
    pen = tensors["clip_vision_output.penultimate_hidden_states"]
    assert tuple(pen.shape) == (1, 257, 1280)  # CLIP-H/14 at 224: 256 patches + class token, 1280 wide
    assert pen.isfinite().all()
    latent_cv = harness.load_latent(next(p for p in files if p.suffix == ".latent"))

    latent_plain, _ = _run_and_load(host, wan21_i2v_prompt("smoke/wan21_nocv", clip_vision=False))
    assert latent_cv.shape == latent_plain.shape
    assert not (latent_cv == latent_plain).all(), "the CLIP vision output did not change Wan 2.1 I2V's result"


def test_execution_error_is_reported(host):
    prompt = wan21_i2v_prompt("smoke/bad", clip_vision=False)
    prompt["i2v"]["inputs"]["vae"] = ["vae_wrong", 0]
    prompt["vae_wrong"] = {"class_type": "VAELoader", "inputs": {"vae_name": _name("ltxv_vae")}}
    with pytest.raises(harness.ExecutionFailed) as err:  # a 128-channel LTX latent in Wan's 16-channel concat
        host.run(prompt, timeout=300)
    assert err.value.node_id == "sampler" and err.value.node_type == "KSampler", str(err.value)
    assert err.value.exception_type and err.value.exception_message
    assert "KSampler" in str(err.value) and err.value.exception_message in str(err.value)


def test_rejected_prompt_names_the_node(host):
    with pytest.raises(harness.PromptRejected) as err:
        host.queue({"s": {"class_type": "KSampler", "inputs": {"seed": 1}}})
    assert "KSampler" in str(err.value) or "s" in str(err.value)
