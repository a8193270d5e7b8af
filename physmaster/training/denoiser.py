"""What a host must provide for the stage loops: the `Denoiser` protocol and the `Conditioning` it consumes.

The trainer (physmaster.training.stages) never touches a model directly. It samples t and ε, asks the denoiser
to noise a clean latent (`add_noise`) and for the velocity target (`velocity_target`), computes the physical
tokens with the PhysHead, appends them to the text context (`Conditioning.with_tokens`, via
`conditioning.append_tokens`) and asks the denoiser for the velocity (`predict_velocity`). It switches the
LoRA off for the Flow-DPO reference of Stage II (`lora_disabled()`), and asks which parameters to train.

Two hosts implement it:
- physmaster.backends.diffusers_wan.WanDenoiser over diffusers' WanTransformer3DModel (predicts velocity);
- the ComfyUI nodes over a ModelPatcher, whose `apply_model` returns the denoised estimate x̂_0: subclass
  `X0Denoiser` and implement `predict_x0`; it converts with `v = (x_t − x̂_0) / t` (exact for rectified flow,
  since x_t − x_0 = t (ε − x_0)).

Time convention: `t` is a float32 tensor [B] in (0, 1], the noise level σ (t = 1 is pure noise). A host whose
network wants another scale (Wan: σ·1000) converts inside `predict_velocity`.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from ..conditioning import append_tokens


@dataclass
class Conditioning:
    """Everything a denoiser is conditioned on, for a batch of B videos (host-neutral).

    context:       [B, L, D] text context (e.g. umT5 hidden states), *without* physical tokens.
    features:      backbone hidden states the PhysHead reads ([B, P, C] or [B, K, P, C]); None = no head.
    image_cond:    host-specific image condition, e.g. Wan I2V's mask + first-frame latent
                   [B, 4 + C, T, H, W], concatenated to the noisy latent along channels by the denoiser.
    image_embeds:  optional image tokens (Wan 2.1 I2V's CLIP-H hidden states), passed as the model wants.
    attention_mask:[B, L] ones for real context tokens, or None.
    extra:         anything else a host needs; tensor values are per-sample ([B, ...]) and batched like the
                   fields above (ComfyUI's model inputs: Wan's c_concat and clip_fea, LTX's ...), other values
                   are passed through untouched.
    num_physical_tokens: how many tokens `with_tokens` appended (0 = none yet).
    """

    context: torch.Tensor
    features: torch.Tensor | None = None
    image_cond: torch.Tensor | None = None
    image_embeds: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    num_physical_tokens: int = 0

    @property
    def batch_size(self) -> int:
        return int(self.context.shape[0])

    def with_tokens(self, tokens: torch.Tensor | None, strength: float = 1.0) -> "Conditioning":
        """A copy whose context has `tokens * strength` appended (see `append_tokens`)."""
        if tokens is None:
            return self
        ctx, mask = append_tokens(self.context, tokens, strength, self.attention_mask,
                                  what="the text context")
        return dataclasses.replace(self, context=ctx, attention_mask=mask,
                                   num_physical_tokens=self.num_physical_tokens + int(tokens.shape[1]))

    def map(self, fn) -> "Conditioning":
        """Apply `fn` to every tensor field (e.g. `lambda x: x.to(device)` or a batch index)."""
        def f(x):
            return fn(x) if isinstance(x, torch.Tensor) else x
        return dataclasses.replace(self, context=f(self.context), features=f(self.features),
                                   image_cond=f(self.image_cond), image_embeds=f(self.image_embeds),
                                   attention_mask=f(self.attention_mask),
                                   extra={k: f(v) for k, v in self.extra.items()})

    def repeat(self, n: int) -> "Conditioning":
        """The batch repeated n times (winner and loser share one conditioning)."""
        return self.map(lambda x: torch.cat([x] * n, dim=0))

    @staticmethod
    def cat(items: list["Conditioning"]) -> "Conditioning":
        """Concatenate conditionings along the batch (same fields present in all)."""
        first = items[0]

        def cat_field(name):
            values = [getattr(c, name) for c in items]
            if any(v is None for v in values):
                if any(v is not None for v in values):
                    raise ValueError(f"cannot batch conditionings where only some have {name}")
                return None
            return torch.cat(values, dim=0)

        extra = dict(first.extra)
        for key, value in first.extra.items():
            if isinstance(value, torch.Tensor):
                values = [c.extra.get(key) for c in items]
                if any(not isinstance(v, torch.Tensor) for v in values):
                    raise ValueError(f"cannot batch conditionings where only some have extra[{key!r}]")
                extra[key] = torch.cat(values, dim=0)
        return dataclasses.replace(first, context=cat_field("context"), features=cat_field("features"),
                                   image_cond=cat_field("image_cond"), image_embeds=cat_field("image_embeds"),
                                   attention_mask=cat_field("attention_mask"), extra=extra)


class Denoiser(abc.ABC):
    """A host's video diffusion model, as the stage loops see it (rectified-flow defaults).

    Must implement: `predict_velocity`, `lora_parameters`, `lora_disabled`, `module`.
    May override: `add_noise` / `velocity_target` (another flow convention), `fold_lora`, `lora_state_dict`,
    `load_lora_state_dict`, `enable_gradient_checkpointing`, `device`, `dtype`.
    """

    # -- the flow convention ------------------------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noisy latent at t: rectified flow `x_t = (1 − t) x_0 + t ε` (t [B] broadcast over the latent)."""
        tt = _expand_t(t, x0)
        return (1 - tt) * x0 + tt * noise

    def velocity_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What `predict_velocity` is trained to output: `v = ε − x_0`."""
        return noise - x0

    # -- the network ----------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Velocity [B, C, T, H, W] for noisy latents x_t at noise levels t [B] given `cond` (whose context
        already carries the physical tokens). Differentiable w.r.t. trainable parameters and `cond.context`."""

    @property
    @abc.abstractmethod
    def module(self) -> nn.Module:
        """The host's network (to freeze it, and to check that no stage copies its weights)."""

    # -- the LoRA -------------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def lora_parameters(self) -> list[nn.Parameter]:
        """The LoRA's parameters (empty if the host has none). The trainer sets their requires_grad."""

    @abc.abstractmethod
    def lora_disabled(self) -> contextlib.AbstractContextManager:
        """A context in which `predict_velocity` runs the network *without* the LoRA (the Stage II reference).
        Must not copy weights."""

    def fold_lora(self, seed: int = 0) -> None:
        """Fold the LoRA's current delta into the base weights and restart the LoRA at zero delta, so that the
        model is unchanged and `lora_disabled()` now gives this model (used between stages). Hosts that cannot
        do this raise NotImplementedError; ComfyUI users apply the LoRA with LoraLoaderModelOnly instead."""
        raise NotImplementedError(f"{type(self).__name__} cannot fold its LoRA into the base weights")

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_lora_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state:
            raise NotImplementedError(f"{type(self).__name__} cannot load LoRA weights")

    # -- resources ------------------------------------------------------------------------------------------------
    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute activations in backward (less memory, ~30% more time). Default: not supported, no-op."""

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype


class X0Denoiser(Denoiser):
    """For hosts whose network returns the denoised estimate x̂_0 (ComfyUI's `BaseModel.apply_model`).

    Implement `predict_x0`; `predict_velocity` converts with `v = (x_t − x̂_0) / t` in float32. t is clamped
    at `min_t` to avoid dividing by zero (the trainer never samples t below it)."""

    min_t: float = 1e-3

    @abc.abstractmethod
    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The denoised estimate x̂_0 for x_t at noise level t."""

    def predict_velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        x0_hat = self.predict_x0(x_t, t, cond)
        return velocity_from_x0(x_t, x0_hat, t, self.min_t)


def velocity_from_x0(x_t: torch.Tensor, x0_hat: torch.Tensor, t: torch.Tensor, min_t: float = 1e-3) -> torch.Tensor:
    """`v = (x_t − x̂_0) / t` (rectified flow), float32."""
    tt = _expand_t(t.float().clamp_min(min_t), x_t)
    return (x_t.float() - x0_hat.float()) / tt


def _expand_t(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=like.device)
    if t.ndim == 0:
        t = t.expand(like.shape[0])
    return t.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


@contextlib.contextmanager
def no_lora_context() -> Iterator[None]:
    """A do-nothing context, for denoisers without a LoRA."""
    yield
