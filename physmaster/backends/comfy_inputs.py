"""ComfyUI-side conditioning -> the diffusers Wan backend's inputs. The one place this translation happens.

A preference group (`physmaster.preferences`, written by PhysMasterPreferencePicker) and an SFT video file
(`physmaster.videoset`, written by PhysMasterSaveTrainingVideos) store the conditioning as ComfyUI held it:

- `latents` [N, C, T, H, W]: sampled or VAE-encoded latents in ComfyUI's latent space -> x_0, normalised.
- `context` [1, L, D]: the text context without physical tokens (c_crossattn) -> `encoder_hidden_states`.
- `cond.concat_latent_image` [1, C, T, H, W]: Wan I2V's start image + gray frames as a VAE latent ->
  `image_cond[:, 4:]`, normalised.
- `cond.concat_mask` [1, 1 or 4, T, H, W]: Wan I2V's mask, 0 where the image is given -> `image_cond[:, :4]` =
  1 - mask.
- `clip_vision.penultimate_hidden_states`: CLIP-H's output (Wan 2.1 I2V's clip_fea) ->
  `encoder_hidden_states_image`.
- `cond.attention_mask` [1, L]: LTX-Video's / HunyuanVideo's text mask -> `Conditioning.attention_mask` (Wan has
  none; it is carried, extended with the physical tokens, and unused).
- `features` [1, P, C_in]: backbone hidden states (PhysMasterApply's record) -> the PhysHead's input.

It follows ComfyUI's `WAN21.concat_cond` / `extra_conds` exactly: latents and the concat image go through
`process_latent_in` (`(x − mean) / std` per channel: the Wan VAE's latent statistics, which diffusers' Wan
pipelines apply too), the mask is averaged to one channel, inverted, padded in time and repeated to 4 channels,
and `[mask, image]` is concatenated to the noisy latent. A model whose input takes no extra channels (T2V, Wan 2.2
TI2V) gets no image condition. A key that changes a Wan model's output and that this backend cannot reproduce
(e.g. `cond.time_dim_concat`, `cond.reference_latents`) is an error naming it, never silently dropped.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import PhysMasterError, WidthMismatchError
from ..training.denoiser import Conditioning

#: stored conditioning keys a Wan model does not read (ComfyUI drops them for Wan too)
IGNORED_BY_WAN = {"cond.pooled_output", "cond.attention_mask", "clip_vision.last_hidden_state",
                  "clip_vision.image_embeds", "cond.guidance"}
USED = {"latents", "latent", "context", "features", "cond.concat_latent_image", "cond.concat_mask",
        "clip_vision.penultimate_hidden_states"}


@dataclass(frozen=True)
class LatentNorm:
    """ComfyUI's `process_latent_in` for a Wan latent format: `(x − mean) / std` per channel."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str = ""

    @property
    def channels(self) -> int:
        return len(self.mean)

    def to_model(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, C, ...] in ComfyUI's latent space -> the model's space."""
        if x.shape[1] % self.channels:
            raise WidthMismatchError(f"latents have {x.shape[1]} channels but the latent statistics ({self.source}) "
                                     f"have {self.channels}: pass the VAE config of the model the data was made with "
                                     "(--latent-norm)")
        shape = (1, self.channels) + (1,) * (x.ndim - 2)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(shape)
        std = torch.tensor(self.std, dtype=torch.float32).view(shape)
        chunks = x.float().split(self.channels, dim=1)
        return torch.cat([(c - mean) / std for c in chunks], dim=1)


def wan21_latent_norm() -> LatentNorm:
    """The Wan 2.1 VAE's 16-channel latent statistics, as diffusers' AutoencoderKLWan defaults hold them."""
    from diffusers import AutoencoderKLWan

    params = inspect.signature(AutoencoderKLWan.__init__).parameters
    return LatentNorm(tuple(params["latents_mean"].default), tuple(params["latents_std"].default),
                      "Wan 2.1 VAE (diffusers AutoencoderKLWan defaults)")


def latent_norm_from_config(path: str | Path) -> LatentNorm:
    """Latent statistics from a diffusers VAE config.json (or its folder): `latents_mean` / `latents_std`."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    try:
        config = json.loads(path.read_text())
        mean, std = config["latents_mean"], config["latents_std"]
        if len(mean) != len(std) or not mean or not all(float(s) > 0 for s in std):
            raise ValueError("latents_mean and latents_std must be lists of one length, std > 0")
        return LatentNorm(tuple(float(m) for m in mean), tuple(float(s) for s in std), str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PhysMasterError(f"--latent-norm {path}: not a diffusers VAE config with latents_mean/latents_std "
                              f"({e})") from None


def resolve_latent_norm(spec: str | None, channels: int) -> LatentNorm | None:
    """`--latent-norm`: 'auto' (Wan 2.1's statistics for 16-channel latents), 'none' (use latents as stored), or a
    diffusers VAE config.json / folder (e.g. Wan2.2-TI2V-5B-Diffusers/vae for 48-channel latents)."""
    spec = spec or "auto"
    if spec == "none":
        return None
    if spec == "auto":
        if channels == 16:
            return wan21_latent_norm()
        raise PhysMasterError(f"the data's latents have {channels} channels; only Wan 2.1's 16-channel statistics "
                              "are built in. Pass --latent-norm PATH (the diffusers VAE config.json of the model, "
                              "e.g. Wan2.2-TI2V-5B-Diffusers/vae) or --latent-norm none")
    norm = latent_norm_from_config(spec)
    if norm.channels != channels:
        raise WidthMismatchError(f"--latent-norm {spec} has {norm.channels} channels but the data's latents have "
                                 f"{channels}: pass the VAE config of the model the data was made with")
    return norm


def _f(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float()


def wan_conditioning(tensors: dict[str, torch.Tensor], *, in_channels: int, latent_shape: Sequence[int],
                     norm: LatentNorm | None, image_dim: int | None = None, where: str = "the group") -> Conditioning:
    """The diffusers Wan backend's `Conditioning` (batch 1) for one stored group / video file. `latent_shape` is
    one latent's [C, T, H, W]; `in_channels` the transformer's input channels (2C + 4 for Wan I2V)."""
    unknown = sorted(k for k in tensors if k not in USED and k not in IGNORED_BY_WAN)
    if unknown:
        raise PhysMasterError(f"{where} holds conditioning {', '.join(unknown[:4])} that the diffusers Wan backend "
                              "cannot reproduce; train this dataset in ComfyUI (PhysMasterTrainDPO / TrainSFT)")
    if "context" not in tensors or tensors["context"].ndim != 3:
        raise PhysMasterError(f"{where} has no 'context' [1, length, width] tensor")
    c, frames, h, w = (int(s) for s in latent_shape)
    extra = int(in_channels) - c
    image_cond = None
    if extra:
        image = tensors.get("cond.concat_latent_image")
        if image is None:  # ComfyUI: zeros in every extra channel
            image_cond = torch.zeros(1, extra, frames, h, w)
        else:
            image = _f(image)
            if image.ndim != 5 or tuple(image.shape[-2:]) != (h, w) or image.shape[2] != frames:
                raise WidthMismatchError(f"{where}: its concat_latent_image is {list(image.shape)}, but the latents "
                                         f"are [{c}, {frames}, {h}, {w}]")
            if norm is not None:
                image = norm.to_model(image)
            if extra != image.shape[1] + 4:
                if extra != image.shape[1]:
                    raise WidthMismatchError(f"{where}: the model takes {extra} extra input channels but the stored "
                                             f"image condition gives {image.shape[1]} (+ 4 mask): the data was made "
                                             "with another model (--model)")
                image_cond = image
            else:
                mask = tensors.get("cond.concat_mask")
                if mask is None:
                    mask = torch.zeros(1, 4, frames, h, w)
                else:
                    mask = _f(mask)
                    if mask.ndim != 5 or tuple(mask.shape[-2:]) != (h, w):
                        raise WidthMismatchError(f"{where}: its concat_mask is {list(mask.shape)}, not [1, 1, T, {h}, "
                                                 f"{w}]")
                    if mask.shape[1] != 4:
                        mask = mask.mean(dim=1, keepdim=True)
                    mask = 1.0 - mask
                    if mask.shape[2] < frames:
                        mask = torch.nn.functional.pad(mask, (0, 0, 0, 0, 0, frames - mask.shape[2]))
                    mask = mask[:, :, :frames]
                    if mask.shape[1] == 1:
                        mask = mask.repeat(1, 4, 1, 1, 1)
                image_cond = torch.cat([mask, image], dim=1)
    image_embeds = None
    clip = tensors.get("clip_vision.penultimate_hidden_states")
    if image_dim:
        if clip is not None:
            if clip.shape[-1] != image_dim:
                raise WidthMismatchError(f"{where}: its CLIP vision features are {clip.shape[-1]} wide but the model's "
                                         f"image embedder takes {image_dim} (--model is another model)")
            image_embeds = _f(clip).reshape(1, -1, clip.shape[-1])
    features = tensors.get("features")
    mask = tensors.get("cond.attention_mask")
    return Conditioning(context=_f(tensors["context"][:1]), features=None if features is None else _f(features[:1]),
                        image_cond=image_cond, image_embeds=image_embeds,
                        attention_mask=None if mask is None else mask[:1].detach())


def model_latents(latents: torch.Tensor, norm: LatentNorm | None) -> torch.Tensor:
    """Stored latents [N, C, T, H, W] (ComfyUI's latent space) -> the model's space, float32."""
    return latents.float() if norm is None else norm.to_model(latents)
