"""The diffusers Wan backend and the Denoiser protocol's conventions."""

import pytest
import torch

from physmaster.backends.diffusers_wan import (LoraTargetError, WanDenoiser, load_wan_transformer,
                                               make_i2v_condition, make_tiny_wan, tiny_wan_config)
from physmaster.errors import CheckpointError, WidthMismatchError
from physmaster.training import Conditioning, X0Denoiser, velocity_from_x0

C, T, H, W, D = 4, 3, 8, 8, 32


def cond(b=2, seed=0, tokens=0):
    g = torch.Generator().manual_seed(seed)
    c = Conditioning(context=torch.randn(b, 5, D, generator=g),
                     image_cond=make_i2v_condition(torch.randn(b, C, H, W, generator=g), T))
    if tokens:
        c = c.with_tokens(torch.randn(1, tokens, D, generator=g))
    return c


def test_i2v_condition_layout():
    first = torch.randn(2, C, H, W)
    ic = make_i2v_condition(first, T)
    assert ic.shape == (2, 4 + C, T, H, W)
    assert torch.all(ic[:, :4, 0] == 1) and torch.all(ic[:, :4, 1:] == 0)
    assert torch.equal(ic[:, 4:, 0], first) and torch.all(ic[:, 4:, 1:] == 0)
    assert tiny_wan_config(latent_channels=16)["in_channels"] == 36  # Wan 2.1 I2V: 2*16+4


def test_save_pretrained_round_trip_and_velocity(tmp_path):
    model = make_tiny_wan(0, latent_channels=C, text_dim=D)
    model.save_pretrained(tmp_path / "m")
    den = WanDenoiser.from_pretrained(tmp_path / "m")
    x = torch.randn(2, C, T, H, W)
    t = torch.tensor([0.25, 0.75])
    c = cond(tokens=3)
    assert c.context.shape == (2, 8, D) and c.num_physical_tokens == 3
    with torch.no_grad():
        v = den.predict_velocity(x, t, c)
        ref = model(hidden_states=torch.cat([x, c.image_cond], 1), timestep=t * 1000,
                    encoder_hidden_states=c.context, return_dict=False)[0]
    assert v.shape == x.shape
    torch.testing.assert_close(v, ref)
    # the tokens reach the model: other tokens, other velocity
    with torch.no_grad():
        v2 = den.predict_velocity(x, t, cond(tokens=3, seed=0).with_tokens(torch.ones(1, 1, D)))
    assert v2.shape == x.shape and not torch.allclose(v2, v)
    # the repo-root layout (transformer/ subfolder) is found too
    model.save_pretrained(tmp_path / "repo" / "transformer")
    assert load_wan_transformer(tmp_path / "repo").config.in_channels == 2 * C + 4


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_wan_transformer(tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "WanTransformer3DModel"}')
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_wan_transformer(tmp_path)


def test_shape_errors_are_clear():
    den = WanDenoiser(make_tiny_wan(0, latent_channels=C, text_dim=D))
    x = torch.randn(2, C, T, H, W)
    bad = Conditioning(context=torch.randn(2, 5, D))
    with pytest.raises(WidthMismatchError, match="mask \\+ first-frame latent"):
        den.predict_velocity(x, torch.rand(2), bad)
    with pytest.raises(WidthMismatchError, match="text_dim"):
        den.predict_velocity(x, torch.rand(2), Conditioning(context=torch.randn(2, 5, D + 1),
                                                            image_cond=cond().image_cond))


def test_lora_switch_fold_and_file(tmp_path):
    den = WanDenoiser(make_tiny_wan(0, latent_channels=C, text_dim=D))
    x, t, c = torch.randn(2, C, T, H, W), torch.tensor([0.3, 0.6]), cond()
    with torch.no_grad():
        base = den.predict_velocity(x, t, c)
    den.add_lora(4, targets=["to_q", "to_v", "proj_out"], seed=1)
    assert len(den.lora_parameters()) == 2 * (2 * 2 * 2 + 1)
    with torch.no_grad():
        for n, p in den.named_lora_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
        with_lora = den.predict_velocity(x, t, c)
        with den.lora_disabled():
            off = den.predict_velocity(x, t, c)
    assert not torch.allclose(with_lora, base, atol=1e-3)
    torch.testing.assert_close(off, base)  # no copy: the same weights with the adapter switched off
    den.save_lora(tmp_path / "l.safetensors")
    den2 = WanDenoiser(make_tiny_wan(0, latent_channels=C, text_dim=D))
    den2.load_lora(tmp_path / "l.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(den2.predict_velocity(x, t, c), with_lora)
    den.fold_lora(seed=2)  # base += delta; the LoRA restarts at zero delta
    with torch.no_grad():
        torch.testing.assert_close(den.predict_velocity(x, t, c), with_lora, atol=1e-5, rtol=1e-4)
        with den.lora_disabled():
            torch.testing.assert_close(den.predict_velocity(x, t, c), with_lora, atol=1e-5, rtol=1e-4)


def test_lora_target_error_names_targets_and_modules():
    den = WanDenoiser(make_tiny_wan(0, latent_channels=C, text_dim=D))
    with pytest.raises(LoraTargetError) as e:
        den.add_lora(4, targets=["q_proj", "to_q"])
    assert "q_proj" in str(e.value) and "attn1.to_q" in str(e.value) and "ffn.net.2" in str(e.value)


def test_x0_denoiser_converts_to_velocity():
    """A host that predicts x0 (ComfyUI's apply_model) gives v = (x_t - x0_hat) / t, the flow target."""
    x0, eps = torch.randn(3, C, T, H, W), torch.randn(3, C, T, H, W)

    class Oracle(X0Denoiser):
        module = torch.nn.Linear(1, 1)

        def predict_x0(self, x_t, t, cond):
            return x0

        def lora_parameters(self):
            return []

        def lora_disabled(self):
            import contextlib
            return contextlib.nullcontext()

    den = Oracle()
    t = torch.tensor([0.1, 0.5, 1.0])
    x_t = den.add_noise(x0, eps, t)
    torch.testing.assert_close(x_t[1], 0.5 * x0[1] + 0.5 * eps[1])
    v = den.predict_velocity(x_t, t, None)
    torch.testing.assert_close(v, den.velocity_target(x0, eps, t), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(velocity_from_x0(x_t, x0, t), eps - x0, atol=1e-5, rtol=1e-5)


def test_lora_file_is_in_comfyui_wan_layout_and_diffusers_reads_it(tmp_path):
    """The LoRA file uses the original Wan / ComfyUI module names with an alpha: ComfyUI's delta
    (alpha / rank) * up @ down equals peft's, and diffusers' own Wan LoRA converter maps every key back."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_wan_lora_to_diffusers
    from safetensors.torch import load_file

    from physmaster.backends.diffusers_wan import diffusers_module_name, original_module_name

    den = WanDenoiser(make_tiny_wan(0, latent_channels=C, text_dim=D, image_dim=24))
    den.add_lora(2, alpha=6.0, targets=["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj", "ffn.net.2"],
                 seed=1)
    with torch.no_grad():
        for n, p in den.named_lora_parameters():
            p.normal_(0, 0.1)
    den.save_lora(tmp_path / "l.safetensors")
    sd = load_file(str(tmp_path / "l.safetensors"))
    assert all(k.startswith("diffusion_model.blocks.") for k in sd)
    key = "diffusion_model.blocks.0.self_attn.q"
    delta = sd[f"{key}.alpha"] / sd[f"{key}.lora_A.weight"].shape[0] * (sd[f"{key}.lora_B.weight"] @
                                                                        sd[f"{key}.lora_A.weight"])
    layer = den.model.blocks[0].attn1.to_q
    torch.testing.assert_close(delta, layer.get_delta_weight("physmaster"))
    converted = {k.removeprefix("transformer."): v for k, v in
                 _convert_non_diffusers_wan_lora_to_diffusers(dict(sd)).items()}
    own = {f"{n.replace('.physmaster', '')}" for n, _ in den.named_lora_parameters()}
    assert set(converted) == own
    fresh = make_tiny_wan(0, latent_channels=C, text_dim=D, image_dim=24)
    names = [n for n, m in fresh.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(names) > 20 and all(diffusers_module_name(original_module_name(n)) == n for n in names)
