"""Test-only ComfyUI nodes for the PhysMaster host tests (loaded only by tests/host/harness.py).

No real text encoder fits on the test machines, so conditioning is random, shaped like what the real encoders
produce (checked against ComfyUI's comfy/sd1_clip.py and comfy/text_encoders):
- Wan (umT5-XXL, ``text_encoders/wan.py``): ``[[cond [B, >=512, 4096], {"pooled_output": None}]]``; the encoder
  zeroes the padded tokens (``zero_out_masked``) and puts NO ``attention_mask`` in the dict.
- LTX-Video (T5-XXL, ``lt.ltxv_te`` -> ``genmo.mochi_te``, attention_mask=True):
  ``[[cond [B, >=128, 4096], {"pooled_output": None, "attention_mask": int64 [B, L]}]]``, padded tokens not
  zeroed. The LTXV DiT *requires* the mask (``LTXBaseModel.forward`` takes it positionally) and converts only
  an integer mask (1 = keep) into an additive one; a float mask is taken as already additive.
- HunyuanVideo (LLaVA-Llama-3 + CLIP-L, ``text_encoders/hunyuan_video.py``): ``[[cond [B, L, 4096],
  {"pooled_output": CLIP-L [B, 768]}]]``; the attention_mask is dropped when no token is padded (one prompt).
``PhysMasterTest_RandomConditioning`` mirrors Wan and LTX-Video; ``PhysMasterTest_AddPooledOutput`` adds the
pooled output HunyuanVideo's ``vector_in`` takes (a separate node: adding a widget to RandomConditioning would break
the UI-format workflows that use it, whose widget values are positional).
RandomConditioning's ``attention_mask`` adds an int64 mask (ones for ``valid_length`` tokens, zeros after),
``zero_out_masked`` zeroes the padded tokens like umT5.
"""

from __future__ import annotations

import os

import torch

import folder_paths

_CATEGORY = "physmaster/testing"


def _generator(seed: int) -> torch.Generator:
    return torch.Generator(device="cpu").manual_seed(int(seed) & 0xFFFFFFFFFFFFFFFF)


class RandomConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
                "length": ("INT", {"default": 16, "min": 1, "max": 4096}),
                "width": ("INT", {"default": 4096, "min": 1, "max": 16384}),
                "batch": ("INT", {"default": 1, "min": 1, "max": 64}),
                "scale": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 100.0, "step": 0.01}),
            },
            "optional": {
                "attention_mask": ("BOOLEAN", {"default": False}),
                "valid_length": ("INT", {"default": 0, "min": 0, "max": 4096,
                                          "tooltip": "Tokens before padding; 0 = all valid."}),
                "zero_out_masked": ("BOOLEAN", {"default": False}),
            },
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "execute"
    CATEGORY = _CATEGORY

    def execute(self, seed, length, width, batch, scale, attention_mask=False, valid_length=0,
                zero_out_masked=False):
        cond = torch.randn((batch, length, width), generator=_generator(seed), dtype=torch.float32) * scale
        valid = length if valid_length <= 0 else min(valid_length, length)
        mask = torch.zeros((batch, length), dtype=torch.long)  # what sd1_clip returns
        mask[:, :valid] = 1
        if zero_out_masked:
            cond = cond * mask.unsqueeze(-1).float()
        extra = {"pooled_output": None}
        if attention_mask:
            extra["attention_mask"] = mask
        return ([[cond, extra]],)


class AddPooledOutput:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "conditioning": ("CONDITIONING",),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
                "width": ("INT", {"default": 768, "min": 1, "max": 16384}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "execute"
    CATEGORY = _CATEGORY

    def execute(self, conditioning, seed, width):
        out = []
        for cond, extra in conditioning:
            pooled = torch.randn((cond.shape[0], width), generator=_generator(seed), dtype=torch.float32)
            out.append([cond, dict(extra, pooled_output=pooled)])
        return (out,)


class RandomImage:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
                "width": ("INT", {"default": 64, "min": 1, "max": 4096}),
                "height": ("INT", {"default": 64, "min": 1, "max": 4096}),
                "batch": ("INT", {"default": 1, "min": 1, "max": 256}),
            }
        }

    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "execute"
    CATEGORY = _CATEGORY

    def execute(self, seed, width, height, batch):
        return (torch.rand((batch, height, width, 3), generator=_generator(seed), dtype=torch.float32),)


class RandomClipVisionOutput:
    """A CLIP_VISION_OUTPUT shaped like core CLIPVisionEncode's (CLIP-H: 257 tokens x 1280), without the 17 s
    CPU encode of the random CLIP-H checkpoint. The real encoder path is covered once by the workflow test."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF}),
                "tokens": ("INT", {"default": 257, "min": 1, "max": 4096}),
                "width": ("INT", {"default": 1280, "min": 1, "max": 16384}),
                "batch": ("INT", {"default": 1, "min": 1, "max": 64}),
            }
        }

    RETURN_TYPES = ("CLIP_VISION_OUTPUT",)
    FUNCTION = "execute"
    CATEGORY = _CATEGORY

    def execute(self, seed, tokens, width, batch):
        import comfy.clip_vision

        g = _generator(seed)
        out = comfy.clip_vision.Output()
        out["penultimate_hidden_states"] = torch.randn((batch, tokens, width), generator=g)
        out["last_hidden_state"] = torch.randn((batch, tokens, width), generator=g)
        out["image_embeds"] = torch.randn((batch, width), generator=g)
        out["image_sizes"] = [(3, 224, 224)] * batch
        out["mm_projected"] = None
        return (out,)


class SaveTensors:
    """Writes what it is given to ``<output>/<prefix>_NNNNN_.safetensors`` so tests can compare bit for bit."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {"filename_prefix": ("STRING", {"default": "physmaster_test/tensors"})},
            "optional": {
                "latent": ("LATENT",),
                "conditioning": ("CONDITIONING",),
                "clip_vision_output": ("CLIP_VISION_OUTPUT",),
                "image": ("IMAGE",),
            },
        }

    RETURN_TYPES = ()
    FUNCTION = "execute"
    OUTPUT_NODE = True
    CATEGORY = _CATEGORY

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")  # always write

    def execute(self, filename_prefix, latent=None, conditioning=None, clip_vision_output=None, image=None):
        from safetensors.torch import save_file

        tensors = {}
        if latent is not None:
            for k, v in latent.items():
                if isinstance(v, torch.Tensor):
                    tensors[f"latent.{k}"] = v
        if conditioning is not None:
            for i, (cond, extra) in enumerate(conditioning):
                tensors[f"conditioning.{i}.cond"] = cond
                for k, v in extra.items():
                    if isinstance(v, torch.Tensor):
                        tensors[f"conditioning.{i}.{k}"] = v
        if clip_vision_output is not None:
            for k in ("last_hidden_state", "penultimate_hidden_states", "image_embeds", "mm_projected",
                      "all_hidden_states", "image_sizes"):
                v = getattr(clip_vision_output, k, None) if not isinstance(clip_vision_output, dict) else \
                    clip_vision_output.get(k)
                if isinstance(v, torch.Tensor):
                    tensors[f"clip_vision_output.{k}"] = v
        if image is not None:
            tensors["image"] = image
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        full_dir, filename, counter, subfolder, _ = folder_paths.get_save_image_path(
            filename_prefix, folder_paths.get_output_directory())
        name = f"{filename}_{counter:05}_.safetensors"
        save_file(tensors, os.path.join(full_dir, name))
        return {"ui": {"tensors": [{"filename": name, "subfolder": subfolder, "type": "output"}]}}


class Barrier:
    """An output node that does nothing; the harness queues it to order queue-side effects (see ComfyHost.free)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    RETURN_TYPES = ()
    FUNCTION = "execute"
    OUTPUT_NODE = True
    CATEGORY = _CATEGORY

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def execute(self):
        return {}


NODE_CLASS_MAPPINGS = {
    "PhysMasterTest_RandomConditioning": RandomConditioning,
    "PhysMasterTest_AddPooledOutput": AddPooledOutput,
    "PhysMasterTest_RandomImage": RandomImage,
    "PhysMasterTest_SaveTensors": SaveTensors,
    "PhysMasterTest_RandomClipVisionOutput": RandomClipVisionOutput,
    "PhysMasterTest_Barrier": Barrier,
}
NODE_DISPLAY_NAME_MAPPINGS = {k: k.replace("PhysMasterTest_", "PhysMaster Test: ") for k in NODE_CLASS_MAPPINGS}
