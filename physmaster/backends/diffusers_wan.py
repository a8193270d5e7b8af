"""The Denoiser protocol over diffusers' `WanTransformer3DModel` (Wan 2.1 / 2.2 I2V and T2V transformers).

- Flow convention: rectified flow, the network predicts the velocity `ε − x_0` at timestep `1000 · t` (as
  diffusers' WanImageToVideoPipeline with FlowMatchEulerDiscreteScheduler).
- I2V image conditioning like Wan I2V: the noisy latent [B, C, T, H, W] is concatenated along channels with
  `image_cond` = [mask (4 channels), first-frame latent (C channels)], so the transformer's
  `in_channels = 2·C + 4` (36 for Wan's C = 16). Wan's VAE folds 4 frames into each latent frame, hence its 4
  mask channels; `make_i2v_condition` builds them for latents without temporal compression (the pixel "latent"
  of the proxy demo) by setting all 4 mask channels of the first latent frame. `image_embeds` (Wan 2.1's CLIP-H
  tokens) are passed as `encoder_hidden_states_image` when the model has an image embedder.
- Text context [B, L, text_dim] (4096 for umT5) with the physical tokens appended (text_dim wide).
- LoRA through diffusers' peft integration (`add_adapter(LoraConfig)`); the reference of Stage II is the same
  transformer under `disable_adapters()`, never a copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import CheckpointError, PhysMasterError, WidthMismatchError
from ..fileio import atomic_path
from ..training.denoiser import Conditioning, Denoiser
from .merged_lora import merged_when_cheaper

ADAPTER = "physmaster"
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


class LoraTargetError(PhysMasterError):
    """LoRA target module names that match nothing in the model."""


def tiny_wan_config(latent_channels: int = 4, text_dim: int = 32, *, num_layers: int = 2, heads: int = 2,
                    head_dim: int = 12, ffn_dim: int = 64, patch_size: Sequence[int] = (1, 2, 2),
                    i2v: bool = True, rope_max_seq_len: int = 64, image_dim: int | None = None) -> dict:
    """A small WanTransformer3DModel config (tests, demo). `head_dim` must be a multiple of 6 (Wan's 3D RoPE)."""
    return dict(patch_size=tuple(int(p) for p in patch_size), num_attention_heads=heads, attention_head_dim=head_dim,
                in_channels=(2 * latent_channels + 4) if i2v else latent_channels, out_channels=latent_channels,
                text_dim=text_dim, freq_dim=32, ffn_dim=ffn_dim, num_layers=num_layers, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=image_dim,
                added_kv_proj_dim=(heads * head_dim) if image_dim else None, rope_max_seq_len=rope_max_seq_len)


def make_tiny_wan(seed: int = 0, **kwargs) -> nn.Module:
    """A randomly initialised tiny WanTransformer3DModel; weights depend only on the config and seed."""
    from diffusers import WanTransformer3DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return WanTransformer3DModel(**tiny_wan_config(**kwargs))


def load_wan_transformer(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu") -> nn.Module:
    """Load a WanTransformer3DModel from a local folder (config.json + *.safetensors, as `save_pretrained`
    writes it, or a Wan-Diffusers repo's `transformer/` subfolder, or the repo root), or from one `.safetensors`
    file in the original Wan layout, as ComfyUI's models/diffusion_models holds it (`load_wan_single_file`)."""
    from diffusers import WanTransformer3DModel

    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return load_wan_single_file(path, dtype, device)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer"
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a diffusers transformer folder (no config.json). Pass the folder that "
                              "holds the WanTransformer3DModel's config.json and .safetensors weights (e.g. "
                              "Wan2.1-I2V-14B-480P-Diffusers/transformer).")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path / 'config.json'} cannot be read ({e})") from None
    cls_name = config.get("_class_name", "WanTransformer3DModel")
    if cls_name != "WanTransformer3DModel":
        raise CheckpointError(f"{path} holds a {cls_name}, not a WanTransformer3DModel")
    if not any(path.glob("*.safetensors")):
        raise CheckpointError(f"{path} has no .safetensors weights (only safetensors are loaded, never pickles)")
    try:
        model = WanTransformer3DModel.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True,
                                                      local_files_only=True)
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the Wan transformer from {path}: {e}") from None
    return model.to(device)


#: original Wan (and ComfyUI) module names -> diffusers' WanTransformer3DModel names, for the modules a LoRA may
#: target (the same renames as diffusers' `convert_wan_transformer_to_diffusers`; checked against it in the tests)
_ORIGINAL_TO_DIFFUSERS = (
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("head.head", "proj_out"),
)
_BLOCK_TO_DIFFUSERS = (
    ("self_attn.q", "attn1.to_q"), ("self_attn.k", "attn1.to_k"), ("self_attn.v", "attn1.to_v"),
    ("self_attn.o", "attn1.to_out.0"), ("cross_attn.q", "attn2.to_q"), ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"), ("cross_attn.o", "attn2.to_out.0"), ("cross_attn.k_img", "attn2.add_k_proj"),
    ("cross_attn.v_img", "attn2.add_v_proj"), ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
)
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)")


def original_module_name(name: str) -> str | None:
    """The original Wan / ComfyUI name of a diffusers WanTransformer3DModel Linear module ('blocks.0.attn1.to_q'
    -> 'blocks.0.self_attn.q'); None for a module that has no counterpart there."""
    m = _BLOCK.fullmatch(name)
    if m:
        return next((f"blocks.{m.group(1)}.{o}" for o, d in _BLOCK_TO_DIFFUSERS if d == m.group(2)), None)
    return next((o for o, d in _ORIGINAL_TO_DIFFUSERS if d == name), None)


def diffusers_module_name(name: str) -> str | None:
    """The inverse of `original_module_name`."""
    m = _BLOCK.fullmatch(name)
    if m:
        return next((f"blocks.{m.group(1)}.{d}" for o, d in _BLOCK_TO_DIFFUSERS if o == m.group(2)), None)
    return next((d for o, d in _ORIGINAL_TO_DIFFUSERS if o == name), None)


def wan_config_from_original(shapes: dict[str, Sequence[int]], where: str = "the checkpoint") -> dict:
    """A WanTransformer3DModel config read from the tensor shapes of an original-layout Wan checkpoint (keys
    without a 'model.diffusion_model.' prefix). The head count is not in the weights: like ComfyUI, dim // 128
    (every released Wan model has 128-wide heads)."""
    need = ("patch_embedding.weight", "head.head.weight", "blocks.0.ffn.0.weight", "time_embedding.0.weight",
            "text_embedding.0.weight")
    missing = [k for k in need if k not in shapes]
    if missing:
        raise CheckpointError(f"{where} is not a Wan 2.1/2.2 diffusion model in the original (ComfyUI) layout: no "
                              f"{', '.join(missing[:3])}. Pass a diffusers transformer folder or a Wan file from "
                              "ComfyUI's models/diffusion_models.")
    pe = list(shapes["patch_embedding.weight"])
    dim, in_channels, patch = int(pe[0]), int(pe[1]), tuple(int(p) for p in pe[2:])
    n_patch = 1
    for p in patch:
        n_patch *= p
    if dim % 128:
        raise CheckpointError(f"{where} is {dim} wide, not a multiple of Wan's 128-wide attention heads")
    layers = 1 + max(int(m.group(1)) for k in shapes if (m := _BLOCK.fullmatch(k)))
    image_dim = int(shapes["img_emb.proj.1.weight"][1]) if "img_emb.proj.1.weight" in shapes else None
    pos = shapes.get("img_emb.emb_pos")
    return dict(patch_size=patch, num_attention_heads=dim // 128, attention_head_dim=128, in_channels=in_channels,
                out_channels=int(shapes["head.head.weight"][0]) // n_patch,
                text_dim=int(shapes["text_embedding.0.weight"][1]), freq_dim=int(shapes["time_embedding.0.weight"][1]),
                ffn_dim=int(shapes["blocks.0.ffn.0.weight"][0]), num_layers=layers,
                cross_attn_norm="blocks.0.norm3.weight" in shapes,
                qk_norm="rms_norm_across_heads" if "blocks.0.self_attn.norm_q.weight" in shapes else None,
                eps=1e-6, image_dim=image_dim, added_kv_proj_dim=dim if image_dim else None,
                pos_embed_seq_len=int(pos[1]) if pos is not None else None)


def load_wan_single_file(path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                         device: str | torch.device = "cpu") -> nn.Module:
    """A WanTransformer3DModel from one original-layout Wan `.safetensors` (the file ComfyUI's UNETLoader loads
    from models/diffusion_models): the config from the weight shapes, the weights renamed by diffusers'
    `convert_wan_transformer_to_diffusers` and loaded strictly (every weight used, none missing)."""
    from accelerate import init_empty_weights
    from diffusers import WanTransformer3DModel
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            prefix = next((p for p in ("model.diffusion_model.", "diffusion_model.")
                           if any(k.startswith(p) for k in f.keys())), "")
            shapes = {k[len(prefix):]: f.get_slice(k).get_shape() for k in f.keys() if k.startswith(prefix)}
            config = wan_config_from_original(shapes, str(path))
            state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable .safetensors file ({e})") from None
    if any(k.endswith(("scale_weight", "scale_input")) for k in state):
        raise CheckpointError(f"{path} is an fp8-scaled checkpoint; train on the bf16/fp16/fp32 file of the model")
    state = convert_wan_transformer_to_diffusers(state)
    with init_empty_weights():
        model = WanTransformer3DModel(**config)
    try:
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path} does not match a Wan transformer of the shape its weights imply ({e}). "
                              "Only Wan 2.1/2.2 T2V/I2V models are supported by this backend.") from None
    return model.to(device=device, dtype=dtype)


def make_i2v_condition(first_frame_latent: torch.Tensor, num_frames: int, mask_channels: int = 4) -> torch.Tensor:
    """Wan-I2V-style image condition for a latent video of `num_frames` frames without temporal compression:
    [mask (mask_channels: 1 on frame 0, else 0), first-frame latent on frame 0 and zeros after] -> [B, 4+C, T, H, W].
    """
    if first_frame_latent.ndim != 4:
        raise WidthMismatchError(f"first-frame latent must be [B, C, H, W], got {list(first_frame_latent.shape)}")
    b, c, h, w = first_frame_latent.shape
    mask = first_frame_latent.new_zeros(b, mask_channels, num_frames, h, w)
    mask[:, :, 0] = 1
    lat = first_frame_latent.new_zeros(b, c, num_frames, h, w)
    lat[:, :, 0] = first_frame_latent
    return torch.cat([mask, lat], dim=1)


def linear_module_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def check_lora_targets(model: nn.Module, targets: Sequence[str] | str) -> list[str]:
    """The Linear modules `targets` select (peft's rules: a string is a regex on the full name; a list entry
    matches a name equal to it or ending in '.' + it). Raises LoraTargetError naming what exists when none do."""
    names = linear_module_names(model)
    if isinstance(targets, str):
        hits = [n for n in names if re.fullmatch(targets, n)]
        missing = [] if hits else [targets]
    else:
        hits, missing = [], []
        for t in targets:
            h = [n for n in names if n == t or n.endswith("." + t)]
            hits.extend(h)
            if not h:
                missing.append(t)
    if not hits or missing:
        suffixes = sorted({n.split(".", 2)[-1] if n.startswith("blocks.") else n for n in names
                           if "lora_" not in n and not n.endswith("base_layer")})
        raise LoraTargetError(
            f"LoRA targets {list(missing) if missing else targets} match no Linear module of "
            f"{type(model).__name__}. Modules that exist include: {', '.join(suffixes[:16])}"
            f"{' ...' if len(suffixes) > 16 else ''}")
    return sorted(set(hits))


class WanDenoiser(Denoiser):
    """`Denoiser` over a diffusers WanTransformer3DModel (velocity prediction, timestep = 1000·t)."""

    def __init__(self, model: nn.Module, timestep_scale: float = 1000.0):
        self.model = model
        self.timestep_scale = float(timestep_scale)
        self.lora_config: dict | None = None

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32,
                        device: str | torch.device = "cpu") -> "WanDenoiser":
        return cls(load_wan_transformer(path, dtype, device))

    # -- protocol ---------------------------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        return self.model

    @property
    def latent_channels(self) -> int:
        return int(self.model.config.out_channels)

    @property
    def context_dim(self) -> int:
        return int(self.model.config.text_dim)

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        cfg = self.model.config
        dtype = self.dtype
        x = x_t
        if cond.image_cond is not None:
            if cond.image_cond.shape[0] != x.shape[0] or cond.image_cond.shape[2:] != x.shape[2:]:
                raise WidthMismatchError(f"image condition {list(cond.image_cond.shape)} does not match the latent "
                                         f"{list(x.shape)} in batch, frames or size")
            x = torch.cat([x, cond.image_cond.to(x.dtype)], dim=1)
        if x.shape[1] != cfg.in_channels:
            raise WidthMismatchError(
                f"the Wan transformer takes {cfg.in_channels} input channels but got {x.shape[1]} "
                f"(latent {x_t.shape[1]} + image condition "
                f"{0 if cond.image_cond is None else cond.image_cond.shape[1]}). An I2V model needs the mask + "
                "first-frame latent condition (make_i2v_condition); a T2V model needs none.")
        if cond.context.shape[-1] != cfg.text_dim:
            raise WidthMismatchError(f"text context is {cond.context.shape[-1]} wide but the transformer's text_dim "
                                     f"is {cfg.text_dim}")
        t = torch.as_tensor(t, device=x.device).float()
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        image = cond.image_embeds.to(dtype) if (cond.image_embeds is not None and cfg.image_dim) else None
        out = self.model(hidden_states=x.to(dtype), timestep=t * self.timestep_scale,
                         encoder_hidden_states=cond.context.to(dtype), encoder_hidden_states_image=image,
                         return_dict=False)[0]
        return out

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        if enabled:
            self.model.enable_gradient_checkpointing()
        else:
            self.model.disable_gradient_checkpointing()

    # -- LoRA (diffusers' peft integration) -----------------------------------------------------------------------
    @property
    def has_lora(self) -> bool:
        return bool(getattr(self.model, "_hf_peft_config_loaded", False)) and ADAPTER in getattr(
            self.model, "peft_config", {})

    def add_lora(self, rank: int = 8, alpha: float | None = None,
                 targets: Sequence[str] | str = DEFAULT_LORA_TARGETS, seed: int = 0) -> None:
        """Attach a fresh LoRA (zero delta: B = 0) to the transformer. `targets` as in peft's `target_modules`."""
        from peft import LoraConfig

        if self.has_lora:
            raise PhysMasterError("this transformer already has a PhysMaster LoRA")
        if int(rank) < 1:
            raise PhysMasterError(f"LoRA rank must be >= 1, got {rank}")
        targets = list(targets) if not isinstance(targets, str) else targets
        check_lora_targets(self.model, targets)
        alpha = float(rank if alpha is None else alpha)
        config = LoraConfig(r=int(rank), lora_alpha=alpha, target_modules=targets, init_lora_weights=True)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.model.add_adapter(config, adapter_name=ADAPTER)
        merged_when_cheaper(self.model)  # the demo's rank-64 LoRA: 0.69x a Stage I step's time, 0.62x sampling's
        self.lora_config = {"rank": int(rank), "alpha": alpha, "targets": targets}

    def lora_parameters(self) -> list[nn.Parameter]:
        if not self.has_lora:
            return []
        return [p for n, p in self.model.named_parameters() if "lora_" in n]

    def named_lora_parameters(self) -> list[tuple[str, nn.Parameter]]:
        if not self.has_lora:
            return []
        return [(n, p) for n, p in self.model.named_parameters() if "lora_" in n]

    @contextlib.contextmanager
    def lora_disabled(self) -> Iterator[None]:
        if not self.has_lora:
            yield
            return
        self.model.disable_adapters()
        try:
            yield
        finally:
            self.model.enable_adapters()

    def set_lora_enabled(self, enabled: bool) -> None:
        if self.has_lora:
            (self.model.enable_adapters if enabled else self.model.disable_adapters)()

    @torch.no_grad()
    def fold_lora(self, seed: int = 0) -> None:
        """Add each LoRA layer's delta to its base weight in place, then restart the LoRA (A random, B = 0)."""
        from peft.tuners.lora import LoraLayer

        if not self.has_lora:
            return
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            for _, m in self.model.named_modules():
                if isinstance(m, LoraLayer) and ADAPTER in m.lora_A:
                    base = m.get_base_layer()
                    base.weight.add_(m.get_delta_weight(ADAPTER).to(base.weight.dtype))
                    m.reset_lora_parameters(ADAPTER, True)

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.named_lora_parameters()}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.named_lora_parameters())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointError(f"LoRA weights do not match this model's LoRA: missing {missing[:4]}, "
                                  f"unexpected {unexpected[:4]}")
        with torch.no_grad():
            for n, p in own.items():
                if state[n].shape != p.shape:
                    raise CheckpointError(f"LoRA weight {n} is {list(state[n].shape)}, the model's {list(p.shape)}")
                p.copy_(state[n])

    def save_lora(self, path: str | os.PathLike, metadata: dict | None = None) -> Path:
        """Write the LoRA, atomically, in the original Wan key layout that ComfyUI's LoraLoaderModelOnly reads
        (`diffusion_model.blocks.0.self_attn.q.lora_A.weight`, `...lora_B.weight`, `....alpha`) and diffusers'
        Wan pipelines convert on `load_lora_weights`; `physmaster.lora` metadata (rank, alpha, targets) lets
        `load_lora` rebuild the adapter."""
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        if not self.has_lora:
            raise PhysMasterError("this transformer has no PhysMaster LoRA to save")
        sd = get_peft_model_state_dict(self.model, adapter_name=ADAPTER)
        alpha = float((self.lora_config or {}).get("alpha") or self.model.peft_config[ADAPTER].lora_alpha)
        tensors: dict[str, torch.Tensor] = {}
        unmapped = []
        for k, v in sd.items():
            module, _, leaf = k.partition(".lora_")
            original = original_module_name(module)
            if original is None:
                unmapped.append(module)
                continue
            tensors[f"diffusion_model.{original}.lora_{leaf}"] = v.detach().to("cpu").contiguous()
            tensors[f"diffusion_model.{original}.alpha"] = torch.tensor(alpha)
        if unmapped:
            raise PhysMasterError(f"the LoRA targets {sorted(set(unmapped))[:4]}, which have no counterpart in "
                                  "ComfyUI's Wan model; target attention/feed-forward modules (e.g. "
                                  "to_q,to_k,to_v,to_out.0)")
        meta = {"format": "pt", "physmaster.lora": json.dumps(self.lora_config or {}, sort_keys=True)}
        for k, v in (metadata or {}).items():
            meta[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    def load_lora(self, path: str | os.PathLike) -> None:
        """Load a LoRA written by `save_lora` (or by an earlier version, in diffusers' `transformer.` layout); adds
        the adapter if the model has none yet."""
        from peft.utils import set_peft_model_state_dict
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            tensors = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable LoRA .safetensors file ({e})") from None
        info = json.loads(meta.get("physmaster.lora", "{}"))
        if not self.has_lora:
            if not info:
                raise CheckpointError(f"{path.name} was not written by PhysMaster (no physmaster.lora metadata)")
            self.add_lora(info["rank"], info["alpha"], info["targets"])
        sd = {}
        for k, v in tensors.items():
            if k.startswith("diffusion_model."):
                if k.endswith(".alpha"):
                    continue
                module, _, leaf = k[len("diffusion_model."):].partition(".lora_")
                name = diffusers_module_name(module)
                if name is None:
                    raise CheckpointError(f"{path.name} holds a LoRA for {module}, which this backend cannot map")
                sd[f"{name}.lora_{leaf}"] = v
            else:
                sd[k[len("transformer."):] if k.startswith("transformer.") else k] = v
        result = set_peft_model_state_dict(self.model, sd, adapter_name=ADAPTER)
        unexpected = list(getattr(result, "unexpected_keys", []) or [])
        if unexpected:
            raise CheckpointError(f"{path.name} does not fit this model's LoRA (unexpected {unexpected[:3]})")
