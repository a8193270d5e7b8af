"""Marking preference pairs in the graph (PhysMasterPreferencePicker) and opening a dataset for training."""

from __future__ import annotations

import json
import logging
import os
import secrets

import numpy as np
import torch
from comfy_api.latest import io
from PIL import Image

import comfy.model_management
import folder_paths
from server import PromptServer

from ..physmaster.conditioning import RECORD_KEY, strip_tokens
from ..physmaster.errors import PhysMasterError
from ..physmaster.picker import choice_to_pairs
from ..physmaster.preferences import DatasetError, PreferenceDataset, validate_name
from . import routes
from .types import CATEGORY

log = logging.getLogger("physmaster")

MODES = ["ask", "judge"]
ON_TIMEOUT = ["skip", "judge"]
PhysPreferencesType = io.Custom("PHYSMASTER_PREFERENCES")


def preferences_root() -> str:
    return os.path.join(folder_paths.get_output_directory(), "physmaster", "preferences")


def group_tensors(positive) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict]:
    """The shared conditioning of a group, from the first positive entry, with physical tokens stripped."""
    if not positive:
        raise PhysMasterError("the picker's positive conditioning is empty; connect the positive output of "
                              "PhysMasterApply")
    context, extra = positive[0][0], positive[0][1]
    record = extra.get(RECORD_KEY) or {}
    mask = extra.get("attention_mask")
    context, mask = strip_tokens(context, int(record.get("num_tokens", 0)), mask)
    extras: dict[str, torch.Tensor] = {}
    if mask is not None:
        extras["cond.attention_mask"] = mask
    for key, value in extra.items():
        if isinstance(value, torch.Tensor) and key != "attention_mask":
            extras[f"cond.{key}"] = value
    cvo = extra.get("clip_vision_output")
    if cvo is not None:
        for key in ("penultimate_hidden_states", "last_hidden_state", "image_embeds"):
            value = getattr(cvo, key, None)
            if isinstance(value, torch.Tensor):
                extras[f"clip_vision.{key}"] = value
    if isinstance(record.get("features"), torch.Tensor):
        extras["features"] = record["features"]
    meta = {k: v for k, v in record.items() if k != "features"}
    return context, extras, meta


def candidate_frames(latents: dict, images, vae, n: int) -> torch.Tensor:
    """[N, T, H, W, 3] frames of the N candidates, from decoded images or by decoding with the VAE."""
    if images is None:
        if vae is None:
            raise PhysMasterError("the picker needs the candidates' frames: connect 'images' (VAEDecode of the "
                                  "sampled latents) or a 'vae' to decode them")
        images = vae.decode(latents["samples"])
        if images.ndim == 4:
            images = images.reshape(n, -1, *images.shape[-3:])
        return images[..., :3].float().cpu()
    if images.shape[0] % n:
        raise PhysMasterError(f"'images' has {images.shape[0]} frames, which is not a multiple of the {n} "
                              "candidate latents; decode exactly the sampled batch")
    return images.reshape(n, images.shape[0] // n, *images.shape[1:])[..., :3].float().cpu()


def save_previews(frames: torch.Tensor, fps: float, tag: str) -> list[dict]:
    """One animated WEBP per candidate in ComfyUI's temp folder; returns /view descriptors."""
    sub = "physmaster"
    folder = os.path.join(folder_paths.get_temp_directory(), sub)
    os.makedirs(folder, exist_ok=True)
    out = []
    duration = int(round(1000 / max(fps, 1.0)))
    for i, video in enumerate(frames):
        pics = [Image.fromarray(np.clip(f.numpy() * 255 + 0.5, 0, 255).astype(np.uint8)) for f in video]
        name = f"pick_{tag}_{i}.webp"
        pics[0].save(os.path.join(folder, name), save_all=True, append_images=pics[1:], duration=duration,
                     loop=0, lossless=True)
        out.append({"filename": name, "subfolder": sub, "type": "temp"})
    return out


def judge_pairs(frames: torch.Tensor, fps: float, gt_masks) -> tuple[list[tuple[int, int, float]], list]:
    from ..physmaster.physics import rank_candidates

    videos = [v.numpy() for v in frames]
    gt = None if gt_masks is None else gt_masks.detach().float().cpu().numpy() > 0.5
    results, pairs = rank_candidates(videos, gt_masks=gt, fps=fps)
    return [(int(w), int(l), float(m)) for w, l, m in pairs], results


class PhysMasterPreferencePicker(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhysMasterPreferencePicker",
            display_name="PhysMaster Preference Picker",
            category=f"{CATEGORY}/training",
            description="Shows the N candidate videos of one start image in the node and waits for you to mark the "
                        "best and the worst (click, or keys 1..N; Shift+key = worst). The pair is written to a "
                        "preference dataset for Flow-DPO. Unattended, the physics judge decides.",
            is_output_node=True,
            not_idempotent=True,
            hidden=[io.Hidden.unique_id],
            inputs=[
                io.Latent.Input("latents", tooltip="The N candidates: one KSampler run with batch_size N."),
                io.Conditioning.Input("positive", tooltip="The positive conditioning they were sampled with, as "
                                                          "PhysMasterApply left it."),
                io.String.Input("dataset_name", default="my_preferences",
                                tooltip="Dataset folder in output/physmaster/preferences/ (letters, digits, . _ -)."),
                io.Combo.Input("mode", options=MODES, default="ask",
                               tooltip="'ask': wait for your choice. 'judge': the physics judge labels (unattended)."),
                io.Int.Input("timeout_seconds", default=600, min=1, max=86400,
                             tooltip="How long to wait for your choice."),
                io.Combo.Input("on_timeout", options=ON_TIMEOUT, default="skip",
                               tooltip="What happens when nobody answers in time: skip (no pair) or let the judge "
                                       "decide."),
                io.Float.Input("fps", default=16.0, min=1.0, max=120.0, step=1.0,
                               tooltip="Playback rate of the previews (and the judge's time step)."),
                io.Image.Input("images", optional=True,
                               tooltip="The decoded frames of all N candidates (VAEDecode of 'latents')."),
                io.Vae.Input("vae", optional=True, tooltip="Or a VAE to decode the latents here."),
                io.Mask.Input("ground_truth_masks", optional=True,
                              tooltip="Optional ground-truth object masks for the judge (proxy task)."),
            ],
            outputs=[
                io.Latent.Output(display_name="winner_latent"),
                io.Image.Output(display_name="winner_frames"),
                io.Int.Output(display_name="pair_count", tooltip="Usable pairs in the dataset now."),
                io.String.Output(display_name="report"),
            ],
        )

    @classmethod
    def execute(cls, latents, positive, dataset_name: str, mode: str, timeout_seconds: int, on_timeout: str,
                fps: float, images=None, vae=None, ground_truth_masks=None) -> io.NodeOutput:
        validate_name(dataset_name)
        if mode not in MODES or on_timeout not in ON_TIMEOUT:
            raise PhysMasterError(f"mode must be one of {MODES} and on_timeout one of {ON_TIMEOUT}")
        samples = latents["samples"]
        n = int(samples.shape[0])
        if n < 2:
            raise PhysMasterError(f"the picker got a batch of {n} candidate: set the sampler's latent batch_size "
                                  "to 2 or more (e.g. WanImageToVideo batch_size) so there is something to compare")
        context, extras, meta = group_tensors(positive)
        dataset = PreferenceDataset.open(preferences_root(), dataset_name, create=True)
        dataset.check_compatible(list(samples.shape[1:]), int(context.shape[-1]))
        frames = candidate_frames(latents, images, vae, n)

        source, choice, pairs, note = "human", None, [], ""
        server = PromptServer.instance
        node_id = str(cls.hidden.unique_id)

        def tell(request_id: str, message: str) -> None:
            """End the request in the browser with what became of it."""
            server.send_sync("physmaster.pick_done", {"request_id": request_id, "node_id": node_id,
                                                      "message": message}, server.client_id)

        if mode == "ask":
            request_id = routes.PENDING.create(n, node_id)
            previews = save_previews(frames, fps, request_id[:12])
            server.send_sync("physmaster.pick", {"request_id": request_id, "node_id": node_id,
                                                 "candidates": previews, "timeout": timeout_seconds,
                                                 "on_timeout": on_timeout}, server.client_id)
            try:
                choice = routes.PENDING.wait(request_id, timeout_seconds,
                                             comfy.model_management.throw_exception_if_processing_interrupted)
            finally:
                if choice is None:  # no answer in time, or Cancel; an answer is ended once it is saved (below)
                    tell(request_id, "stopped waiting")
            if choice is None:
                note = f"no answer within {timeout_seconds}s: {on_timeout}"
                if on_timeout == "judge":
                    source = "judge"
            else:
                pairs = [(w, l, 1.0) for w, l in choice_to_pairs(choice)]
                note = "skipped by the user" if choice.get("skip") else "marked by the user"
        else:
            source = "judge"
        results = None
        if source == "judge":
            pairs, results = judge_pairs(frames, fps, ground_truth_masks)
            note = (note + "; " if note else "") + f"judge: {len(pairs)} pairs above the margin"

        if choice and "ranking" in choice:
            winner = choice["ranking"][0]
        elif choice and "best" in choice:
            winner = choice["best"]
        elif pairs:
            winner = pairs[0][0]
        elif results:
            winner = int(np.argmax([r.score for r in results]))
        else:
            winner = 0
        if pairs:
            try:  # the whole answer (the group and all its pairs) in one append, or nothing of it
                dataset.add_group_with_pairs(samples, context, pairs, source, extras,
                                             meta={**meta, "node": node_id, "fps": fps})
            except DatasetError as e:  # e.g. a full disk: the message says nothing of the answer was saved
                if choice is not None:
                    tell(request_id, f"NOT saved: {e}")
                whose = "your answer" if source == "human" else "the judge's answer"
                raise PhysMasterError(f"{whose} ({len(pairs)} pair{'s' if len(pairs) != 1 else ''}) for preference "
                                      f"dataset {dataset_name!r} was not saved: {e}") from e
        if choice is not None:
            tell(request_id, f"Saved {len(pairs)} pair{'s' if len(pairs) != 1 else ''} to {dataset_name}."
                 if pairs else "answered: skipped, nothing saved")
        stats = dataset.stats()
        report = json.dumps({"dataset": dataset_name, "candidates": n, "source": source, "pairs_written": len(pairs),
                             "winner": winner, "note": note, "dataset_stats": stats.summary()})
        log.info("PhysMaster picker: %s", report)
        winner_latent = {"samples": samples[winner:winner + 1].clone()}
        return io.NodeOutput(winner_latent, frames[winner].clone(), stats.pairs, report,
                             ui={"text": [report]})


class PhysMasterPreferenceDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhysMasterPreferenceDataset",
            display_name="PhysMaster Preference Dataset",
            category=f"{CATEGORY}/training",
            description="Open a preference dataset (output/physmaster/preferences/<name>) for PhysMasterTrainDPO.",
            not_idempotent=True,
            inputs=[
                io.String.Input("dataset_name", default="my_preferences",
                                tooltip="A dataset written by PhysMasterPreferencePicker."),
                io.Combo.Input("sources", options=["human and judge", "human only", "judge only"],
                               default="human and judge", tooltip="Which labels to train on."),
            ],
            outputs=[
                PhysPreferencesType.Output(display_name="preferences"),
                io.String.Output(display_name="stats"),
            ],
        )

    @classmethod
    def execute(cls, dataset_name: str, sources: str) -> io.NodeOutput:
        dataset = PreferenceDataset.open(preferences_root(), dataset_name)
        pairs, stats = dataset.read_pairs()
        keep = {"human and judge": ("human", "judge"), "human only": ("human",), "judge only": ("judge",)}[sources]
        pairs = [p for p in pairs if p.source in keep]
        # read_pairs checked every group as training will (latent count vs metadata and indices, latent shape,
        # context width), from the file headers: a tampered group is named here and its pairs skipped, not found later
        problems = stats.group_report()
        text = stats.summary()
        if problems:
            text += f"; {len(problems)} group{'s' if len(problems) != 1 else ''} unusable for training: " + \
                "; ".join(problems) + f"; {len(pairs)} pairs left to train on"
        if not pairs:
            raise PhysMasterError(f"preference dataset {dataset_name!r} has no usable {sources} pairs "
                                  f"({text}); mark some with PhysMasterPreferencePicker first")
        return io.NodeOutput({"dataset": dataset, "pairs": pairs, "stats": stats, "problems": problems}, text,
                             ui={"text": [text]})

    @classmethod
    def fingerprint_inputs(cls, dataset_name: str, sources: str):
        return secrets.token_hex(8)  # the dataset grows between runs: always re-read it
