"""Memory accounting for training on a ComfyUI model: a meta-device pass of the host's own diffusion model (its
real blocks, at the training's latent and context shape) gives an ActivationProfile; physmaster.memory turns it
into the peak of a training step for a stage and its memory options. Nothing is allocated: the weights are
swapped for meta tensors of the same shape for the pass (torch.func.functional_call), attention is counted as
the fused kernels that train (they keep q, k, v, the output and a float32 log-sum-exp per query, never the
attention matrix).

Supported: the Wan family (WanModel: Wan 2.1 T2V/I2V, Wan 2.2). Other models get a weights-only line.
"""

from __future__ import annotations

import torch

from ..physmaster.memory import (ActivationProfile, MemoryEstimate, TrainingPlan, estimate_training,
                                 profile_activations)


class _MetaAttention(torch.autograd.Function):
    """Attention as far as memory goes: an output shaped like q, saving q, k, v, out and the LSE (fused kernels:
    PyTorch SDPA, flash, sage, xformers) or, with `probs`, also the softmax probabilities [B, H, Lq, Lk] (what
    ComfyUI's split / sub-quadratic / basic attention, its choice on a CPU, keeps for backward)."""

    @staticmethod
    def forward(ctx, q, k, v, heads, probs):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[0], heads, q.shape[1], dtype=torch.float32, device=q.device)
        kept = [q, k, v, out, lse]
        if probs:
            kept.append(torch.empty(q.shape[0], heads, q.shape[1], k.shape[1], dtype=q.dtype, device=q.device))
        ctx.save_for_backward(*kept)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v = ctx.saved_tensors[:3]
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), None, None


def _fused_attention() -> bool:
    import comfy.ldm.modules.attention as attention

    return getattr(attention.optimized_attention, "__name__", "") in (
        "attention_pytorch", "attention_flash", "attention_sage", "attention_xformers")


def _meta_attention(fused: bool):
    def attention(func, q, k, v, heads, *args, skip_reshape=False, skip_output_reshape=False, **kwargs):
        if skip_reshape:  # [B, H, L, d] -> [B, L, H*d]
            q, k, v = (t.transpose(1, 2).flatten(2) for t in (q, k, v))
        out = _MetaAttention.apply(q, k, v, heads, not fused)
        if skip_output_reshape:
            return out.unflatten(2, (heads, -1)).transpose(1, 2)
        return out
    return attention


def supports(diffusion_model) -> bool:
    return all(hasattr(diffusion_model, a) for a in ("blocks", "patch_embedding", "text_embedding", "rope_encode"))


def weight_stats(diffusion_model) -> tuple[int, int]:
    """(all weights' bytes as stored, the largest one's bytes)."""
    sizes = [p.numel() * p.element_size() for p in diffusion_model.parameters()]
    return sum(sizes), max(sizes, default=0)


def wan_profile(diffusion_model, latent_shape, context_tokens: int, dtype: torch.dtype,
                fused_attention: bool | None = None) -> ActivationProfile:
    """ActivationProfile of a Wan DiT for one video [C, T, H, W] with `context_tokens` text (+ physical) tokens,
    computing in `dtype`. `fused_attention`: count attention as a fused kernel (a GPU's SDPA / flash / sage) or
    as ComfyUI's split attention; None = what this host uses."""
    fused = _fused_attention() if fused_attention is None else bool(fused_attention)
    import comfy.model_management

    was = comfy.model_management.in_training
    comfy.model_management.in_training = True  # the code path training takes (e.g. Wan's differentiable rope)
    try:
        with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode, where autograd records nothing
            return _wan_profile(diffusion_model, latent_shape, context_tokens, dtype, fused)
    finally:
        comfy.model_management.in_training = was


def _wan_profile(diffusion_model, latent_shape, context_tokens: int, dtype: torch.dtype,
                 fused: bool) -> ActivationProfile:
    dm = diffusion_model
    in_ch = int(dm.patch_embedding.in_channels)
    text_dim = int(next(p for p in dm.text_embedding.parameters() if p.ndim == 2).shape[1])
    _, t, h, w = (int(x) for x in latent_shape)
    img_emb = getattr(dm, "img_emb", None)
    clip_width = int(next(img_emb.parameters()).shape[0]) if img_emb is not None else None
    meta = {}
    for name, p in list(dm.named_parameters()) + list(dm.named_buffers()):
        dt = dtype if p.is_floating_point() else p.dtype
        meta[name] = torch.empty(p.shape, dtype=dt, device="meta")
    ps = dm.patch_size
    tokens = ((t + ps[0] - 1) // ps[0]) * ((h + ps[1] - 1) // ps[1]) * ((w + ps[2] - 1) // ps[2])

    def forward():
        x = torch.empty(1, in_ch, t, h, w, dtype=dtype, device="meta", requires_grad=True)
        ts = torch.empty(1, dtype=torch.float32, device="meta")
        ctx = torch.empty(1, int(context_tokens), text_dim, dtype=dtype, device="meta", requires_grad=True)
        kwargs = {"transformer_options": {"optimized_attention_override": _meta_attention(fused)}}
        if clip_width is not None:
            kwargs["clip_fea"] = torch.empty(1, 257, clip_width, dtype=dtype, device="meta")
        return torch.func.functional_call(dm, meta, (x, ts, ctx), kwargs, strict=False)

    return profile_activations(forward, list(dm.blocks), exclude=list(meta.values()), tokens=tokens)


def estimate(diffusion_model, latent_shape, context_tokens: int, plan: TrainingPlan, *, dtype: torch.dtype,
             trainable_params: int, lora_params: int = 0, available: int | None = None,
             profile: ActivationProfile | None = None) -> MemoryEstimate | None:
    """The peak device memory of a training step on this model (None when the family is not supported)."""
    if profile is None:
        if not supports(diffusion_model):
            return None
        profile = wan_profile(diffusion_model, latent_shape, context_tokens, dtype)
    weights, largest = weight_stats(diffusion_model)
    stored = {p.dtype for p in diffusion_model.parameters() if p.is_floating_point()}
    cast = any(d != dtype for d in stored)
    largest_cast = largest * torch.empty((), dtype=dtype).element_size() // max(
        1, min((torch.empty((), dtype=d).element_size() for d in stored), default=1))
    return estimate_training(profile, plan, weights=weights, largest_weight=largest_cast,
                             trainable_params=trainable_params, cast=cast, lora_params=lora_params,
                             available=available)


def lora_parameter_count(diffusion_model, rank: int) -> int:
    """Parameters of a rank-`rank` LoRA on every 2-D weight inside the transformer blocks (see add_lora)."""
    n = 0
    for name, module in diffusion_model.named_modules():
        weight = getattr(module, "weight", None)
        if "blocks." in f"diffusion_model.{name}" and hasattr(module, "weight_function") and weight is not None \
                and weight.ndim == 2:
            n += rank * (int(weight.shape[0]) + int(weight.shape[1]))
    return n
