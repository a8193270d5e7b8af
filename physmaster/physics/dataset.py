"""Write a split of drop scenes to a folder (atomically: the folder appears whole or not at all).

Layout::

    OUT/index.json                       split, size, frames, fps, seeds, and one entry per scene
    OUT/scene_00000/frames/000.png ...   RGB frames (8-bit PNG)
    OUT/scene_00000/masks.safetensors    "masks" uint8 [T, K, H, W] (0/1; object 0 = dropped object),
                                         "trajectories" float32 [T, K, 2] (centroid x, y in px)
    OUT/scene_00000/meta.json            the scene's metadata (Scene.meta)

Frames are PNG only: writing mp4 would need ffmpeg/PyAV, which this package does not depend on.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import PhysMasterError
from ..fileio import atomic_path, atomic_write_text
from .scene import SPLITS, render_scene

FORMAT = "physmaster-drop-scenes"
VERSION = 1


def _is_nonempty_dir(p: Path) -> bool:
    return p.is_dir() and any(p.iterdir())


def write_scene(scene, folder: Path) -> dict:
    """Write one scene into `folder` (created); returns its index entry (paths relative to `folder`)."""
    from PIL import Image
    from safetensors.numpy import save_file

    frames_dir = folder / "frames"
    frames_dir.mkdir(parents=True, exist_ok=True)
    u8 = np.clip(np.round(scene.frames * 255.0), 0, 255).astype(np.uint8)
    width = max(3, len(str(len(u8) - 1)))
    for t, img in enumerate(u8):
        Image.fromarray(img).save(frames_dir / f"{t:0{width}d}.png", compress_level=1)
    with atomic_path(folder / "masks.safetensors") as tmp:
        save_file({"masks": np.ascontiguousarray(scene.masks.astype(np.uint8)),
                   "trajectories": np.ascontiguousarray(scene.trajectories.astype(np.float32))}, str(tmp),
                  metadata={"format": FORMAT, "objects": json.dumps(scene.meta.get("shapes", []))})
    atomic_write_text(folder / "meta.json", json.dumps(scene.meta, indent=1, sort_keys=True))
    for f in ("masks.safetensors", "meta.json"):
        os.chmod(folder / f, 0o644)
    return {"frames": "frames", "frame_count": int(len(u8)), "masks": "masks.safetensors", "meta": "meta.json"}


def write_split(split: str, count: int, out_dir, size: int = 64, frames: int = 32, fps: float = 16.0,
                start_seed: int = 0, fmt: str = "png", force: bool = False, progress=None) -> dict:
    """Render scenes `start_seed .. start_seed + count - 1` of `split` into `out_dir`; returns the index.

    Refuses a non-empty existing `out_dir` unless `force` (then it is replaced only once the new one is
    complete). Everything is written to a temporary folder beside `out_dir` and renamed at the end.
    """
    if split not in SPLITS:
        raise PhysMasterError(f"unknown split {split!r}; use 'seen' or 'unseen'")
    if fmt != "png":
        raise PhysMasterError(f"format {fmt!r} is not supported; use 'png' (mp4 would need ffmpeg, which "
                              "PhysMaster does not depend on)")
    try:
        count, start_seed = int(count), int(start_seed)
    except (TypeError, ValueError):
        raise PhysMasterError("count and seed must be integers") from None
    if count < 1:
        raise PhysMasterError(f"count is {count}; write at least 1 scene")
    out = Path(out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise PhysMasterError(f"{out} exists and is not a folder; choose another --out")
    if _is_nonempty_dir(out) and not force:
        raise PhysMasterError(f"{out} already exists and is not empty; choose another --out or pass --force "
                              "to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    render_scene(start_seed, split, size, frames, fps)  # validate the arguments before making anything
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        entries = []
        for i in range(count):
            seed = start_seed + i
            scene = render_scene(seed, split, size, frames, fps)
            name = f"scene_{seed:05d}"
            rel = write_scene(scene, tmp / name)
            entries.append({"name": name, "seed": seed, **{k: (f"{name}/{v}" if isinstance(v, str) else v)
                                                          for k, v in rel.items()},
                            "shapes": scene.meta["shapes"], "colours": scene.meta["colours"],
                            "background": scene.meta["background"]})
            if progress:
                progress(i + 1, count)
        index = {"format": FORMAT, "version": VERSION, "split": split, "count": count, "size": int(size),
                 "frames": int(frames), "fps": float(fps), "start_seed": start_seed,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "scenes": entries}
        atomic_write_text(tmp / "index.json", json.dumps(index, indent=1))
        os.chmod(tmp / "index.json", 0o644)
        os.chmod(tmp, 0o755)
        if out.exists():
            if _is_nonempty_dir(out) and not force:  # appeared while we were writing
                raise PhysMasterError(f"{out} was filled by someone else while writing; nothing was replaced")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
            try:
                os.rename(tmp, out)
            except BaseException:
                os.rename(old / "x", out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    index["path"] = str(out)
    return index
