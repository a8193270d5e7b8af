"""Preference datasets on disk (shared/DESIGN.md section 5).

A dataset is a folder `<root>/<name>/`:

    dataset.json            what every group must match: latent shape (per candidate), context width, format version
    groups/<id>.safetensors one *group*: N candidate latents of one start image + prompt, and the conditioning they
                            were sampled with (text context without physical tokens, image conds, backbone features)
    pairs.jsonl             one preference per line: group, winner, loser, source (human|judge), margin, created,
                            and a CRC of the line so a torn or edited line is detected

Writes are safe with several writers at once: a group file is written to a temp file and renamed; a pair is one
`write` of one line to a file opened for appending, under an exclusive lock, after making sure the previous line
ended (a writer killed mid-line leaves one torn line that is reported and skipped, never merged into the next).
Reading never trusts a line: bad JSON, a CRC mismatch, an unknown group or an index out of range is reported in
`Stats.problems` and skipped. A dataset folder can be zipped and shared as it is.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .errors import PhysMasterError
from .fileio import atomic_path, atomic_write_text

FORMAT_VERSION = 1
SOURCES = ("human", "judge")
# always `fullmatch`: with `match`, "$" also matches before a final newline ("evil\n" would pass)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_GROUP_ID = re.compile(r"[0-9a-f]{32}")


class DatasetError(PhysMasterError):
    pass


def validate_name(name: str) -> str:
    """A dataset name from a user or a browser: letters, digits, '.', '_', '-'; no separators, no '..'."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise DatasetError(f"invalid dataset name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting "
                           "with a letter or digit (no path separators, no '..')")
    return name


@contextlib.contextmanager
def _locked(fd: int) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_LOCK, 1)
        try:
            yield
        finally:
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
        return
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _crc(record: dict) -> str:
    body = json.dumps({k: v for k, v in record.items() if k != "crc"}, sort_keys=True, separators=(",", ":"))
    return f"{zlib.crc32(body.encode()):08x}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


@dataclass(frozen=True)
class Pair:
    group: str
    winner: int
    loser: int
    source: str
    margin: float
    created: str

    def key(self) -> tuple:
        return (self.group, self.winner, self.loser, self.source, self.created)


@dataclass
class Stats:
    groups: int = 0
    pairs: int = 0
    human: int = 0
    judge: int = 0
    problems: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.groups} groups, {self.pairs} usable pairs ({self.human} human, {self.judge} judge)"
        if self.problems:
            text += f"; {len(self.problems)} entries skipped: " + "; ".join(self.problems[:5])
            if len(self.problems) > 5:
                text += " ..."
        return text


class PreferenceDataset:
    """A preference dataset folder. Create with `PreferenceDataset.open(root, name, create=True)`."""

    def __init__(self, path: Path):
        self.path = Path(path)

    # -- opening -----------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | os.PathLike, name: str, create: bool = False) -> "PreferenceDataset":
        path = Path(root) / validate_name(name)
        if not path.is_dir():
            if not create:
                raise DatasetError(f"preference dataset {name!r} not found in {root}; mark pairs with "
                                   "PhysMasterPreferencePicker first, or check the name")
            (path / "groups").mkdir(parents=True, exist_ok=True)
        return cls(path)

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def pairs_path(self) -> Path:
        return self.path / "pairs.jsonl"

    @property
    def info_path(self) -> Path:
        return self.path / "dataset.json"

    def info(self) -> dict[str, Any] | None:
        if not self.info_path.is_file():
            return None
        try:
            return json.loads(self.info_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DatasetError(f"{self.info_path} is unreadable ({e}); restore it from a copy of the dataset") from None

    # -- writing -----------------------------------------------------------------------------------------------
    def _check_or_set_info(self, latent_shape: list[int], context_dim: int) -> None:
        want = {"format_version": FORMAT_VERSION, "latent_shape": latent_shape, "context_dim": context_dim}
        with self._lock():
            info = self.info()
            if info is None:
                atomic_write_text(self.info_path, json.dumps({**want, "created": _now()}, indent=1))
                return
        self.check_compatible(latent_shape, context_dim, info=info)

    def check_compatible(self, latent_shape: list[int], context_dim: int, info: dict | None = None) -> None:
        """Raise if this dataset was made with another model (latent shape or context width differs)."""
        info = info if info is not None else self.info()
        if info is None:
            return
        problems = []
        if list(info.get("latent_shape", [])) != list(latent_shape):
            problems.append(f"latent shape {info.get('latent_shape')} vs {list(latent_shape)}")
        if int(info.get("context_dim", -1)) != int(context_dim):
            problems.append(f"context width {info.get('context_dim')} vs {context_dim}")
        if problems:
            raise DatasetError(f"preference dataset {self.name!r} was made with another model or resolution ("
                               + "; ".join(problems) + "): use a new dataset name for this model")

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with _locked(fd):
                yield
        finally:
            os.close(fd)

    def add_group(self, latents: torch.Tensor, context: torch.Tensor, extras: dict[str, torch.Tensor] | None = None,
                  meta: dict[str, Any] | None = None) -> str:
        """Store N candidate latents [N, ...] and their shared conditioning; returns the group id."""
        if latents.ndim < 2 or latents.shape[0] < 2:
            raise DatasetError(f"a group needs at least 2 candidate latents, got shape {list(latents.shape)}: sample "
                               "with batch_size >= 2")
        if context.ndim != 3:
            raise DatasetError(f"context must be [batch, length, width], got {list(context.shape)}")
        self._check_or_set_info(list(latents.shape[1:]), int(context.shape[-1]))
        group_id = uuid.uuid4().hex
        tensors = {"latents": latents, "context": context}
        for k, v in (extras or {}).items():
            if k in tensors:
                raise DatasetError(f"extra tensor name {k!r} is reserved")
            tensors[k] = v
        from safetensors.torch import save_file

        metadata = {"physmaster.group": json.dumps({"id": group_id, "candidates": int(latents.shape[0]),
                                                    "created": _now(), **(meta or {})}, default=str)}
        with atomic_path(self.path / "groups" / f"{group_id}.safetensors") as tmp:
            # clone: two entries may share storage (e.g. the backbone features and the CLIP vision output they
            # were read from), which safetensors refuses
            save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(tmp),
                      metadata=metadata)
        return group_id

    def add_pair(self, group: str, winner: int, loser: int, source: str, margin: float = 0.0) -> Pair:
        if source not in SOURCES:
            raise DatasetError(f"source must be one of {SOURCES}, got {source!r}")
        n = self.group_size(group)
        for what, i in (("winner", winner), ("loser", loser)):
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n:
                raise DatasetError(f"{what} index {i!r} is out of range for group {group} with {n} candidates")
        if winner == loser:
            raise DatasetError("winner and loser must be different candidates")
        pair = Pair(group, winner, loser, source, float(margin), _now())
        self._append(pair)
        return pair

    def _append(self, pair: Pair) -> None:
        record = {"group": pair.group, "winner": pair.winner, "loser": pair.loser, "source": pair.source,
                  "margin": pair.margin, "created": pair.created}
        record["crc"] = _crc(record)
        line = (json.dumps(record, sort_keys=True) + "\n").encode()
        fd = os.open(self.pairs_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            with _locked(fd):
                size = os.fstat(fd).st_size
                if size:
                    os.lseek(fd, size - 1, os.SEEK_SET)
                    if os.read(fd, 1) != b"\n":  # a writer died mid-line: end its torn line first
                        line = b"\n" + line
                os.write(fd, line)
                os.fsync(fd)
        finally:
            os.close(fd)

    # -- reading -----------------------------------------------------------------------------------------------
    def group_path(self, group: str) -> Path:
        if not isinstance(group, str) or not _GROUP_ID.fullmatch(group):
            raise DatasetError(f"invalid group id {group!r}")
        return self.path / "groups" / f"{group}.safetensors"

    def group_ids(self) -> list[str]:
        return sorted(p.stem for p in (self.path / "groups").glob("*.safetensors") if _GROUP_ID.fullmatch(p.stem))

    def group_meta(self, group: str) -> dict[str, Any]:
        from safetensors import safe_open

        path = self.group_path(group)
        if not path.is_file():
            raise DatasetError(f"group {group} is missing from dataset {self.name!r}")
        try:
            with safe_open(str(path), framework="pt") as f:
                return json.loads((f.metadata() or {}).get("physmaster.group", "{}"))
        except Exception as e:
            raise DatasetError(f"group file {path.name} is unreadable ({e})") from None

    def group_size(self, group: str) -> int:
        return int(self.group_meta(group).get("candidates", 0))

    def load_group(self, group: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.group_path(group)
        try:
            return load_file(str(path), device=device)
        except Exception as e:
            raise DatasetError(f"group file {path.name} is unreadable ({e}); it is skipped") from None

    def read_pairs(self) -> tuple[list[Pair], Stats]:
        """All usable pairs, and stats with every skipped entry named."""
        stats = Stats()
        sizes: dict[str, int] = {}
        for g in self.group_ids():
            try:
                sizes[g] = self.group_size(g)
            except DatasetError as e:
                stats.problems.append(str(e))
        stats.groups = len(sizes)
        pairs: list[Pair] = []
        if not self.pairs_path.is_file():
            return pairs, stats
        with open(self.pairs_path, "rb") as f:
            raw = f.read()
        for lineno, line in enumerate(raw.split(b"\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or record.get("crc") != _crc(record):
                    raise ValueError("checksum mismatch (torn or edited line)")
                pair = Pair(group=str(record["group"]), winner=int(record["winner"]), loser=int(record["loser"]),
                            source=str(record["source"]), margin=float(record["margin"]),
                            created=str(record["created"]))
            except (ValueError, KeyError, TypeError) as e:
                stats.problems.append(f"pairs.jsonl line {lineno}: {e}")
                continue
            n = sizes.get(pair.group)
            if n is None:
                stats.problems.append(f"pairs.jsonl line {lineno}: group {pair.group} is missing")
                continue
            if not (0 <= pair.winner < n and 0 <= pair.loser < n) or pair.winner == pair.loser:
                stats.problems.append(f"pairs.jsonl line {lineno}: indices {pair.winner}/{pair.loser} invalid "
                                      f"for {n} candidates")
                continue
            pairs.append(pair)
        stats.pairs = len(pairs)
        stats.human = sum(p.source == "human" for p in pairs)
        stats.judge = sum(p.source == "judge" for p in pairs)
        return pairs, stats

    def stats(self) -> Stats:
        return self.read_pairs()[1]

    def merge_from(self, other: "PreferenceDataset") -> Stats:
        """Copy another dataset's groups and pairs into this one (same model only); duplicates are skipped."""
        info = other.info()
        if info is not None:
            self._check_or_set_info(list(info["latent_shape"]), int(info["context_dim"]))
        for g in other.group_ids():
            dst = self.group_path(g)
            if not dst.exists():
                with atomic_path(dst) as tmp:
                    shutil.copyfile(other.group_path(g), tmp)
        have = {p.key() for p in self.read_pairs()[0]}
        theirs, their_stats = other.read_pairs()
        for p in theirs:
            if p.key() not in have:
                self._append(p)
        return their_stats
