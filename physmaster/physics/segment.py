"""Masks of one moving object from a video, without ground truth or a big model (numpy only)."""

from __future__ import annotations

import numpy as np

from ._video import as_video
from ..errors import PhysMasterError

_SHIFTS8 = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]


def _shift(a: np.ndarray, dy: int, dx: int, fill) -> np.ndarray:
    """a shifted by (dy, dx) along its last two axes: out[..., y, x] = a[..., y - dy, x - dx]."""
    out = np.full_like(a, fill)
    H, W = a.shape[-2:]
    ys, yd = (slice(0, H - dy), slice(dy, H)) if dy >= 0 else (slice(-dy, H), slice(0, H + dy))
    xs, xd = (slice(0, W - dx), slice(dx, W)) if dx >= 0 else (slice(-dx, W), slice(0, W + dx))
    out[..., yd, xd] = a[..., ys, xs]
    return out


def dilate(m: np.ndarray) -> np.ndarray:
    """Binary dilation with a 3x3 square (last two axes)."""
    out = m.copy()
    for dy, dx in _SHIFTS8:
        out |= _shift(m, dy, dx, False)
    return out


def erode(m: np.ndarray) -> np.ndarray:
    """Binary erosion with a 3x3 square (last two axes); outside the image counts as set."""
    out = m.copy()
    for dy, dx in _SHIFTS8:
        out &= _shift(m, dy, dx, True)
    return out


def max_filter(a: np.ndarray) -> np.ndarray:
    out = a.copy()
    for dy, dx in _SHIFTS8:
        np.maximum(out, _shift(a, dy, dx, 0), out=out)
    return out


def label(m: np.ndarray, connectivity: int = 8) -> np.ndarray:
    """Connected components of a bool array [..., H, W] (per 2D slice). Returns int64 labels, -1 for unset.

    Each component is labelled with the smallest flat index of its pixels: min-label propagation over the
    neighbours plus pointer jumping (label <- label[label]), which converges in a few dozen vectorised sweeps.
    """
    shape = m.shape
    n = m.size
    big = np.int64(n)
    lab = np.where(m, np.arange(n, dtype=np.int64).reshape(shape), big)
    shifts = _SHIFTS8 if connectivity == 8 else [(-1, 0), (1, 0), (0, -1), (0, 1)]
    flat_m = m.reshape(-1)
    for _ in range(10 * (shape[-1] + shape[-2])):
        new = lab.copy()
        for dy, dx in shifts:
            np.minimum(new, _shift(lab, dy, dx, big), out=new)
        new = np.where(m, new, big)
        f = new.reshape(-1)
        for _j in range(4):  # pointer jumping: follow each label to its own label
            idx = f[flat_m]
            f[flat_m] = f[np.minimum(idx, n - 1)]
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(m, lab, -1)


def _crop_boxes(m: np.ndarray):
    """Per-frame bounding boxes of a bool [T, H, W] array and one crop size that holds them all (+1 margin)."""
    T, H, W = m.shape
    rows, cols = m.any(2), m.any(1)
    has = rows.any(1)
    r0 = np.where(has, rows.argmax(1), 0)
    r1 = np.where(has, H - rows[:, ::-1].argmax(1), 0)
    c0 = np.where(has, cols.argmax(1), 0)
    c1 = np.where(has, W - cols[:, ::-1].argmax(1), 0)
    h = int((r1 - r0).max(initial=0)) + 2
    w = int((c1 - c0).max(initial=0)) + 2
    return r0, r1, c0, c1, h, w


def _per_frame(m: np.ndarray, fn) -> np.ndarray:
    """Apply fn (bool [T, h, w] -> bool [T, h, w]) to per-frame crops around the set pixels of m."""
    T, H, W = m.shape
    r0, r1, c0, c1, h, w = _crop_boxes(m)
    if h * w * 2 > H * W:  # crops would not save anything
        return fn(m)
    crop = np.zeros((T, h, w), bool)
    for t in range(T):
        crop[t, 1:1 + r1[t] - r0[t], 1:1 + c1[t] - c0[t]] = m[t, r0[t]:r1[t], c0[t]:c1[t]]
    res = fn(crop)
    out = np.zeros_like(m)
    for t in range(T):
        out[t, r0[t]:r1[t], c0[t]:c1[t]] = res[t, 1:1 + r1[t] - r0[t], 1:1 + c1[t] - c0[t]]
    return out


def _largest_component_full(m: np.ndarray) -> np.ndarray:
    T, H, W = m.shape
    lab = label(m)
    flat = lab.reshape(T, -1)
    counts = np.bincount(flat[flat >= 0], minlength=T * H * W).reshape(T, H * W)
    best = counts.argmax(1)
    has = counts.max(1) > 0
    out = (flat == (best + np.arange(T) * H * W)[:, None]) & has[:, None]
    return out.reshape(T, H, W)


def largest_component(m: np.ndarray) -> np.ndarray:
    """Keep the largest 8-connected component in each frame of bool [T, H, W]."""
    return _per_frame(m, _largest_component_full)


def fill_holes(m: np.ndarray) -> np.ndarray:
    """Set the unset pixels of each frame that are not 4-connected to the image border."""
    T, H, W = m.shape
    bg = ~m
    lab = label(bg, connectivity=4)
    border = np.zeros((H, W), bool)
    border[0, :] = border[-1, :] = border[:, 0] = border[:, -1] = True
    outside_labels = np.unique(lab[:, border][lab[:, border] >= 0])
    outside = np.isin(lab, outside_labels)
    return m | (bg & ~outside)


def _colour_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d = a - b
    return np.sqrt(d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1] + d[..., 2] * d[..., 2])


def temporal_median(video: np.ndarray) -> np.ndarray:
    """Per-pixel temporal median [H, W, 3], taken on luminance: each pixel's colour is that of its frame of
    median luminance (the lower middle one for an even count), so it is always a colour the pixel showed."""
    import torch

    if video.shape[0] > 20:  # an evenly spaced subset of frames is as good a median and twice as fast
        video = video[np.linspace(0, video.shape[0] - 1, 17).round().astype(int)]
    T, H, W, _ = video.shape
    lum = video[..., 0] * 0.299 + video[..., 1] * 0.587 + video[..., 2] * 0.114
    lum = lum + video[..., 2] * 1e-3  # break ties between colours of equal luminance consistently
    idx = torch.from_numpy(np.ascontiguousarray(lum.reshape(T, -1).T)).median(dim=1).indices.numpy()
    flat = video.reshape(T, H * W, 3)
    return flat[idx, np.arange(H * W)].reshape(H, W, 3)


def estimate_background(video: np.ndarray, med: np.ndarray | None = None, noise: float | None = None) -> np.ndarray:
    """Static background [H, W, 3] of a video of one moving object.

    Start from the per-pixel temporal median. Where the first and last frames differ (the object's start and
    end positions), the median is the object itself when the object rests there for more than half the
    video. Those regions are split into connected components and each component's "switch time" (how many
    frames look like the first frame there) is measured: the object leaves its start region before it
    reaches its end region, so the earliest-switching component takes its background from the last frame and
    the latest-switching one from the first frame.
    """
    T = video.shape[0]
    med = temporal_median(video) if med is None else med
    if T < 3:
        return med
    first, last = video[0], video[-1]
    if noise is None:
        noise = noise_threshold(video, med)
    diff = _colour_distance(first, last) > noise
    if diff.sum() < 2:
        return med
    lab = label(diff[None])[0]
    ids, counts = np.unique(lab[lab >= 0], return_counts=True)
    keep = ids[counts >= max(3, 0.1 * counts.max())]
    if len(keep) < 2:
        return med
    ys, xs = np.nonzero(diff)
    seq = video[:, ys, xs]  # [T, N, 3]
    like_first = (_colour_distance(seq, first[ys, xs][None]) < _colour_distance(seq, last[ys, xs][None])).sum(0)
    labs = lab[ys, xs]
    tau = np.array([like_first[labs == i].mean() for i in keep])
    if tau.max() - tau.min() < 1.0:
        return med
    start, end = keep[int(tau.argmin())], keep[int(tau.argmax())]
    bg = med.copy()
    bg[lab == start] = last[lab == start]
    bg[lab == end] = first[lab == end]
    return bg


def noise_threshold(video: np.ndarray, bg: np.ndarray) -> float:
    """Distance above which a pixel differs from the background: 5 robust sigmas, at least 0.04."""
    import torch

    d = _colour_distance(video[:, ::2, ::2], bg[None, ::2, ::2]).reshape(-1)
    sigma = 1.4826 * float(torch.from_numpy(np.ascontiguousarray(d)).median())
    return max(0.04, 5.0 * sigma)


def _object_colours(video: np.ndarray, core: np.ndarray, k: int = 2) -> np.ndarray:
    """Up to k representative object colours (k-means on the core pixels)."""
    px = video[core]
    if len(px) > 1500:
        px = px[:: len(px) // 1500 + 1]
    if len(px) == 0:
        return np.zeros((0, 3), np.float32)
    lum = px @ np.array([0.3, 0.59, 0.11], np.float32)
    centres = np.stack([px[lum.argmin()], px[lum.argmax()]])[:k]
    for _ in range(4):
        a = ((px[:, None] - centres[None]) ** 2).sum(-1).argmin(1)
        centres = np.stack([px[a == j].mean(0) if (a == j).any() else centres[j] for j in range(len(centres))])
    if len(centres) == 2 and np.linalg.norm(centres[0] - centres[1]) < 0.08:
        centres = px.mean(0, keepdims=True)
    return centres.astype(np.float32)


def _neighbours(m: np.ndarray) -> np.ndarray:
    n = np.zeros(m.shape, np.int8)
    for dy, dx in _SHIFTS8:
        n += _shift(m, dy, dx, False)
    return n


def segment_object(frames, return_details: bool = False, first_mask=None):
    """Masks bool [T, H, W] of the one moving object in a video (float [T, H, W, 3] in [0, 1]).

    Method: estimate the static background (per-pixel temporal median, with the first/last-frame correction
    of `estimate_background`), take each pixel's colour distance to it and keep pixels above an adaptive
    noise floor (5 robust sigmas of the distance, at least 0.04). Anti-aliased edges are decided by coverage:
    the object's colours are estimated (2-means over candidate pixels with a full 4-neighbourhood) and each
    candidate pixel is projected on the line from its background colour to the nearest object colour; it is
    object where that coverage is at least 1/2 (the rule the ground-truth masks use). Clean-up: a
    neighbour-count opening/closing (drop pixels with fewer than 2 of 8 neighbours set, add pixels with at
    least 6), the largest 8-connected component per frame, and hole filling.

    Limits: the camera must be static and the lighting constant; exactly one object may move (other moving
    things compete for "largest component"); the object must move far enough that the background is seen at
    every pixel it covers at some time (a still object is background); a pixel the object covers in more
    than half the frames takes the object's colour as "background" (only the object's first and last
    positions are corrected), which eats part of the mask there — e.g. a large object that keeps bouncing
    low over one spot; it must differ in colour from the background (distance above the
    noise floor); shadows and reflections that move with the object are counted as object; an object that
    enters or leaves the frame is only segmented where visible; frames without the object get empty masks.
    Needs at least 2 frames.

    `first_mask` (bool [H, W], the object's mask in the first frame): in image-to-video the start image is given,
    so, as PISA's evaluation prompts SAM 2 with the object in the first frame, the background and the object's
    colours are taken from the first frame (`reference_from_first_frame`) instead of from the motion. This
    lifts the limits above that come from the temporal median (an object resting over one spot for half the
    video, an object that barely moves).
    """
    video = as_video(frames, "frames", min_frames=2)
    T, H, W, _ = video.shape
    if first_mask is not None:
        bg, colours, noise = reference_from_first_frame(video, first_mask)
        d = _colour_distance(video, bg[None])
        cand = d > noise
    else:
        med = temporal_median(video)
        noise = noise_threshold(video, med)
        bg = estimate_background(video, med, noise)
        d = _colour_distance(video, bg[None])  # [T, H, W]
        cand = d > noise
        core = cand.copy()
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            core &= _shift(cand, dy, dx, False)
        colours = _object_colours(video, core if core.sum() >= 8 else cand)
    fg = cand.copy()
    if len(colours):
        ti, yi, xi = np.nonzero(cand)
        a = video[ti, yi, xi] - bg[yi, xi]  # [N, 3]
        best_c = np.zeros(len(a), np.float32)
        best_r = np.full(len(a), np.inf, np.float32)
        for o in colours:
            e = o[None] - bg[yi, xi]
            ee = np.maximum((e * e).sum(1), noise * noise)
            c = (a * e).sum(1) / ee
            r = np.sqrt(((a - c[:, None] * e) ** 2).sum(1))
            take = r < best_r
            best_c[take], best_r[take] = c[take], r[take]
        fg[ti, yi, xi] = best_c >= 0.5
    n = _neighbours(fg)
    fg = (fg & (n >= 2)) | (~fg & cand & (n >= 6))
    cleaned = fg
    fg = largest_component(fg)
    fg = _per_frame(fg, fill_holes)
    if return_details:
        return fg, {"background": bg, "distance": d, "noise": noise, "colours": colours, "foreground": cleaned}
    return fg


RING_SAMPLES, UNDER_CHUNK = 256, 4096  # `background_under`: at most 256 x 4096 weights at once (4 MB)


def background_under(video: np.ndarray, under: np.ndarray) -> np.ndarray:
    """The background [N, 3] at the N set pixels of `under` (bool [H, W]: where the first frame shows the object),
    from the later frames: at each pixel, the colour a later frame shows there that is nearest to the background
    around it (the inverse-squared-distance mean of the first frame's one-pixel ring outside `under`), so always a
    colour the pixel showed. A per-pixel temporal median would take the object's colour wherever the object covers
    the pixel in most later frames: a bouncy object back near its start, an object that falls late or slowly.
    Without a ring (`under` covers the image), the temporal median. Memory stays bounded on large frames: at most
    `RING_SAMPLES` ring pixels (evenly spaced), pixels `UNDER_CHUNK` at a time."""
    ys, xs = np.nonzero(under)
    ring = dilate(under[None])[0] & ~under
    if not ring.any():
        return temporal_median(video[1:])[ys, xs]
    ry, rx = np.nonzero(ring)
    if len(ry) > RING_SAMPLES:
        keep = np.linspace(0, len(ry) - 1, RING_SAMPLES).round().astype(int)
        ry, rx = ry[keep], rx[keep]
    ring_colours = video[0][ry, rx]
    guess = np.empty((len(ys), 3), np.float32)
    for a in range(0, len(ys), UNDER_CHUNK):
        y, x = ys[a:a + UNDER_CHUNK], xs[a:a + UNDER_CHUNK]
        d2 = (y[:, None] - ry[None]).astype(np.float32) ** 2 + (x[:, None] - rx[None]).astype(np.float32) ** 2
        w = 1.0 / d2  # under and ring are disjoint: d2 >= 1
        guess[a:a + UNDER_CHUNK] = (w @ ring_colours) / w.sum(1, keepdims=True)
    seen = video[1:, ys, xs]  # [T - 1, N, 3]
    pick = _colour_distance(seen, guess[None]).argmin(0)
    return seen[pick, np.arange(len(ys))]


def reference_from_first_frame(video: np.ndarray, first_mask) -> tuple[np.ndarray, np.ndarray, float]:
    """Background [H, W, 3], object colours [k, 3] and the noise floor of a video whose first-frame object mask
    is known: the background is the first frame, except under the object (dilated by one pixel for its
    anti-aliased edge), where it is what the later frames show there once the object has left (`background_under`);
    the object's colours are the 2-means of its first-frame pixels (eroded by one pixel when that leaves any),
    plus their mean when there are two (a blurred pattern shows its mean colour)."""
    fm = np.asarray(first_mask, dtype=bool)
    if fm.shape != video.shape[1:3]:
        raise PhysMasterError(f"first_mask is {fm.shape[0]}x{fm.shape[1]} but the frames are "
                              f"{video.shape[1]}x{video.shape[2]}; pass the object's mask in the first frame")
    under = dilate(fm[None])[0]
    bg = video[0].copy()
    if len(video) > 1 and under.any():
        bg[under] = background_under(video, under)
    core = erode(fm[None])[0]
    own = (core if core.sum() >= 4 else fm)[None]
    colours = _object_colours(video[:1], own)
    if len(colours) > 1:  # a pattern blurred (by motion, by a video model) shows its mean colour
        colours = np.concatenate([colours, video[:1][own].mean(0, keepdims=True)]).astype(np.float32)
    noise = noise_threshold(video, bg)
    if fm.any() and len(colours):
        # the floor must stay below the object's own contrast, or a faint object would vanish
        contrast = float(np.median(_colour_distance(video[0][fm], bg[fm])))
        noise = min(noise, max(0.04, 0.5 * contrast))
    return bg, colours, noise


def mask_centroids(masks: np.ndarray) -> np.ndarray:
    """Centroid (x, y) per frame of bool [T, H, W] masks, NaN where empty (PISA's find_centroid)."""
    T, H, W = masks.shape
    area = masks.sum((1, 2)).astype(np.float64)
    ys = np.arange(H, dtype=np.float64)
    xs = np.arange(W, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (masks.sum(1) * xs).sum(1) / area
        cy = (masks.sum(2) * ys).sum(1) / area
    out = np.stack([cx, cy], 1)
    out[area == 0] = np.nan
    return out


def check_same_size(a: np.ndarray, b: np.ndarray, what_a: str, what_b: str) -> None:
    if a.shape[-2:] != b.shape[-2:]:
        raise PhysMasterError(
            f"{what_a} are {a.shape[-2]}x{a.shape[-1]} but {what_b} are {b.shape[-2]}x{b.shape[-1]}; "
            "resize one to the other's size first")
