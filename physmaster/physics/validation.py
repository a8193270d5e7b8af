"""Does the judge (without ground truth) rank each true video above its corruptions?"""

from __future__ import annotations

from .corrupt import CORRUPTIONS
from .judge import judge
from .scene import render_scene


def validate_judge(count: int = 200, start_seed: int = 0, splits=("seen", "unseen"), size: int = 64,
                   frames: int = 32, fps: float = 16.0, kinds=None, progress=None) -> dict:
    """Render `count` scenes (alternating over `splits`), corrupt each, judge all without ground truth.

    Returns {"rates": {kind: fraction of scenes where true score > corrupted score}, "failures":
    {kind: [(seed, split, true score, corrupted score)]}, "true_scores": [...], "count": n}.
    """
    kinds = list(kinds or CORRUPTIONS)
    wins = {k: 0 for k in kinds}
    totals = {k: 0 for k in kinds}
    failures: dict[str, list] = {k: [] for k in kinds}
    true_scores = []
    for i in range(count):
        seed = start_seed + i
        split = splits[i % len(splits)]
        scene = render_scene(seed, split, size, frames, fps)
        s_true = judge(scene.frames, fps=fps).score
        true_scores.append(s_true)
        for k in kinds:
            try:
                bad = CORRUPTIONS[k](scene)
            except Exception:  # noqa: BLE001 - a scene that cannot be corrupted this way is skipped
                continue
            s_bad = judge(bad.frames, fps=fps).score
            totals[k] += 1
            if s_true > s_bad:
                wins[k] += 1
            else:
                failures[k].append((seed, split, round(s_true, 4), round(s_bad, 4)))
        if progress:
            progress(i + 1, count)
    rates = {k: (wins[k] / totals[k] if totals[k] else float("nan")) for k in kinds}
    return {"rates": rates, "totals": totals, "failures": failures, "true_scores": true_scores, "count": count}
