"""peft LoRA linears that multiply through the merged weight `W + s B A` when that costs fewer multiply-adds.

peft computes a LoRA linear *factored*: `x W^T + s (x A^T) B^T`, three matmuls over every token forward and five
backward. That is the right choice for a real video DiT (width d = 5120, rank r = 16: the adapter is a thin
detour), but a small transformer at a large rank, the proxy demo's (d = 96, r = 64), pays more for the detour
than for its own weight, on every sampling step and every training step. Multiplying once through the merged
weight `W + s B A` (built per call: r d_in d_out multiply-adds, autograd carries the gradient to A and B) then
costs one matmul forward and two backward. Core ComfyUI's Train LoRA patches the weight the same way outside its
bypass mode (`comfy/weight_adapter/lora.py`, `LoraDiff`: `w + scale * up @ down`).

`use_merged_weight` decides per call from the multiply-adds of the two ways, for `rows` tokens:

- no gradient to the adapter (sampling; a stage that trains only the head): factored `rows r (d_in + d_out)`
  extra against merged `r d_in d_out`: merged whenever rows > d_in d_out / (d_in + d_out), i.e. almost always.
- the adapter trains: factored forward + backward `3 rows r (d_in + d_out)` extra against merged
  `3 r d_in d_out` (building W + s B A, and its gradient to A and B) + `rows d_in d_out` (the merged weight's own
  gradient): merged for the demo, factored for Wan-sized layers at a usual rank.

The result is the same function up to float rounding (`tests/test_merged_lora.py` holds the velocities to 1e-5 and
every LoRA gradient to 1e-4 of its largest entry). Only
peft's plain `lora.Linear` with one active vanilla adapter, no dropout and the base weight's dtype takes the merged
path; everything else (DoRA, several adapters, quantized bases, adapters off) runs peft's own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def use_merged_weight(rows: int, d_in: int, d_out: int, rank: int, adapter_trains: bool) -> bool:
    """Whether `rows` tokens through a rank-`rank` LoRA on a d_in -> d_out linear cost fewer multiply-adds
    through the merged weight than factored (the module docstring's cost model)."""
    if adapter_trains:
        return 3 * rank * d_in * d_out + rows * d_in * d_out < 3 * rows * rank * (d_in + d_out)
    return rank * d_in * d_out < rows * rank * (d_in + d_out)


def _peft_linear():
    from peft.tuners.lora.layer import Linear

    return Linear


def merged_when_cheaper(model: nn.Module) -> int:
    """Make every plain peft `lora.Linear` in `model` take the merged path when it is cheaper (see the module
    docstring). Idempotent; returns how many layers it covers. Their state dicts, merging and saving are peft's."""
    base_cls = _peft_linear()
    cls = _merged_class()
    n = 0
    for m in model.modules():
        if type(m) is base_cls:
            m.__class__ = cls
        if type(m) is cls:
            n += 1
    return n


_CLASS = None


def _merged_class():
    global _CLASS
    if _CLASS is None:
        _CLASS = type("MergedWhenCheaperLoraLinear", (_peft_linear(),), {"forward": _forward, "__module__": __name__})
    return _CLASS


def _forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    adapter = _plain_adapter(self, x, args, kwargs)
    if adapter is not None:
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        base = self.get_base_layer()
        trains = torch.is_grad_enabled() and (a.requires_grad or b.requires_grad)
        rows = x.numel() // x.shape[-1]
        if use_merged_weight(rows, base.in_features, base.out_features, a.shape[0], trains):
            weight = torch.addmm(base.weight, b, a, alpha=self.scaling[adapter])
            return F.linear(x, weight, base.bias)
    return _peft_linear().forward(self, x, *args, **kwargs)


def _plain_adapter(self, x: torch.Tensor, args, kwargs) -> str | None:
    """The one active vanilla adapter the merged path can compute exactly, or None (peft's forward then)."""
    if args or kwargs or self.disable_adapters or self.merged:
        return None
    active = [a for a in self.active_adapters if a in self.lora_A]
    if len(active) != 1:
        return None
    adapter = active[0]
    if adapter in getattr(self, "lora_variant", {}) or getattr(self, "use_dora", {}).get(adapter):  # DoRA & co.
        return None
    base = self.get_base_layer()
    if (type(base) is not nn.Linear or not isinstance(self.lora_dropout[adapter], nn.Identity)
            or self.lora_B[adapter].bias is not None):
        return None
    if not (x.dtype == base.weight.dtype == self.lora_A[adapter].weight.dtype == self.lora_B[adapter].weight.dtype):
        return None
    return adapter
