"""PISA-style drop proxy task: scenes, PISA metrics, an object segmenter and a physics judge.

Pure numpy / torch / pillow; never imports ComfyUI. See shared/DESIGN.md sections 1 and 6.
"""

from .corrupt import CORRUPTIONS, corrupt
from .dataset import write_split
from .judge import JudgeResult, gt_similarity, judge, rank_candidates, trajectory_overlay
from .metrics import pisa_metrics
from .scene import (BACKGROUNDS, COLOURS, NOMINAL_GRAVITY, SHAPES, SPLITS, TEXTURES, Scene, render_scene)
from .segment import mask_centroids, segment_object

__all__ = [
    "BACKGROUNDS", "COLOURS", "CORRUPTIONS", "NOMINAL_GRAVITY", "SHAPES", "SPLITS", "TEXTURES",
    "JudgeResult", "Scene", "corrupt", "gt_similarity", "judge", "mask_centroids", "pisa_metrics", "rank_candidates",
    "render_scene", "segment_object", "trajectory_overlay", "write_split",
]
