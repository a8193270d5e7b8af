import json
import time

import numpy as np
import pytest

from physmaster.errors import PhysMasterError
from physmaster.physics import (BACKGROUNDS, COLOURS, SHAPES, Scene, mask_centroids, render_scene)
from physmaster.physics.scene import BG_COLOURS


def test_shapes_dtypes_and_meta_are_json():
    sc = render_scene(3, "seen", size=64, frames=32, fps=16.0)
    assert isinstance(sc, Scene)
    assert sc.frames.shape == (32, 64, 64, 3) and sc.frames.dtype == np.float32
    assert sc.frames.min() >= 0.0 and sc.frames.max() <= 1.0
    K = sc.masks.shape[1]
    assert sc.masks.shape == (32, K, 64, 64) and sc.masks.dtype == np.bool_ and K in (1, 2)
    assert sc.trajectories.shape == (32, K, 2) and sc.trajectories.dtype == np.float32
    assert sc.object_masks().shape == (32, 64, 64)
    meta = json.loads(json.dumps(sc.meta))
    for key in ("seed", "split", "size", "fps", "gravity", "restitution", "shapes", "colours", "background",
                "initial_velocity", "impact_times"):
        assert key in meta
    assert meta["gravity"] > 0 and 0 < meta["restitution"] < 1


def test_other_sizes_and_frame_rates():
    sc = render_scene(5, "unseen", size=96, frames=20, fps=24.0)
    assert sc.frames.shape == (20, 96, 96, 3)
    assert sc.object_masks().any(axis=(1, 2)).all()


def test_deterministic_by_seed_and_split():
    a, b = render_scene(11, "seen"), render_scene(11, "seen")
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.masks, b.masks)
    assert np.array_equal(a.trajectories, b.trajectories) and a.meta == b.meta
    c = render_scene(12, "seen")
    d = render_scene(11, "unseen")
    assert not np.array_equal(a.frames, c.frames)
    assert not np.array_equal(a.frames, d.frames)


def test_masks_match_trajectories():
    worst = 0.0
    for seed in range(12):
        sc = render_scene(seed, "seen" if seed % 2 else "unseen")
        c = mask_centroids(sc.object_masks())
        worst = max(worst, float(np.abs(c - sc.trajectories[:, 0]).max()))
    assert worst < 0.6, worst  # the mask of a fully visible object is centred on its true centroid


def test_object_starts_at_rest_and_falls_then_bounces():
    sc = render_scene(0, "seen")
    y = sc.trajectories[:, 0, 1]
    g = sc.meta["gravity"] / sc.meta["fps"] ** 2
    # first frames: y(t) = y0 + g t^2 / 2 exactly (from rest)
    assert abs((y[1] - y[0]) - 0.5 * g) < 1e-3
    assert abs((y[2] - 2 * y[1] + y[0]) - g) < 1e-3
    # it reaches the floor and comes back up at least once
    k = int(np.argmax(y[:20]))
    assert y[k + 1] < y[k]
    assert sc.meta["first_impact_frame"] is not None


def test_bounce_heights_follow_restitution():
    sc = render_scene(2, "seen", frames=64, has_block=False, initial_velocity=(0.0, 0.0))
    m = sc.meta
    imp = m["impact_times"]
    assert len(imp) >= 2
    g, e = m["gravity"], m["restitution"]
    # flight time between bounces 1 and 2 is 2 e v1 / g with v1 = g * t1 (dropped from rest)
    assert abs((imp[1] - imp[0]) - 2 * e * g * imp[0] / g) < 1e-6


def test_splits_are_disjoint_in_shape_colour_and_background():
    assert not set(SHAPES["seen"]) & set(SHAPES["unseen"])
    assert not set(COLOURS["seen"]) & set(COLOURS["unseen"])
    assert not set(map(tuple, COLOURS["seen"].values())) & set(map(tuple, COLOURS["unseen"].values()))
    assert not set(BACKGROUNDS["seen"]) & set(BACKGROUNDS["unseen"])
    assert not set(BG_COLOURS["seen"]) & set(BG_COLOURS["unseen"])
    seen = [render_scene(s, "seen").meta for s in range(40)]
    unseen = [render_scene(s, "unseen").meta for s in range(40)]
    for split, metas in (("seen", seen), ("unseen", unseen)):
        assert {m["shapes"][0] for m in metas} <= set(SHAPES[split])
        assert {m["colours"][0] for m in metas} <= set(COLOURS[split])
        assert {m["background"] for m in metas} <= set(BACKGROUNDS[split])
        assert {m["background_colour"] for m in metas} <= set(BG_COLOURS[split])
    # each split actually uses several of its own values
    assert len({m["shapes"][0] for m in seen}) >= 3 and len({m["shapes"][0] for m in unseen}) >= 3
    assert len({m["background"] for m in unseen}) == 3


def test_overrides_change_one_thing():
    base = render_scene(4, "seen")
    heavy = render_scene(4, "seen", gravity=base.meta["gravity"] * 2)
    assert heavy.meta["shapes"] == base.meta["shapes"] and heavy.meta["colours"] == base.meta["colours"]
    assert np.array_equal(heavy.frames[0], base.frames[0])
    assert heavy.meta["impact_times"][0] < base.meta["impact_times"][0]
    through = render_scene(4, "seen", floor_collisions=False)
    assert not through.meta["impact_times"]
    with pytest.raises(PhysMasterError, match="unknown scene override"):
        render_scene(4, "seen", wobble=1)


def test_bad_arguments():
    with pytest.raises(PhysMasterError, match="split"):
        render_scene(0, "test")
    with pytest.raises(PhysMasterError, match="size"):
        render_scene(0, size=4)
    with pytest.raises(PhysMasterError, match="frames"):
        render_scene(0, frames=1)


def test_render_is_fast():
    render_scene(0)
    times = []
    for s in range(9):
        t0 = time.perf_counter()
        render_scene(s, "seen" if s % 2 else "unseen")
        times.append(time.perf_counter() - t0)
    assert float(np.median(times)) < 0.1, times
