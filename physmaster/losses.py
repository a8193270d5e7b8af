"""Training losses: flow matching (Stage I) and Flow-DPO (Stages II and III), as in DESIGN.md section 1.

Flow convention (rectified flow, as Wan): `x_t = (1 - t) x_0 + t ε`, velocity target `v = ε − x_0`.

Squared norms are *per-sample means over the latent elements* (as in Diffusion-DPO's and Flow-DPO's code), so
a loss does not grow with the video's size; β absorbs the scale (β = 500 with mean errors is β ≈ 0.5 per element
summed over a 1000-element latent). Everything is computed in float32 whatever the model's dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .errors import BatchMismatchError, PhysMasterError

__all__ = ["flow_matching_loss", "flow_dpo_loss", "flow_dpo_from_errors", "dpo_error_weights", "DPOOutput",
           "per_sample_sq_error", "check_pair_weights", "LOG2"]

LOG2 = math.log(2.0)


def per_sample_sq_error(pred: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """‖target − pred‖² per sample [B], in float32 (`mean` over elements, or `sum`)."""
    if pred.shape != target.shape:
        raise BatchMismatchError(f"prediction is shaped {list(pred.shape)} but its target {list(target.shape)}")
    err = (target.float() - pred.float()).pow(2).flatten(1)
    if reduction == "mean":
        return err.mean(dim=1)
    if reduction == "sum":
        return err.sum(dim=1)
    raise PhysMasterError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def motion_weights(x0: torch.Tensor, strength: float) -> torch.Tensor:
    """Per-element loss weights [B, 1, T, H, W] (mean 1 per video) that favour what moves: 1 + `strength` ×
    (the latent's distance to its first frame, averaged over channels, over its mean across the video).

    In a physics clip the moving object is a few percent of the latent; with uniform weights the flow-matching
    gradient is mostly the static background's irreducible noise-prediction error, and the object (the one
    thing the physics is about) is learned last and smeared. Up-weighting motion spends the model on it. Only
    the clean latent is read (no masks), so any video dataset can use it."""
    if x0.dim() != 5:
        raise PhysMasterError(f"motion weights need video latents [B, C, T, H, W], got {list(x0.shape)}")
    d = (x0.float() - x0[:, :, :1].float()).abs().mean(1, keepdim=True)
    d = d / d.flatten(1).mean(1).clamp_min(1e-8).view(-1, 1, 1, 1, 1)
    w = 1.0 + float(strength) * d
    return w / w.flatten(1).mean(1).view(-1, 1, 1, 1, 1)


def pair_motion_weights(xw: torch.Tensor, xl: torch.Tensor, strength: float) -> torch.Tensor:
    """Flow-DPO's element weights [B, 1, T, H, W] (mean 1 per pair): `motion_weights` of the winner and of the
    loser, averaged, so both videos' errors are weighed by one map that covers where either moves.

    A preference is about the object (where it is, whether it is whole); the two videos share their start frame
    and mostly their background. With uniform weights the DPO margin is dominated by the background's
    noise-prediction error, which differs between policy and reference by noise only; one shared map keeps the
    comparison of winner and loser on the same elements."""
    if xw.shape != xl.shape:
        raise BatchMismatchError(f"winner and loser latents must have the same shape, got {list(xw.shape)} and "
                                 f"{list(xl.shape)}")
    return 0.5 * (motion_weights(xw, strength) + motion_weights(xl, strength))


def weighted_sq_error(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean squared error [B], each element weighted by `weight` (broadcast; None = plain)."""
    if weight is None:
        return per_sample_sq_error(pred, target)
    if pred.shape != target.shape:
        raise BatchMismatchError(f"prediction is shaped {list(pred.shape)} but its target {list(target.shape)}")
    err = (target.float() - pred.float()).pow(2) * weight.float().to(pred.device)
    return err.flatten(1).mean(dim=1)


def flow_matching_loss(v_pred: torch.Tensor, v_target: torch.Tensor, reduction: str = "mean",
                       weight: torch.Tensor | None = None) -> torch.Tensor:
    """Stage I: `E ‖v_θ(z_t, t, c) − (ε − z_0)‖²` (float32 scalar). `weight` [B] optionally weights samples."""
    err = per_sample_sq_error(v_pred, v_target, reduction)
    if weight is not None:
        return (err * weight.float().to(err.device)).sum() / weight.float().sum().clamp_min(1e-12)
    return err.mean()


@dataclass
class DPOOutput:
    """Flow-DPO loss and what to log. Scalars are 0-d float32 tensors; `per_pair` tensors are [B]."""

    loss: torch.Tensor
    accuracy: torch.Tensor  # fraction of pairs whose implicit reward margin is > 0
    margin: torch.Tensor  # mean implicit reward margin (reward_winner − reward_loser)
    reward_winner: torch.Tensor  # mean −β/2 (‖v^w − v_θ‖² − ‖v^w − v_ref‖²)
    reward_loser: torch.Tensor  # mean −β/2 (‖v^l − v_θ‖² − ‖v^l − v_ref‖²)
    per_pair_margin: torch.Tensor
    per_pair_loss: torch.Tensor

    def logs(self) -> dict[str, float]:
        return {"loss": float(self.loss.detach()), "accuracy": float(self.accuracy), "margin": float(self.margin),
                "reward_winner": float(self.reward_winner), "reward_loser": float(self.reward_loser)}


def flow_dpo_loss(
    v_theta_w: torch.Tensor, v_theta_l: torch.Tensor,
    v_ref_w: torch.Tensor, v_ref_l: torch.Tensor,
    target_w: torch.Tensor, target_l: torch.Tensor,
    beta: float,
    reduction: str = "mean",
    weight: torch.Tensor | None = None,
) -> DPOOutput:
    """Flow-DPO (PhysMaster Eq. 3, constant β):

        L = −log σ(−β/2 · [(‖v^w − v_θ(x^w_t)‖² − ‖v^w − v_ref(x^w_t)‖²) − (‖v^l − v_θ(x^l_t)‖² − ‖v^l − v_ref(x^l_t)‖²)])

    `v_theta_*` / `v_ref_*` are the policy's / reference's velocity predictions on the noisy winner / loser (made
    with the *same* noise and t for both), `target_*` their velocity targets `ε − x_0`. Returns the mean loss
    over pairs and the implicit accuracy and reward margin. The reference predictions are detached.
    `weight` [B] (optional, >= 0) scales each pair's loss: the loss is then `mean(weight * per-pair loss)` (see
    `flow_dpo_from_errors`).
    """
    try:
        beta = float(beta)
    except (TypeError, ValueError):
        raise PhysMasterError(f"Flow-DPO beta must be a number > 0, got {beta!r}") from None
    if not math.isfinite(beta) or beta <= 0:
        raise PhysMasterError(f"Flow-DPO beta must be > 0 (it scales how far the policy may move from the "
                              f"reference; try 500 with mean errors), got {beta!r}")
    if target_w.shape != target_l.shape:
        raise BatchMismatchError(f"winner and loser latents must have the same shape to share noise and t; got "
                                 f"{list(target_w.shape)} and {list(target_l.shape)}")
    err_w = per_sample_sq_error(v_theta_w, target_w, reduction)
    err_l = per_sample_sq_error(v_theta_l, target_l, reduction)
    with torch.no_grad():
        ref_w = per_sample_sq_error(v_ref_w.detach(), target_w, reduction)
        ref_l = per_sample_sq_error(v_ref_l.detach(), target_l, reduction)
    return flow_dpo_from_errors(err_w, err_l, ref_w, ref_l, beta, weight)


def check_pair_weights(weight, batch: int) -> torch.Tensor:
    """`weight` as a float32 [batch] tensor of finite values >= 0, or a PhysMasterError naming what is wrong."""
    if not isinstance(weight, torch.Tensor):
        weight = torch.as_tensor(weight, dtype=torch.float32)
    if weight.ndim != 1 or weight.shape[0] != batch:
        raise BatchMismatchError(f"Flow-DPO pair weights are shaped {list(weight.shape)}; expected one weight per "
                                 f"pair, [{batch}]")
    weight = weight.detach().float()
    if not bool(torch.isfinite(weight).all()) or bool((weight < 0).any()):
        raise PhysMasterError(f"Flow-DPO pair weights must be finite and >= 0, got {weight.tolist()[:8]}; they come "
                              "from the pairs' margins (check the preference dataset's margins)")
    return weight


def flow_dpo_from_errors(err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
                         beta: float, weight: torch.Tensor | None = None, positive: float = 0.0) -> DPOOutput:
    """Flow-DPO from the per-sample squared errors [B] of the policy (`err_*`) and the reference (`ref_*`): the
    loss depends on the model only through `err_w` and `err_l`, which lets a trainer run winner and loser in
    separate passes (see `dpo_error_weights`).

    `weight` [B] (optional): each pair's loss is multiplied by its weight and the batch loss is the plain mean,
    `mean(weight * per_pair)`: with weights normalised to mean 1 over the training set (as
    `training.data.plan_margins` makes them) this is an unbiased estimate of the set's weighted mean loss, and
    weights of 1 give exactly the unweighted loss. The logged accuracy and margins stay unweighted.

    `positive` (lambda >= 0, DPO-Positive, Pal et al. 2024 "Smaug"): `lambda * beta/2 * max(0, err_w - ref_w)` is
    taken from the inside of the sigmoid, so the loss also rises when the policy fits the winner worse than the
    reference does. Plain DPO can widen the gap by making both errors worse, the loser's faster; this term stops it
    from paying for the gap with the winner (0 = the plain loss)."""
    beta = float(beta)
    reward_w = -0.5 * beta * (err_w - ref_w)
    reward_l = -0.5 * beta * (err_l - ref_l)
    inside = reward_w - reward_l
    if positive:
        inside = inside - float(positive) * 0.5 * beta * F.relu(err_w - ref_w)
    per_pair = -F.logsigmoid(inside)
    with torch.no_grad():
        acc = (inside > 0).float().mean()
    if weight is None:
        loss = per_pair.mean()
    else:
        loss = (per_pair * check_pair_weights(weight, per_pair.shape[0]).to(per_pair.device)).mean()
    return DPOOutput(loss=loss, accuracy=acc, margin=inside.detach().mean(),
                     reward_winner=reward_w.detach().mean(), reward_loser=reward_l.detach().mean(),
                     per_pair_margin=inside.detach(), per_pair_loss=per_pair.detach())


def dpo_error_weights(err_w: torch.Tensor, err_l: torch.Tensor, ref_w: torch.Tensor, ref_l: torch.Tensor,
                      beta: float, weight: torch.Tensor | None = None,
                      positive: float = 0.0) -> tuple[DPOOutput, torch.Tensor, torch.Tensor]:
    """The Flow-DPO loss at these errors (all [B], no graph) and its derivatives dL/d err_w, dL/d err_l [B]
    (`weight`: per-pair loss weights, `positive`: DPO-Positive's lambda, as in `flow_dpo_from_errors`).

    Since L depends on the trainable weights only through the policy's errors, backpropagating
    `(weights_w * err_w(θ)).sum()` and `(weights_l * err_l(θ)).sum()` in two separate passes (errors recomputed
    with a graph, one video at a time) gives exactly the gradient of L: winner and loser never need to be in
    memory together."""
    with torch.enable_grad():
        ew = err_w.detach().float().clone().requires_grad_(True)
        el = err_l.detach().float().clone().requires_grad_(True)
        out = flow_dpo_from_errors(ew, el, ref_w.detach().float(), ref_l.detach().float(), beta, weight,
                                   positive)
        gw, gl = torch.autograd.grad(out.loss, (ew, el))
    out.loss = out.loss.detach()
    return out, gw, gl
