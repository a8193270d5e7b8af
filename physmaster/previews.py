"""What the picker and the review show in the browser: candidate videos as sprite sheets, and the judge's tracks.

A video plays in the browser from one image per candidate, a *sprite sheet*: its frames left to right, top to
bottom, `cols` per row, each `width` x `height` (scaled so the longer side is at most `max_side`). One image per
candidate lets the page draw any frame of any candidate at any moment: one clock for all of them, pause, step and
slow motion, which an animated image cannot do. The node saves the sheets where the host serves its previews
(ComfyUI's temp folder, read back through `/view`).

`judge_tracks` gives, per candidate, what the physics judge tracked (the object's centroid per frame) and the
ballistic fit it scored against, as fractions of the frame size, for the browser to draw over the video.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from .errors import PhysMasterError

#: longest side of a preview frame (larger videos are scaled down for the page)
PREVIEW_MAX_SIDE = 512
#: widest sheet (WEBP's limit is 16383 pixels a side)
MAX_SHEET_SIDE = 16383


def sheet_layout(frames: int, width: int, height: int, max_side: int = PREVIEW_MAX_SIDE) -> dict[str, int]:
    """{frames, cols, rows, width, height} of the sheet for `frames` frames of width x height (scaled to fit)."""
    if frames < 1 or width < 1 or height < 1:
        raise PhysMasterError(f"a preview needs at least one frame of at least 1x1 pixels, got {frames} frames of "
                              f"{width}x{height}")
    scale = min(1.0, max_side / max(width, height))
    w, h = max(1, round(width * scale)), max(1, round(height * scale))
    cols = math.ceil(math.sqrt(frames * h / w))  # a roughly square sheet
    cols = max(1, min(frames, cols, MAX_SHEET_SIDE // w))
    rows = math.ceil(frames / cols)
    if rows * h > MAX_SHEET_SIDE:  # too many frames for one sheet at this size: scale down further
        return sheet_layout(frames, width, height, max(8, int(max_side * 0.7)))
    return {"frames": frames, "cols": cols, "rows": rows, "width": w, "height": h}


def sprite_sheet(video: np.ndarray, max_side: int = PREVIEW_MAX_SIDE) -> tuple[Image.Image, dict[str, int]]:
    """float [T, H, W, 3] in [0, 1] -> (RGB sheet image, layout)."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] < 3:
        raise PhysMasterError(f"a preview video must be [frames, height, width, 3], got {list(video.shape)}")
    T, H, W = video.shape[:3]
    layout = sheet_layout(T, W, H, max_side)
    w, h, cols = layout["width"], layout["height"], layout["cols"]
    sheet = Image.new("RGB", (cols * w, layout["rows"] * h))
    pixels = np.clip(video[..., :3] * 255 + 0.5, 0, 255).astype(np.uint8)
    for i, frame in enumerate(pixels):
        pic = Image.fromarray(frame)
        if (w, h) != (W, H):
            pic = pic.resize((w, h), Image.Resampling.BILINEAR)
        sheet.paste(pic, ((i % cols) * w, (i // cols) * h))
    return sheet, layout


def save_sheet(video: np.ndarray, path, max_side: int = PREVIEW_MAX_SIDE) -> dict[str, int]:
    """Write a candidate's sheet as WEBP (lossless for small frames, quality 92 otherwise); returns its layout."""
    sheet, layout = sprite_sheet(video, max_side)
    small = layout["width"] * layout["height"] <= 128 * 128
    sheet.save(path, format="WEBP", lossless=small, quality=100 if small else 92, method=0 if not small else 1)
    return layout


def _points(track: np.ndarray, width: int, height: int) -> list[Any]:
    """[T, 2] pixel (x, y), NaN where missing -> [[x/W, y/H] or None, ...] (pixel centres)."""
    out: list[Any] = []
    for x, y in np.asarray(track, np.float64):
        out.append(None if not (math.isfinite(x) and math.isfinite(y)) else
                   [round((x + 0.5) / width, 5), round((y + 0.5) / height, 5)])
    return out


def judge_tracks(frames, fps: float) -> list[dict[str, Any]]:
    """Per candidate of float [N, T, H, W, 3] frames: {"track": points the judge tracked, "fit": the ballistic
    model it scored against (or None), "score", "reason"}; points are [x, y] fractions of the frame or None."""
    from .physics import judge

    out = []
    for video in frames:
        video = np.asarray(video, np.float32)
        T, H, W = video.shape[:3]
        try:
            result = judge(video, fps=fps)
        except PhysMasterError as e:  # e.g. too few frames: nothing to draw, say why
            out.append({"track": [None] * T, "fit": None, "score": None, "reason": str(e)})
            continue
        model = result.fit.get("model_track") if result.fit else None
        out.append({"track": _points(result.track, W, H),
                    "fit": _points(model, W, H) if model is not None else None,
                    "score": round(float(result.score), 4), "reason": result.reason})
    return out
