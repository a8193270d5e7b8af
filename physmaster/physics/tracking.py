"""Judging the candidates of one start image (image-to-video) without ground truth: how far is each from the drop
the start image implies?

Generated videos smear, fragment and lose their object; a fit of the ballistic model to such a track (what `judge`
does for clean footage) ranks them at chance. What decides PISA's L2 on them is (1) frames where the object cannot
be found any more (each costs 1/sqrt(2), more than any real position error) and (2) how far the object is from
where it should be. Both can be estimated without ground truth, because in image-to-video the start image is
known:

1. **The object in the start image** (`reference_mask`). A model-free motion mask (as in Physics-IQ): the
   distance of every pixel of the candidates' middle frames to the start image, and its lower quartile over all
   those frames (candidates x frames). Where the object started, nearly every later frame shows the background
   instead (a large distance); where it passes or lands, most frames still show the start image's background (a
   small one). Connected regions above the noise are scored by how much the start image stands out from their
   surroundings there (the object is visible in the start image; a landing spot is not) and the best one is
   kept; a closing and hole filling restore a patterned object whose stripes match the background. Where the
   start image leaves nothing (a generator that redraws the scene, e.g. a patterned object drawn plain, differs
   from it everywhere), the candidates' own first frame takes its place. The region found so is where the
   object started *and* the first part of its path (it has not left all of it by the middle frames; the
   motion is measured against the start image and against the candidates' own first frame, and a pixel counts
   only where both say the object left it, so a floor or support the generator redraws is not taken for the
   object). Where a threshold splits that region into the start place and a stretch of the path below it (a fall
   still under way in the middle frames), the part the start image shows the object in is kept, not the larger
   one. The mask is then fitted to the object as the start image shows it (`_fit_to_object`): the
   evaluation seeds its segmentation with the object's true mask in the start image, and step 2 takes the
   object's colours from under this mask, so a mask that also holds background (or the object as a generator
   redraws it, larger or smeared) loses frames that the evaluation keeps, or keeps frames it loses.
2. **The object in every frame**: `segment_object` seeded with that mask, as PISA's evaluation prompts SAM 2 with
   the first-frame mask (background from the video's first frame, object colours from the start image). A frame
   where it finds nothing is a lost frame.
3. **Where the object should be** (`expected_track`): dropped from rest at its start position, it falls under the
   gravity prior until it reaches its support (the median over candidates of their lowest point); after that, the
   bounce depends on a material the judge cannot see, so the expected position is the per-frame median of the
   candidates' positions (robust to a minority that is wrong). Without a gravity prior (footage of unknown scale)
   the median is used throughout. A `DropPrior` can tell the judge more: how far the object falls to its support
   (e.g. a geometry network's read of the start image), and the world's material law, the restitution of each
   surface pattern; the judge then reads the object's pattern in the start image (`pattern.surface_pattern`) and
   the expected track is the whole drop, bounces included (`scene.simulate`). The candidates' median after the
   impact is their consensus, not the physics: on the demo's Stage II candidates it is 0.031 (PISA L2 per frame)
   from the true track after the impact, against 0.005 before it, and among pairs that differ only where the
   object is found the judge agreed with the truth on 67% (seed 0); with the demo's prior, 83%
   (bench/FINDINGS.md, "The judge's bounce").
4. **Estimated L2**: PISA's L2 of the found track against the expected one, with a lost frame counted as PISA
   counts it (1/sqrt(2)). The score is exp(-estimated L2 / 0.1); with ground-truth masks the real L2 is used.
5. **Confidence of a pair**: the probability that the ranking is right, as 2P - 1 in [0, 1], when each estimated
   L2 is uncertain by the centroid error a smeared object makes: a quarter of the object's size (its start mask's
   square-root area) per frame, i.e. confidence = erf(|dL2| / (2 s)), s = 0.25 size / (sqrt(2) H).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ._video import _to_numpy, as_masks, as_video
from .metrics import pisa_metrics
from .pattern import surface_pattern
from .segment import (_colour_distance, check_same_size, dilate, erode, fill_holes, label, largest_component,
                      mask_centroids, segment_object)
from ..errors import PhysMasterError

LOST_FRAME = 1.0 / math.sqrt(2.0)  # PISA's per-frame L2 of a frame where the object is missing
SCORE_SCALE = 0.1  # score = exp(-estimated L2 / SCORE_SCALE)
CENTROID_ERROR = 0.25  # per-frame centroid uncertainty of a generated object, as a fraction of its size


@dataclass(frozen=True)
class DropPrior:
    """What the judge may know of a start image beyond its pixels (module docstring, step 3).

    fall: how far (pixels, downwards) the object's centre falls from the start image to its support; None: to
    the candidates' median lowest point. materials: the restitution of each surface pattern
    (`pattern.surface_pattern`: "flat", "stripes", "checker") where the world ties an object's material to it;
    None, or a pattern it does not name: the bounce is unknown and the expected position after the impact is the
    candidates' median."""

    fall: float | None = None
    materials: dict | None = None

    def __post_init__(self):
        if self.fall is not None and not (isinstance(self.fall, (int, float)) and math.isfinite(self.fall)
                                          and self.fall >= 0):
            raise PhysMasterError(f"DropPrior.fall is {self.fall!r}; pass the pixels the object falls (>= 0) or None")
        for k, v in (self.materials or {}).items():
            if not (isinstance(v, (int, float)) and 0 <= v <= 1):
                raise PhysMasterError(f"DropPrior.materials[{k!r}] is {v!r}; pass a restitution in [0, 1]")


@dataclass
class CandidateJudgement:
    """What `judge_candidates` found for one group: the object's start mask, the expected track and per-video
    estimated L2 and its uncertainty (all in PISA's L2 units)."""
    reference_mask: np.ndarray
    expected: np.ndarray  # [T, 2] (x, y), NaN where unknown
    l2: np.ndarray  # [N] estimated (or, with ground truth, real) L2 per video
    sigma: float  # per-video uncertainty of l2
    support_frame: int | None  # first frame the expected drop reaches its support (None: never / unknown)
    per_frame: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # [N, T] per-frame L2 terms
    pattern: str | None = None  # the object's surface pattern in the start image, when a DropPrior asked for it
    restitution: float | None = None  # the bounce the expected track follows (None: the candidates' median)


def _load(video, what: str) -> tuple[np.ndarray, list[int]]:
    """float32 [T, H, W, 3] and the frames that held NaN or infinite values (set to 0 here, judged as lost)."""
    arr = _to_numpy(video, what)
    bad: list[int] = []
    if arr.dtype.kind == "f" and arr.ndim >= 3 and len(arr):
        finite = np.isfinite(arr.reshape(arr.shape[0], -1)).all(1)
        if not finite.all():
            bad = np.nonzero(~finite)[0].tolist()
            arr = np.where(np.isfinite(arr), arr, 0.0).astype(arr.dtype)
    return as_video(arr, what, min_frames=3), bad


def reference_mask(reference: np.ndarray, videos: np.ndarray, floor: float = 0.06) -> np.ndarray:
    """The object's mask bool [H, W] in the start image `reference` [H, W, 3], from how the candidates' middle
    frames (a quarter to a half of the way) differ from it, cut to the object as the candidates' first frame
    draws it (see the module docstring). Empty when nothing leaves its place in the start image."""
    own = np.median(videos[:, 0], 0).astype(np.float32)  # the start image as the candidates draw it
    q_own = _left(own, videos, floor)
    m = _motion_mask(reference, np.minimum(_left(reference, videos, floor), q_own), floor)
    if not m.any():
        m = _motion_mask(own, q_own, floor)
    if not m.any():
        return m
    return _fit_to_object(m, reference, videos, floor)


def _fit_to_object(m: np.ndarray, image: np.ndarray, videos: np.ndarray, floor: float) -> np.ndarray:
    """The motion mask `m` [H, W] fitted to the object as `image` [H, W, 3] shows it (`reference_mask` passes the
    start image. On the demo's Stage II candidates of recoloured start images, some of which the model
    redraws in other colours, the judge then agreed with the truth on 85.8% of seed 0's pairs and 90.5% of seed
    1's, against 78.7% and 87.7% with the candidates' own first frame; on the Stage I candidates 97.5% and 95.7%
    against 97.3% and 97.1%; bench/FINDINGS.md, "The candidate judge's mask from the start image").
    Contrast: each pixel's colour distance to the median colour of a ring around `m`; top: its 90th percentile
    over `m`. Kept: the pixels of `m` with contrast above a fifth of top (not background in `image`: the path
    the object has not yet left by the middle frames is), plus those within two pixels of `m` above half of top
    (coverage 1/2, the rule of the segmenter and the ground-truth masks), where the later frames (half of them at
    least) show something else (not a patch of a textured background); then a closing (stripes that match the
    background), the largest component and its holes filled. `m` itself when that leaves under 3 pixels or no
    ring fits in the image."""
    region = dilate(dilate(m[None]))[0]
    ring = dilate(dilate(region[None]))[0] & ~region
    if not ring.any():
        return m
    contrast = _colour_distance(image, np.median(image[ring], 0)[None, None])  # [H, W]
    top = float(np.percentile(contrast[m], 90))
    obj = (m & (contrast > max(floor, 0.2 * top))) | (region & (contrast > max(floor, 0.5 * top)))
    N, T, H, W, _ = videos.shape
    late = _colour_distance(videos[:, max(1, T // 2):].reshape(-1, H, W, 3), image[None])
    obj &= np.percentile(late, 50, axis=0) > floor
    obj = erode(dilate(obj[None]))
    obj = fill_holes(largest_component(obj))[0]
    return obj if obj.sum() >= 3 else m


def _left(reference: np.ndarray, videos: np.ndarray, floor: float) -> np.ndarray:
    """[H, W] how far the candidates' middle frames are from `reference` at each pixel: the lower quartile of
    their colour distance over candidates x frames (high where nearly every later frame shows something else)."""
    N, T, H, W, _ = videos.shape
    t0 = max(1, T // 4)
    t1 = max(t0 + 1, T // 2 + 1)
    later = videos[:, t0:t1].reshape(-1, H, W, 3)
    dist = _colour_distance(later, reference[None])
    # a frozen candidate (nothing differs from the start image) says nothing of where the object went, and as
    # a quarter of the group it would pull the lower quartile to 0 everywhere: leave such candidates out
    per = dist.reshape(N, t1 - t0, H, W)
    moving = per.reshape(N, -1).max(1) > floor
    if moving.any() and not moving.all():
        dist = per[moving].reshape(-1, H, W)
    return np.partition(dist, (len(dist) - 1) // 4, axis=0)[(len(dist) - 1) // 4]


def _motion_mask(reference: np.ndarray, q: np.ndarray, floor: float) -> np.ndarray:
    """Where the object of `reference` [H, W, 3] starts, bool [H, W]: the region the candidates' middle frames
    leave (`q`, from `_left`), chosen by how much `reference` stands out there (module docstring, step 1). Empty
    when nothing leaves its place."""
    H, W = q.shape
    thr = max(floor, 4.0 * float(np.median(q)))
    cand = q > thr
    opened = dilate(erode(cand[None]))[0]  # cut thin bridges between regions, keep their edges
    cand = opened | (cand & dilate(opened[None])[0])
    best = _start_region(reference, q, cand)
    if best is None:
        return np.zeros((H, W), bool)
    level = float(np.percentile(q[best], 75))
    m = (q > max(0.75 * thr, 0.5 * level)) & dilate(dilate(best[None]))[0]
    m = erode(dilate(m[None]))[0]  # closing: stripes that match the background
    # the start place and the stretch where the candidates fall in the middle frames can touch in `cand` and part
    # here: keep the part where the start image shows the object, as the region was chosen, not the larger one
    # (a fall that is still under way in the middle frames leaves a path larger than the object)
    part = _start_region(reference, q, m)
    return fill_holes((largest_component(m[None])[0] if part is None else part)[None])[0]


def _start_region(reference: np.ndarray, q: np.ndarray, cand: np.ndarray) -> np.ndarray | None:
    """The connected region of `cand` [H, W] (3 pixels at least) where the object of `reference` starts: the one
    whose pixels stand out most from their surroundings in `reference` (the object is visible there; a spot it
    passes or lands on is not), weighted by how far the candidates leave it (`q`) and by its size. None: no region
    qualifies."""
    lab = label(cand[None])[0]
    best, best_score = None, 0.0
    for lid in np.unique(lab[lab >= 0]):
        comp = lab == lid
        if comp.sum() < 3:
            continue
        grown = dilate(comp[None])[0]
        ring = dilate(dilate(grown[None]))[0] & ~grown
        if not ring.any():
            continue
        around = np.median(reference[ring], 0)
        contrast = float(np.median(_colour_distance(reference[comp], around[None])))
        score = contrast * float(q[comp].mean()) * math.sqrt(comp.sum())
        if score > best_score:
            best, best_score = comp, score
    return best


def expected_track(tracks: np.ndarray, start: np.ndarray, fps: float, H: int,
                   gravity_prior: float | None, fall: float | None = None,
                   restitution: float | None = None) -> tuple[np.ndarray, int | None]:
    """[T, 2] expected (x, y) per frame from the candidates' tracks [N, T, 2] (NaN: lost) and the start centroid:
    a drop from rest under `gravity_prior` image heights/s^2 until the candidates' median lowest point (`fall`
    pixels below the start, when given), then the per-frame median of the candidates, or with a `restitution`
    the drop's bounces (`scene.simulate`, the world's own physics); the median throughout when gravity_prior is
    None."""
    N, T, _ = tracks.shape
    with np.errstate(all="ignore"):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            median = np.nanmedian(tracks, 0)  # [T, 2]; NaN where every candidate lost the object
            lowest = np.nanmax(tracks[..., 1], 1)  # [N]
            support = float(np.nanmedian(lowest)) if np.isfinite(lowest).any() else float("nan")
    median[0] = start
    if fall is not None:
        support = float(start[1]) + float(fall)
    if gravity_prior is None or not math.isfinite(support):
        return median, None
    t = np.arange(T) / fps
    y = start[1] + 0.5 * gravity_prior * H * t * t
    falling = y < support
    first = np.nonzero(~falling)[0]
    first = int(first[0]) if len(first) else None
    out = median.copy()
    if restitution is not None:
        out[:, 0] = start[0]
        out[:, 1] = bounce_track(float(start[1]), support, float(restitution), gravity_prior * H, fps, T)
        return out, first
    out[falling, 0] = start[0]
    out[falling, 1] = y[falling]
    return out, first


def bounce_track(y0: float, support: float, restitution: float, gravity: float, fps: float, T: int) -> np.ndarray:
    """[T] the height (pixels, down) of a point dropped from rest at `y0` under `gravity` px/s^2 that bounces at
    `support` with `restitution` until it rests, at frames 0..T-1 of `fps` (`scene.simulate`)."""
    from .scene import simulate

    p = {"gravity": float(gravity), "restitution": float(restitution), "initial_position": (0.0, float(y0)),
         "initial_velocity": (0.0, 0.0), "half_width": 0.0, "top": 0.0, "bottom": 0.0, "size": 1e9,
         "floor_y": max(float(support), float(y0)), "fps": float(fps)}
    return simulate(p, np.arange(T) / float(fps))[0][:, 1]


def judge_candidates(videos: list, reference=None, fps: float = 16.0, gravity_prior: float | None = 3.0,
                     gt_masks=None, gt_fps: float | None = None, prior: DropPrior | None = None):
    """Judge N candidate videos of one start image. Returns (results [JudgeResult], CandidateJudgement).

    videos: N videos [T, H, W, 3] of one size and length. reference: the start image [H, W, 3] in [0, 1]
    (default: the first frame of the first video). NaN frames are judged as frames without the object.
    gt_masks: ground-truth masks of the object ([T', H, W]); when given, the real PISA metrics decide.
    prior: a `DropPrior` (how far the object falls, the world's material law), or None.
    """
    if prior is not None and not isinstance(prior, DropPrior):
        raise PhysMasterError(f"prior is a {type(prior).__name__}; pass a physics.tracking.DropPrior or None")
    from .judge import JudgeResult  # judge.py imports this module

    loaded, nan_frames = [], []
    for i, v in enumerate(videos):
        arr, bad = _load(v, f"candidate {i}")
        if loaded and arr.shape != loaded[0].shape:
            raise PhysMasterError(
                f"candidate {i} is {list(arr.shape[:3])} (frames, height, width) but candidate 0 is "
                f"{list(loaded[0].shape[:3])}; all candidates of one start image must have the same frames and size")
        loaded.append(arr)
        nan_frames.append(bad)
    V = np.stack(loaded)
    N, T, H, W, _ = V.shape
    if reference is None:
        ref = V[0, 0]
    else:
        ref = _to_numpy(reference, "reference")
        if ref.ndim == 4 and ref.shape[0] == 1:
            ref = ref[0]
        if ref.ndim != 3:
            raise PhysMasterError(f"reference is shaped {list(ref.shape)}; pass the start image as [height, width, 3]")
        if ref.shape[:2] != (H, W):
            raise PhysMasterError(f"reference is {ref.shape[0]}x{ref.shape[1]} but the candidates are {H}x{W}; "
                                  "pass the start image at the videos' size (resize one to the other)")
        ref = as_video(ref[None], "reference")[0]
    gt = None
    if gt_masks is not None:
        gt = as_masks(gt_masks, "ground-truth masks")
        check_same_size(V[0, :, :, :, 0], gt, "candidate frames", "ground-truth masks")

    fm = reference_mask(ref, V)
    size = math.sqrt(max(int(fm.sum()), 1))
    sigma = CENTROID_ERROR * size / (math.sqrt(2.0) * H)
    if not fm.any():
        reason = ("no object found: nothing in the start image leaves its place in the candidates (static videos, "
                  "or an object that does not differ from the background)")
        results = [JudgeResult(score=0.0, found=False, components={"missing": 1.0},
                               track=np.full((T, 2), np.nan, np.float32), reason=reason,
                               penalties={"missing": 1.0}) for _ in range(N)]
        return results, CandidateJudgement(fm, np.full((T, 2), np.nan), np.full(N, LOST_FRAME), sigma, None,
                                           np.full((N, T), LOST_FRAME))
    masks = np.zeros((N, T, H, W), bool)
    for i in range(N):
        masks[i] = segment_object(V[i], first_mask=fm)
        masks[i, nan_frames[i]] = False
    tracks = np.stack([mask_centroids(m) for m in masks])  # [N, T, 2]
    start = mask_centroids(fm[None])[0]
    pattern = restitution = None
    if prior is not None and prior.materials:
        pattern = surface_pattern(ref, fm)
        restitution = prior.materials.get(pattern)
    expected, support_frame = expected_track(tracks, start, fps, H, gravity_prior,
                                             None if prior is None else prior.fall, restitution)
    dev = np.abs(tracks - expected[None]).mean(-1) / (math.sqrt(2.0) * H)  # [N, T]; PISA's per-frame L2
    lost = ~np.isfinite(tracks[..., 0])
    dev = np.where(lost, LOST_FRAME, np.where(np.isfinite(dev), dev, 0.0))
    l2 = dev.mean(1)

    results = []
    for i in range(N):
        metrics: dict = {}
        if gt is not None:
            metrics = pisa_metrics(masks[i], gt, pred_fps=fps, gt_fps=gt_fps if gt_fps is not None else fps)
            l2[i] = metrics["l2"]
        n_lost = int(lost[i].sum())
        found_dev = dev[i][~lost[i]]
        px = float(found_dev.mean() * math.sqrt(2.0) * H) if len(found_dev) else float("nan")
        score = float(math.exp(-l2[i] / SCORE_SCALE))
        components = {"estimated_l2": float(l2[i]), "lost_frames": n_lost, "missing": n_lost / T,
                      "mean_deviation_px": px, "nan_frames": len(nan_frames[i])}
        found = n_lost < T
        if nan_frames[i]:
            reason = (f"frames {nan_frames[i][:5]}{'...' if len(nan_frames[i]) > 5 else ''} hold NaN or infinite "
                      "values (a failed decode or sampler) and count as frames without the object")
        elif not found and float(_colour_distance(V[i], V[i, :1]).max()) < 0.04:
            reason = "static video: nothing moves in it, so the dropped object is not found after the start image"
        elif not found:
            reason = "no object found: the object of the start image is not found in any frame"
        elif n_lost:
            reason = f"the object is lost in {n_lost} of {T} frames"
        else:
            reason = "the object is found in every frame"
        if found:
            what = "ground-truth" if gt is not None else "estimated"
            bounce = "" if restitution is None else f" bouncing as {pattern} objects do (restitution {restitution:g})"
            reason += (f"; it is {px:.1f} px on average from a drop from rest under gravity{bounce}"
                       f" ({what} L2 {l2[i]:.3f})")
        results.append(JudgeResult(score=score if found else 0.0, found=found, components=components,
                                   track=tracks[i].astype(np.float32), metrics=metrics, reason=reason,
                                   penalties={"estimated_l2": float(l2[i])},
                                   fit={"model_track": expected.astype(np.float32), "times": np.arange(T) / fps,
                                        "support_frame": support_frame},
                                   masks=masks[i]))
    return results, CandidateJudgement(fm, expected, l2, sigma, support_frame, dev, pattern, restitution)


def pair_confidence(l2_winner: float, l2_loser: float, sigma: float) -> float:
    """How sure the judge is that the video of estimated L2 `l2_winner` beats the one of `l2_loser`: 2P - 1 for
    P the probability that the order is right when each estimate is uncertain by `sigma` (0: a coin flip)."""
    d = float(l2_loser) - float(l2_winner)
    if not math.isfinite(d) or d <= 0:
        return 0.0
    return float(math.erf(d / (2.0 * max(sigma, 1e-9))))
