"""Training on ComfyUI's own loaded MODEL: Stage I SFT and Flow-DPO (Stages II/III) through the core trainer.

The Denoiser is implemented over a ModelPatcher the way core comfy_extras/nodes_train.py trains: under
`torch.inference_mode(False)`, with the host's TrainGuider preparing the model and the conditioning, but on a plain
clone that shares the user's loaded weights (no deep copy, no reload: see `training_patcher`; nothing a stage
trains is a DiT weight), with the LoRA in the host's bypass mode, memory options as core's TrainLoraNode offers
them and a pre-flight estimate of the step's peak memory (`memory_preflight`, nodes/accounting.py). The
conditioning (ComfyUI's own `extra_conds` turns each group's conditioning into model inputs: Wan's mask + image
latent concat and CLIP features, LTX's attention mask ...), and the LoRA as the host's weight adapters, so core
SaveLoRA saves it and LoraLoaderModelOnly loads it. `BaseModel.apply_model` returns the denoised estimate x̂_0; the
core's `X0Denoiser` converts it to a velocity.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass

import torch
from comfy_api.latest import io

import comfy.clip_vision
import comfy.model_management
import comfy.patcher_extension
import comfy.samplers
import comfy.utils
from comfy.weight_adapter import adapter_maps
from server import PromptServer

from ..physmaster.conditioning import RECORD_KEY, strip_tokens
from ..physmaster.encoder import PhysEncoder
from ..physmaster.errors import PhysMasterError, WidthMismatchError
from ..physmaster.fileio import atomic_path
from ..physmaster.memory import TooLargeError, TrainingPlan, describe, fitting_plans
from ..physmaster.training import (MARGIN_USES, Conditioning, DataError, PreferencePair, PreferenceSet,
                                   StageTrainer, TrainConfig, VideoSample, VideoSet, X0Denoiser, describe_skips,
                                   nonfinite_group, plan_margins, plottable_losses, record_stage, stage_entry)
from . import paths
from .preference_nodes import PhysPreferencesType
from .types import CATEGORY, PhysEncoderType

log = logging.getLogger("physmaster")

LoraModelType = io.Custom("LORA_MODEL")
LossMapType = io.Custom("LOSS_MAP")
DPO_STAGES = {"head (Stage III)": ["dpo-head"], "dit lora (Stage II)": ["dpo-lora"],
              "lora then head (II + III)": ["dpo-lora", "dpo-head"]}
SFT_TRAIN = ["head and lora", "head only"]


class LoraBypass:
    """The DiT LoRA as the host's bypass adapters (comfy.weight_adapter.bypass, core TrainLoraNode's bypass
    mode): each LoRA'd layer computes `f(x) + up(down(x)) * alpha / rank` with its frozen weight untouched, so no
    weight is copied or patched (the base weights stay shared with the user's model; fp8 and offloaded weights
    work as they are). `disabled()` takes the adapters out (Stage II's reference is the model without them)."""

    def __init__(self, mp, manager):
        self.mp = mp
        self.manager = manager
        self.injections = manager.create_injections(mp.model)
        self.injected = False

    def inject(self) -> None:
        if not self.injected:
            for injection in self.injections:
                injection.inject(self.mp)
            self.injected = True

    def eject(self) -> None:
        if self.injected:
            for injection in self.injections:
                injection.eject(self.mp)
            self.injected = False

    @contextlib.contextmanager
    def disabled(self):
        was = self.injected
        self.eject()
        try:
            yield
        finally:
            if was:
                self.inject()


def lora_targets(model) -> list[tuple[str, torch.nn.Module]]:
    """Every layer with a 2-D weight inside the DiT's transformer blocks (names as in model.named_modules())."""
    out = []
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if hasattr(module, "weight_function") and weight is not None and weight.ndim == 2 and "blocks." in name:
            out.append((name, module))
    return out


def add_lora(mp, rank: int) -> tuple[dict[str, torch.nn.Parameter], LoraBypass]:
    """LoRA adapters (the host's) on every 2-D weight inside the DiT's transformer blocks, applied in bypass mode.
    `alpha` is a frozen buffer-like parameter (= rank): only lora_up / lora_down train. Initialised from the
    global RNG: seed it first (the train nodes fork it with the training seed)."""
    from comfy.weight_adapter.bypass import BypassInjectionManager

    params: dict[str, torch.nn.Parameter] = {}
    manager = BypassInjectionManager()
    targets = lora_targets(mp.model)
    if not targets:
        raise PhysMasterError("found no transformer-block weights to put a LoRA on in this model; train the head "
                              "only (stage 'head (Stage III)')")
    for name, module in targets:
        adapter = adapter_maps["LoRA"].create_train(module.weight, rank=rank, alpha=float(rank)).to(torch.float32)
        adapter.train().requires_grad_(True)
        adapter.alpha.requires_grad_(False)  # a trainable alpha keeps a full-size weight difference for backward
        for pname, p in adapter.named_parameters():
            params[f"{name}.{pname}"] = p
        manager.add_adapter(f"{name}.weight", adapter, strength=1.0)
    return params, LoraBypass(mp, manager)


class ComfyDenoiser(X0Denoiser):
    """The Denoiser over a ComfyUI model prepared by the guider (`inner` = the loaded BaseModel).

    `autocast`: the compute dtype of the forward (torch.autocast, as core's TrainSampler), None = as loaded.
    Gradient checkpointing uses core's own patch/unpatch (comfy_extras.nodes_train) on the DiT's top-level
    modules, undone by `enable_gradient_checkpointing(False)`."""

    def __init__(self, inner, lora: dict[str, torch.nn.Parameter] | None, lora_switch: LoraBypass | None,
                 constants: dict, uses_mask: bool, model_options: dict, autocast: torch.dtype | None = None):
        self.inner = inner
        self._lora = lora or {}
        self._switch = lora_switch
        self.constants = constants
        self.uses_mask = uses_mask
        self.model_options = model_options
        self.autocast = autocast
        self._checkpointed: list = []

    @property
    def module(self):
        return self.inner.diffusion_model

    @property
    def device(self):
        return self.inner.device if hasattr(self.inner, "device") else next(self.module.parameters()).device

    def named_lora_parameters(self):
        return [(k, p) for k, p in self._lora.items() if not k.endswith(".alpha")]

    def lora_parameters(self):
        return [p for _, p in self.named_lora_parameters()]

    @contextlib.contextmanager
    def lora_disabled(self):
        if self._switch is None:
            yield
            return
        with self._switch.disabled():
            yield

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each of the DiT's top-level modules (its transformer blocks, embeddings, head) in backward,
        with core's own patch/unpatch (comfy_extras.nodes_train)."""
        from comfy_extras.nodes_train import find_modules_at_depth, patch, unpatch

        for m in self._checkpointed:
            unpatch(m)
        self._checkpointed = []
        if enabled:
            # depth 1 is the DiT itself (find_modules_at_depth counts the root): 2 = its blocks and embeddings
            self._checkpointed = find_modules_at_depth(self.module, depth=2)
            for m in self._checkpointed:
                patch(m)

    def predict_x0(self, x_t, t, cond: Conditioning):
        kwargs = {k[len("kw."):]: v for k, v in cond.extra.items() if k.startswith("kw.")}
        kwargs.update(self.constants)
        if self.uses_mask and cond.attention_mask is not None:
            kwargs["attention_mask"] = cond.attention_mask
        transformer_options = dict(self.model_options.get("transformer_options", {}))
        if self.autocast is None:
            return self.inner.apply_model(x_t, t, c_crossattn=cond.context,
                                          transformer_options=transformer_options, **kwargs)
        with torch.autocast(x_t.device.type, dtype=self.autocast):
            return self.inner.apply_model(x_t, t, c_crossattn=cond.context,
                                          transformer_options=transformer_options, **kwargs)


def _clone(t):
    return t.detach().clone() if isinstance(t, torch.Tensor) else t


def comfy_conditioning(tensors: dict[str, torch.Tensor]) -> list:
    """A group's stored conditioning (PhysMasterPreferencePicker) as a ComfyUI conditioning entry."""
    extra = {}
    cvo = None
    for key, value in tensors.items():
        if key.startswith("cond."):
            extra[key[5:]] = value
        elif key.startswith("clip_vision."):
            cvo = cvo or comfy.clip_vision.Output()
            cvo[key[len("clip_vision."):]] = value
    if cvo is not None:
        extra["clip_vision_output"] = cvo
    return [tensors["context"], extra]


def _conditioning_from_processed(context, mask, features, processed: dict) -> tuple[Conditioning, dict]:
    """Split ComfyUI's processed model conds into per-sample tensors (batched) and constants."""
    extra, constants = {}, {}
    for name, value in processed.get("model_conds", {}).items():
        if name in ("c_crossattn", "attention_mask"):
            continue
        data = getattr(value, "cond", None)
        if isinstance(data, torch.Tensor):
            extra[f"kw.{name}"] = _clone(data[:1])
        elif data is not None:
            constants[name] = data
    cond = Conditioning(context=_clone(context), features=_clone(features), attention_mask=_clone(mask),
                        extra=extra)
    return cond, constants


def _preflight(encoder: PhysEncoder | None, context_dim: int, feature_dim: int | None, n_items: int, noun: str,
               what: str, mp, latent_shape) -> str:
    problems = []
    if encoder is not None:
        if encoder.config.context_dim != context_dim:
            problems.append(f"the encoder emits {encoder.config.context_dim}-wide tokens but the {what} has a "
                            f"{context_dim}-wide text context: make the encoder with context_dim {context_dim}")
        if feature_dim is not None and encoder.config.in_dim != feature_dim:
            problems.append(f"the encoder expects {encoder.config.in_dim}-wide backbone features but the {what} "
                            f"stores {feature_dim}-wide ones (another CLIP vision model)")
        if feature_dim is None:
            problems.append(f"the {what} has no backbone features (it was made without PhysMasterApply), so the "
                            "head cannot be trained on it")
    channels = getattr(getattr(mp.model, "latent_format", None), "latent_channels", None)
    if channels is not None and latent_shape[0] != channels:
        problems.append(f"the {what}'s latents have {latent_shape[0]} channels but this model's latent format has "
                        f"{channels}: the {what} was made with another model")
    if problems:
        raise WidthMismatchError("cannot train: " + "; ".join(problems))
    params = sum(p.numel() * p.element_size() for p in mp.model.diffusion_model.parameters())
    return (f"{n_items} {noun}, latents {list(latent_shape)}, context width {context_dim}, "
            f"model weights {params / 2**30:.2f} GiB")


@dataclass
class MemoryOptions:
    """The train nodes' memory widgets (the way core's TrainLoraNode offers them, plus two for Flow-DPO)."""

    training_dtype: str = "auto"  # auto | bf16 | fp32 | none
    offloading: bool = False
    split_passes: bool = False
    activations_on_cpu: bool = False
    quantized_backward: bool = False

    def plan(self, stage: str, batch_size: int, gradient_checkpointing: bool) -> TrainingPlan:
        return TrainingPlan(stage=stage, batch_size=batch_size, gradient_checkpointing=gradient_checkpointing,
                            split_passes=self.split_passes, activations_on_cpu=self.activations_on_cpu,
                            offloading=self.offloading)


TRAINING_DTYPES = ["auto", "bf16", "fp32", "none"]


def compute_dtype(model, option: str) -> torch.dtype | None:
    """The autocast dtype for `training_dtype` (None = no autocast: compute as loaded).

    auto: bf16 on a GPU that has it, else as loaded (fp32 on a CPU); bf16/fp32: that (the model's compute dtype
    is set to it, as core's TrainLoraNode does); none: the model's own compute dtype, with autocast when it is a
    16-bit one."""
    if option == "fp32":
        return torch.float32
    if option == "bf16":
        return torch.bfloat16
    device = model.load_device
    native = model.model.manual_cast_dtype or model.model.get_dtype()
    if option == "auto":
        if not comfy.model_management.is_device_cpu(device) and \
                comfy.model_management.should_use_bf16(device, prioritize_performance=False):
            return torch.bfloat16
        return None if native in (torch.float32, torch.float16, torch.bfloat16) else torch.float32
    return native if native in (torch.float16, torch.bfloat16) else None


def check_memory_options(model, options: MemoryOptions) -> None:
    """Options this model or device cannot use: an error naming the option, before anything is allocated."""
    problems = []
    if options.training_dtype not in TRAINING_DTYPES:
        problems.append(f"training_dtype must be one of {TRAINING_DTYPES}, got {options.training_dtype!r}")
    cpu = comfy.model_management.is_device_cpu(model.load_device)
    if options.offloading:
        if cpu:
            problems.append("offloading keeps weights in system RAM while a GPU trains, but this model runs on "
                            "the CPU: set offloading off")
        elif not any(getattr(m, "comfy_cast_weights", None) is not None
                     for m in model.model.diffusion_model.modules() if hasattr(m, "weight")):
            problems.append(f"this model's layers ({type(model.model.diffusion_model).__name__}) are not built "
                            "with ComfyUI's ops, so ComfyUI cannot load them partially: set offloading off")
    if options.quantized_backward and (cpu or not comfy.model_management.supports_fp8_compute(model.load_device)):
        problems.append("quantized_backward runs the backward's matrix products in fp8, which needs a GPU with "
                        "fp8 matrix multiplication (NVIDIA Ada or Hopper); "
                        + ("this model runs on the CPU" if cpu else "this GPU has none")
                        + ": set quantized_backward off")
    if options.activations_on_cpu and cpu:
        problems.append("activations_on_cpu moves what backward needs from the GPU to system RAM, but this model "
                        "already runs on the CPU: set activations_on_cpu off")
    if problems:
        raise PhysMasterError("cannot train with these memory options: " + "; ".join(problems))


def memory_preflight(model, stages: list[str], latent_shape, context_tokens: int, encoder: PhysEncoder | None,
                     lora_rank: int, batch_size: int, gradient_checkpointing: bool,
                     options: MemoryOptions) -> tuple[str, dict | None]:
    """The estimated peak memory of the run's most demanding stage (physmaster.memory over a meta-device pass of
    this model's blocks: nothing allocated), as a sentence, and the numbers (None for a model family the estimate
    does not know). Raises TooLargeError, naming the options that would fit, when it exceeds the free memory."""
    from . import accounting

    check_memory_options(model, options)
    dm = model.model.diffusion_model
    dtype = compute_dtype(model, options.training_dtype) or model.model.manual_cast_dtype or model.model.get_dtype()
    head = sum(p.numel() for p in encoder.head.parameters()) if encoder is not None else 0
    device = model.load_device
    cpu = comfy.model_management.is_device_cpu(device)
    free = comfy.model_management.get_free_memory(device)
    if not cpu:  # what this model already holds on the device is free for it; --reserve-vram is not
        free += model.loaded_size() - comfy.model_management.extra_reserved_memory()
    if not accounting.supports(dm):
        return "", None
    profile = None
    worst = None
    for stage in stages:
        trains_head = stage in ("sft", "dpo-head") and encoder is not None
        lora = accounting.lora_parameter_count(dm, lora_rank) if stage in ("sft", "dpo-lora") and lora_rank else 0

        def estimate(plan, _head=trains_head, _lora=lora):
            return accounting.estimate(dm, latent_shape, context_tokens, plan, dtype=dtype,
                                       trainable_params=head if _head else 0, lora_params=_lora,
                                       available=None if cpu else free, profile=profile)

        if profile is None:
            profile = accounting.wan_profile(dm, latent_shape, context_tokens, dtype)
        plan = options.plan(stage, batch_size, gradient_checkpointing)
        est = estimate(plan)
        # on a CPU the weights are in RAM already (the model is loaded): the step adds the rest
        need = est.without_weights if cpu else est.peak
        if need > free:
            if cpu:  # weights already in RAM; offloading and activations_on_cpu mean nothing there
                fits = [e for e in fitting_plans(estimate, plan, free + est.weights)
                        if not (e.plan.offloading or e.plan.activations_on_cpu)]
            else:
                fits = fitting_plans(estimate, plan, free)
            where = "this machine's free RAM" if cpu else f"the free memory of {device}"
            if fits:
                best = fits[0]
                fix = (f"options that fit: {best.plan.describe()} (estimated {describe(best.peak)})"
                       + ("" if dm.dtype == torch.float8_e4m3fn else "; or load the model in fp8 (UNETLoader "
                          "weight_dtype fp8_e4m3fn) to halve its weights"))
            else:
                fix = ("no combination of gradient_checkpointing, split_passes, activations_on_cpu and offloading "
                       "fits: train on fewer frames or a lower resolution"
                       + ("" if cpu or dm.dtype == torch.float8_e4m3fn else
                          ", or load the model in fp8 (UNETLoader weight_dtype fp8_e4m3fn)"))
            raise TooLargeError(f"{stage} on latents {list(latent_shape)} with {plan.describe()} needs "
                                f"{est.describe()}, but {where} is {describe(free)}; {fix}")
        if worst is None or need > worst[1]:
            worst = (est, need, stage)
    est, need, stage = worst
    numbers = {"stage": stage, "peak": est.peak, "without_weights": est.without_weights,
               "weights": est.weights, "weights_resident": est.weights_resident, "activations": est.activations,
               "reference": est.reference, "trainable": est.trainable, "cast_buffers": est.cast_buffers,
               "host_activations": est.host_activations, "free": free, "plan": est.plan.describe(),
               "profile": est.profile.to_json()}
    return f"{stage}: {est.describe()} ({est.plan.describe()})", numbers


def _ordinary_weights(model) -> int:
    """Swap the weights (and buffers) that the loader made in inference mode for ordinary tensors with the same
    values, one at a time (comfy.utils.set_attr_param clones an inference tensor outside inference mode): autograd
    cannot save inference tensors for backward. The user's model keeps its values (bit-identical) and its memory
    (each old tensor is freed as its copy replaces it). Returns how many were swapped."""
    n = 0
    for name, p in list(model.named_parameters()):
        if p.is_inference():
            comfy.utils.set_attr_param(model, name, p)
            n += 1
    for name, b in list(model.named_buffers()):
        if b is not None and b.is_inference():
            comfy.utils.set_attr_buffer(model, name, b.clone())
            n += 1
    return n


def training_patcher(model):
    """The ModelPatcher training runs on: a plain clone sharing the user's loaded weights (no copy, no reload),
    or, on a DynamicVRAM host, the host's own non-dynamic patcher (what core's TrainLoraNode trains on:
    DynamicVRAM casts weights into buffers it reuses, which autograd must not keep)."""
    if model.is_dynamic():
        mp = model.clone(disable_dynamic=True)
        how = "a non-dynamic copy of the weights (DynamicVRAM host)"
    else:
        mp = model.clone()
        how = "the loaded weights, shared"
    _ordinary_weights(mp.model)
    return mp, how


def _partial_loading(need: int | None, offloading: bool):
    """A PREPARE_SAMPLING wrapper: load the model next to what the training step needs (ComfyUI's partial
    loading keeps what fits with `offloading`, else everything), instead of the sampler's estimate."""
    def wrapper(executor, model, noise_shape, conds, model_options=None, force_full_load=False,
                force_offload=False):
        if need is None:
            return executor(model, noise_shape, conds, model_options=model_options,
                            force_full_load=not offloading, force_offload=offloading)
        comfy.model_management.load_models_gpu([model], memory_required=need, minimum_memory_required=need,
                                               force_full_load=not offloading)
        return model.model, conds, []
    return wrapper


def _run(node_cls, model, encoder: PhysEncoder, stages: list[str], make_inputs, build, config: TrainConfig,
         lora_rank: int, dataset_label: str, n_items: int, options: MemoryOptions | None = None,
         memory: dict | None = None):
    """Shared body of the two train nodes: a clone sharing the model's weights, the LoRA (bypass), the guider,
    the stage loops, outputs.

    `make_inputs()` -> (the groups' ComfyUI conditioning, one latent): called with inference mode off, so its
    clones are trainable tensors. `build(processed_conds)` -> ({stage: data}, constants, uses_mask) once the
    guider has prepared the conditioning. `memory`: the pre-flight's estimate (its numbers go to the history).

    The user's model is left as it was: its modules' forwards (checkpointing, LoRA hooks) are restored and every
    clone of it unloaded (restoring ComfyUI's object patches) whatever happens. Cancel keeps everything trained
    so far as files a person can load (see `_save_interrupted`), then re-raises so ComfyUI reports it."""
    from comfy_extras.nodes_train import TrainGuider

    options = options or MemoryOptions()
    node_id = getattr(node_cls.hidden, "unique_id", None)
    server = PromptServer.instance
    with torch.inference_mode(False):
        mp, how = training_patcher(model)
        dtype = compute_dtype(mp, options.training_dtype)
        if options.training_dtype in ("bf16", "fp32"):
            mp.set_model_compute_dtype(dtype)
        autocast = dtype if dtype in (torch.bfloat16, torch.float16) else None  # fp32: no autocast needed
        need = None
        if memory is not None and not comfy.model_management.is_device_cpu(mp.load_device):
            need = int(memory["without_weights"] * 1.1)
        mp.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.PREPARE_SAMPLING, "physmaster_train",
                                _partial_loading(need, options.offloading))
        enc = encoder.clone() if encoder is not None else None
        needs_lora = any(s in ("sft", "dpo-lora") for s in stages) and lora_rank > 0
        # the LoRA's random init follows the training seed too, so a run is reproducible end to end (and an
        # interrupted LoRA equals the LoRA of an uninterrupted run of that many steps)
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(config.seed)
            lora, switch = add_lora(mp, lora_rank) if needs_lora else ({}, None)
        positives, dummy = make_inputs()
        guider = TrainGuider(mp, offloading=options.offloading)
        guider.set_conds(positives)
        total = config.steps * len(stages)
        pbar = comfy.utils.ProgressBar(total)
        started = time.monotonic()
        results = []
        interrupted: list[tuple[str, int]] = []
        skips: list[tuple[str, str]] = []  # (reason, group) of items the data sets skipped
        denoisers: list[ComfyDenoiser] = []

        class _Sampler(comfy.samplers.Sampler):
            def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
                       disable_pbar=False):
                conds = model_wrap.conds["positive"]
                data, constants, uses_mask = build(conds)
                for d in {id(d): d for d in data.values()}.values():
                    skips.extend(d.skips)
                denoiser = ComfyDenoiser(model_wrap.inner_model, lora, switch, constants, uses_mask,
                                         extra_args.get("model_options", {}), autocast=autocast)
                denoisers.append(denoiser)
                if switch is not None:
                    switch.inject()
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                done = 0
                for stage in stages:
                    trainer = StageTrainer(stage, denoiser, enc, data[stage], config)

                    def progress(step, n, logs, _offset=done):
                        k = _offset + step
                        pbar.update_absolute(k, total)
                        rate = (time.monotonic() - started) / max(k, 1)
                        text = (f"{stage}: step {step}/{n}, loss {logs.get('loss', float('nan')):.4f}"
                                + (f", implicit accuracy {logs['accuracy']:.2f}" if "accuracy" in logs else "")
                                + f", ETA {rate * (total - k):.0f} s")
                        if node_id is not None and server is not None:
                            server.send_progress_text(text, node_id)
                        comfy.model_management.throw_exception_if_processing_interrupted()

                    try:
                        result = trainer.run(progress)
                    except comfy.model_management.InterruptProcessingException:
                        interrupted.append((stage, trainer.step))
                        raise
                    results.append((stage, result))
                    done += config.steps
                    if result.stopped:  # a later stage would start from weights that just failed
                        break
                return torch.zeros_like(latent_image)

        fp8_bwd = comfy.model_management.training_fp8_bwd
        try:
            comfy.model_management.in_training = True
            comfy.model_management.training_fp8_bwd = options.quantized_backward
            guider.sample(torch.zeros_like(dummy), dummy, _Sampler(), torch.ones(2), seed=config.seed)
        except comfy.model_management.InterruptProcessingException:
            saved = _save_interrupted(enc, lora, results, interrupted, config, dataset_label, n_items,
                                      _model_name(model))
            if saved:
                text = "training cancelled; kept what was trained so far: " + ", ".join(saved)
                log.warning("PhysMaster: %s", text)
                if node_id is not None and server is not None:
                    server.send_progress_text(text, node_id)
            raise
        finally:
            comfy.model_management.in_training = False
            comfy.model_management.training_fp8_bwd = fp8_bwd
            if switch is not None:
                switch.eject()
            for d in denoisers:
                d.enable_gradient_checkpointing(False)
            # the user's model must be as it was: unload every clone, which restores ComfyUI's object patches
            comfy.model_management.unload_model_and_clones(mp)
        measured = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        lora_sd = {k: v.detach().to("cpu").clone() for k, v in lora.items()}
        loss_map: dict[str, list[float]] = {}
        lines, histories = [], []
        for stage, result in results:
            if enc is not None:
                record_stage(enc, result, config, base_model=_model_name(model), dataset=dataset_label,
                             dataset_size=n_items)
            for k, v in result.loss_map.items():
                loss_map.setdefault(k, []).extend(v)
            histories.append({"stage": stage, "history": result.history, "stopped": result.stopped,
                              "seconds": result.seconds, "weights": how,
                              "memory": dict(memory or {}, measured_peak=measured)})
            lines.append(_summary_line(stage, result))
        stopped = [(stage, r.stopped) for stage, r in results if r.stopped]
        skipped_stages = stages[len(results):]
        if stopped:
            stage, why = stopped[0]
            lines.insert(0, f"TRAINING STOPPED EARLY in {stage}: {why}"
                         + (f" Not run: {', '.join(skipped_stages)}." if skipped_stages else "")
                         + " The outputs hold the weights after the last good step.")
        # core LossGraph needs two different finite values; the raw per-step values stay under "steps_loss"
        loss_map["steps_loss"] = list(loss_map.get("loss", []))
        loss_map["loss"] = plottable_losses(loss_map.get("loss", []))
        return enc, lora_sd, loss_map, "\n".join(lines), histories, skips


def _summary_line(stage: str, result) -> str:
    """'dpo-head: 30 steps, loss 0.6931 -> 0.4120, implicit accuracy 0.40 -> 0.90, ...' (first/last 5 steps)."""
    h = result.history
    k = max(1, min(5, len(h) // 2))

    def span(key, label, fmt):
        vals = [x[key] for x in h if key in x]
        if not vals:
            return ""
        first, last = sum(vals[:k]) / len(vals[:k]), sum(vals[-k:]) / len(vals[-k:])
        return f"{label} {first:{fmt}} -> {last:{fmt}}"

    parts = [f"{stage}: {result.steps_done} steps"] + [
        p for p in (span("loss", "loss", ".4f"), span("accuracy", "implicit accuracy", ".2f"),
                    span("margin", "reward margin", ".4f")) if p]
    line = ", ".join(parts)
    return line + (f" ({result.stopped})" if result.stopped else "")


def _model_name(model) -> str:
    return type(getattr(model, "model", model)).__name__


def _safe_label(text: str) -> str:
    keep = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(text))[:60].strip("._")
    return keep or "run"


def _save_interrupted(enc: PhysEncoder | None, lora: dict, results, interrupted, config: TrainConfig,
                      dataset_label: str, n_items: int, base_model: str) -> list[str]:
    """On Cancel: save what the run trained so far where the loaders find it, with provenance that says exactly
    what each file holds. The encoder (the head after the last finished step) goes to
    models/physmaster/interrupted/ (PhysMasterEncoderLoader lists it); the DiT LoRA, when a stage trained one, to
    models/loras/physmaster_interrupted/ in core SaveLoRA's format (LoraLoaderModelOnly lists it). Names are
    unique across every registered folder. Returns the saved names (nothing is written when no step finished)."""
    done = [(stage, r.steps_done, r.stopped, False) for stage, r in results]
    done += [(stage, n, None, True) for stage, n in interrupted]
    lora_steps = sum(n for stage, n, _, _ in done if "lora" in _trains(stage))
    head_steps = sum(n for stage, n, _, _ in done if "head" in _trains(stage))
    if lora_steps + head_steps == 0:
        return []
    label = _safe_label(dataset_label)
    saved = []
    lora_rel = enc_rel = None
    if lora and lora_steps > 0:
        lora_full, lora_rel = paths.unique_save_path("loras", f"physmaster_interrupted/{label}")
        saved.append(f"LoRA {lora_rel} (models/loras; LoraLoaderModelOnly)")
    if enc is not None:
        enc_full, enc_rel = paths.unique_save_path(paths.FOLDER, f"interrupted/{label}")
        saved.append(f"encoder {enc_rel} (models/physmaster; PhysMasterEncoderLoader)")
    entries = [stage_entry(stage, n, config, interrupted=cut, stopped=stopped, base_model=base_model,
                           dataset=dataset_label, dataset_size=n_items,
                           lora_file=lora_rel if lora_steps > 0 else None)
               for stage, n, stopped, cut in done]
    if lora_rel is not None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in lora.items()}
        provenance = {"kind": "dit lora", "holds": "the DiT LoRA after the steps below",
                      "stages": [e for e in entries if "lora" in e["trains"]], "encoder_file": enc_rel,
                      "base_model": base_model, "interrupted": True}
        with atomic_path(lora_full) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt", "physmaster.provenance": json.dumps(provenance)})
    if enc is not None:
        enc.provenance.setdefault("stages", []).extend(entries)
        if base_model:
            enc.provenance["base_model"] = base_model
        enc.save(enc_full)
    return saved


def _trains(stage: str) -> str:
    from ..physmaster.training import STAGE_TRAINS

    return STAGE_TRAINS.get(stage, "")


def _with_memory(preflight: str, memory: str) -> str:
    """The pre-flight line with the memory estimate in place of the weights' size alone."""
    return f"{preflight}; {memory}" if memory else preflight


def _with_skips(preflight: str, n: int, noun: str, problems: list[str], skips: list[tuple[str, str]],
                text: str) -> str:
    """'6 pairs, 3 skipped: non-finite latents in group …; latents [...], ...' then the per-stage lines.
    `problems`: sentences from the group header checks (they say how many pairs each cost); `skips`: (reason,
    group) per pair or video skipped for its data."""
    count = sum(int(m.group(1)) for m in (re.search(r"its (\d+) pairs? skipped", p) for p in problems) if m)
    count += len(skips)
    head = f"{n} {noun}"
    if count and preflight.startswith(head):
        reasons = "; ".join(problems + ([describe_skips(skips, count=False)] if skips else []))
        preflight = f"{head}, {count} skipped: {reasons} |" + preflight[len(head):].lstrip(",")
    return preflight + "\n" + text


def _outputs_of(enc, lora_sd, loss_map, text: str, histories: list) -> io.NodeOutput:
    ui = {"text": [text], "physmaster_train": [json.dumps(histories, default=float)]}
    return io.NodeOutput(enc, lora_sd, loss_map, text, ui=ui)


def _common_inputs(default_steps: int) -> list:
    return [
        io.Int.Input("steps", default=default_steps, min=1, max=100000, tooltip="Optimizer steps per stage."),
        io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-6,
                       tooltip="AdamW learning rate."),
        io.Int.Input("lora_rank", default=8, min=0, max=256,
                     tooltip="Rank of the DiT LoRA (0 = no LoRA: train the head only)."),
        io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Videos (or pairs) per step."),
        io.Int.Input("training_seed", default=0, min=0, max=2**31 - 1,
                     tooltip="Data order, noise and t of every step: the same seed and data give the same result."),
        io.Boolean.Input("gradient_checkpointing", default=True,
                         tooltip="Recompute activations in backward: much less memory, about 30% slower."),
    ]


def _memory_inputs() -> list:
    """Memory widgets, appended after each node's existing widgets (widget order is public API); optional, so API
    prompts written before them still run (with the defaults)."""
    return [
        io.Combo.Input("training_dtype", options=TRAINING_DTYPES, default="auto", optional=True,
                       tooltip="Compute dtype of training (autocast, as core Train LoRA): auto = bf16 on a GPU that "
                               "has it, as loaded on a CPU; none = the model's own. fp8 weights: load the model "
                               "with UNETLoader weight_dtype fp8_e4m3fn, they are cast layer by layer."),
        io.Boolean.Input("offloading", default=False, optional=True,
                         tooltip="Keep the weights that do not fit next to the training in system RAM (ComfyUI's "
                                 "partial loading) instead of loading the whole model on the GPU."),
        io.Boolean.Input("split_passes", default=False, optional=True,
                         tooltip="One video per forward/backward pass with gradient accumulation (Flow-DPO: "
                                 "winner and loser apart, policy errors from an extra pass without a graph): "
                                 "about half the activation memory, about 20% slower."),
        io.Boolean.Input("activations_on_cpu", default=False, optional=True,
                         tooltip="Keep what backward needs (each checkpointed block's input) in system RAM."),
        io.Boolean.Input("quantized_backward", default=False, optional=True,
                         tooltip="fp8 matrix products in backward for fp8-quantized models (core Train LoRA's "
                                 "option; needs an NVIDIA Ada/Hopper GPU)."),
    ]


def _outputs() -> list:
    return [
        PhysEncoderType.Output(display_name="encoder", tooltip="The trained encoder (save it with "
                                                               "PhysMasterEncoderSave)."),
        LoraModelType.Output(display_name="lora", tooltip="The DiT LoRA: core SaveLoRA saves it, "
                                                           "LoraLoaderModelOnly loads it."),
        LossMapType.Output(display_name="loss", tooltip="Per-step losses for core LossGraph."),
        io.String.Output(display_name="summary"),
    ]


class PhysMasterTrainDPO(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhysMasterTrainDPO",
            display_name="PhysMaster Train DPO",
            category=f"{CATEGORY}/training",
            description="Flow-DPO on your preference pairs, on this model, on your GPU: Stage II trains a DiT LoRA, "
                        "Stage III the physical head only (PhysMaster, arXiv 2510.13809).",
            is_experimental=True,
            hidden=[io.Hidden.unique_id],
            inputs=[
                io.Model.Input("model", tooltip="The video model the pairs were sampled with."),
                PhysEncoderType.Input("encoder", tooltip="The encoder whose tokens conditioned the candidates."),
                PhysPreferencesType.Input("preferences", tooltip="From PhysMasterPreferenceDataset."),
                io.Combo.Input("stage", options=list(DPO_STAGES), default="head (Stage III)",
                               tooltip="What to train: the head (Stage III), a DiT LoRA (Stage II), or both in turn."),
                *_common_inputs(100),
                io.Float.Input("beta", default=500.0, min=0.001, max=1e6, step=1.0,
                               tooltip="Flow-DPO beta: how strongly to follow the preferences (constant, as in the "
                                       "paper)."),
                *_memory_inputs(),
                # appended after the memory widgets (widget order is public API); optional, so older prompts and
                # workflows run as before (margins ignored)
                io.Combo.Input("margin_use", options=list(MARGIN_USES), default="ignore", optional=True,
                               tooltip="How the pairs' margins are used. ignore: every pair weighs the same (the "
                                       "paper's loss). weight: each pair's loss is scaled by its margin over the mean "
                                       "margin of its source (judge: the judge's confidence; human: the rank gap), so "
                                       "each source averages 1. filter: judge pairs whose confidence is below "
                                       "min_margin are left out (your own pairs are always kept). filter and weight: "
                                       "both."),
                io.Float.Input("min_margin", default=0.1, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="With margin_use filter: the lowest judge confidence (0..1) a pair needs to be "
                                       "trained on."),
            ],
            outputs=_outputs(),
        )

    @classmethod
    def execute(cls, model, encoder, preferences, stage, steps, learning_rate, lora_rank, batch_size, training_seed,
                gradient_checkpointing, beta, training_dtype="auto", offloading=False, split_passes=False,
                activations_on_cpu=False, quantized_backward=False, margin_use="ignore",
                min_margin=0.1) -> io.NodeOutput:
        stages = DPO_STAGES.get(stage)
        if stages is None:
            raise PhysMasterError(f"stage must be one of {list(DPO_STAGES)}")
        if "dpo-lora" in stages and lora_rank < 1:
            raise PhysMasterError("Stage II trains a DiT LoRA: set lora_rank >= 1")
        dataset = preferences["dataset"]
        given = preferences["pairs"]
        options = MemoryOptions(training_dtype, offloading, split_passes, activations_on_cpu, quantized_backward)
        check_memory_options(model, options)
        config = TrainConfig(steps=steps, lr=learning_rate, batch_size=batch_size, seed=training_seed, beta=beta,
                             gradient_checkpointing=gradient_checkpointing, split_passes=split_passes,
                             activations_on_cpu=activations_on_cpu, margin_use=margin_use,
                             min_margin=float(min_margin))
        # the groups may have changed since the Dataset node read them: the same header checks again
        pairs, problems = dataset.screen_pairs(given)
        # then the data itself: a pair whose latents or conditioning hold NaN/inf is skipped and named
        loaded = {g: dataset.load_group(g) for g in sorted({p.group for p in pairs})}
        checks = {g: nonfinite_group(t) for g, t in loaded.items()}
        nonfinite: list[tuple[str, str]] = []
        usable = []
        for p in pairs:
            parts, bad = checks[p.group]
            why = parts + (["latents"] if p.winner in bad or p.loser in bad else [])
            if why:
                nonfinite.append(("non-finite " + ", ".join(why), p.group))
            else:
                usable.append(p)
        pairs = usable
        if not pairs:
            raise PhysMasterError(f"none of the {len(given)} pairs of dataset {dataset.name!r} can be trained on: "
                                  + "; ".join(problems + [describe_skips(nonfinite, count=False)]).strip("; ")
                                  + ". Re-mark those groups with PhysMasterPreferencePicker or remove them.")
        # the margins (margin_use): the filter here, so the count is in the summary and an empty result is an error
        # before the model is touched; the trainer applies the same plan (the weights) to the pairs it gets
        try:
            margins = plan_margins(pairs, margin_use, min_margin)
        except DataError as e:
            raise PhysMasterError(f"dataset {dataset.name!r}: {e} (widgets margin_use and min_margin of this "
                                  "node)") from None
        pairs = margins.kept
        groups = sorted({p.group for p in pairs})
        loaded = {g: loaded[g] for g in groups}
        first = loaded[groups[0]]
        feats = first.get("features")
        summary = _preflight(encoder, int(first["context"].shape[-1]), None if feats is None else int(feats.shape[-1]),
                             len(given), "pairs", "preference dataset", model, tuple(first["latents"].shape[1:]))
        tokens = int(first["context"].shape[-2]) + (encoder.config.num_tokens if encoder is not None else 0)
        mem_text, memory = memory_preflight(model, stages, tuple(first["latents"].shape[1:]), tokens, encoder,
                                            lora_rank, batch_size, gradient_checkpointing, options)
        summary = _with_memory(summary, mem_text)
        if margin_use != "ignore":
            summary += "\n" + margins.summary()
        log.info("PhysMaster TrainDPO: %s", summary)
        index = {g: i for i, g in enumerate(groups)}

        def make_inputs():
            positives = [comfy_conditioning({k: _clone(v) for k, v in loaded[g].items()}) for g in groups]
            return positives, _clone(loaded[groups[0]]["latents"][:1])

        def build(conds):
            items, constants, uses_mask = [], {}, False
            for p in pairs:
                tensors = loaded[p.group]
                processed = conds[index[p.group]]
                mask = tensors.get("cond.attention_mask")
                uses_mask = uses_mask or "attention_mask" in processed.get("model_conds", {})
                cond, constants = _conditioning_from_processed(tensors["context"], mask, tensors.get("features"),
                                                               processed)
                items.append(PreferencePair(cond=cond, winner=_clone(tensors["latents"][p.winner]),
                                            loser=_clone(tensors["latents"][p.loser]), source=p.source,
                                            margin=p.margin, group=p.group))
            data = PreferenceSet(items)
            return {s: data for s in stages}, constants, uses_mask

        enc, lora_sd, loss_map, text, histories, skips = _run(cls, model, encoder, stages, make_inputs, build,
                                                              config, lora_rank, dataset.name, len(pairs),
                                                              options, memory)
        return _outputs_of(enc, lora_sd, loss_map, _with_skips(summary, len(given), "pairs", problems,
                                                               nonfinite + skips, text), histories)


class PhysMasterTrainSFT(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhysMasterTrainSFT",
            display_name="PhysMaster Train SFT",
            category=f"{CATEGORY}/training",
            description="Stage I: supervised flow matching on clean video latents (the physical head and a DiT LoRA), "
                        "with the conditioning PhysMasterApply made for them.",
            is_experimental=True,
            hidden=[io.Hidden.unique_id],
            inputs=[
                io.Model.Input("model", tooltip="The video model to adapt."),
                PhysEncoderType.Input("encoder", tooltip="The encoder to train (e.g. PhysMasterEncoderNew)."),
                io.Latent.Input("latents", tooltip="Clean video latents (VAEEncode of real videos), batch = videos."),
                io.Conditioning.Input("positive", tooltip="Their conditioning, from PhysMasterApply (one entry for "
                                                          "all videos, or one per video)."),
                io.Combo.Input("train", options=SFT_TRAIN, default="head and lora", tooltip="What Stage I trains."),
                *_common_inputs(200),
                *_memory_inputs(),
                io.Float.Input("token_dropout", default=0.0, min=0.0, max=0.9, step=0.01, optional=True,
                               tooltip="Fraction of the training samples whose physical tokens are zeroed (condition "
                                       "dropout, as the demo's Stage I does at 0.1): the DiT keeps a token-free "
                                       "path, so PhysMasterApply's 'positive, negative zeroed' gives CFG an "
                                       "unconditional it has seen. 0: off."),
            ],
            outputs=_outputs(),
        )

    @classmethod
    def execute(cls, model, encoder, latents, positive, train, steps, learning_rate, lora_rank, batch_size, training_seed,
                gradient_checkpointing, training_dtype="auto", offloading=False, split_passes=False,
                activations_on_cpu=False, quantized_backward=False, token_dropout=0.0) -> io.NodeOutput:
        if train not in SFT_TRAIN:
            raise PhysMasterError(f"train must be one of {SFT_TRAIN}")
        if train == "head only":
            lora_rank = 0
        samples = latents["samples"]
        n = int(samples.shape[0])
        if len(positive) not in (1, n):
            raise PhysMasterError(f"positive has {len(positive)} entries for {n} videos: give one shared entry or "
                                  "one per video")
        entries = []
        for context, extra in positive:
            record = extra.get(RECORD_KEY) or {}
            mask = extra.get("attention_mask")
            base, mask = strip_tokens(context, int(record.get("num_tokens", 0)), mask)
            clean = {k: v for k, v in extra.items() if k not in (RECORD_KEY, "attention_mask")}
            if mask is not None:
                clean["attention_mask"] = mask
            entries.append((base, clean, record.get("features")))
        feats = entries[0][2]
        summary = _preflight(encoder, int(entries[0][0].shape[-1]),
                             None if feats is None else int(feats.shape[-1]), n, "videos", "training videos", model,
                             tuple(samples.shape[1:]))
        options = MemoryOptions(training_dtype, offloading, split_passes, activations_on_cpu, quantized_backward)
        tokens = int(entries[0][0].shape[-2]) + (encoder.config.num_tokens if encoder is not None else 0)
        mem_text, memory = memory_preflight(model, ["sft"], tuple(samples.shape[1:]), tokens,
                                            encoder, lora_rank,
                                            min(batch_size, n), gradient_checkpointing, options)
        summary = _with_memory(summary, mem_text)
        config = TrainConfig(steps=steps, lr=learning_rate, batch_size=batch_size, seed=training_seed,
                             gradient_checkpointing=gradient_checkpointing, split_passes=split_passes,
                             activations_on_cpu=activations_on_cpu, token_dropout=float(token_dropout))

        def make_inputs():
            return [[_clone(b), dict(c)] for b, c, _ in entries], _clone(samples[:1])

        def build(conds):
            items, constants, uses_mask = [], {}, False
            for i in range(n):
                base, clean, f = entries[i if len(entries) == n else 0]
                processed = conds[i if len(entries) == n else 0]
                uses_mask = uses_mask or "attention_mask" in processed.get("model_conds", {})
                cond, constants = _conditioning_from_processed(base, clean.get("attention_mask"), f, processed)
                items.append(VideoSample(latent=_clone(samples[i]), cond=cond, name=str(i)))
            return {"sft": VideoSet(items)}, constants, uses_mask

        enc, lora_sd, loss_map, text, histories, skips = _run(cls, model, encoder, ["sft"], make_inputs, build,
                                                              config, lora_rank, "graph latents", n, options, memory)
        return _outputs_of(enc, lora_sd, loss_map, _with_skips(summary, n, "videos", [], skips, text), histories)
