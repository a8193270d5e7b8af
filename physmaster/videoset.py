"""SFT video sets on disk: clean video latents and their conditioning, for Stage I (`train-sft --videos DIR`).

A video set is a folder `<root>/<name>/` (PhysMasterSaveTrainingVideos writes them to
`output/physmaster/videos/<name>/`):

    dataset.json             {"kind": "physmaster.videos", "format_version", "latent_shape" (one video), "context_dim"}
    videos/<id>.safetensors  `latents` [N, C, T, H, W]: N >= 1 videos that share one conditioning, and that
                             conditioning under the keys a preference group uses (`context`, `cond.*`,
                             `clip_vision.*`, `features`: see physmaster.backends.comfy_inputs)

This module is the only reader and writer of the format. Files are written to a temp file and renamed (a reader
sees a whole file or none); dataset.json is set by the first write under the set's lock and every later file
must match it. Reading checks each file's header against dataset.json and reports an unusable file by name
(skipped, never trained on).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator

import torch
from filelock import FileLock, Timeout

from .errors import PhysMasterError
from .fileio import atomic_path, atomic_write_text
from .preferences import FLOAT_DTYPES, LOCK_TIMEOUT, MAX_INFO, open_folder

KIND = "physmaster.videos"
FORMAT_VERSION = 1
META_KEY = "physmaster.videos"


class VideoSetError(PhysMasterError):
    pass


def is_video_set(path: str | os.PathLike) -> bool:
    """Whether `path` is a video-set folder (has dataset.json of kind physmaster.videos, or a videos/ folder)."""
    path = Path(path)
    if (path / "videos").is_dir():
        return True
    try:
        return json.loads((path / "dataset.json").read_text())["kind"] == KIND
    except (OSError, ValueError, KeyError, TypeError):
        return False


class VideoDataset:
    """A video-set folder. `VideoDataset.open(root, name, create=True)` for the writer; `VideoDataset(path)` to read."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    @classmethod
    def open(cls, root: str | os.PathLike, name: str, create: bool = False) -> "VideoDataset":
        return cls(open_folder(root, name, create, VideoSetError, "video set", ("videos",),
                               "save videos with PhysMasterSaveTrainingVideos first"))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def info_path(self) -> Path:
        return self.path / "dataset.json"

    def info(self) -> dict[str, Any] | None:
        if not self.info_path.is_file():
            return None
        try:
            if self.info_path.stat().st_size > MAX_INFO:
                raise ValueError("too large")
            info = json.loads(self.info_path.read_text())
            shape, width = info["latent_shape"], info["context_dim"]
            if info.get("kind") != KIND or not (isinstance(shape, list) and len(shape) == 4
                                                 and all(type(d) is int and d > 0 for d in shape)) \
                    or type(width) is not int or width < 1:
                raise ValueError("needs kind physmaster.videos, latent_shape [C, T, H, W] and context_dim")
            if int(info.get("format_version", 1)) > FORMAT_VERSION:
                raise VideoSetError(f"{self.info_path} is a newer format ({info['format_version']}) than this "
                                    "PhysMaster reads: update PhysMaster")
        except VideoSetError:
            raise
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise VideoSetError(f"{self.info_path} is unreadable or invalid ({e}); restore it from a copy of the "
                                "video set") from None
        return info

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path / ".lock"), timeout=LOCK_TIMEOUT)
        try:
            lock.acquire()
        except Timeout:
            raise VideoSetError(f"video set {self.name!r} stayed locked by another writer for {LOCK_TIMEOUT:.0f} s")
        try:
            yield
        finally:
            lock.release()

    def add_videos(self, latents: torch.Tensor, context: torch.Tensor,
                   extras: dict[str, torch.Tensor] | None = None, meta: dict[str, Any] | None = None) -> str:
        """Store N >= 1 video latents [N, C, T, H, W] that share one conditioning; returns the file id."""
        if latents.ndim != 5 or latents.shape[0] < 1:
            raise VideoSetError(f"video latents must be [videos, C, T, H, W], got {list(latents.shape)}")
        if context.ndim != 3:
            raise VideoSetError(f"context must be [batch, length, width], got {list(context.shape)}")
        shape, width = list(latents.shape[1:]), int(context.shape[-1])
        with self._lock():
            info = self.info()
            if info is None:
                atomic_write_text(self.info_path, json.dumps({"kind": KIND, "format_version": FORMAT_VERSION,
                                                              "latent_shape": shape, "context_dim": width,
                                                              "created": _now()}, indent=1))
            elif info["latent_shape"] != shape or info["context_dim"] != width:
                raise VideoSetError(f"video set {self.name!r} holds latents {info['latent_shape']} with context "
                                    f"width {info['context_dim']}; these are {shape} / {width} (another model or "
                                    "resolution): use a new video set name")
        vid = uuid.uuid4().hex
        tensors = {"latents": latents, "context": context, **(extras or {})}
        from safetensors.torch import save_file

        meta = {META_KEY: json.dumps({**(meta or {}), "id": vid, "videos": int(latents.shape[0]),
                                      "created": _now()}, default=str)}
        try:
            with atomic_path(self.path / "videos" / f"{vid}.safetensors") as tmp:
                save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(tmp),
                          metadata=meta)
        except Exception as e:
            raise VideoSetError(f"could not save videos to {self.path} ({e}); nothing of them was saved") from e
        return vid

    def file_ids(self) -> list[str]:
        return sorted(p.stem for p in (self.path / "videos").glob("*.safetensors"))

    def file_path(self, vid: str) -> Path:
        return self.path / "videos" / f"{vid}.safetensors"

    def read(self) -> tuple[dict[str, int], list[str]]:
        """({file id: video count} of the usable files, one sentence per unusable file naming it)."""
        info = self.info()
        if info is None:
            raise VideoSetError(f"{self.path} has no dataset.json: it is not a video set (save videos with "
                                "PhysMasterSaveTrainingVideos)")
        from safetensors import safe_open

        usable, problems = {}, []
        for vid in self.file_ids():
            path = self.file_path(vid)
            where = f"videos/{path.name} in video set {self.name!r}"
            try:
                with safe_open(str(path), framework="pt") as f:
                    keys = set(f.keys())
                    if "latents" not in keys or "context" not in keys:
                        raise ValueError("it has no 'latents' or no 'context' tensor")
                    lat, ctx = f.get_slice("latents"), f.get_slice("context")
                    shape, dtype = list(lat.get_shape()), str(lat.get_dtype())
                    cshape = list(ctx.get_shape())
            except Exception as e:
                problems.append(f"{where} is unreadable ({e}); skipped")
                continue
            if dtype not in FLOAT_DTYPES or len(shape) != 5 or shape[1:] != info["latent_shape"]:
                problems.append(f"{where}: its latents are {dtype} {shape}, not [N, *{info['latent_shape']}] floats; "
                                "skipped")
            elif len(cshape) != 3 or cshape[-1] != info["context_dim"]:
                problems.append(f"{where}: its context is {cshape}, not {info['context_dim']} wide; skipped")
            else:
                usable[vid] = shape[0]
        return usable, problems

    def load(self, vid: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        try:
            return load_file(str(self.file_path(vid)))
        except Exception as e:
            raise VideoSetError(f"videos/{vid}.safetensors in video set {self.name!r} is unreadable ({e})") from None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()
