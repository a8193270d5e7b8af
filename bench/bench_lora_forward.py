"""The demo's DiT with its rank-64 LoRA: peft's factored LoRA forward against the merged weight's, side by side.

    python bench/bench_lora_forward.py [--repeats 7] [--device cpu]

Times, interleaved (factored, merged, factored, ...) so that drifting load hits both alike:
1. one Stage I SFT step (forward, backward, AdamW) at the demo's batch of 16 videos;
2. one sampling step (a no-grad velocity) at the demo's sampling batch of 64 videos;
3. one Flow-DPO step on the head alone with the LoRA on (the demo's "Stage I + DPO encoder"), 8 pairs.
"factored" is peft's own forward; "merged" is `physmaster.backends.merged_lora`'s choice by its cost model
(for these shapes: the merged weight in every layer; a layer that sees few tokens while its adapter trains would stay
factored). Prints median milliseconds and the median of paired ratios merged / factored, then the cost model's
choice for the demo's layers and for Wan 2.1 14B's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from physmaster.backends import merged_lora  # noqa: E402
from physmaster.demo.autoencoder import DOWN, LATENT_CHANNELS, FrameAutoencoder  # noqa: E402
from physmaster.demo.backbone import GeometryBackbone  # noqa: E402
from physmaster.demo.generator import LORA_TARGETS, VideoModel, new_dit  # noqa: E402
from physmaster.demo.pipeline import Settings, new_head  # noqa: E402
from physmaster.demo.world import FRAMES, SIZE  # noqa: E402
from physmaster.training import (PreferencePair, PreferenceSet, StageTrainer, TrainConfig,  # noqa: E402
                                 VideoSample, VideoSet)

CHOOSE = merged_lora.use_merged_weight


def factored(*_args) -> bool:
    return False


def build(device: str):
    st = Settings()
    den = new_dit(0)
    den.model.to(device)
    den.add_lora(st.lora_rank, targets=LORA_TARGETS, seed=0)
    with torch.no_grad():  # a trained-looking LoRA (B = 0 would make both paths trivially equal)
        for n, p in den.named_lora_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    enc = new_head(st, 0)
    enc.head.to(device)
    g = torch.Generator().manual_seed(0)
    imgs = torch.rand(64, SIZE, SIZE, 3, generator=g).numpy()
    cond = VideoModel(FrameAutoencoder(), den).conditioning(imgs, GeometryBackbone())
    cond = cond.map(lambda x: x.to(device))
    shape = (LATENT_CHANNELS, FRAMES, SIZE // DOWN, SIZE // DOWN)
    one = [cond.map(lambda x, i=i: x[i:i + 1]) for i in range(64)]
    sft = StageTrainer("sft", den, enc, VideoSet(VideoSample(torch.randn(shape, generator=g).to(device), one[i])
                                                 for i in range(64)),
                       TrainConfig(steps=10**9, lr=1e-4, batch_size=st.batch))
    pairs = PreferenceSet(PreferencePair(one[i], torch.randn(shape, generator=g).to(device),
                                         torch.randn(shape, generator=g).to(device)) for i in range(64))
    head = StageTrainer("dpo-head", den, enc, pairs, TrainConfig(steps=10**9, lr=1e-4, batch_size=st.dpo_batch,
                                                                  beta=st.beta))
    x = torch.randn(64, *shape, generator=g).to(device)
    tokens = enc.head(cond.features).detach()
    sample_cond = cond.with_tokens(tokens)
    return den, sft, head, x, sample_cond


def timed(fn, device: str) -> float:
    t0 = time.perf_counter()
    fn()
    if device != "cpu":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    den, sft, head, x, cond = build(args.device)
    t = torch.full((len(x),), 0.5, device=x.device)

    def train(tr):
        def step():
            tr.config.steps = tr.step + 1
            tr.run()
        return step

    @torch.no_grad()
    def sample():
        den.predict_velocity(x, t, cond)

    work = {"Stage I SFT step (16 videos)": train(sft), "sampling step (64 videos)": sample,
            "head Flow-DPO step (8 pairs)": train(head)}
    times = {(w, m): [] for w in work for m in ("factored", "merged")}
    for r in range(args.repeats + 1):  # the first round warms up
        for w, fn in work.items():
            for m, rule in (("factored", factored), ("merged", CHOOSE)):
                merged_lora.use_merged_weight = rule
                s = timed(fn, args.device)
                if r:
                    times[(w, m)].append(s)
    merged_lora.use_merged_weight = CHOOSE
    print(f"device {args.device}, torch threads {torch.get_num_threads()}, the demo's DiT with its rank-"
          f"{Settings().lora_rank} LoRA, {args.repeats} interleaved repeats (medians)")
    for w in work:
        f, m = times[(w, "factored")], times[(w, "merged")]
        ratio = statistics.median(b / a for a, b in zip(f, m))
        print(f"  {w:30s} factored {statistics.median(f) * 1000:7.1f} ms  merged {statistics.median(m) * 1000:7.1f} ms"
              f"  merged / factored {ratio:.2f}")
    print("the cost model's choice (merged?), rows = tokens through the layer:")
    for what, rows, d_in, d_out, rank in (("demo self-attention, SFT batch 16", 16 * 128, 96, 96, 64),
                                          ("demo cross-attention k/v, SFT batch 16", 16 * 8, 96, 96, 64),
                                          ("demo FFN in, sampling batch 64", 64 * 128, 96, 256, 64),
                                          ("Wan 2.1 14B attention, 81x480x832, rank 16", 32760, 5120, 5120, 16),
                                          ("Wan 2.1 14B FFN in, rank 64", 32760, 5120, 13824, 64)):
        print(f"  {what:44s} training {CHOOSE(rows, d_in, d_out, rank, True)!s:5s}  "
              f"sampling {CHOOSE(rows, d_in, d_out, rank, False)!s:5s}")


if __name__ == "__main__":
    main()
