"""The one small supervised loop the demo's frozen parts (autoencoder, backbone) are pretrained with."""

from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn


def fit(net: nn.Module, step_loss: Callable[[], torch.Tensor], steps: int, lr: float, weight_decay: float,
        warmup: float, name: str, log=print, digits: int = 4) -> dict:
    """AdamW + one-cycle schedule for `steps` steps of `step_loss()` (which draws its own batch), then freeze
    `net` (eval, no grad). Returns {steps, final_loss, seconds}."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, steps), pct_start=warmup)
    t0 = time.perf_counter()
    loss_v = float("nan")
    for step in range(steps):
        loss = step_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        loss_v = float(loss.detach())
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"  [{name}] {step + 1}/{steps} loss {loss_v:.{digits}f} ({time.perf_counter() - t0:.0f}s)")
    net.eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return {"steps": steps, "final_loss": loss_v, "seconds": time.perf_counter() - t0}
