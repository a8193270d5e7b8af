"""training.validation: a head's Flow-DPO implicit reward margin on pairs, against a reference head."""

import math

import pytest
import torch

from physmaster.losses import flow_dpo_loss
from physmaster.training import PreferencePair, PreferenceSet, TrainConfig, train_dpo
from physmaster.training.stages import sample_t
from physmaster.training.validation import margin_summary, preference_margins
from test_training import C, H, T, W, pairs, setup


def swapped(ps):
    return PreferenceSet(PreferencePair(p.cond, p.loser, p.winner) for p in ps.pairs)


def trained(data, steps=30):
    den, enc = setup()
    ref = enc.clone()
    train_dpo(den, enc, data, TrainConfig(steps=steps, lr=3e-3, beta=2000.0, seed=0), stage="dpo-head")
    return den, enc, ref


def test_the_reference_itself_has_margin_zero_on_every_pair():
    den, enc = setup()
    m = preference_margins(den, pairs(5), enc.head, enc.clone().head, beta=2000.0, draws=3)
    assert m.shape == (5,)
    assert torch.equal(m, torch.zeros(5))


def test_a_head_trained_on_pairs_prefers_their_winners_and_swapping_them_negates_every_margin():
    data = pairs(2)
    den, enc, ref = trained(data)
    m = preference_margins(den, data, enc.head, ref.head, beta=2000.0, draws=8, seed=3)
    assert (m > 0).all() and m.mean() > 0.1
    flipped = preference_margins(den, swapped(data), enc.head, ref.head, beta=2000.0, draws=8, seed=3)
    assert torch.allclose(flipped, -m, atol=1e-5)
    # the same draws whatever the batch (to float rounding: a margin is beta x a difference of mean squared errors,
    # and another batch size sums them in another order on some CPUs), and other draws give other (finite) figures
    assert torch.allclose(preference_margins(den, data, enc.head, ref.head, 2000.0, draws=8, seed=3, batch=1), m,
                          rtol=1e-4, atol=2000.0 * 2e-6)
    other = preference_margins(den, data, enc.head, ref.head, 2000.0, draws=8, seed=4)
    assert torch.isfinite(other).all() and ((other - m).abs() > 1e-2 * m.abs()).any()


def test_one_draw_is_flow_dpo_loss_inside_on_the_same_t_and_noise():
    data = pairs(3, seed=7)
    den, enc, ref = trained(data, steps=10)
    m = preference_margins(den, data, enc.head, ref.head, beta=500.0, draws=1, seed=11)
    gen = torch.Generator().manual_seed(11)
    t = sample_t(TrainConfig(steps=1, lr=1.0), 3, gen)
    noise = torch.randn((3, C, T, H, W), generator=gen)
    xw, xl, cond = data.batch([0, 1, 2])
    with torch.no_grad():
        def v(head, x0):
            xt = den.add_noise(x0, noise, t)
            return den.predict_velocity(xt, t, cond.with_tokens(head(cond.features))), den.velocity_target(x0, noise, t)
        (pw, tw), (pl, tl) = v(enc.head, xw), v(enc.head, xl)
        (rw, _), (rl, _) = v(ref.head, xw), v(ref.head, xl)
        out = flow_dpo_loss(pw, pl, rw, rl, tw, tl, beta=500.0)
    # to float rounding: a margin is beta x a difference of differences of mean squared errors of about 1, so the
    # winners and losers batched together (preference_margins) or apart (here) differ by about beta x 1e-7 on some
    # CPUs (the test above checks that other draws of t and noise give other margins)
    assert torch.allclose(m, out.per_pair_margin.float(), rtol=1e-4, atol=500.0 * 2e-6)


def test_bad_draws_and_the_summary():
    den, enc = setup()
    with pytest.raises(ValueError, match="draws and batch must be >= 1, got 0 and 64"):
        preference_margins(den, pairs(1), enc.head, enc.head, 2000.0, draws=0)
    s = margin_summary(torch.tensor([1.0, -1.0, 2.0, 0.0]))
    assert s["pairs"] == 4 and s["accuracy"] == 0.5 and s["margin"] == pytest.approx(0.5)
    assert s["se"] == pytest.approx(float(torch.tensor([1.0, -1.0, 2.0, 0.0]).double().std()) / 2)
    assert math.isnan(margin_summary(torch.tensor([3.0]))["se"])
