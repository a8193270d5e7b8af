"""Exporting training data from the graph for the train CLIs (`python -m physmaster train-sft`)."""

from __future__ import annotations

import json
import logging
import os

from comfy_api.latest import io

import folder_paths

from ..physmaster.errors import PhysMasterError
from ..physmaster.preferences import validate_name
from ..physmaster.videoset import VideoDataset
from .preference_nodes import group_tensors
from .types import CATEGORY

log = logging.getLogger("physmaster")


def videos_root() -> str:
    return os.path.join(folder_paths.get_output_directory(), "physmaster", "videos")


class PhysMasterSaveTrainingVideos(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhysMasterSaveTrainingVideos",
            display_name="PhysMaster Save Training Videos",
            category=f"{CATEGORY}/training",
            description="Saves clean video latents (VAEEncode of real videos) with the conditioning PhysMasterApply "
                        "made for them to a video set in output/physmaster/videos/<name>/, for Stage I SFT outside "
                        "the graph: python -m physmaster train-sft --videos <that folder> (or accelerate launch -m "
                        "...).",
            is_output_node=True,
            not_idempotent=True,
            inputs=[
                io.Latent.Input("latents", tooltip="Clean video latents, batch = videos."),
                io.Conditioning.Input("positive", tooltip="Their conditioning from PhysMasterApply: one entry for all "
                                                          "videos, or one per video."),
                io.String.Input("dataset_name", default="my_videos",
                                tooltip="Video set folder in output/physmaster/videos/ (letters, digits, . _ -)."),
            ],
            outputs=[io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, latents, positive, dataset_name: str) -> io.NodeOutput:
        validate_name(dataset_name)
        samples = latents["samples"]
        if samples.ndim != 5:
            raise PhysMasterError(f"the latents are shaped {list(samples.shape)}, not [videos, C, T, H, W]: connect "
                                  "the VAEEncode of a video (a video model's latent)")
        n = int(samples.shape[0])
        if len(positive) not in (1, n):
            raise PhysMasterError(f"positive has {len(positive)} entries for {n} videos: give one shared entry or one "
                                  "per video")
        dataset = VideoDataset.open(videos_root(), dataset_name, create=True)
        ids = []
        if len(positive) == 1:
            context, extras, meta = group_tensors(positive)
            ids.append(dataset.add_videos(samples, context, extras, meta))
        else:
            for i in range(n):
                context, extras, meta = group_tensors([positive[i]])
                ids.append(dataset.add_videos(samples[i:i + 1], context, extras, meta))
        usable, problems = dataset.read()
        report = json.dumps({"dataset": dataset_name, "saved_videos": n, "files": len(ids),
                             "videos_in_set": sum(usable.values()), "folder": str(dataset.path),
                             "problems": problems[:5]})
        log.info("PhysMaster training videos: %s", report)
        return io.NodeOutput(report, ui={"text": [report]})
