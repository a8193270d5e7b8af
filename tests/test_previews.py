"""Previews for the browser (issue 13): one sprite sheet per candidate, and the judge's tracks to draw over it."""

import numpy as np
import pytest
from PIL import Image

from physmaster.errors import PhysMasterError
from physmaster.previews import judge_tracks, save_sheet, sheet_layout, sprite_sheet


def test_a_sheet_holds_every_frame_in_order(tmp_path):
    rng = np.random.default_rng(0)
    video = rng.random((5, 6, 10, 3)).astype(np.float32)
    sheet, layout = sprite_sheet(video)
    assert layout == {"frames": 5, "cols": 2, "rows": 3, "width": 10, "height": 6}
    pixels = np.asarray(sheet)
    for i in range(5):
        r, c = divmod(i, layout["cols"])
        tile = pixels[r * 6:(r + 1) * 6, c * 10:(c + 1) * 10]
        assert np.abs(tile.astype(int) - np.round(video[i] * 255)).max() <= 1, i
    path = tmp_path / "s.webp"
    assert save_sheet(video, path) == layout
    back = np.asarray(Image.open(path).convert("RGB"))
    assert back.shape == pixels.shape and np.array_equal(back, pixels)  # small frames are kept lossless


@pytest.mark.parametrize("frames,w,h,want", [
    (33, 256, 256, {"frames": 33, "cols": 6, "rows": 6, "width": 256, "height": 256}),
    (33, 832, 480, {"frames": 33, "cols": 5, "rows": 7, "width": 512, "height": 295}),  # scaled to 512
    (81, 1280, 720, {"frames": 81, "cols": 7, "rows": 12, "width": 512, "height": 288}),
    (1, 64, 64, {"frames": 1, "cols": 1, "rows": 1, "width": 64, "height": 64}),
])
def test_sheet_layouts_fit_webp(frames, w, h, want):
    layout = sheet_layout(frames, w, h)
    assert layout == want
    assert layout["cols"] * layout["rows"] >= frames
    assert max(layout["cols"] * layout["width"], layout["rows"] * layout["height"]) <= 16383


def test_a_long_video_is_scaled_to_fit_one_sheet():
    layout = sheet_layout(2000, 512, 512)
    assert layout["cols"] * layout["width"] <= 16383 and layout["rows"] * layout["height"] <= 16383
    assert layout["cols"] * layout["rows"] >= 2000
    with pytest.raises(PhysMasterError, match="at least one frame"):
        sheet_layout(0, 4, 4)


def test_judge_tracks_follow_the_falling_object():
    from physmaster.physics import render_scene

    scene = render_scene(3, size=64, frames=16, fps=16.0)
    flat = np.repeat(scene.frames[:1], 16, 0)  # nothing moves: the judge finds no object
    tracks = judge_tracks(np.stack([scene.frames, flat]), fps=16.0)
    moving, still = tracks
    points = [p for p in moving["track"] if p is not None]
    assert len(moving["track"]) == 16 and len(points) >= 8
    assert all(0 <= x <= 1 and 0 <= y <= 1 for x, y in points)
    assert points[-1][1] > points[0][1]  # it falls: y grows downwards
    assert moving["fit"] is not None and moving["score"] is not None
    assert still["track"] == [None] * 16 and "no object" in still["reason"]
