"""Corrupted versions of a scene's video, each breaking exactly one law, for validating the judge.

Re-rendered corruptions go through `render_scene(..., **overrides)` with the scene's own seed, so everything
but the one violated law is physically exact and identical to the original scene.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ..errors import PhysMasterError
from .scene import Scene, render_scene


def _rerender(scene: Scene, name: str, **overrides) -> Scene:
    m = scene.meta
    kw = dict(m.get("overrides", {}))
    kw.update(overrides)
    out = render_scene(m["seed"], m["split"], m["size"], m["frames"], m["fps"], **kw)
    out.meta["corruption"] = name
    return out


def _rng(scene: Scene, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(scene.meta["seed"]) & 0xFFFFFFFF, salt, 7])


def time_reversed_after_impact(scene: Scene) -> Scene:
    """Frames after the first impact are played backwards (energy appears from nowhere)."""
    k = scene.meta.get("first_impact_frame")
    T = len(scene.frames)
    if k is None or k >= T - 1:
        raise PhysMasterError("this scene has no impact before its last frame; render more frames or a "
                              "higher drop to time-reverse after impact")
    idx = np.concatenate([np.arange(k), np.arange(k, T)[::-1]])
    meta = dict(scene.meta, corruption="time_reversed_after_impact", reversed_from_frame=int(k))
    return replace(scene, frames=scene.frames[idx], masks=scene.masks[idx],
                   trajectories=scene.trajectories[idx], meta=meta)


def constant_velocity(scene: Scene) -> Scene:
    """No gravity: the object falls at the constant speed that reaches the first impact point at the same time
    (exact zero-gravity physics, restitution unchanged, so it rebounds upward at constant speed)."""
    m = scene.meta
    g = m["gravity"]
    impacts = m.get("impact_times") or []
    x0, y0 = m["initial_position"]
    vx, vy = m["initial_velocity"]
    if impacts:
        t1 = impacts[0]
        drop = vy * t1 + 0.5 * g * t1 * t1
        v = drop / t1
    else:
        v = vy + g * (m["frames"] - 1) / m["fps"] / 2
    return _rerender(scene, "constant_velocity", gravity=0.0, initial_velocity=(vx, v))


def gravity_scaled(scene: Scene, factor: float) -> Scene:
    """The same scene under `factor` x its gravity."""
    return _rerender(scene, f"gravity_x{factor:g}", gravity=scene.meta["gravity"] * float(factor))


def teleport(scene: Scene) -> Scene:
    """The object jumps sideways by 18-28% of the image width at a frame in the middle half of the video."""
    m = scene.meta
    rng = _rng(scene, 1)
    T, S = m["frames"], m["size"]
    frame = int(rng.integers(T // 4, max(T // 4 + 1, 3 * T // 4)))
    x = float(scene.trajectories[min(frame, T - 1), 0, 0])
    dx = float(rng.uniform(0.18, 0.28) * S) * (1 if x < S / 2 else -1)
    return _rerender(scene, "teleport", teleport=(frame, dx, 0.0))


def size_change(scene: Scene) -> Scene:
    """The object grows to 1.6x or shrinks to 0.6x its size (linearly over the video)."""
    end = 1.6 if _rng(scene, 2).random() < 0.5 else 0.6
    return _rerender(scene, "size_change", scale_end=end)


def pass_through_floor(scene: Scene) -> Scene:
    """The object ignores the floor (and the block) and falls through it, out of the image."""
    return _rerender(scene, "pass_through_floor", floor_collisions=False)


CORRUPTIONS = {
    "time_reversed_after_impact": time_reversed_after_impact,
    "constant_velocity": constant_velocity,
    "gravity_x0.5": lambda s: gravity_scaled(s, 0.5),
    "gravity_x2": lambda s: gravity_scaled(s, 2.0),
    "teleport": teleport,
    "size_change": size_change,
    "pass_through_floor": pass_through_floor,
}


def corrupt(scene: Scene, kind: str) -> Scene:
    """The corrupted scene of one kind (see CORRUPTIONS)."""
    if kind not in CORRUPTIONS:
        raise PhysMasterError(f"unknown corruption {kind!r}; use one of {sorted(CORRUPTIONS)}")
    return CORRUPTIONS[kind](scene)
