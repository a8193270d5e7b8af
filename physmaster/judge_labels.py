"""The picker's unattended labels: the physics judge ranks the N candidates of one group, its confidence becomes
each pair's margin, and pairs the judge is not sure enough about are skipped, not saved.

`label_group` wraps `physics.rank_candidates` for the picker (mode "judge", or on_timeout "judge"):

* A threshold, `min_confidence` (the picker's widget): a pair whose confidence is below it is skipped and counted
  with why; the kept pairs carry the confidence (0..1) as their margin, largest first.
* Bad candidate video never stops the picker. Frames that hold NaN or inf are not judged: the candidate gets score
  0, a reason, and no pair (its latent is most likely not finite either, and training would skip it). The judge's
  own verdicts (no object found, a static video) come back as a low score with its reason. A judge that fails on
  the group anyway (any error) is reported, and nothing of the group is saved.
* Wrong shapes are the wiring's fault, not the video's: ground-truth masks of another frame size than the
  candidates (or not [frames, height, width]) raise a PhysMasterError that names both sizes and the fix.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .errors import PhysMasterError

log = logging.getLogger("physmaster")

#: the picker's default threshold: pairs whose judge confidence is below it are not saved
DEFAULT_MIN_CONFIDENCE = 0.1


@dataclass
class JudgeLabels:
    """The judge's answer for one group of candidates.

    pairs:      (winner, loser, confidence) with confidence >= min_confidence, largest first: what is saved
    skipped:    (winner, loser, confidence) the judge preferred but below min_confidence: not saved
    candidates: per candidate {"score", "found", "reason"} (a candidate whose frames are not finite: score 0)
    error:      why the judge gave no answer at all ("" when it did); then pairs and skipped are empty
    """

    min_confidence: float
    pairs: list[tuple[int, int, float]] = field(default_factory=list)
    skipped: list[tuple[int, int, float]] = field(default_factory=list)
    candidates: list[dict] = field(default_factory=list)
    error: str = ""

    @property
    def winner(self) -> int | None:
        """The candidate to pass on: the winner of the most confident pair, else the best score (None if no score)."""
        if self.pairs:
            return self.pairs[0][0]
        scored = [(c["score"], i) for i, c in enumerate(self.candidates) if c.get("score") is not None]
        return max(scored, key=lambda s: (s[0], -s[1]))[1] if scored else None

    def note(self) -> str:
        if self.error:
            return f"judge failed, nothing saved: {self.error}"
        text = f"judge: {len(self.pairs)} pair{'s' if len(self.pairs) != 1 else ''} at confidence >= " \
               f"{self.min_confidence:g}"
        if self.skipped:
            text += f", {len(self.skipped)} skipped below it (not saved)"
        if not self.pairs and not self.skipped:
            text += " (the judge preferred no candidate over another)"
        return text

    def report(self) -> dict:
        """JSON-ready: the threshold, the saved pairs with their confidences, the skipped ones and why, and every
        candidate's score and reason."""
        out = {"min_confidence": self.min_confidence,
               "pairs": [[w, lo, c] for w, lo, c in self.pairs],
               "skipped": len(self.skipped),
               "skipped_pairs": [[w, lo, c] for w, lo, c in self.skipped],
               "candidates": self.candidates}
        if self.skipped:
            out["skipped_why"] = f"judge confidence below min_confidence {self.min_confidence:g}"
        if self.error:
            out["error"] = self.error
        return out


def check_min_confidence(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise PhysMasterError(f"min_confidence must be a number in 0..1, got {value!r}") from None
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise PhysMasterError(f"min_confidence must be in 0..1 (the judge's confidence that a pair is right), "
                              f"got {value!r}")
    return value


def _check_masks(gt_masks, size: tuple[int, int]) -> np.ndarray:
    """Ground-truth masks as bool [T, H, W] of the candidates' frame size, or a PhysMasterError naming the sizes."""
    m = np.asarray(gt_masks)
    if m.ndim == 4 and m.shape[-1] == 1:
        m = m[..., 0]
    if m.ndim != 3 or m.shape[0] == 0:
        raise PhysMasterError(f"ground_truth_masks are shaped {list(m.shape)}; expected [frames, height, width] "
                              "(a MASK batch, e.g. PhysMaster Drop Scene's masks)")
    if tuple(m.shape[1:]) != tuple(size):
        raise PhysMasterError(f"ground_truth_masks are {m.shape[2]}x{m.shape[1]} pixels but the candidates' frames "
                              f"are {size[1]}x{size[0]}: the judge compares them pixel by pixel. Decode the candidates "
                              "at the ground truth's size (or scale the masks to the frames' size)")
    if m.dtype != bool:
        m = m.astype(np.float32)
        if not np.isfinite(m).all():
            raise PhysMasterError("ground_truth_masks contain NaN or infinite values; pass 0/1 masks")
        m = m > 0.5
    return m


def _nonfinite_frames(video: np.ndarray) -> list[int]:
    if not np.issubdtype(video.dtype, np.floating):
        return []
    bad = ~np.isfinite(video.reshape(video.shape[0], -1)).all(axis=1)
    return np.nonzero(bad)[0].tolist()


def label_group(videos: Sequence[np.ndarray], fps: float, min_confidence: float = DEFAULT_MIN_CONFIDENCE,
                gt_masks=None, **judge_kwargs) -> JudgeLabels:
    """Judge N candidate videos (each [T, H, W, 3], one size) of one start image; see the module's docstring.

    `judge_kwargs` go to `physics.rank_candidates` (e.g. `reference`, the start image). Raises PhysMasterError only
    for wrong shapes and a bad `min_confidence`; every problem of the videos themselves is reported instead."""
    from .physics import rank_candidates

    min_confidence = check_min_confidence(min_confidence)
    videos = [np.asarray(v) for v in videos]
    if len(videos) < 2:
        raise PhysMasterError(f"the judge compares candidates: got {len(videos)}, need at least 2")
    shapes = {tuple(v.shape) for v in videos}
    if len(shapes) != 1 or videos[0].ndim != 4:
        raise PhysMasterError(f"the candidates' frames must all be [frames, height, width, 3] of one size, got "
                              f"{sorted(list(s) for s in shapes)}")
    gt = None if gt_masks is None else _check_masks(gt_masks, videos[0].shape[1:3])
    out = JudgeLabels(min_confidence, candidates=[{} for _ in videos])
    judged = []
    for i, v in enumerate(videos):
        bad = _nonfinite_frames(v)
        if bad:
            frames = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
            out.candidates[i] = {"score": 0.0, "found": False,
                                 "reason": f"not judged: frames {frames} hold NaN or infinite values (the sampler or "
                                           "the decode failed); this candidate gets no pair"}
        else:
            judged.append(i)
    if len(judged) < 2:
        for i in judged:
            out.candidates[i] = {"score": None, "found": None, "reason": "not judged: no other candidate to compare"}
        out.error = f"{len(videos) - len(judged)} of {len(videos)} candidates hold NaN or infinite frames; " \
                    "nothing to compare"
        return out
    try:
        results, pairs = rank_candidates([videos[i] for i in judged], gt_masks=gt, fps=fps, min_margin=0.0,
                                         **judge_kwargs)
    except Exception as e:  # a bad video must never stop an unattended run: report it, save nothing
        if not isinstance(e, PhysMasterError):
            log.exception("PhysMaster picker: the judge failed on this group")
        why = str(e) if isinstance(e, PhysMasterError) else f"{type(e).__name__}: {e}"
        for i in judged:
            out.candidates[i] = {"score": None, "found": None, "reason": f"not judged: {why}"}
        out.error = why
        return out
    for k, r in zip(judged, results):
        score = float(r.score)
        out.candidates[k] = {"score": score if math.isfinite(score) else None, "found": bool(r.found),
                             "reason": str(r.reason)}
    for w, lo, c in pairs:
        c = float(c)
        pair = (judged[int(w)], judged[int(lo)], c if math.isfinite(c) else 0.0)  # not finite: not sure at all
        (out.pairs if pair[2] >= min_confidence else out.skipped).append(pair)
    out.pairs.sort(key=lambda p: -p[2])
    out.skipped.sort(key=lambda p: -p[2])
    return out
