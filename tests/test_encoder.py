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


# -- a file's claims are checked before anything is allocated for them (issue 9, item 5) ----------------------------
class _LargestAllocation:
    """Records the largest tensor storage any torch op makes (meta tensors excluded) while active."""

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        outer = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in torch.utils._pytree.tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        outer.largest = max(outer.largest, t.untyped_storage().nbytes())
                return out

        self.largest = 0
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)


def _forged(tmp_path, config_text, name="forged.safetensors"):
    """A small real encoder file whose physmaster.config is replaced by `config_text`."""
    enc = PhysEncoder.new(SMALL)
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in enc.head.state_dict().items()}, str(path),
              metadata={CONFIG_KEY: config_text})
    return path


def _config_text(**overrides):
    data = json.loads(SMALL.to_json())
    data.update(overrides)
    return json.dumps(data)


def test_tracker_sees_a_real_head_being_built():
    with _LargestAllocation() as alloc:
        PhysHead(HeadConfig(in_dim=48, context_dim=512, hidden_dim=1024, heads=4))
    assert alloc.largest >= 512 * 1024 * 4  # out_proj.weight: the tracker would see the old load_encoder's head


@pytest.mark.parametrize("field, value, want", [
    ("num_tokens", 10**7, "num_tokens must be a whole number 1..4096, got 10000000"),
    ("depth", 10**6, "depth must be a whole number 1..64, got 1000000"),
    ("hidden_dim", 2**40, "hidden_dim must be a whole number 1..16384"),
    ("context_dim", 10**40, "context_dim must be a whole number 1..65536, got a huge number"),
])
def test_absurd_config_fails_fast_without_allocating(field, value, want, tmp_path):
    import time

    path = _forged(tmp_path, _config_text(**{field: value}))
    assert path.stat().st_size < 200_000
    start = time.perf_counter()
    with _LargestAllocation() as alloc, pytest.raises(CheckpointError) as e:
        load_encoder(path)
    assert time.perf_counter() - start < 2.0
    assert alloc.largest < 1 << 20
    assert str(e.value).startswith("forged.safetensors: ") and want in str(e.value)


def test_config_within_bounds_is_checked_against_the_header_before_allocating(tmp_path):
    # a real head of this config would take 16 MB per weight matrix; the file holds SMALL's 5-token head
    path = _forged(tmp_path, _config_text(num_tokens=4096, hidden_dim=1024, heads=4, context_dim=4096))
    with _LargestAllocation() as alloc, pytest.raises(CheckpointError) as e:
        load_encoder(path)
    assert alloc.largest < 1 << 20
    assert "forged.safetensors: weights do not match its physmaster.config: wrong shapes" in str(e.value)
    assert "blocks.0.mlp.0.weight [128, 32] (config says [4096, 1024])" in str(e.value)


@pytest.mark.parametrize("text, want", [
    (_config_text().replace('"mlp_ratio": 4.0', '"mlp_ratio": 1e999'),
     "mlp_ratio must be a number > 0 and <= 64.0, got inf"),
    (_config_text(mlp_ratio=0.001), "mlp_ratio 0.001 leaves the MLP of a 32-wide head no width"),
    (_config_text(init_gain="abc"), "init_gain must be a finite number, got 'abc'"),
    (_config_text().replace('"init_gain": 0.1', '"init_gain": NaN'), "NaN is not allowed"),
    (_config_text(format_version="1"), "format_version must be a whole number >= 1, got '1'"),
    (_config_text(format_version=True), "format_version must be a whole number >= 1, got True"),
    (_config_text(depth=True), "depth must be a whole number 1..64, got True"),
    (_config_text(num_tokens=5.0), "num_tokens must be a whole number 1..4096, got 5.0"),
    (_config_text(feature=["last"]), "feature must be one of penultimate, last, penultimate+last, got a JSON list"),
    (_config_text(backbone=7), "backbone must be a short text"),
    ("[" * 10_000, "nested too deeply"),
    ("{" + " " * 70_000 + "}", "at most 65536 characters"),
])
def test_bad_config_values_name_the_file_and_field(text, want, tmp_path):
    with pytest.raises(CheckpointError) as e:
        load_encoder(_forged(tmp_path, text))
    assert str(e.value).startswith("forged.safetensors: ") and want in str(e.value), str(e.value)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(bad, tmp_path):
    enc = PhysEncoder.new(SMALL)
    with torch.no_grad():
        enc.head.blocks[1].mlp[0].weight[3, 4] = bad
    path = save_encoder(enc, tmp_path / "diverged.safetensors")
    with pytest.raises(CheckpointError, match=r"diverged.safetensors: weights \['blocks.1.mlp.0.weight'\] hold NaN"):
        load_encoder(path)


def test_integer_weights_are_refused(tmp_path):
    enc = PhysEncoder.new(SMALL)
    tensors = {k: v.contiguous() for k, v in enc.head.state_dict().items()}
    tensors["gain"] = torch.tensor(1, dtype=torch.int64)
    path = tmp_path / "ints.safetensors"
    save_file(tensors, str(path), metadata={CONFIG_KEY: SMALL.to_json()})
    with pytest.raises(CheckpointError, match=r"ints.safetensors: weights \['gain'\] are I64, not floating point"):
        load_encoder(path)


def test_weight_shapes_match_a_real_head_and_loaded_weights_train():
    assert SMALL.weight_shapes() == {k: tuple(v.shape) for k, v in PhysHead(SMALL).state_dict().items()}


def test_loaded_head_is_trainable(tmp_path):
    path = save_encoder(PhysEncoder.new(SMALL, seed=2), tmp_path / "enc.safetensors")
    head = load_encoder(path).head
    params = list(head.parameters())
    assert params and all(isinstance(p, torch.nn.Parameter) and p.requires_grad and p.dtype == torch.float32
                          for p in params)
    assert len(params) == len(PhysHead(SMALL).state_dict())
    head(torch.randn(1, 7, 48)).pow(2).mean().backward()
    assert all(p.grad is not None for p in params)
