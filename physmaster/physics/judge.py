"""A physics judge for drop videos: how plausible is the motion of the one moving object?

Without ground truth the judge segments the object (`segment_object`), takes its centroid track and fits one
physical model to it by least squares:

* vertical: a continuous piecewise parabola with ONE gravity shared by all flights, a velocity jump at each
  impact (impacts are the frames where the object is lowest and its vertical velocity reverses; each impact
  time is refined between frames), optionally followed by rest (constant height from an impact on);
* horizontal: a continuous piecewise-linear motion that may change speed only at impacts.

Components (each also turned into a penalty; score = exp(-sum of penalties), in (0, 1], higher is better):

* ``fit_residual``: RMS distance (fraction of the image height) between the track and the model;
* ``popping``: the largest single-frame distance to the model (teleports, jumps);
* ``gravity``: fitted gravity in image heights / s^2 (at the given fps), penalised by its log-distance to
  ``gravity_prior`` (the proxy world's nominal 3.0; None skips this — for footage of unknown scale);
* ``gravity_consistency``: spread of gravity fitted separately on each flight long enough to show it;
* ``energy_gain``: height gained at impacts (a rebound faster than the arrival, or an impact while rising),
  in image heights;
* ``size_change`` / ``size_jitter``: trend and scatter of the log mask area (persistence of size);
* ``colour_change``: mean distance of the object's per-frame mean colour to its median colour;
* ``missing``: fraction of frames where no object was found (left the frame, vanished).

With ground truth, the PISA metrics are computed too and the score is the mean of the physics score and
``(IoU + exp(-L2 / 0.05) + exp(-Chamfer / 0.15)) / 3``.

A video with no object found in enough frames gets ``found=False``, score 0 and a reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ._video import as_masks, as_video
from .metrics import pisa_metrics
from .scene import NOMINAL_GRAVITY
from .segment import check_same_size, mask_centroids, segment_object
from ..errors import PhysMasterError

#: Penalty = (value / scale) ** 2 for these components (value beyond `free` first where given).
PENALTY_SCALES = {
    "fit_residual": (0.006, 0.002),
    "popping": (0.012, 0.006),
    "gravity": (0.22, 0.0),
    "gravity_consistency": (0.35, 0.1),
    "energy_gain": (0.02, 0.005),
    "size_change": (0.15, 0.03),
    "size_jitter": (0.10, 0.03),
    "colour_change": (0.06, 0.015),
    "missing": (0.15, 0.0),
}
PENALTY_CAP = 50.0


@dataclass
class JudgeResult:
    score: float  # higher = more plausible, in [0, 1]
    found: bool
    components: dict = field(default_factory=dict)
    track: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))  # [T, 2], NaN: no object
    metrics: dict = field(default_factory=dict)
    reason: str = ""
    penalties: dict = field(default_factory=dict)
    fit: dict = field(default_factory=dict)  # gravity (px/s^2), impacts (s), rest (s), model track
    masks: np.ndarray | None = None  # the segmentation the judge used, bool [T, H, W]


# ------------------------------------------------------------------------------------------------ model

def _design_y(t: np.ndarray, taus: list[float], t_rest: float | None) -> np.ndarray:
    te = t if t_rest is None else np.minimum(t, t_rest)
    cols = [np.ones_like(t), te, 0.5 * te * te]
    cols += [np.maximum(0.0, te - tau) for tau in taus]
    return np.stack(cols, 1)


def _design_x(t: np.ndarray, taus: list[float]) -> np.ndarray:
    cols = [np.ones_like(t), t] + [np.maximum(0.0, t - tau) for tau in taus]
    return np.stack(cols, 1)


def _lsq(A: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, float]:
    coef, *_ = np.linalg.lstsq(A, b, rcond=None)
    r = b - A @ coef
    return coef, float(r @ r)


def _impact_candidates(t: np.ndarray, y: np.ndarray, kappa: float) -> list[int]:
    """Frames where the object is lowest (y is largest; plateaus count once) and its vertical velocity turns
    upward by more than `kappa` px (the second difference)."""
    out = []
    n = len(y)
    i = 1
    while i < n - 1:
        j = i
        while j + 1 < n - 1 and y[j + 1] == y[i]:  # a plateau of equal heights
            j += 1
        if y[i] > y[i - 1] and y[j] > y[j + 1]:
            dl = (y[i] - y[i - 1]) / (t[i] - t[i - 1])
            dr = (y[j + 1] - y[j]) / (t[j + 1] - t[j])
            dt = 0.5 * (t[j + 1] - t[i - 1]) / (j - i + 1)
            if (dr - dl) * dt < -kappa:
                out.append(i if y[i - 1] >= y[j + 1] else j)
        i = j + 1
    return out


def _rest_start(t: np.ndarray, y: np.ndarray, tol: float) -> int | None:
    """First frame of the final run of frames within `tol` px of the final height (None if under 3 frames)."""
    level = float(np.median(y[-3:]))
    near = np.abs(y - level) <= tol
    if not near[-1]:
        return None
    j = len(y) - 1
    while j > 0 and near[j - 1]:
        j -= 1
    return j if len(y) - j >= 3 and j > 0 else None


def _fit_y(t: np.ndarray, y: np.ndarray, cands: list[int], tol: float):
    """Choose the rest start (none, an impact, or the final still run) and refine the impact times."""
    n = len(t)
    options: list[tuple[list[int], tuple | None]] = [(list(cands), None)]
    for r in range(max(0, len(cands) - 3), len(cands)):
        i = cands[r]
        options.append((list(cands[:r]), (t[i], max(i - 1, 0), min(i + 1, n - 1))))
    j = _rest_start(t, y, tol)
    if j is not None:
        before = [i for i in cands if i < j - 1]
        options.append((before, (0.5 * (t[j - 1] + t[j]), j - 1, j)))
    best = None
    for use, rest in options:
        taus = [float(t[i]) for i in use]
        t_rest = None if rest is None else float(rest[0])
        coef, sse = _lsq(_design_y(t, taus, t_rest), y)
        if best is None or sse < best[0] - 1e-9:
            best = (sse, use, rest, coef)
    sse, idx, rest, coef = best
    taus = [float(t[i]) for i in idx]
    t_rest = None if rest is None else float(rest[0])

    def evaluate(taus_, t_rest_):
        return _lsq(_design_y(t, taus_, t_rest_), y)

    # refine each impact time (and the rest start) between its neighbouring frames
    slots = [(k, t[max(i - 1, 0)], t[min(i + 1, n - 1)]) for k, i in enumerate(idx)]
    if rest is not None:
        slots.append(("rest", t[rest[1]], t[rest[2]]))
    for _pass in range(2):
        for k, lo, hi in slots:
            for cand in np.linspace(lo, hi, 9)[1:-1]:
                trial_taus, trial_rest = list(taus), t_rest
                if k == "rest":
                    if taus and cand <= taus[-1]:
                        continue
                    trial_rest = float(cand)
                else:
                    trial_taus[k] = float(cand)
                    if (k > 0 and cand <= trial_taus[k - 1]) or (t_rest is not None and cand >= t_rest):
                        continue
                c2, s2 = evaluate(trial_taus, trial_rest)
                if s2 < sse - 1e-12:
                    taus, t_rest, coef, sse = trial_taus, trial_rest, c2, s2
    return coef, taus, t_rest


def _fit(t: np.ndarray, x: np.ndarray, y: np.ndarray, H: int):
    kappa = max(0.15, 0.0025 * H)
    cands = _impact_candidates(t, y, kappa)
    coef, taus, t_rest = _fit_y(t, y, cands, tol=max(0.75, 0.012 * H))
    ym = _design_y(t, taus, t_rest) @ coef
    Ax = _design_x(t, taus)
    cx, _ = _lsq(Ax, x)
    xm = Ax @ cx
    return coef, taus, t_rest, xm, ym


def _energy_gain(coef: np.ndarray, taus: list[float], g_ref: float, H: int) -> tuple[float, list]:
    """Height gained at impacts (image heights): rebound faster than the arrival, or impacts while rising."""
    b, g = coef[1], coef[2]
    d = coef[3:]
    gain = 0.0
    info = []
    for k, tau in enumerate(taus):
        v_in = b + g * tau + float(d[:k].sum())
        v_out = v_in + float(d[k])
        dh = (v_out * v_out - max(v_in, 0.0) ** 2) / (2 * g_ref) if v_out < 0 else 0.0
        if v_in < 0:  # an "impact" while moving up: the object gained speed from nothing
            dh = max(dh, v_in * v_in / (2 * g_ref))
        if d[k] > 0:  # pushed down at the impact
            dh = max(dh, d[k] ** 2 / (2 * g_ref))
        info.append({"t": float(tau), "v_in": float(v_in), "v_out": float(v_out),
                     "restitution": float(-v_out / v_in) if v_in > 1e-6 else None})
        gain += max(0.0, dh) / H
    return gain, info


def _gravity_consistency(t, y, taus, t_rest, g_all):
    bounds = [-np.inf] + list(taus) + [t_rest if t_rest is not None else np.inf]
    gs, ws = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        sel = (t > a) & (t < b)
        if sel.sum() >= 6:
            tt = t[sel]
            A = np.stack([np.ones_like(tt), tt, 0.5 * tt * tt], 1)
            c, _ = _lsq(A, y[sel])
            gs.append(c[2])
            ws.append(sel.sum())
    if len(gs) < 2 or g_all <= 0:
        return 0.0, gs
    gs_a, ws_a = np.array(gs), np.array(ws, float)
    return float((np.abs(gs_a - g_all) * ws_a).sum() / ws_a.sum() / g_all), [float(v) for v in gs]


def _penalty(name: str, value: float) -> float:
    scale, free = PENALTY_SCALES[name]
    if not math.isfinite(value):
        return PENALTY_CAP
    return float(min(PENALTY_CAP, (max(0.0, abs(value) - free) / scale) ** 2))


def gt_similarity(metrics: dict) -> float:
    """Similarity to the ground truth in [0, 1] from PISA metrics: the mean of IoU, exp(-L2 / 0.05) and
    exp(-Chamfer / 0.15) (1 = identical masks)."""
    return (metrics["iou"] + math.exp(-metrics["l2"] / 0.05) + math.exp(-metrics["chamfer"] / 0.15)) / 3.0


def check_fps(fps, whose: str) -> float:
    """`fps` as a positive finite float, or a PhysMasterError asking for the `whose` frame rate."""
    try:
        fps = float(fps)
    except (TypeError, ValueError):
        raise PhysMasterError(f"fps must be a number (got {fps!r}); pass the {whose} frame rate") from None
    if not (math.isfinite(fps) and fps > 0):
        raise PhysMasterError(f"fps must be a positive number (got {fps}); pass the {whose} frame rate")
    return fps


def judge(frames, gt_masks=None, fps: float = 16.0, gt_fps: float | None = None, *,
          gravity_prior: float | None = NOMINAL_GRAVITY, masks=None) -> JudgeResult:
    """Judge the physical plausibility of a drop video (float [T, H, W, 3] in [0, 1], T >= 3).

    gt_masks: optional ground-truth masks of the dropped object ([T', H, W] or [T', K, H, W], object 0) at
    `gt_fps` (default: `fps`); when given, `metrics` holds the PISA metrics of the judge's segmentation
    against them and the score mixes them in. gravity_prior: expected gravity in image heights per s^2
    (None: only the consistency of gravity is judged). masks: use these object masks instead of segmenting.
    """
    video = as_video(frames, "frames", min_frames=3)
    fps = check_fps(fps, "video's")
    T, H, W, _ = video.shape
    if masks is None:
        m = segment_object(video)
    else:
        m = as_masks(masks, "masks")
        check_same_size(m, video[..., 0], "masks", "frames")
        if len(m) != T:
            raise PhysMasterError(f"masks have {len(m)} frames but the video has {T}; pass one mask per frame")
    track = mask_centroids(m).astype(np.float32)
    metrics: dict = {}
    if gt_masks is not None:
        gt = as_masks(gt_masks, "ground-truth masks")
        check_same_size(m, gt, "frames", "ground-truth masks")
        metrics = pisa_metrics(m, gt, pred_fps=fps, gt_fps=gt_fps if gt_fps is not None else fps)
    valid = np.isfinite(track[:, 0])
    n_valid = int(valid.sum())
    need = max(3, int(math.ceil(0.25 * T)))
    if n_valid < need:
        reason = ("no object found: nothing in the video moves against a static background" if n_valid == 0 else
                  f"no object found: a moving object was seen in only {n_valid} of {T} frames (need {need})")
        return JudgeResult(score=0.0, found=False, components={"missing": 1.0 - n_valid / T}, track=track,
                           metrics=metrics, reason=reason, penalties={"missing": PENALTY_CAP}, masks=m)

    t = np.nonzero(valid)[0].astype(np.float64) / fps
    x = track[valid, 0].astype(np.float64)
    y = track[valid, 1].astype(np.float64)
    coef, taus, t_rest, xm, ym = _fit(t, x, y, H)
    res = np.hypot(x - xm, y - ym)
    g_px = float(coef[2])
    g_norm = g_px / H
    g_ref = max(g_px, 0.3 * (gravity_prior or NOMINAL_GRAVITY) * H, 1e-6)
    gain, impacts = _energy_gain(coef, taus, g_ref, H)
    consistency, seg_g = _gravity_consistency(t, y, taus, t_rest, g_px)
    area = m[valid].sum((1, 2)).astype(np.float64)
    la = np.log(area)
    A = np.stack([np.ones_like(t), t], 1)
    ca, _ = _lsq(A, la)
    duration = max(t[-1] - t[0], 1e-6)
    size_change = float(abs(ca[1]) * duration)
    size_jitter = float(np.std(la - A @ ca))
    cols = np.array([video[i][m[i]].mean(0) for i in np.nonzero(valid)[0]])
    colour_change = float(np.linalg.norm(cols - np.median(cols, 0), axis=1).mean())

    components = {
        "fit_residual": float(np.sqrt(np.mean(res ** 2)) / H),
        "popping": float(res.max() / H),
        "gravity": g_norm,
        "gravity_consistency": consistency,
        "energy_gain": gain,
        "size_change": size_change,
        "size_jitter": size_jitter,
        "colour_change": colour_change,
        "missing": 1.0 - n_valid / T,
    }
    penalties = {k: _penalty(k, v) for k, v in components.items() if k != "gravity"}
    if gravity_prior is not None:
        lg = math.log(max(g_norm, gravity_prior / 50.0) / gravity_prior)
        penalties["gravity"] = _penalty("gravity", lg)
    else:
        penalties["gravity"] = PENALTY_CAP if g_norm <= 0 else 0.0
    total = sum(penalties.values())
    phys = float(math.exp(-total))
    score = phys if not metrics else 0.5 * phys + 0.5 * gt_similarity(metrics)
    worst = max(penalties, key=penalties.get)
    reason = (f"plausible drop (gravity {g_norm:.2f} image heights/s^2, {len(taus)} impact(s))"
              if total < 1.0 else f"implausible: worst is {worst} = {components.get(worst, g_norm):.4g}")
    full_t = np.arange(T) / fps
    model = np.full((T, 2), np.nan, np.float32)
    model[valid] = np.stack([xm, ym], 1)
    fit = {"gravity_px": g_px, "gravity_norm": g_norm, "impacts": impacts, "rest_time": t_rest,
           "segment_gravity_px": seg_g, "model_track": model, "times": full_t, "physics_score": phys}
    return JudgeResult(score=float(score), found=True, components=components, track=track, metrics=metrics,
                       reason=reason, penalties=penalties, fit=fit, masks=m)


def rank_candidates(videos, gt_masks=None, fps: float = 16.0, min_margin: float = 0.05, *, reference=None,
                    **judge_kwargs):
    """Judge N candidate videos of one start image (image-to-video) and turn them into preference pairs.

    Returns (results, pairs): results[i] is a `JudgeResult` (.score in [0, 1], higher = closer to the drop the
    start image implies; .reason; .found; .track); pairs is a list of (winner, loser, confidence) for every pair
    whose confidence (how sure the judge is that the winner is more physical, in [0, 1]; see
    `tracking.pair_confidence`) is at least `min_margin`, largest first.

    reference: the start image [H, W, 3] in [0, 1] (default: the first frame of the first video); the judge finds
    the object in it and tracks it through every candidate (`tracking.judge_candidates`). gt_masks: optional
    ground-truth masks ([T, H, W]); then the real PISA L2 ranks the candidates. judge_kwargs: gravity_prior
    (image heights / s^2, default the proxy world's 3.0; None for footage of unknown scale), gt_fps, and prior
    (a `tracking.DropPrior`: how far the object falls, the world's material law).
    A candidate with NaN frames, no object or a static object gets a low score and a reason; candidates of
    different sizes, or a reference or ground truth of another size, are a PhysMasterError naming the fix.
    """
    from .tracking import judge_candidates, pair_confidence

    if videos is None or len(videos) == 0:
        raise PhysMasterError("rank_candidates needs at least one video; pass a list of [T, H, W, 3] videos")
    if not (isinstance(min_margin, (int, float)) and min_margin >= 0):
        raise PhysMasterError(f"min_margin must be a number >= 0 (got {min_margin!r})")
    unknown = set(judge_kwargs) - {"gravity_prior", "gt_fps", "prior"}
    if unknown:
        raise PhysMasterError(f"rank_candidates got unknown option(s) {sorted(unknown)}; "
                              "it takes reference, gravity_prior, gt_fps and prior")
    fps = check_fps(fps, "videos'")
    results, group = judge_candidates(list(videos), reference=reference, fps=fps,
                                      gravity_prior=judge_kwargs.get("gravity_prior", NOMINAL_GRAVITY),
                                      gt_masks=gt_masks, gt_fps=judge_kwargs.get("gt_fps"),
                                      prior=judge_kwargs.get("prior"))
    sigma = 1e-6 if gt_masks is not None else group.sigma
    pairs = []
    for i in range(len(results)):
        for j in range(len(results)):
            if i == j or results[i].score <= results[j].score:
                continue
            c = pair_confidence(group.l2[i], group.l2[j], sigma)
            if c > 0 and c >= min_margin:
                pairs.append((i, j, c))
    pairs.sort(key=lambda p: -p[2])
    return results, pairs


def _draw_disc(img: np.ndarray, x: float, y: float, r: float, colour) -> None:
    H, W, _ = img.shape
    x0, x1 = max(0, int(math.floor(x - r - 1))), min(W, int(math.ceil(x + r + 2)))
    y0, y1 = max(0, int(math.floor(y - r - 1))), min(H, int(math.ceil(y + r + 2)))
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    cov = np.clip(r + 0.5 - np.hypot(xx - x, yy - y), 0, 1)[..., None]
    img[y0:y1, x0:x1] = img[y0:y1, x0:x1] * (1 - cov) + np.asarray(colour, np.float32) * cov


def trajectory_overlay(frames, track, gt_track=None, colour=(1.0, 0.1, 0.1), gt_colour=(0.1, 1.0, 0.2)):
    """Frames float32 [T, H, W, 3] with the judged track drawn (red: the path so far, a larger dot now) and,
    when given, the ground-truth track ([T, 2] or [T, K, 2], object 0) in green."""
    video = as_video(frames, "frames").copy()
    T, H, W, _ = video.shape
    tr = np.asarray(track, np.float64)
    if tr.ndim != 2 or tr.shape[1] != 2 or len(tr) != T:
        raise PhysMasterError(f"track is shaped {list(tr.shape)}; expected [{T}, 2] (x, y per frame)")
    gtr = None
    if gt_track is not None:
        gtr = np.asarray(gt_track, np.float64)
        if gtr.ndim == 3:
            gtr = gtr[:, 0]
        if gtr.ndim != 2 or gtr.shape[1] != 2:
            raise PhysMasterError(f"gt_track is shaped {list(gtr.shape)}; expected [T, 2] or [T, K, 2]")
    r = max(0.6, H / 96)
    for t in range(T):
        for path, col in ((gtr, gt_colour), (tr, colour)):
            if path is None:
                continue
            upto = path[:min(t + 1, len(path))]
            for k, (px, py) in enumerate(upto):
                if np.isfinite(px) and np.isfinite(py):
                    _draw_disc(video[t], px, py, r * (2.0 if k == len(upto) - 1 else 1.0), col)
    return np.clip(video, 0, 1).astype(np.float32)
