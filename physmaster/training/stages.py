"""The three PhysMaster training stages over any `Denoiser`.

| stage      | trains                  | loss          | reference                                            |
|------------|-------------------------|---------------|------------------------------------------------------|
| `sft`      | PhysHead + DiT LoRA     | flow matching | —                                                    |
| `dpo-lora` | DiT LoRA                | Flow-DPO      | the same DiT under `denoiser.lora_disabled()`        |
| `dpo-head` | PhysHead                | Flow-DPO      | a frozen copy of the head (small); DiT + LoRA frozen |

No stage copies the DiT's weights. For `dpo-lora` the reference must be the model *before* the stage, so a
LoRA trained in an earlier stage is folded into the base first (`denoiser.fold_lora()`, done by the caller:
see `physmaster.demo` / `physmaster.train_cli`), or applied as merged weights by the host.

Reproducible: the data order, t and ε of step k depend only on (seed, k), so a run resumed from a checkpoint
gives bit-identical weights to an uninterrupted one. Checkpoints (every `checkpoint_every` steps, at the end,
and when a non-finite loss stops the run) are one safetensors file (trainable weights, the optimizer's state,
the reference head) with JSON metadata, written atomically; an interrupted run loses at most
`checkpoint_every` steps. A non-finite loss or gradient stops the run before the optimizer step, so the
weights stay the last good ones.

Data parallel (`accelerator=`, Hugging Face accelerate: DDP over N processes): step k's *global* batch of
B = batch_size × processes × grad_accum items, its t and its ε are drawn exactly as one process drawing B would
draw them; process r's micro-batch m is the slice [(m·N + r)·b, (m·N + r + 1)·b) (disjoint shards), DDP averages
the gradients, so N processes × batch b follow the trajectory of 1 process × batch N·b (to float rounding). The
fingerprint holds B, not the per-process batch: a run may resume with another process count of the same B. Only
the main process writes checkpoints; a non-finite loss on any process stops every process at the same step.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..encoder import PhysEncoder
from ..errors import CheckpointError, PhysMasterError
from ..fileio import atomic_path
from ..losses import dpo_error_weights, flow_dpo_from_errors, motion_weights, pair_motion_weights, weighted_sq_error
from ..memory import saved_on_cpu
from .data import MARGIN_USES, MarginPlan, PreferenceSet, VideoSet, plan_margins
from .denoiser import Conditioning, Denoiser

STAGES = ("sft", "dpo-lora", "dpo-head")
CHECKPOINT_NAME = "physmaster_train_state.safetensors"
CHECKPOINT_FORMAT = 1

Callback = Callable[[int, int, dict], Any]


class TrainingError(PhysMasterError):
    """A training run that cannot start or continue (bad setup, mismatched resume file)."""


def lora_module_parts(spec: str) -> list[str]:
    """`TrainConfig.lora_modules` ("attn2, ffn") as its name parts (["attn2", "ffn"]; "" -> [] = every layer)."""
    return [x.strip() for x in spec.split(",") if x.strip()]


def in_lora_parts(name: str, parts) -> bool:
    """Whether a LoRA parameter name is one `lora_modules`' parts select (a part is a substring of the name)."""
    return any(x in name for x in parts)


def unmatched_lora_parts(spec: str, names) -> list[str]:
    """The parts of `lora_modules` that are in none of these LoRA parameter names (a typo; [] when all match)."""
    names = list(names)
    return [x for x in lora_module_parts(spec) if not any(in_lora_parts(n, [x]) for n in names)]


@dataclass
class TrainConfig:
    """Hyper-parameters of one stage. Fields in `TRAJECTORY_FIELDS` must match to resume a checkpoint."""

    steps: int = 100
    lr: float = 1e-4
    batch_size: int = 1
    seed: int = 0
    beta: float = 500.0  # Flow-DPO β (mean squared errors per element, see physmaster.losses)
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max gradient norm (0 = off)
    warmup_steps: int = 0
    t_min: float = 0.001
    t_max: float = 1.0
    t_sampling: str = "uniform"  # or "logit_normal" (SD3/Wan training)
    shift: float = 1.0  # timestep shift t' = s t / (1 + (s − 1) t), as Wan's schedulers (1 = none)
    token_strength: float = 1.0
    token_dropout: float = 0.0  # Stage I: fraction of samples whose physical tokens are zeroed (seeded per step)
    # up-weight the loss where the latent moves (losses.motion_weights; 0 = off). Stage I: each video's own map;
    # Flow-DPO: one map per pair (losses.pair_motion_weights), for the winner's and the loser's errors alike
    motion_weight: float = 0.0
    checkpoint_every: int = 0  # 0 = only at the end
    gradient_checkpointing: bool = False
    grad_accum: int = 1  # micro-batches per optimizer step (each of batch_size per process)
    # memory (the same gradient, less memory): one video per pass with gradient accumulation (Flow-DPO: the
    # policy's errors from a pass without a graph, then one pass with a graph per video), and what autograd
    # keeps for backward held in CPU memory (see physmaster.memory.saved_on_cpu)
    split_passes: bool = False
    activations_on_cpu: bool = False
    # Flow-DPO: how the pairs' margins are used (physmaster.training.data.plan_margins): "ignore" (every pair
    # weighs 1, the paper's loss), "weight" (each pair's loss scaled by its margin, normalised to mean 1 per
    # source), "filter" (judge pairs with margin < min_margin dropped), "filter and weight"
    margin_use: str = "ignore"
    min_margin: float = 0.0
    # Flow-DPO on the LoRA (Stage II): this weight times the mean squared difference between the policy's and the
    # reference's velocities on the trainer's `anchor` videos (noised at a drawn t) is added to the loss, so the
    # LoRA keeps the reference's predictions on looks its pairs do not show (prior preservation; 0 = off)
    anchor_weight: float = 0.0
    # the LoRA layers a stage trains, as comma-separated parts of their parameters' names (e.g. "attn1" for a Wan
    # DiT's self-attention); the rest of the LoRA stays as it is. "" = every LoRA layer
    lora_modules: str = ""
    # Flow-DPO: DPO-Positive's lambda (losses.flow_dpo_from_errors' `positive`): the loss also rises when the policy
    # fits a pair's winner worse than the reference does (0 = the paper's loss)
    dpo_positive: float = 0.0
    # Stage III (dpo-head): the head's parameters it trains, as comma-separated parts of their names (e.g. "out_proj"
    # for the tokens' last projection); the rest of the head stays as it is. "" = the whole head
    head_modules: str = ""

    TRAJECTORY_FIELDS = ("lr", "batch_size", "seed", "beta", "weight_decay", "grad_clip", "warmup_steps",
                         "t_min", "t_max", "t_sampling", "shift", "token_strength", "token_dropout", "motion_weight",
                         "anchor_weight", "lora_modules", "dpo_positive", "head_modules")

    def __post_init__(self) -> None:
        problems = []
        if int(self.steps) < 0:
            problems.append(f"steps must be >= 0, got {self.steps}")
        if int(self.batch_size) < 1:
            problems.append(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            problems.append(f"lr must be > 0, got {self.lr}")
        if not (0 <= self.t_min < self.t_max <= 1):
            problems.append(f"need 0 <= t_min < t_max <= 1, got {self.t_min}, {self.t_max}")
        if self.t_sampling not in ("uniform", "logit_normal"):
            problems.append(f"t_sampling must be 'uniform' or 'logit_normal', got {self.t_sampling!r}")
        if self.shift <= 0:
            problems.append(f"shift must be > 0, got {self.shift}")
        if not 0.0 <= self.token_dropout < 1.0:
            problems.append(f"token_dropout must be in [0, 1), got {self.token_dropout}")
        if not (self.motion_weight >= 0 and math.isfinite(self.motion_weight)):
            problems.append(f"motion_weight must be >= 0, got {self.motion_weight}")
        if int(self.checkpoint_every) < 0:
            problems.append(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if int(self.grad_accum) < 1:
            problems.append(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.split_passes and int(self.grad_accum) > 1:
            problems.append("split_passes already accumulates one video per pass; use grad_accum 1 with it")
        if self.margin_use not in MARGIN_USES:
            problems.append(f"margin_use must be one of {list(MARGIN_USES)}, got {self.margin_use!r}")
        if not (self.anchor_weight >= 0 and math.isfinite(self.anchor_weight)):
            problems.append(f"anchor_weight must be >= 0, got {self.anchor_weight}")
        if not (self.dpo_positive >= 0 and math.isfinite(self.dpo_positive)):
            problems.append(f"dpo_positive must be >= 0 (0 = the paper's Flow-DPO), got {self.dpo_positive}")
        if not (isinstance(self.min_margin, (int, float)) and math.isfinite(self.min_margin) and self.min_margin >= 0):
            problems.append(f"min_margin must be a number >= 0, got {self.min_margin!r}")
        if problems:
            raise TrainingError("invalid training config: " + "; ".join(problems))

    def trajectory(self) -> dict:
        out = {k: getattr(self, k) for k in self.TRAJECTORY_FIELDS}
        # off: the trajectory (and checkpoints) of runs made before the option
        for name in ("motion_weight", "anchor_weight", "lora_modules", "dpo_positive", "head_modules"):
            if not getattr(self, name):
                del out[name]
        if self.margin_use != "ignore":  # only then, so checkpoints from before these fields still resume
            out.update(margin_use=self.margin_use, min_margin=float(self.min_margin))
        return out


@dataclass
class TrainResult:
    stage: str
    steps_done: int
    history: list[dict] = field(default_factory=list)
    stopped: str | None = None  # why the run stopped early (non-finite loss), None if it completed
    checkpoint: Path | None = None
    seconds: float = 0.0

    @property
    def loss_map(self) -> dict[str, list[float]]:
        """{"loss": [...], ...}: per-step values for plotting (ComfyUI's LOSS_MAP)."""
        keys = sorted({k for h in self.history for k in h if k != "step"})
        return {k: [float(h.get(k, float("nan"))) for h in self.history] for k in keys}


def _mix(*values: int) -> int:
    h = hashlib.sha256(",".join(str(int(v)) for v in values).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def step_generator(seed: int, step: int, salt: int = 0) -> torch.Generator:
    """The CPU generator for step `step` of a run seeded `seed`: random draws depend only on (seed, step)."""
    return torch.Generator().manual_seed(_mix(seed, step, salt))


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Indices of step `step`'s batch: epochs of seeded permutations, a function of (seed, step) only."""
    out = []
    perms: dict[int, torch.Tensor] = {}
    for j in range(batch_size):
        pos = step * batch_size + j
        epoch, k = divmod(pos, n)
        if epoch not in perms:
            perms[epoch] = torch.randperm(n, generator=torch.Generator().manual_seed(_mix(seed, epoch, 7)))
        out.append(int(perms[epoch][k]))
    return out


def sample_t(config: TrainConfig, n: int, generator: torch.Generator) -> torch.Tensor:
    if config.t_sampling == "logit_normal":
        u = torch.sigmoid(torch.randn(n, generator=generator))
    else:
        u = torch.rand(n, generator=generator)
    t = config.t_min + (config.t_max - config.t_min) * u
    s = float(config.shift)
    if s != 1.0:
        t = s * t / (1 + (s - 1) * t)
    return t.float()


def noised_pairs(denoiser: Denoiser, xw, xl, cond: Conditioning, t, noise):
    """Winners then losers noised with the same t and ε, on the denoiser's device: (x_t, t, velocity target, cond)
    for the 2B videos of a Flow-DPO batch (the batched loss, `split_backward` and
    `validation.preference_margins` draw them alike)."""
    dev = denoiser.device
    xw, xl, noise, t, cond = xw.to(dev), xl.to(dev), noise.to(dev), t.to(dev), cond.map(lambda x: x.to(dev))
    x0 = torch.cat([xw, xl])
    eps = torch.cat([noise, noise])
    tt = torch.cat([t, t])
    return denoiser.add_noise(x0, eps, tt), tt, denoiser.velocity_target(x0, eps, tt), cond.repeat(2)


class StageTrainer:
    """Runs one stage. Build it, then `run(callback)`; `run` can be called again after raising `steps`."""

    def __init__(self, stage: str, denoiser: Denoiser, encoder: PhysEncoder | None,
                 data: VideoSet | PreferenceSet, config: TrainConfig,
                 checkpoint_dir: str | os.PathLike | None = None, resume: bool = True, accelerator=None,
                 anchor: VideoSet | None = None):
        if stage not in STAGES:
            raise TrainingError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
        if config.anchor_weight > 0:
            if stage not in ("dpo-lora", "dpo-head"):
                raise TrainingError(f"anchor_weight keeps the predictions near the reference's in Flow-DPO "
                                    f"(dpo-lora, dpo-head); stage {stage} has no reference: set it to 0")
            if not isinstance(anchor, VideoSet) or len(anchor) == 0:
                raise TrainingError(f"anchor_weight={config.anchor_weight} needs anchor videos (a non-empty "
                                    "VideoSet) to keep the reference's predictions on; pass anchor= or set it to 0")
            if config.split_passes:
                raise TrainingError("anchor_weight is not supported with split_passes; turn one of them off")
        self.anchor = anchor if config.anchor_weight > 0 else None
        self.stage = stage
        self.denoiser = denoiser
        self.encoder = encoder
        self.config = config
        self.data = data
        self.step = 0
        self.history: list[dict] = []
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.accelerator = accelerator
        self.rank = int(accelerator.process_index) if accelerator is not None else 0
        self.world = int(accelerator.num_processes) if accelerator is not None else 1
        self.global_batch = int(config.batch_size) * self.world * int(config.grad_accum)
        if config.split_passes and self.world > 1:
            raise TrainingError("split_passes runs on one process; with several processes (accelerate) use "
                                "--grad-accum and a smaller --batch-size instead")
        self._loss_hook: Callable[[int, torch.Tensor], torch.Tensor] | None = None  # tests: corrupt a loss
        if stage == "sft":
            if not isinstance(data, VideoSet):
                raise TrainingError("Stage I (sft) trains on videos: pass a VideoSet")
        elif not isinstance(data, PreferenceSet):
            raise TrainingError(f"{stage} trains on preference pairs: pass a PreferenceSet")
        # Flow-DPO: the pairs' margins filter the set and/or weight each pair's loss (config.margin_use)
        self.margins: MarginPlan | None = None
        self.pair_weights: torch.Tensor | None = None
        if stage != "sft":
            self.margins = plan_margins(data.pairs, config.margin_use, config.min_margin)
            if self.margins.dropped:
                data = data.subset(self.margins.kept)
                self.data = data
            if self.margins.weights is not None:
                self.pair_weights = torch.tensor(self.margins.weights, dtype=torch.float32)
        if stage == "dpo-head" and encoder is None:
            raise TrainingError("Stage III (dpo-head) trains the physical head: pass a PhysEncoder")
        lora = list(denoiser.lora_parameters())
        if stage == "dpo-lora" and not lora:
            raise TrainingError("Stage II (dpo-lora) trains the DiT's LoRA but the model has none: add one first")

        # Freeze everything, then unfreeze what this stage trains.
        for p in denoiser.module.parameters():
            p.requires_grad_(False)
        head_params = list(encoder.head.parameters()) if encoder is not None else []
        train_head = stage in ("sft", "dpo-head") and encoder is not None
        train_lora = stage in ("sft", "dpo-lora")
        for p in head_params:
            p.requires_grad_(train_head)
        for p in lora:
            p.requires_grad_(train_lora)
        named: list[tuple[str, nn.Parameter]] = []
        if train_head:
            head_named = list(encoder.head.named_parameters())
            if stage == "dpo-head" and (parts := lora_module_parts(config.head_modules)):
                if missing := unmatched_lora_parts(config.head_modules, (n for n, _ in head_named)):
                    raise TrainingError(f"head_modules={config.head_modules!r}: {', '.join(missing)} matches none of "
                                        f"the head's parameters (e.g. {', '.join(n for n, _ in head_named[:4])}); "
                                        "name parts of those names, or leave it empty to train the whole head")
                head_named = [(n, p) for n, p in head_named if in_lora_parts(n, parts)]
                chosen = {id(p) for _, p in head_named}
                for p in head_params:
                    p.requires_grad_(id(p) in chosen)
            named += [(f"head.{n}", p) for n, p in head_named]
        if train_lora:
            lora_named = getattr(denoiser, "named_lora_parameters", None)
            pairs = lora_named() if lora_named else [(str(i), p) for i, p in enumerate(lora)]
            if parts := lora_module_parts(config.lora_modules):
                if missing := unmatched_lora_parts(config.lora_modules, (n for n, _ in pairs)):
                    which = "" if len(missing) == len(parts) else f": {', '.join(missing)}"  # all: the whole spec
                    known = [n for n, _ in pairs[:3]] if lora_named else []
                    raise TrainingError(f"lora_modules={config.lora_modules!r}{which} matches none of the LoRA's "
                                        "parameters" + (f" (e.g. {', '.join(known)})" if known else "")
                                        + "; name parts of those names, or leave it empty to train every layer")
                pairs = [(n, p) for n, p in pairs if in_lora_parts(n, parts)]
                chosen = {id(p) for _, p in pairs}
                for p in lora:
                    p.requires_grad_(id(p) in chosen)
            named += [(f"lora.{n}", p) for n, p in pairs]
        if not named:
            raise TrainingError(f"stage {stage} has nothing to train (no head and no LoRA)")
        self.named_params = named
        self.params = [p for _, p in named]

        # Stage III's reference: a frozen copy of the head (small); never a copy of the DiT.
        self.ref_head: nn.Module | None = None
        if stage == "dpo-head":
            self.ref_head = copy.deepcopy(encoder.head)
            for p in self.ref_head.parameters():
                p.requires_grad_(False)

        denoiser.enable_gradient_checkpointing(bool(config.gradient_checkpointing))
        # multi-tensor AdamW, what PyTorch picks on CUDA unless told otherwise: one launch per operation for all of
        # a DiT's LoRA tensors rather than one per tensor, and the same update to the bit (`bench/bench_optimizer.py`;
        # on the demo's CPU Stage I AdamW takes 0.85x the time of one tensor at a time, the step 0.998x)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay,
                                           foreach=True)
        self.fingerprint = self._fingerprint()
        if self.checkpoint_dir is not None and resume:
            self.load_checkpoint()
        # one nn.Module whose forward is a micro-batch's loss: what DDP wraps (it averages these parameters'
        # gradients across processes); without an accelerator it is called as it is
        self.step_module: nn.Module = _StepLoss(self)
        if accelerator is not None:
            self.step_module, self.optimizer = accelerator.prepare(self.step_module, self.optimizer)

    # -- identity of a run ------------------------------------------------------------------------------------
    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        trajectory = self.config.trajectory()
        trajectory["batch_size"] = self.global_batch  # = batch_size on one process without accumulation
        info = {"stage": self.stage, "config": trajectory, "data_len": len(self.data),
                "latent_shape": list(self.data.latent_shape),
                "params": [(n, list(p.shape)) for n, p in self.named_params]}
        h.update(json.dumps(info, sort_keys=True).encode())
        for _, p in self.named_params:  # the starting weights: resuming from another start is an error
            h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    @property
    def checkpoint_path(self) -> Path | None:
        return self.checkpoint_dir / CHECKPOINT_NAME if self.checkpoint_dir is not None else None

    # -- one step ---------------------------------------------------------------------------------------------
    def _tokens(self, head: nn.Module | None, cond: Conditioning) -> torch.Tensor | None:
        if head is None or cond.features is None:
            return None
        return head(cond.features.to(self.denoiser.device))

    def _lr(self, step: int) -> float:
        w = int(self.config.warmup_steps)
        return self.config.lr * (min(1.0, (step + 1) / w) if w > 0 else 1.0)

    def shard(self, micro: int = 0) -> slice:
        """This process's part of a step's global batch for micro-batch `micro`."""
        b = int(self.config.batch_size)
        start = (int(micro) * self.world + self.rank) * b
        return slice(start, start + b)

    def compute_loss(self, step: int, micro: int = 0) -> tuple[torch.Tensor, dict]:
        """The loss of this process's micro-batch `micro` of step `step` (the whole batch on one process)."""
        cfg = self.config
        dev = self.denoiser.device
        gen = step_generator(cfg.seed, step)
        big = self.global_batch
        part = self.shard(micro)
        idx = batch_indices(len(self.data), big, cfg.seed, step)[part]
        head = self.encoder.head if self.encoder is not None else None
        if self.stage == "sft":
            x0, cond = self.data.batch(idx)
            t = sample_t(cfg, big, gen)[part]
            noise = torch.randn((big, *x0.shape[1:]), generator=gen)[part]
            x0, noise, t, cond = x0.to(dev), noise.to(dev), t.to(dev), cond.map(lambda x: x.to(dev))
            tokens = self._tokens(head, cond)
            if tokens is not None and cfg.token_dropout > 0:  # condition dropout: zero some samples' tokens
                keep = (torch.rand(big, generator=gen)[part] >= cfg.token_dropout).to(tokens)
                tokens = tokens * keep.view(-1, 1, 1)
            c = cond.with_tokens(tokens, cfg.token_strength)
            x_t = self.denoiser.add_noise(x0, noise, t)
            with self._keep_activations():
                v = self.denoiser.predict_velocity(x_t, t, c)
            w = motion_weights(x0, cfg.motion_weight) if cfg.motion_weight > 0 else None
            loss = weighted_sq_error(v, self.denoiser.velocity_target(x0, noise, t), w).mean()
            return loss, {"loss": float(loss.detach())}

        xw, xl, cond = self.data.batch(idx)
        b = xw.shape[0]
        t = sample_t(cfg, big, gen)[part]
        noise = torch.randn((big, *xw.shape[1:]), generator=gen)[part]  # the same noise and t for winner and loser
        x_t, tt, target, cond2 = noised_pairs(self.denoiser, xw, xl, cond, t, noise)
        # the reference first, without a graph: nothing of it is in memory while the policy's graph is
        v_ref = self._reference_velocity(x_t, tt, cond2)
        with self._keep_activations():
            v_pol = self.denoiser.predict_velocity(x_t, tt, self._policy_cond(cond2))
        w = self._pair_motion(xw, xl)
        err = weighted_sq_error(v_pol, target, w)
        with torch.no_grad():
            ref = weighted_sq_error(v_ref.detach(), target, w)
        out = flow_dpo_from_errors(err[:b], err[b:], ref[:b], ref[b:], cfg.beta, self._weights(idx),
                                   cfg.dpo_positive)
        if self.anchor is None:
            return out.loss, out.logs()
        drift = self._anchor_drift(step, part)
        return out.loss + cfg.anchor_weight * drift, {**out.logs(), "anchor": float(drift.detach())}

    def _anchor_drift(self, step: int, part: slice) -> torch.Tensor:
        """Mean squared difference between the policy's and the reference's (LoRA off) velocities on a batch of
        the anchor videos, noised at a drawn t (the step's own draws, salted: the pairs' are unchanged)."""
        cfg, dev = self.config, self.denoiser.device
        gen = step_generator(cfg.seed, step, salt=1)
        big = self.global_batch
        idx = batch_indices(len(self.anchor), big, cfg.seed + 1, step)[part]
        x0, cond = self.anchor.batch(idx)
        t = sample_t(cfg, big, gen)[part]
        noise = torch.randn((big, *x0.shape[1:]), generator=gen)[part]
        x0, noise, t, cond = x0.to(dev), noise.to(dev), t.to(dev), cond.map(lambda x: x.to(dev))
        x_t = self.denoiser.add_noise(x0, noise, t)
        v_ref = self._reference_velocity(x_t, t, cond)
        with self._keep_activations():
            v_pol = self.denoiser.predict_velocity(x_t, t, self._policy_cond(cond))
        return ((v_pol.float() - v_ref.float()) ** 2).mean()

    def _pair_motion(self, xw: torch.Tensor, xl: torch.Tensor) -> torch.Tensor | None:
        """Flow-DPO's element weights [2B, 1, T, H, W] (the pair's map for winner then loser), None when off."""
        if self.config.motion_weight <= 0:
            return None
        w = pair_motion_weights(xw, xl, self.config.motion_weight).to(self.denoiser.device)
        return torch.cat([w, w])

    def _weights(self, idx: Sequence[int]) -> torch.Tensor | None:
        """The loss weights of these pairs (their margins, `config.margin_use`), None when not weighting."""
        return None if self.pair_weights is None else self.pair_weights[list(idx)]

    def _policy_cond(self, cond: Conditioning) -> Conditioning:
        """The policy's conditioning: tokens of the trained head (with a graph in Stages I and III)."""
        head = self.encoder.head if self.encoder is not None else None
        if self.stage == "dpo-lora":
            with torch.no_grad():
                return cond.with_tokens(self._tokens(head, cond), self.config.token_strength)
        return cond.with_tokens(self._tokens(head, cond), self.config.token_strength)

    def _reference_velocity(self, x_t, t, cond: Conditioning) -> torch.Tensor:
        """Flow-DPO's reference (no graph): the model before the stage (Stage II: LoRA off; III: the frozen head)."""
        with torch.no_grad():
            if self.stage == "dpo-lora":
                head = self.encoder.head if self.encoder is not None else None
                c = cond.with_tokens(self._tokens(head, cond), self.config.token_strength)
                with self.denoiser.lora_disabled():
                    return self.denoiser.predict_velocity(x_t, t, c)
            c = cond.with_tokens(self._tokens(self.ref_head, cond), self.config.token_strength)
            return self.denoiser.predict_velocity(x_t, t, c)

    def _keep_activations(self):
        """Where autograd keeps what backward needs: CPU memory when `activations_on_cpu`."""
        return saved_on_cpu() if self.config.activations_on_cpu else contextlib.nullcontext()

    def split_backward(self, step: int) -> tuple[torch.Tensor, dict]:
        """`compute_loss(step)` and its backward with one video per pass (gradient accumulation): the same loss
        and gradient (up to float summation order), about half the activation memory of a batch of 2.

        Stage I: each video's flow-matching error, backpropagated with weight 1/B. Flow-DPO: the reference's and
        the policy's errors for each video without a graph, the loss and its derivatives by each error
        (`losses.dpo_error_weights`), then one pass with a graph per video backpropagating `dL/d err · err`.
        Returns the loss (0-d, no graph) and the logs; the gradients are in the parameters' `.grad`."""
        cfg = self.config
        dev = self.denoiser.device
        gen = step_generator(cfg.seed, step)
        idx = batch_indices(len(self.data), cfg.batch_size, cfg.seed, step)
        head = self.encoder.head if self.encoder is not None else None
        if self.stage == "sft":
            x0, cond = self.data.batch(idx)
            b = x0.shape[0]
            t = sample_t(cfg, b, gen)
            noise = torch.randn(x0.shape, generator=gen)
            keep = None
            if head is not None and cond.features is not None and cfg.token_dropout > 0:
                keep = (torch.rand(b, generator=gen) >= cfg.token_dropout).float()
            x0, noise, t, cond = x0.to(dev), noise.to(dev), t.to(dev), cond.map(lambda x: x.to(dev))
            x_t = self.denoiser.add_noise(x0, noise, t)
            target = self.denoiser.velocity_target(x0, noise, t)
            w = motion_weights(x0, cfg.motion_weight) if cfg.motion_weight > 0 else None
            total = torch.zeros((), dtype=torch.float32)
            for i in range(b):
                ci = cond.map(lambda x, i=i: x[i:i + 1])
                tokens = self._tokens(head, ci)
                if tokens is not None and keep is not None:
                    tokens = tokens * keep[i:i + 1].to(tokens).view(-1, 1, 1)
                with self._keep_activations():
                    v = self.denoiser.predict_velocity(x_t[i:i + 1], t[i:i + 1], ci.with_tokens(tokens,
                                                                                                cfg.token_strength))
                err = weighted_sq_error(v, target[i:i + 1], None if w is None else w[i:i + 1])
                (err.sum() / b).backward()
                total += err.detach().sum().cpu() / b
            return total, {"loss": float(total)}

        xw, xl, cond = self.data.batch(idx)
        b = xw.shape[0]
        t = sample_t(cfg, b, gen)
        noise = torch.randn(xw.shape, generator=gen)
        x_t, tt, target, cond2 = noised_pairs(self.denoiser, xw, xl, cond, t, noise)
        w = self._pair_motion(xw, xl)

        def err_of(v, i):
            return weighted_sq_error(v, target[i:i + 1], None if w is None else w[i:i + 1])

        one = [cond2.map(lambda x, i=i: x[i:i + 1]) for i in range(2 * b)]
        ref, pol = [], []
        with torch.no_grad():
            for i in range(2 * b):
                ref.append(err_of(self._reference_velocity(x_t[i:i + 1], tt[i:i + 1], one[i]), i))
            for i in range(2 * b):
                v = self.denoiser.predict_velocity(x_t[i:i + 1], tt[i:i + 1], self._policy_cond(one[i]))
                pol.append(err_of(v, i))
        ref_e, pol_e = torch.cat(ref), torch.cat(pol)
        out, gw, gl = dpo_error_weights(pol_e[:b], pol_e[b:], ref_e[:b], ref_e[b:], cfg.beta, self._weights(idx),
                                        cfg.dpo_positive)
        if torch.isfinite(out.loss):  # a non-finite loss stops the run before any backward
            weights = torch.cat([gw, gl])
            for i in range(2 * b):
                with self._keep_activations():
                    v = self.denoiser.predict_velocity(x_t[i:i + 1], tt[i:i + 1], self._policy_cond(one[i]))
                err = err_of(v, i)
                (weights[i:i + 1].to(err) * err).sum().backward()
        return out.loss, out.logs()

    # -- the loop ---------------------------------------------------------------------------------------------
    def run(self, callback: Callback | None = None) -> TrainResult:
        cfg = self.config
        total = int(cfg.steps)
        start = time.perf_counter()
        stopped = None
        every = int(cfg.checkpoint_every)
        saved_at = self.step
        while self.step < total:
            step = self.step
            for g in self.optimizer.param_groups:
                g["lr"] = self._lr(step)
            self.optimizer.zero_grad(set_to_none=True)
            if cfg.split_passes:  # one video per pass (memory); backward done inside
                loss, logs = self.split_backward(step)
                if self._loss_hook is not None:
                    loss = self._loss_hook(step, loss)
            else:  # micro-batches and processes (accelerate); backward done inside
                loss, logs = self._accumulate(step)
            if not torch.isfinite(loss.detach()):
                stopped = (f"stopped at step {step + 1}: the loss is not finite ({float(loss.detach())}); the "
                           f"weights are those after step {step}. Lower the learning rate or check the data.")
                self.optimizer.zero_grad(set_to_none=True)
                break
            if cfg.grad_clip and cfg.grad_clip > 0:
                if self.accelerator is not None:
                    gnorm = self.accelerator.clip_grad_norm_(self.params, cfg.grad_clip)
                else:
                    gnorm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
            else:
                gnorm = torch.sqrt(sum((p.grad.float() ** 2).sum() for p in self.params if p.grad is not None))
            if not torch.isfinite(gnorm):
                stopped = (f"stopped at step {step + 1}: the gradient is not finite; the weights are those after "
                           f"step {step}. Lower the learning rate or check the data.")
                self.optimizer.zero_grad(set_to_none=True)
                break
            self.optimizer.step()
            self.step = step + 1
            logs = {"step": self.step, **logs, "grad_norm": float(gnorm), "lr": self._lr(step)}
            self.history.append(logs)
            if every and self.step % every == 0 and self.checkpoint_dir is not None:
                if self.is_main:
                    self.save_checkpoint()
                saved_at = self.step
            if callback is not None:
                callback(self.step, total, logs)
        self.optimizer.zero_grad(set_to_none=True)
        ckpt = None
        if self.checkpoint_dir is not None and (saved_at != self.step or not self.checkpoint_path.exists()):
            ckpt = self.save_checkpoint() if self.is_main else self.checkpoint_path
        elif self.checkpoint_dir is not None:
            ckpt = self.checkpoint_path
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        return TrainResult(self.stage, self.step, list(self.history), stopped, ckpt,
                           time.perf_counter() - start)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _accumulate(self, step: int) -> tuple[torch.Tensor, dict]:
        """Forward and backward of this process's micro-batches of `step`; returns the loss and logs averaged over
        every micro-batch of every process (the global batch's), the same on all processes. A non-finite loss on
        any process returns it before any backward, so no process waits on another's gradients."""
        accum = int(self.config.grad_accum)
        total, sums = torch.zeros(()), {}
        for micro in range(accum):
            last = micro == accum - 1
            sync = contextlib.nullcontext() if last or self.accelerator is None else \
                self.accelerator.no_sync(self.step_module)
            with sync:
                loss, logs = self.step_module(step, micro)
                if self._loss_hook is not None:
                    loss = self._loss_hook(step, loss)
                values = torch.tensor([float(loss.detach())] + [float(v) for v in logs.values()])
                if self.accelerator is not None and self.world > 1:
                    values = self.accelerator.reduce(values.to(self.accelerator.device), "mean").cpu()
                if not torch.isfinite(values[0]):
                    return values[0], {}
                total = total + values[0] / accum
                for k, v in zip(logs, values[1:].tolist()):
                    sums[k] = sums.get(k, 0.0) + v / accum
                scaled = loss / accum if accum > 1 else loss
                if self.accelerator is not None:
                    self.accelerator.backward(scaled)
                else:
                    scaled.backward()
        sums["loss"] = float(total)
        return total, sums

    # -- checkpoints ------------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        from safetensors.torch import save_file

        tensors: dict[str, torch.Tensor] = {}
        for n, p in self.named_params:
            tensors[f"param.{n}"] = p.detach().cpu().contiguous().clone()
        if self.ref_head is not None:
            for n, v in self.ref_head.state_dict().items():
                tensors[f"ref_head.{n}"] = v.detach().cpu().contiguous().clone()
        opt = self.optimizer.state_dict()
        scalars: dict[str, dict] = {}
        for i, st in opt["state"].items():
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"optim.{i}.{k}"] = v.detach().cpu().contiguous().clone()
                else:
                    scalars.setdefault(str(i), {})[k] = v
        meta = {
            "format": "pt",
            "physmaster.train_state": json.dumps({
                "format_version": CHECKPOINT_FORMAT, "stage": self.stage, "step": self.step,
                "fingerprint": self.fingerprint, "config": dataclasses.asdict(self.config),
                "param_names": [n for n, _ in self.named_params], "optim_scalars": scalars,
                "param_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt["param_groups"]],
                "history": self.history,
            }, sort_keys=True, default=str),
        }
        path = self.checkpoint_path
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=meta)
        return path

    def load_checkpoint(self) -> bool:
        """Resume from `checkpoint_dir` if it holds a checkpoint of this run; False if there is none."""
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self.checkpoint_path
        if path is None or not path.exists():
            return False
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("physmaster.train_state", "null"))
            tensors = load_file(str(path))
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable training checkpoint ({e}); delete it to start over")
        if not isinstance(meta, dict):
            raise CheckpointError(f"{path} is not a PhysMaster training checkpoint (no physmaster.train_state)")
        if meta.get("stage") != self.stage or meta.get("fingerprint") != self.fingerprint:
            theirs = meta.get("config", {})
            diffs = [f"{k}: {theirs.get(k)!r} there, {v!r} here" for k, v in self.config.trajectory().items()
                     if theirs.get(k) != v]
            if meta.get("stage") != self.stage:
                diffs.insert(0, f"stage: {meta.get('stage')!r} there, {self.stage!r} here")
            if not diffs:
                diffs = ["the data (count or latent shape) or the starting weights differ"]
            raise CheckpointError(f"{path} belongs to another training run ({'; '.join(diffs)}). Use another "
                                  "checkpoint folder, delete the file to start over, or resume with the same "
                                  "settings.")
        own = dict(self.named_params)
        with torch.no_grad():
            for n, p in own.items():
                p.copy_(tensors[f"param.{n}"])
            if self.ref_head is not None:
                self.ref_head.load_state_dict({k[len("ref_head."):]: v for k, v in tensors.items()
                                               if k.startswith("ref_head.")})
        state: dict[int, dict] = {}
        for k, v in tensors.items():
            if k.startswith("optim."):
                _, i, name = k.split(".", 2)
                state.setdefault(int(i), {})[name] = v
        for i, sc in meta.get("optim_scalars", {}).items():
            state.setdefault(int(i), {}).update(sc)
        groups = self.optimizer.state_dict()["param_groups"]
        for g, saved in zip(groups, meta.get("param_groups", [])):
            g.update({k: v for k, v in saved.items() if k in g and k != "params"})
        self.optimizer.load_state_dict({"state": state, "param_groups": groups})
        self.step = int(meta["step"])
        self.history = list(meta.get("history", []))
        return True


class _StepLoss(nn.Module):
    """A stage's trainable parameters as one module whose forward(step, micro) is that micro-batch's loss (so
    that accelerate can wrap it in DDP). The parameters stay where they live (head, LoRA); this only lists them."""

    def __init__(self, trainer: StageTrainer):
        super().__init__()
        self.trained = nn.ParameterList(trainer.params)
        self._compute = trainer.compute_loss

    def forward(self, step: int, micro: int = 0):
        return self._compute(step, micro)


# -- convenience entry points -----------------------------------------------------------------------------------
def train_sft(denoiser: Denoiser, encoder: PhysEncoder | None, videos: VideoSet, config: TrainConfig,
              callback: Callback | None = None, checkpoint_dir: str | os.PathLike | None = None,
              resume: bool = True) -> TrainResult:
    """Stage I: flow matching on videos; trains the head and the DiT's LoRA."""
    return StageTrainer("sft", denoiser, encoder, videos, config, checkpoint_dir, resume).run(callback)


def train_dpo(denoiser: Denoiser, encoder: PhysEncoder | None, pairs: PreferenceSet, config: TrainConfig,
              stage: str = "dpo-head", callback: Callback | None = None,
              checkpoint_dir: str | os.PathLike | None = None, resume: bool = True) -> TrainResult:
    """Stage II (`dpo-lora`) or III (`dpo-head`): Flow-DPO on preference pairs."""
    if stage not in ("dpo-lora", "dpo-head"):
        raise TrainingError(f"train_dpo's stage must be 'dpo-lora' or 'dpo-head', got {stage!r}")
    return StageTrainer(stage, denoiser, encoder, pairs, config, checkpoint_dir, resume).run(callback)


#: what each stage changes: the head lives in the encoder file, the DiT LoRA in a LoRA file
STAGE_TRAINS = {"sft": "head and dit lora", "dpo-lora": "dit lora", "dpo-head": "head"}


def stage_entry(stage: str, steps: int, config: TrainConfig, *, planned: int | None = None,
                interrupted: bool = False, stopped: str | None = None, base_model: str = "", dataset: str = "",
                dataset_size: int | None = None, lora_file: str | None = None, extra: dict | None = None) -> dict:
    """One provenance entry that says exactly what a stage left: which weights it trained (`trains`), how many
    optimizer steps it really did (`steps`, of `steps_planned`), whether Cancel (`interrupted`) or a non-finite
    loss (`stopped`) ended it early, and where its DiT LoRA is (`lora_file`, when it trained one and it was saved:
    an encoder file holds only the head, so a `dpo-lora` entry in an encoder's history changed nothing in it)."""
    if stage not in STAGE_TRAINS:
        raise TrainingError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    entry = {"stage": stage, "trains": STAGE_TRAINS[stage], "steps": int(steps),
             "steps_planned": int(config.steps if planned is None else planned), "interrupted": bool(interrupted),
             "stopped": stopped, "lr": config.lr, "seed": config.seed, "batch_size": config.batch_size,
             "base_model": base_model, "dataset": dataset, "dataset_size": dataset_size,
             "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if (config.t_min, config.t_max) != (TrainConfig.t_min, TrainConfig.t_max):  # only where a run narrowed it
        entry["t_range"] = [float(config.t_min), float(config.t_max)]
    if stage == "sft" and config.token_dropout:  # only where a run dropped tokens
        entry["token_dropout"] = float(config.token_dropout)
    if stage != "sft":
        entry["beta"] = config.beta
        if config.margin_use != "ignore":
            entry.update(margin_use=config.margin_use, min_margin=float(config.min_margin))
    if "lora" in STAGE_TRAINS[stage]:
        entry["lora_file"] = lora_file
    entry.update(extra or {})
    return entry


def record_stage(encoder: PhysEncoder, result: TrainResult, config: TrainConfig, *, base_model: str = "",
                 dataset: str = "", dataset_size: int | None = None, extra: dict | None = None,
                 interrupted: bool = False, lora_file: str | None = None) -> dict:
    """Append this stage to the encoder's provenance (saved in its safetensors header); returns the entry."""
    entry = stage_entry(result.stage, result.steps_done, config, interrupted=interrupted, stopped=result.stopped,
                        base_model=base_model, dataset=dataset, dataset_size=dataset_size, lora_file=lora_file,
                        extra=extra)
    encoder.provenance.setdefault("stages", []).append(entry)
    if base_model:
        encoder.provenance["base_model"] = base_model
    return entry


def plottable_losses(values: Sequence[float]) -> list[float]:
    """Per-step losses that core LossGraph can draw: it scales by (max − min), so it needs two different finite
    values (an empty list fails with `min() arg is an empty sequence`, one value or a flat run with a division by
    zero). Non-finite values are dropped; a run with fewer than two different finite losses (stopped at step 1 or
    2) is drawn from a 0 baseline: [0, loss...], or [0, 1] when no step finished (the summary says why)."""
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if len(set(finite)) >= 2:
        return finite
    padded = [0.0] + finite
    return padded if len(set(padded)) >= 2 else [0.0, 1.0]
