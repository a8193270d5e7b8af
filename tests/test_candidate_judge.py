"""The candidate judge (physics.tracking via rank_candidates): generated-looking candidates of one start image,
ranked without ground truth as PISA's L2 ranks them, with a confidence that means something."""

import math

import numpy as np
import pytest

from physmaster.demo.evaluation import score_video
from physmaster.demo.judging import judge_agreement, judge_label_pairs
from physmaster.demo.world import FPS, drop_scene, render
from physmaster.errors import PhysMasterError
from physmaster.physics import rank_candidates, render_scene
from physmaster.physics.tracking import pair_confidence, reference_mask


def _background(sc) -> np.ndarray:
    """The scene without its object: each pixel from a frame where the object does not cover it."""
    m = sc.object_masks()
    free = np.argmax(~m, axis=0)
    H, W = free.shape
    return sc.frames[free, np.arange(H)[:, None], np.arange(W)[None]]


def _blur(img: np.ndarray) -> np.ndarray:
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    return sum(p[dy:dy + img.shape[0], dx:dx + img.shape[1]] for dy in range(3) for dx in range(3)) / 9.0


def _candidates(seed: int):
    """Eight candidates of one start image that fail as generators fail: the truth, smeared copies, copies that
    lose the object in some frames, shifted or wrong-gravity re-renders, plus per-candidate pixel noise."""
    sc = drop_scene(seed, "seen" if seed % 2 == 0 else "unseen")
    rng = np.random.default_rng(seed)
    bg = _background(sc)
    m = sc.object_masks()
    T = len(sc.frames)

    def drop_frames(frames, k):
        out = frames.copy()
        for t in rng.choice(np.arange(2, T), size=k, replace=False):
            out[t] = np.where(m[t][..., None], bg, out[t])
        return out

    g = sc.meta["gravity"]
    kw = dict(initial_velocity=(0.0, 0.0), texture=sc.meta["texture"], restitution=sc.meta["restitution"])
    vids = [sc.frames,
            np.stack([sc.frames[0]] + [_blur(f) for f in sc.frames[1:]]),
            drop_frames(sc.frames, 1),
            drop_frames(sc.frames, 2),
            render(seed, sc.meta["split"], gravity=0.5 * g, **kw).frames,
            render(seed, sc.meta["split"], gravity=2.0 * g, **kw).frames,
            drop_frames(render(seed, sc.meta["split"], gravity=0.7 * g, **kw).frames, 1),
            np.stack([sc.frames[0]] + [np.roll(f, 3, axis=1) for f in sc.frames[1:]])]
    vids = [np.clip(v + rng.normal(0, 0.005, v.shape), 0, 1).astype(np.float32) for v in vids]
    l2 = np.array([score_video(v, m)["l2"] for v in vids])
    return sc, vids, l2


@pytest.fixture(scope="module")
def groups():
    return [_candidates(s) for s in range(700, 712)]


def test_agreement_with_ground_truth_l2_and_confidence_rises(groups):
    out = judge_agreement([v for _, v, _ in groups], np.stack([l2 for _, _, l2 in groups]),
                          np.stack([sc.frames[0] for sc, _, _ in groups]), FPS, min_gap=0.02)
    assert out["n_pairs"] > 150, out["n_pairs"]
    assert out["overall"] >= 0.9, out["overall"]
    t = out["terciles"]
    assert len(t) == 3 and sum(x["n_pairs"] for x in t) == out["n_pairs"]
    assert t[0]["confidence_range"][1] <= t[1]["confidence_range"][0] <= t[2]["confidence_range"][0]
    assert t[2]["agreement"] >= t[0]["agreement"] and t[2]["agreement"] >= 0.97, t
    conf = np.array(out["per_pair"]["confidence"])
    assert ((conf >= 0) & (conf <= 1)).all()


def test_agreement_views_from_one_ranking_keep_only_the_pairs_of_kept_candidates(groups):
    """`agreement_from` on `judge_rankings`: the same figures as `judge_agreement`, and with `keep` only the pairs
    whose two candidates are both kept (here: not the ones with dropped frames, candidates 2, 3 and 6)."""
    from physmaster.demo.judging import agreement_from, judge_rankings

    vids = [v for _, v, _ in groups]
    l2 = np.stack([l2 for _, _, l2 in groups])
    refs = np.stack([sc.frames[0] for sc, _, _ in groups])
    said = judge_rankings(vids, l2, refs, FPS)
    full = judge_agreement(vids, l2, refs, FPS, min_gap=0.02)
    assert agreement_from(said, l2, 0.02) == full and full["kept_only"] is False
    keep = np.ones(l2.shape, bool)
    keep[:, [2, 3, 6]] = False
    part = agreement_from(said, l2, 0.005, keep=keep)
    expected = sum(1 for j in range(len(l2)) for a in range(8) for b in range(a + 1, 8)
                   if keep[j, a] and keep[j, b] and abs(l2[j, a] - l2[j, b]) >= 0.005)
    assert part["n_pairs"] == expected > 0 and part["kept_only"] is True and part["min_gap"] == 0.005
    with pytest.raises(PhysMasterError, match=r"keep is shaped \[12, 7\]; expected gt_l2's \[12, 8\]"):
        agreement_from(said, l2, keep=keep[:, :7])
    with pytest.raises(PhysMasterError, match="got 11 rankings for 12 rows of gt_l2"):
        agreement_from(said[:11], l2)


def test_reference_mask_finds_the_object_of_the_start_image(groups):
    ious = []
    for sc, vids, _ in groups:
        fm, gt = reference_mask(sc.frames[0], np.stack(vids)), sc.object_masks()[0]
        ious.append((fm & gt).sum() / (fm | gt).sum())
    assert np.mean(ious) > 0.9 and min(ious) > 0.7, ious


def test_reference_mask_when_the_generator_redraws_the_start_image():
    """A generator that draws the patterned object plain and the whole scene in other colours (as the demo's
    autoencoder does): the start image then differs from every frame everywhere, and the object is found from
    the candidates' own first frame, fitted to the object as the start image shows it, not to its path."""
    ious = []
    for seed in range(720, 728):
        sc = drop_scene(seed, "seen")
        m = sc.object_masks()
        rng = np.random.default_rng(seed)
        plain = sc.frames[0][m[0]].mean(0)
        vids = []
        for _ in range(6):
            v = np.clip(sc.frames * 0.8 + 0.15, 0, 1)  # the scene redrawn paler
            v = np.where(m[..., None], plain, v)  # the object drawn plain
            vids.append(np.clip(v + rng.normal(0, 0.005, v.shape), 0, 1).astype(np.float32))
        fm = reference_mask(sc.frames[0], np.stack(vids))
        ious.append((fm & m[0]).sum() / max((fm | m[0]).sum(), 1))
    assert np.mean(ious) > 0.85 and min(ious) > 0.6, np.round(ious, 2)


def test_rank_candidates_pairs_are_calibrated_confidences(groups):
    sc, vids, l2 = groups[1]
    results, pairs = rank_candidates(vids, fps=FPS, min_margin=0.05, reference=sc.frames[0])
    scores = [r.score for r in results]
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert pairs and [p[2] for p in pairs] == sorted((p[2] for p in pairs), reverse=True)
    for w, lo, c in pairs:
        assert scores[w] > scores[lo] and 0.05 <= c <= 1.0
    assert results[0].found and results[0].track.shape == (8, 2) and "every frame" in results[0].reason
    assert results[3].components["lost_frames"] >= 1 and "lost in" in results[3].reason
    # the truth beats the object-dropping candidate (two frames lost) for sure, the double-gravity one (an L2
    # difference of about a tenth of the object's size) less surely
    said = {(w, lo): c for w, lo, c in pairs}
    assert said[(0, 3)] > 0.99 and 0.2 < said[(0, 5)] < said[(0, 3)]
    _, none = rank_candidates(vids, fps=FPS, min_margin=1.01, reference=sc.frames[0])
    assert none == []
    # the reference defaults to the first frame of the first video
    r2, p2 = rank_candidates(vids, fps=FPS, min_margin=0.05)
    assert [r.score for r in r2] == pytest.approx(scores, abs=0.05)
    # with ground truth the real L2 decides
    rg, _ = rank_candidates(vids, gt_masks=sc.object_masks(), fps=FPS, reference=sc.frames[0])
    assert rg[3].metrics["l2"] == pytest.approx(l2[3], abs=0.01)


def test_pair_confidence():
    assert pair_confidence(0.1, 0.1, 0.01) == 0.0
    assert pair_confidence(0.2, 0.1, 0.01) == 0.0  # the "winner" is worse
    assert pair_confidence(0.1, 0.11, 0.01) == pytest.approx(math.erf(0.5))
    assert pair_confidence(0.0, 0.707, 0.01) == pytest.approx(1.0)
    assert pair_confidence(0.1, 0.12, 0.01) > pair_confidence(0.1, 0.11, 0.01)


def test_judge_label_pairs(groups):
    sc, vids, l2 = groups[1]
    pairs = judge_label_pairs(vids, sc.frames[0], FPS)
    assert 1 <= len(pairs) <= 4
    used = [i for w, lo, _ in pairs for i in (w, lo)]
    assert len(used) == len(set(used))  # each candidate in one pair at most
    assert [c for _, _, c in pairs] == sorted((c for _, _, c in pairs), reverse=True)
    _, ranked = rank_candidates(vids, fps=FPS, min_margin=0.0, reference=sc.frames[0])
    said = {(w, lo): c for w, lo, c in ranked}
    for w, lo, c in pairs:
        assert said[(w, lo)] == pytest.approx(c) and c >= 0.05
    assert np.mean([l2[w] < l2[lo] for w, lo, _ in pairs]) >= 0.75
    assert judge_label_pairs(vids, sc.frames[0], FPS, max_pairs=1) == pairs[:1]


# ---------------------------------------------------------------------------------------- bad input

def test_static_and_objectless_videos_score_low_with_a_reason(groups):
    sc, vids, _ = groups[2]
    static = np.repeat(sc.frames[:1], len(sc.frames), axis=0)
    empty = np.repeat(_background(sc)[None], len(sc.frames), axis=0)  # no object at all
    vanished = np.concatenate([sc.frames[:1], empty[1:]])  # the object leaves with the start image
    results, pairs = rank_candidates([vids[0], vids[1], vids[4], vids[5], static, empty, vanished], fps=FPS,
                                     reference=sc.frames[0])
    assert results[0].found and results[0].score > 0.5
    for k in (4, 5):  # static, so nothing is found
        assert not results[k].found and results[k].score == 0.0 and "static video" in results[k].reason
    assert results[6].score < 0.01 and "lost in 7 of 8 frames" in results[6].reason
    said = {(w, lo): c for w, lo, c in pairs}
    assert said[(0, 4)] > 0.99 and said[(0, 5)] > 0.99 and said[(0, 6)] > 0.99
    # every candidate static: nothing leaves its place, no object, no pairs
    results, pairs = rank_candidates([static, static.copy()], fps=FPS, reference=sc.frames[0])
    assert all(not r.found and r.score == 0.0 and "no object found" in r.reason for r in results)
    assert pairs == []


def test_nan_frames_score_low_with_a_reason(groups):
    sc, vids, _ = groups[3]
    bad = vids[0].copy()
    bad[3] = np.nan
    bad[5, 2, 2, 0] = np.inf
    allnan = np.full_like(vids[0], np.nan)
    results, pairs = rank_candidates([vids[0], bad, allnan], fps=FPS, reference=sc.frames[0])
    assert results[1].score < results[0].score and "[3, 5]" in results[1].reason and "NaN" in results[1].reason
    assert results[1].components["lost_frames"] >= 2 and results[1].components["nan_frames"] == 2
    assert not results[2].found and results[2].score == 0.0 and "NaN" in results[2].reason
    assert any(w == 0 and lo == 2 for w, lo, _ in pairs)


def test_wrong_sizes_are_clear_errors(groups):
    sc, vids, _ = groups[4]
    small = render_scene(5, "seen", size=24, frames=8, fps=FPS).frames
    with pytest.raises(PhysMasterError, match=r"candidate 1 is \[8, 24, 24\].*same frames and size"):
        rank_candidates([vids[0], small], fps=FPS)
    with pytest.raises(PhysMasterError, match=r"reference is 24x24 but the candidates are 32x32.*resize"):
        rank_candidates(vids, fps=FPS, reference=small[0])
    with pytest.raises(PhysMasterError, match=r"ground-truth masks are 24x24.*resize"):
        rank_candidates(vids, gt_masks=np.zeros((8, 24, 24), bool), fps=FPS)
    with pytest.raises(PhysMasterError, match="reference is shaped"):
        rank_candidates(vids, fps=FPS, reference=np.zeros((32, 32), np.float32))
    with pytest.raises(PhysMasterError, match="unknown option"):
        rank_candidates(vids, fps=FPS, masks=None)
    with pytest.raises(PhysMasterError, match="fps"):
        rank_candidates(vids, fps=0)
    with pytest.raises(PhysMasterError, match="gt_l2 is shaped"):
        judge_agreement([vids], np.zeros(8), [sc.frames[0]], FPS)
    with pytest.raises(PhysMasterError, match="one L2 per video"):
        judge_agreement([vids], np.zeros((1, 7)), [sc.frames[0]], FPS)


def test_motion_mask_keeps_the_start_place_not_the_larger_path():
    """The candidates leave the object's start place, and in the middle frames most of them are still falling
    through a longer stretch below it, joined to it: of the two parts the threshold leaves, the mask is the one
    the start image shows the object in, not the larger path."""
    from physmaster.physics.tracking import _motion_mask

    rng = np.random.default_rng(0)
    ref = (0.8 + rng.uniform(-0.03, 0.03, (32, 32, 3))).astype(np.float32)  # a background with some texture
    ref[6:10, 12:16] = (0.9, 0.1, 0.1)  # the object, 4 x 4
    q = np.zeros((32, 32), np.float32)
    q[6:10, 12:16] = 0.6  # every middle frame has left the start place
    q[10:13, 12:16] = 0.2  # a faint bridge: the object passes early
    q[13:22, 11:17] = 0.5  # where most middle frames show it falling: larger than the object
    m = _motion_mask(ref, q, 0.06)
    obj = np.zeros((32, 32), bool)
    obj[6:10, 12:16] = True
    assert (m & obj).sum() / (m | obj).sum() > 0.7, np.argwhere(m)[:, 0].tolist()
    assert not m[14:].any()
