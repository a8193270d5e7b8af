"""The physics judge as the demo's labeller: pairs labelled without ground truth, and how often they agree with it.

- `judge_label_pairs`: one start image's candidates -> preference pairs (winner, loser, confidence) chosen by the
  judge alone (`physics.rank_candidates`: it sees the candidates and the start image, never the ground truth).
- `judge_agreement`: over many start images, how often the judge prefers the candidate with the lower ground-truth
  PISA L2, on every pair whose L2 differs by at least `min_gap`, overall and per tercile of the judge's confidence
  (agreement should rise with it). A pair the judge scores equal counts half (confidence 0). `judge_rankings` and
  `agreement_from` split it, so one ranking serves several views (e.g. only the pairs whose candidates both keep
  the object: the motion, `MOTION_GAP`).
- `drop_priors`: what the demo's judge knows of each start image beyond its pixels (`physics.tracking.DropPrior`):
  how far the object falls to its support, as the frozen backbone reads it from the start image (the geometry
  network PhysMaster's judge-free pipeline already has), and the proxy world's material law (`world.MATERIALS`:
  the surface pattern, which the judge reads itself, says the restitution). Never the ground truth.
"""

from __future__ import annotations

import numpy as np

from ..errors import PhysMasterError
from ..physics import rank_candidates
from ..physics.tracking import DropPrior

#: the least ground-truth L2 gap of the "motion" view (both candidates keep the object in every frame): a lost frame
#: costs 0.707 / 8 frames, so pairs that differ by >= 0.02 (issue 11's view) are nearly all a lost frame against
#: none, and this view asks whether the judge also ranks where a whole object goes
MOTION_GAP = 0.005

#: what a judge-labelled pair carries as its margin (`judge_label_pairs`): the judge's confidence that it is right,
#: or the gap between the two candidates' judge scores
JUDGE_MARGINS = ("confidence", "gap")


def drop_priors(backbone, start_images) -> list[DropPrior]:
    """One `DropPrior` per start image [S, H, W, 3] in [0, 1]: the fall (pixels) the backbone's `height`
    read-out gives (its support minus the object's bottom, which is how far the object's centre falls), and the
    world's material law. `backbone`: the demo's `GeometryBackbone` (or a `HeadInput` over it)."""
    import torch

    from .backbone import TARGETS
    from .world import MATERIALS, SIZE

    net = getattr(backbone, "backbone", backbone)
    images = torch.as_tensor(np.asarray(start_images, np.float32))
    height = net.predict(images)[:, TARGETS.index("height")].numpy()
    materials = {pattern: restitution for pattern, (_, restitution) in MATERIALS.items()}
    return [DropPrior(fall=max(0.0, float(h) * SIZE), materials=materials) for h in height]


def judge_label_pairs(videos, reference, fps: float, max_pairs: int | None = None,
                      min_confidence: float = 0.05, whole_only: bool = False,
                      all_pairs: bool = False, prior: DropPrior | None = None, margin: str = "confidence",
                      min_gap: float = 0.0) -> list[tuple[int, int, float]]:
    """Preference pairs for one start image, labelled by the judge alone: its best candidate against its worst,
    the second best against the second worst, ... (each candidate in at most one pair), while the judge's
    confidence (`rank_candidates`' third value) is at least `min_confidence`; at most `max_pairs` (default: N // 2).
    `whole_only`: among the candidates in which the judge's track finds the object in every frame only.
    `all_pairs`: every pair of those candidates, the judge's better first, whose confidence is at least
    `min_confidence` (`max_pairs` is then ignored).
    `margin`: what each pair carries as its margin (`JUDGE_MARGINS`): "confidence", or "gap", the judge's score
    gap (score = exp(-estimated L2 / 0.1), its counterpart of the ground truth's similarity to the true masks), a
    pair kept only while that gap is also at least `min_gap` (which a confidence margin ignores).

    videos: N candidates [T, H, W, 3] of `reference` (the start image [H, W, 3] in [0, 1]); prior: what the judge
    knows of it beyond its pixels (`drop_priors`). Returns a list of (winner index, loser index, margin); a
    confidence is in [0, 1], a gap in (0, 1].
    """
    if margin not in JUDGE_MARGINS:
        raise PhysMasterError(f"margin={margin!r}: use one of {list(JUDGE_MARGINS)}")
    results, ranked = rank_candidates(videos, fps=fps, min_margin=0.0, reference=reference, prior=prior)
    scores = [float(r.score) for r in results]
    if margin == "gap":
        ranked = [(w, lo, scores[w] - scores[lo]) for w, lo, c in ranked if scores[w] - scores[lo] >= min_gap
                  and c >= min_confidence and c > 0]
        min_confidence = 0.0  # applied above, to the confidence; what is left is each pair's gap
    margins = {(w, lo): m for w, lo, m in ranked}
    order = np.argsort([-x for x in scores], kind="stable")
    if whole_only:
        order = np.array([i for i in order if results[i].found and len(results[i].track)
                          and np.isfinite(results[i].track).all()], dtype=int)
    if all_pairs:
        keep = {int(i) for i in order}
        return [(int(w), int(lo), float(c)) for w, lo, c in ranked
                if w in keep and lo in keep and c >= min_confidence and c > 0]
    n = len(order) // 2 if max_pairs is None else min(int(max_pairs), len(order) // 2)
    out = []
    for r in range(n):
        w, lo = int(order[r]), int(order[-1 - r])
        c = margins.get((w, lo), 0.0)
        if c < min_confidence or c <= 0:
            break
        out.append((w, lo, float(c)))
    return out


def judge_agreement(videos, gt_l2, reference_images, fps: float, min_gap: float = 0.02, priors=None,
                    keep=None) -> dict:
    """How often the judge, without ground truth, prefers the candidate of lower ground-truth L2.

    videos: [S, K, T, H, W, 3] (or S lists of K videos): K candidates for each of S start images; gt_l2: [S, K]
    their ground-truth PISA L2; reference_images: [S, H, W, 3] the start images; priors: S `DropPrior`s (or
    None: the judge knows the pixels alone); keep: [S, K] bools, or None: only pairs of two kept candidates count
    (see `agreement_from`). Returns {"overall", "n_pairs", "min_gap", "terciles": [{"confidence_range": [lo, hi],
    "agreement", "n_pairs"}, ...] (by rising confidence), "per_pair": {"agree", "confidence"}}.
    """
    return agreement_from(judge_rankings(videos, gt_l2, reference_images, fps, priors), gt_l2, min_gap, keep)


def judge_rankings(videos, gt_l2, reference_images, fps: float, priors=None) -> list[dict]:
    """The judge's pairs for each start image, {(better, worse): confidence} (`physics.rank_candidates`, without
    ground truth), checked against `gt_l2`'s shape [S, K]: what `agreement_from` scores, once for several views."""
    gt_l2 = np.asarray(gt_l2, np.float64)
    if gt_l2.ndim != 2:
        raise PhysMasterError(f"gt_l2 is shaped {list(gt_l2.shape)}; expected [start images, candidates]")
    if len(videos) != len(gt_l2) or len(reference_images) != len(gt_l2) or (priors is not None
                                                                            and len(priors) != len(gt_l2)):
        raise PhysMasterError(f"got {len(videos)} groups of videos, {len(gt_l2)} rows of gt_l2, "
                              f"{len(reference_images)} start images"
                              + ("" if priors is None else f" and {len(priors)} priors")
                              + "; pass one of each per start image")
    out = []
    for j in range(len(gt_l2)):
        if len(videos[j]) != gt_l2.shape[1]:
            raise PhysMasterError(f"start image {j} has {len(videos[j])} videos but gt_l2 has {gt_l2.shape[1]} "
                                  "values per start image; pass one L2 per video")
        ref = np.asarray(reference_images[j])
        if ref.dtype == np.uint8:
            ref = ref.astype(np.float32) / 255.0
        _, ranked = rank_candidates(list(videos[j]), fps=fps, min_margin=0.0, reference=ref,
                                    prior=None if priors is None else priors[j])
        out.append({(w, lo): c for w, lo, c in ranked})
    return out


def agreement_from(rankings: list[dict], gt_l2, min_gap: float = 0.02, keep=None) -> dict:
    """`judge_agreement` from `judge_rankings`: every pair whose ground-truth L2 differs by at least `min_gap`
    (and, with `keep` [S, K] bools, whose two candidates are both kept: e.g. both keep the object in every frame,
    so that the pair differs in the motion rather than in a lost frame, which costs 0.707 a frame and makes any
    such pair's gap wide). A pair the judge scores equal counts half (confidence 0)."""
    gt_l2 = np.asarray(gt_l2, np.float64)
    kept_only = keep is not None
    keep = np.ones(gt_l2.shape, bool) if keep is None else np.asarray(keep, bool)
    if keep.shape != gt_l2.shape:
        raise PhysMasterError(f"keep is shaped {list(keep.shape)}; expected gt_l2's {list(gt_l2.shape)}")
    if len(rankings) != len(gt_l2):
        raise PhysMasterError(f"got {len(rankings)} rankings for {len(gt_l2)} rows of gt_l2; pass judge_rankings' "
                              "answer for the same start images")
    agree, conf = [], []
    K = gt_l2.shape[1]
    for j, said in enumerate(rankings):
        for a in range(K):
            for b in range(a + 1, K):
                if abs(gt_l2[j, a] - gt_l2[j, b]) < min_gap or not (keep[j, a] and keep[j, b]):
                    continue
                better, worse = (a, b) if gt_l2[j, a] < gt_l2[j, b] else (b, a)
                if (better, worse) in said:
                    agree.append(1.0), conf.append(said[(better, worse)])
                elif (worse, better) in said:
                    agree.append(0.0), conf.append(said[(worse, better)])
                else:
                    agree.append(0.5), conf.append(0.0)
    out = summarise(np.array(agree), np.array(conf), min_gap)
    out["kept_only"] = kept_only
    return out


def summarise(agree: np.ndarray, conf: np.ndarray, min_gap: float) -> dict:
    """Overall agreement and agreement per tercile of confidence (ties in confidence keep their pair order)."""
    out = {"min_gap": float(min_gap), "n_pairs": int(len(agree)),
           "overall": float(agree.mean()) if len(agree) else 0.0, "terciles": [],
           "per_pair": {"agree": agree.tolist(), "confidence": conf.tolist()}}
    if len(agree):
        order = np.argsort(conf, kind="stable")
        for part in np.array_split(order, 3):
            if len(part):
                out["terciles"].append({"confidence_range": [float(conf[part].min()), float(conf[part].max())],
                                        "agreement": float(agree[part].mean()), "n_pairs": int(len(part))})
    return out
