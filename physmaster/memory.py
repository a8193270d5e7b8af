"""Up-front memory estimates for what a node is about to allocate, so absurd widget values are refused with the
number instead of dying in the allocator (or swapping the machine to a halt).

Every estimate is computed from the settings alone, before anything is allocated: the head is built on the meta
device (exact parameter count, whatever its shape), the scene from its array sizes.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

from .errors import PhysMasterError

GiB = 2 ** 30


class TooLargeError(PhysMasterError):
    """The settings need more memory than the machine has free."""


def head_parameter_count(config) -> int:
    """Parameters of a PhysHead with this HeadConfig, counted on the meta device (nothing is allocated)."""
    import torch

    from .encoder import PhysHead

    with torch.device("meta"):
        head = PhysHead(config)
    return sum(p.numel() for p in head.parameters())


def head_bytes(config) -> int:
    """Bytes a fresh head needs in memory: its fp32 weights, plus the largest one again for initialisation."""
    import torch

    from .encoder import PhysHead

    with torch.device("meta"):
        head = PhysHead(config)
    sizes = [p.numel() * 4 for p in head.parameters()]
    return sum(sizes) + max(sizes, default=0)


SCENE_BYTES_PER_PIXEL = 64  # measured peak (tracemalloc): 55-59 bytes per pixel of every frame


def scene_bytes(size: int, frames: int) -> int:
    """Peak bytes of rendering one drop scene and handing it to ComfyUI (physics.render_scene, DropScene).

    Per pixel of every frame: the padded RGB float32 canvas and object coverage, the clipped RGB video, masks of
    up to two objects, the float32 mask output, the per-frame object coverage; measured at 55-59 bytes, counted
    as SCENE_BYTES_PER_PIXEL, plus 16 MiB for everything per scene."""
    return int(frames) * int(size) * int(size) * SCENE_BYTES_PER_PIXEL + 16 * 2 ** 20


def describe(n_bytes: float) -> str:
    if n_bytes >= GiB:
        return f"{n_bytes / GiB:.1f} GiB"
    return f"{n_bytes / 2 ** 20:.0f} MiB"


def check_fits(what: str, needed: int, available: int | None, fix: str) -> None:
    """Raise TooLargeError naming `what`, the estimate and the free memory when `needed` exceeds `available`."""
    if available is None or needed <= available:
        return
    raise TooLargeError(f"{what} needs about {describe(needed)} of memory but this machine has "
                        f"{describe(available)} free; {fix}")


# -- training: where autograd keeps activations, and what a step needs ------------------------------------------


@contextlib.contextmanager
def saved_on_cpu(min_bytes: int = 1 << 20):
    """What autograd saves for backward inside this context is held in CPU memory (pinned when CUDA is there) and
    brought back for backward, like `torch.autograd.graph.save_on_cpu`, except that parameters, tensors already on
    the CPU and small tensors stay where they are (the weights are not copied every step). With gradient
    checkpointing this is what the checkpoints keep: each block's input."""
    import torch

    pin = torch.cuda.is_available()

    def pack(t):
        if isinstance(t, torch.nn.Parameter) or t.device.type in ("cpu", "meta") \
                or t.numel() * t.element_size() < min_bytes:
            return t
        cpu = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=pin)
        cpu.copy_(t, non_blocking=pin)
        return (t.device, cpu)

    def unpack(packed):
        if isinstance(packed, tuple):
            device, cpu = packed
            return cpu.to(device, non_blocking=pin)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class MetaTrace:
    """A simulated allocator for a pass over meta tensors (nothing is allocated): the bytes alive at every moment
    (each storage counted once, freed when its last tensor goes), their peak, and what autograd saves for
    backward, in named regions (e.g. one per transformer block). Tensors in `exclude` (the weights) and tensors
    made before the trace are not counted.

        with MetaTrace(exclude=weights) as tr:
            with tr.region("block0"): ...
        tr.peak, tr.saved, tr.regions["block0"]"""

    def __init__(self, exclude=()):
        self._exclude = {_storage_key(t) for t in exclude}
        self._count: dict[int, int] = {}
        self._bytes: dict[int, int] = {}
        self._ids: set[int] = set()
        self._saved_keys: set[int] = set()
        self.live = 0
        self.peak = 0
        self.saved = 0
        self.regions: dict[str, dict] = {}
        self._stack: list[str] = []
        self._mode = None
        self._hooks = None

    # what runs inside
    def _track(self, t) -> None:
        import weakref

        if id(t) in self._ids:
            return
        key = _storage_key(t)
        if key in self._exclude:
            return
        self._ids.add(id(t))
        if self._count.get(key, 0) == 0:
            size = t.untyped_storage().nbytes()
            self._bytes[key] = size
            self.live += size
            if self.live > self.peak:
                self.peak = self.live
            for name in self._stack:
                r = self.regions[name]
                r["peak"] = max(r["peak"], self.live - r["entry"])
        self._count[key] = self._count.get(key, 0) + 1
        weakref.finalize(t, self._release, key, id(t))

    def _release(self, key: int, ident: int) -> None:
        self._ids.discard(ident)
        self._count[key] -= 1
        if self._count[key] == 0:
            self.live -= self._bytes.pop(key)
            del self._count[key]

    def _pack(self, t):
        key = _storage_key(t)
        if key not in self._exclude and key not in self._saved_keys:
            self._saved_keys.add(key)
            size = t.untyped_storage().nbytes()
            self.saved += size
            for name in self._stack:
                self.regions[name]["saved"] += size
        return t

    @contextlib.contextmanager
    def region(self, name: str):
        self._enter(name)
        try:
            yield self.regions[name]
        finally:
            self._exit(name)

    def _enter(self, name: str) -> None:
        self.regions[name] = {"entry": self.live, "peak": 0, "saved": 0}
        self._stack.append(name)

    def _exit(self, name: str) -> None:
        if name in self._stack:
            self._stack.remove(name)
            r = self.regions[name]
            r["kept"] = self.live - r["entry"]  # what the region leaves alive (its output, what backward needs)

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        trace = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        trace._track(t)
                return out

        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self._hooks.__exit__(*exc)
        return False


def _storage_key(t) -> int:
    return t.untyped_storage()._cdata


@dataclass
class ActivationProfile:
    """What one forward of a network keeps and needs, per video (batch 1), from a meta-device pass (MetaTrace)
    of the host's real blocks at the training shape. Bytes."""

    blocks: int  # transformer blocks
    block_input: int  # one block's input (what a checkpoint keeps per block)
    shared_inputs: int  # the block arguments all blocks share (context, time embedding, rope): kept once
    block_saved: int  # the most one block keeps alive for backward (no checkpointing), its output included
    block_peak: int  # the most one block needs at once with a graph (saved + temporaries)
    block_peak_nograd: int  # the same without a graph (reference and pre-passes)
    saved_total: int  # everything one forward keeps alive for backward without checkpointing
    outside_saved: int  # of which outside the blocks (embeddings, head)
    io: int  # model input + output of one video
    tokens: int  # sequence length (video tokens)
    # what a block keeps that autograd's saved-tensor hooks never see (tensors custom autograd functions hold on
    # their ctx): gradient checkpointing cannot drop it, so it stays per block even with checkpointing
    block_stash: int = 0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainingPlan:
    """The memory options of one training run (the train nodes' widgets)."""

    stage: str  # "sft", "dpo-lora" or "dpo-head"
    batch_size: int = 1
    gradient_checkpointing: bool = True
    split_passes: bool = False
    activations_on_cpu: bool = False
    offloading: bool = False

    def describe(self) -> str:
        on = [n for n in ("gradient_checkpointing", "split_passes", "activations_on_cpu", "offloading")
              if getattr(self, n)]
        return ", ".join(on) if on else "no memory options"


@dataclass
class MemoryEstimate:
    """Peak device memory of one training step, by part (bytes), and the host memory it moves there."""

    weights: int  # all weights as stored
    weights_resident: int  # of which on the device (all, unless offloading)
    cast_buffers: int  # weights cast to the compute dtype on the fly (fp8 storage, offloaded layers)
    trainable: int  # trainable weights + their gradients + AdamW's two moments (fp32), + a Stage III reference head
    activations: int  # the policy's forward + backward (per pass), what checkpoints keep included
    reference: int  # a pass without a graph (reference, DPO pre-pass)
    host_activations: int  # what `activations_on_cpu` keeps in CPU memory
    plan: TrainingPlan | None = None
    profile: ActivationProfile | None = None

    @property
    def peak(self) -> int:
        return self.weights_resident + self.cast_buffers + self.trainable + max(self.activations, self.reference)

    @property
    def without_weights(self) -> int:
        """What the step adds to a model that is already loaded."""
        return self.cast_buffers + self.trainable + max(self.activations, self.reference)

    def describe(self) -> str:
        off = self.weights - self.weights_resident
        parts = [f"estimated peak {describe(self.peak)}: weights {describe(self.weights_resident)}"
                 + (f" ({describe(off)} offloaded)" if off > 0 else ""),
                 f"activations {describe(max(self.activations, self.reference))}",
                 f"trainable + optimizer {describe(self.trainable)}"]
        if self.cast_buffers:
            parts.append(f"cast buffers {describe(self.cast_buffers)}")
        text = ", ".join(parts)
        if self.host_activations:
            text += f"; {describe(self.host_activations)} of activations in CPU memory"
        return text


def estimate_training(profile: ActivationProfile, plan: TrainingPlan, *, weights: int, largest_weight: int,
                      trainable_params: int, cast: bool = False, lora_params: int = 0,
                      available: int | None = None) -> MemoryEstimate:
    """Peak device memory of a training step from an ActivationProfile (per video) and the plan.

    Videos per pass: Flow-DPO batches winner and loser (2 x batch), `split_passes` runs one video at a time; Stage
    I batches `batch_size` videos. With gradient checkpointing a pass keeps each block's input (in CPU memory
    with `activations_on_cpu`), the layers outside the blocks keep theirs, and backward recomputes one block at a
    time (its peak with a graph, plus the incoming and outgoing gradient); without it the whole forward's saved
    tensors stay until backward. The reference (and the split DPO pre-pass) runs without a graph: one block's
    peak without one. Trainable weights cost 16 bytes per parameter (fp32 weight, gradient, two AdamW moments).
    With `offloading` the weights on the device are what fits in `available` after everything else (at least
    the cast buffers), else all of them. `cast`: weights are stored in another dtype than the compute dtype
    (fp8) or are offloaded, so each layer is cast on the fly (two of the largest at once)."""
    p = profile
    per_pass = 1 if plan.split_passes else (2 * plan.batch_size if plan.stage != "sft" else plan.batch_size)
    if plan.gradient_checkpointing:
        boundary = p.blocks * (p.block_input + p.block_stash) + p.shared_inputs
        on_device = 2 * p.block_input if plan.activations_on_cpu else boundary
        act = per_pass * (on_device + p.outside_saved + p.block_peak + 2 * p.block_input + p.io)
        host = per_pass * boundary if plan.activations_on_cpu else 0
    else:
        # backward walks the kept tensors down, one block's temporaries and the gradients in flight on top
        act = per_pass * (p.saved_total + max(0, p.block_peak - p.block_saved) + 2 * p.block_input + p.io)
        host = 0
    ref_pass = 1 if plan.split_passes else per_pass
    reference = ref_pass * (p.block_peak_nograd + p.io) if plan.stage != "sft" else 0
    trainable = 16 * (trainable_params + lora_params) + (4 * trainable_params if plan.stage == "dpo-head" else 0)
    cast_buffers = 2 * largest_weight if (cast or plan.offloading) else 0
    resident = weights
    if plan.offloading:
        rest = cast_buffers + trainable + max(act, reference)
        room = (available - rest) if available is not None else weights
        resident = max(0, min(weights, room))
    return MemoryEstimate(weights=weights, weights_resident=resident, cast_buffers=cast_buffers,
                          trainable=trainable, activations=act, reference=reference, host_activations=host,
                          plan=plan, profile=profile)


#: the options tried, cheapest in time first, when a plan does not fit
PLAN_LADDER = (
    dict(gradient_checkpointing=True),
    dict(gradient_checkpointing=True, split_passes=True),
    dict(gradient_checkpointing=True, offloading=True),
    dict(gradient_checkpointing=True, split_passes=True, offloading=True),
    dict(gradient_checkpointing=True, split_passes=True, activations_on_cpu=True),
    dict(gradient_checkpointing=True, split_passes=True, activations_on_cpu=True, offloading=True),
)


def fitting_plans(estimate_fn, plan: TrainingPlan, available: int) -> list[MemoryEstimate]:
    """The ladder's plans (same stage and batch) whose estimate fits `available`, the least traffic between
    system RAM and the device first (offloaded weights + activations kept on the CPU): `estimate_fn(plan)` ->
    MemoryEstimate."""
    out = []
    for options in PLAN_LADDER:
        candidate = TrainingPlan(stage=plan.stage, batch_size=plan.batch_size, **{
            "gradient_checkpointing": False, "split_passes": False, "activations_on_cpu": False,
            "offloading": False, **options})
        est = estimate_fn(candidate)
        if est.peak <= available:
            out.append(est)
    return sorted(out, key=lambda e: e.weights - e.weights_resident + e.host_activations)


def profile_activations(forward, blocks, exclude=(), tokens: int = 0) -> ActivationProfile:
    """An ActivationProfile from two passes of `forward()` over meta tensors (one with a graph, one without),
    with a MetaTrace region per module in `blocks`. `forward()` must build its inputs on the meta device (with
    requires_grad where the training's gradients flow) and return the output; `exclude`: the weights (meta),
    which are accounted for separately. Nothing is allocated."""
    import torch

    def run(grad: bool):
        trace = MetaTrace(exclude)
        inputs: dict[str, int] = {}
        handles = []
        for i, block in enumerate(blocks):
            name = f"block{i}"

            def pre(module, args, kwargs, _name=name):
                trace._enter(_name)
                if _name == "block0":
                    tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
                    if tensors:
                        x = tensors[0]
                        inputs["x"] = x.numel() * x.element_size()
                        seen = {_storage_key(x)}
                        shared = 0
                        for t in tensors[1:]:
                            if _storage_key(t) not in seen:
                                seen.add(_storage_key(t))
                                shared += t.numel() * t.element_size()
                        inputs["shared"] = shared

            def post(module, args, kwargs, output, _name=name):
                trace._exit(_name)

            handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(block.register_forward_hook(post, with_kwargs=True))
        try:
            with trace, torch.set_grad_enabled(grad):
                out = forward()
                io = sum(t.numel() * t.element_size() for t in torch.utils._pytree.tree_flatten(out)[0]
                         if isinstance(t, torch.Tensor))
                kept = trace.live  # everything the graph holds once the forward is done, the output included
        finally:
            for h in handles:
                h.remove()
        return trace, inputs, io, kept

    tr, inputs, io, kept = run(True)
    regions = list(tr.regions.values())
    nograd, _, _, _ = run(False)
    if not regions:
        raise PhysMasterError("the memory estimate found no transformer block in this model's forward")
    blocks_kept = [r.get("kept", r["saved"]) for r in regions]
    return ActivationProfile(
        blocks=len(regions), block_input=inputs.get("x", 0), shared_inputs=inputs.get("shared", 0),
        block_saved=max(blocks_kept), block_peak=max(r["peak"] for r in regions),
        block_peak_nograd=max((r["peak"] for r in nograd.regions.values()), default=0),
        saved_total=kept, outside_saved=max(0, kept - sum(blocks_kept)), io=2 * io, tokens=int(tokens),
        block_stash=max(max(0, k - r["saved"] - inputs.get("x", 0)) for k, r in zip(blocks_kept, regions)))
