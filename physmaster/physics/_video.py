"""Input checks shared by the physics functions: turn what users pass into float32 [T, H, W, 3] or bool masks."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import PhysMasterError


def _to_numpy(x: Any, what: str) -> np.ndarray:
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # a torch tensor (ComfyUI IMAGE / MASK)
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        return x.numpy()
    if isinstance(x, (list, tuple)):
        if len(x) == 0:
            raise PhysMasterError(f"{what} has zero frames; pass a video of at least 3 frames")
        arrs = [_to_numpy(f, what) for f in x]
        shapes = {a.shape for a in arrs}
        if len(shapes) > 1:
            first = arrs[0].shape
            bad = next(i for i, a in enumerate(arrs) if a.shape != first)
            raise PhysMasterError(
                f"{what} has frames of inconsistent size: frame 0 is {list(first)} but frame {bad} is "
                f"{list(arrs[bad].shape)}; resize all frames to one size before judging")
        return np.stack(arrs)
    try:
        return np.asarray(x)
    except Exception as e:  # ragged nested lists etc.
        raise PhysMasterError(f"{what} could not be read as an array ({e}); pass a [T, H, W, 3] array") from None


def as_video(frames: Any, what: str = "frames", min_frames: int = 1) -> np.ndarray:
    """float32 [T, H, W, 3] in [0, 1] from a [T, H, W, 3|4|1] / [T, H, W] array, tensor or list of frames."""
    v = _to_numpy(frames, what)
    if v.dtype == object:
        raise PhysMasterError(f"{what} has frames of inconsistent size; resize all frames to one size")
    if v.ndim == 3 and v.shape[-1] not in (1, 3, 4):
        v = v[..., None]  # [T, H, W] grey
    if v.ndim != 4 or v.shape[-1] not in (1, 3, 4):
        raise PhysMasterError(f"{what} is shaped {list(v.shape)}; expected [frames, height, width, 3]")
    if v.shape[0] == 0:
        raise PhysMasterError(f"{what} has zero frames; pass a video of at least {max(min_frames, 1)} frames")
    if v.shape[0] < min_frames:
        raise PhysMasterError(
            f"{what} has {v.shape[0]} frame(s); motion needs at least {min_frames} frames of one video")
    if v.shape[1] < 4 or v.shape[2] < 4:
        raise PhysMasterError(f"{what} frames are {v.shape[1]}x{v.shape[2]} pixels; use at least 4x4")
    if v.dtype == np.uint8:
        v = v.astype(np.float32) / 255.0
    elif v.dtype == np.uint16:
        v = v.astype(np.float32) / 65535.0
    elif v.dtype == bool:
        v = v.astype(np.float32)
    else:
        v = v.astype(np.float32, copy=False)
    if not np.isfinite(v).all():
        bad = np.nonzero(~np.isfinite(v).reshape(v.shape[0], -1).all(1))[0]
        raise PhysMasterError(
            f"{what} contains NaN or infinite values (in frame(s) {bad[:5].tolist()}"
            f"{'...' if len(bad) > 5 else ''}); the video decode or the sampler failed — regenerate those frames")
    if v.shape[-1] == 1:
        v = np.repeat(v, 3, axis=-1)
    elif v.shape[-1] == 4:
        v = v[..., :3]
    if v.max(initial=0.0) > 1.5:  # 0..255 floats
        v = v / 255.0
    return np.clip(v, 0.0, 1.0)


def as_masks(masks: Any, what: str = "masks") -> np.ndarray:
    """bool [T, H, W] from [T, H, W] or [T, K, H, W] (object 0 taken) masks, arrays or tensors."""
    m = _to_numpy(masks, what)
    if m.ndim == 4:
        if m.shape[-1] == 1:  # [T, H, W, 1]
            m = m[..., 0]
        else:
            m = m[:, 0]  # [T, K, H, W]: object 0 is the dropped object
    if m.ndim != 3:
        raise PhysMasterError(f"{what} is shaped {list(m.shape)}; expected [frames, height, width] "
                              "(or [frames, objects, height, width] with the dropped object first)")
    if m.shape[0] == 0:
        raise PhysMasterError(f"{what} has zero frames; pass at least one mask")
    if m.dtype != bool:
        m = m.astype(np.float32)
        if not np.isfinite(m).all():
            raise PhysMasterError(f"{what} contains NaN or infinite values; pass 0/1 masks")
        m = m > 0.5
    return m
