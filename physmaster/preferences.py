"""Preference datasets on disk (shared/DESIGN.md section 5).

A dataset is a folder `<root>/<name>/`:

    dataset.json            what every group must match: latent shape (per candidate), context width, format version
    groups/<id>.safetensors one *group*: N candidate latents of one start image + prompt, and the conditioning they
                            were sampled with (text context without physical tokens, image conds, backbone features)
    pairs.jsonl             one preference per line: group, winner, loser, source (human|judge), margin, created,
                            the answer it belongs to (id and size, when an answer holds more than one pair), and a
                            CRC of the line so a torn or edited line is detected

Writes are safe with several writers at once: a group file is written to a temp file and renamed; an *answer* (the
pairs of one ranking, or one pair) is appended under the dataset's lock (`filelock`), after making sure the previous
line ended (a writer killed mid-line leaves one torn line that is reported and skipped, never merged into the next).
An append completes or raises: a short write is continued, a failed one (a full disk) cuts the file back to its old
size and raises DatasetError. Readers count an answer only when all its lines are there, so a kill mid-answer
leaves none of its pairs, never some.
Nothing is ever rewritten in place. Dropping a wrong pair or a whole group (the review node, the picker's undo)
appends a *tombstone* line (`drop_pair`, `drop_group`), checksummed and written under the lock like an answer;
`read_pairs` leaves out every pair a tombstone names (and every pair of a dropped group, whenever it was written),
so training, the stats and `merge_from` never see a dropped pair. `read_pairs(include_dropped=True)` returns them
too (flagged by `is_dropped`), for a review.
Reading never trusts a line: an over-long line, bad JSON, a CRC mismatch, a value of the wrong type (refused, never
coerced), an unknown group or an index out of range is reported in `Stats.problems` and skipped. Nor a group: its
header is checked the way training will use it (`check_group`: metadata, candidate count, latent shape, context
width), and an unusable group is named in `Stats.bad_groups` and its pairs skipped (`Stats.group_report()`: one
sentence per group, with the pairs it costs); `screen_pairs` checks the groups of given pairs again just before
training loads them. A dataset folder can be zipped and shared as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import errno
import json
import math
import numbers
import os
import re
import shutil
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from filelock import FileLock, Timeout

from .errors import PhysMasterError
from .errors import describe as _show
from .fileio import atomic_path, atomic_write_text, remove_stale_temps

FORMAT_VERSION = 1
SOURCES = ("human", "judge")
#: seconds a writer waits for another writer's lock before giving up with a clear error
LOCK_TIMEOUT = 120.0
#: longest pairs.jsonl line read (ours are ~250 bytes); longer lines are reported and skipped unparsed
MAX_LINE = 4096
#: bounds on what a dataset's files may claim, checked before anything is read or allocated
MAX_INFO = 64 * 1024  # bytes of dataset.json
MAX_GROUP_META = 1 << 20  # characters of a group's physmaster.group metadata
MAX_CANDIDATES = 4096
MAX_DIM = 1 << 20  # any one latent or context dimension
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
GROUP_KEY = "physmaster.group"
#: longest reason a tombstone may carry
MAX_REASON = 200
DROP_KINDS = ("pair", "group")
#: most pairs one answer may hold (a ranking of N candidates is N(N-1)/2 pairs; a merge is one answer too)
MAX_ANSWER = 10_000_000
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


def open_folder(root: str | os.PathLike, name: str, create: bool, error: type[Exception], what: str,
                temp_folders: tuple[str, ...], how_to_make: str) -> Path:
    """`root/name` of a dataset-like folder (`what`: "preference dataset", "video set"), its name validated.
    An existing folder has the temp files of killed writers removed from `temp_folders` ("" = itself); a file
    in its place, or a missing folder without `create`, is an `error` that says what to do."""
    path = Path(root) / validate_name(name)
    if path.is_dir():
        for sub in temp_folders:
            remove_stale_temps(path / sub if sub else path)
    elif path.exists():
        raise error(f"{path} is a file, not a {what} folder: choose another name")
    elif not create:
        raise error(f"{what} {name!r} not found in {root}; {how_to_make}, or check the name")
    return path


def _make_pairs(group: str | None, n: int, pairs: Iterable[tuple], source: str) -> list["Pair"]:
    """Checked Pairs of one answer for a group of `n` candidates (None: a group not written yet; its Pairs get the
    group "" until it is), sharing one `created` time."""
    if source not in SOURCES:
        raise DatasetError(f"source must be one of {SOURCES}, got {source!r}")
    created = _now()
    out = []
    for item in pairs:
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise DatasetError(f"a pair is (winner, loser) or (winner, loser, margin), got {item!r}")
        winner, loser, margin = (*item, 0.0) if len(item) == 2 else item
        for what, i in (("winner", winner), ("loser", loser)):
            if type(i) is not int or not 0 <= i < n:
                raise DatasetError(f"{what} index {i!r} is out of range for {f'group {group}' if group else 'a group'} "
                                   f"with {n} candidates")
        if winner == loser:
            raise DatasetError("winner and loser must be different candidates")
        if not isinstance(margin, numbers.Real) or isinstance(margin, bool) or not math.isfinite(margin):
            raise DatasetError(f"margin must be a finite number, got {margin!r}")
        out.append(Pair(group or "", winner, loser, source, float(margin), created))
    return out


def _write_all(fd: int, data: bytes) -> None:
    """`os.write` until all of `data` is written; a write that makes no progress raises (it never returns short)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.ENOSPC, "no space left on device (a write made no progress)")
        view = view[written:]


def _crc(record: dict) -> str:
    body = json.dumps({k: v for k, v in record.items() if k != "crc"}, sort_keys=True, separators=(",", ":"))
    return f"{zlib.crc32(body.encode()):08x}"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat()


def _lines(f, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """(line number, line without its newline or None when longer than `limit`, length) for each line of a binary
    file; an over-long line is skipped in chunks, never held in memory whole."""
    lineno = 0
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        lineno += 1
        if line.endswith(b"\n"):
            yield lineno, line[:-1], len(line) - 1
            continue
        length = len(line)
        if length <= limit:  # the last line, without a newline
            yield lineno, line, length
            continue
        while True:
            more = f.readline(1 << 16)
            if not more:
                break
            if more.endswith(b"\n"):
                length += len(more) - 1
                break
            length += len(more)
        yield lineno, None, length


def _parse_record(line: bytes) -> dict:
    """A pairs.jsonl line -> its checked JSON object (any kind). Raises ValueError naming what is wrong."""
    record = _loads(line, "the line")
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object but {_show(record)}")
    if record.get("crc") != _crc(record):
        raise ValueError("checksum mismatch (torn or edited line)")
    return record


def _parse_pair_line(line: bytes | dict) -> tuple["Pair", str | None, int | None]:
    """A pairs.jsonl line (or its record from `_parse_record`) -> (pair, answer id or None, answer size or None).
    Raises ValueError naming what is wrong; values of the wrong type are refused, never coerced."""
    record = line if isinstance(line, dict) else _parse_record(line)
    for key in ("group", "winner", "loser", "source", "margin", "created"):
        if key not in record:
            raise ValueError(f"no {key!r} field")
    group, winner, loser, source, margin, created = (record[k] for k in ("group", "winner", "loser", "source",
                                                                         "margin", "created"))
    if type(group) is not str or not _GROUP_ID.fullmatch(group):
        raise ValueError(f"group must be a group id, got {_show(group)}")
    for what, value in (("winner", winner), ("loser", loser)):
        if type(value) is not int:
            raise ValueError(f"{what} must be a whole number (a candidate index), got {_show(value)}")
    if type(source) is not str or source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {_show(source)}")
    if type(margin) not in (int, float) or not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number, got {_show(margin)}")
    if type(created) is not str:
        raise ValueError(f"created must be a text timestamp, got {_show(created)}")
    answer, answer_size = record.get("answer"), record.get("answer_size")
    if answer is not None or answer_size is not None:
        if type(answer) is not str or not _GROUP_ID.fullmatch(answer):
            raise ValueError(f"answer must be an answer id, got {_show(answer)}")
        if type(answer_size) is not int or not 2 <= answer_size <= MAX_ANSWER:
            raise ValueError(f"answer_size must be a whole number 2..{MAX_ANSWER}, got {_show(answer_size)}")
    return Pair(group, winner, loser, source, float(margin), created), answer, answer_size


def _parse_drop(record: dict) -> "Drop":
    """A tombstone record (from `_parse_record`, with a "drop" field) -> Drop. Raises ValueError naming what is
    wrong; values of the wrong type are refused, never coerced."""
    kind, group, created, reason = (record.get(k) for k in ("drop", "group", "created", "reason"))
    if type(kind) is not str or kind not in DROP_KINDS:
        raise ValueError(f"drop must be one of {DROP_KINDS}, got {_show(kind)}")
    if type(group) is not str or not _GROUP_ID.fullmatch(group):
        raise ValueError(f"group must be a group id, got {_show(group)}")
    if type(created) is not str:
        raise ValueError(f"created must be a text timestamp, got {_show(created)}")
    if reason is not None and (type(reason) is not str or len(reason) > MAX_REASON):
        raise ValueError(f"reason must be a text of at most {MAX_REASON} characters, got {_show(reason)}")
    if kind == "group":
        return Drop(group, None, reason or "", created)
    winner, loser, source, pair_created = (record.get(k) for k in ("winner", "loser", "source", "pair_created"))
    for what, value in (("winner", winner), ("loser", loser)):
        if type(value) is not int:
            raise ValueError(f"{what} must be a whole number (a candidate index), got {_show(value)}")
    if type(source) is not str or source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {_show(source)}")
    if type(pair_created) is not str:
        raise ValueError(f"pair_created must be a text timestamp, got {_show(pair_created)}")
    return Drop(group, (group, winner, loser, source, pair_created), reason or "", created)


def _skipped(why: str, count: int) -> str:
    """'<why a group is unusable>: its 3 pairs skipped' (the train node counts skipped pairs from this ending)."""
    if not count:
        return f"{why} (no pair uses it)"
    return f"{why}: its {count} pair{'s' if count != 1 else ''} skipped"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a dataset may hold")


def _loads(text: str | bytes, what: str) -> Any:
    """json.loads for text from a file someone may have edited: no NaN/Infinity, and nesting too deep for the
    parser is a ValueError, not a RecursionError. Bound the text's length before calling."""
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to be a PhysMaster entry") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, over-long integers
        raise ValueError(f"{what} is not valid JSON ({e})") from None


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


@dataclass(frozen=True)
class Drop:
    """A tombstone: `pair` is the dropped pair's `Pair.key()`, or None when the whole `group` is dropped."""
    group: str
    pair: tuple | None
    reason: str
    created: str


@dataclass(frozen=True)
class Drops:
    """What the tombstones of a dataset drop: whole groups, and single pairs (by `Pair.key()`)."""
    groups: frozenset = frozenset()
    pairs: frozenset = frozenset()

    def __contains__(self, pair: "Pair") -> bool:
        return pair.group in self.groups or pair.key() in self.pairs


@dataclass
class Stats:
    groups: int = 0
    pairs: int = 0
    human: int = 0
    judge: int = 0
    #: every skipped entry (unusable group, bad line, cut-short answer), named: what the Dataset node shows
    problems: list[str] = field(default_factory=list)
    #: group id -> why it is unusable (its pairs are skipped too); training would fail on these groups
    bad_groups: dict[str, str] = field(default_factory=dict)
    #: group id -> how many pairs.jsonl entries were skipped because they use that unusable group
    bad_group_pairs: dict[str, int] = field(default_factory=dict)
    #: usable pairs left out because a tombstone drops them (not counted in `pairs`), and the dropped groups
    dropped: int = 0
    dropped_groups: set[str] = field(default_factory=set)

    def group_report(self) -> list[str]:
        """One sentence per unusable group: why (naming its file) and how many pairs that costs."""
        return [_skipped(why, self.bad_group_pairs.get(g, 0)) for g, why in self.bad_groups.items()]

    def summary(self) -> str:
        text = f"{self.groups} groups, {self.pairs} usable pairs ({self.human} human, {self.judge} judge)"
        if self.dropped or self.dropped_groups:
            n = len(self.dropped_groups)
            text += f"; {self.dropped} pair{'s' if self.dropped != 1 else ''} dropped"
            text += f" ({n} whole group{'s' if n != 1 else ''})" if n else ""
        if self.bad_groups:
            text += f"; {len(self.bad_groups)} unusable group{'s' if len(self.bad_groups) > 1 else ''}"
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
        """Open dataset `name` in `root`. With `create`, a dataset that does not exist yet is allowed: its folder is
        made by the first write (`add_group`), so opening and then writing nothing (a cancelled picker) leaves
        nothing behind. Temp files that killed writers left behind (over an hour old) are removed."""
        return cls(open_folder(root, name, create, DatasetError, "preference dataset", ("", "groups"),
                               "mark pairs with PhysMasterPreferencePicker first"))

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
        """dataset.json, checked: {format_version, latent_shape, context_dim, ...}; None before the first group."""
        if not self.info_path.is_file():
            return None
        fix = "restore it from a copy of the dataset, or delete it to take the shapes from the next group"
        try:
            size = self.info_path.stat().st_size
            if size > MAX_INFO:
                raise ValueError(f"{size} bytes, more than dataset.json can be ({MAX_INFO})")
            info = _loads(self.info_path.read_bytes(), "its text")
        except (OSError, ValueError) as e:
            raise DatasetError(f"{self.info_path} is unreadable ({e}); {fix}") from None
        if not isinstance(info, dict):
            raise DatasetError(f"{self.info_path} must hold a JSON object, not {_show(info)}; {fix}")
        shape, width, version = info.get("latent_shape"), info.get("context_dim"), info.get("format_version")
        problems = []
        if not (isinstance(shape, list) and 1 <= len(shape) <= 8
                and all(type(d) is int and 1 <= d <= MAX_DIM for d in shape)):
            problems.append(f"latent_shape must be a list of 1-8 sizes 1..{MAX_DIM}, got {_show(shape)}")
        if type(width) is not int or not 1 <= width <= MAX_DIM:
            problems.append(f"context_dim must be a whole number 1..{MAX_DIM}, got {_show(width)}")
        if version is not None and (type(version) is not int or version < 1):
            problems.append(f"format_version must be a whole number >= 1, got {_show(version)}")
        elif version is not None and version > FORMAT_VERSION:
            raise DatasetError(f"{self.info_path} has format_version {version}, newer than this PhysMaster reads "
                               f"({FORMAT_VERSION}): update the PhysMaster node pack")
        if problems:
            raise DatasetError(f"{self.info_path} is invalid: " + "; ".join(problems) + f"; {fix}")
        return info

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
        """The dataset's one writer lock (`filelock`: flock on POSIX, a real blocking lock on Windows)."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(self.path / ".lock"), timeout=LOCK_TIMEOUT)
        try:
            lock.acquire()
        except Timeout:
            raise DatasetError(f"preference dataset {self.name!r} stayed locked by another writer for "
                               f"{LOCK_TIMEOUT:.0f} s; wait for the other run to finish and try again") from None
        try:
            yield
        finally:
            lock.release()

    def add_group(self, latents: torch.Tensor, context: torch.Tensor, extras: dict[str, torch.Tensor] | None = None,
                  meta: dict[str, Any] | None = None) -> str:
        """Store N candidate latents [N, ...] and their shared conditioning; returns the group id."""
        if latents.ndim < 2 or latents.shape[0] < 2:
            raise DatasetError(f"a group needs at least 2 candidate latents, got shape {list(latents.shape)}: sample "
                               "with batch_size >= 2")
        if latents.shape[0] > MAX_CANDIDATES:
            raise DatasetError(f"a group holds at most {MAX_CANDIDATES} candidates, got {latents.shape[0]}")
        if context.ndim != 3:
            raise DatasetError(f"context must be [batch, length, width], got {list(context.shape)}")
        group_id = uuid.uuid4().hex
        tensors = {"latents": latents, "context": context}
        for k, v in (extras or {}).items():
            if k in tensors:
                raise DatasetError(f"extra tensor name {k!r} is reserved")
            tensors[k] = v
        from safetensors.torch import save_file

        metadata = {GROUP_KEY: json.dumps({**(meta or {}), "id": group_id, "candidates": int(latents.shape[0]),
                                           "created": _now()}, default=str)}
        try:
            self._check_or_set_info(list(latents.shape[1:]), int(context.shape[-1]))
            with atomic_path(self.path / "groups" / f"{group_id}.safetensors") as tmp:
                # clone: two entries may share storage (e.g. the backbone features and the CLIP vision output they
                # were read from), which safetensors refuses
                save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(tmp),
                          metadata=metadata)
        except DatasetError:
            raise
        except Exception as e:  # OSError, or safetensors' own error for a full disk
            raise DatasetError(f"could not save a group to {self.path} ({e}); nothing of it was saved. Free disk "
                               "space (or fix the folder's permissions) and try again") from e
        return group_id

    def add_pair(self, group: str, winner: int, loser: int, source: str, margin: float = 0.0) -> Pair:
        return self.add_pairs(group, [(winner, loser, margin)], source)[0]

    def add_pairs(self, group: str, pairs: Iterable[tuple[int, int] | tuple[int, int, float]],
                  source: str) -> list[Pair]:
        """Save one answer (a person's ranking, or the judge's pairs for one group) whole or not at all.

        `pairs` are (winner, loser) or (winner, loser, margin). All of them are checked first and then written in
        one append; each line names the answer and its size, so a reader skips an answer cut short by a kill.
        Raises DatasetError (and saves nothing) on a bad pair or a failed write, e.g. a full disk."""
        out = _make_pairs(group, self.group_size(group), pairs, source)
        self._append(out)
        return out

    def add_group_with_pairs(self, latents: torch.Tensor, context: torch.Tensor,
                             pairs: Iterable[tuple[int, int] | tuple[int, int, float]], source: str,
                             extras: dict[str, torch.Tensor] | None = None,
                             meta: dict[str, Any] | None = None) -> tuple[str, list[Pair]]:
        """A person's whole answer: the group (as `add_group`) and its pairs (as `add_pairs`), or nothing.

        The pairs are checked before anything is written; if writing the pairs fails, the new group file is
        removed again and DatasetError is raised."""
        n = int(latents.shape[0]) if latents.ndim else 0
        checked = _make_pairs(None, n, pairs, source)
        group = self.add_group(latents, context, extras, meta)
        out = [dataclasses.replace(p, group=group) for p in checked]
        try:
            self._append(out)
        except BaseException:
            with contextlib.suppress(OSError):
                self.group_path(group).unlink()
            raise
        return group, out

    def _append(self, pairs: Sequence[Pair]) -> None:
        """Append `pairs` as one answer, under the lock: either every line is written and synced, or the file is
        cut back to its old size and DatasetError is raised. A short `os.write` is continued, never ignored."""
        if not pairs:
            return
        answer = {"answer": uuid.uuid4().hex, "answer_size": len(pairs)} if len(pairs) > 1 else {}
        self._append_records([{"group": pair.group, "winner": pair.winner, "loser": pair.loser,
                               "source": pair.source, "margin": pair.margin, "created": pair.created, **answer}
                              for pair in pairs], f"{len(pairs)} pair{'s' if len(pairs) > 1 else ''}")

    def _append_records(self, records: Sequence[dict], what: str) -> None:
        """Append checksummed `records` in one write under the lock, whole or not at all (see `_append`)."""
        lines = []
        for record in records:
            record = {**record, "crc": _crc(record)}
            lines.append(json.dumps(record, sort_keys=True) + "\n")
        data = "".join(lines).encode()
        try:  # any OSError, from taking the lock to the last byte, leaves nothing of this answer behind
            with self._lock():
                fd = os.open(self.pairs_path, os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0),
                             0o644)
                try:
                    size = os.fstat(fd).st_size
                    if size:
                        os.lseek(fd, size - 1, os.SEEK_SET)
                        if os.read(fd, 1) != b"\n":  # a writer died mid-line: end its torn line first
                            data = b"\n" + data
                    try:
                        _write_all(fd, data)
                        os.fsync(fd)
                    except BaseException:
                        with contextlib.suppress(OSError):
                            os.ftruncate(fd, size)  # leave no part of this answer behind
                        raise
                finally:
                    os.close(fd)
        except OSError as e:
            raise DatasetError(
                f"could not save {what} to {self.pairs_path} "
                f"({e.strerror or e}); nothing of this answer was saved. Free disk space (or fix the "
                "folder's permissions) and answer again") from e

    # -- dropping (tombstones) ---------------------------------------------------------------------------------
    def drop_pair(self, pair: Pair, reason: str = "") -> Drop:
        """Drop one pair (as `read_pairs` returned it): append a tombstone naming it; nothing is rewritten.
        Raises DatasetError if it cannot be written (then nothing is)."""
        if not isinstance(pair, Pair):
            raise DatasetError(f"drop_pair takes a Pair from read_pairs, got {_show(pair)}")
        self.group_path(pair.group)  # a valid group id, or DatasetError
        reason = self._reason(reason)
        record = {"drop": "pair", "group": pair.group, "winner": pair.winner, "loser": pair.loser,
                  "source": pair.source, "pair_created": pair.created, "created": _now(), "reason": reason}
        self._append_records([record], "a tombstone (pair drop)")
        return Drop(pair.group, pair.key(), reason, record["created"])

    def drop_group(self, group: str, reason: str = "") -> Drop:
        """Drop a whole group: every pair of it, now or later, is left out. Appends a tombstone; the group file
        stays (a dataset is never rewritten in place). Raises DatasetError if it cannot be written."""
        self.group_path(group)  # a valid group id, or DatasetError
        reason = self._reason(reason)
        record = {"drop": "group", "group": group, "created": _now(), "reason": reason}
        self._append_records([record], "a tombstone (group drop)")
        return Drop(group, None, reason, record["created"])

    @staticmethod
    def _reason(reason: str) -> str:
        if not isinstance(reason, str):
            raise DatasetError(f"a drop's reason must be text, got {_show(reason)}")
        return reason[:MAX_REASON]

    def drops(self) -> Drops:
        """The groups and pairs the dataset's tombstones drop (bad tombstone lines are reported by read_pairs)."""
        return self._read()[2]

    # -- reading -----------------------------------------------------------------------------------------------
    def group_path(self, group: str) -> Path:
        if not isinstance(group, str) or not _GROUP_ID.fullmatch(group):
            raise DatasetError(f"invalid group id {group!r}")
        return self.path / "groups" / f"{group}.safetensors"

    def group_ids(self) -> list[str]:
        return sorted(p.stem for p in (self.path / "groups").glob("*.safetensors") if _GROUP_ID.fullmatch(p.stem))

    def _group_header(self, group: str) -> tuple[Path, dict[str, Any], dict[str, tuple[list[int], str]]]:
        """(path, checked physmaster.group metadata, {"latents"/"context": (shape, dtype)}) from the header only."""
        from safetensors import safe_open

        path = self.group_path(group)
        if not path.is_file():
            raise DatasetError(f"group {group} is missing from dataset {self.name!r}")
        try:
            with safe_open(str(path), framework="pt") as f:
                text = (f.metadata() or {}).get(GROUP_KEY, "{}")
                tensors, names = {}, set(f.keys())
                for k in ("latents", "context"):  # what training reads; the others are checked when loaded
                    if k in names:
                        view = f.get_slice(k)
                        tensors[k] = (list(view.get_shape()), str(view.get_dtype()))
        except Exception as e:
            raise DatasetError(f"group file {path.name} is unreadable ({e})") from None
        where = f"group file groups/{path.name} in dataset {self.name!r}"
        try:
            if len(text) > MAX_GROUP_META:
                raise ValueError(f"metadata is {len(text)} characters, more than a group's can be ({MAX_GROUP_META})")
            meta = _loads(text, "metadata")
        except ValueError as e:
            raise DatasetError(f"{where}: its {GROUP_KEY} {e}") from None
        if not isinstance(meta, dict):
            raise DatasetError(f"{where}: its {GROUP_KEY} metadata must be a JSON object, not {_show(meta)}")
        n = meta.get("candidates")
        if type(n) is not int or not 2 <= n <= MAX_CANDIDATES:
            raise DatasetError(f"{where}: its metadata field 'candidates' must be a whole number 2..{MAX_CANDIDATES}, "
                               f"got {_show(n)}")
        return path, meta, tensors

    def group_meta(self, group: str) -> dict[str, Any]:
        """A group's metadata (id, candidates, created, prompt, ...), checked; DatasetError if unusable."""
        return self._group_header(group)[1]

    def group_size(self, group: str) -> int:
        return self._group_header(group)[1]["candidates"]

    def check_group(self, group: str, latent_shape: Sequence[int] | None = None,
                    context_dim: int | None = None) -> tuple[int, list[int], int]:
        """Check a group the way training will use it, from its header only (nothing is loaded).

        Returns (candidates, latent shape per candidate, context width). Raises DatasetError naming the group
        file and the problem: metadata that is not an object or a bad `candidates`, no or non-float `latents`, a
        latent count other than `candidates`, a latent shape other than `latent_shape` (the dataset's), no 3-D
        `context`, or a context width other than `context_dim`."""
        path, meta, tensors = self._group_header(group)
        where = f"group file groups/{path.name} in dataset {self.name!r}"
        n = meta["candidates"]
        if "latents" not in tensors:
            raise DatasetError(f"{where} has no 'latents' tensor")
        shape, dtype = tensors["latents"]
        if dtype not in FLOAT_DTYPES:
            raise DatasetError(f"{where}: its latents are {dtype}, not floating point")
        if len(shape) < 2:
            raise DatasetError(f"{where}: its latents are shaped {shape}, not [candidates, ...]")
        if shape[0] != n:
            raise DatasetError(f"{where} holds {shape[0]} candidate latents but its metadata says {n} candidates")
        if latent_shape is not None and shape[1:] != list(latent_shape):
            raise DatasetError(f"{where}: its latents are shaped {shape[1:]} per candidate, but the dataset's are "
                               f"{list(latent_shape)}")
        if "context" not in tensors or len(tensors["context"][0]) != 3:
            raise DatasetError(f"{where} has no 'context' tensor [batch, length, width]")
        width = tensors["context"][0][-1]
        if context_dim is not None and width != context_dim:
            raise DatasetError(f"{where}: its context is {width} wide, but the dataset's is {context_dim}")
        return n, shape[1:], width

    def _check_groups(self, groups: Iterable[str], info: dict | None) -> tuple[dict[str, int], dict[str, str]]:
        """`check_group` on each of `groups` against dataset.json's shapes (`info`; None: the first usable group
        sets them): ({group: candidates} of the usable ones, {group: why} of the unusable ones)."""
        shape, width = (info["latent_shape"], info["context_dim"]) if info else (None, None)
        sizes: dict[str, int] = {}
        bad: dict[str, str] = {}
        for g in groups:
            try:
                sizes[g], shape, width = self.check_group(g, shape, width)
            except DatasetError as e:
                bad[g] = str(e)
        return sizes, bad

    def screen_pairs(self, pairs: Sequence[Pair]) -> tuple[list[Pair], list[str]]:
        """Check the groups of `pairs` (from `read_pairs`, perhaps filtered) again, just before they are loaded for
        training: each group as `check_group` does, and that it holds every candidate its pairs use. Reads headers
        only. Returns the pairs whose group passes, and one sentence per failing group naming its file and the
        problem and ending in how many of `pairs` it costs ('...: its 3 pairs skipped')."""
        try:
            info = self.info()
        except DatasetError:  # read_pairs reports it; the groups are still checked against each other
            info = None
        need: dict[str, int] = {}
        for p in pairs:
            need[p.group] = max(need.get(p.group, 0), p.winner + 1, p.loser + 1)
        sizes, bad = self._check_groups(need, info)
        for g, n in sizes.items():
            if need[g] > n:
                bad[g] = (f"group file groups/{g}.safetensors in dataset {self.name!r} holds {n} candidates but its "
                          f"pairs use candidate {need[g] - 1}")
        kept = [p for p in pairs if p.group not in bad]
        return kept, [_skipped(why, sum(p.group == g for p in pairs)) for g, why in bad.items()]

    def load_group(self, group: str, device: str = "cpu") -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.group_path(group)
        try:
            return load_file(str(path), device=device)
        except Exception as e:
            raise DatasetError(f"group file {path.name} is unreadable ({e}); it is skipped") from None

    def read_pairs(self, include_dropped: bool = False) -> tuple[list[Pair], Stats]:
        """All usable pairs, and stats with every skipped entry named. Never raises on what is in the files.

        Pairs a tombstone drops are left out (counted in `Stats.dropped`); with `include_dropped` they are
        returned too, for a review (`drops()` or `is_dropped` tells them apart). The stats count the same either
        way: dropped pairs are never in `Stats.pairs`."""
        pairs, stats, drops = self._read()
        if not include_dropped:
            pairs = [p for p in pairs if p not in drops]
        return pairs, stats

    def is_dropped(self, pair: Pair, drops: Drops | None = None) -> bool:
        return pair in (drops if drops is not None else self.drops())

    def _read(self) -> tuple[list[Pair], Stats, Drops]:
        """(every usable pair, dropped ones included; stats that leave dropped pairs out; the drops)."""
        stats = Stats()
        try:
            info = self.info()
        except DatasetError as e:
            stats.problems.append(str(e))
            info = None
        sizes, stats.bad_groups = self._check_groups(self.group_ids(), info)
        stats.problems.extend(stats.bad_groups.values())
        stats.groups = len(sizes)
        pairs: list[Pair] = []
        if not self.pairs_path.is_file():
            return pairs, stats, Drops()
        problems: list[tuple[int, str]] = []
        drop_list: list[Drop] = []
        entries: list[tuple[int, Pair, str | None]] = []
        answers: dict[str, dict[str, Any]] = {}
        try:
            f = open(self.pairs_path, "rb")
        except OSError as e:
            stats.problems.append(f"pairs.jsonl cannot be read ({e.strerror or e}); no pairs are used")
            return pairs, stats, Drops()
        with f:
            for lineno, line, length in _lines(f, MAX_LINE):
                if line is None:
                    problems.append((lineno, f"pairs.jsonl line {lineno}: {length} bytes, longer than a pair line "
                                             f"can be ({MAX_LINE})"))
                    continue
                if not line.strip():
                    continue
                try:
                    record = _parse_record(line)
                    if "drop" in record:  # a tombstone
                        drop_list.append(_parse_drop(record))
                        continue
                    pair, answer, answer_size = _parse_pair_line(record)
                except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as e:
                    problems.append((lineno, f"pairs.jsonl line {lineno}: {e}"))
                    continue
                entries.append((lineno, pair, answer))
                if answer is not None:
                    seen = answers.setdefault(answer, {"sizes": set(), "lines": []})
                    seen["sizes"].add(answer_size)
                    seen["lines"].append(lineno)
        broken = set()
        for answer, seen in answers.items():  # an answer counts only if every one of its lines is here, once
            (size, *others), lines = sorted(seen["sizes"]), seen["lines"]
            if others or len(lines) != size:
                broken.add(answer)
                where = f"line {lines[0]}" if len(lines) == 1 else f"lines {lines[0]}-{lines[-1]}"
                problems.append((lines[0], f"pairs.jsonl {where}: {len(lines)} of an answer's {size} pairs are "
                                           "saved (its writer was stopped mid-answer, or lines were edited); the "
                                           "whole answer is skipped"))
        for lineno, pair, answer in entries:
            if answer in broken:
                continue
            n = sizes.get(pair.group)
            if n is None:
                why = f"is missing (no file groups/{pair.group}.safetensors)"
                if pair.group in stats.bad_groups:
                    why = "is unusable (see above)"
                    stats.bad_group_pairs[pair.group] = stats.bad_group_pairs.get(pair.group, 0) + 1
                problems.append((lineno, f"pairs.jsonl line {lineno}: group {pair.group} {why}"))
                continue
            if not (0 <= pair.winner < n and 0 <= pair.loser < n) or pair.winner == pair.loser:
                problems.append((lineno, f"pairs.jsonl line {lineno}: indices {pair.winner}/{pair.loser} invalid "
                                         f"for {n} candidates"))
                continue
            pairs.append(pair)
        stats.problems.extend(text for _, text in sorted(problems, key=lambda p: p[0]))
        drops = Drops(frozenset(d.group for d in drop_list if d.pair is None),
                      frozenset(d.pair for d in drop_list if d.pair is not None))
        kept = [p for p in pairs if p not in drops]
        stats.dropped = len(pairs) - len(kept)
        stats.dropped_groups = {g for g in drops.groups if g in sizes}
        stats.groups = len(sizes) - len(stats.dropped_groups)
        stats.pairs = len(kept)
        stats.human = sum(p.source == "human" for p in kept)
        stats.judge = sum(p.source == "judge" for p in kept)
        return pairs, stats, drops

    def stats(self) -> Stats:
        return self.read_pairs()[1]

    def merge_from(self, other: "PreferenceDataset") -> Stats:
        """Copy another dataset's usable groups and pairs into this one (same model only); duplicates are skipped.
        Returns the other dataset's stats (what was skipped there is named in its problems)."""
        info = other.info()
        if info is not None:
            self._check_or_set_info(list(info["latent_shape"]), int(info["context_dim"]))
        theirs, their_stats = other.read_pairs()
        for g in other.group_ids():
            dst = self.group_path(g)
            if g not in their_stats.bad_groups and g not in their_stats.dropped_groups and not dst.exists():
                with atomic_path(dst) as tmp:
                    shutil.copyfile(other.group_path(g), tmp)
        have = {p.key() for p in self.read_pairs()[0]}
        self._append([p for p in theirs if p.key() not in have])  # one answer: merged whole or not at all
        return their_stats
