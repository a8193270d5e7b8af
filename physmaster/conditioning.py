"""Append physical tokens to a model's text context (and its attention mask)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import BatchMismatchError, WidthMismatchError


def append_tokens(
    context: torch.Tensor,
    tokens: torch.Tensor,
    strength: float = 1.0,
    attention_mask: torch.Tensor | None = None,
    *,
    what: str = "the conditioning",
    source: str = "the PhysMaster encoder",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return `context` [B, L, D] with `tokens * strength` [B|1, N, D] appended along the sequence axis.

    A batch of 1 on either side is broadcast to the other's batch. `attention_mask` ([B, L], ones for real
    tokens) is extended with ones for the N new tokens. Tokens are cast to the context's dtype and device.
    Strength 0 is *not* special here: callers that want a bypass skip the call (see `PhysMasterApply`).
    """
    if context.ndim != 3:
        raise WidthMismatchError(f"{what} is shaped {list(context.shape)}; expected [batch, length, width]")
    if tokens.ndim != 3:
        raise WidthMismatchError(f"physical tokens are shaped {list(tokens.shape)}; expected [batch, N, width]")
    if tokens.shape[-1] != context.shape[-1]:
        raise WidthMismatchError(
            f"physical tokens are {tokens.shape[-1]} wide ({source}) but {what} is {context.shape[-1]} wide. "
            f"Make the encoder with context width {context.shape[-1]} (PhysMasterEncoderNew) or load one "
            "trained for this model.")
    b, bt = context.shape[0], tokens.shape[0]
    if bt != b:
        if bt == 1:
            tokens = tokens.expand(b, -1, -1)
        elif b == 1:
            context = context.expand(bt, -1, -1)
            if attention_mask is not None and attention_mask.shape[0] == 1:
                attention_mask = attention_mask.expand(bt, *attention_mask.shape[1:])
            b = bt
        else:
            raise BatchMismatchError(
                f"physical tokens have batch {bt} but {what} has batch {b}; one of them must be 1 or both equal. "
                "Encode one start image per conditioning, or batch the images to match.")
    tokens = tokens.to(device=context.device, dtype=context.dtype) * strength
    out = torch.cat([context, tokens], dim=1)
    mask = None
    if attention_mask is not None:
        if attention_mask.shape[-1] != context.shape[1]:
            raise BatchMismatchError(f"attention_mask has length {attention_mask.shape[-1]} but {what} has "
                                     f"{context.shape[1]} tokens")
        if attention_mask.shape[0] != b:
            if attention_mask.shape[0] == 1:
                attention_mask = attention_mask.expand(b, *attention_mask.shape[1:])
            else:
                raise BatchMismatchError(f"attention_mask has batch {attention_mask.shape[0]}, {what} has {b}")
        ones = torch.ones(*attention_mask.shape[:-1], tokens.shape[1], dtype=attention_mask.dtype,
                          device=attention_mask.device)
        mask = torch.cat([attention_mask, ones], dim=-1)
    return out, mask


def strip_tokens(context: torch.Tensor, num_tokens: int,
                 attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Undo `append_tokens`: drop the last `num_tokens` positions (to recompute them with a new head)."""
    if num_tokens <= 0:
        return context, attention_mask
    if context.shape[1] < num_tokens:
        raise BatchMismatchError(f"cannot strip {num_tokens} physical tokens from a context of {context.shape[1]}")
    mask = attention_mask[..., :-num_tokens] if attention_mask is not None else None
    return context[:, :-num_tokens], mask


@dataclass
class PhysTokens:
    """What the PHYSMASTER_TOKENS socket carries: the tokens and what made them.

    `features` are the backbone hidden states the head read (so a trainer or picker can recompute the tokens with
    a new head); `feature` names which hidden states they are (see `physmaster.encoder.select_features`).
    """

    tokens: torch.Tensor  # [B, N, D_ctx]
    encoder_id: str
    features: torch.Tensor  # [B, P, C_in] or [B, K, P, C_in]
    feature: str = "penultimate"

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def width(self) -> int:
        return int(self.tokens.shape[-1])


#: the key under which `apply_to_conditioning` records what it added to a conditioning entry's dict.
RECORD_KEY = "physmaster"


def apply_to_conditioning(conditioning: list, phys: PhysTokens, strength: float, *, what: str = "positive") -> list:
    """Append physical tokens to every entry of a ComfyUI-style conditioning list `[[context, dict], ...]`.

    Returns a new list (inputs are not modified). Each entry's dict is copied; an `attention_mask` is extended;
    the dict records under `physmaster` what was added (token count, encoder id, strength, the backbone features).
    Tokens a previous apply added are replaced, not stacked. Strength 0 returns the input list itself.
    """
    if strength == 0:
        return conditioning
    out = []
    for i, entry in enumerate(conditioning):
        context, extra = entry[0], dict(entry[1])
        mask = extra.get("attention_mask")
        if mask is not None and mask.ndim != 2:
            raise BatchMismatchError(f"the {what} conditioning has an attention_mask shaped {list(mask.shape)}; "
                                     "PhysMasterApply supports [batch, length] masks (Wan, LTX-Video, "
                                     "HunyuanVideo text encoders)")
        previous = extra.get(RECORD_KEY)
        if previous:
            context, mask = strip_tokens(context, int(previous["num_tokens"]), mask)
        label = what if len(conditioning) == 1 else f"{what} (entry {i})"
        context, mask = append_tokens(context, phys.tokens, strength, mask, what=f"the {label} conditioning",
                                      source=f"encoder {phys.encoder_id}")
        if mask is not None:
            extra["attention_mask"] = mask
        extra[RECORD_KEY] = {
            "num_tokens": phys.num_tokens,
            "encoder_id": phys.encoder_id,
            "strength": float(strength),
            "feature": phys.feature,
            "features": phys.features,
        }
        out.append([context, extra])
    return out
