"""The demo's proxy world: PisaBench-style drops, rendered small enough to train and sample on a CPU.

What the world is (and why):
- 32x32 RGB, 8 frames at 6 fps (1.17 s: a fall, the first impact and its rebound fit in every clip). Objects are
  drawn 1.6x the physics module's default size (`object_scale`), so that at 32 px an object is 6-10 px wide
  and its mask is a real shape, not a few pixels.
- Drops start from rest: a start image cannot show a velocity.
- Gravity is the world's nominal one (no hidden per-scene draw) and the restitution of an object is its
  *material*, which shows in its surface pattern (`MATERIALS`: plain clay barely bounces, striped wood bounces
  some, chequered rubber bounces high). So the start image determines the whole motion, and a model that reads
  the image well can be exact; ground truth is an instrument, not a lottery. The pattern is a 2-3 px detail: it
  is plain in the 32-px start image the backbone sees, and only partly kept in the video model's 4x-downsampled
  latent, as fine detail is in Wan's VAE latent (`bench/probe_latent_material.py`: a small MLP on the first-frame
  latent reads the material in 64% of seen and 41% of unseen start images: the shipped autoencoder decodes every
  object plain, `assets.make_assets`, so the pattern survives only in what its encoder happens to keep). Reading
  the material, the support and the height above it is what the stand-in backbone (`backbone.py`) is pretrained
  for and what the first-frame latent does not spell out in full: the physical tokens' job.
- The base video model learned *generic* motion instead (`generic_scene`): the same objects thrown in random
  directions under random, even upward, gravity, sometimes passing through the floor, any restitution.
"""

from __future__ import annotations

import numpy as np
import torch

from ..physics import NOMINAL_GRAVITY, render_scene
SIZE, FRAMES, FPS = 32, 8, 6.0
OBJECT_SCALE = 1.6


MATERIALS = {"flat": ("clay", 0.3), "stripes": ("wood", 0.55), "checker": ("rubber", 0.85)}


def material_restitution(texture: str) -> float:
    """The world's material law: restitution from the object's surface pattern."""
    return MATERIALS[texture][1]


def render(seed: int, split: str = "seen", **overrides):
    return render_scene(seed, split, size=SIZE, frames=FRAMES, fps=FPS, object_scale=OBJECT_SCALE, **overrides)


def drop_scene(seed: int, split: str = "seen", restitution: float | None = None, plain: bool = False):
    """A drop from rest under nominal gravity, bouncing as its material (surface pattern) says; the three
    materials are equally likely. `restitution` overrides the material's (the same drop, another bounce).
    `plain`: the same drop, bounce included, with its object drawn without its pattern (the decoder's target
    in `--make-base`, `assets.make_assets`)."""
    texture = list(MATERIALS)[int(np.random.default_rng([int(seed) & 0xFFFFFFFF, 4242]).integers(len(MATERIALS)))]
    return render(seed, split, initial_velocity=(0.0, 0.0), gravity=NOMINAL_GRAVITY * SIZE,
                  texture="flat" if plain else texture,
                  restitution=material_restitution(texture) if restitution is None else float(restitution))


def material_renderings(scene) -> tuple[dict, float] | None:
    """A drop's object masks rendered with each material's restitution, {restitution: masks [T, H, W]}, and its own
    restitution; None when the three do not differ (the object does not reach its support within the clip)."""
    m = scene.meta
    own = material_restitution(m["texture"])
    masks = {r: scene.object_masks() if r == own else drop_scene(m["seed"], m["split"], restitution=r).object_masks()
             for _, r in MATERIALS.values()}
    if max(int((masks[r] != masks[own]).sum()) for r in masks) < 3:
        return None
    return masks, own


def generic_scene(seed: int, plain: bool = False):
    """The base model's world: the same objects moving in random directions under random gravity. `plain`: the
    same scene with its object drawn without its pattern."""
    rng = np.random.default_rng([seed, 77])
    duration = (FRAMES - 1) / FPS
    split = "seen" if rng.random() < 0.5 else "unseen"
    g = float(rng.uniform(-1.0, 1.0) * 3.0 * SIZE)
    v = rng.uniform(-0.5, 0.5, 2) * SIZE / duration
    return render(seed, split, gravity=g, initial_velocity=(float(v[0]), float(v[1])),
                  floor_collisions=bool(rng.random() < 0.5), restitution=float(rng.uniform(0.1, 0.9)),
                  texture="flat" if plain else None)


def recoloured(frames: np.ndarray, seed: int) -> np.ndarray:
    """The same video [T, H, W, 3] in other colours: its RGB channels permuted, and half the time inverted
    (1 - x), one draw of `seed` for the whole clip. Motion, shapes, masks and the surface pattern (the material)
    are unchanged; only the look is, so Stage I sees drops on backgrounds darker or more saturated than any of the
    seen split's (a light grey turns dark, a beige navy) without seeing the unseen split's own looks: the colour
    augmentation image models are trained with (`Settings.sft_recoloured`)."""
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 5151])
    x = np.asarray(frames, dtype=np.float32)[..., rng.permutation(3)]
    if rng.random() < 0.5:
        x = 1.0 - x
    return np.ascontiguousarray(x)


def _hue_rotation(angle: float) -> np.ndarray:
    """The 3x3 rotation of RGB space by `angle` about the grey axis (1, 1, 1): a hue shift that keeps each colour's
    brightness (its mean) and greys grey."""
    k = np.ones(3) / np.sqrt(3.0)
    cross = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.cos(angle) * np.eye(3) + np.sin(angle) * cross + (1.0 - np.cos(angle)) * np.outer(k, k)


def relooked(frames: np.ndarray, seed: int, mask: np.ndarray | None = None, tries: int = 8) -> np.ndarray:
    """The same video [T, H, W, 3] in a look further from the seen split's than `recoloured` reaches: recoloured,
    then its hues turned by any angle (not only the channel permutations' thirds of a turn), its saturation scaled
    by 0.4-1.6 and a gamma of 0.5-2 (darker or lighter), one draw of `seed` for the whole clip. Motion, shapes and
    masks are unchanged, so the truth still labels the video. `mask` [H, W]: the object in the first frame; a draw
    that leaves the object less than half its recoloured contrast with the background (the mean colour distance), or
    under 0.1, is drawn again (up to `tries` times, then the recoloured video itself), so the object stays visible.
    The start images of the online rounds after the first (`Settings.online_later_relooked`; Stage III's:
    `stage_three_relooked`, a quarter)."""
    base = recoloured(frames, seed)
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 6161])

    def contrast(x):
        if mask is None or not mask.any() or mask.all():
            return 1.0
        return float(np.linalg.norm(x[0][mask].mean(0) - x[0][~mask].mean(0)))

    need = max(0.1, 0.5 * contrast(base))
    for _ in range(tries):
        angle, sat = rng.uniform(0, 2 * np.pi), rng.uniform(0.4, 1.6)
        gamma = np.exp(rng.uniform(np.log(0.5), np.log(2.0)))
        x = base @ _hue_rotation(angle).T
        grey = x.mean(-1, keepdims=True)
        x = np.clip(grey + sat * (x - grey), 0.0, 1.0) ** gamma
        if contrast(x) >= need:
            return np.ascontiguousarray(x.astype(np.float32))
    return base


def to_pixels(frames: np.ndarray) -> torch.Tensor:
    """[..., H, W, 3] in [0, 1] (numpy) -> [..., 3, H, W] float tensor in [0, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).float()
    return x.movedim(-1, -3)


def to_frames(pixels: torch.Tensor) -> np.ndarray:
    """[T, 3, H, W] in [0, 1] -> [T, H, W, 3] float32 numpy (what the segmenter and metrics read)."""
    return pixels.clamp(0, 1).movedim(-3, -1).numpy().astype(np.float32)
