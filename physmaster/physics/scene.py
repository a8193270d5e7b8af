"""The proxy world: 2D objects dropped onto a floor (PISA-style), rendered with anti-aliasing on the CPU.

Coordinates are pixels with the origin at the centre of the top-left pixel: pixel (row i, column j) has its
centre at (x=j, y=i), the same convention as a mask centroid computed from `np.where` (PISA's `find_centroid`).
y points down, so gravity is positive.

Physics: object 0 starts from rest (optionally with a horizontal velocity) and falls under constant gravity;
it bounces off the floor (or off the top of a static block, object 1) with a coefficient of restitution and
comes to rest when a rebound would rise less than ~0.1 px. Objects do not rotate. Flight between contacts is
integrated in closed form inside small substeps (32 per frame), and each contact time is solved exactly from the
quadratic, so bounces are exact to float precision. Walls and the block's sides reflect the object; the scene
sampler re-draws scenes in which that would happen (or in which the object would land on a block corner), so
an unmodified scene is: free fall, bounces on one support, rest, with constant horizontal velocity.

Splits (PisaBench-like): `unseen` uses object shapes, object colours, background kinds and background colours
that `seen` never produces (see SHAPES, COLOURS, BACKGROUNDS, BG_COLOURS). Textures, floor colours and block
colours are shared by both splits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import PhysMasterError

SPLITS = ("seen", "unseen")
SHAPES = {
    "seen": ("circle", "square", "triangle", "hexagon"),
    "unseen": ("pentagon", "star", "cross", "ellipse"),
}
COLOURS = {
    "seen": {
        "red": (0.86, 0.14, 0.14),
        "blue": (0.14, 0.32, 0.90),
        "green": (0.12, 0.68, 0.24),
        "yellow": (0.96, 0.84, 0.10),
        "orange": (0.96, 0.52, 0.08),
        "white": (0.97, 0.97, 0.97),
    },
    "unseen": {
        "purple": (0.56, 0.20, 0.80),
        "cyan": (0.08, 0.80, 0.86),
        "pink": (0.97, 0.42, 0.72),
        "brown": (0.50, 0.28, 0.10),
        "lime": (0.62, 0.96, 0.18),
        "black": (0.06, 0.06, 0.06),
    },
}
BACKGROUNDS = {"seen": ("flat", "vgradient", "noise"), "unseen": ("radial", "stripes", "checker")}
BG_COLOURS = {
    "seen": {"light_grey": (0.80, 0.80, 0.80), "sky": (0.64, 0.80, 0.95), "beige": (0.90, 0.85, 0.70)},
    "unseen": {"slate": (0.26, 0.29, 0.36), "mint": (0.74, 0.92, 0.80), "lavender": (0.84, 0.79, 0.95)},
}
FLOOR_COLOURS = {"wood": (0.46, 0.34, 0.22), "concrete": (0.50, 0.50, 0.52), "moss": (0.30, 0.42, 0.28)}
BLOCK_COLOURS = {"steel": (0.36, 0.42, 0.52), "sand": (0.80, 0.68, 0.46), "teal": (0.16, 0.48, 0.50),
                 "plum": (0.42, 0.22, 0.34)}
TEXTURES = ("flat", "stripes", "checker")

#: Nominal gravity of the proxy world in image heights per second squared; each scene draws its gravity
#: log-uniformly from [0.8, 1.25] x this (the judge's default prior).
NOMINAL_GRAVITY = 3.0
GRAVITY_RANGE = (0.8, 1.25)
RESTITUTION_RANGE = (0.35, 0.8)
MIN_CONTRAST = 0.38  # Euclidean RGB distance between object colours and what they are drawn on
SUBSTEPS = 32
SUPERSAMPLE = 4

OVERRIDES = {
    "gravity": "gravity in px/s^2 (y down, so positive falls)",
    "restitution": "coefficient of restitution of object 0 (0..1 is physical)",
    "initial_velocity": "(vx, vy) of object 0 in px/s at t=0",
    "initial_position": "(x, y) of object 0's centroid in px at t=0",
    "radius": "object 0's size in px",
    "shape": "object 0's shape (any of SHAPES)",
    "colour": "object 0's colour name (any of COLOURS)",
    "texture": "object 0's texture (any of TEXTURES)",
    "background": "background kind (any of BACKGROUNDS)",
    "floor_collisions": "False lets object 0 fall through the floor and the block",
    "scale_end": "object 0's scale at the last frame (grows/shrinks linearly from 1)",
    "teleport": "(frame, dx, dy): shift object 0 by (dx, dy) px from that frame on",
    "has_block": "False removes object 1",
    "substeps": "physics substeps per frame",
}


@dataclass
class Scene:
    """One rendered scene. Object 0 is the dropped object whose motion is measured."""

    frames: np.ndarray  # float32 [T, H, W, 3] in [0, 1]
    masks: np.ndarray  # bool [T, K, H, W]
    trajectories: np.ndarray  # float32 [T, K, 2]: centroid (x, y) in px
    meta: dict[str, Any] = field(default_factory=dict)

    def object_masks(self) -> np.ndarray:
        """Masks of object 0 (the dropped object), bool [T, H, W]."""
        return self.masks[:, 0]

    @property
    def start_image(self) -> np.ndarray:
        return self.frames[0]


# ----------------------------------------------------------------------------------------------- geometry

def _regular(n: int, radius: float, phase: float = -math.pi / 2) -> np.ndarray:
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([radius * np.cos(a), radius * np.sin(a)], 1)


def _polygon(shape: str) -> np.ndarray | None:
    """Vertices (unit size, y down) with the area centroid at the origin; None for curved shapes."""
    if shape in ("circle", "ellipse"):
        return None
    if shape == "square":
        v = np.array([[-0.886, -0.886], [0.886, -0.886], [0.886, 0.886], [-0.886, 0.886]])
    elif shape == "triangle":
        v = _regular(3, 1.55)
    elif shape == "hexagon":
        v = _regular(6, 1.10, 0.0)
    elif shape == "pentagon":
        v = _regular(5, 1.15)
    elif shape == "star":
        outer, inner = _regular(5, 1.45), _regular(5, 0.62, -math.pi / 2 + math.pi / 5)
        v = np.stack([outer, inner], 1).reshape(10, 2)
    elif shape == "cross":
        a, b = 0.42, 1.12
        v = np.array([[-a, -b], [a, -b], [a, -a], [b, -a], [b, a], [a, a], [a, b], [-a, b], [-a, a], [-b, a],
                      [-b, -a], [-a, -a]])
    else:
        raise PhysMasterError(f"unknown shape {shape!r}; use one of {SHAPES['seen'] + SHAPES['unseen']}")
    x, y = v[:, 0], v[:, 1]
    x1, y1 = np.roll(x, -1), np.roll(y, -1)
    cross = x * y1 - x1 * y
    area = cross.sum() / 2
    cx = ((x + x1) * cross).sum() / (6 * area)
    cy = ((y + y1) * cross).sum() / (6 * area)
    return v - np.array([cx, cy])


ELLIPSE_AXES = (1.30, 0.77)


def shape_extents(shape: str) -> tuple[float, float, float, float]:
    """(half_width, top, bottom, bounding_radius) of a unit-size shape around its centroid (y down)."""
    if shape == "circle":
        return 1.0, 1.0, 1.0, 1.0
    if shape == "ellipse":
        return ELLIPSE_AXES[0], ELLIPSE_AXES[1], ELLIPSE_AXES[1], ELLIPSE_AXES[0]
    v = _polygon(shape)
    return (float(np.abs(v[:, 0]).max()), float(-v[:, 1].min()), float(v[:, 1].max()),
            float(np.hypot(v[:, 0], v[:, 1]).max()))


def _inside(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside test for unit-size shapes at local coordinates (u, v)."""
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "ellipse":
        return (u / ELLIPSE_AXES[0]) ** 2 + (v / ELLIPSE_AXES[1]) ** 2 <= 1.0
    poly = _polygon(shape)
    inside = np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    n = len(poly)
    for k in range(n):  # even-odd rule, vectorised over all samples (k < 13 edges)
        x1, y1 = poly[k]
        x2, y2 = poly[(k + 1) % n]
        if y1 == y2:
            continue
        crosses = (y1 > v) != (y2 > v)
        xi = x1 + (v - y1) * ((x2 - x1) / (y2 - y1))
        inside ^= crosses & (u < xi)
    return inside


def _texture(kind: str, u: np.ndarray, v: np.ndarray, angle: float) -> np.ndarray | None:
    """True where the texture's second colour shows (unit-size local coordinates)."""
    if kind == "flat":
        return None
    if kind == "stripes":
        s = u * math.cos(angle) + v * math.sin(angle)
        return (np.floor(s / 0.45) % 2).astype(bool)
    if kind == "checker":
        return ((np.floor(u / 0.6) + np.floor(v / 0.6)) % 2).astype(bool)
    raise PhysMasterError(f"unknown texture {kind!r}; use one of {TEXTURES}")


# ---------------------------------------------------------------------------------------------- physics

def simulate(p: dict, times: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """Positions [T, 2] of object 0 at `times` (s) and the contact events.

    Exact ballistic flight inside each substep; each contact time is solved from the quadratic.
    """
    g, e = float(p["gravity"]), float(p["restitution"])
    x, y = map(float, p["initial_position"])
    vx, vy = map(float, p["initial_velocity"])
    hw0, top0, bot0 = p["half_width"], p["top"], p["bottom"]
    size, floor_y = p["size"], p["floor_y"]
    block = p.get("block")
    collide = p.get("floor_collisions", True)
    scale_end, duration = p.get("scale_end", 1.0), max(float(times[-1]), 1e-9)
    v_rest = math.sqrt(2 * abs(g) * 0.1)
    steps = int(p.get("substeps", SUBSTEPS))
    fps = p["fps"]
    out = np.zeros((len(times), 2))
    events: list[dict] = []
    resting = False
    t = 0.0

    def scale(tt):
        return 1.0 + (scale_end - 1.0) * min(tt / duration, 1.0)

    def support(xx, s):  # height of the surface under the object (bottom extent must stay above)
        if block is not None and collide:
            bx0, bx1, btop = block
            if xx + hw0 * s > bx0 and xx - hw0 * s < bx1:
                return btop, "block"
        return (floor_y if collide else math.inf), "floor"

    for f, tf in enumerate(times):
        while t < tf - 1e-12:
            h = min(1.0 / (fps * steps), tf - t)
            s = scale(t + h)
            hw, bot = hw0 * s, bot0 * s
            if resting:
                sup, _ = support(x + vx * h, s)
                x += vx * h
                if sup > y + bot + 1e-6:  # slid off its support: falls again
                    resting = False
                    events.append({"kind": "slide_off", "t": t + h})
                else:
                    y = sup - bot
                t += h
            else:
                sup, what = support(x, s)
                rem = h
                while rem > 1e-12:
                    yn = y + vy * rem + 0.5 * g * rem * rem
                    if yn + bot > sup and (vy > 0 or g > 0) and y + bot <= sup + 1e-6:
                        # contact inside this substep: solve y + vy*s + g/2 s^2 = sup - bot for the first root
                        d = sup - bot - y
                        if abs(g) < 1e-12:
                            sc = d / vy if vy > 0 else rem
                        else:
                            disc = max(vy * vy + 2 * g * d, 0.0)
                            sc = (-vy + math.sqrt(disc)) / g
                        sc = min(max(sc, 0.0), rem)
                        vc = vy + g * sc
                        x += vx * sc
                        y = sup - bot
                        rem -= sc
                        vy = -e * vc
                        events.append({"kind": "bounce", "t": t + h - rem, "on": what, "v_in": vc,
                                       "v_out": vy, "x": x,
                                       "overlap": _overlap(x, hw, block) if what == "block" else 1.0})
                        if -vy < v_rest:
                            vy = 0.0
                            resting = True
                            events.append({"kind": "rest", "t": t + h - rem, "on": what})
                            x += vx * rem
                            rem = 0.0
                    else:
                        x += vx * rem
                        y = yn
                        vy += g * rem
                        rem = 0.0
                t += h
            # walls and the block's sides reflect the object horizontally
            if x - hw < -0.5 and vx < 0 or x + hw > size - 0.5 and vx > 0:
                vx = -vx
                events.append({"kind": "wall", "t": t})
            if block is not None and collide:
                bx0, bx1, btop = block
                if y + bot > btop + 0.5 and x + hw > bx0 and x - hw < bx1 and y - top0 * s < floor_y:
                    if (vx > 0 and x < (bx0 + bx1) / 2) or (vx < 0 and x > (bx0 + bx1) / 2):
                        vx = -vx
                        events.append({"kind": "side", "t": t})
        out[f] = (x, y)
    return out, events


def _overlap(x: float, hw: float, block) -> float:
    bx0, bx1, _ = block
    return max(0.0, min(x + hw, bx1) - max(x - hw, bx0)) / (2 * hw)


# -------------------------------------------------------------------------------------------- sampling

def _rng(seed: int, split: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, SPLITS.index(split), 20250]))


def _dist(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, float) - np.asarray(b, float)))


def _second_colour(c) -> tuple[float, float, float]:
    c = np.asarray(c, float)
    lum = 0.3 * c[0] + 0.59 * c[1] + 0.11 * c[2]
    out = c * 0.5 if lum > 0.45 else c * 0.45 + 0.55
    return tuple(float(v) for v in out)


def _sample(seed: int, split: str, size: int, frames: int, fps: float, object_scale: float = 1.0) -> dict:
    rng = _rng(seed, split)
    S = float(size)
    duration = (frames - 1) / fps
    p: dict[str, Any] = {"seed": int(seed), "split": split, "size": int(size), "frames": int(frames),
                         "fps": float(fps)}
    p["background"] = str(rng.choice(BACKGROUNDS[split]))
    bg_name = str(rng.choice(list(BG_COLOURS[split])))
    p["background_colour"] = bg_name
    floor_name = str(rng.choice(list(FLOOR_COLOURS)))
    p["floor_colour"] = floor_name
    p["floor_y"] = float(S * rng.uniform(0.80, 0.90))
    p["background_seed"] = int(rng.integers(0, 2**31 - 1))
    shape = str(rng.choice(SHAPES[split]))
    p["shape"] = shape
    texture = str(rng.choice(TEXTURES, p=[0.4, 0.3, 0.3]))
    p["texture_angle"] = float(rng.uniform(0, math.pi))
    surfaces = [BG_COLOURS[split][bg_name], FLOOR_COLOURS[floor_name]]
    names = list(COLOURS[split])
    rng.shuffle(names)
    colour = None
    for name in names:  # first colour (in a seeded order) that stands out from everything it is drawn on
        c = COLOURS[split][name]
        if all(_dist(c, s) >= MIN_CONTRAST for s in surfaces):
            colour = name
            break
    colour = colour or names[0]
    p["colour"] = colour
    if texture != "flat":
        c2 = _second_colour(COLOURS[split][colour])
        if any(_dist(c2, s) < MIN_CONTRAST for s in surfaces):
            texture = "flat"
    p["texture"] = texture
    p["gravity"] = float(NOMINAL_GRAVITY * S * math.exp(rng.uniform(*np.log(GRAVITY_RANGE))))
    p["restitution"] = float(rng.uniform(*RESTITUTION_RANGE))
    radius = float(S * rng.uniform(0.06, 0.10) * object_scale)
    p["radius"] = radius
    hw, top, bot, _ = (radius * v for v in shape_extents(shape))
    y0 = top + S * rng.uniform(0.05, 0.16)
    block_draw = rng.random()
    block_colours = [n for n in BLOCK_COLOURS
                     if _dist(BLOCK_COLOURS[n], COLOURS[split][colour]) >= MIN_CONTRAST
                     and _dist(BLOCK_COLOURS[n], BG_COLOURS[split][bg_name]) >= 0.2]
    p["block_colour"] = str(rng.choice(block_colours)) if block_colours else "steel"
    margin = 2.0
    for _attempt in range(30):
        travel = 0.0 if rng.random() < 0.4 else float(rng.uniform(-0.45, 0.45) * S)
        lo, hi = hw + margin, S - hw - margin
        lo_x0, hi_x0 = max(lo, lo - travel), min(hi, hi - travel)
        if hi_x0 <= lo_x0:
            continue
        x0 = float(rng.uniform(lo_x0, hi_x0))
        block = None
        kind = "none"
        if block_draw < 0.35:  # a block to land on: it spans the whole horizontal path
            path0, path1 = min(x0, x0 + travel) - hw, max(x0, x0 + travel) + hw
            pad = float(rng.uniform(0.5, 0.2 * S))
            bh = float(S * rng.uniform(0.08, 0.18))
            b0, b1 = max(1.0, path0 - pad), min(S - 1.0, path1 + pad)
            if b1 - b0 < 0.7 * S and p["floor_y"] - bh > y0 + bot + 0.2 * S:
                block, kind = (b0, b1, p["floor_y"] - bh), "under"
        elif block_draw < 0.6:  # a static block beside the path
            path0, path1 = min(x0, x0 + travel) - hw - 3, max(x0, x0 + travel) + hw + 3
            bw, bh = float(S * rng.uniform(0.12, 0.25)), float(S * rng.uniform(0.08, 0.2))
            room = [(1.0, path0 - bw), (path1, S - 1.0 - bw)]
            room = [r for r in room if r[1] > r[0]]
            if room:
                r0, r1 = room[int(rng.integers(len(room)))]
                bx = float(rng.uniform(r0, r1))
                block, kind = (bx, bx + bw, p["floor_y"] - bh), "beside"
        p["initial_position"] = (x0, float(y0))
        p["initial_velocity"] = (travel / duration if duration > 0 else 0.0, 0.0)
        p["block"] = block
        p["block_kind"] = kind
        geo = dict(p, half_width=hw, top=top, bottom=bot)
        _, events = simulate(geo, np.arange(frames) / fps)
        bad = [ev for ev in events if ev["kind"] in ("wall", "side", "slide_off")
               or (ev["kind"] == "bounce" and ev.get("overlap", 1.0) < 0.999)]
        if not bad:
            break
    else:  # fall back to the simplest scene: straight drop, no block
        p["initial_position"] = (S / 2, float(y0))
        p["initial_velocity"] = (0.0, 0.0)
        p["block"], p["block_kind"] = None, "none"
    return p


# ------------------------------------------------------------------------------------------- rendering

def _background(p: dict, size: int) -> np.ndarray:
    S = size
    base = np.array(BG_COLOURS[p["split"]][p["background_colour"]], np.float32)
    rng = np.random.default_rng(p["background_seed"])
    yy, xx = np.mgrid[0:S, 0:S].astype(np.float32) / S
    kind = p["background"]
    if kind == "flat":
        delta = np.zeros((S, S), np.float32)
    elif kind == "vgradient":
        delta = (yy - 0.5) * float(rng.choice([-0.22, 0.22]))
    elif kind == "noise":
        from PIL import Image

        low = rng.normal(0, 1, (6, 6)).astype(np.float32)
        up = np.asarray(Image.fromarray(low, mode="F").resize((S, S), Image.BICUBIC))
        delta = 0.07 * up / max(float(np.abs(up).max()), 1e-6)
    elif kind == "radial":
        cx, cy = rng.uniform(0.2, 0.8, 2)
        delta = 0.2 * (np.hypot(xx - cx, yy - cy) - 0.4)
    elif kind == "stripes":
        period = float(rng.uniform(0.18, 0.3))
        delta = 0.06 * np.tanh(4 * np.sin(2 * np.pi * xx / period))
    elif kind == "checker":
        cell = float(rng.uniform(0.15, 0.25))
        delta = 0.06 * (((np.floor(xx / cell) + np.floor(yy / cell)) % 2) * 2 - 1)
    else:
        raise PhysMasterError(f"unknown background {kind!r}; use one of {BACKGROUNDS['seen'] + BACKGROUNDS['unseen']}")
    img = np.clip(base[None, None] + delta[..., None], 0, 1)
    # the floor: rows below floor_y, anti-aliased along its top edge
    rows = np.arange(S, dtype=np.float32)
    cov = np.clip(rows + 0.5 - p["floor_y"], 0, 1)[:, None, None]
    floor = np.array(FLOOR_COLOURS[p["floor_colour"]], np.float32)
    shade = (1 - 0.12 * np.clip((rows - p["floor_y"]) / S * 4, 0, 1))[:, None, None]
    img = img * (1 - cov) + floor * shade * cov
    return img.astype(np.float32)


def _box_coverage(size: int, x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    c = np.arange(size, dtype=np.float32)
    cx = np.clip(np.minimum(c + 0.5, x1) - np.maximum(c - 0.5, x0), 0, 1)
    cy = np.clip(np.minimum(c + 0.5, y1) - np.maximum(c - 0.5, y0), 0, 1)
    return cy[:, None] * cx[None, :]


def _render_object(pos: np.ndarray, scales: np.ndarray, shape: str, radius: float, texture: str, angle: float,
                   size: int, ss: int = SUPERSAMPLE) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Coverage of object 0 per frame, supersampled ss x ss inside a box around it.

    Returns (coverage [T, B, B], second-colour coverage [T, B, B] or None, box origins [T, 2] (col, row), B).
    """
    T = len(pos)
    R = shape_extents(shape)[3] * radius * float(scales.max())
    B = int(math.ceil(2 * R)) + 3
    ox = np.floor(pos[:, 0] - R).astype(np.int64) - 1
    oy = np.floor(pos[:, 1] - R).astype(np.int64) - 1
    base = (np.arange(B * ss, dtype=np.float64) + 0.5) / ss - 0.5
    k = 1.0 / (radius * scales)[:, None]
    u = ((ox - pos[:, 0])[:, None] + base[None]) * k  # [T, B*ss]
    v = ((oy - pos[:, 1])[:, None] + base[None]) * k
    U, V = u[:, None, :], v[:, :, None]
    inside = _inside(shape, U, V)
    cov = inside.reshape(T, B, ss, B, ss).mean((2, 4), dtype=np.float32)
    sel = _texture(texture, U, V, angle)
    cov2 = None
    if sel is not None:
        cov2 = (inside & sel).reshape(T, B, ss, B, ss).mean((2, 4), dtype=np.float32)
    return cov, cov2, np.stack([ox, oy], 1), B


def render_scene(seed: int, split: str = "seen", size: int = 64, frames: int = 32, fps: float = 16.0,
                 object_scale: float = 1.0, **overrides) -> Scene:
    """Render one drop scene, deterministic by (seed, split, size, frames, fps, overrides).

    `overrides` (see OVERRIDES) change one physical or visual parameter while everything else stays as the
    seed drew it; the corruptions in `corrupt.py` use them to break exactly one law. `object_scale` multiplies
    the sampled object size *before* the scene is laid out (start height, block, path), so a larger object
    still starts inside the image (small renders, e.g. the demo's 32 px, use it to keep objects visible).
    """
    if split not in SPLITS:
        raise PhysMasterError(f"unknown split {split!r}; use 'seen' or 'unseen'")
    try:
        size, frames, fps = int(size), int(frames), float(fps)
    except (TypeError, ValueError) as e:
        raise PhysMasterError(f"size, frames and fps must be numbers ({e})") from None
    if not 16 <= size <= 2048:
        raise PhysMasterError(f"size {size} is out of range; use 16..2048 pixels")
    if not 2 <= frames <= 4096:
        raise PhysMasterError(f"frames {frames} is out of range; use 2..4096")
    if not (math.isfinite(fps) and 1 <= fps <= 240):
        raise PhysMasterError(f"fps {fps} is out of range; use 1..240")
    if not (isinstance(object_scale, (int, float)) and 0.25 <= object_scale <= 3.0):
        raise PhysMasterError(f"object_scale {object_scale!r} is out of range; use 0.25..3")
    unknown = sorted(set(overrides) - set(OVERRIDES))
    if unknown:
        raise PhysMasterError(f"unknown scene override(s) {unknown}; allowed: {sorted(OVERRIDES)}")
    p = _sample(seed, split, size, frames, fps, float(object_scale))
    applied = {}
    for key, value in overrides.items():
        if value is None:
            continue
        if key == "has_block":
            if not value:
                p["block"], p["block_kind"] = None, "none"
        elif key in ("initial_velocity", "initial_position", "teleport"):
            p[key] = tuple(float(v) for v in value)
        elif key in ("shape", "colour", "texture", "background"):
            p[key] = str(value)
        elif key == "floor_collisions":
            p[key] = bool(value)
        elif key == "substeps":
            p[key] = int(value)
        else:
            p[key] = float(value)
        applied[key] = list(value) if isinstance(value, (tuple, list)) else value
    all_colours = {**COLOURS["seen"], **COLOURS["unseen"]}
    if p["colour"] not in all_colours:
        raise PhysMasterError(f"unknown colour {p['colour']!r}; use one of {sorted(all_colours)}")
    shape, radius = p["shape"], float(p["radius"])
    hw, top, bot, _ = (radius * v for v in shape_extents(shape))
    geo = dict(p, half_width=hw, top=top, bottom=bot)
    times = np.arange(frames) / fps
    pos, events = simulate(geo, times)
    if "teleport" in p:
        tf, dx, dy = p["teleport"]
        pos[int(tf):] += (dx, dy)
    scale_end = float(p.get("scale_end", 1.0))
    scales = 1.0 + (scale_end - 1.0) * np.clip(times / max(times[-1], 1e-9), 0, 1)

    # static layer: background, floor, block
    static = _background(p, size)
    K = 2 if p["block"] is not None else 1
    masks = np.zeros((frames, K, size, size), bool)
    traj = np.zeros((frames, K, 2), np.float32)
    if p["block"] is not None:
        bx0, bx1, btop = p["block"]
        bc = _box_coverage(size, bx0, bx1, btop, p["floor_y"])
        bcol = np.array(BLOCK_COLOURS[p["block_colour"]], np.float32)
        shade = np.linspace(1.08, 0.9, size, dtype=np.float32)[:, None, None]
        static = static * (1 - bc[..., None]) + np.clip(bcol * shade, 0, 1) * bc[..., None]
        masks[:, 1] = bc >= 0.5
        traj[:, 1] = ((bx0 + bx1) / 2 - 0.0, (btop + p["floor_y"]) / 2)

    # object 0, composited on a padded canvas so it may leave the image
    cov, cov2, origin, B = _render_object(pos, scales, shape, radius, p["texture"], p["texture_angle"], size)
    P = B + 2
    canvas = np.zeros((frames, size + 2 * P, size + 2 * P, 3), np.float32)
    canvas[:, P:P + size, P:P + size] = static
    c1 = np.array(all_colours[p["colour"]], np.float32)
    c2 = np.array(_second_colour(c1), np.float32)
    ocov = np.zeros((frames, size + 2 * P, size + 2 * P), np.float32)
    for t in range(frames):
        cx, cy = int(np.clip(origin[t, 0] + P, 0, size + P)), int(np.clip(origin[t, 1] + P, 0, size + P))
        # (origin is clipped to the canvas: an object far outside the image is simply not drawn)
        if origin[t, 0] + P != cx or origin[t, 1] + P != cy:
            continue
        win = canvas[t, cy:cy + B, cx:cx + B]
        c = cov[t][..., None]
        if cov2 is None:
            colour = c * c1
        else:
            colour = (cov[t] - cov2[t])[..., None] * c1 + cov2[t][..., None] * c2
        canvas[t, cy:cy + B, cx:cx + B] = win * (1 - c) + colour
        ocov[t, cy:cy + B, cx:cx + B] = cov[t]
    video = np.clip(canvas[:, P:P + size, P:P + size], 0, 1)
    masks[:, 0] = ocov[:, P:P + size, P:P + size] >= 0.5
    traj[:, 0] = pos

    impacts = [ev for ev in events if ev["kind"] == "bounce"]
    rest = [ev for ev in events if ev["kind"] == "rest"]
    meta = {
        "seed": int(seed), "split": split, "size": size, "frames": frames, "fps": fps,
        "gravity": float(p["gravity"]), "gravity_norm": float(p["gravity"]) / size,
        "restitution": float(p["restitution"]),
        "shapes": [shape] + (["block"] if K == 2 else []),
        "colours": [p["colour"]] + ([p["block_colour"]] if K == 2 else []),
        "texture": p["texture"], "background": p["background"], "background_colour": p["background_colour"],
        "floor_colour": p["floor_colour"], "floor_y": float(p["floor_y"]), "radius": radius,
        "initial_position": [float(v) for v in p["initial_position"]],
        "initial_velocity": [float(v) for v in p["initial_velocity"]],
        "block": None if p["block"] is None else [float(v) for v in p["block"]],
        "block_kind": p["block_kind"],
        "impact_times": [float(ev["t"]) for ev in impacts],
        "first_impact_frame": (int(math.ceil(impacts[0]["t"] * fps - 1e-9)) if impacts else None),
        "rest_time": float(rest[0]["t"]) if rest else None,
        "overrides": applied,
    }
    return Scene(frames=video.astype(np.float32), masks=masks, trajectories=traj, meta=meta)
