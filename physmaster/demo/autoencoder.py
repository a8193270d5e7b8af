"""A tiny per-frame autoencoder under the video model, as Wan's VAE is under Wan's DiT.

The DiT then models 8x8x8 latents per frame (4x smaller in each spatial direction than the 32x32 frames), and
the decoder, trained only on proxy-world frames, draws what it has learned: whole objects on backgrounds, not
the noisy pixel soup a tiny pixel-space model samples. That is what makes generated videos coherent enough for
the segmenter and PISA's metrics to mean something. Deterministic (no KL): a little noise on the latent while
training keeps the decoder tolerant of the DiT's imprecision, and a small penalty keeps the latents O(1);
`scale`/`shift` (per channel, measured on training frames) normalise them for the flow.
"""

from __future__ import annotations

import torch
from torch import nn

from .fitting import fit

LATENT_CHANNELS = 8
DOWN = 4


class FrameAutoencoder(nn.Module):
    def __init__(self, channels: int = LATENT_CHANNELS, width: int = 32):
        super().__init__()
        w = width
        self.encoder = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, channels, 3, padding=1))
        self.decoder = nn.Sequential(
            nn.Conv2d(channels, 2 * w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(2 * w, w, 4, stride=2, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(w, w, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, 3, 3, padding=1))
        self.register_buffer("shift", torch.zeros(channels))
        self.register_buffer("scale", torch.ones(channels))

    @property
    def channels(self) -> int:
        return int(self.shift.numel())

    def encode_frames(self, pixels: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] in [0, 1] -> raw latents [N, C, H/4, W/4]."""
        return self.encoder(pixels * 2 - 1)

    def decode_frames(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents [N, C, h, w] -> [N, 3, 4h, 4w] in [0, 1]."""
        return torch.sigmoid(self.decoder(z))

    @torch.no_grad()
    def encode_video(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, T, 3, H, W] in [0, 1] -> normalised latents [B, C, T, h, w] (the video model's space)."""
        b, t = pixels.shape[:2]
        z = self.encode_frames(pixels.flatten(0, 1))
        z = (z - self.shift.view(1, -1, 1, 1)) / self.scale.view(1, -1, 1, 1)
        return z.view(b, t, *z.shape[1:]).transpose(1, 2).contiguous()

    @torch.no_grad()
    def decode_video(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, T, h, w] -> [B, T, 3, H, W] in [0, 1]."""
        b, c, t = latents.shape[:3]
        z = latents.transpose(1, 2).flatten(0, 1)
        z = z * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        x = self.decode_frames(z)
        return x.view(b, t, *x.shape[1:])


def train_autoencoder(frames: torch.Tensor, masks: torch.Tensor, steps: int, seed: int = 0, batch: int = 32,
                      lr: float = 3e-3, log=print,
                      targets: torch.Tensor | None = None) -> tuple[FrameAutoencoder, dict]:
    """Fit the autoencoder to frames [N, 3, H, W] in [0, 1]; object pixels (masks [N, H, W]) weigh 10x, so
    the small moving object is drawn sharply. `targets` (same shape as `frames`): what the decoder must draw
    from each frame's latent, when not the frame itself (`--make-base`, the shipped autoencoder: the frame with
    its object drawn plain; `--patterned-objects`: the frame itself).
    Returns the model (normalised) and {steps, final_loss, seconds}."""
    if targets is None:
        targets = frames
    if targets.shape != frames.shape:
        raise ValueError(f"targets must have the frames' shape {tuple(frames.shape)}, got {tuple(targets.shape)}")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ae = FrameAutoencoder()
    weight = 1.0 + 10.0 * masks.float()

    def step_loss():
        idx = torch.randint(0, len(frames), (batch,), generator=g)
        x, y0, w = frames[idx], targets[idx], weight[idx][:, None]
        z = ae.encode_frames(x)
        y = ae.decode_frames(z + 0.1 * torch.randn(z.shape, generator=g))
        err = (y - y0).abs() + 4 * (y - y0).pow(2)
        return (err * w).mean() / w.mean() + 1e-3 * z.pow(2).mean()

    info = fit(ae, step_loss, steps, lr, weight_decay=0.0, warmup=0.05, name="autoencoder", log=log)
    with torch.no_grad():
        z = torch.cat([ae.encode_frames(frames[i:i + 512]) for i in range(0, len(frames), 512)])
        ae.shift.copy_(z.mean((0, 2, 3)))
        ae.scale.copy_(z.std((0, 2, 3)).clamp_min(1e-3))
    return ae, info
