import math

import numpy as np
import pytest

from physmaster.errors import PhysMasterError
from physmaster.physics import pisa_metrics, render_scene
from physmaster.physics.metrics import align_frames


def square(T=4, size=64, x=20, y=30, s=8):
    m = np.zeros((T, size, size), bool)
    m[:, y:y + s, x:x + s] = True
    return m


def test_identical_masks():
    gt = render_scene(1).object_masks()
    r = pisa_metrics(gt, gt)
    assert r["l2"] == 0.0 and r["chamfer"] == 0.0 and r["iou"] == 1.0


@pytest.mark.parametrize("k", [1, 3, 5])
def test_shifted_square_has_exact_l2_chamfer_iou(k):
    s, size = 8, 64
    gt = square(s=s)
    pred = square(x=20 + k, s=s)
    r = pisa_metrics(pred, gt)
    # centroid moves k px in x, 0 in y: PISA averages |dx| and |dy| -> k/2, times 1/sqrt(2), over the height
    assert r["l2"] == pytest.approx((k / 2) / math.sqrt(2) / size, rel=1e-9)
    # the k non-overlapping columns are 1..k px from the other square, both ways
    mean_nn = s * sum(range(1, k + 1)) / (s * s)
    assert r["chamfer"] == pytest.approx(2 * mean_nn / math.sqrt(2) / size, rel=1e-6)
    assert r["iou"] == pytest.approx((s - k) / (s + k), rel=1e-9)


def test_diagonal_shift_l2_is_per_coordinate_mean():
    gt = square()
    pred = square(x=23, y=34)  # dx 3, dy 4
    assert pisa_metrics(pred, gt)["l2"] == pytest.approx(3.5 / math.sqrt(2) / 64)


def test_empty_prediction_is_worst_case_never_perfect():
    gt = square()
    pred = np.zeros_like(gt)
    r = pisa_metrics(pred, gt)
    assert r["iou"] == 0.0
    assert r["l2"] == pytest.approx(1 / math.sqrt(2))
    assert r["chamfer"] == pytest.approx(2.0)  # 2 * diagonal / (sqrt(2) * size) for a square image
    assert r["empty_pred_frames"] == 4
    # half the frames empty: worse than a small error everywhere
    half = gt.copy()
    half[:2] = False
    shifted = square(x=22)
    assert pisa_metrics(half, gt)["l2"] > pisa_metrics(shifted, gt)["l2"]
    # both empty: agreement (IoU 1), no centroid error counted
    both = pisa_metrics(np.zeros_like(gt), np.zeros_like(gt))
    assert both == {"l2": 0.0, "chamfer": 0.0, "iou": 1.0, "frames": 4, "empty_pred_frames": 0}


def test_fps_subsampling_follows_pisa():
    pred = np.zeros((5, 2, 2))
    gt = np.arange(20)
    p, g = align_frames(pred, gt, pred_fps=8, gt_fps=16)
    assert g.tolist() == [0, 2, 4, 6, 8] and len(p) == 5
    p, g = align_frames(np.zeros(30), np.arange(20), pred_fps=8, gt_fps=16)
    assert g.tolist() == list(range(0, 20, 2)) and len(p) == 10
    # masks at 32 fps ground truth vs a 16 fps prediction made of its even frames: a perfect match
    gt = render_scene(2, frames=32, fps=32.0).object_masks()
    pred = gt[::2]
    r = pisa_metrics(pred, gt, pred_fps=16, gt_fps=32)
    assert r["iou"] == 1.0 and r["l2"] == 0.0 and r["frames"] == 16
    assert pisa_metrics(pred, gt)["iou"] < 0.9  # unaligned, it is wrong


def test_accepts_object_axis_and_rejects_mismatch():
    sc = render_scene(3)
    assert pisa_metrics(sc.masks, sc.masks)["iou"] == 1.0
    with pytest.raises(PhysMasterError, match="resize"):
        pisa_metrics(np.zeros((4, 32, 32), bool), np.zeros((4, 64, 64), bool))
    with pytest.raises(PhysMasterError, match="fps"):
        pisa_metrics(sc.object_masks(), sc.object_masks(), pred_fps=0, gt_fps=16)


def test_l2_splits_into_lost_frames_and_located_frames():
    gt = square()  # 4 frames
    pred = square(x=22)  # every frame found, each centroid 2 px off in x
    r = pisa_metrics(pred, gt, parts=True)
    assert r["lost_frames"] == 0 and r["l2_lost"] == 0.0
    assert r["l2_found"] == pytest.approx(pisa_metrics(pred, gt)["l2"]) == r["l2_located"]
    pred[1] = False  # one frame lost: 1/4 of the frames cost 1/sqrt(2), the other 3 their centroid error
    r = pisa_metrics(pred, gt, parts=True)
    whole = r["l2"]
    assert r["lost_frames"] == 1 and r["l2_lost"] == pytest.approx(0.25 / math.sqrt(2))
    assert r["l2_found"] == pytest.approx(pisa_metrics(square(x=22), gt)["l2"])  # the 3 found frames' own error
    assert r["l2_lost"] + r["l2_located"] == pytest.approx(whole)
    assert r["l2_located"] == pytest.approx(0.75 * r["l2_found"])
    assert np.isnan(r["frame_l2"][1]) and r["frame_l2"][[0, 2, 3]] == pytest.approx(1 / math.sqrt(2) / 64)
    none = pisa_metrics(np.zeros_like(gt), np.zeros_like(gt), parts=True)  # nothing to find, nothing found
    assert (none["l2_lost"], none["l2_located"], none["lost_frames"]) == (0.0, 0.0, 0) and math.isnan(none["l2_found"])
    with pytest.raises(PhysMasterError, match="resize one to the other's size"):
        pisa_metrics(np.zeros((4, 32, 32), bool), gt, parts=True)
