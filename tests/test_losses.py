import math

import pytest
import torch

from physmaster.errors import BatchMismatchError, PhysMasterError
from physmaster.losses import (LOG2, flow_dpo_loss, flow_matching_loss, motion_weights, pair_motion_weights,
                               per_sample_sq_error, weighted_sq_error)


def test_flow_matching_hand_computed():
    v = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    target = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    # per-sample means: (1 + 4)/2 = 2.5 and (9 + 16)/2 = 12.5 -> mean 7.5
    assert flow_matching_loss(v, target).item() == pytest.approx(7.5)
    assert flow_matching_loss(v, target, reduction="sum").item() == pytest.approx(15.0)
    assert flow_matching_loss(v, target, weight=torch.tensor([1.0, 0.0])).item() == pytest.approx(2.5)


def test_flow_matching_is_fp32_for_half_inputs():
    v = torch.full((1, 4), 1.0, dtype=torch.bfloat16)
    assert flow_matching_loss(v, torch.zeros(1, 4, dtype=torch.bfloat16)).dtype == torch.float32


def test_dpo_hand_computed():
    # one pair, one element each: errors policy w 1, ref w 4, policy l 9, ref l 1; beta 0.5
    tw, tl = torch.zeros(1, 1), torch.zeros(1, 1)
    out = flow_dpo_loss(torch.tensor([[1.0]]), torch.tensor([[3.0]]), torch.tensor([[2.0]]),
                        torch.tensor([[1.0]]), tw, tl, beta=0.5)
    inside = -0.25 * ((1 - 4) - (9 - 1))  # = 2.75
    assert out.margin.item() == pytest.approx(inside)
    assert out.loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-inside))), rel=1e-6)
    assert out.loss.item() == pytest.approx(0.061958, abs=1e-5)
    assert out.accuracy.item() == 1.0
    assert out.reward_winner.item() == pytest.approx(0.75)
    assert out.reward_loser.item() == pytest.approx(-2.0)


def test_dpo_policy_equal_reference_is_log2_and_gradient_direction():
    g = torch.Generator().manual_seed(0)
    tw, tl = torch.randn(3, 2, 4, 5, 5, generator=g), torch.randn(3, 2, 4, 5, 5, generator=g)
    vw, vl = torch.randn(3, 2, 4, 5, 5, generator=g), torch.randn(3, 2, 4, 5, 5, generator=g)
    vw.requires_grad_(True)
    out = flow_dpo_loss(vw, vl, vw.detach().clone(), vl.clone(), tw, tl, beta=1000.0)
    assert out.loss.item() == pytest.approx(LOG2, abs=1e-7)
    assert out.margin.item() == 0.0 and out.accuracy.item() == 0.0
    out.loss.backward()
    # gradient descent moves the winner prediction towards its target
    step = vw.detach() - 1e-3 * vw.grad
    assert per_sample_sq_error(step, tw).sum() < per_sample_sq_error(vw.detach(), tw).sum()


def test_dpo_accuracy_fraction_and_mean_over_pairs():
    t = torch.zeros(2, 1)
    # pair 0: policy better on winner (positive margin); pair 1: policy worse on winner (negative)
    out = flow_dpo_loss(torch.tensor([[0.0], [2.0]]), torch.tensor([[0.0], [0.0]]),
                        torch.tensor([[1.0], [0.0]]), torch.tensor([[0.0], [0.0]]), t, t, beta=2.0)
    assert out.per_pair_margin.tolist() == pytest.approx([1.0, -4.0])
    assert out.accuracy.item() == pytest.approx(0.5)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(4.0))) / 2
    assert out.loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan"), "x"])
def test_dpo_bad_beta_is_clear(beta):
    z = torch.zeros(1, 2)
    with pytest.raises(PhysMasterError, match="beta"):
        flow_dpo_loss(z, z, z, z, z, z, beta=beta)


def test_dpo_shape_mismatch_and_half_precision():
    z = torch.zeros(1, 2)
    with pytest.raises(BatchMismatchError):
        flow_dpo_loss(z, torch.zeros(1, 3), z, torch.zeros(1, 3), z, torch.zeros(1, 3), beta=1.0)
    h = torch.ones(1, 2, dtype=torch.float16)
    out = flow_dpo_loss(h, h, h * 2, h * 2, h * 0, h * 0, beta=1.0)
    assert out.loss.dtype == torch.float32


def test_dpo_error_weights_give_the_exact_gradient_in_separate_passes():
    """Issue 10: winner and loser in separate passes. dL/d err times each error's own gradient, summed over two
    backward passes, equals the gradient of the batched Flow-DPO loss."""
    from physmaster.losses import dpo_error_weights, flow_dpo_loss, per_sample_sq_error

    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)  # stands in for the policy's weights
    xw, xl, tw, tl = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(4))
    rw, rl = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    out = flow_dpo_loss(w * xw, w * xl, rw, rl, tw, tl, beta=7.0)
    (batched,) = torch.autograd.grad(out.loss, w)
    with torch.no_grad():
        ew, el = per_sample_sq_error(w * xw, tw), per_sample_sq_error(w * xl, tl)
        refw, refl = per_sample_sq_error(rw, tw), per_sample_sq_error(rl, tl)
    split_out, gw, gl = dpo_error_weights(ew, el, refw, refl, 7.0)
    assert split_out.loss.item() == pytest.approx(out.loss.item(), rel=1e-6) and not split_out.loss.requires_grad
    (gw * per_sample_sq_error(w * xw, tw)).sum().backward()
    (gl * per_sample_sq_error(w * xl, tl)).sum().backward()
    assert torch.allclose(w.grad, batched, rtol=1e-5, atol=1e-7)
    assert split_out.logs()["accuracy"] == pytest.approx(out.logs()["accuracy"])


def test_motion_weights_favour_what_moves_and_average_one():
    x = torch.zeros(2, 3, 4, 5, 5)
    x[0, :, 2:, 1, 1] = 1.0  # one latent pixel changes from frame 2 on
    w = motion_weights(x, 9.0)
    assert w.shape == (2, 1, 4, 5, 5)
    assert torch.allclose(w.flatten(1).mean(1), torch.ones(2))
    # 100 elements, 2 of them moved (d = 50 there after normalising): w = 1 + 9 * 50 = 451 vs 1, then / mean
    assert w[0, 0, 2, 1, 1] / w[0, 0, 0, 0, 0] == pytest.approx(451.0)
    assert torch.allclose(w[1], torch.ones_like(w[1]))  # a still video keeps uniform weights
    assert torch.allclose(motion_weights(x, 0.0), torch.ones_like(w))
    with pytest.raises(PhysMasterError, match=r"video latents \[B, C, T, H, W\]"):
        motion_weights(torch.zeros(2, 3, 4), 1.0)


def test_weighted_sq_error_hand_computed():
    pred, target = torch.zeros(1, 1, 2, 1, 1), torch.tensor([1.0, 2.0]).view(1, 1, 2, 1, 1)
    w = torch.tensor([3.0, 1.0]).view(1, 1, 2, 1, 1)
    assert weighted_sq_error(pred, target, w).item() == pytest.approx((3 * 1 + 1 * 4) / 2)
    assert torch.equal(weighted_sq_error(pred, target, None), per_sample_sq_error(pred, target))
    with pytest.raises(BatchMismatchError, match="prediction is shaped"):
        weighted_sq_error(pred, target[:, :, :1], w)


def test_pair_motion_weights_cover_where_either_video_moves():
    xw, xl = torch.zeros(1, 2, 4, 5, 5), torch.zeros(1, 2, 4, 5, 5)
    xw[0, :, 1:, 0, 0] = 1.0  # the winner moves at (0, 0), the loser at (4, 4)
    xl[0, :, 1:, 4, 4] = 1.0
    w = pair_motion_weights(xw, xl, 9.0)
    assert w.shape == (1, 1, 4, 5, 5) and w.flatten(1).mean().item() == pytest.approx(1.0)
    assert w[0, 0, 2, 0, 0] == pytest.approx(w[0, 0, 2, 4, 4].item()) and w[0, 0, 2, 0, 0] > 10 * w[0, 0, 2, 2, 2]
    assert torch.allclose(pair_motion_weights(xw, xl, 0.0), torch.ones_like(w))
    with pytest.raises(BatchMismatchError, match="winner and loser latents must have the same shape"):
        pair_motion_weights(xw, xl[:, :, :2], 1.0)


def test_dpo_positive_hand_computed_and_off_when_the_winner_fits_better():
    """DPO-Positive (`positive`, Smaug): lambda * beta/2 * max(0, err_w - ref_w) is taken from the sigmoid's inside,
    so a pair whose winner the policy fits worse than the reference loses more; a winner fitted better changes
    nothing."""
    from physmaster.losses import flow_dpo_from_errors

    # winner worse than the reference by 0.2, loser worse by 0.5: the plain inside is -1 * (0.2 - 0.5) = +0.3
    ew, el, rw, rl = (torch.tensor([v]) for v in (0.6, 1.0, 0.4, 0.5))
    plain = flow_dpo_from_errors(ew, el, rw, rl, 2.0)
    pos = flow_dpo_from_errors(ew, el, rw, rl, 2.0, positive=3.0)
    assert plain.margin.item() == pytest.approx(0.3)
    assert pos.margin.item() == pytest.approx(0.3 - 3.0 * 1.0 * 0.2)  # = -0.3: the pair is now lost
    assert pos.loss.item() == pytest.approx(math.log1p(math.exp(0.3)), rel=1e-6)
    assert pos.accuracy.item() == 0.0 and plain.accuracy.item() == 1.0
    # the winner fitted better than the reference: the same loss as plain DPO
    better = (torch.tensor([0.3]), el, rw, rl)
    assert flow_dpo_from_errors(*better, 2.0, positive=3.0).loss.item() == pytest.approx(
        flow_dpo_from_errors(*better, 2.0).loss.item())


def test_dpo_positive_split_passes_give_the_batched_gradient():
    from physmaster.losses import dpo_error_weights, flow_dpo_from_errors

    ew = torch.tensor([0.6, 0.2, 0.9], requires_grad=True)
    el = torch.tensor([1.0, 0.4, 0.8], requires_grad=True)
    rw, rl = torch.tensor([0.4, 0.3, 0.5]), torch.tensor([0.5, 0.5, 0.7])
    out = flow_dpo_from_errors(ew, el, rw, rl, 5.0, torch.tensor([1.0, 2.0, 0.5]), positive=4.0)
    bw, bl = torch.autograd.grad(out.loss, (ew, el))
    split, gw, gl = dpo_error_weights(ew.detach(), el.detach(), rw, rl, 5.0, torch.tensor([1.0, 2.0, 0.5]),
                                      positive=4.0)
    assert split.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    assert torch.allclose(gw, bw) and torch.allclose(gl, bl)
    assert bool((gw > 0).all()) and bool((gl < 0).all())  # descent lowers the winners' errors, raises the losers'


def test_dpo_positive_must_be_a_number_at_least_zero():
    from physmaster.training import TrainConfig, TrainingError

    with pytest.raises(TrainingError, match="dpo_positive must be >= 0"):
        TrainConfig(dpo_positive=-1.0)
    assert "dpo_positive" not in TrainConfig().trajectory()  # off: checkpoints from before it still resume
    assert TrainConfig(dpo_positive=2.0).trajectory()["dpo_positive"] == 2.0
