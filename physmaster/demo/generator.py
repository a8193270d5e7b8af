"""The demo's image-to-video model: a tiny Wan DiT (diffusers' WanTransformer3DModel, in the Denoiser protocol)
over the latents of `autoencoder.FrameAutoencoder`, conditioned like Wan I2V (mask + first-frame latent along
channels) and on a fixed 4-token "prompt" to which the physical tokens are appended.

Latents are [8, 8 frames, 8, 8]; 1x2x2 patches make 128 tokens a video, so sampling 2 videos for each of
60 held-out scenes costs seconds, not minutes, on a CPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .autoencoder import LATENT_CHANNELS, FrameAutoencoder
from .world import FRAMES, SIZE, to_frames, to_pixels

PROMPT_LEN, TEXT_DIM = 4, 32
MODEL = dict(latent_channels=LATENT_CHANNELS, text_dim=TEXT_DIM, heads=2, head_dim=48, ffn_dim=256, num_layers=4,
             patch_size=(1, 2, 2), rope_max_seq_len=32)
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "proj_out"]


def lora_parameter_names() -> list[str]:
    """The names of the demo DiT's LoRA parameters (`LORA_TARGETS` in every block), which `Settings.lora_modules`
    picks from."""
    den = new_dit()
    den.add_lora(1, targets=LORA_TARGETS)
    return [n for n, _ in den.named_lora_parameters()]


def prompt_context() -> torch.Tensor:
    """The fixed 'prompt' ("an object falls") as a [1, 4, 32] text context."""
    g = torch.Generator().manual_seed(4321)
    return torch.randn(1, PROMPT_LEN, TEXT_DIM, generator=g)


def new_dit(seed: int = 0, **overrides):
    """A fresh tiny Wan DiT of the demo's config (`MODEL`), with `overrides` of it (e.g. `num_layers=8`:
    `bench/demo_base_scale.py`'s deeper base)."""
    from ..backends.diffusers_wan import WanDenoiser, make_tiny_wan

    unknown = sorted(set(overrides) - set(MODEL))
    if unknown:
        raise ValueError(f"{unknown} are not fields of the demo's DiT config; use some of {sorted(MODEL)}")
    return WanDenoiser(make_tiny_wan(seed, **{**MODEL, **overrides}))


@dataclass
class VideoModel:
    """The autoencoder (frozen), the denoiser over its latents, and the frozen pretrained base DiT (`guide`).

    Sampling is *guided by the base model* (autoguidance, Karras et al. 2024, "Guiding a diffusion model with a
    bad version of itself"): v = v_base + w (v_model - v_base), w = `guidance`. A tiny DiT's samples are the
    mean of what it is unsure of, so a small object smears and fades; guidance against a weaker model (here the
    base, which never saw a drop) sharpens what the trained model learned. Every row samples the same way (for
    the base row itself the formula returns the base), candidates for DPO too, so the stages' differences are
    the stages' own. On 20 held-out scenes with the Stage I model, w = 2 took avg L2 from 0.099 to 0.050 and
    coherence from 0.68 to 0.77 (w = 1.5: 0.067 / 0.79; w = 3: 0.043 / 0.71; 8 or 12 Euler steps alike). It is
    off by default (`python -m physmaster demo --guidance 2` turns it on): guided, the DPO stages lose their
    significant gains (`bench/FINDINGS.md`, "`--guidance W`").
    """

    ae: FrameAutoencoder
    den: object  # WanDenoiser
    guide: object | None = None  # the pretrained base WanDenoiser, frozen
    guidance: float = 1.0  # 1 = unguided
    # classifier-free guidance on the physical tokens: v = v(tokens zeroed) + w (v(tokens) - v(tokens zeroed)),
    # w = `token_guidance` (1 = off). Stage I drops (zeroes) the tokens for 10% of its samples, so "tokens zeroed"
    # is the unconditional model CFG needs; guidance then scales what the tokens change w-fold. The graph's
    # analogue: PhysMasterApply's apply_to "positive, negative zeroed" under the sampler's cfg.
    token_guidance: float = 1.0
    prompt: torch.Tensor | None = None  # [1, 4, 32] text context of every video; None: `prompt_context()`

    def encode(self, frames: np.ndarray | list) -> torch.Tensor:
        """Videos [B, T, H, W, 3] (numpy, [0, 1]) -> latents [B, C, T, h, w]."""
        pix = torch.stack([to_pixels(np.asarray(f)) for f in frames])
        return torch.cat([self.ae.encode_video(pix[i:i + 64]) for i in range(0, len(pix), 64)])

    def decode(self, latents: torch.Tensor) -> list[np.ndarray]:
        """Latents [B, C, T, h, w] -> videos, each [T, H, W, 3] float32 in [0, 1]."""
        out = []
        for i in range(0, len(latents), 64):
            out.extend(to_frames(v) for v in self.ae.decode_video(latents[i:i + 64]))
        return out

    def conditioning(self, start_images: np.ndarray, backbone=None):
        """Conditioning for start images [B, H, W, 3]: prompt, backbone features, Wan-I2V image condition."""
        from ..backends.diffusers_wan import make_i2v_condition
        from ..training import Conditioning

        imgs = torch.from_numpy(np.ascontiguousarray(start_images)).float()
        first = self.ae.encode_video(to_pixels(start_images)[:, None])[:, :, 0]
        prompt = prompt_context() if self.prompt is None else self.prompt
        return Conditioning(context=prompt.expand(len(imgs), -1, -1).clone(),
                            features=None if backbone is None else backbone(imgs),
                            image_cond=make_i2v_condition(first, FRAMES))

    @torch.no_grad()
    def sample(self, head, cond, noise_seeds, steps: int, batch: int = 64, token_scale: float = 1.0) -> torch.Tensor:
        """Euler sampling of the rectified flow from t = 1 to 0 -> latents [B, C, T, h, w]. Noise i is drawn
        from seed `noise_seeds[i]`, so every model sees the same noises. `token_scale` 0 zeroes the physical
        tokens (same sequence length: what "tokens zeroed" means in the token-influence figure; `token_guidance`
        then has nothing to scale, so the figure measures what the guided tokens add)."""
        c_lat = self.ae.channels
        h = SIZE // 4
        ts = torch.linspace(1.0, 0.0, steps + 1)
        outs = []
        for s in range(0, len(noise_seeds), batch):
            idx = list(range(s, min(s + batch, len(noise_seeds))))
            c = cond.map(lambda x: x[idx[0]:idx[-1] + 1])
            plain, unguided = c, None
            if head is not None and c.features is not None:
                tokens = head(c.features) * token_scale
                c = c.with_tokens(tokens)
                if self.token_guidance != 1.0 and token_scale != 0.0:  # zeroed: nothing to guide on
                    unguided = plain.with_tokens(torch.zeros_like(tokens))
            x = torch.stack([torch.randn(c_lat, FRAMES, h, h, generator=torch.Generator().manual_seed(int(n)))
                             for n in (noise_seeds[i] for i in idx)])
            for i in range(steps):
                t = torch.full((len(idx),), float(ts[i]))
                v = self.den.predict_velocity(x, t, c).float()
                if unguided is not None:
                    v_zeroed = self.den.predict_velocity(x, t, unguided).float()
                    v = v_zeroed + self.token_guidance * (v - v_zeroed)
                if self.guide is not None and self.guidance != 1.0:
                    v_base = self.guide.predict_velocity(x, t, plain).float()  # the base never saw tokens
                    v = v_base + self.guidance * (v - v_base)
                x = x + (ts[i + 1] - ts[i]) * v
            outs.append(x)
        return torch.cat(outs)


def pretraining_condition(latents: torch.Tensor, context: torch.Tensor | None = None):
    """The conditioning a base DiT is pretrained with on latents [N, C, T, h, w]: the text context (default: the
    constant prompt for every video) and the Wan-I2V condition of each video's own first frame; no tokens."""
    from ..backends.diffusers_wan import make_i2v_condition
    from ..training import Conditioning

    if context is None:
        context = prompt_context().expand(len(latents), -1, -1).clone()
    return Conditioning(context=context, image_cond=make_i2v_condition(latents[:, :, 0], FRAMES))


def pretrain_dit(latents: torch.Tensor, cond, steps: int, seed: int = 0, batch: int = 16, lr: float = 1e-3,
                 log=print, den=None, name: str = "base DiT", ema_decay: float = 0.0):
    """Train the base DiT (every weight; no physical tokens) on latents [N, C, T, h, w]: from scratch, or on from
    `den` (trained in place, e.g. `bench/demo_caption_base.py`'s caption phase). `ema_decay` > 0: the weights
    returned are an exponential moving average of the trained ones (after step k the average takes
    1 - min(ema_decay, (k + 1) / (k + 10)) of the new weights, so its first steps are not dominated by the
    initialisation), as diffusion models are usually sampled; 0: the last step's weights."""
    from ..training import StageTrainer, TrainConfig, VideoSample, VideoSet

    den = new_dit(seed) if den is None else den
    for p in den.model.parameters():
        p.requires_grad_(True)
    data = VideoSet(VideoSample(latents[i], cond.map(lambda x, i=i: x[i:i + 1])) for i in range(len(latents)))
    params = list(den.model.parameters())
    # train every weight: for the base, the trainer's "LoRA" is the whole model
    den.named_lora_parameters = lambda: list(den.model.named_parameters())  # type: ignore[method-assign]
    den.lora_parameters = lambda: params  # type: ignore[method-assign]
    if not 0.0 <= ema_decay < 1.0:
        raise ValueError(f"ema_decay must be in [0, 1), got {ema_decay}")
    cfg = TrainConfig(steps=steps, lr=lr, batch_size=batch, seed=seed, warmup_steps=min(100, steps), grad_clip=1.0)
    tr = StageTrainer("sft", den, None, data, cfg)
    t0 = time.perf_counter()
    ema = [p.detach().clone() for p in params] if ema_decay > 0 else None

    def cb(step, total, logs):
        if ema is not None:
            d = min(ema_decay, (step + 1) / (step + 10))  # `step` steps are done
            with torch.no_grad():
                for a, p in zip(ema, params):
                    a.mul_(d).add_(p.detach(), alpha=1 - d)
        if log and (step == total or step % max(1, total // 10) == 0):
            log(f"  [{name}] {step}/{total} loss {logs['loss']:.4f} ({time.perf_counter() - t0:.0f}s)")

    tr.run(cb)
    del den.named_lora_parameters, den.lora_parameters
    with torch.no_grad():
        for i, p in enumerate(den.model.parameters()):
            if ema is not None:
                p.copy_(ema[i])
            p.requires_grad_(False)
    tail = [h["loss"] for h in tr.history[-50:]]
    info = {"steps": steps, "final_loss": float(np.mean(tail)) if tail else None,
            "seconds": time.perf_counter() - t0}
    if ema is not None:
        info["ema_decay"] = ema_decay
    return den, info


def rebase(vm: VideoModel, cache_file, pretrain, name: str, log=print) -> None:
    """Give `vm` another base DiT, its guide too: the weights in `cache_file` when it exists, else what
    `pretrain(vm)` returns, (den, info) from `pretrain_dit`, saved to `cache_file` (None: not saved). For the
    benches that try other bases (`bench/demo_caption_base.py`, `bench/demo_drop_base.py`)."""
    from safetensors.torch import load_file, save_file

    from ..fileio import atomic_path

    if cache_file is not None and cache_file.is_file():
        vm.den.model.load_state_dict(load_file(cache_file))
        log(f"{name} read from {cache_file}")
    else:
        den, info = pretrain(vm)
        log(f"{name}: {info['steps']} steps, final loss {info['final_loss']:.4f} ({info['seconds']:.0f}s)")
        vm.den.model.load_state_dict(den.model.state_dict())
        if cache_file is not None:
            with atomic_path(cache_file) as tmp:  # never a half-written cache
                save_file({k: v.contiguous() for k, v in vm.den.model.state_dict().items()}, str(tmp))
    vm.guide.model.load_state_dict(vm.den.model.state_dict())
