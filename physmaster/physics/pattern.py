"""Reading an object's surface pattern from one image, without learning: plain, stripes or a checkerboard.

The proxy world draws each object plain or with one of two two-colour patterns (`scene.TEXTURES`), and a world may
tie an object's material to it (the demo's: plain clay, striped wood, chequered rubber). A judge that reads the
pattern from the start image knows how the object will bounce. The read is geometric, not colour-based, so it holds
on any colours (a recoloured start image, an unseen palette):

* **spread**: the 80th percentile, over the object's inner pixels (its mask eroded once, so that its antialiased
  rim does not count), of each pixel's colour distance to their median colour. A plain object is one colour
  (spread ~0); a pattern's second colour stands out from the first by the world's contrast rule.
* **coherence** of the colour gradient over those pixels (the structure tensor's (l1 - l2) / (l1 + l2)): a stripe
  pattern changes colour along one direction only (near 1), a checkerboard along two (near 0).

On the demo's DPO start images (96 per seed, half recoloured), with the judge's own start mask
(`tracking.reference_mask`), the read was right on 98% / 99% of seeds 0 / 1 (every recoloured one); the
demo's backbone, trained to read the material, got 70% (50% of the recoloured ones).
"""

from __future__ import annotations

import numpy as np

from .segment import _colour_distance, erode

PLAIN_SPREAD = 0.1  # below: one colour (1200 clean drops: plain objects read 0, patterned ones 0.18-0.48, 5th-95th)
STRIPE_COHERENCE = 0.5  # above: stripes (clean stripes read 0.80-1.0, checkerboards 0.01-0.28, 5th-95th)


def pattern_features(image: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(spread, coherence) of the object under `mask` [H, W] in `image` [H, W, 3] in [0, 1] (module docstring);
    (0, 0) for an empty mask."""
    mask = np.asarray(mask, bool)
    if not mask.any():
        return 0.0, 0.0
    inner = erode(mask[None])[0]
    if inner.sum() < 4:
        inner = mask
    px = image[inner].astype(np.float64)
    spread = float(np.percentile(_colour_distance(px, np.median(px, 0)[None]), 80))
    img = image.astype(np.float64)
    gy, gx = np.zeros_like(img), np.zeros_like(img)
    gy[1:-1] = (img[2:] - img[:-2]) / 2
    gx[:, 1:-1] = (img[:, 2:] - img[:, :-2]) / 2
    jxx, jyy, jxy = ((gx * gx).sum(-1)[inner].sum(), (gy * gy).sum(-1)[inner].sum(),
                     (gx * gy).sum(-1)[inner].sum())
    trace = jxx + jyy
    if trace <= 1e-12:
        return spread, 0.0
    root = float(np.sqrt(max((jxx - jyy) ** 2 / 4 + jxy * jxy, 0.0)))  # (l1 - l2) / 2
    return spread, 2.0 * root / float(trace)


def surface_pattern(image: np.ndarray, mask: np.ndarray) -> str | None:
    """"flat", "stripes" or "checker" (`scene.TEXTURES`) for the object under `mask` in `image`; None when the
    mask is empty."""
    if not np.asarray(mask, bool).any():
        return None
    spread, coherence = pattern_features(image, mask)
    if spread < PLAIN_SPREAD:
        return "flat"
    return "stripes" if coherence > STRIPE_COHERENCE else "checker"
