"""Scoring generated videos against the proxy world's ground truth: PISA's metrics, coherence, intervals.

- PISA metrics (`physics.pisa_metrics`: L2, Chamfer distance, IoU) of the object the segmenter finds in each
  generated video (seeded, as PISA prompts SAM 2, with the object's mask in the start image, which image-to-video
  shares with the ground truth) against the ground-truth masks, averaged over the videos of a scene (the same noises for
  every model), so every row is a per-scene array and rows can be compared scene by scene.
- **Coherence**: the fraction of generated frames in which the segmenter finds the object as *one* component
  (the largest connected component holds at least 90% of the foreground the segmenter keeps) whose area is
  within a factor 2 of the ground truth's. A video of fragments, smears or a vanished object scores low,
  whatever its centroid does. Each other frame is counted by why it misses (`coherence_parts`: lost,
  fragments, too small, too large), as `miss_*` per scene: whether a row falls short by losing the object or
  by drawing it badly.
- **Where L2 comes from** (`physics.pisa_metrics(..., parts=True)`): a frame where the object is lost costs
  1/sqrt(2), more than any real centroid error, so a row's L2 is its lost frames' share (`l2_lost`) plus its
  located frames' errors. `l2_found` is the mean centroid error over the frames where the object is found
  (PISA's released L2): where the object goes when it is there. A row that keeps the object in more hard frames
  finds it where it is harder to place, so rows are compared on `frame_l2` over the frames where *both* find it.
- **Material read**: how often a generated video is closer (PISA L2) to its drop rendered with its own
  material's restitution than with either other material's (chance: 1 in 3). The material shows only as a
  2-3 px surface pattern, only partly kept in the video model's latent (`bench/probe_latent_material.py`), so
  this is the physics the tokens can add to the first frame; compared with the tokens zeroed, it is the token
  influence on the bounce alone.
- **Material confusion** (`material_confusion`): which material's bounce each video is closest to, per own
  material, and what the misread bounces cost at most in avg L2; the **material-blind floor**
  (`material_blind_l2`): the avg L2 of a model perfect but for the material.
- Paired per-scene bootstrap 95% intervals of a row's difference against the row it builds on.
"""

from __future__ import annotations

import numpy as np

from ..physics import pisa_metrics, segment_object
from .world import FPS

MISSES = ("lost", "fragments", "too_small", "too_large")  # why a frame is not coherent, in the order checked
METRICS = ("l2", "chamfer", "iou", "coherence", "l2_lost", "l2_found") + tuple(f"miss_{m}" for m in MISSES)


def coherence_parts(details: dict, masks: np.ndarray, gt_masks: np.ndarray) -> dict:
    """Coherence and why the other frames miss it, as fractions of the frames where the truth shows the object
    (they sum to 1): "lost" (no object found), "fragments" (the largest component holds under 90% of the
    foreground), "too_small" / "too_large" (one component, area under half / over twice the truth's). A row
    whose misses are fragments and sizes draws the object in the right place but not whole: its error is the
    drawing, not the physics."""
    fg = details["foreground"]
    counts = dict.fromkeys(("coherence",) + MISSES, 0)
    for t in range(len(masks)):
        gt_area = float(gt_masks[t].sum())
        if gt_area == 0:
            continue
        area = float(masks[t].sum())
        total = float(fg[t].sum())
        if area == 0:
            counts["lost"] += 1
        elif area < 0.9 * total:
            counts["fragments"] += 1
        elif area < 0.5 * gt_area:
            counts["too_small"] += 1
        elif area > 2.0 * gt_area:
            counts["too_large"] += 1
        else:
            counts["coherence"] += 1
    n = sum(counts.values())
    if n == 0:
        return {"coherence": 1.0, **dict.fromkeys(MISSES, 0.0)}
    return {k: v / n for k, v in counts.items()}


def coherence(details: dict, masks: np.ndarray, gt_masks: np.ndarray) -> float:
    """Fraction of frames whose object is one component with an area within 2x of the ground truth's."""
    return coherence_parts(details, masks, gt_masks)["coherence"]


def score_video(frames: np.ndarray, gt_masks: np.ndarray) -> dict:
    """PISA metrics and coherence of one generated video [T, H, W, 3] against ground-truth masks [T, H, W]."""
    masks, details = segment_object(frames, return_details=True, first_mask=gt_masks[0])
    m = pisa_metrics(masks, gt_masks, pred_fps=FPS, gt_fps=FPS, parts=True)
    out = {k: float(m[k]) for k in ("l2", "chamfer", "iou", "l2_lost", "l2_found")}
    out["frame_l2"] = m["frame_l2"]
    parts = coherence_parts(details, masks, gt_masks)
    out["coherence"] = parts["coherence"]
    out.update({f"miss_{miss}": parts[miss] for miss in MISSES})
    return out


def score_scenes(videos: list[np.ndarray], scenes: list, per_scene: int) -> dict[str, np.ndarray]:
    """Per-scene means of `per_scene` consecutive videos per scene -> {metric: [n_scenes]} (`l2_found`: NaN for a
    scene whose object no video ever shows), plus `frame_l2` [n_scenes, per_scene * frames] (NaN where lost)."""
    out = {k: [] for k in METRICS}
    frames = []
    for j, s in enumerate(scenes):
        gt = s.object_masks()
        scores = [score_video(videos[j * per_scene + i], gt) for i in range(per_scene)]
        frames.append(np.concatenate([sc["frame_l2"] for sc in scores]))
        for k in METRICS:
            vals = np.array([sc[k] for sc in scores])
            # l2_found is NaN for a video whose object is never found: the scene's is over the videos that have one
            out[k].append(float(np.nanmean(vals)) if np.isfinite(vals).any() else float("nan"))
    return {**{k: np.array(v) for k, v in out.items()}, "frame_l2": np.stack(frames)}


def paired_found(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-scene mean of `frame_l2` a - b over the frames where both find the object ([n_scenes, F] each); scenes
    without such a frame are left out."""
    both = np.isfinite(a) & np.isfinite(b)
    n = both.sum(1)
    d = np.where(both, a - b, 0.0).sum(1)
    return d[n > 0] / n[n > 0]


def material_confusion(videos: list[np.ndarray], scenes: list, per_scene: int, renderings: list | None = None
                       ) -> dict:
    """Which material each video bounces like, over the drops whose materials' renderings differ
    (`world.material_renderings`, or `renderings`: those of `scenes`, made once for several video sets);
    `per_scene` consecutive videos per scene. Returns:

    - "order": the restitutions, ascending;
    - "counts" [3, 3]: row = the drop's own restitution, column = the restitution whose rendering of the drop is
      closest (PISA L2) to the video. A model that bounces every object alike fills one column; one that reads
      the material, the diagonal;
    - "gap" [n_scenes]: per scene, the mean over its videos of the L2 between the drop rendered with the material
      the video is read as and the truth (0 when read right or not counted). Moving a video's object by that
      rendering's difference changes its centroid error by at most the difference (triangle inequality, frame by
      frame), so this bounds what reading the material right could take off the row's avg L2, the rest equal."""
    from .world import MATERIALS, material_renderings

    order = tuple(sorted(r for _, r in MATERIALS.values()))
    if renderings is None:
        renderings = [material_renderings(s) for s in scenes]
    counts = np.zeros((len(order), len(order)), dtype=np.int64)
    gap = np.zeros(len(renderings))
    for j, alt in enumerate(renderings):
        if alt is None:
            continue
        masks, own = alt
        for i in range(per_scene):
            l2 = rendering_l2(videos[j * per_scene + i], masks)
            read = min(l2, key=l2.get)
            counts[order.index(own), order.index(read)] += 1
            if read != own:
                gap[j] += pisa_metrics(masks[read], masks[own], pred_fps=FPS, gt_fps=FPS)["l2"] / per_scene
    return {"order": order, "counts": counts, "gap": gap}


def rendering_l2(frames: np.ndarray, renderings: dict) -> dict:
    """PISA L2 of one generated video [T, H, W, 3] against each of a drop's renderings {key: masks [T, H, W]}: what
    `score_video(frames, masks)["l2"]` gives for each, with the video segmented once per distinct first mask (the
    segmenter's seed; a drop's materials share their start, so once in all) rather than once per rendering."""
    found = {}
    out = {}
    for key, gt in renderings.items():
        first = np.ascontiguousarray(gt[0])
        tag = (first.shape, first.tobytes())
        if tag not in found:
            found[tag] = segment_object(frames, first_mask=first)
        out[key] = float(pisa_metrics(found[tag], gt, pred_fps=FPS, gt_fps=FPS, parts=True)["l2"])
    return out


def material_read(videos: list[np.ndarray], scenes: list, per_scene: int, renderings: list | None = None
                  ) -> tuple[int, int]:
    """(videos closest to their own material's rendering, videos counted): the diagonal and the total of
    `material_confusion`."""
    counts = material_confusion(videos, scenes, per_scene, renderings)["counts"]
    return int(np.trace(counts)), int(counts.sum())


def material_blind_l2(scenes: list, restitution: float, renderings: list | None = None) -> np.ndarray:
    """Per scene, the avg L2 of a model perfect in everything but the material: the drop itself rendered with one
    `restitution` for every object, against the truth (0 where the materials' renderings do not differ). The
    smallest over the materials is what reading the material is worth to a model perfect in all else: what the
    physical tokens' physics is worth on this world (`bench/demo_token_ceiling.py`)."""
    from .world import drop_scene, material_renderings

    if renderings is None:
        renderings = [material_renderings(s) for s in scenes]
    out = []
    for s, alt in zip(scenes, renderings):
        if alt is None:
            out.append(0.0)
            continue
        masks, own = alt
        blind = masks.get(restitution)
        if blind is None:
            blind = drop_scene(s.meta["seed"], s.meta["split"], restitution=restitution).object_masks()
        out.append(float(pisa_metrics(blind, masks[own], pred_fps=FPS, gt_fps=FPS)["l2"]))
    return np.array(out)


def bootstrap_ci(diff: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap 95% interval of the mean of paired differences."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n, len(diff)))
    means = diff[idx].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))
