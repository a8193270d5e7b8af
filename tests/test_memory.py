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
