"""Stage loops over the diffusers Wan backend with a tiny model (fp32, CPU)."""

import copy
import math

import pytest
import torch

from physmaster.backends.diffusers_wan import WanDenoiser, make_i2v_condition, make_tiny_wan
from physmaster.encoder import HeadConfig, PhysEncoder
from physmaster.errors import BatchMismatchError, CheckpointError
from physmaster.training import (Conditioning, DataError, PreferencePair, PreferenceSet, StageTrainer,
                                 TrainConfig, TrainingError, VideoSample, VideoSet, train_dpo, train_sft)
from physmaster.training.stages import batch_indices

C, T, H, W, D = 3, 2, 8, 8, 32


def make_cond(g):
    first = torch.rand(1, C, H, W, generator=g)
    return Conditioning(context=torch.randn(1, 4, D, generator=g), features=torch.randn(1, 6, 16, generator=g),
                        image_cond=make_i2v_condition(first, T))


def setup(seed=0, lora=True, targets=("to_q", "to_k", "to_v"), **model_kwargs):
    den = WanDenoiser(make_tiny_wan(seed, latent_channels=C, text_dim=D, **model_kwargs))
    if lora:
        den.add_lora(4, targets=list(targets), seed=seed)
    enc = PhysEncoder.new(HeadConfig(in_dim=16, context_dim=D, num_tokens=2, hidden_dim=16, depth=1, heads=2),
                          seed=seed)
    return den, enc


def first_step(tr, split: bool):
    """Step 0's loss and logs with its gradients in the parameters' .grad: batched, or one video per pass."""
    tr.optimizer.zero_grad(set_to_none=True)
    if split:
        return tr.split_backward(0)
    loss, logs = tr.compute_loss(0)
    loss.backward()
    return loss, logs


def videos(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return VideoSet(VideoSample(torch.randn(C, T, H, W, generator=g), make_cond(g), f"v{i}") for i in range(n))


def pairs(n=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return PreferenceSet(PreferencePair(make_cond(g), torch.randn(C, T, H, W, generator=g),
                                        torch.randn(C, T, H, W, generator=g)) for _ in range(n))


def weights(den, enc):
    out = {f"head.{k}": v.clone() for k, v in enc.head.state_dict().items()}
    out.update({f"lora.{k}": v.clone() for k, v in den.lora_state_dict().items()})
    return out


def test_sft_reduces_loss_and_trains_head_and_lora():
    den, enc = setup(targets=("to_q", "to_k", "to_v", "to_out.0", "proj_out", "net.2"))
    vs = videos(2)
    before = weights(den, enc)
    calls = []
    tr = StageTrainer("sft", den, enc, vs, TrainConfig(steps=30, lr=1e-2, seed=0, t_min=0.3, t_max=0.7))

    def fixed_loss():  # the loss on the draws of steps 0..3 (a function of (seed, step) only)
        with torch.no_grad():
            return sum(tr.compute_loss(s)[0].item() for s in range(4)) / 4

    first = fixed_loss()
    res = tr.run(lambda s, n, logs: calls.append((s, n, logs["loss"])))
    assert res.steps_done == 30 and res.stopped is None
    assert [c[0] for c in calls] == list(range(1, 31)) and calls[0][1] == 30
    last = fixed_loss()
    assert last < 0.93 * first, (first, last)  # 2.46 -> 2.16 measured
    after = weights(den, enc)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("head."))
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert all(not p.requires_grad for n, p in den.model.named_parameters() if "lora_" not in n)
    assert set(res.loss_map) >= {"loss", "grad_norm", "lr"}


def test_same_seed_reproducible_other_seed_differs():
    outs = []
    for seed in (5, 5, 6):
        den, enc = setup()
        train_sft(den, enc, videos(3), TrainConfig(steps=4, lr=1e-3, seed=seed))
        outs.append(weights(den, enc))
    assert all(torch.equal(outs[0][k], outs[1][k]) for k in outs[0])
    assert any(not torch.equal(outs[0][k], outs[2][k]) for k in outs[0])


@pytest.mark.parametrize("stage", ["sft", "dpo-lora", "dpo-head"])
def test_resume_is_bit_identical(tmp_path, stage):
    data = videos(3) if stage == "sft" else pairs(3)
    cfg = TrainConfig(steps=6, lr=2e-3, seed=3, beta=50.0, checkpoint_every=2, warmup_steps=2)
    den, enc = setup()
    StageTrainer(stage, den, enc, data, cfg).run()
    full = weights(den, enc)

    den2, enc2 = setup()
    t1 = StageTrainer(stage, den2, enc2, data, TrainConfig(**{**cfg.__dict__, "steps": 4}), tmp_path)
    t1.run()  # "interrupted" after 4 steps (checkpoints at 2 and 4)
    den3, enc3 = setup()  # a fresh process: same starting weights, resumes from the file
    t2 = StageTrainer(stage, den3, enc3, data, cfg, tmp_path)
    assert t2.step == 4
    res = t2.run()
    assert res.steps_done == 6 and len(res.history) == 6
    got = weights(den3, enc3)
    for k in full:
        assert torch.equal(full[k], got[k]), k


def test_interrupted_run_loses_at_most_k_steps(tmp_path):
    den, enc = setup()
    data = videos(2)

    class Boom(Exception):
        pass

    def cb(step, total, logs):
        if step == 5:
            raise Boom

    with pytest.raises(Boom):
        StageTrainer("sft", den, enc, data, TrainConfig(steps=10, checkpoint_every=2), tmp_path).run(cb)
    den2, enc2 = setup()
    t = StageTrainer("sft", den2, enc2, data, TrainConfig(steps=10, checkpoint_every=2), tmp_path)
    assert t.step == 4  # 5 done, checkpoint at 4: lost 1 <= K = 2


def test_resume_from_other_config_is_clear_error(tmp_path):
    den, enc = setup()
    StageTrainer("sft", den, enc, videos(2), TrainConfig(steps=2, lr=1e-3), tmp_path).run()
    den2, enc2 = setup()
    with pytest.raises(CheckpointError, match=r"another training run \(lr: 0.001 there, 0.002 here"):
        StageTrainer("sft", den2, enc2, videos(2), TrainConfig(steps=4, lr=2e-3), tmp_path)
    with pytest.raises(CheckpointError, match="stage: 'sft' there, 'dpo-head' here"):
        StageTrainer("dpo-head", den2, enc2, pairs(2), TrainConfig(steps=4, lr=1e-3), tmp_path)
    # a longer run of the same config resumes (steps is not part of a run's identity)
    den3, enc3 = setup()
    assert StageTrainer("sft", den3, enc3, videos(2), TrainConfig(steps=4, lr=1e-3), tmp_path).step == 2


def test_checkpoint_is_safetensors_not_pickle(tmp_path):
    den, enc = setup()
    res = StageTrainer("dpo-head", den, enc, pairs(2), TrainConfig(steps=2), tmp_path).run()
    data = res.checkpoint.read_bytes()
    n = int.from_bytes(data[:8], "little")
    import json
    header = json.loads(data[8:8 + n])
    assert "physmaster.train_state" in header["__metadata__"]
    assert any(k.startswith("ref_head.") for k in header) and any(k.startswith("optim.") for k in header)
    assert [p.name for p in tmp_path.iterdir()] == [res.checkpoint.name]  # no temp files left


@pytest.mark.parametrize("stage", ["sft", "dpo-lora", "dpo-head"])
def test_nan_stops_and_keeps_last_good_weights(tmp_path, stage):
    data = videos(2) if stage == "sft" else pairs(2)
    den, enc = setup()
    ref = StageTrainer(stage, den, enc, data, TrainConfig(steps=3, lr=1e-3))
    ref.run()
    good = weights(den, enc)

    den2, enc2 = setup()
    tr = StageTrainer(stage, den2, enc2, data, TrainConfig(steps=8, lr=1e-3), tmp_path)
    tr._loss_hook = lambda step, loss: loss * float("nan") if step == 3 else loss
    res = tr.run()
    assert res.steps_done == 3 and "not finite" in res.stopped
    got = weights(den2, enc2)
    assert all(torch.equal(good[k], got[k]) for k in good)
    assert all(p.grad is None for p in tr.params)
    # the checkpoint written at the stop holds the last good weights
    den3, enc3 = setup()
    t3 = StageTrainer(stage, den3, enc3, data, TrainConfig(steps=8, lr=1e-3), tmp_path)
    assert t3.step == 3
    assert all(torch.equal(good[k], v) for k, v in weights(den3, enc3).items())


def test_nan_in_gradient_stops_too():
    den, enc = setup()
    tr = StageTrainer("sft", den, enc, videos(2), TrainConfig(steps=4, lr=1e-3))
    hook = enc.head.out_proj.weight.register_hook(lambda g: g * float("nan"))
    res = tr.run()
    hook.remove()
    assert res.steps_done == 0 and "gradient is not finite" in res.stopped


def test_dpo_lora_reference_is_lora_disabled_and_starts_at_log2():
    den, enc = setup()
    den.fold_lora(seed=1)  # the LoRA starts at zero delta: policy == reference
    tr = StageTrainer("dpo-lora", den, enc, pairs(2), TrainConfig(steps=3, lr=1e-2, beta=10.0))
    loss, logs = tr.compute_loss(0)
    assert logs["loss"] == pytest.approx(math.log(2), abs=1e-6)
    res = tr.run()
    assert res.history[-1]["margin"] != 0.0
    assert enc.head.out_proj.weight.grad is None and not enc.head.out_proj.weight.requires_grad


def _drift(den, enc, data):
    """Mean squared difference between the model's velocity with its LoRA and without, on `data`'s videos."""
    x0, cond = data.batch(list(range(len(data))))
    g = torch.Generator().manual_seed(5)
    t = torch.full((len(data),), 0.5)
    x_t = den.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    c = cond.with_tokens(enc.head(cond.features), 1.0)
    with torch.no_grad():
        v = den.predict_velocity(x_t, t, c)
        with den.lora_disabled():
            v0 = den.predict_velocity(x_t, t, c)
    return float(((v - v0) ** 2).mean())


def test_dpo_lora_anchor_keeps_the_reference_prediction_on_the_anchor_videos():
    """anchor_weight adds the policy's squared drift from the reference on the anchor videos to the loss (logged
    as "anchor", 0 at the start where the LoRA is zero), and after training the LoRA moves the velocity there
    less than the same run without it."""
    anchor = videos(4, seed=9)
    drift = {}
    for w in (0.0, 100.0):
        den, enc = setup()
        den.fold_lora(seed=1)
        tr = StageTrainer("dpo-lora", den, enc, pairs(3), TrainConfig(steps=25, lr=1e-2, beta=10.0, batch_size=2,
                                                                      anchor_weight=w), anchor=anchor)
        if w:
            loss, logs = tr.compute_loss(0)
            assert logs["anchor"] == pytest.approx(0.0, abs=1e-12)
            assert logs["loss"] == pytest.approx(math.log(2), abs=1e-6)
        res = tr.run()
        assert res.stopped is None
        assert ("anchor" in res.history[-1]) == bool(w)
        drift[w] = _drift(den, enc, anchor)
    assert drift[0.0] > 0 and drift[100.0] < 0.2 * drift[0.0], drift


def _token_drift(den, enc, ref_head, data):
    """Mean squared difference between the model's velocity with the head's tokens and with `ref_head`'s."""
    x0, cond = data.batch(list(range(len(data))))
    g = torch.Generator().manual_seed(5)
    t = torch.full((len(data),), 0.5)
    x_t = den.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    with torch.no_grad():
        v = den.predict_velocity(x_t, t, cond.with_tokens(enc.head(cond.features), 1.0))
        v0 = den.predict_velocity(x_t, t, cond.with_tokens(ref_head(cond.features), 1.0))
    return float(((v - v0) ** 2).mean())


def test_dpo_head_anchor_keeps_the_reference_heads_prediction_on_the_anchor_videos():
    """Stage III's anchor: the reference is the head as the stage found it, so the drift is 0 at the start, and
    after training the new tokens move the velocity on the anchor videos less than without it."""
    anchor = videos(4, seed=9)
    drift = {}
    for w in (0.0, 1000.0):
        den, enc = setup()
        den.fold_lora(seed=1)
        ref_head = copy.deepcopy(enc.head)
        tr = StageTrainer("dpo-head", den, enc, pairs(3), TrainConfig(steps=25, lr=1e-2, beta=10.0, batch_size=2,
                                                                      anchor_weight=w), anchor=anchor)
        if w:
            loss, logs = tr.compute_loss(0)
            assert logs["anchor"] == pytest.approx(0.0, abs=1e-12)
        res = tr.run()
        assert res.stopped is None and ("anchor" in res.history[-1]) == bool(w)
        drift[w] = _token_drift(den, enc, ref_head, anchor)
    assert drift[0.0] > 0 and drift[1000.0] < 0.2 * drift[0.0], drift


def test_anchor_weight_is_refused_where_it_has_no_meaning():
    den, enc = setup()
    with pytest.raises(TrainingError, match="needs anchor videos"):
        StageTrainer("dpo-lora", den, enc, pairs(2), TrainConfig(steps=1, anchor_weight=1.0))
    with pytest.raises(TrainingError, match="stage sft has no reference"):
        StageTrainer("sft", den, enc, videos(2), TrainConfig(steps=1, anchor_weight=1.0), anchor=videos(2))
    with pytest.raises(TrainingError, match="split_passes"):
        StageTrainer("dpo-lora", den, enc, pairs(2), TrainConfig(steps=1, anchor_weight=1.0, split_passes=True),
                     anchor=videos(2))
    with pytest.raises(TrainingError, match="anchor_weight must be >= 0"):
        TrainConfig(anchor_weight=-1.0)
    assert "anchor_weight" not in TrainConfig().trajectory()  # off: checkpoints made before it still resume
    assert TrainConfig(anchor_weight=3.0).trajectory()["anchor_weight"] == 3.0


def test_head_modules_trains_only_the_named_head_parameters():
    den, enc = setup()
    before = {n: p.detach().clone() for n, p in enc.head.named_parameters()}
    lora = {n: p.detach().clone() for n, p in den.named_lora_parameters()}
    res = train_dpo(den, enc, pairs(2), TrainConfig(steps=3, lr=1e-2, beta=500.0, head_modules="out_proj,gain"),
                    stage="dpo-head")
    assert res.history[-1]["loss"] > 0
    moved = {n for n, p in enc.head.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"out_proj.weight", "out_proj.bias", "gain"}
    assert all(torch.equal(p, lora[n]) for n, p in den.named_lora_parameters())
    assert TrainConfig(head_modules="out_proj").trajectory()["head_modules"] == "out_proj"
    assert "head_modules" not in TrainConfig().trajectory()  # off: checkpoints made before it still resume
    with pytest.raises(TrainingError, match=r"head_modules='out_proj,outnorm': outnorm matches none of the head's "
                                            r"parameters \(e\.g\. layer_logits"):
        StageTrainer("dpo-head", den, enc, pairs(2), TrainConfig(steps=1, head_modules="out_proj,outnorm"))


def test_lora_modules_trains_only_the_named_lora_layers():
    den, enc = setup(targets=("to_q", "to_k", "to_v", "net.2"))
    with torch.no_grad():  # B = 0 at the start: give every layer a delta so that A's gradient is non-zero too
        for _, p in den.named_lora_parameters():
            p.add_(0.05 * torch.randn_like(p))
    before = {n: p.detach().clone() for n, p in den.named_lora_parameters()}
    res = train_dpo(den, enc, pairs(2), TrainConfig(steps=3, lr=1e-2, beta=500.0, lora_modules="attn1"),
                    stage="dpo-lora")
    assert res.history[-1]["loss"] > 0
    moved = {n for n, p in den.named_lora_parameters() if not torch.equal(p, before[n])}
    assert moved and all(".attn1." in n for n in moved)
    assert len(moved) == sum(".attn1." in n for n in before)  # every self-attention LoRA weight trained
    assert TrainConfig(lora_modules="attn1").trajectory()["lora_modules"] == "attn1"
    assert "lora_modules" not in TrainConfig().trajectory()  # off: checkpoints made before it still resume
    with pytest.raises(TrainingError, match=r"lora_modules='attn9' matches none of the LoRA's parameters \(e\.g\. "
                                            r"blocks\.0\.attn1"):
        StageTrainer("dpo-lora", den, enc, pairs(2), TrainConfig(steps=1, lora_modules="attn9"))
    # a typo beside a real part is refused too, naming the part (before, "attn1,atn2" trained attn1 alone)
    with pytest.raises(TrainingError, match=r"lora_modules='attn1,atn2': atn2 matches none of the LoRA's parameters"):
        StageTrainer("dpo-lora", den, enc, pairs(2), TrainConfig(steps=1, lora_modules="attn1,atn2"))


def test_dpo_head_trains_only_the_head_and_learns_preferences():
    den, enc = setup()
    data = pairs(2)
    dit_before = {k: v.clone() for k, v in den.model.state_dict().items()}
    res = train_dpo(den, enc, data, TrainConfig(steps=30, lr=3e-3, beta=2000.0, seed=0), stage="dpo-head")
    assert res.history[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert sum(h["accuracy"] for h in res.history[-10:]) / 10 > 0.6
    assert sum(h["margin"] for h in res.history[-10:]) > 0
    assert all(torch.equal(v, den.model.state_dict()[k]) for k, v in dit_before.items())


def _storages(obj, seen=None, out=None, depth=0):
    """data_ptr -> bytes of every tensor storage reachable from obj (attributes, containers, modules)."""
    seen = set() if seen is None else seen
    out = {} if out is None else out
    if id(obj) in seen or depth > 12:
        return out
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        st = obj.untyped_storage()
        out[st.data_ptr()] = st.nbytes()
        return out
    if isinstance(obj, torch.nn.Module):
        for t in list(obj.parameters()) + list(obj.buffers()):
            _storages(t, seen, out, depth + 1)
    if isinstance(obj, torch.optim.Optimizer):
        _storages(obj.state, seen, out, depth + 1)
        _storages(obj.param_groups, seen, out, depth + 1)
        return out
    if isinstance(obj, dict):
        for k, v in obj.items():
            _storages(k, seen, out, depth + 1)
            _storages(v, seen, out, depth + 1)
    elif isinstance(obj, (list, tuple, set)):
        for v in obj:
            _storages(v, seen, out, depth + 1)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        _storages(vars(obj), seen, out, depth + 1)
    return out


@pytest.mark.parametrize("stage", ["sft", "dpo-lora", "dpo-head"])
def test_no_stage_holds_a_second_copy_of_the_dit(stage):
    den, enc = setup(ffn_dim=512, num_layers=3)
    data = videos(2) if stage == "sft" else pairs(2)
    tr = StageTrainer(stage, den, enc, data, TrainConfig(steps=2))
    tr.run()
    model_ptrs = _storages(den.model)
    lora_ptrs = {p.untyped_storage().data_ptr() for p in den.lora_parameters()}
    base_bytes = sum(b for p, b in model_ptrs.items() if p not in lora_ptrs)
    reach = _storages(tr)
    extra = {p: b for p, b in reach.items() if p not in model_ptrs}
    head_bytes = sum(p.numel() * 4 for p in enc.head.parameters())
    lora_bytes = sum(p.numel() * 4 for p in den.lora_parameters())
    data_bytes = sum(b for p, b in _storages(data).items())
    # beyond the model itself: the data, the head (+ its frozen reference copy), optimizer moments and grads
    budget = data_bytes + 4 * head_bytes + 3 * lora_bytes + 65536
    assert sum(extra.values()) <= budget
    assert sum(extra.values()) < base_bytes  # far from a second DiT
    assert base_bytes > 4 * (head_bytes + lora_bytes)  # ... which the check could detect


def test_data_errors():
    g = torch.Generator().manual_seed(0)
    cond = make_cond(g)
    x = torch.randn(C, T, H, W)
    with pytest.raises(DataError, match="no usable pairs .*1 identical"):
        PreferenceSet([PreferencePair(cond, x, x.clone())])
    with pytest.raises(DataError, match="no usable pairs"):
        PreferenceSet([])
    with pytest.raises(BatchMismatchError, match="winner latent is .* but loser is"):
        PreferenceSet([PreferencePair(cond, x, torch.randn(C, T + 1, H, W))])
    nan = x.clone()
    nan[0, 0, 0, 0] = float("nan")
    ps = PreferenceSet([PreferencePair(cond, x, nan), PreferencePair(cond, x, x + 1)])
    assert len(ps) == 1 and ps.skipped == {"non-finite": 1}
    with pytest.raises(DataError, match="empty"):
        VideoSet([])
    den, enc = setup()
    with pytest.raises(TrainingError, match="preference pairs"):
        StageTrainer("dpo-head", den, enc, videos(1), TrainConfig())
    den_nolora, _ = setup(lora=False)
    with pytest.raises(TrainingError, match="has none"):
        StageTrainer("dpo-lora", den_nolora, enc, pairs(1), TrainConfig())
    with pytest.raises(TrainingError, match="lr must be > 0"):
        TrainConfig(lr=0)


def test_batch_indices_cover_each_epoch():
    got = [i for s in range(4) for i in batch_indices(6, 3, seed=1, step=s)]
    assert sorted(got[:6]) == list(range(6)) and sorted(got[6:]) == list(range(6))
    assert got[:6] != list(range(6)) or got[6:] != list(range(6))


def test_gradient_checkpointing_gives_same_gradients():
    losses = []
    for gc in (False, True):
        den, enc = setup()
        res = train_sft(den, enc, videos(2), TrainConfig(steps=2, lr=1e-3, gradient_checkpointing=gc))
        losses.append((res.history[-1]["loss"], weights(den, enc)))
        assert den.model.gradient_checkpointing is gc
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)
    for k in losses[0][1]:
        torch.testing.assert_close(losses[0][1][k], losses[1][1][k], rtol=1e-4, atol=1e-6)


def test_conditioning_batches_extra_tensors():
    from physmaster.training import Conditioning

    a = Conditioning(context=torch.zeros(1, 3, 4), extra={"kw.clip_fea": torch.zeros(1, 5, 2), "const": 7})
    b = Conditioning(context=torch.ones(1, 3, 4), extra={"kw.clip_fea": torch.ones(1, 5, 2), "const": 7})
    both = Conditioning.cat([a, b])
    assert both.extra["kw.clip_fea"].shape == (2, 5, 2) and both.extra["const"] == 7
    assert torch.equal(both.extra["kw.clip_fea"][1], torch.ones(5, 2))
    assert both.repeat(2).extra["kw.clip_fea"].shape == (4, 5, 2)
    with pytest.raises(ValueError, match="only some have extra"):
        Conditioning.cat([a, Conditioning(context=torch.ones(1, 3, 4))])


def test_token_dropout_zeroes_some_samples_tokens_reproducibly():
    """Condition dropout in Stage I: seeded per step, so the same seed gives the same samples dropped; 0 is
    the plain loss (no extra random draw)."""
    den, enc = setup()
    vs = videos(8)
    seen = []
    orig = den.predict_velocity

    def spy(x_t, t, cond):
        seen.append(cond.context[:, -2:].abs().sum((1, 2)).detach())  # the 2 physical tokens per sample
        return orig(x_t, t, cond)

    den.predict_velocity = spy
    plain = StageTrainer("sft", den, enc, vs, TrainConfig(steps=0, batch_size=8, seed=3))
    loss0 = plain.compute_loss(0)[0].item()
    assert (seen[-1] > 0).all()
    drop = StageTrainer("sft", den, enc, vs, TrainConfig(steps=0, batch_size=8, seed=3, token_dropout=0.5))
    losses = [drop.compute_loss(s)[0].item() for s in range(6)]
    zeroed = torch.stack(seen[-6:]) == 0
    assert 0 < zeroed.float().mean() < 1
    again = [drop.compute_loss(s)[0].item() for s in range(6)]
    assert torch.equal(torch.stack(seen[-6:]) == 0, zeroed) and losses == again
    assert drop.compute_loss(0)[0].item() != loss0 or not zeroed[0].any()
    with pytest.raises(TrainingError, match="token_dropout"):
        TrainConfig(token_dropout=1.0)


@pytest.mark.parametrize("stage", ["sft", "dpo-lora", "dpo-head"])
def test_split_passes_give_the_batched_loss_and_gradient(stage):
    """Issue 10: one video per pass (gradient accumulation; Flow-DPO's policy errors from a pass without a
    graph) gives the batched step's loss and gradient, only in another float summation order."""
    data = videos(3) if stage == "sft" else pairs(3)
    grads = []
    for split in (False, True):
        den, enc = setup()
        if stage == "dpo-lora":
            with torch.no_grad():  # a LoRA away from zero, so the policy differs from the reference
                for p in den.lora_parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        cfg = TrainConfig(steps=1, lr=1e-3, batch_size=2, seed=4, beta=50.0, token_dropout=0.0,
                          split_passes=split)
        tr = StageTrainer(stage, den, enc, data, cfg)
        loss, logs = first_step(tr, split)
        grads.append((float(loss.detach()), logs, [p.grad.clone() for p in tr.params if p.grad is not None]))
    (l0, logs0, g0), (l1, logs1, g1) = grads
    assert l1 == pytest.approx(l0, rel=1e-4)
    assert len(g0) == len(g1) > 0
    # batched and one-at-a-time matrix products round differently (float32): ~1e-5 of each gradient's scale
    assert all((a - b).abs().max() <= 1e-4 * a.abs().max() for a, b in zip(g0, g1))
    if stage != "sft":
        assert logs1["accuracy"] == logs0["accuracy"] and logs1["margin"] == pytest.approx(logs0["margin"], rel=1e-3)
    # and a whole run follows the same trajectory
    res = []
    for split in (False, True):
        den, enc = setup()
        r = StageTrainer(stage, den, enc, data, TrainConfig(steps=3, lr=1e-3, batch_size=2, seed=4, beta=50.0,
                                                             split_passes=split)).run()
        res.append([h["loss"] for h in r.history])
    assert res[1] == pytest.approx(res[0], rel=1e-4, abs=1e-6)


def test_split_passes_stop_on_a_nonfinite_loss_before_any_backward():
    den, enc = setup()
    tr = StageTrainer("dpo-head", den, enc, pairs(2), TrainConfig(steps=4, lr=1e-3, split_passes=True))
    tr._loss_hook = lambda step, loss: loss * float("nan") if step == 1 else loss
    res = tr.run()
    assert res.steps_done == 1 and "not finite" in res.stopped
    assert all(p.grad is None for p in tr.params)


def test_motion_weight_weighs_the_sft_loss_the_same_batched_and_split():
    """Stage I's motion weighting (losses.motion_weights) changes the loss, and one-video-per-pass agrees."""
    data = videos(3)
    out = {}
    for mw, split in ((0.0, False), (5.0, False), (5.0, True)):
        den, enc = setup()
        tr = StageTrainer("sft", den, enc, data, TrainConfig(steps=1, lr=1e-3, batch_size=2, seed=4,
                                                             motion_weight=mw, split_passes=split))
        loss, _ = first_step(tr, split)
        out[(mw, split)] = (float(loss.detach()), [p.grad.clone() for p in tr.params if p.grad is not None])
    assert out[(5.0, False)][0] != pytest.approx(out[(0.0, False)][0], rel=1e-3)
    assert out[(5.0, True)][0] == pytest.approx(out[(5.0, False)][0], rel=1e-4)
    assert all((a - b).abs().max() <= 1e-4 * a.abs().max() for a, b in zip(out[(5.0, False)][1], out[(5.0, True)][1]))
    assert "motion_weight" not in TrainConfig().trajectory()  # off: old checkpoints still resume
    assert TrainConfig(motion_weight=2.0).trajectory()["motion_weight"] == 2.0
    with pytest.raises(TrainingError, match="motion_weight must be >= 0"):
        TrainConfig(motion_weight=-1.0)


@pytest.mark.parametrize("stage", ["dpo-lora", "dpo-head"])
def test_motion_weight_weighs_flow_dpo_by_the_pairs_map_batched_and_split(stage):
    """Flow-DPO with motion weighting: winner and loser errors weighed by one map per pair
    (losses.pair_motion_weights); a different loss from the uniform one, the same batched and split."""
    data = pairs(3)
    out = {}
    for mw, split in ((0.0, False), (5.0, False), (5.0, True)):
        den, enc = setup()
        if stage == "dpo-lora":
            with torch.no_grad():
                for p in den.lora_parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        tr = StageTrainer(stage, den, enc, data, TrainConfig(steps=1, lr=1e-3, batch_size=2, seed=4, beta=50.0,
                                                             motion_weight=mw, split_passes=split))
        if stage == "dpo-head":  # the head moved away from its frozen reference copy
            with torch.no_grad():
                for p in enc.head.parameters():
                    p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
        loss, logs = first_step(tr, split)
        out[(mw, split)] = (float(loss.detach()), logs, [p.grad.clone() for p in tr.params if p.grad is not None])
    assert out[(5.0, False)][0] != pytest.approx(out[(0.0, False)][0], rel=1e-4)
    assert out[(5.0, True)][0] == pytest.approx(out[(5.0, False)][0], rel=1e-4)
    assert out[(5.0, True)][1]["margin"] == pytest.approx(out[(5.0, False)][1]["margin"], rel=1e-3)
    g_batched, g_split = out[(5.0, False)][2], out[(5.0, True)][2]
    assert len(g_batched) == len(g_split) > 0
    assert all((a - b).abs().max() <= 1e-4 * a.abs().max() for a, b in zip(g_batched, g_split))
