"""Up-front memory estimates for what a node is about to allocate, so absurd widget values are refused with the
number instead of dying in the allocator (or swapping the machine to a halt).

Every estimate is computed from the settings alone, before anything is allocated: the head is built on the meta
device (exact parameter count, whatever its shape), the scene from its array sizes.
"""

from __future__ import annotations

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
