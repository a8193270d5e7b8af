"""In-memory training data: videos for Stage I, preference pairs for Flow-DPO.

Minimal on purpose: the on-disk preference dataset (DESIGN.md section 5: a group safetensors with the shared
conditioning and N candidate latents, plus pairs.jsonl) yields `PreferencePair`s — one per jsonl line, `cond`
from the group file, `winner`/`loser` = the group's candidate latents at the line's indices, `source`,
`margin` and `group` copied from the line.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from ..errors import BatchMismatchError, PhysMasterError
from .denoiser import Conditioning


class DataError(PhysMasterError):
    """Training data that cannot be trained on (empty, mismatched shapes, not finite)."""


#: how Flow-DPO uses the pairs' margins (TrainConfig.margin_use, the Train DPO node's margin_use widget, the CLI's
#: --margin-use); see `plan_margins`
MARGIN_USES = ("ignore", "weight", "filter", "filter and weight")
#: the one source whose margin is not a confidence: a person's rank gap (physmaster.picker.choice_pairs)
HUMAN = "human"


@dataclass
class MarginPlan:
    """What `plan_margins` made of a list of pairs: the pairs kept (in order), those the filter dropped, and each
    kept pair's loss weight (None when not weighting)."""

    use: str
    min_margin: float
    kept: list
    dropped: list
    weights: list[float] | None = None

    def summary(self) -> str:
        """One line for a log or a node's report: what the filter dropped and what the weights are."""
        if self.use == "ignore":
            return "margins ignored (every pair weighs the same)"
        parts = []
        if "filter" in self.use:
            n = len(self.dropped)
            parts.append(f"filter dropped {n} machine-labelled pair{'s' if n != 1 else ''} with margin below "
                         f"min_margin {self.min_margin:g}, kept {len(self.kept)}")
        if self.weights is not None:
            by_source: dict[str, list[float]] = {}
            for p, w in zip(self.kept, self.weights):
                by_source.setdefault(str(p.source), []).append(w)
            spans = ", ".join(f"{src} {len(ws)} pairs {min(ws):.2f}..{max(ws):.2f}"
                              for src, ws in sorted(by_source.items()))
            parts.append(f"loss weighted by margin over its source's mean (weights: {spans})")
        return f"margin_use '{self.use}': " + "; ".join(parts)


def plan_margins(pairs: Sequence, use: str = "ignore", min_margin: float = 0.0) -> MarginPlan:
    """Filter and/or weight preference pairs (anything with `.source` and `.margin`) by their margins.

    The two sources' margins mean different things: a judge pair's margin is the judge's confidence in [0, 1] (the
    picker saves it), a person's is the rank gap of a ranking scaled to (0, 1] (best over worst = 1, neighbours in a
    ranking of 4 = 1/3). So:

    * ``filter`` drops the machine-labelled pairs (every source but "human") whose margin is below `min_margin`. A
      person's pairs are never dropped by it (their margin is not a confidence: drop wrong ones in the review).
      None left is a DataError naming `min_margin`.
    * ``weight`` gives each kept pair the weight margin / (mean margin of the kept pairs of its source): each source's
      weights average 1, so neither source outweighs the other by its scale, the set's weights average 1, and within
      a source a clearer pair (a confident judge, best over worst) counts more. A source whose margins are all 0
      weighs 1 each. The Flow-DPO loss of a batch is then mean(weight * per-pair loss).
    * ``filter and weight``: the filter, then the weights over the pairs it kept. ``ignore``: every pair weighs 1.
    """
    if use not in MARGIN_USES:
        raise DataError(f"margin_use must be one of {list(MARGIN_USES)}, got {use!r}")
    try:
        min_margin = float(min_margin)
    except (TypeError, ValueError):
        raise DataError(f"min_margin must be a number >= 0, got {min_margin!r}") from None
    if not (math.isfinite(min_margin) and min_margin >= 0):
        raise DataError(f"min_margin must be a number >= 0 (a judge confidence, 0..1), got {min_margin!r}")
    pairs = list(pairs)
    kept, dropped = pairs, []
    if "filter" in use:
        keep = [p.source == HUMAN or float(p.margin) >= min_margin for p in pairs]
        kept = [p for p, k in zip(pairs, keep) if k]
        dropped = [p for p, k in zip(pairs, keep) if not k]
        if pairs and not kept:
            margins = [float(p.margin) for p in dropped]
            raise DataError(f"margin_use {use!r} with min_margin {min_margin:g} drops all {len(pairs)} pairs: they are "
                            f"all machine-labelled (judge) pairs with margins {min(margins):.3g}..{max(margins):.3g}, "
                            f"below min_margin. Lower min_margin (below {max(margins):.3g}), or set margin_use to "
                            "'weight' or 'ignore'")
    weights = None
    if "weight" in use:
        means: dict[str, float] = {}
        for src in {str(p.source) for p in kept}:
            ms = [float(p.margin) for p in kept if str(p.source) == src]
            means[src] = sum(ms) / len(ms)
        weights = [float(p.margin) / means[str(p.source)] if means[str(p.source)] > 0 else 1.0 for p in kept]
    return MarginPlan(use, min_margin, kept, dropped, weights)


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


def nonfinite_parts(cond: Conditioning, latents: dict[str, torch.Tensor] | None = None) -> list[str]:
    """Names of the parts of one training item that hold NaN or inf: 'latents', 'text context', 'features',
    'attention mask', 'image conditioning (<name>)'. Empty when everything is finite."""
    parts = []
    for name, t in (latents or {}).items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            parts.append(name)
    for name, t in (("text context", cond.context), ("features", cond.features), ("image_cond", cond.image_cond),
                    ("image_embeds", cond.image_embeds), ("attention mask", cond.attention_mask)):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            parts.append(name if " " in name or name == "features" else f"image conditioning ({name})")
    for key, t in cond.extra.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            parts.append(f"image conditioning ({key[3:] if key.startswith('kw.') else key})")
    return list(dict.fromkeys(parts))


def nonfinite_group(tensors: dict[str, torch.Tensor]) -> tuple[list[str], set[int]]:
    """A stored group's non-finite parts: (names of shared parts with NaN/inf: 'text context', 'features',
    'attention mask', 'image conditioning (<name>)'; indices of the candidate latents with NaN/inf)."""
    parts = []
    for key, t in tensors.items():
        if key == "latents" or not isinstance(t, torch.Tensor) or not t.is_floating_point():
            continue
        if not torch.isfinite(t).all():
            name = {"context": "text context", "features": "features", "cond.attention_mask": "attention mask"}.get(key)
            parts.append(name or f"image conditioning ({key.split('.', 1)[-1]})")
    bad: set[int] = set()
    lat = tensors.get("latents")
    if isinstance(lat, torch.Tensor) and lat.is_floating_point() and lat.ndim >= 1:
        finite = torch.isfinite(lat.reshape(lat.shape[0], -1)).all(dim=1)
        bad = {int(i) for i in torch.nonzero(~finite).flatten()}
    return parts, bad


def describe_skips(skips: Sequence[tuple[str, str]], limit: int = 4, count: bool = True) -> str:
    """'3 skipped: non-finite latents in group 1a2b3c4d (2 pairs); non-finite features in group ...' from
    (reason, group) per skipped item ('' when nothing was skipped; without the '3 skipped: ' when not count)."""
    if not skips:
        return ""
    counts: dict[tuple[str, str], int] = {}
    for reason, group in skips:
        counts[(reason, group)] = counts.get((reason, group), 0) + 1
    parts = []
    for (reason, group), n in counts.items():
        where = f" in group {group[:8]}" if group else ""
        parts.append(f"{reason}{where}" + (f" ({n} pairs)" if n > 1 else ""))
    more = f"; and {len(parts) - limit} more" if len(parts) > limit else ""
    return (f"{len(skips)} skipped: " if count else "") + "; ".join(parts[:limit]) + more


def _check_cond(cond: Conditioning, what: str) -> None:
    if not isinstance(cond, Conditioning):
        raise DataError(f"{what}: cond must be a physmaster.training.Conditioning, got {type(cond).__name__}")
    if cond.batch_size != 1:
        raise DataError(f"{what}: cond must hold one video (batch 1), got batch {cond.batch_size}")


class VideoSet:
    """A list of `VideoSample`s of one latent shape, validated. Samples with NaN/inf in the latent or the
    conditioning are skipped and named in `skips` (as PreferenceSet does); none usable is an error."""

    def __init__(self, samples: Iterable[VideoSample]):
        given = list(samples)
        if not given:
            raise DataError("the video set is empty: Stage I needs at least one video latent")
        self.samples: list[VideoSample] = []
        self.skips: list[tuple[str, str]] = []
        shape = tuple(given[0].latent.shape)
        for i, s in enumerate(given):
            _check_cond(s.cond, f"video {i}")
            if s.latent.ndim != 4:
                raise DataError(f"video {i}: latent must be [C, T, H, W], got {list(s.latent.shape)}")
            if tuple(s.latent.shape) != shape:
                raise BatchMismatchError(f"video {i} latent is {list(s.latent.shape)} but video 0 is {list(shape)}; "
                                         "batch videos of one size (resize or crop them to one resolution/length)")
            bad = ([] if bool(torch.isfinite(s.latent).all()) else ["latent"]) + nonfinite_parts(s.cond)
            if bad:
                self.skips.append((f"non-finite {', '.join(bad)} in video {s.name or i}", ""))
                continue
            self.samples.append(s)
        if not self.samples:
            raise DataError(f"no usable video among {len(given)} ({self.skip_summary()}); check the latents and "
                            "conditioning fed to the trainer")

    def skip_summary(self) -> str:
        return describe_skips(self.skips)

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
    """Usable preference pairs, validated: same winner/loser shape, finite data, winner ≠ loser.

    Pairs that are unusable for a *soft* reason (identical videos, NaN/inf in the latents, the text context, the
    features or the image conditioning, a bad margin) are skipped: counted in `skipped` by kind, and named in
    `skips` as (reason, group) so a summary can say which group to fix (`skip_summary()`). A shape mismatch is an
    error (it means the data is wired wrong). Zero usable pairs is an error that names why.
    """

    def __init__(self, pairs: Iterable[PreferencePair]):
        self.pairs: list[PreferencePair] = []
        self.skipped: dict[str, int] = {}
        self.skips: list[tuple[str, str]] = []
        shape = None
        n_in = 0

        def skip(kind: str, reason: str, p: PreferencePair) -> None:
            self.skipped[kind] = self.skipped.get(kind, 0) + 1
            self.skips.append((reason, p.group))

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
                raise BatchMismatchError(f"pair {i}{' (group ' + p.group + ')' if p.group else ''} latents are "
                                         f"{list(p.winner.shape)} but pair 0's are {list(shape)}; use one "
                                         "resolution and length per training run")
            finite = bool(torch.isfinite(p.winner).all()) and bool(torch.isfinite(p.loser).all())
            bad = ([] if finite else ["latents"]) + nonfinite_parts(p.cond)
            if bad:
                skip("non-finite", "non-finite " + ", ".join(bad), p)
                continue
            if torch.equal(p.winner, p.loser):
                skip("identical", "identical winner and loser", p)
                continue
            if not (isinstance(p.margin, (int, float)) and math.isfinite(p.margin) and p.margin >= 0):
                skip("bad margin", f"bad margin {p.margin!r}", p)
                continue
            self.pairs.append(p)
        if not self.pairs:
            why = ", ".join(f"{v} {k}" for k, v in self.skipped.items()) or "none given"
            detail = f"; {self.skip_summary()}" if self.skips else ""
            raise DataError(f"the preference set has no usable pairs ({n_in} pairs in, {why}{detail}). Flow-DPO "
                            "needs pairs of different candidates from the same start image with finite data; "
                            "pick more pairs (PhysMasterPreferencePicker) or lower the picker's min_confidence.")

    def skip_summary(self) -> str:
        """'3 skipped: non-finite latents in group 1a2b3c4d (2 pairs); ...' ('' when none was skipped)."""
        return describe_skips(self.skips)

    def subset(self, pairs: Sequence[PreferencePair]) -> "PreferenceSet":
        """A set of some of these (already validated) pairs, keeping this set's skips; at least one pair."""
        if not pairs:
            raise DataError("a preference set needs at least one pair")
        out = copy.copy(self)
        out.pairs = list(pairs)
        return out

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

