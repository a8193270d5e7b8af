"""What head-only Flow-DPO (Stage III) can do on the demo's proxy world, and why: one Stage I and one Stage II
(the default demo's, seed 0), then

1. how much the DiT's velocity depends on the physical tokens: |v(tokens) - v(other)| / |v| for the tokens
   zeroed, another start image's tokens, tokens of the same norms in random directions, and (for scale) the
   first-frame image condition zeroed. A DiT that reads the tokens moves with them; one that ignores them moves
   only for directions the head never produces.
2. Stage III variants (head learning rate, beta, steps, pairs per image, min margin, motion-weighted Flow-DPO),
   each from the same Stage II and the same candidates, against Stage II: held-out avg L2 and its paired
   bootstrap 95% interval, as the demo prints them.
3. With `--head-sft STEPS,...`: the head taught by the truth itself instead of by preferences. From the same
   Stage II, the head alone trained by flow matching on the ground-truth drops (Stage I's 512 videos; DiT
   frozen) for each STEPS, at the demo's Stage III learning rate and a quarter of it. Not a stage of the method:
   a probe of how much lever the head has left on this DiT. Flow matching is not PISA's L2, so it bounds nothing
   exactly; but when the videos themselves, given to the head, make Stage II worse, preferences between
   Stage II's own candidates have little to work with.

    python bench/demo_stage3.py [--cache DIR] [--scenes 30] [--eval-seed 0] [--variants default,lr5e-4,...]
    python bench/demo_stage3.py --image-dropout 0.3 --variants default   # can Stage I be made to use tokens?
    python bench/demo_stage3.py --cache DIR --variants default --head-sft 300   # the head taught by the truth

`--image-dropout P` trains Stage I with the first-frame image condition zeroed for a fraction P of the samples
(tokens kept), so the tokens are all those samples have to place the object, and prints the held-out avg L2
with and without the tokens, with and without the image condition at sampling.

Stage I takes about 5 minutes on 2 cores; with `--cache DIR` it is saved there once and read back on later runs.
Everything else takes about a minute per variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

VARIANTS = {
    "default": {},
    "lr5e-4": dict(lr_head=5e-4),
    "lr5e-4 400 steps": dict(lr_head=5e-4, head_dpo_steps=400),
    "beta200": dict(beta=200.0),
    "beta200 lr5e-4": dict(beta=200.0, lr_head=5e-4),
    "4 pairs per image": dict(pairs_per_image=4),
    "4 pairs per image lr5e-4": dict(pairs_per_image=4, lr_head=5e-4),
    "min margin 0.1": dict(min_margin=0.1),
    "motion 10": dict(dpo_motion_weight=10.0),
    "motion 10 lr5e-4": dict(dpo_motion_weight=10.0, lr_head=5e-4),
    "motion 30": dict(dpo_motion_weight=30.0),
}


def without_images(videos, fraction: float):
    """`videos` (a VideoSet) whose batches have the image condition zeroed for `fraction` of the samples."""
    g = torch.Generator().manual_seed(123)
    batch = videos.batch

    def dropped(idx):
        x0, cond = batch(idx)
        keep = (torch.rand(len(idx), generator=g) >= fraction).float().view(-1, 1, 1, 1, 1)
        return x0, dataclasses.replace(cond, image_cond=cond.image_cond * keep)

    videos.batch = dropped
    return videos


def stage_one_cached(vm, backbone, st, cache: Path | None, image_dropout: float = 0.0):
    from safetensors.torch import load_file, save_file

    from physmaster.demo import pipeline
    from physmaster.demo.generator import LORA_TARGETS
    from physmaster.encoder import load_encoder

    if cache is not None and (cache / "stage1_lora.safetensors").is_file():
        vm.den.add_lora(st.lora_rank, targets=LORA_TARGETS, seed=0)
        missing = vm.den.model.load_state_dict(load_file(cache / "stage1_lora.safetensors"), strict=False)
        if missing.unexpected_keys:
            raise SystemExit(f"{cache}: not this demo's Stage I LoRA ({missing.unexpected_keys[:2]})")
        print(f"Stage I read from {cache}", flush=True)
        return load_encoder(cache / "stage1_head.safetensors")
    plain = pipeline.video_set
    if image_dropout > 0:
        pipeline.video_set = lambda *a: without_images(plain(*a), image_dropout)
    try:
        encoder = pipeline.stage_one(vm, backbone, st, 0, print)
    finally:
        pipeline.video_set = plain
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        lora = {k: v.contiguous() for k, v in vm.den.model.state_dict().items() if "lora" in k}
        save_file(lora, cache / "stage1_lora.safetensors")
        encoder.save(cache / "stage1_head.safetensors")
    return encoder


def head_sft(vm, encoder, data, st, steps: int, lr: float):
    """A copy of `encoder` whose head alone is trained by flow matching on `data` (Stage I's ground-truth drops,
    `pipeline.sft_videos`), with the DiT frozen as it is (its LoRA folded and off: `freeze_dit`), so only the head
    can move."""
    from physmaster.training import StageTrainer, TrainConfig

    head = encoder.clone()
    cfg = TrainConfig(steps=int(steps), lr=float(lr), batch_size=st.batch, seed=7, warmup_steps=min(20, int(steps)))
    StageTrainer("sft", vm.den, head, data, cfg).run(None)
    return head


@torch.no_grad()
def token_sensitivity(vm, head, cond, latents) -> list[str]:
    """|v(tokens) - v(changed)| / |v(tokens)| at three noise levels, for four changes of the conditioning."""
    tokens = head(cond.features)
    g = torch.Generator().manual_seed(0)
    random_dir = torch.randn(tokens.shape, generator=g)
    random_dir = random_dir / random_dir.norm(dim=-1, keepdim=True) * tokens.norm(dim=-1, keepdim=True)
    changes = {"tokens zeroed": cond.with_tokens(tokens * 0), "another image's tokens": cond.with_tokens(
        tokens.roll(1, 0)), "random-direction tokens": cond.with_tokens(random_dir),
        "image condition zeroed": dataclasses.replace(cond, image_cond=cond.image_cond * 0).with_tokens(tokens)}
    lines = []
    for t in (0.9, 0.5, 0.2):
        tt = torch.full((len(latents),), t)
        x = vm.den.add_noise(latents, torch.randn(latents.shape, generator=g), tt)
        v = vm.den.predict_velocity(x, tt, cond.with_tokens(tokens))
        parts = [f"{name} {float((v - vm.den.predict_velocity(x, tt, c)).norm() / v.norm()):.3f}"
                 for name, c in changes.items()]
        lines.append(f"  t = {t}: " + ", ".join(parts))
    return lines


def material_reading(vm, head, scenes, cond, noises, steps: int, per_scene: int = 2) -> list[str]:
    """`evaluation.material_read` of the model's held-out videos, with the tokens and with them zeroed."""
    from physmaster.demo.evaluation import material_read

    rep = cond.map(lambda x: x.repeat_interleave(per_scene, 0))
    lines = []
    for scale in (1.0, 0.0):
        right, n = material_read(vm.decode(vm.sample(head, rep, noises, steps, token_scale=scale)), scenes,
                                 per_scene)
        lines.append(f"  {'with the tokens' if scale else 'tokens zeroed'}: {right} / {n} videos closest to their "
                     f"own material ({right / max(n, 1):.0%}; chance 33%)")
    return lines


def main() -> int:
    from physmaster.demo.assets import load_assets
    from physmaster.demo.cli import EVAL_SEED, held_out
    from physmaster.demo.evaluation import bootstrap_ci, score_scenes
    from physmaster.demo.pipeline import (Settings, freeze_dit, gt_pairs, lora_pairs, sample_candidates, sft_videos,
                                          stage_three, stage_two)

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=None, help="folder for the Stage I weights (saved once, then read)")
    ap.add_argument("--scenes", type=int, default=30, help="held-out scenes per split")
    ap.add_argument("--eval-seed", type=int, default=0)
    ap.add_argument("--image-dropout", type=float, default=0.0, help="Stage I with this fraction of the samples' "
                    "image condition zeroed (use another --cache folder)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--head-sft", default="", metavar="STEPS,...",
                    help="also train the head alone on the ground-truth drops from Stage II for these step counts")
    args = ap.parse_args()
    try:
        head_sft_steps = [int(x) for x in args.head_sft.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--head-sft takes step counts such as 300 or 100,300, got {args.head_sft!r}") from None
    if any(n < 1 for n in head_sft_steps):
        raise SystemExit(f"--head-sft step counts must be >= 1, got {args.head_sft!r}")
    names = [v.strip() for v in args.variants.split(",") if v.strip()]  # none: stop after the token figures
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    t_start = time.perf_counter()
    st = Settings()
    vm, backbone, _ = load_assets()
    if not 0.0 <= args.image_dropout < 1.0:
        raise SystemExit(f"--image-dropout must be in [0, 1), got {args.image_dropout}")
    encoder = stage_one_cached(vm, backbone, st, args.cache, args.image_dropout)
    scenes = held_out(args.scenes, args.eval_seed)
    cond = vm.conditioning(np.stack([s.frames[0] for s in scenes]), backbone)
    rep = cond.map(lambda x: x.repeat_interleave(2, 0))
    noises = [EVAL_SEED * 7 + 100_003 * args.eval_seed + i for i in range(len(scenes) * 2)]

    def l2_of(head):
        return score_scenes(vm.decode(vm.sample(head, rep, noises, st.sample_steps)), scenes, 2)["l2"]

    probe = scenes[:16]
    print("token sensitivity of the Stage I model, |v(tokens) - v(changed)| / |v(tokens)| on 16 held-out drops:")
    print("\n".join(token_sensitivity(vm, encoder.head, cond.map(lambda x: x[:len(probe)]),
                                      vm.encode([s.frames for s in probe]))))
    if args.image_dropout > 0:
        no_image = dataclasses.replace(rep, image_cond=rep.image_cond * 0)
        for what, c in (("with the image condition", rep), ("image condition zeroed", no_image)):
            l2 = [score_scenes(vm.decode(vm.sample(encoder.head, c, noises, st.sample_steps, token_scale=k)),
                               scenes, 2)["l2"] for k in (1.0, 0.0)]
            lo, hi = bootstrap_ci(l2[1] - l2[0])
            print(f"Stage I, {what}: avg L2 {l2[0].mean():.4f} with the tokens, {l2[1].mean():.4f} zeroed "
                  f"(influence {l2[1].mean() - l2[0].mean():+.4f} [{lo:+.4f}, {hi:+.4f}])", flush=True)
    print("material read: generated drops against their renderings with each of the three restitutions:")
    print("\n".join(material_reading(vm, encoder.head, scenes, cond, noises, st.sample_steps)), flush=True)
    if not names:
        return 0
    l2_one = l2_of(encoder.head)
    cands_1 = sample_candidates(vm, encoder.head, backbone, st, 0, "Stage I")
    pairs_1 = lora_pairs(cands_1, st, print, "Stage I")
    stage_two(vm, encoder, pairs_1, st, 0, lambda m: None, backbone=backbone)
    l2_two = l2_of(encoder.head)
    lo, hi = bootstrap_ci(l2_two - l2_one)
    print(f"Stage I avg L2 {l2_one.mean():.4f}; Stage II {l2_two.mean():.4f} [{lo:+.4f}, {hi:+.4f}]")
    freeze_dit(vm, 0)
    cands_2 = sample_candidates(vm, encoder.head, backbone, st, 0, "Stage II", scenes=st.head_scenes)
    stage_two_encoder = encoder.clone()
    print(f"\nStage III variants from this Stage II (avg L2 minus Stage II's, paired bootstrap 95% interval; "
          f"{args.scenes} + {args.scenes} held-out drops, eval seed {args.eval_seed}):")
    for name in names:
        s = dataclasses.replace(st, **VARIANTS[name])
        pairs = gt_pairs(cands_2, s, lambda m: None, "Stage II")
        head = stage_two_encoder.clone()
        stage_three(vm, head, pairs, s, 0, lambda m: None)
        d = l2_of(head.head) - l2_two
        lo, hi = bootstrap_ci(d)
        print(f"  {name:28s} {len(pairs):4d} pairs  L2 {l2_two.mean() + d.mean():.4f}  {d.mean():+.4f} "
              f"({d.mean() / l2_two.mean():+.1%}) [{lo:+.4f}, {hi:+.4f}]", flush=True)
    if head_sft_steps:
        print("\nthe head alone trained by flow matching on the ground-truth drops from this Stage II (DiT frozen; "
              "against Stage II):")
        truth = sft_videos(vm, backbone, st)  # encoded once for every probe
        for steps in head_sft_steps:
            for lr in (st.lr_head, st.lr_head / 4):
                head = head_sft(vm, stage_two_encoder, truth, st, steps, lr)
                d = l2_of(head.head) - l2_two
                lo, hi = bootstrap_ci(d)
                print(f"  {steps:5d} steps, lr {lr:.0e}       L2 {l2_two.mean() + d.mean():.4f}  {d.mean():+.4f} "
                      f"({d.mean() / l2_two.mean():+.1%}) [{lo:+.4f}, {hi:+.4f}]", flush=True)
    print(f"({time.perf_counter() - t_start:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
