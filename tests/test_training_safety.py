"""Issue 9, core side of the training items: non-finite data skipped and named (10), group checks from the file
headers by physmaster.preferences, as the Dataset and train nodes use them (11), plottable loss maps for stopped
runs (9), provenance that says what each file holds (1)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from physmaster.preferences import PreferenceDataset
from physmaster.training import (DataError, PreferencePair, PreferenceSet, StageTrainer, TrainConfig,
                                 TrainResult, VideoSample, VideoSet, describe_skips, nonfinite_group,
                                 plottable_losses, record_stage, stage_entry)
from test_training import C, D, H, T, W, make_cond, setup

NAN, INF = float("nan"), float("inf")


def _pair(g, group, **poison):
    cond = make_cond(g)
    winner, loser = torch.randn(C, T, H, W, generator=g), torch.randn(C, T, H, W, generator=g)
    if "latents" in poison:
        loser[0, 0, 0, 0] = poison["latents"]
    if "context" in poison:
        cond.context[0, 1, 2] = poison["context"]
    if "features" in poison:
        cond.features[0, 0, 0] = poison["features"]
    if "extra" in poison:
        cond.extra["kw.clip_fea"] = torch.full((1, 3), poison["extra"])
    return PreferencePair(cond, winner, loser, group=group)


def test_nonfinite_features_context_or_image_cond_skip_the_pair_and_name_its_group():
    g = torch.Generator().manual_seed(0)
    items = [_pair(g, "a" * 32), _pair(g, "b" * 32, latents=NAN), _pair(g, "c" * 32, features=NAN),
             _pair(g, "c" * 32, features=INF), _pair(g, "d" * 32, context=-INF), _pair(g, "e" * 32, extra=NAN),
             _pair(g, "f" * 32)]
    ps = PreferenceSet(items)
    assert len(ps) == 2 and ps.skipped == {"non-finite": 5}
    text = ps.skip_summary()
    assert text.startswith("5 skipped: ")
    assert "non-finite latents in group bbbbbbbb" in text
    assert "non-finite features in group cccccccc (2 pairs)" in text
    assert "non-finite text context in group dddddddd" in text
    assert "non-finite image conditioning (clip_fea) in group eeeeeeee" in text
    # all unusable: one error that names every reason, not a crash at step 1
    with pytest.raises(DataError) as err:
        PreferenceSet(items[1:6])
    assert "no usable pairs" in str(err.value) and "features in group cccccccc" in str(err.value)


def test_nonfinite_videos_are_skipped_and_named_too():
    g = torch.Generator().manual_seed(1)
    good = VideoSample(torch.randn(C, T, H, W, generator=g), make_cond(g), "v0")
    bad_ctx = make_cond(g)
    bad_ctx.context[0, 0, 0] = NAN
    lat = torch.randn(C, T, H, W, generator=g)
    lat[1, 1, 1, 1] = INF
    vs = VideoSet([good, VideoSample(torch.randn(C, T, H, W, generator=g), bad_ctx, "v1"),
                   VideoSample(lat, make_cond(g), "v2")])
    assert len(vs) == 1 and "non-finite text context in video v1" in vs.skip_summary()
    assert "non-finite latent in video v2" in vs.skip_summary()
    with pytest.raises(DataError, match="no usable video"):
        VideoSet([VideoSample(lat, make_cond(g), "v2")])


def test_nonfinite_group_names_shared_parts_and_bad_candidates():
    lat = torch.randn(4, C, T, H, W)
    lat[2, 0, 0, 0, 0] = NAN
    feats = torch.randn(1, 5, 16)
    feats[0, 0, 0] = INF
    parts, bad = nonfinite_group({"latents": lat, "context": torch.randn(1, 4, D), "features": feats,
                                  "cond.concat_latent_image": torch.full((1, 2), NAN),
                                  "cond.attention_mask": torch.ones(1, 4, dtype=torch.long)})
    assert parts == ["features", "image conditioning (concat_latent_image)"] and bad == {2}
    assert describe_skips([]) == ""


def _dataset(tmp_path):
    ds = PreferenceDataset.open(tmp_path, "screen", create=True)
    good = ds.add_group(torch.randn(3, C, T, H, W), torch.randn(1, 4, D), extras={"features": torch.randn(1, 6, 16)})
    ds.add_pair(good, 0, 1, "human")
    ds.add_pair(good, 2, 1, "human")
    short = ds.add_group(torch.randn(3, C, T, H, W), torch.randn(1, 4, D))
    ds.add_pair(short, 2, 0, "human")
    ds.add_pair(short, 1, 0, "judge")
    other = ds.add_group(torch.randn(3, C, T, H, W), torch.randn(1, 4, D))
    ds.add_pair(other, 1, 2, "human")
    return ds, good, short, other


def _rewrite(ds, group, **tensors):
    path = ds.group_path(group)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        data = {k: f.get_tensor(k) for k in f.keys()}
    data.update(tensors)
    save_file(data, str(path), metadata=meta)


def test_group_checks_from_headers_skip_tampered_groups_naming_group_and_file(tmp_path):
    ds, good, short, other = _dataset(tmp_path)
    _rewrite(ds, short, latents=torch.randn(2, C, T, H, W))  # fewer latents than its metadata says
    _rewrite(ds, other, latents=torch.randn(3, C, T, H, W + 8))  # another latent shape
    pairs, stats = ds.read_pairs()  # the Dataset node's read: physmaster.preferences checks every group's header
    assert sorted((p.group, p.winner) for p in pairs) == [(good, 0), (good, 2)]
    report = stats.group_report()  # one sentence per bad group, naming group and file, with the pairs it costs
    assert len(report) == 2
    text = " | ".join(report)
    assert (f"group file groups/{short}.safetensors in dataset 'screen' holds 2 candidate latents but its metadata "
            "says 3 candidates: its 2 pairs skipped") in text
    assert (f"group file groups/{other}.safetensors in dataset 'screen': its latents are shaped "
            f"[{C}, {T}, {H}, {W + 8}] per candidate, but the dataset's are [{C}, {T}, {H}, {W}]: its 1 pair skipped") \
        in text


def test_groups_changed_after_reading_are_caught_before_training_loads_them(tmp_path):
    """The train node checks its pairs' groups again (`screen_pairs`) just before loading them."""
    ds, good, short, other = _dataset(tmp_path)
    pairs, stats = ds.read_pairs()
    assert len(pairs) == 5 and stats.bad_groups == {}
    # after the read: `short` rewritten with 2 candidates (consistent metadata) while its pairs use candidate 2,
    # `other` replaced by something that is not a safetensors
    path = ds.group_path(short)
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["physmaster.group"])
        data = {k: f.get_tensor(k) for k in f.keys()}
    data["latents"] = data["latents"][:2].clone()
    save_file(data, str(path), metadata={"physmaster.group": json.dumps({**meta, "candidates": 2})})
    ds.group_path(other).write_bytes(b"junk")
    kept, problems = ds.screen_pairs(pairs)
    assert sorted((p.group, p.winner) for p in kept) == [(good, 0), (good, 2)]
    assert len(problems) == 2
    assert (f"group file groups/{short}.safetensors in dataset 'screen' holds 2 candidates but its pairs use "
            "candidate 2: its 2 pairs skipped") in problems
    assert any("unreadable" in p and other in p and p.endswith("its 1 pair skipped") for p in problems), problems
    # a group file that is gone is named too, not a crash
    ds.group_path(other).unlink()
    kept, problems = ds.screen_pairs(pairs)
    assert len(kept) == 2 and any(f"group {other} is missing" in p for p in problems), problems
    assert ds.screen_pairs([p for p in pairs if p.group == good]) == ([p for p in pairs if p.group == good], [])


def test_loss_maps_are_always_plottable_by_core_lossgraph():
    assert plottable_losses([0.69, 0.5, 0.4]) == [0.69, 0.5, 0.4]
    assert plottable_losses([0.69, NAN]) == [0.0, 0.69]  # stopped at step 2: drawn from a 0 baseline
    assert plottable_losses([]) == [0.0, 1.0]  # stopped at step 1: nothing finished
    assert plottable_losses([NAN, INF]) == [0.0, 1.0]
    assert plottable_losses([0.3, 0.3]) == [0.0, 0.3, 0.3]
    for values in ([], [0.7], [0.0], [NAN], [0.2, 0.2, 0.2]):
        out = plottable_losses(values)
        assert len(out) >= 2 and max(out) > min(out) and all(math.isfinite(v) for v in out)


def test_a_run_stopped_at_step_one_says_why_and_keeps_the_start_weights():
    g = torch.Generator().manual_seed(3)
    data = PreferenceSet([_pair(g, "a" * 32), _pair(g, "b" * 32)])
    den, enc = setup()
    before = {k: v.clone() for k, v in enc.head.state_dict().items()}
    tr = StageTrainer("dpo-head", den, enc, data, TrainConfig(steps=5, lr=1e-3))
    tr._loss_hook = lambda step, loss: loss * NAN
    res = tr.run()
    assert res.steps_done == 0 and res.stopped.startswith("stopped at step 1") and res.loss_map == {}
    assert all(torch.equal(before[k], v) for k, v in enc.head.state_dict().items())
    entry = record_stage(enc, res, TrainConfig(steps=5, lr=1e-3))
    assert entry["steps"] == 0 and entry["steps_planned"] == 5 and "step 1" in entry["stopped"]
    assert entry["trains"] == "head" and entry["interrupted"] is False


def test_stage_entries_say_what_each_file_holds():
    cfg = TrainConfig(steps=30, lr=1e-3, beta=100.0)
    lora_cut = stage_entry("dpo-lora", 7, cfg, interrupted=True, lora_file="physmaster_interrupted/x_00001_.safetensors")
    assert lora_cut["trains"] == "dit lora" and lora_cut["steps"] == 7 and lora_cut["steps_planned"] == 30
    assert lora_cut["interrupted"] and lora_cut["lora_file"].endswith("x_00001_.safetensors")
    head = stage_entry("dpo-head", 30, cfg)
    assert head["trains"] == "head" and "lora_file" not in head and head["beta"] == 100.0
    assert stage_entry("sft", 3, cfg)["trains"] == "head and dit lora"
    assert json.loads(json.dumps(lora_cut)) == lora_cut
    enc = setup(lora=False)[1]
    record_stage(enc, TrainResult("dpo-lora", 30), cfg, lora_file="a.safetensors")
    assert enc.provenance["stages"][-1]["lora_file"] == "a.safetensors"
