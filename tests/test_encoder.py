import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from physmaster.encoder import (
    CONFIG_KEY,
    HeadConfig,
    PhysEncoder,
    PhysHead,
    load_encoder,
    save_encoder,
    select_features,
)
from physmaster.errors import CheckpointError, WidthMismatchError

SMALL = HeadConfig(in_dim=48, context_dim=64, num_tokens=5, hidden_dim=32, depth=2, heads=4)


def test_head_shapes_and_token_count():
    head = PhysHead.create(SMALL, seed=0)
    out = head(torch.randn(3, 17, 48))
    assert out.shape == (3, 5, 64)
    assert torch.isfinite(out).all()
    # the token count does not depend on the number of patch tokens
    assert head(torch.randn(1, 1370, 48)).shape == (1, 5, 64)


def test_init_is_deterministic_by_seed_and_ignores_global_rng():
    torch.manual_seed(123)
    a = PhysHead.create(SMALL, seed=7)
    torch.manual_seed(999)
    b = PhysHead.create(SMALL, seed=7)
    c = PhysHead.create(SMALL, seed=8)
    for (k, va), vb, vc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(va, vb), k
    assert any(not torch.equal(va, vc) for va, vc in zip(a.state_dict().values(), c.state_dict().values()))


def test_initial_gain_keeps_tokens_small():
    head = PhysHead.create(HeadConfig(in_dim=48, context_dim=256), seed=0)
    tokens = head(torch.randn(2, 50, 48) * 3)
    rms = tokens.pow(2).mean().sqrt().item()
    assert 0.01 < rms < 0.5, rms


def test_multi_layer_features_are_mixed():
    cfg = HeadConfig(in_dim=48, context_dim=64, num_tokens=3, hidden_dim=32, heads=4, feature="penultimate+last")
    head = PhysHead.create(cfg, seed=0)
    assert head(torch.randn(2, 2, 10, 48)).shape == (2, 3, 64)
    with pytest.raises(WidthMismatchError, match=r"\[B, 2, P, C\]"):
        head(torch.randn(2, 10, 48))


def test_width_mismatch_names_backbone():
    head = PhysHead.create(HeadConfig(in_dim=1280, context_dim=64, hidden_dim=32, heads=4, backbone="clip_vision_h"))
    with pytest.raises(WidthMismatchError) as e:
        head(torch.randn(1, 257, 1024))
    msg = str(e.value)
    assert "1024" in msg and "1280" in msg and "clip_vision_h" in msg and "CLIPVisionLoader" in msg


def test_head_trains():
    head = PhysHead.create(SMALL, seed=0)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    x, target = torch.randn(4, 9, 48), torch.randn(4, 5, 64)
    first = None
    for _ in range(30):
        loss = (head(x) - target).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_select_features():
    out = {"penultimate_hidden_states": torch.ones(1, 4, 8), "last_hidden_state": torch.zeros(1, 4, 8)}
    assert select_features(out, "penultimate").sum() == 32
    assert select_features(out, "last").sum() == 0
    assert select_features(out, "penultimate+last").shape == (1, 2, 4, 8)
    with pytest.raises(WidthMismatchError, match="CLIPVisionEncode"):
        select_features({"last_hidden_state": torch.zeros(1, 4, 8)}, "penultimate")


def test_save_load_roundtrip(tmp_path):
    enc = PhysEncoder.new(SMALL, seed=3)
    enc.provenance["stages"].append({"stage": "sft", "steps": 10})
    path = save_encoder(enc, tmp_path / "enc.safetensors")
    loaded = load_encoder(path)
    assert loaded.config == SMALL
    assert loaded.provenance["stages"] == [{"stage": "sft", "steps": 10}]
    x = torch.randn(2, 7, 48)
    assert torch.equal(loaded.encode(x), enc.encode(x))
    assert loaded.encoder_id.split(":")[1] == enc.encoder_id.split(":")[1]
    assert [p.name for p in tmp_path.iterdir()] == ["enc.safetensors"]  # no temp files left


def test_config_version_and_fields_validated():
    with pytest.raises(CheckpointError, match="newer"):
        HeadConfig(in_dim=8, format_version=99)
    with pytest.raises(CheckpointError, match="multiple of heads"):
        HeadConfig(in_dim=8, hidden_dim=30, heads=4)
    with pytest.raises(CheckpointError, match="unknown fields"):
        HeadConfig.from_json(json.dumps({"in_dim": 8, "wings": 2}))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="not found.*models/physmaster"):
        load_encoder(tmp_path / "nope.safetensors")


def test_truncated_file_is_named(tmp_path):
    path = save_encoder(PhysEncoder.new(SMALL), tmp_path / "enc.safetensors")
    data = path.read_bytes()
    bad = tmp_path / "cut.safetensors"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_encoder(bad)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="garbage.safetensors"):
        load_encoder(garbage)


def test_non_physmaster_safetensors(tmp_path):
    path = tmp_path / "lora.safetensors"
    save_file({"lora_A.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(CheckpointError, match="not a PhysMaster encoder"):
        load_encoder(path)


def test_weights_not_matching_config(tmp_path):
    enc = PhysEncoder.new(SMALL)
    tensors = dict(enc.head.state_dict())
    tensors["out_proj.weight"] = torch.zeros(10, 32)
    del tensors["gain"]
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={CONFIG_KEY: SMALL.to_json()})
    with pytest.raises(CheckpointError) as e:
        load_encoder(path)
    assert "missing ['gain']" in str(e.value) and "out_proj.weight [10, 32]" in str(e.value)


def test_failed_save_keeps_old_file(tmp_path, monkeypatch):
    path = save_encoder(PhysEncoder.new(SMALL, seed=1), tmp_path / "enc.safetensors")
    before = path.read_bytes()
    import safetensors.torch

    def boom(*a, **k):
        with open(a[1], "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_encoder(PhysEncoder.new(SMALL, seed=2), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["enc.safetensors"]


def test_header_length_lie_is_reported(tmp_path):
    bad = tmp_path / "lie.safetensors"
    bad.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(CheckpointError, match="lie.safetensors"):
        load_encoder(bad)


def test_saved_file_has_default_permissions(tmp_path):
    import os
    import stat

    path = save_encoder(PhysEncoder.new(SMALL), tmp_path / "enc.safetensors")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_encoder_id_follows_weight_changes():
    enc = PhysEncoder.new(SMALL, seed=1)
    first = enc.encoder_id
    assert enc.encoder_id == first  # cached
    with torch.no_grad():
        enc.head.gain.add_(1.0)  # an in-place update, as an optimizer step does
    assert enc.encoder_id != first
    other = PhysEncoder.new(SMALL, seed=1)
    assert other.encoder_id == first


def test_encoder_id_of_a_head_made_in_inference_mode():
    with torch.inference_mode():
        enc = PhysEncoder.new(SMALL, seed=1)
        inside = enc.encoder_id
    assert enc.encoder_id == inside == PhysEncoder.new(SMALL, seed=1).encoder_id
