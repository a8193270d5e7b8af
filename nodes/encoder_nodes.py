"""PhysEncoder nodes: load / create / save a physical head, encode a start image, apply the tokens."""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import folder_paths
import torch
from comfy_api.latest import io

from ..physmaster.conditioning import PhysTokens, apply_to_conditioning
from ..physmaster.encoder import FEATURES, HeadConfig, PhysEncoder, load_encoder, select_features
from ..physmaster.errors import PhysMasterError
from ..physmaster.memory import check_fits, head_bytes, head_parameter_count
from . import paths
from .types import CATEGORY, PhysEncoderType, PhysTokensType

log = logging.getLogger("physmaster")


def free_cpu_memory() -> int:
    """Bytes of RAM free now, as ComfyUI's memory manager counts them (new heads and scenes are made on the CPU)."""
    import comfy.model_management

    return int(comfy.model_management.get_free_memory(torch.device("cpu")))


class PhysMasterEncoderLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhysMasterEncoderLoader",
            display_name="PhysMaster Encoder Loader",
            category=CATEGORY,
            description="Load a trained PhysEncoder physical head (.safetensors) from models/physmaster.",
            inputs=[
                io.Combo.Input("encoder_name", options=folder_paths.get_filename_list(paths.FOLDER),
                               tooltip="A PhysEncoder file in ComfyUI/models/physmaster/ (or a physmaster: folder "
                                       "in extra_model_paths.yaml). Made by PhysMasterEncoderSave."),
            ],
            outputs=[PhysEncoderType.Output(display_name="encoder")],
        )

    @classmethod
    def execute(cls, encoder_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path(paths.FOLDER, encoder_name)
        if path is None:
            raise PhysMasterError(f"PhysMaster encoder '{encoder_name}' is not in any physmaster model folder "
                                  f"({', '.join(folder_paths.get_folder_paths(paths.FOLDER))}). Put the file there "
                                  "and refresh the node list (press R).")
        return io.NodeOutput(load_encoder(path))

    @classmethod
    def fingerprint_inputs(cls, encoder_name: str):
        path = folder_paths.get_full_path(paths.FOLDER, encoder_name)
        return os.path.getmtime(path) if path else encoder_name


class PhysMasterEncoderNew(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhysMasterEncoderNew",
            display_name="PhysMaster Encoder (new)",
            category=CATEGORY,
            description="Create a fresh, untrained physical head, deterministic by its init seed. Train it with the "
                        "PhysMaster training nodes; save it with PhysMasterEncoderSave.",
            inputs=[
                io.Int.Input("in_dim", default=1280, min=1, max=16384,
                             tooltip="Width of the backbone features (1280 for Wan's clip_vision_h, 1024 for "
                                     "DINOv2-L or CLIP-L, 1536 for DINOv2-G). Ignored when clip_vision_output is "
                                     "connected: the width is read from it."),
                io.Int.Input("context_dim", default=4096, min=1, max=16384,
                             tooltip="Width of the video model's text conditioning: 4096 for Wan 2.1/2.2 (umT5), "
                                     "LTX-Video (T5-XXL) and HunyuanVideo."),
                io.Int.Input("num_tokens", default=16, min=1, max=1024,
                             tooltip="How many physical tokens the head emits (appended to the text tokens)."),
                io.Int.Input("hidden_dim", default=512, min=8, max=8192, step=8,
                             tooltip="The head's own width (a multiple of heads)."),
                io.Int.Input("depth", default=2, min=1, max=24, tooltip="Cross-attention blocks in the head."),
                io.Int.Input("heads", default=8, min=1, max=64, tooltip="Attention heads in each block."),
                io.Combo.Input("feature", options=list(FEATURES), default="penultimate",
                               tooltip="Which CLIPVisionEncode hidden states the head reads: the penultimate layer "
                                       "(what Wan itself uses), the last, or both."),
                io.Int.Input("init_seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the random initial weights: the same settings and seed give the "
                                     "same head."),
                io.ClipVisionOutput.Input("clip_vision_output", optional=True,
                                          tooltip="Optional: a CLIPVisionEncode output to read the backbone width "
                                                  "from, so the head always matches the loaded backbone."),
            ],
            outputs=[PhysEncoderType.Output(display_name="encoder")],
        )

    @classmethod
    def execute(cls, in_dim: int, context_dim: int, num_tokens: int, hidden_dim: int, depth: int, heads: int,
                feature: str, init_seed: int, clip_vision_output=None) -> io.NodeOutput:
        if clip_vision_output is not None:
            in_dim = int(select_features(clip_vision_output, feature).shape[-1])
        config = HeadConfig(in_dim=in_dim, context_dim=context_dim, num_tokens=num_tokens, hidden_dim=hidden_dim,
                            depth=depth, heads=heads, feature=feature)
        check_fits(f"a PhysMaster head with hidden_dim {hidden_dim}, depth {depth}, in_dim {in_dim}, context_dim "
                   f"{context_dim} and {num_tokens} tokens ({head_parameter_count(config) / 1e6:,.0f} M parameters)",
                   head_bytes(config), free_cpu_memory(),
                   "lower hidden_dim and depth first (the default head, hidden_dim 512 and depth 2, needs about "
                   "43 MiB).")
        return io.NodeOutput(PhysEncoder.new(config, seed=init_seed, name=f"new-seed{init_seed}"))


class PhysMasterEncoderSave(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhysMasterEncoderSave",
            display_name="PhysMaster Encoder Save",
            category=CATEGORY,
            description="Save a PhysEncoder to models/physmaster as one .safetensors file (weights, config and "
                        "training history in its metadata). Never overwrites: a counter is added.",
            is_output_node=True,
            inputs=[
                PhysEncoderType.Input("encoder", tooltip="The encoder to save (from a loader, New, or a trainer)."),
                io.String.Input("filename_prefix", default="PhysEncoder",
                                tooltip="File name prefix inside models/physmaster; may contain a subfolder."),
            ],
            outputs=[io.String.Output(display_name="filename",
                                      tooltip="The saved file's name relative to models/physmaster.")],
        )

    @classmethod
    def execute(cls, encoder: PhysEncoder, filename_prefix: str) -> io.NodeOutput:
        full, rel = paths.unique_save_path(paths.FOLDER, filename_prefix)  # unique across ALL physmaster folders
        encoder.save(full)
        log.info("PhysMaster: saved encoder to %s", full)
        summary = {"saved": rel, "config": json.loads(encoder.config.to_json()),
                   "stages": [s.get("stage") for s in encoder.provenance.get("stages", [])]}
        return io.NodeOutput(rel, ui={"text": [json.dumps(summary)]})


class PhysMasterEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhysMasterEncode",
            display_name="PhysMaster Encode",
            category=CATEGORY,
            description="Turn the start image's backbone features (from core CLIPVisionEncode) into physical tokens.",
            inputs=[
                PhysEncoderType.Input("encoder", tooltip="The PhysEncoder physical head."),
                io.ClipVisionOutput.Input("clip_vision_output",
                                          tooltip="Output of core CLIPVisionEncode on the start image, with the "
                                                  "backbone the encoder was made for (Wan's clip_vision_h, "
                                                  "DINOv2-L/G). Use crop 'none' to keep the whole frame."),
            ],
            outputs=[PhysTokensType.Output(display_name="physical_tokens")],
        )

    @classmethod
    def execute(cls, encoder: PhysEncoder, clip_vision_output) -> io.NodeOutput:
        feature = encoder.config.feature
        features = select_features(clip_vision_output, feature).detach().float().cpu()
        tokens = encoder.encode(features)
        return io.NodeOutput(PhysTokens(tokens=tokens, encoder_id=encoder.encoder_id, features=features,
                                        feature=feature))


#: public API: append only. "positive, negative zeroed" gives the negative the same number of tokens, all zero, so
#: the sampler's CFG scales what the tokens change (classifier-free guidance on the tokens; Stage I drops the
#: tokens by zeroing them, so zeroed tokens are the unconditional model's input)
APPLY_TO = ["positive and negative", "positive only", "positive, negative zeroed"]


class PhysMasterApply(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhysMasterApply",
            display_name="PhysMaster Apply",
            category=CATEGORY,
            description="Append the physical tokens to the video model's conditioning, after its I2V node "
                        "(WanImageToVideo, LTXVImgToVideo, ...). Strength 0 bypasses it.",
            inputs=[
                io.Conditioning.Input("positive", tooltip="Positive conditioning (e.g. from WanImageToVideo)."),
                io.Conditioning.Input("negative", tooltip="Negative conditioning (e.g. from WanImageToVideo)."),
                PhysTokensType.Input("physical_tokens", tooltip="From PhysMasterEncode."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Scale of the physical tokens. 0 passes the conditioning through unchanged."),
                io.Combo.Input("apply_to", options=APPLY_TO, default=APPLY_TO[0],
                               tooltip="The tokens are an image condition, so by default both get them (equal "
                                       "lengths keep cond and uncond batched). 'positive only' lets CFG push "
                                       "toward them. 'positive, negative zeroed': the negative gets as many "
                                       "tokens, all zero, so CFG scales what the tokens change and cond and "
                                       "uncond stay batched."),
            ],
            outputs=[io.Conditioning.Output(display_name="positive"), io.Conditioning.Output(display_name="negative")],
        )

    @classmethod
    def execute(cls, positive, negative, physical_tokens: PhysTokens, strength: float,
                apply_to: str) -> io.NodeOutput:
        if apply_to not in APPLY_TO:
            raise PhysMasterError(f"apply_to must be one of {APPLY_TO}, got {apply_to!r}")
        positive = apply_to_conditioning(positive, physical_tokens, strength, what="positive")
        if apply_to == APPLY_TO[0]:
            negative = apply_to_conditioning(negative, physical_tokens, strength, what="negative")
        elif apply_to == APPLY_TO[2]:
            zeroed = dataclasses.replace(physical_tokens, tokens=torch.zeros_like(physical_tokens.tokens))
            negative = apply_to_conditioning(negative, zeroed, strength, what="negative")
        return io.NodeOutput(positive, negative)
