"""The stand-in for PhysMaster's frozen DINOv2 backbone (initialised from Depth Anything V2 in the paper).

What the paper's backbone brings is not "more pixels" but *geometry the video model's latent does not spell
out*: depth, support, scale, material. This stand-in plays that role on the proxy world: a small CNN pretrained
(once, offline; frozen afterwards) to read from one start image the object's position and size, the floor line,
the support under the object (floor or block), the height above it, the time to the first impact and the
material (restitution, which the world shows as a surface pattern). Its hidden states are what a ComfyUI user's
CLIPVisionEncode would give the head: a summary token (the regression MLP's hidden layer, from which every
geometry target is a linear read-out) followed by 4x4 patch tokens of the last feature map (with fixed 2D
positions), [B, 1 + 16, 64]. The physical head learns which of it the DiT needs.

The summary also sees a *pattern* branch: fine-scale (16x16) features max-pooled over the whole image. The
material is a 2-3 px surface pattern wherever the object happens to be; from the flattened 4x4 map alone a
detector has to be learned for each position, and the backbone without this branch read the material in only
54% / 51% of seen / unseen start images (chance 33%), less than the video model's own first-frame latent keeps
(74% / 50% with the earlier autoencoder, 64% / 41% with the shipped one, which decodes objects plain;
`bench/probe_latent_material.py`, 600 + 600 start images), so the physical tokens had nothing to add and
Stage I learned to ignore them. Pooled, it reads it in 91% / 82%, places the object better too, and the
tokens carry the bounce (README, "The two commands").
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from .fitting import fit
from .world import FPS, MATERIALS, SIZE

WIDTH = 64
PATTERN_WIDTH = 32
TARGETS = ("x", "y", "radius", "floor", "support", "height", "impact_time", "restitution", "block", "block_x0",
           "block_x1", "block_top")


def geometry_targets(scene) -> np.ndarray:
    """The backbone's pretraining targets for a drop scene's start image (lengths / image size, seconds)."""
    m = scene.meta
    x, y = scene.trajectories[0, 0]
    floor = m["floor_y"]
    block = m["block"]
    mask = scene.object_masks()[0]
    rows = np.nonzero(mask.any(1))[0]
    bottom = float(rows.max()) + 0.5 if len(rows) else float(y)
    support = floor
    if block is not None and m["block_kind"] == "under":
        support = block[2]
    height = max(0.0, support - bottom)
    g = m["gravity"]
    impact = math.sqrt(2 * height / g) if g > 0 else 0.0
    b = block if block is not None else (0.0, 0.0, floor)
    return np.array([x / SIZE, y / SIZE, m["radius"] / SIZE, floor / SIZE, support / SIZE, height / SIZE,
                     impact * FPS / 8, m["restitution"], float(block is not None),
                     b[0] / SIZE, b[1] / SIZE, b[2] / SIZE], np.float32)


class GeometryBackbone(nn.Module):
    """[B, H, W, 3] start images in [0, 1] -> hidden states [B, 1 + 16, WIDTH] (summary token, patch tokens)."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 48, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(48, 64, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, width, 4, stride=2, padding=1), nn.SiLU())
        self.pattern = nn.Sequential(nn.Conv2d(48, PATTERN_WIDTH, 3, padding=1), nn.SiLU())  # on the 16x16 map
        n = SIZE // 8
        self.mlp = nn.Sequential(nn.Linear(width * n * n + PATTERN_WIDTH, 256), nn.SiLU(), nn.Linear(256, width),
                                 nn.SiLU())
        self.readout = nn.Linear(width, len(TARGETS))
        yy, xx = torch.meshgrid(torch.arange(n).float(), torch.arange(n).float(), indexing="ij")
        freqs = 1.0 / (4.0 ** torch.arange(width // 4).float())
        pos = torch.cat([torch.sin(yy[..., None] * freqs), torch.cos(yy[..., None] * freqs),
                         torch.sin(xx[..., None] * freqs), torch.cos(xx[..., None] * freqs)], -1)
        self.register_buffer("pos", pos.reshape(n * n, width) * 0.5)

    def _forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.float().permute(0, 3, 1, 2) * 2 - 1
        fine = self.conv[:4](x)  # [B, 48, 16, 16]
        fmap = self.conv[4:](fine)  # [B, C, 4, 4]
        pattern = self.pattern(fine).amax((2, 3))  # [B, PATTERN_WIDTH]: where the pattern is does not matter
        summary = self.mlp(torch.cat([fmap.flatten(1), pattern], 1))
        patches = fmap.flatten(2).transpose(1, 2) + self.pos
        return torch.cat([summary[:, None], patches], 1), self.readout(summary)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._forward(images)[0]

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """The geometry read-out [B, len(TARGETS)] (to check what the frozen features know)."""
        return self._forward(images)[1]

    @torch.no_grad()
    def read_restitution(self, images: torch.Tensor) -> torch.Tensor:
        """The material read from each start image [B]: the restitution of the material nearest the read-out's."""
        levels = torch.tensor(sorted(r for _, r in MATERIALS.values()))
        r = self.predict(images)[:, TARGETS.index("restitution")]
        return levels[(r[:, None] - levels[None]).abs().argmin(1)]


#: what the physical head reads of the backbone (`Settings.head_reads`): "hidden", its hidden states as a
#: CLIPVisionEncode output would give them (the default); "summary", the summary token alone (the layer every
#: geometry target is a linear read-out of); "geometry", the geometry read-out itself (`TARGETS`, one token, padded
#: with zeros to WIDTH). The two narrow ones drop the patch tokens, which carry the object's and background's looks
#: the head only ever sees for the seen split; neither made Stage III beat Stage II (bench/FINDINGS.md, "What the
#: head reads").
HEAD_READS = ("hidden", "summary", "geometry")


def check_head_reads(reads: str) -> str:
    """`reads` if it is one of `HEAD_READS`; else a ValueError that names the choices (HeadInput's and --set's)."""
    if reads not in HEAD_READS:
        raise ValueError(f"head_reads must be one of {', '.join(HEAD_READS)}, got {reads!r}")
    return reads


class HeadInput(nn.Module):
    """The backbone as the head reads it (`HEAD_READS`): the frozen `backbone`'s hidden states, its summary token
    alone, or its geometry read-out as one token [B, 1, WIDTH]."""

    def __init__(self, backbone: GeometryBackbone, reads: str = "hidden"):
        super().__init__()
        self.backbone, self.reads = backbone, check_head_reads(reads)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        hidden, geometry = self.backbone._forward(images)
        if self.reads == "summary":
            return hidden[:, :1]
        if self.reads == "geometry":
            pad = hidden.new_zeros(len(geometry), hidden.shape[-1] - geometry.shape[-1])
            return torch.cat([geometry, pad], 1)[:, None]
        return hidden


def head_input(backbone: GeometryBackbone, reads: str = "hidden") -> nn.Module:
    """`backbone` itself for "hidden" (the default: nothing changes), else a `HeadInput` over it."""
    return backbone if reads == "hidden" else HeadInput(backbone, reads)


def train_backbone(images: torch.Tensor, targets: torch.Tensor, steps: int, seed: int = 0, batch: int = 128,
                   lr: float = 2e-3, log=print) -> tuple[GeometryBackbone, dict]:
    """Supervised pretraining on start images [N, H, W, 3] -> targets [N, len(TARGETS)]; frozen afterwards."""
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = GeometryBackbone()
    def step_loss():
        idx = torch.randint(0, len(images), (batch,), generator=g)
        return (net._forward(images[idx])[1] - targets[idx]).pow(2).mean()

    info = fit(net, step_loss, steps, lr, weight_decay=1e-4, warmup=0.1, name="backbone", log=log, digits=5)
    return net, info
