"""PISA's evaluation metrics (arXiv 2503.09595), computed the way its released `eval.py` / `utils/metrics.py` do.

For a predicted and a ground-truth mask sequence of the dropped object (vision-x-nyu/pisa-experiments):

* frame alignment: ground-truth frame `int(i * gt_fps / pred_fps)` is compared with predicted frame i, for every
  i whose ground-truth index exists; the predicted video is cut to the same length.
* resolution `R` = the ground-truth mask height (PISA: `gt_mask.shape[2]` of an [f, 1, h, w] array).
* centroid = mean (column, row) of the mask pixels, i.e. (x, y) with pixel centres at integer coordinates.
* **L2** = nanmean over frames and over both coordinates of |centroid_pred - centroid_gt|, times 1/sqrt(2),
  divided by R. (PISA: `np.nanmean(np.sqrt((c1 - c2)**2)) * (1/np.sqrt(2)) / resolution` — despite the name
  it averages the absolute per-coordinate differences.)
* **Chamfer** = per frame, mean nearest-neighbour distance from each predicted mask pixel to the ground-truth
  pixels PLUS the mean from each ground-truth pixel to the predicted ones (a sum, not an average), times
  1/sqrt(2), divided by R; then nanmean over frames.
* **IoU** = per frame |pred AND gt| / |pred OR gt|, 1 when both masks are empty; mean over frames.

Empty masks (where PISA's code yields NaN or inf and silently drops frames), defined here so that a missing
object is never rewarded:

* both masks empty in a frame: IoU 1 (as PISA); the frame is left out of L2 and Chamfer (as PISA's nanmean).
  If every frame is left out, L2 and Chamfer are 0 (nothing to find, nothing found).
* exactly one mask empty: IoU 0 (as PISA); L2 counts |delta| = R for both coordinates (per-frame value
  1/sqrt(2), more than any real centroid error); Chamfer counts both mean distances as the image diagonal
  (per-frame value 2 * sqrt(H^2 + W^2) / (sqrt(2) * R), i.e. 2 for a square image, the upper bound).

`pisa_metrics(..., parts=True)` also splits that L2 exactly in two: `l2_lost`, what the frames where the object is
lost (or found where there is none) cost, 1/sqrt(2) each, and `l2_located`, what the other frames' centroid errors
cost (`l2 = l2_lost + l2_located`). `l2_found` is the mean centroid error over the frames where both masks show the
object (PISA's released L2 itself: its nanmean skips the others), NaN when there is none; `frame_l2` is that error
per compared frame.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ._video import as_masks
from .segment import check_same_size, mask_centroids
from ..errors import PhysMasterError

SCALE = 1.0 / math.sqrt(2.0)


def align_frames(pred: np.ndarray, gt: np.ndarray, pred_fps: float | None, gt_fps: float | None):
    """PISA's frame alignment: subsample the ground truth to the prediction's frame rate, cut to one length."""
    if pred_fps is None or gt_fps is None:
        ratio = 1.0
    else:
        pred_fps, gt_fps = float(pred_fps), float(gt_fps)
        if not (math.isfinite(pred_fps) and math.isfinite(gt_fps)) or pred_fps <= 0 or gt_fps <= 0:
            raise PhysMasterError(f"frame rates must be positive numbers (got pred_fps={pred_fps}, "
                                  f"gt_fps={gt_fps}); pass the videos' real fps")
        ratio = gt_fps / pred_fps
    idx = [int(i * ratio) for i in range(len(pred)) if int(i * ratio) < len(gt)]
    gt = gt[idx]
    pred = pred[:min(len(gt), len(pred))]
    return pred, gt


def _mean_nn(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> float:
    """Mean over points of a of the distance to the nearest point of b."""
    out = []
    for s in range(0, len(a), chunk):
        out.append(torch.cdist(a[s:s + chunk], b).min(1).values)
    return float(torch.cat(out).mean())


def _padded_points(masks: np.ndarray, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask pixel coordinates (row, col) per frame, padded to one length: ([T, N, 2], valid [T, N])."""
    counts = masks.reshape(len(masks), -1).sum(1)
    n = max(int(counts.max()), 1)
    pts = np.full((len(masks), n, 2), fill, np.float32)
    valid = np.zeros((len(masks), n), bool)
    t, r, c = np.nonzero(masks)
    pos = np.arange(len(t)) - np.concatenate([[0], np.cumsum(counts)[:-1]])[t]
    pts[t, pos, 0], pts[t, pos, 1] = r, c
    valid[t, pos] = True
    return torch.from_numpy(pts), torch.from_numpy(valid)


def chamfer_per_frame(pred: np.ndarray, gt: np.ndarray, resolution: int) -> np.ndarray:
    """Per-frame PISA Chamfer distance (NaN where both masks are empty; worst case where one is)."""
    T, H, W = gt.shape
    worst = 2.0 * math.hypot(H, W) * SCALE / resolution
    out = np.full(T, np.nan)
    pe, ge = ~pred.any((1, 2)), ~gt.any((1, 2))
    out[pe ^ ge] = worst
    both = np.nonzero(~pe & ~ge)[0]
    if len(both) == 0:
        return out
    np_, ng = pred[both].reshape(len(both), -1).sum(1), gt[both].reshape(len(both), -1).sum(1)
    if len(both) * int(np_.max()) * int(ng.max()) <= 4_000_000:  # all frames in one batched cdist
        far = 1e6
        p, pv = _padded_points(pred[both], far)
        g, gv = _padded_points(gt[both], -far)
        d = torch.cdist(p, g)  # [F, Np, Ng]; padding is ~1e6 away from everything real
        p2g = (d.min(2).values * pv).sum(1) / pv.sum(1)
        g2p = (d.min(1).values * gv).sum(1) / gv.sum(1)
        out[both] = ((p2g + g2p).double().numpy()) * SCALE / resolution
        return out
    for t in both:  # large masks: one frame at a time, in chunks
        pt = torch.from_numpy(np.argwhere(pred[t]).astype(np.float32))
        gtt = torch.from_numpy(np.argwhere(gt[t]).astype(np.float32))
        out[t] = (_mean_nn(pt, gtt) + _mean_nn(gtt, pt)) * SCALE / resolution
    return out


def _l2_split(diff: np.ndarray, pe: np.ndarray, ge: np.ndarray, R: int) -> dict:
    """L2's parts (module docstring) from |centroid difference| [T, 2] and the empty-mask flags, before the lost
    frames' differences are set to R."""
    one_empty, found = pe ^ ge, ~pe & ~ge
    counted = int((~(pe & ge)).sum())
    frame_l2 = np.where(found, diff.mean(1) * SCALE / R, np.nan)
    return {"l2_lost": float(one_empty.sum() * SCALE / counted) if counted else 0.0,
            "l2_located": float(np.nansum(frame_l2) / counted) if counted else 0.0,
            "l2_found": float(np.nanmean(frame_l2)) if found.any() else float("nan"),
            "lost_frames": int(one_empty.sum()), "frame_l2": frame_l2}


def pisa_metrics(pred_masks, gt_masks, pred_fps: float | None = None, gt_fps: float | None = None,
                 parts: bool = False) -> dict:
    """PISA's L2 (lower is better), Chamfer distance (lower) and IoU (higher) of the dropped object's masks.

    pred_masks, gt_masks: bool [T, H, W] (or [T, K, H, W] with the dropped object at index 0), same H and W.
    See the module docstring for the exact formulas (from PISA's released code) and the empty-mask rules.
    Returns {"l2", "chamfer", "iou"} plus "frames" (frames compared) and "empty_pred_frames"; with `parts`, also
    where L2 comes from (module docstring): "l2_lost", "l2_located", "l2_found" (NaN when the object is never
    found), "lost_frames" and "frame_l2" (float [T], NaN where either mask is empty; not JSON, hence opt-in).
    """
    pred = as_masks(pred_masks, "predicted masks")
    gt = as_masks(gt_masks, "ground-truth masks")
    check_same_size(pred, gt, "predicted masks", "ground-truth masks")
    pred, gt = align_frames(pred, gt, pred_fps, gt_fps)
    if len(pred) == 0:
        raise PhysMasterError("no frames left to compare after aligning frame rates; check pred_fps and gt_fps")
    T, H, W = gt.shape
    R = H
    pe, ge = ~pred.any((1, 2)), ~gt.any((1, 2))
    cp, cg = mask_centroids(pred), mask_centroids(gt)
    diff = np.abs(cp - cg)
    split = _l2_split(diff, pe, ge, R) if parts else {}
    one_empty = pe ^ ge
    diff[one_empty] = R
    both_empty = pe & ge
    l2_frames = diff[~both_empty]
    l2 = float(l2_frames.mean() * SCALE / R) if l2_frames.size else 0.0
    cd = chamfer_per_frame(pred, gt, R)
    chamfer = float(np.nanmean(cd)) if np.isfinite(cd).any() else 0.0
    inter = (pred & gt).sum((1, 2))
    union = (pred | gt).sum((1, 2))
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return {"l2": l2, "chamfer": chamfer, "iou": float(iou.mean()), "frames": int(T),
            "empty_pred_frames": int((pe & ~ge).sum()), **split}
