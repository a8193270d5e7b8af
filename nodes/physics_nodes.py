"""The drop proxy task in the graph: simulated scenes with ground truth, and the physics score."""

from __future__ import annotations

import json

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..physmaster.memory import check_fits, scene_bytes
from ..physmaster.physics import judge, mask_centroids, render_scene, trajectory_overlay
from .encoder_nodes import free_cpu_memory
from .types import CATEGORY

SPLITS = ["seen", "unseen"]


class PhysMasterDropScene(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhysMasterDropScene",
            display_name="PhysMaster Drop Scene",
            category=f"{CATEGORY}/proxy task",
            description="A simulated PISA-style scene: an object dropped onto a floor under gravity, with ground-truth "
                        "frames and masks. Use its first frame as an I2V start image and score the generated video "
                        "against the ground truth with PhysMaster Physics Score.",
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=True,
                             tooltip="The scene: the same seed and split always give the same scene."),
                io.Combo.Input("split", options=SPLITS, default="seen",
                               tooltip="'seen' or 'unseen' (held-out shapes, colours and backgrounds), like PisaBench."),
                io.Int.Input("size", default=64, min=16, max=1024, step=8, tooltip="Width and height in pixels."),
                io.Int.Input("frames", default=32, min=2, max=1024, tooltip="Number of frames."),
                io.Float.Input("fps", default=16.0, min=1.0, max=240.0, step=1.0, tooltip="Frames per second."),
            ],
            outputs=[
                io.Image.Output(display_name="start_image", tooltip="The first frame."),
                io.Image.Output(display_name="ground_truth", tooltip="All frames of the true motion."),
                io.Mask.Output(display_name="masks", tooltip="Per-frame mask of the dropped object."),
                io.String.Output(display_name="metadata", tooltip="The scene's parameters as JSON."),
            ],
        )

    @classmethod
    def execute(cls, seed: int, split: str, size: int, frames: int, fps: float) -> io.NodeOutput:
        check_fits(f"a drop scene of {frames} frames at {size}x{size}", scene_bytes(size, frames), free_cpu_memory(),
                   "lower size or frames (64 px and 32 frames need about 24 MiB; the proxy task uses 64-128 px).")
        scene = render_scene(seed, split=split, size=size, frames=frames, fps=fps)
        video = torch.from_numpy(np.ascontiguousarray(scene.frames, dtype=np.float32))
        masks = torch.from_numpy(scene.object_masks().astype(np.float32))
        return io.NodeOutput(video[:1].clone(), video, masks, json.dumps(scene.meta, sort_keys=True))


class PhysMasterPhysicsScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PhysMasterPhysicsScore",
            display_name="PhysMaster Physics Score",
            category=f"{CATEGORY}/proxy task",
            description="Score a video's physical plausibility: track the object, fit ballistic motion with bounces, "
                        "check gravity consistency and object persistence. With ground-truth masks, also PISA's "
                        "metrics (centroid L2, Chamfer distance, IoU).",
            is_output_node=True,
            inputs=[
                io.Image.Input("frames", tooltip="The video frames (e.g. VAEDecode output)."),
                io.Float.Input("fps", default=16.0, min=1.0, max=240.0, step=1.0, tooltip="Frame rate of the video."),
                io.Mask.Input("ground_truth_masks", optional=True,
                              tooltip="Optional ground-truth object masks (PhysMaster Drop Scene 'masks')."),
                io.Float.Input("ground_truth_fps", default=16.0, min=1.0, max=240.0, step=1.0, optional=True,
                               tooltip="Frame rate of the ground truth; it is subsampled to the video's rate."),
            ],
            outputs=[
                io.Float.Output(display_name="score", tooltip="Higher is more plausible."),
                io.String.Output(display_name="report", tooltip="All sub-scores and metrics as JSON."),
                io.Image.Output(display_name="overlay", tooltip="The frames with the tracked trajectory drawn "
                                                                "(ground truth in another colour)."),
            ],
        )

    @classmethod
    def execute(cls, frames, fps: float, ground_truth_masks=None, ground_truth_fps: float = 16.0) -> io.NodeOutput:
        video = frames.detach().float().cpu().numpy()
        gt = None if ground_truth_masks is None else ground_truth_masks.detach().float().cpu().numpy() > 0.5
        result = judge(video, gt_masks=gt, fps=fps, gt_fps=ground_truth_fps if gt is not None else None)
        gt_track = None
        if gt is not None:  # ground truth at its own rate -> the video's frames (PISA's int(i * gt_fps / fps))
            index = [min(int(i * ground_truth_fps / fps), len(gt) - 1) for i in range(len(video))]
            gt_track = mask_centroids(gt)[index]
        overlay = trajectory_overlay(video, result.track, gt_track=gt_track)
        report = {"score": result.score, "found": result.found, "reason": result.reason,
                  "components": result.components, "metrics": result.metrics}
        text = json.dumps(report, sort_keys=True, default=float)
        overlay_t = torch.from_numpy(np.ascontiguousarray(overlay, dtype=np.float32))
        preview = ui.PreviewImage(overlay_t, animated=True, cls=cls).as_dict()
        preview["text"] = [text]
        return io.NodeOutput(float(result.score), text, overlay_t, ui=preview)
