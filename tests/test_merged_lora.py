"""LoRA linears that multiply through the merged weight when it is cheaper (physmaster/backends/merged_lora.py)."""

import pytest
import torch
from torch import nn

from physmaster.backends import merged_lora
from physmaster.backends.diffusers_wan import WanDenoiser, make_i2v_condition, make_tiny_wan
from physmaster.backends.merged_lora import merged_when_cheaper, use_merged_weight
from physmaster.training import Conditioning

C, T, H, W, D = 4, 3, 8, 8, 32


def _den(rank=32):
    den = WanDenoiser(make_tiny_wan(0, latent_channels=C, text_dim=D, heads=2, head_dim=32, ffn_dim=128))
    den.add_lora(rank, targets=["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "proj_out"], seed=1)
    with torch.no_grad():
        for n, p in den.named_lora_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    return den


def _inputs(b=4):
    g = torch.Generator().manual_seed(3)
    c = Conditioning(context=torch.randn(b, 5, D, generator=g),
                     image_cond=make_i2v_condition(torch.randn(b, C, H, W, generator=g), T))
    return torch.randn(b, C, T, H, W, generator=g), torch.rand(b, generator=g), c


def _run(den, monkeypatch, rule):
    """Velocity and LoRA gradients with `rule` deciding each layer's path; returns them and the decisions."""
    decisions = []

    def spy(*args):
        decisions.append(rule(*args))
        return decisions[-1]

    monkeypatch.setattr(merged_lora, "use_merged_weight", spy)
    den.model.zero_grad(set_to_none=True)
    x, t, c = _inputs()
    v = den.predict_velocity(x, t, c)
    (v * torch.linspace(-1, 1, v.numel()).view_as(v)).sum().backward()
    grads = {n: p.grad.clone() for n, p in den.named_lora_parameters()}
    return v.detach(), grads, decisions


def test_merged_path_is_the_same_function_and_gradients_as_peft(monkeypatch):
    den = _den()
    assert merged_when_cheaper(den.model) == 2 * (4 * 2 + 2) + 1  # idempotent: add_lora already covered them all
    v_f, g_f, d_f = _run(den, monkeypatch, lambda *a: False)
    v_m, g_m, d_m = _run(den, monkeypatch, lambda *a: True)
    v_c, g_c, d_c = _run(den, monkeypatch, use_merged_weight)
    assert len(d_f) == len(d_m) == len(d_c) == 21 and not any(d_f) and all(d_m)
    assert 0 < sum(d_c) < 21  # the cost model merges the wide self-attention layers, not the 5-token cross-attention
    assert v_f.abs().mean() > 0.1
    for v, g in ((v_m, g_m), (v_c, g_c)):
        torch.testing.assert_close(v, v_f, atol=1e-5, rtol=1e-4)
        assert g.keys() == g_f.keys() and len(g) == 42
        for n in g:
            scale = g_f[n].abs().max()
            assert scale > 0, n
            assert (g[n] - g_f[n]).abs().max() <= 1e-4 * scale, n  # float rounding of another order of sums


def test_cost_model_merges_small_wide_rank_layers_and_keeps_real_wan_factored():
    # the demo: 16 videos x 128 tokens through 96-wide layers at rank 64
    assert use_merged_weight(2048, 96, 96, 64, adapter_trains=True)
    assert use_merged_weight(2048, 96, 256, 64, adapter_trains=False)
    # Wan 2.1 14B training: 32760 tokens (81 x 480 x 832), 5120 wide, rank 16 or 64: the weight's own gradient
    # (rows x 5120 x 5120) would cost far more than the adapter's detour
    assert not use_merged_weight(32760, 5120, 5120, 16, adapter_trains=True)
    assert not use_merged_weight(32760, 5120, 13824, 64, adapter_trains=True)
    # ... but sampling with it merges (one matmul instead of three)
    assert use_merged_weight(32760, 5120, 5120, 16, adapter_trains=False)
    # a single token never pays for building the weight
    assert not use_merged_weight(1, 96, 96, 4, adapter_trains=False)


def test_adapters_off_dropout_and_other_dtypes_take_pefts_own_path(monkeypatch):
    from peft import LoraConfig, inject_adapter_in_model

    calls = []
    monkeypatch.setattr(merged_lora, "use_merged_weight", lambda *a: calls.append(a) or True)
    dropped = inject_adapter_in_model(LoraConfig(r=8, target_modules=["0"], lora_dropout=0.5),
                                      nn.Sequential(nn.Linear(16, 16)))
    plain = inject_adapter_in_model(LoraConfig(r=8, target_modules=["0"]), nn.Sequential(nn.Linear(16, 32)))
    dora = inject_adapter_in_model(LoraConfig(r=8, target_modules=["0"], use_dora=True),
                                   nn.Sequential(nn.Linear(16, 16)))
    assert merged_when_cheaper(dropped) == merged_when_cheaper(plain) == merged_when_cheaper(dora) == 1
    x = torch.randn(64, 16)
    dropped(x)
    dora(x)
    assert calls == []  # the dropout is peft's to draw; DoRA's magnitude is peft's to apply
    with torch.no_grad():
        plain(x)
    plain(x)
    assert [a[1:] for a in calls] == [(16, 32, 8, False), (16, 32, 8, True)]  # sampling, then training
    calls.clear()
    layer = plain[0]
    layer.enable_adapters(False)
    torch.testing.assert_close(layer(x), layer.get_base_layer()(x))
    layer.enable_adapters(True)
    layer.lora_A["default"].double()
    layer.lora_B["default"].double()
    assert torch.isfinite(layer(x)).all()  # an adapter in another dtype than the base: peft's forward and its casts
    assert calls == []


def test_lora_file_is_unchanged_by_the_class(tmp_path):
    den = _den(8)
    assert type(next(m for m in den.model.modules() if hasattr(m, "lora_A"))).__name__ == \
        "MergedWhenCheaperLoraLinear"
    den.save_lora(tmp_path / "l.safetensors")
    other = WanDenoiser(make_tiny_wan(0, latent_channels=C, text_dim=D, heads=2, head_dim=32, ffn_dim=128))
    other.load_lora(tmp_path / "l.safetensors")
    x, t, c = _inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(other.predict_velocity(x, t, c), den.predict_velocity(x, t, c))


if __name__ == "__main__":
    pytest.main([__file__, "-q"])
