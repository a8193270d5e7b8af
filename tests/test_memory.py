"""Up-front memory estimates (issue 9 item 6): computed from settings alone, close to what is really allocated."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from physmaster.encoder import HeadConfig, PhysEncoder
from physmaster.memory import GiB, TooLargeError, check_fits, head_bytes, head_parameter_count, scene_bytes
from physmaster.physics import render_scene


def test_head_estimate_is_exact_in_parameters_and_needs_no_memory():
    cfg = HeadConfig(in_dim=96, context_dim=80, num_tokens=5, hidden_dim=32, depth=2, heads=4)
    real = PhysEncoder.new(cfg, seed=0).head
    assert head_parameter_count(cfg) == sum(p.numel() for p in real.parameters())
    weights = sum(p.numel() * p.element_size() for p in real.parameters())
    assert weights <= head_bytes(cfg) <= 2 * weights
    # the schema maxima (~74 GiB) are estimated instantly on the meta device
    top = HeadConfig(in_dim=16384, context_dim=16384, num_tokens=1024, hidden_dim=8192, depth=24, heads=64)
    assert 70 * GiB < head_bytes(top) < 80 * GiB


@pytest.mark.parametrize("size,frames", [(64, 16), (160, 12), (256, 8)])
def test_scene_estimate_covers_the_measured_peak(size, frames):
    for seed in (0, 1, 2):
        tracemalloc.start()
        try:
            scene = render_scene(seed, split="unseen" if seed % 2 else "seen", size=size, frames=frames)
            torch.from_numpy(np.ascontiguousarray(scene.frames, dtype=np.float32))
            torch.from_numpy(scene.object_masks().astype(np.float32))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak <= scene_bytes(size, frames), (size, frames, seed, peak)
    assert scene_bytes(1024, 1024) > 12 * GiB


def test_check_fits_names_the_estimate_and_the_free_memory():
    check_fits("x", 10, 20, "fix")
    check_fits("x", 10, None, "fix")
    with pytest.raises(TooLargeError) as err:
        check_fits("a drop scene of 1024 frames at 1024x1024", scene_bytes(1024, 1024), 8 * GiB, "lower size.")
    msg = str(err.value)
    assert "64.0 GiB" in msg and "8.0 GiB free" in msg and "lower size." in msg and "1024x1024" in msg


# -- training accounting (issue 10) -------------------------------------------------------------------------------

class _Block(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.a, self.b = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x, ctx):
        return x + self.b(torch.nn.functional.gelu(self.a(x + ctx.mean(1, keepdim=True))))


class _Net(torch.nn.Module):
    def __init__(self, d=64, n=3):
        super().__init__()
        self.blocks = torch.nn.ModuleList(_Block(d) for _ in range(n))
        self.out = torch.nn.Linear(d, d)

    def forward(self, x, ctx):
        for b in self.blocks:
            x = b(x, ctx)
        return self.out(x)


def _real_saved(net, x, ctx) -> int:
    """Bytes autograd really keeps for backward (each storage once, weights excluded)."""
    weights = {p.untyped_storage().data_ptr() for p in net.parameters()}
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in weights and key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        net(x, ctx)
    return total


def test_meta_profile_counts_what_autograd_really_keeps_without_allocating():
    from physmaster.memory import profile_activations

    with torch.device("meta"):
        meta_net = _Net()
    tokens, d = 100, 64

    def forward():
        x = torch.empty(1, tokens, d, device="meta", requires_grad=True)
        ctx = torch.empty(1, 10, d, device="meta", requires_grad=True)
        return meta_net(x, ctx)

    prof = profile_activations(forward, list(meta_net.blocks), exclude=list(meta_net.parameters()), tokens=tokens)
    real = _real_saved(_Net(), torch.randn(1, tokens, d, requires_grad=True), torch.randn(1, 10, d,
                                                                                          requires_grad=True))
    # what stays alive after the forward: everything autograd saved, plus the output (and tiny context means)
    assert real == 716800
    assert real + tokens * d * 4 <= prof.saved_total <= 1.1 * (real + tokens * d * 4)
    assert prof.blocks == 3 and prof.block_input == tokens * d * 4 and prof.shared_inputs == 10 * d * 4
    assert prof.block_saved * 3 + prof.outside_saved == prof.saved_total
    assert prof.block_peak >= prof.block_saved > prof.block_peak_nograd > 0
    assert prof.block_stash == 0  # nothing hidden from the saved-tensor hooks in plain PyTorch layers


def test_training_estimate_follows_the_options():
    from physmaster.memory import ActivationProfile, TrainingPlan, estimate_training, fitting_plans

    mib = 2 ** 20
    prof = ActivationProfile(blocks=40, block_input=320 * mib, shared_inputs=40 * mib, block_saved=6000 * mib,
                             block_peak=7500 * mib, block_peak_nograd=3200 * mib, saved_total=40 * 6000 * mib,
                             outside_saved=350 * mib, io=8 * mib, tokens=32760)
    kw = dict(weights=15 * GiB, largest_weight=300 * mib, trainable_params=5_000_000)

    def est(**plan):
        return estimate_training(prof, TrainingPlan(stage="dpo-head", **plan), available=22 * GiB, **kw)

    full = est(gradient_checkpointing=False)
    ckpt = est()
    split = est(split_passes=True)
    cpu = est(split_passes=True, activations_on_cpu=True)
    off = est(split_passes=True, activations_on_cpu=True, offloading=True)
    assert full.activations > ckpt.activations > split.activations > cpu.activations
    assert ckpt.activations == 2 * split.activations  # winner and loser apart: half
    assert cpu.host_activations == 40 * 320 * mib + 40 * mib and split.host_activations == 0
    assert off.weights_resident < off.weights and off.peak <= 22 * GiB
    assert est(split_passes=True).trainable == 16 * 5_000_000 + 4 * 5_000_000  # + Stage III's reference head
    fits = fitting_plans(lambda p: estimate_training(prof, p, available=22 * GiB, **kw),
                         TrainingPlan(stage="dpo-head"), 22 * GiB)
    assert fits and all(f.peak <= 22 * GiB for f in fits)
    traffic = [f.weights - f.weights_resident + f.host_activations for f in fits]
    assert traffic[0] == min(traffic)  # the least moved over PCIe first
    assert not any(f.plan.describe() == "gradient_checkpointing" for f in fits)  # 41 GiB of activations
    assert "estimated peak" in off.describe() and "offloaded" in off.describe() and "CPU memory" in off.describe()


def test_saved_on_cpu_changes_nothing_on_the_cpu():
    from physmaster.memory import saved_on_cpu

    torch.manual_seed(0)
    net, x = _Net(d=16, n=2), torch.randn(1, 8, 16)
    ctx = torch.randn(1, 4, 16)
    net(x, ctx).square().sum().backward()
    plain = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    with saved_on_cpu(min_bytes=0):
        y = net(x, ctx)
    y.square().sum().backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(plain, net.parameters()))
