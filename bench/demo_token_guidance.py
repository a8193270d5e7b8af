"""Classifier-free guidance on the physical tokens, and where the demo's Stage I loses the object.

Trains the demo's Stage I (`pipeline.stage_one`, as `python -m physmaster demo` trains it), then samples the held-out
drops with token guidance w for each of `--weights` (`generator.VideoModel.token_guidance`: v = v(tokens zeroed) +
w (v(tokens) - v(tokens zeroed)); 1 = unguided, the demo's default; the same noises for every w) and prints, per w:

- avg L2 (all / seen / unseen drops), against w = 1 with the paired per-scene bootstrap 95% interval;
- the token influence (avg L2 with the tokens zeroed minus with them, as the demo prints it);
- coherence and why the other frames miss it (`evaluation.coherence_parts`: lost, fragments, too small, too
  large), per split, and coherence per background colour: where Stage I's missing coherence is;
- once, for scale: the coherence of the held-out drops themselves and of their autoencoder reconstructions (the
  ceiling a generator over this autoencoder, scored by this segmenter, can reach).

    python bench/demo_token_guidance.py [--seed 0] [--eval-seed 0] [--eval-videos 1] [--weights 1,1.5,2,3,5]
                                        [--set NAME=VALUE ...] [--json FILE]

About 13 minutes on one thread beside another job at the defaults (Stage I: about 9; each w: about a minute
for 200 videos; the tokens zeroed once for all); Stage I takes about 6.5 minutes alone on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # demo_args, also when imported (tests)


def main(argv=None) -> int:
    import numpy as np

    from demo_args import add_set, floats, load_world, settings, write_json

    from physmaster.demo.backbone import head_input
    from physmaster.demo.cli import held_out_set
    from physmaster.demo.evaluation import MISSES, bootstrap_ci, score_scenes
    from physmaster.demo.pipeline import stage_one

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--eval-seed", type=int, default=0, help="held-out set")
    ap.add_argument("--eval-videos", type=int, default=1, help="videos per held-out drop (the demo: 4)")
    ap.add_argument("--weights", type=floats, default=[1.0, 1.5, 2.0, 3.0, 5.0],
                    help="token guidance weights (1 = unguided)")
    add_set(ap, "token_dropout=0.2")
    ap.add_argument("--json", type=Path, default=None, help="also write every figure to this file")
    args = ap.parse_args(argv)
    st = settings(args)
    if args.eval_videos < 1 or not args.weights or min(args.weights) < 1:
        raise SystemExit("--eval-videos must be >= 1 and --weights non-empty, each >= 1")
    t0 = time.perf_counter()
    vm, backbone = load_world(args, drop=False)
    backbone = head_input(backbone, st.head_reads)
    k = args.eval_videos
    scenes, rep, noises = held_out_set(vm, backbone, st.eval_scenes, args.eval_seed, k)
    report = {"settings": dataclasses.asdict(st), "args": {a: str(v) for a, v in vars(args).items()}, "rows": []}

    splits = np.array([s.meta["split"] for s in scenes])
    backgrounds = np.array([s.meta["background_colour"] for s in scenes])

    def describe(name, videos):
        """Per-scene figures of `videos` (`evaluation.score_scenes`), printed and returned by split and background."""
        r = score_scenes(videos, scenes, k)
        line = {"name": name, "coherence": float(r["coherence"].mean()), "l2": float(r["l2"].mean()),
                "splits": {}, "backgrounds": {}, "per_scene_l2": r["l2"].tolist()}
        for split in ("seen", "unseen"):
            part = {m: float(r[m][splits == split].mean()) for m in ("coherence", "l2")}
            part.update({m: float(r[f"miss_{m}"][splits == split].mean()) for m in MISSES})
            line["splits"][split] = part
            print(f"    {split:6s}: coherence {part['coherence']:.3f} (misses: " + ", ".join(
                f"{m} {part[m]:.3f}" for m in MISSES) + f"), avg L2 {part['l2']:.4f}")
        for bg in sorted(set(backgrounds)):
            line["backgrounds"][bg] = float(r["coherence"][backgrounds == bg].mean())
        print("    coherence by background: " + ", ".join(f"{b} {v:.2f}" for b, v in line["backgrounds"].items()))
        return line

    truth = [s.frames for s in scenes for _ in range(k)]
    print("the held-out drops themselves:")
    report["truth"] = describe("truth", truth)
    print("their autoencoder reconstructions:")
    report["reconstructed"] = describe("reconstructed", vm.decode(vm.encode(truth)))

    print(f"Stage I (seed {args.seed}), {st.sft_steps} steps ...", flush=True)
    encoder = stage_one(vm, backbone, st, args.seed, lambda m: None)
    # tokens zeroed, guidance has nothing to scale (`VideoModel.sample`): one sampling serves every w
    l2_zero = score_scenes(vm.decode(vm.sample(encoder.head, rep, noises, st.sample_steps, token_scale=0.0)),
                           scenes, k)["l2"]
    ref, n_seen = None, st.eval_scenes
    for w in args.weights:
        vm.token_guidance = float(w)
        videos = vm.decode(vm.sample(encoder.head, rep, noises, st.sample_steps))
        print(f"token guidance {w:g}:")
        line = describe(f"w {w:g}", videos)
        l2 = np.array(line["per_scene_l2"])
        ref = l2 if ref is None else ref
        lo, hi = bootstrap_ci(l2 - ref)
        print(f"  avg L2 {l2.mean():.4f} (seen {l2[:n_seen].mean():.4f}, unseen {l2[n_seen:].mean():.4f}), against "
              f"w = {args.weights[0]:g} {(l2 - ref).mean() / ref.mean():+.1%} [{lo:+.4f}, {hi:+.4f}]; token influence "
              f"{l2_zero.mean() - l2.mean():+.4f}; coherence {line['coherence']:.3f} ({time.perf_counter() - t0:.0f}s)",
              flush=True)
        line.update(weight=float(w), token_influence=float(l2_zero.mean() - l2.mean()), interval=[lo, hi])
        report["rows"].append(line)
    report["seconds"] = time.perf_counter() - t0
    if args.json:
        write_json(args.json, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
