"""In-memory training data: videos for Stage I, preference pairs for Flow-DPO.

Minimal on purpose: the on-disk preference dataset (DESIGN.md section 5: a group safetensors with the shared
conditioning and N candidate latents, plus pairs.jsonl) yields `PreferencePair`s — one per jsonl line, `cond`
from the group file, `winner`/`loser` = the group's candidate latents at the line's indices, `source`,
`margin` and `group` copied from the line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from ..errors import BatchMismatchError, PhysMasterError
from .denoiser import Conditioning


class DataError(PhysMasterError):
    """Training data that cannot be trained on (empty, mismatched shapes, not finite)."""


@dataclass
class VideoSample:
    """One clean video latent [C, T, H, W] and its conditioning (batch 1)."""

    latent: torch.Tensor
    cond: Conditioning
    name: str = ""


@dataclass
class PreferencePair:
    """Two videos generated from the same start image + prompt: `winner` is preferred over `loser`.

    cond:   their shared conditioning (batch 1: text context without physical tokens, backbone features for the
            head, image condition). Latents are [C, T, H, W] and must have the same shape.
    source: "judge" | "human" | "similarity"; margin: how clearly the winner won (≥ 0); group: the candidate
    group id in an on-disk dataset; meta: anything else (scores, seeds).
    """

    cond: Conditioning
    winner: torch.Tensor
    loser: torch.Tensor
    source: str = "judge"
    margin: float = 1.0
    group: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def _check_cond(cond: Conditioning, what: str) -> None:
    if not isinstance(cond, Conditioning):
        raise DataError(f"{what}: cond must be a physmaster.training.Conditioning, got {type(cond).__name__}")
    if cond.batch_size != 1:
        raise DataError(f"{what}: cond must hold one video (batch 1), got batch {cond.batch_size}")


class VideoSet:
    """A list of `VideoSample`s of one latent shape, validated."""

    def __init__(self, samples: Iterable[VideoSample]):
        self.samples = list(samples)
        if not self.samples:
            raise DataError("the video set is empty: Stage I needs at least one video latent")
        shape = tuple(self.samples[0].latent.shape)
        for i, s in enumerate(self.samples):
            _check_cond(s.cond, f"video {i}")
            if s.latent.ndim != 4:
                raise DataError(f"video {i}: latent must be [C, T, H, W], got {list(s.latent.shape)}")
            if tuple(s.latent.shape) != shape:
                raise BatchMismatchError(f"video {i} latent is {list(s.latent.shape)} but video 0 is {list(shape)}; "
                                         "batch videos of one size (resize or crop them to one resolution/length)")
            if not torch.isfinite(s.latent).all():
                raise DataError(f"video {i} ({s.name or 'unnamed'}) has non-finite values")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> VideoSample:
        return self.samples[i]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.samples[0].latent.shape)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, Conditioning]:
        items = [self.samples[i] for i in indices]
        return torch.stack([s.latent for s in items]), Conditioning.cat([s.cond for s in items])


class PreferenceSet:
    """Usable preference pairs, validated: same winner/loser shape, finite latents, winner ≠ loser.

    Pairs that are unusable for a *soft* reason (identical videos, non-finite values) are skipped and counted in
    `skipped`; a shape mismatch is an error (it means the data is wired wrong). Zero usable pairs is an error.
    """

    def __init__(self, pairs: Iterable[PreferencePair]):
        self.pairs: list[PreferencePair] = []
        self.skipped: dict[str, int] = {}
        shape = None
        n_in = 0
        for i, p in enumerate(pairs):
            n_in += 1
            _check_cond(p.cond, f"pair {i}")
            if tuple(p.winner.shape) != tuple(p.loser.shape):
                raise BatchMismatchError(
                    f"pair {i}{' (group ' + p.group + ')' if p.group else ''}: winner latent is "
                    f"{list(p.winner.shape)} but loser is {list(p.loser.shape)}; both candidates of a pair must "
                    "come from the same resolution and length (they share noise and t in Flow-DPO)")
            if p.winner.ndim != 4:
                raise DataError(f"pair {i}: latents must be [C, T, H, W], got {list(p.winner.shape)}")
            if shape is None:
                shape = tuple(p.winner.shape)
            elif tuple(p.winner.shape) != shape:
                raise BatchMismatchError(f"pair {i} latents are {list(p.winner.shape)} but pair 0's are "
                                         f"{list(shape)}; use one resolution and length per training run")
            if not (torch.isfinite(p.winner).all() and torch.isfinite(p.loser).all()):
                self.skipped["non-finite"] = self.skipped.get("non-finite", 0) + 1
                continue
            if torch.equal(p.winner, p.loser):
                self.skipped["identical"] = self.skipped.get("identical", 0) + 1
                continue
            if not (isinstance(p.margin, (int, float)) and math.isfinite(p.margin) and p.margin >= 0):
                self.skipped["bad margin"] = self.skipped.get("bad margin", 0) + 1
                continue
            self.pairs.append(p)
        if not self.pairs:
            why = ", ".join(f"{v} {k}" for k, v in self.skipped.items()) or "none given"
            raise DataError(f"the preference set has no usable pairs ({n_in} pairs in, {why}). Flow-DPO needs "
                            "pairs of different candidates from the same start image; pick more pairs "
                            "(PhysMasterPreferencePicker) or lower the judge's min_margin.")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> PreferencePair:
        return self.pairs[i]

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.pairs[0].winner.shape)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, Conditioning]:
        items = [self.pairs[i] for i in indices]
        return (torch.stack([p.winner for p in items]), torch.stack([p.loser for p in items]),
                Conditioning.cat([p.cond for p in items]))
