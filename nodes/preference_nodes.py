"""Marking preference pairs in the graph (PhysMasterPreferencePicker) and opening a dataset for training."""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading

import torch
from comfy_api.latest import io

import comfy.model_management
import folder_paths
from server import PromptServer

from ..physmaster.conditioning import RECORD_KEY, strip_tokens
from ..physmaster.errors import PhysMasterError
from ..physmaster.judge_labels import DEFAULT_MIN_CONFIDENCE, JudgeLabels, check_min_confidence, label_group
from ..physmaster.picker import RANKING_PAIRS, choice_pairs
from ..physmaster.preferences import DatasetError, PreferenceDataset, validate_name
from ..physmaster.previews import judge_tracks, save_sheet
from ..physmaster.review import review_listing
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
    """One sprite sheet per candidate (physmaster.previews) in ComfyUI's temp folder, served by the host's /view;
    returns the /view descriptors with each sheet's layout (frames, cols, rows, width, height) and the fps."""
    sub = "physmaster"
    folder = os.path.join(folder_paths.get_temp_directory(), sub)
    os.makedirs(folder, exist_ok=True)
    out = []
    for i, video in enumerate(frames):
        name = f"pick_{tag}_{i}.webp"
        layout = save_sheet(video.numpy(), os.path.join(folder, name))
        out.append({"filename": name, "subfolder": sub, "type": "temp", "fps": fps, **layout})
    return out


def send_tracks(frames: torch.Tensor, fps: float, request_id: str, node_id: str) -> threading.Thread:
    """Judge the candidates in the background while the person looks, and send the tracks for the overlay."""
    server = PromptServer.instance

    def work():
        try:
            tracks = judge_tracks(frames.numpy(), fps)
        except Exception as e:  # the overlay is optional: say why it is missing, never fail the pick
            log.warning("PhysMaster picker: no judge tracks for the overlay: %s", e)
            tracks = None
        server.send_sync("physmaster.pick_tracks", {"request_id": request_id, "node_id": node_id,
                                                    "tracks": tracks}, server.client_id)

    thread = threading.Thread(target=work, name="physmaster-pick-tracks", daemon=True)
    thread.start()
    return thread


def judge_labels(frames: torch.Tensor, fps: float, gt_masks, min_confidence: float) -> JudgeLabels:
    """The judge's pairs for the candidates (physmaster.judge_labels): confidences as margins, pairs below
    `min_confidence` skipped; bad video reported, never raised; wrong mask shapes a clear error."""
    gt = None if gt_masks is None else gt_masks.detach().float().cpu().numpy()
    return label_group([v.numpy() for v in frames], fps, min_confidence, gt)


class PhysMasterPreferencePicker(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhysMasterPreferencePicker",
            display_name="PhysMaster Preference Picker",
            category=f"{CATEGORY}/training",
            description="Shows the N candidate videos of one start image in the node, playing in sync, and waits "
                        "for you to mark the best and the worst (keys 1..N, Shift+key = worst) or to rank them all "
                        "(keys in order, '=' ties, Enter ends). The pairs are written to a preference dataset for "
                        "Flow-DPO; U undoes. Unattended, the physics judge decides.",
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
                io.Combo.Input("ranking_pairs", options=list(RANKING_PAIRS), default=RANKING_PAIRS[0], optional=True,
                               tooltip="The pairs a ranking writes: every ordered pair (what paper-style Flow-DPO "
                                       "prefers: all that you said), or only the best against each other one. "
                                       "Best/worst always writes one pair."),
                io.Float.Input("min_confidence", default=DEFAULT_MIN_CONFIDENCE, min=0.0, max=1.0, step=0.01,
                               optional=True,
                               tooltip="When the judge labels (mode 'judge', or on_timeout 'judge'): a pair whose "
                                       "judge confidence (0..1) is below this is skipped, not saved. The confidence "
                                       "of each saved pair is its margin in the dataset (Train DPO's margin_use "
                                       "can filter or weight by it). Your own answers are always saved."),
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
                fps: float, images=None, vae=None, ground_truth_masks=None,
                ranking_pairs: str = RANKING_PAIRS[0],
                min_confidence: float = DEFAULT_MIN_CONFIDENCE) -> io.NodeOutput:
        validate_name(dataset_name)
        min_confidence = check_min_confidence(min_confidence)
        if mode not in MODES or on_timeout not in ON_TIMEOUT:
            raise PhysMasterError(f"mode must be one of {MODES} and on_timeout one of {ON_TIMEOUT}")
        if ranking_pairs not in RANKING_PAIRS:
            raise PhysMasterError(f"ranking_pairs must be one of {list(RANKING_PAIRS)}, got {ranking_pairs!r}")
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
                                                 "on_timeout": on_timeout, "fps": fps,
                                                 "ranking_pairs": ranking_pairs}, server.client_id)
            send_tracks(frames, fps, request_id, node_id)
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
                pairs = choice_pairs(choice, ranking_pairs)  # margin: the rank gap (1 for best vs worst)
                note = "skipped by the user" if choice.get("skip") else "marked by the user"
                if "ranking" in choice and not pairs:
                    note = "ranked all candidates equal: no pair"
        else:
            source = "judge"
        labels = None
        if source == "judge":  # margins = the judge's confidences; pairs below min_confidence are not saved
            labels = judge_labels(frames, fps, ground_truth_masks, min_confidence)
            pairs = labels.pairs
            note = (note + "; " if note else "") + labels.note()

        if choice and "ranking" in choice:
            winner = choice["ranking"][0] if isinstance(choice["ranking"][0], int) else choice["ranking"][0][0]
        elif choice and "best" in choice:
            winner = choice["best"]
        elif labels is not None and labels.winner is not None:
            winner = labels.winner
        else:
            winner = 0
        group = None
        if pairs:
            try:  # the whole answer (the group and all its pairs) in one append, or nothing of it
                group, _ = dataset.add_group_with_pairs(samples, context, pairs, source, extras,
                                                        meta={**meta, "node": node_id, "fps": fps})
            except DatasetError as e:  # e.g. a full disk: the message says nothing of the answer was saved
                if choice is not None:
                    tell(request_id, f"NOT saved: {e}")
                whose = "your answer" if source == "human" else "the judge's answer"
                raise PhysMasterError(f"{whose} ({len(pairs)} pair{'s' if len(pairs) != 1 else ''}) for preference "
                                      f"dataset {dataset_name!r} was not saved: {e}") from e
        if choice is not None:
            if group is not None:
                routes.PENDING.saved(request_id, _undo_answer(dataset, group, len(pairs)))
            tell(request_id, f"Saved {len(pairs)} pair{'s' if len(pairs) != 1 else ''} to {dataset_name}."
                 if pairs else "answered: all equal, nothing saved" if "ranking" in choice
                 else "answered: skipped, nothing saved")
        stats = dataset.stats()
        fields = {"dataset": dataset_name, "candidates": n, "source": source, "pairs_written": len(pairs),
                  "winner": winner, "note": note, "dataset_stats": stats.summary()}
        if labels is not None:
            fields["judge"] = labels.report()
        report = json.dumps(fields)
        log.info("PhysMaster picker: %s", report)
        winner_latent = {"samples": samples[winner:winner + 1].clone()}
        return io.NodeOutput(winner_latent, frames[winner].clone(), stats.pairs, report,
                             ui={"text": [report]})


def _undo_answer(dataset: PreferenceDataset, group: str, count: int):
    """How the picker's "undo" takes a saved answer back: its group (made by this answer) is dropped with a
    tombstone, so every reader leaves its pairs out; nothing is rewritten."""
    def undo() -> str:
        dataset.drop_group(group, "undone in the picker")
        return (f"Undone: the {count} pair{'s' if count != 1 else ''} of this answer are dropped from "
                f"{dataset.name} (queue again to mark anew).")
    return undo


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


class PhysMasterPreferenceReview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhysMasterPreferenceReview",
            display_name="PhysMaster Preference Review",
            category=f"{CATEGORY}/training",
            description="Shows a preference dataset's groups with their pairs and its stats (pairs by source, groups, "
                        "candidates per group) in the node. Drop a wrong pair or a whole group with its button: a "
                        "tombstone line is appended (nothing is rewritten), and training and the stats leave the "
                        "dropped pairs out. Connect a VAE to see the candidates.",
            is_output_node=True,
            not_idempotent=True,
            inputs=[
                io.String.Input("dataset_name", default="my_preferences",
                                tooltip="A dataset written by PhysMasterPreferencePicker."),
                io.Int.Input("max_groups", default=20, min=1, max=1000,
                             tooltip="How many groups to list, newest first (the stats count all of them)."),
                io.Float.Input("fps", default=16.0, min=1.0, max=120.0, step=1.0,
                               tooltip="Playback rate of the previews (with a VAE)."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Decode the listed groups' candidates to show them (slow for large models)."),
            ],
            outputs=[
                io.String.Output(display_name="stats"),
                io.Int.Output(display_name="pair_count", tooltip="Usable pairs in the dataset (dropped ones left out)."),
            ],
        )

    @classmethod
    def execute(cls, dataset_name: str, max_groups: int, fps: float, vae=None) -> io.NodeOutput:
        dataset = PreferenceDataset.open(preferences_root(), dataset_name)
        previews: dict[str, list[dict]] = {}
        if vae is not None:
            for entry in review_listing(dataset, max_groups)["groups"]:
                if entry["candidates"] is None or entry["dropped"]:
                    continue
                comfy.model_management.throw_exception_if_processing_interrupted()
                latents = dataset.load_group(entry["id"])["latents"]
                frames = candidate_frames({"samples": latents}, None, vae, int(latents.shape[0]))
                previews[entry["id"]] = save_previews(frames, fps, f"review_{entry['id'][:12]}")
        token = routes.REVIEWS.create(dataset, max_groups, previews)
        listing = routes.REVIEWS.listing(token)
        text = listing["summary"]
        return io.NodeOutput(text, listing["stats"]["pairs"], ui={"physmaster_review": [listing], "text": [text]})

    @classmethod
    def fingerprint_inputs(cls, dataset_name: str, max_groups: int, fps: float, vae=None):
        return secrets.token_hex(8)  # the dataset changes between runs: always re-read it
