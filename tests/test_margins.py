"""Issue 11 item 4: the pairs' margins in Flow-DPO (weighting, filtering) and the judge's labels for the picker
(confidence as the margin, a threshold, bad video reported instead of raised)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from physmaster.errors import BatchMismatchError, PhysMasterError
from physmaster.judge_labels import label_group
from physmaster.losses import dpo_error_weights, flow_dpo_loss, per_sample_sq_error
from physmaster.physics import render_scene
from physmaster.training import (DataError, PreferencePair, PreferenceSet, StageTrainer, TrainConfig, TrainingError,
                                 plan_margins)
from physmaster.training.stages import batch_indices
from test_training import C, H, T, W, make_cond, setup


def _softplus(x):
    return math.log1p(math.exp(x))


# -- the weighted Flow-DPO loss --------------------------------------------------------------------------------------
def test_weighted_loss_is_the_hand_computed_weighted_mean():
    t = torch.zeros(3, 1)
    # implicit margins (beta 2, targets 0): pair 0: -(0 - 1) + (0 - 0) = 1; pair 1: -(4 - 0) + 0 = -4;
    # pair 2: -(1 - 1) + (1 - 4) = -3
    out = flow_dpo_loss(torch.tensor([[0.0], [2.0], [1.0]]), torch.tensor([[0.0], [0.0], [1.0]]),
                        torch.tensor([[1.0], [0.0], [1.0]]), torch.tensor([[0.0], [0.0], [2.0]]), t, t,
                        beta=2.0, weight=torch.tensor([0.5, 2.0, 0.5]))
    assert out.per_pair_margin.tolist() == pytest.approx([1.0, -4.0, -3.0])
    losses = [_softplus(-1.0), _softplus(4.0), _softplus(3.0)]  # -log sigmoid(m) = log(1 + exp(-m))
    assert out.loss.item() == pytest.approx((0.5 * losses[0] + 2.0 * losses[1] + 0.5 * losses[2]) / 3, rel=1e-6)
    # the logs stay unweighted: accuracy and the mean implicit margin
    assert out.accuracy.item() == pytest.approx(1 / 3) and out.margin.item() == pytest.approx(-2.0)


def test_weights_of_one_give_the_unweighted_loss_and_gradient():
    g = torch.Generator().manual_seed(0)
    tw, tl, rw, rl = (torch.randn(4, 2, 3, generator=g) for _ in range(4))
    x = torch.randn(4, 2, 3, generator=g)
    grads, losses = [], []
    for weight in (None, torch.ones(4)):
        p = x.clone().requires_grad_(True)
        out = flow_dpo_loss(p, 0.5 * p, rw, rl, tw, tl, beta=3.0, weight=weight)
        out.loss.backward()
        grads.append(p.grad)
        losses.append(out.loss.item())
    assert losses[0] == losses[1]
    assert torch.equal(grads[0], grads[1])


def test_weighted_loss_in_separate_passes_has_the_batched_gradient():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 2, 4, generator=g, requires_grad=True)
    xw, xl, tw, tl, rw, rl = (torch.randn(3, 2, 4, generator=g) for _ in range(6))
    weight = torch.tensor([0.2, 1.3, 1.5])
    out = flow_dpo_loss(w * xw, w * xl, rw, rl, tw, tl, beta=5.0, weight=weight)
    (batched,) = torch.autograd.grad(out.loss, w)
    with torch.no_grad():
        ew, el = per_sample_sq_error(w * xw, tw), per_sample_sq_error(w * xl, tl)
        refw, refl = per_sample_sq_error(rw, tw), per_sample_sq_error(rl, tl)
    split, gw, gl = dpo_error_weights(ew, el, refw, refl, 5.0, weight)
    assert split.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    (gw * per_sample_sq_error(w * xw, tw)).sum().backward()
    (gl * per_sample_sq_error(w * xl, tl)).sum().backward()
    assert torch.allclose(w.grad, batched, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("weight,error,match", [
    (torch.tensor([1.0, -0.5]), PhysMasterError, "finite and >= 0"),
    (torch.tensor([1.0, float("nan")]), PhysMasterError, "finite and >= 0"),
    (torch.tensor([1.0, 1.0, 1.0]), BatchMismatchError, r"one weight per pair, \[2\]"),
    (torch.ones(2, 1), BatchMismatchError, r"one weight per pair"),
])
def test_bad_weights_are_clear_errors(weight, error, match):
    z = torch.zeros(2, 3)
    with pytest.raises(error, match=match):
        flow_dpo_loss(z, z, z, z, z, z, beta=1.0, weight=weight)


# -- plan_margins: filter and weights --------------------------------------------------------------------------------
def _p(source, margin, name=""):
    return SimpleNamespace(source=source, margin=margin, name=name)


def test_filter_drops_the_judge_pairs_below_min_margin_and_keeps_every_human_pair():
    pairs = [_p("judge", 0.05, "j1"), _p("judge", 0.3, "j2"), _p("human", 1 / 3, "h1"), _p("judge", 0.1, "j3"),
             _p("human", 0.0, "h0"), _p("judge", 0.09999, "j4")]
    plan = plan_margins(pairs, "filter", 0.1)
    assert [p.name for p in plan.kept] == ["j2", "h1", "j3", "h0"]  # 0.1 itself is kept; order unchanged
    assert [p.name for p in plan.dropped] == ["j1", "j4"]
    assert plan.weights is None
    assert "filter dropped 2 machine-labelled pairs with margin below min_margin 0.1, kept 4" in plan.summary()
    assert plan_margins(pairs, "filter", 0.0).dropped == []
    ignore = plan_margins(pairs, "ignore", 0.9)  # ignore: min_margin has no effect
    assert ignore.kept == pairs and ignore.dropped == [] and ignore.weights is None


def test_filter_that_leaves_nothing_names_min_margin():
    pairs = [_p("judge", 0.12), _p("judge", 0.31)]
    with pytest.raises(DataError, match=r"min_margin 0.5 drops all 2 pairs.*0.12..0.31.*Lower min_margin"):
        plan_margins(pairs, "filter", 0.5)
    with pytest.raises(DataError, match="min_margin 0.5 drops all 2"):
        plan_margins(pairs, "filter and weight", 0.5)
    assert len(plan_margins(pairs, "weight", 0.5).kept) == 2  # weight alone never drops


def test_weights_are_margins_over_their_sources_mean():
    pairs = [_p("judge", 0.1), _p("judge", 0.3), _p("human", 1.0), _p("human", 1 / 3), _p("human", 2 / 3)]
    plan = plan_margins(pairs, "weight")
    # judge mean 0.2 -> 0.5, 1.5; human mean 2/3 -> 1.5, 0.5, 1.0
    assert plan.weights == pytest.approx([0.5, 1.5, 1.5, 0.5, 1.0])
    assert sum(plan.weights) / len(plan.weights) == pytest.approx(1.0)
    # after the filter, the weights are normalised over the pairs it kept
    plan = plan_margins(pairs + [_p("judge", 0.01)], "filter and weight", 0.05)
    assert len(plan.dropped) == 1 and plan.weights == pytest.approx([0.5, 1.5, 1.5, 0.5, 1.0])
    # a source whose margins are all 0 (pairs saved without a margin) weighs 1 each
    assert plan_margins([_p("human", 0.0), _p("human", 0.0), _p("judge", 0.4)], "weight").weights == [1.0, 1.0, 1.0]
    assert "judge 1 pairs 1.00..1.00" in plan_margins([_p("judge", 0.4)], "weight").summary()


@pytest.mark.parametrize("use,min_margin,match", [("sometimes", 0.1, "margin_use must be one of"),
                                                   ("filter", -0.1, "min_margin must be a number >= 0"),
                                                   ("filter", float("nan"), "min_margin must be a number >= 0"),
                                                   ("filter", "x", "min_margin must be a number >= 0")])
def test_plan_margins_bad_settings(use, min_margin, match):
    with pytest.raises(DataError, match=match):
        plan_margins([_p("judge", 0.5)], use, min_margin)


def test_train_config_checks_margin_settings_and_keeps_old_fingerprints():
    with pytest.raises(TrainingError, match="margin_use must be one of"):
        TrainConfig(margin_use="often")
    with pytest.raises(TrainingError, match="min_margin must be a number >= 0"):
        TrainConfig(min_margin=-1.0)
    # "ignore" adds nothing to the trajectory, so checkpoints written before these fields still resume
    assert "margin_use" not in TrainConfig().trajectory()
    assert TrainConfig(margin_use="filter", min_margin=0.2).trajectory()["min_margin"] == 0.2


# -- the trainer -----------------------------------------------------------------------------------------------------
def margin_pairs(margins, sources=None, seed=2):
    g = torch.Generator().manual_seed(seed)
    sources = sources or ["judge"] * len(margins)
    return PreferenceSet(PreferencePair(make_cond(g), torch.randn(C, T, H, W, generator=g),
                                        torch.randn(C, T, H, W, generator=g), source=s, margin=m, group=f"g{i}")
                         for i, (m, s) in enumerate(zip(margins, sources)))


def _head_away_from_reference(tr):
    with torch.no_grad():  # move the head so the policy differs from the reference (the loss is not log 2)
        for p in tr.params:
            p.add_(0.2 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))


def test_trainer_weights_each_pairs_loss_by_its_normalised_margin():
    margins = [0.1, 0.5, 0.3]  # mean 0.3: weights 1/3, 5/3, 1
    data = margin_pairs(margins)
    losses = {}
    for use in ("ignore", "weight"):
        den, enc = setup()
        tr = StageTrainer("dpo-head", den, enc, data, TrainConfig(steps=1, batch_size=1, seed=3, beta=50.0,
                                                                  margin_use=use))
        _head_away_from_reference(tr)
        losses[use] = [tr.compute_loss(s)[0].item() for s in range(3)]
        if use == "weight":
            assert tr.pair_weights.tolist() == pytest.approx([1 / 3, 5 / 3, 1.0])
    for step in range(3):
        (i,) = batch_indices(3, 1, 3, step)
        assert losses["weight"][step] == pytest.approx(losses["ignore"][step] * margins[i] / 0.3, rel=1e-5)
    assert len(set(losses["ignore"])) == 3  # three different pairs, so the check above means something


def test_margins_of_one_train_exactly_as_ignoring_them():
    data = margin_pairs([1.0, 1.0, 1.0])
    runs = []
    for use in ("ignore", "weight"):
        den, enc = setup()
        runs.append(StageTrainer("dpo-head", den, enc, data, TrainConfig(steps=3, lr=1e-3, batch_size=2, seed=1,
                                                                         margin_use=use)).run())
    assert [h["loss"] for h in runs[0].history] == [h["loss"] for h in runs[1].history]


def test_split_passes_give_the_weighted_batched_loss():
    data = margin_pairs([0.2, 0.9, 0.4], sources=["judge", "judge", "human"])
    out = []
    for split in (False, True):
        den, enc = setup()
        tr = StageTrainer("dpo-head", den, enc, data, TrainConfig(steps=1, batch_size=3, seed=4, beta=50.0,
                                                                  margin_use="weight", split_passes=split))
        _head_away_from_reference(tr)
        tr.optimizer.zero_grad(set_to_none=True)
        if split:
            loss, _ = tr.split_backward(0)
        else:
            loss, _ = tr.compute_loss(0)
            loss.backward()
        out.append((loss.item(), [p.grad.clone() for p in tr.params if p.grad is not None]))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-4)
    assert all((a - b).abs().max() <= 1e-4 * a.abs().max() for a, b in zip(out[0][1], out[1][1]))


def test_trainer_filter_drops_the_right_pairs_and_says_so():
    data = margin_pairs([0.05, 0.4, 0.02, 0.2], sources=["judge", "judge", "human", "judge"])
    den, enc = setup()
    tr = StageTrainer("dpo-head", den, enc, data, TrainConfig(steps=2, margin_use="filter", min_margin=0.1))
    assert [p.group for p in tr.data.pairs] == ["g1", "g2", "g3"]  # g0 (judge 0.05) dropped; the human g2 kept
    assert [p.group for p in tr.margins.dropped] == ["g0"] and len(data) == 4  # the given set is not changed
    assert tr.pair_weights is None
    assert tr.run().steps_done == 2
    den, enc = setup()
    with pytest.raises(DataError, match="min_margin 0.9 drops all 2 pairs"):
        StageTrainer("dpo-head", den, enc, margin_pairs([0.3, 0.5]), TrainConfig(margin_use="filter", min_margin=0.9))


# -- the judge's labels for the picker -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scene():
    return render_scene(0, "seen", size=64, frames=24, fps=16.0)  # the judge scores it about 0.39


def test_judge_labels_keep_confident_pairs_with_their_confidence_as_margin(scene):
    good = scene.frames.astype(np.float32)
    static = np.repeat(good[:1], len(good), axis=0)
    black = np.zeros_like(good)
    labels = label_group([static, good, black], fps=16.0, min_confidence=0.1)
    assert not labels.error
    c = labels.candidates
    assert c[1]["found"] and c[1]["score"] > 0.5
    assert not c[0]["found"] and "static video" in c[0]["reason"] and c[0]["score"] == 0.0
    assert not c[2]["found"] and c[2]["score"] == 0.0  # nothing in it moves either: a low score with a reason
    # the good video beats both (a frozen candidate no longer hides the object from the judge); static and black
    # tie, so no pair between them
    assert sorted((w, lo) for w, lo, _ in labels.pairs) == [(1, 0), (1, 2)]
    for w, lo, conf in labels.pairs:
        assert 0.1 <= conf <= 1.0 and conf == pytest.approx(1.0, abs=1e-3)  # a lost object: no doubt
    assert labels.winner == 1 and labels.skipped == []
    # a threshold above a pair's confidence keeps nothing and says how many it skipped and why: the same drop
    # under a tenth of the gravity is wrong, but by less than a lost object (confidence about 0.34)
    slow = render_scene(0, "seen", size=64, frames=24, fps=16.0, gravity=0.3 * 64).frames.astype(np.float32)
    both = label_group([good, slow], fps=16.0, min_confidence=0.0)
    assert [(w, lo) for w, lo, _ in both.pairs] == [(0, 1)] and 0.1 < both.pairs[0][2] < 0.9
    high = label_group([good, slow], fps=16.0, min_confidence=min(1.0, both.pairs[0][2] + 0.01))
    assert high.pairs == [] and len(high.skipped) == 1
    rep = high.report()
    assert rep["skipped"] == 1 and rep["skipped_why"].startswith("judge confidence below min_confidence")
    assert "0 pairs at confidence >= " in high.note() and "1 skipped below it (not saved)" in high.note()
    assert high.winner == 0  # the best score still goes on in the graph


def test_nan_frames_are_reported_never_raised(scene):
    good = scene.frames.astype(np.float32)
    nan = good.copy()
    nan[3:5] = np.nan
    labels = label_group([nan, good, np.repeat(good[:1], len(good), axis=0)], fps=16.0, min_confidence=0.0)
    assert "static video" in labels.candidates[2]["reason"]
    assert not labels.error
    assert "frames 3, 4 hold NaN or infinite values" in labels.candidates[0]["reason"]
    assert labels.candidates[0]["score"] == 0.0
    assert all(0 not in (w, lo) for w, lo, _ in labels.pairs + labels.skipped)  # the NaN video gets no pair
    assert [(w, lo) for w, lo, _ in labels.pairs] == [(1, 2)]
    only_one = label_group([nan, good], fps=16.0)
    assert only_one.pairs == [] and "nothing to compare" in only_one.error and "nothing saved" in only_one.note()


def test_a_failing_judge_is_reported_and_nothing_is_labelled(scene, monkeypatch):
    import physmaster.physics as physics

    def broken(*a, **k):
        raise ValueError("the judge broke")

    monkeypatch.setattr(physics, "rank_candidates", broken)
    good = scene.frames.astype(np.float32)
    labels = label_group([good, good], fps=16.0)
    assert labels.pairs == [] and labels.error == "ValueError: the judge broke"
    assert labels.report()["error"] == "ValueError: the judge broke"
    assert labels.candidates[0]["reason"] == "not judged: ValueError: the judge broke"


def test_wrong_shapes_and_bad_thresholds_are_clear_errors(scene):
    good = scene.frames.astype(np.float32)
    masks = scene.object_masks()
    with pytest.raises(PhysMasterError, match=r"ground_truth_masks are 32x32 pixels but the candidates' frames are "
                                              r"64x64.*Decode the candidates at the ground truth's size"):
        label_group([good, good], fps=16.0, gt_masks=np.zeros((24, 32, 32), np.float32))
    with pytest.raises(PhysMasterError, match=r"ground_truth_masks are shaped \[24, 64\]"):
        label_group([good, good], fps=16.0, gt_masks=np.zeros((24, 64), np.float32))
    with pytest.raises(PhysMasterError, match="one size"):
        label_group([good, good[:, :32]], fps=16.0)
    with pytest.raises(PhysMasterError, match="min_confidence must be in 0..1"):
        label_group([good, good], fps=16.0, min_confidence=1.5)
    with_gt = label_group([good, np.zeros_like(good)], fps=16.0, gt_masks=masks.astype(np.float32))
    assert with_gt.pairs and with_gt.pairs[0][:2] == (0, 1)
