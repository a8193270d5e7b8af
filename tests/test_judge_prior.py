"""The judge's prior (physics.tracking.DropPrior): the surface pattern read from the start image, the world's
material law and the fall, so that the candidate judge expects the whole drop, bounce included, instead of the
candidates' consensus after the impact."""

import math

import numpy as np
import pytest

from physmaster.demo.backbone import TARGETS, geometry_targets
from physmaster.demo.evaluation import score_video
from physmaster.demo.judging import drop_priors, judge_agreement, judge_label_pairs
from physmaster.demo.world import FPS, MATERIALS, SIZE, drop_scene, recoloured
from physmaster.errors import PhysMasterError
from physmaster.physics import mask_centroids, rank_candidates
from physmaster.physics.pattern import pattern_features, surface_pattern
from physmaster.physics.tracking import DropPrior, bounce_track, expected_track, judge_candidates

LAW = {pattern: restitution for pattern, (_, restitution) in MATERIALS.items()}


def _fall(scene) -> float:
    return float(geometry_targets(scene)[TARGETS.index("height")]) * SIZE


def test_surface_pattern_reads_every_pattern_in_any_colours():
    seen = {"flat": 0, "stripes": 0, "checker": 0}
    for seed in range(40):
        sc = drop_scene(seed, "seen" if seed % 2 else "unseen")
        mask = sc.object_masks()[0]
        for image in (sc.frames[0], recoloured(sc.frames, seed)[0]):
            assert surface_pattern(image, mask) == sc.meta["texture"], (seed, pattern_features(image, mask))
        seen[sc.meta["texture"]] += 1
    assert min(seen.values()) >= 8  # every pattern was read, plain and recoloured
    assert surface_pattern(np.zeros((8, 8, 3)), np.zeros((8, 8), bool)) is None
    assert pattern_features(np.zeros((8, 8, 3)), np.zeros((8, 8), bool)) == (0.0, 0.0)


def test_bounce_track_is_the_worlds_drop():
    """A point dropped from rest bounces at its support with the restitution given, under the world's gravity:
    the rendered drop's centroid follows it (its frames sample the same physics)."""
    sc = drop_scene(5, "seen")
    assert sc.meta["texture"] == "checker" and sc.meta["block"] is None
    true = mask_centroids(sc.object_masks())
    y = bounce_track(float(true[0, 1]), float(true[0, 1]) + _fall(sc), sc.meta["restitution"], sc.meta["gravity"],
                     FPS, len(true))
    assert np.abs(y - true[:, 1]).max() < 0.6, np.round(np.stack([y, true[:, 1]]), 2)
    # after the impact it rises again, as the truth does; a clay bounce stays lower
    low = bounce_track(float(true[0, 1]), float(true[0, 1]) + _fall(sc), 0.3, sc.meta["gravity"], FPS, len(true))
    assert low[-1] > y[-1] + 2
    # no fall: it stays where it is
    assert np.allclose(bounce_track(10.0, 10.0, 0.85, 96.0, FPS, 8), 10.0)


def _bounce_candidates():
    """One start image (a chequered, rubber object: restitution 0.85) and eight candidates: the truth, and seven
    that fall right but bounce as clay (0.3) or wood (0.55) does: a consensus of the wrong bounce."""
    sc = drop_scene(5, "seen")
    rng = np.random.default_rng(0)
    vids = [sc.frames] + [drop_scene(5, "seen", restitution=r).frames for r in (0.3, 0.3, 0.3, 0.3, 0.55, 0.55, 0.3)]
    vids = [np.clip(v + rng.normal(0, 0.005, v.shape), 0, 1).astype(np.float32) for v in vids]
    l2 = np.array([score_video(v, sc.object_masks())["l2"] for v in vids])
    return sc, vids, l2


def test_the_prior_expects_the_bounce_not_the_consensus():
    sc, vids, l2 = _bounce_candidates()
    assert np.argmin(l2) == 0 and l2[1:].min() > l2[0] + 0.02  # the truth bounces best by a margin
    plain, group = judge_candidates(vids, reference=sc.frames[0], fps=FPS)
    assert group.restitution is None and group.pattern is None
    assert np.argmax([r.score for r in plain]) != 0  # without the prior the clay majority wins
    prior = DropPrior(fall=_fall(sc), materials=LAW)
    results, group = judge_candidates(vids, reference=sc.frames[0], fps=FPS, prior=prior)
    assert group.pattern == "checker" and group.restitution == 0.85
    assert np.argmax([r.score for r in results]) == 0
    assert "bouncing as checker objects do (restitution 0.85)" in results[0].reason
    # the expected track is the truth's within a pixel in every frame
    true = mask_centroids(sc.object_masks())
    assert np.abs(group.expected - true).max() < 1.0
    # the pairs the demo labels with it: the truth wins every pair it is in
    pairs = judge_label_pairs(vids, sc.frames[0], FPS, min_confidence=0.05, all_pairs=True, prior=prior)
    assert pairs and all(lo != 0 for _, lo, _ in pairs) and any(w == 0 for w, _, _ in pairs)
    # rank_candidates takes it too; without a material law the fall alone keeps the median after the impact
    _, ranked = rank_candidates(vids, fps=FPS, min_margin=0.0, reference=sc.frames[0], prior=prior)
    assert ranked and all(lo != 0 for _, lo, _ in ranked) and ranked[0][0] == 0
    _, fall_only = judge_candidates(vids, reference=sc.frames[0], fps=FPS, prior=DropPrior(fall=_fall(sc)))
    assert fall_only.restitution is None


def test_expected_track_with_a_fall_and_no_bounce_keeps_the_median_after_the_impact():
    tracks = np.array([[[5.0, 4.0], [5.0, 8.0], [5.0, 14.0], [5.0, 20.0]]] * 3)
    out, first = expected_track(tracks, np.array([5.0, 4.0]), 2.0, 32, 3.0, fall=10.0)
    # falls 3 * 32 / 2 * t^2 px: 0, 12 (past the 10-px fall at frame 1), so from frame 1 on the median
    assert first == 1 and np.allclose(out[1:], tracks[0, 1:])
    bounced, first_b = expected_track(tracks, np.array([5.0, 4.0]), 2.0, 32, 3.0, fall=10.0, restitution=0.5)
    assert first_b == 1 and np.allclose(bounced[:, 0], 5.0) and (bounced[:, 1] <= 14.0 + 1e-6).all()


def test_drop_prior_errors_name_the_fix():
    with pytest.raises(PhysMasterError, match="fall"):
        DropPrior(fall=-1.0)
    with pytest.raises(PhysMasterError, match="fall"):
        DropPrior(fall=math.nan)
    with pytest.raises(PhysMasterError, match=r"materials\['checker'\].*restitution in \[0, 1\]"):
        DropPrior(materials={"checker": 1.5})
    sc, vids, _ = _bounce_candidates()
    with pytest.raises(PhysMasterError, match="DropPrior or None"):
        judge_candidates(vids, reference=sc.frames[0], fps=FPS, prior={"fall": 3.0})
    with pytest.raises(PhysMasterError, match="2 priors"):
        judge_agreement([vids], np.zeros((1, 8)), [sc.frames[0]], FPS, priors=[DropPrior(), DropPrior()])


def test_drop_priors_read_the_fall_from_the_backbone():
    from physmaster.demo.assets import load_assets

    _, backbone, _ = load_assets()
    scenes = [drop_scene(s, "seen") for s in range(12)]
    priors = drop_priors(backbone, np.stack([s.frames[0] for s in scenes]))
    assert len(priors) == 12 and all(p.materials == LAW for p in priors)
    err = np.array([abs(p.fall - _fall(s)) for p, s in zip(priors, scenes)])
    assert np.median(err) < 1.0 and err.max() < 4.0, np.round(err, 2)
    assert all(p.fall >= 0 for p in priors)


def test_the_demos_judge_pairs_use_the_candidates_priors():
    """`pipeline.judge_pairs` labels with `Candidates.priors` (the default, `Settings.judge_prior`), and with the
    pixels alone when it is off; `judge_agreement` and `Candidates.subset` carry the priors."""
    import dataclasses

    import torch

    from physmaster.demo.pipeline import Candidates, Settings, judge_agreement as agreement, judge_pairs
    from physmaster.training import Conditioning

    sc, vids, l2 = _bounce_candidates()
    lat = torch.arange(8, dtype=torch.float32).view(8, 1, 1, 1, 1).expand(8, 2, 2, 2, 2).contiguous()
    prior = DropPrior(fall=_fall(sc), materials=LAW)
    c = Candidates([sc], Conditioning(context=torch.zeros(1, 4, 32)), lat, vids, l2[None], np.zeros((1, 8)), 8, 0.0,
                   np.zeros((1, 8)), [prior])
    st = dataclasses.replace(Settings(), judge_min_confidence=0.05)
    assert Settings().judge_prior
    ids = lambda ps: [(int(p.winner.flatten()[0]), int(p.loser.flatten()[0])) for p in ps.pairs]  # noqa: E731
    with_prior = ids(judge_pairs(c, st, lambda m: None, ""))
    assert with_prior and all(lo != 0 for _, lo in with_prior)
    without = ids(judge_pairs(c, dataclasses.replace(st, judge_prior=False), lambda m: None, ""))
    assert any(lo == 0 for _, lo in without)  # the clay consensus beats the truth
    assert c.subset([0]).priors == [prior] and dataclasses.replace(c, priors=None).subset([0]).priors is None
    assert agreement(c)["overall"] == 1.0
    assert agreement(dataclasses.replace(c, priors=None))["overall"] < 0.5
