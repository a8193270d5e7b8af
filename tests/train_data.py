"""Training data as ComfyUI writes it, for the train CLI tests: a picker preference dataset and a video set, with
the conditioning keys a Wan I2V graph stores (concat_latent_image, concat_mask, CLIP vision output, features)."""

from __future__ import annotations

from pathlib import Path

import torch

from physmaster.backends.diffusers_wan import make_tiny_wan
from physmaster.encoder import load_encoder
from physmaster.preferences import PreferenceDataset
from physmaster.videoset import VideoDataset

C, T, H, W, D = 4, 2, 8, 8, 32  # latent channels, frames, height, width; text context width
F = 24  # backbone feature width


def write_model(path, image_dim=None):
    make_tiny_wan(0, latent_channels=C, text_dim=D, image_dim=image_dim).save_pretrained(path)
    return path


def conditioning(seed: int, width: int = D, channels: int = C, clip: int | None = None):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(1, 6, width, generator=g)
    mask = torch.ones(1, 1, T, H, W)
    mask[:, :, 0] = 0.0  # WanImageToVideo: 0 where the start image is given
    extras = {"cond.concat_latent_image": torch.randn(1, channels, T, H, W, generator=g), "cond.concat_mask": mask,
              "features": torch.randn(1, 5, F, generator=g)}
    if clip:
        extras["clip_vision.penultimate_hidden_states"] = torch.randn(1, 7, clip, generator=g)
    return context, extras


def write_preferences(root, name="prefs", groups=2, width=D, channels=C, clip=None) -> PreferenceDataset:
    """`groups` groups of 3 candidates, each ranked (3 human pairs per group)."""
    ds = PreferenceDataset.open(root, name, create=True)
    for i in range(groups):
        g = torch.Generator().manual_seed(100 + i)
        context, extras = conditioning(i, width, channels, clip)
        latents = torch.randn(3, channels, T, H, W, generator=g)
        ds.add_group_with_pairs(latents, context, [(0, 1), (0, 2), (2, 1)], "human", extras, meta={"prompt": f"p{i}"})
    return ds


def write_videos(root, name="videos", files=2, per_file=2) -> VideoDataset:
    vs = VideoDataset.open(root, name, create=True)
    for i in range(files):
        g = torch.Generator().manual_seed(200 + i)
        context, extras = conditioning(10 + i)
        vs.add_videos(torch.randn(per_file, C, T, H, W, generator=g), context, extras)
    return vs


# The tolerance of every comparison of 2 processes x batch b with 1 process x batch 2b. The gradients differ by float
# rounding only (sums in another order). The *tokens* the trained heads emit agree to TOKENS_ATOL; the weights to
# ATOL: a weight whose true gradient is exactly 0 (an attention key bias: softmax ignores a shift) gets pure rounding
# noise (~1e-10) that Adam scales to lr * noise / eps ~ 3e-5 per step, which no token sees. The heads move ~1e-2.
ATOL, RTOL = 1e-3, 1e-3
TOKENS_ATOL, TOKENS_RTOL = 1e-5, 1e-4


def assert_same_head(out_a, out_b):
    """The same trained head: the same tokens on the data's features, and the same weights (see ATOL)."""
    a, b = (load_encoder(Path(o) / "encoder.safetensors") for o in (out_a, out_b))
    features = torch.cat([conditioning(i)[1]["features"] for i in range(4)])
    with torch.no_grad():
        torch.testing.assert_close(a.head(features), b.head(features), atol=TOKENS_ATOL, rtol=TOKENS_RTOL)
    assert_same(a.head.state_dict(), b.head.state_dict())


def assert_same(a: dict, b: dict, atol: float = ATOL):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=RTOL, msg=lambda m: f"{k}: {m}")
