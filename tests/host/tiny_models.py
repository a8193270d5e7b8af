"""Tiny random model files that a real ComfyUI's loaders accept, for the host tests.

Nothing here is trained: the weights are random (seeded, so every machine writes the same files) and only the
*shapes and key names* matter. They are built from ComfyUI's own model classes, so the keys always match the
ComfyUI version under test, and written once into a cache folder (``~/.cache/physmaster-host-tests/<VERSION>/``,
or ``$PHYSMASTER_HOST_CACHE``), atomically (temp file + rename), so an interrupted run never leaves a corrupt file.

Run as a script it needs ComfyUI importable (``cwd`` = the ComfyUI checkout, the stubs folder on PYTHONPATH);
``ensure_tiny_models()`` does that in a subprocess of the same Python, so the test process never imports ComfyUI.

What each file is (see MODELS below):
- ``wan21_i2v_tiny``: Wan 2.1 I2V-14B-class DiT (model_type i2v: in_dim 36, ``img_emb`` MLP taking CLIP-H's
  1280-wide penultimate features), dim 256 / 2 heads / 2 layers / ffn 512, text_dim 4096 (umT5-XXL width).
- ``wan22_ti2v_tiny``: Wan 2.2 TI2V-5B-class DiT (in/out 48 channels for the Wan 2.2 VAE latent), same sizes.
- ``ltxv_tiny``: LTX-Video DiT, 4 heads x 64 = 256 wide, 2 layers, caption_channels 4096 (T5-XXL width); the
  head count and head width are given in the safetensors ``config`` metadata (as real LTXV files do).
- ``wan21_vae_tiny``: Wan 2.1 VAE with base dim 16 (ComfyUI reads the width from the weights).
- ``wan22_vae_random``: Wan 2.2 VAE at its real size (ComfyUI hard-codes dim 160), fp16 file.
- ``ltxv_vae_tiny``: LTX-Video VAE, 16 base channels, one layer per block (architecture from ``config`` metadata).
- ``clip_vision_h_random``: CLIP ViT-H/14 vision tower at its real size (ComfyUI's config is fixed), fp16 file.
- ``hunyuan_video_i2v_tiny``: HunyuanVideo I2V DiT (in_channels 33 = 16 noise + 16 start-image latent + 1 mask, so
  ComfyUI detects HunyuanVideoI2V), hidden 256 / 2 heads of 128, one double and one single block, text width 4096
  (the LLaVA-Llama-3 hidden size), ``vector_in`` for CLIP-L's 768-wide pooled output, ``guidance_in``.
- ``hunyuan_video_vae_random``: HunyuanVideo's causal 3D VAE at its real size (ComfyUI hard-codes ch 128), fp16 file.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

# Bump when any file's recipe changes: the cache folder is keyed on it.
VERSION = "v1"

HERE = Path(__file__).resolve().parent
STUBS = HERE / "stubs"

# name -> (ComfyUI model folder, file name)
MODELS = {
    "wan21_i2v": ("diffusion_models", "physmaster_test_wan21_i2v_tiny.safetensors"),
    "wan22_ti2v": ("diffusion_models", "physmaster_test_wan22_ti2v_tiny.safetensors"),
    "ltxv": ("diffusion_models", "physmaster_test_ltxv_tiny.safetensors"),
    "wan21_vae": ("vae", "physmaster_test_wan21_vae_tiny.safetensors"),
    "wan22_vae": ("vae", "physmaster_test_wan22_vae_random.safetensors"),
    "ltxv_vae": ("vae", "physmaster_test_ltxv_vae_tiny.safetensors"),
    "clip_vision_h": ("clip_vision", "physmaster_test_clip_vision_h_random_fp16.safetensors"),
    "hunyuan_i2v": ("diffusion_models", "physmaster_test_hunyuan_video_i2v_tiny.safetensors"),
    "hunyuan_vae": ("vae", "physmaster_test_hunyuan_video_vae_random_fp16.safetensors"),
    # built only when asked for (not by the session fixture): the memory accounting test and the memory bench
    "wan21_i2v_mid": ("diffusion_models", "physmaster_test_wan21_i2v_mid.safetensors"),
    "wan21_i2v_bench": ("diffusion_models", "physmaster_test_wan21_i2v_bench.safetensors"),
}
ON_DEMAND = ("wan21_i2v_mid", "wan21_i2v_bench")
DEFAULT_MODELS = [n for n in MODELS if n not in ON_DEMAND]
# Wan 2.1 I2V-class DiTs of middling size, same recipe as the tiny one: for measuring memory, not function
WAN_MID = dict(dim=512, ffn_dim=1536, num_layers=4)  # 4 heads of 128; ~0.09 GiB fp32
WAN_BENCH = dict(dim=1536, ffn_dim=8960, num_layers=8)  # 12 heads of 128, Wan 1.3B's width; ~1.6 GiB fp32

# Widths the models take at their inputs (real-model widths, so conditioning built for real models fits).
WAN_TEXT_DIM = 4096  # umT5-XXL hidden size; WanModel's text_embedding input (not inferred from weights)
LTXV_CAPTION_CHANNELS = 4096  # T5-XXL hidden size; LTXV caption_projection input
CLIP_H_WIDTH = 1280  # CLIP-H penultimate hidden size, consumed by Wan 2.1 I2V img_emb

WAN_DIT = dict(dim=256, ffn_dim=512, num_layers=2, freq_dim=256, text_dim=WAN_TEXT_DIM, patch_size=(1, 2, 2),
               window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)
LTXV_DIT = dict(in_channels=128, cross_attention_dim=256, attention_head_dim=64, num_attention_heads=4,
                caption_channels=LTXV_CAPTION_CHANNELS, num_layers=2)
LTXV_VAE_CONFIG = {
    "_class_name": "CausalVideoAutoencoder",
    "dims": 3,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 128,
    "blocks": [["res_x", 1], ["compress_all", 1], ["res_x_y", 1], ["res_x", 1], ["compress_all", 1],
               ["res_x_y", 1], ["res_x", 1], ["compress_all", 1], ["res_x", 1]],
    "scaling_factor": 1.0,
    "norm_layer": "pixel_norm",
    "patch_size": 4,
    "latent_log_var": "uniform",
    "use_quant_conv": False,
    "causal_decoder": False,
    "encoder_base_channels": 16,
    "decoder_base_channels": 16,
}
WAN21_VAE_DIM = 16
HUNYUAN_TEXT_DIM = 4096  # LLaVA-Llama-3-8B hidden size: txt_in.input_embedder input (read from the weights)
HUNYUAN_POOLED_DIM = 768  # CLIP-L pooled output: vector_in input (ComfyUI fixes vec_in_dim 768)
HUNYUAN_DIT = dict(image_model="hunyuan_video", in_channels=33, out_channels=16, vec_in_dim=HUNYUAN_POOLED_DIM,
                   context_in_dim=HUNYUAN_TEXT_DIM, hidden_size=256, mlp_ratio=4.0, num_heads=2, depth=1,
                   depth_single_blocks=1, axes_dim=[16, 56, 56], theta=256, patch_size=[1, 2, 2], qkv_bias=True,
                   guidance_embed=True, byt5=False, meanflow=False, use_cond_type_embedding=False,
                   vision_in_dim=None, meanflow_sum=False)
HUNYUAN_VAE = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
               "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
               "conv3d": True, "time_compress": 4}


def cache_dir() -> Path:
    root = os.environ.get("PHYSMASTER_HOST_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "physmaster-host-tests")
    return Path(root) / VERSION


def model_path(name: str, root: Path | None = None) -> Path:
    return (root or cache_dir()) / MODELS[name][1]


def ensure_tiny_models(names=None, comfyui_path: str | None = None, python: str | None = None,
                       timeout: float = 1800) -> dict[str, Path]:
    """Write the missing model files into the cache (in a ComfyUI subprocess); return name -> path."""
    names = list(names or MODELS)
    root = cache_dir()
    missing = [n for n in names if not model_path(n, root).is_file()]
    if missing:
        comfyui_path = comfyui_path or os.environ["COMFYUI_PATH"]
        root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(STUBS), comfyui_path] + (
            [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        proc = subprocess.run([python or sys.executable, str(Path(__file__).resolve()), str(root), *missing],
                              cwd=comfyui_path, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"writing tiny models {missing} failed (rc {proc.returncode}):\n"
                               f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return {n: model_path(n, root) for n in names}


# ----------------------------------------------------------------------------------------------- generator
# Everything below runs inside the ComfyUI subprocess.

def _seed_for(name: str, key: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{VERSION}/{name}/{key}".encode()).digest()[:8], "little") & (2**63 - 1)


def _random_tensor(torch, name: str, key: str, shape, dtype):
    """Seeded init by key name: norms/scales -> 1, biases and means -> 0, others ~ N(0, 1/fan_in)."""
    leaf = key.rsplit(".", 1)[-1].lower()
    lkey = key.lower()
    if len(shape) == 0:
        return torch.zeros(shape, dtype=dtype)
    if "std" in leaf or leaf in ("gamma", "scale") or (leaf == "weight" and len(shape) == 1):
        return torch.ones(shape, dtype=dtype)
    if leaf == "bias" or "mean" in leaf or "mean" in lkey.rsplit(".", 2)[-1]:
        return torch.zeros(shape, dtype=dtype)
    gen = torch.Generator().manual_seed(_seed_for(name, key))
    fan_in = 1
    for s in (shape[1:] if len(shape) > 1 else shape):
        fan_in *= int(s)
    std = min(0.02, fan_in ** -0.5) if ("embedding" in lkey and "patch" not in lkey) else fan_in ** -0.5
    if "modulation" in lkey or "scale_shift_table" in lkey:
        std = 0.02
    t = torch.randn(tuple(shape), generator=gen, dtype=torch.float32) * std
    return t.to(dtype)


def _shapes(module) -> dict:
    out = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    return out


def _meta(builder):
    import torch
    with torch.device("meta"):
        return builder()


def _write(path: Path, name: str, shapes: dict, dtype, metadata: dict | None = None, overrides=None):
    import torch
    from safetensors.torch import save_file
    tensors = {}
    for key, shape in shapes.items():
        if overrides and key in overrides:
            tensors[key] = overrides[key].to(dtype).contiguous()
        else:
            tensors[key] = _random_tensor(torch, name, key, shape, dtype).contiguous()
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build(name: str, root: Path):
    import torch
    import comfy.ops
    ops = comfy.ops.disable_weight_init
    path = model_path(name, root)
    f32 = torch.float32
    if name in ("wan21_i2v", "wan22_ti2v", "wan21_i2v_mid", "wan21_i2v_bench"):
        from comfy.ldm.wan.model import WanModel
        if name in ("wan21_i2v_mid", "wan21_i2v_bench"):
            sizes = WAN_MID if name == "wan21_i2v_mid" else WAN_BENCH
            cfg = dict(WAN_DIT, **sizes, model_type="i2v", in_dim=36, out_dim=16, num_heads=sizes["dim"] // 128)
        elif name == "wan21_i2v":
            cfg = dict(WAN_DIT, model_type="i2v", in_dim=36, out_dim=16, num_heads=WAN_DIT["dim"] // 128)
        else:
            cfg = dict(WAN_DIT, model_type="t2v", in_dim=48, out_dim=48, num_heads=WAN_DIT["dim"] // 128)
        m = _meta(lambda: WanModel(operations=ops, dtype=f32, **cfg))
        _write(path, name, _shapes(m), f32)
    elif name == "ltxv":
        from comfy.ldm.lightricks.model import LTXVModel
        m = _meta(lambda: LTXVModel(operations=ops, dtype=f32, **LTXV_DIT))
        meta = {"config": json.dumps({"transformer": {
            "num_attention_heads": LTXV_DIT["num_attention_heads"],
            "attention_head_dim": LTXV_DIT["attention_head_dim"],
            "caption_channels": LTXV_DIT["caption_channels"]}})}
        _write(path, name, _shapes(m), f32, metadata=meta)
    elif name == "wan21_vae":
        from comfy.ldm.wan.vae import WanVAE
        m = _meta(lambda: WanVAE(dim=WAN21_VAE_DIM, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                 attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0))
        _write(path, name, _shapes(m), f32)
    elif name == "wan22_vae":
        from comfy.ldm.wan.vae2_2 import WanVAE
        m = _meta(lambda: WanVAE(dim=160, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                 temperal_downsample=[False, True, True], dropout=0.0))
        _write(path, name, _shapes(m), torch.float16)
    elif name == "ltxv_vae":
        from comfy.ldm.lightricks.vae.causal_video_autoencoder import VideoVAE
        m = _meta(lambda: VideoVAE(version=0, config=LTXV_VAE_CONFIG))
        shapes = _shapes(m)
        _write(path, name, shapes, f32, metadata={"config": json.dumps({"vae": LTXV_VAE_CONFIG})})
    elif name == "clip_vision_h":
        import comfy.clip_model
        cfg_path = Path(comfy.clip_model.__file__).resolve().parent / "clip_vision_config_h.json"
        config = json.loads(cfg_path.read_text())
        m = _meta(lambda: comfy.clip_model.CLIPVisionModelProjection(config, f32, "meta", ops))
        _write(path, name, _shapes(m), torch.float16)
    elif name == "hunyuan_i2v":
        from comfy.ldm.hunyuan_video.model import HunyuanVideo
        m = _meta(lambda: HunyuanVideo(operations=ops, dtype=f32, **HUNYUAN_DIT))
        _write(path, name, _shapes(m), f32)
    elif name == "hunyuan_vae":
        from comfy.ldm.models.autoencoder import AutoencoderKL
        m = _meta(lambda: AutoencoderKL(ddconfig=dict(HUNYUAN_VAE), embed_dim=HUNYUAN_VAE["z_channels"]))
        _write(path, name, _shapes(m), torch.float16)
    else:
        raise KeyError(name)


def main(argv):
    from comfy.cli_args import args  # ComfyUI's args are parsed only by main.py; set what we need by hand
    args.cpu = True
    args.disable_dynamic_vram = True
    root = Path(argv[0])
    root.mkdir(parents=True, exist_ok=True)
    for name in argv[1:]:
        _build(name, root)
        print(f"wrote {model_path(name, root)} ({model_path(name, root).stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main(sys.argv[1:])


def model_folders(files: dict[str, Path]) -> dict[str, list[Path]]:
    """{name: path} from ensure_tiny_models -> {models subfolder: [paths]}, what ComfyHost(models=...) takes."""
    folders: dict[str, list[Path]] = {}
    for name, path in files.items():
        folders.setdefault(MODELS[name][0], []).append(path)
    return folders
