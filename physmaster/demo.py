"""`python -m physmaster demo`: the whole PhysMaster pipeline on the drop proxy world, on a CPU, in minutes.

What runs (all models tiny, all data simulated by `physmaster.physics`):

1. Base model: a tiny Wan I2V transformer (diffusers' WanTransformer3DModel, 3 blocks, width 72) in *pixel space*
   (the "latent" is the 32x32 RGB video scaled to [-1, 1], 8 frames at 6 fps; 4x4 patches), conditioned like Wan
   I2V (mask + first frame concatenated along channels) and on a fixed 4-token "prompt". It was pretrained on
   *generic motion* (objects thrown in random directions under random, even upward, gravity, sometimes passing
   through the floor): a video model that has seen motion but not our physics. Its weights ship in
   physmaster/demo_assets/ and are reproduced by `python -m physmaster demo --make-base` (seed and steps in the
   file's metadata); without them the demo pretrains a smaller-budget base first.
2. PhysEncoder: a frozen, fixed, deterministic feature extractor of the start image (4x4 pixel patches through a
   fixed random orthonormal projection plus 2D sine positions: it *stands in for DINOv2 / CLIP vision*) and a
   trainable `physmaster.encoder.PhysHead` (4 tokens) appended to the prompt.
3. Stage I: flow matching on simulated drops (objects dropped from rest, PisaBench-style; seen split), training
   the head and a DiT LoRA (peft).
4. Candidates: 8 videos per training start image from the Stage-I model (different seeds), scored by
   `physics.rank_candidates` with the ground-truth masks (the judge's physics score mixed with the similarity of
   the segmented object to the ground truth: PISA IoU, L2, Chamfer); the pair is the best against the worst
   candidate when their scores differ clearly (one pair per image). At this size the judge's physics score is
   near zero for every candidate, so the ground-truth similarity decides; the run prints how often the judge
   alone would agree with the ground truth.
5. Stage II: Flow-DPO on a fresh DiT LoRA (the Stage-I LoRA folded into the base; the reference is the same
   DiT with the LoRA switched off, i.e. the Stage-I model). Stage III: Flow-DPO on the head only (the Stage-II
   LoRA folded in; reference: a frozen copy of the head, i.e. the Stage-II model). β = 6000 on per-element mean
   squared errors keeps the implicit rewards O(1) and the policies close to their references (a smaller β
   bought L2 at the cost of the object's shape: IoU fell by a third).
6. Evaluation on held-out scenes (30 seen + 30 unseen, like PisaBench; seeds disjoint from every training and
   candidate scene): 2 videos per scene and stage from the same noises for every stage, the object segmented
   from the generated frames (`segment_object`) and compared with the ground truth masks (`pisa_metrics`: L2,
   Chamfer distance, IoU), averaged per scene. A Table-1-style table with bootstrap 95% intervals of each
   stage's paired per-scene difference against the stage before; a side-by-side animated GIF.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


HELP = "run the PhysMaster pipeline (Stage I SFT, Stage II/III Flow-DPO) on the drop proxy world, on CPU"

SIZE, FRAMES, FPS = 32, 8, 6.0
PROMPT_LEN, TEXT_DIM = 4, 32
MODEL = dict(latent_channels=3, text_dim=TEXT_DIM, heads=2, head_dim=36, ffn_dim=192, num_layers=3,
             patch_size=(1, 4, 4), rope_max_seq_len=32)
BACKBONE_WIDTH = 64
ASSETS = Path(__file__).with_name("demo_assets")
BASE_FILE = ASSETS / "base_tiny_wan.safetensors"
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "net.0.proj", "net.2", "proj_out"]
EVAL_SEED, SFT_SEED, DPO_SEED, BASE_SEED = 900_000, 0, 500_000, 1_000_000


@dataclass
class Settings:
    """What a run does; `fast` shrinks everything to a smoke test."""

    sft_scenes: int = 384
    sft_steps: int = 400
    dpo_scenes: int = 96
    candidates: int = 8  # per start image; the pair is the best vs the worst of them
    min_margin: float = 0.05  # the pair's score gap (rank_candidates' score, in [0, 1]) must be at least this
    dpo_steps: int = 150
    eval_scenes: int = 30  # per split
    eval_seeds: int = 2  # videos per held-out scene and stage (the same noises for every stage), metrics averaged
    sample_steps: int = 16
    batch: int = 8
    dpo_batch: int = 4
    lr_sft: float = 2e-3
    lr_lora: float = 5e-4
    lr_head: float = 3e-3
    beta: float = 6000.0
    lora_rank: int = 16
    base_steps: int = 1500  # --make-base (and the in-run fallback uses a quarter)
    gif_scenes: int = 6

    @classmethod
    def fast(cls) -> "Settings":
        return cls(sft_scenes=4, sft_steps=2, dpo_scenes=3, candidates=2, dpo_steps=2, eval_scenes=2,
                   eval_seeds=1, sample_steps=2, batch=2, dpo_batch=2, base_steps=2, gif_scenes=2)


# -- the proxy world as model inputs ----------------------------------------------------------------------------
def render(seed: int, split: str = "seen", **overrides):
    from .physics import render_scene

    return render_scene(seed, split, size=SIZE, frames=FRAMES, fps=FPS, **overrides)


def drop_scene(seed: int, split: str = "seen"):
    """A PisaBench-style drop: the object is released from rest (the start image cannot show a velocity)."""
    return render(seed, split, initial_velocity=(0.0, 0.0))


def generic_scene(seed: int):
    """The base model's world: the same objects moving in random directions under random gravity."""
    rng = np.random.default_rng([seed, 77])
    duration = (FRAMES - 1) / FPS
    split = "seen" if rng.random() < 0.5 else "unseen"
    g = float(rng.uniform(-1.0, 1.0) * 3.0 * SIZE)
    v = rng.uniform(-0.5, 0.5, 2) * SIZE / duration
    return render(seed, split, gravity=g, initial_velocity=(float(v[0]), float(v[1])),
                  floor_collisions=bool(rng.random() < 0.5))


def to_latent(frames: np.ndarray) -> torch.Tensor:
    """[T, H, W, 3] in [0, 1] -> [3, T, H, W] in [-1, 1] (the pixel "latent")."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() * 2 - 1


def to_frames(latent: torch.Tensor) -> np.ndarray:
    return ((latent.clamp(-1, 1) + 1) / 2).permute(1, 2, 3, 0).numpy().astype(np.float32)


class ProxyBackbone:
    """Frozen, deterministic image features standing in for DINOv2 / CLIP vision: each 4x4 patch's pixels
    through a fixed random orthonormal projection, plus 2D sine positions, and a mean (CLS-like) token.
    [B, H, W, 3] in [0, 1] -> hidden states [B, 1 + 64, 64]."""

    def __init__(self, width: int = BACKBONE_WIDTH, patch: int = 4, seed: int = 1234):
        g = torch.Generator().manual_seed(seed)
        d_in = patch * patch * 3
        q, _ = torch.linalg.qr(torch.randn(max(d_in, width), max(d_in, width), generator=g))
        self.proj = q[:d_in, :width].contiguous() * math.sqrt(width / d_in)
        n = SIZE // patch
        yy, xx = torch.meshgrid(torch.arange(n).float(), torch.arange(n).float(), indexing="ij")
        freqs = torch.arange(width // 4).float()
        freqs = 1.0 / (10.0 ** (freqs / max(1, width // 4)))
        pos = [torch.sin(yy[..., None] * freqs), torch.cos(yy[..., None] * freqs),
               torch.sin(xx[..., None] * freqs), torch.cos(xx[..., None] * freqs)]
        self.pos = torch.cat(pos, -1).reshape(n * n, width) * 0.5
        self.patch = patch

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        b, h, w, c = images.shape
        p = self.patch
        x = images.float().reshape(b, h // p, p, w // p, p, c).permute(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)
        tokens = (x * 2 - 1) @ self.proj + self.pos
        return torch.cat([tokens.mean(1, keepdim=True), tokens], 1)


def prompt_context() -> torch.Tensor:
    """The fixed 'prompt' ("an object falls") as a [1, 4, 32] text context."""
    g = torch.Generator().manual_seed(4321)
    return torch.randn(1, PROMPT_LEN, TEXT_DIM, generator=g)


def conditioning(first_frames: np.ndarray, backbone: ProxyBackbone):
    """Conditioning for start images [B, H, W, 3]: prompt, backbone features, Wan-I2V image condition."""
    from .backends.diffusers_wan import make_i2v_condition
    from .training import Conditioning

    imgs = torch.from_numpy(np.ascontiguousarray(first_frames)).float()
    first_lat = imgs.permute(0, 3, 1, 2) * 2 - 1
    return Conditioning(context=prompt_context().expand(len(imgs), -1, -1).clone(), features=backbone(imgs),
                        image_cond=make_i2v_condition(first_lat, FRAMES))


def video_set(scenes, backbone):
    from .training import VideoSample, VideoSet

    cond = conditioning(np.stack([s.frames[0] for s in scenes]), backbone)
    return VideoSet(VideoSample(to_latent(s.frames), cond.map(lambda x, i=i: x[i:i + 1]), f"scene{s.meta['seed']}")
                    for i, s in enumerate(scenes))


# -- models -----------------------------------------------------------------------------------------------------
def new_model(seed: int = 0):
    from .backends.diffusers_wan import WanDenoiser, make_tiny_wan

    return WanDenoiser(make_tiny_wan(seed, **MODEL))


def new_head(seed: int = 0):
    from .encoder import HeadConfig, PhysEncoder

    cfg = HeadConfig(in_dim=BACKBONE_WIDTH, context_dim=TEXT_DIM, num_tokens=4, hidden_dim=64, depth=1, heads=4,
                     backbone="demo proxy backbone (stands in for DINOv2)")
    return PhysEncoder.new(cfg, seed=seed, name="demo")


def pretrain_base(steps: int, seed: int = 0, batch: int = 8, lr: float = 1e-3, log=print, scenes: int | None = None):
    """Train the base model from scratch on generic motion (full weights, no physical tokens)."""
    from .training import StageTrainer, TrainConfig

    den = new_model(seed)
    backbone = ProxyBackbone()
    scenes = scenes if scenes is not None else int(min(1024, max(16, steps * batch // 6)))
    data = video_set([generic_scene(BASE_SEED + i) for i in range(scenes)], backbone)
    for s in data.samples:
        s.cond.features = None  # the base model has no physical head
    params = list(den.model.parameters())

    # train every weight: for the base, the trainer's "LoRA" is the whole model
    den.named_lora_parameters = lambda: list(den.model.named_parameters())  # type: ignore[method-assign]
    den.lora_parameters = lambda: params  # type: ignore[method-assign]
    cfg = TrainConfig(steps=steps, lr=lr, batch_size=batch, seed=seed, warmup_steps=min(50, steps), grad_clip=1.0)
    tr = StageTrainer("sft", den, None, data, cfg)
    t0 = time.perf_counter()
    tr.run(_progress("base", log, t0))
    del den.named_lora_parameters, den.lora_parameters
    for p in den.model.parameters():
        p.requires_grad_(False)
    return den, tr.history


def save_base(den, path: Path, info: dict) -> None:
    from safetensors.torch import save_file

    from .fileio import atomic_path

    tensors = {k: v.detach().contiguous() for k, v in den.model.state_dict().items()}
    meta = {"format": "pt", "physmaster.demo_base": json.dumps(info, sort_keys=True),
            "config": json.dumps(dict(den.model.config), default=list)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def load_base(path: Path = BASE_FILE):
    from safetensors import safe_open
    from safetensors.torch import load_file

    den = new_model(0)
    state = load_file(str(path))
    den.model.load_state_dict(state)
    with safe_open(str(path), framework="pt") as f:
        info = json.loads((f.metadata() or {}).get("physmaster.demo_base", "{}"))
    for p in den.model.parameters():
        p.requires_grad_(False)
    return den, info


# -- sampling ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(den, head, cond, noise_seeds, steps: int, batch: int = 32) -> torch.Tensor:
    """Euler sampling of the rectified flow from t = 1 to 0: [B, 3, T, H, W] latents in [-1, 1]."""
    outs = []
    ts = torch.linspace(1.0, 0.0, steps + 1)
    for s in range(0, len(noise_seeds), batch):
        idx = list(range(s, min(s + batch, len(noise_seeds))))
        c = cond.map(lambda x: x[idx[0]:idx[-1] + 1])
        if head is not None and c.features is not None:
            c = c.with_tokens(head(c.features))
        x = torch.stack([torch.randn(3, FRAMES, SIZE, SIZE, generator=torch.Generator().manual_seed(int(n)))
                         for n in (noise_seeds[i] for i in idx)])
        for i in range(steps):
            t = torch.full((len(idx),), float(ts[i]))
            v = den.predict_velocity(x, t, c).float()
            x = x + (ts[i + 1] - ts[i]) * v
        outs.append(x.clamp(-1, 1))
    return torch.cat(outs)


def evaluate(den, head, scenes, cond, steps: int, seeds: int = 1, noise_base: int = 77_000):
    """PISA metrics of `seeds` generated videos per scene (the same noises for every stage), averaged per scene:
    dict of per-scene arrays, and the first video of each scene."""
    from .physics import pisa_metrics, segment_object

    seeds = max(1, int(seeds))
    rep = cond.map(lambda x: x.repeat_interleave(seeds, 0))
    lat = generate(den, head, rep, [noise_base + i for i in range(len(scenes) * seeds)], steps)
    out = {"l2": [], "chamfer": [], "iou": []}
    videos = []
    for j, s in enumerate(scenes):
        gt = s.object_masks()
        per = {k: [] for k in out}
        for i in range(seeds):
            frames = to_frames(lat[j * seeds + i])
            if i == 0:
                videos.append(frames)
            m = pisa_metrics(segment_object(frames), gt, pred_fps=FPS, gt_fps=FPS)
            for k in out:
                per[k].append(float(m[k]))
        for k in out:
            out[k].append(float(np.mean(per[k])))
    return {k: np.array(v) for k, v in out.items()}, videos


def make_pairs(den, head, scenes, backbone, settings: Settings, log=print):
    """Candidates from the current model, labelled against the ground truth + judge -> PreferenceSet.

    Each start image gets `settings.candidates` videos (different seeds). `rank_candidates` scores each one with
    the judge given the ground-truth masks (the mean of the physics score and the similarity to the ground truth,
    PISA IoU, L2 and Chamfer); the pair is the best against the worst candidate, kept when their scores differ by
    at least `settings.min_margin`. One clear pair per image: the middle candidates' order is mostly noise."""
    from .physics import rank_candidates
    from .training import PreferencePair, PreferenceSet

    k = settings.candidates
    cond = conditioning(np.stack([s.frames[0] for s in scenes]), backbone)
    rep = cond.map(lambda x: x.repeat_interleave(k, 0))
    lat = generate(den, head, rep, [DPO_SEED * 7 + i for i in range(len(scenes) * k)], settings.sample_steps)
    pairs, agree, disagree, gaps = [], 0, 0, []
    for j, s in enumerate(scenes):
        cands = lat[j * k:(j + 1) * k]
        videos = [to_frames(x) for x in cands]
        results, ranked = rank_candidates(videos, gt_masks=s.object_masks(), fps=FPS, min_margin=settings.min_margin)
        # how often the judge without ground truth (physics score alone) orders two candidates like the PISA L2
        phys = [r.fit.get("physics_score", 0.0) if r.found else 0.0 for r in results]
        l2 = [r.metrics.get("l2", float("nan")) for r in results]
        for a in range(k):
            for b in range(a + 1, k):
                if phys[a] != phys[b] and l2[a] != l2[b]:
                    if (phys[a] > phys[b]) == (l2[a] < l2[b]):
                        agree += 1
                    else:
                        disagree += 1
        if ranked:
            w, lo, margin = ranked[0]  # largest score gap: the best against the worst
            gaps.append(l2[lo] - l2[w])
            pairs.append(PreferencePair(cond.map(lambda x: x[j:j + 1]), cands[w], cands[lo], "judge", float(margin),
                                        f"scene{j}", meta={"l2_winner": l2[w], "l2_loser": l2[lo]}))
    decided = agree + disagree
    log(f"  {len(pairs)} preference pairs (best vs worst of {k} candidates, score gap >= {settings.min_margin}) from "
        f"{len(scenes)} start images; winner's PISA L2 lower by {np.mean(gaps) if gaps else 0.0:.3f} on average")
    log(f"  the judge without ground truth orders {decided} of {len(scenes) * k * (k - 1) // 2} candidate pairs at all "
        f"and agrees with the ground-truth L2 on {agree} of them" + (f" ({100 * agree / decided:.0f}%)" if decided
                                                                     else ""))
    return PreferenceSet(pairs)


# -- reporting --------------------------------------------------------------------------------------------------
def bootstrap_ci(diff: np.ndarray, n: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diff), size=(n, len(diff)))
    means = diff[idx].mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def format_table(results: dict, n_seen: int) -> str:
    names = list(results)
    lines = []
    head = f"{'':10s}|{'seen':^26s}|{'unseen':^26s}|{'average':^26s}"
    sub = f"{'model':10s}|" + "|".join(f"{'L2':>8s}{'CD':>9s}{'IoU':>9s}" for _ in range(3))
    lines += [head, sub, "-" * len(sub)]
    for name in names:
        r = results[name]
        cells = []
        for part in ("seen", "unseen", "average"):
            sl = slice(0, n_seen) if part == "seen" else slice(n_seen, None) if part == "unseen" else None
            vals = []
            for k in ("l2", "chamfer", "iou"):
                a = r[k]
                v = 0.5 * (a[:n_seen].mean() + a[n_seen:].mean()) if sl is None else a[sl].mean()
                vals.append(v)
            cells.append(f"{vals[0]:8.4f}{vals[1]:9.4f}{vals[2]:9.4f}")
        lines.append(f"{name:10s}|" + "|".join(cells))
    lines.append("")
    lines.append("paired per-scene difference vs the stage before (all held-out scenes), mean [bootstrap 95% CI]:")
    comparisons = list(zip(names[:-1], names[1:]))
    if len(names) >= 4:  # the paper's headline: the last stage against Stage I
        comparisons.append((names[1], names[-1]))
    for prev, cur in comparisons:
        parts = []
        for k, better in (("l2", "lower"), ("chamfer", "lower"), ("iou", "higher")):
            d = results[cur][k] - results[prev][k]
            lo, hi = bootstrap_ci(d)
            base = results[prev][k].mean()
            rel = 100 * d.mean() / base if base else float("nan")
            parts.append(f"{k.upper() if k != 'chamfer' else 'CD'} {d.mean():+.4f} ({rel:+.1f}%) [{lo:+.4f}, {hi:+.4f}]")
        lines.append(f"  {cur} - {prev}: " + "; ".join(parts))
    return "\n".join(lines)


def write_gif(path: Path, gt_videos, columns: dict, n: int, scale: int = 3) -> Path:
    from PIL import Image, ImageDraw

    from .fileio import atomic_path

    names = ["ground truth"] + list(columns)
    vids = [gt_videos] + list(columns.values())
    n = min(n, len(gt_videos))
    label_h = 12
    cell = SIZE * scale
    frames = []
    for t in range(FRAMES):
        canvas = Image.new("RGB", (cell * len(vids) + 2 * (len(vids) - 1), label_h + n * (cell + 2)), (24, 24, 24))
        draw = ImageDraw.Draw(canvas)
        for c, name in enumerate(names):
            draw.text((c * (cell + 2) + 2, 0), name, fill=(230, 230, 230))
            for r in range(n):
                img = (np.clip(vids[c][r][t], 0, 1) * 255).astype(np.uint8)
                im = Image.fromarray(img).resize((cell, cell), Image.NEAREST)
                canvas.paste(im, (c * (cell + 2), label_h + r * (cell + 2)))
        frames.append(canvas)
    with atomic_path(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / FPS * 1.5),
                       loop=0)
    return path


def _progress(name: str, log, t0: float):
    def cb(step, total, logs):
        if step == total or step % max(1, total // 10) == 0:
            extra = "".join(f" {k} {logs[k]:.3f}" for k in ("accuracy", "margin") if k in logs)
            log(f"  [{name}] {step}/{total} loss {logs['loss']:.4f}{extra} ({time.perf_counter() - t0:.0f}s)")
    return cb


# -- command ----------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="physmaster_demo", help="output folder (table, GIF, results.json)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scenes", type=int, default=None, help="held-out scenes per split (default 30)")
    parser.add_argument("--steps", type=int, default=None, help="Stage I steps (DPO stages: 0.4x each)")
    parser.add_argument("--fast", action="store_true", help="a tiny smoke run (seconds); numbers mean nothing")
    parser.add_argument("--make-base", action="store_true",
                        help=f"pretrain the base model on generic motion and write {BASE_FILE.name} (slow)")
    parser.add_argument("--base", default=None, help="base weights file (default: the shipped one)")


def run(args: argparse.Namespace) -> int:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    st = Settings.fast() if args.fast else Settings()
    if args.scenes is not None:
        st.eval_scenes = max(1, int(args.scenes))
    if args.steps is not None:
        st.sft_steps = max(1, int(args.steps))
        st.dpo_steps = max(1, int(round(0.4 * args.steps)))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()

    def log(msg):
        print(msg, flush=True)

    torch.manual_seed(args.seed)
    if args.make_base:
        log(f"pretraining the demo base model on generic motion: {st.base_steps} steps, seed {args.seed}")
        den, hist = pretrain_base(st.base_steps, seed=args.seed, log=log)
        path = Path(args.base) if args.base else BASE_FILE
        save_base(den, path, {"steps": st.base_steps, "seed": args.seed, "command": "python -m physmaster demo "
                              "--make-base", "final_loss": hist[-1]["loss"] if hist else None})
        log(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {time.perf_counter() - t_start:.0f}s")
        return 0

    from .physics import render_scene  # noqa: F401  (fail early with a clear error if physics is missing)
    from .training import StageTrainer, TrainConfig

    base_path = Path(args.base) if args.base else BASE_FILE
    if base_path.is_file() and not args.fast:
        den, info = load_base(base_path)
        log(f"base model: {base_path.name} (pretrained {info.get('steps')} steps on generic motion, "
            f"seed {info.get('seed')})")
    elif base_path.is_file():
        den, info = load_base(base_path)
    else:
        steps = max(2, st.base_steps // 4)
        log(f"no shipped base weights ({base_path}); pretraining a base for {steps} steps first")
        den, _ = pretrain_base(steps, seed=args.seed, log=log)
    backbone = ProxyBackbone()

    # held-out evaluation scenes: 30 seen + 30 unseen
    n = st.eval_scenes
    eval_scenes = [drop_scene(EVAL_SEED + i, "seen") for i in range(n)] + \
                  [drop_scene(EVAL_SEED + i, "unseen") for i in range(n)]
    eval_cond = conditioning(np.stack([s.frames[0] for s in eval_scenes]), backbone)
    results: dict[str, dict] = {}
    videos: dict[str, list] = {}

    def do_eval(name, head):
        t0 = time.perf_counter()
        results[name], videos[name] = evaluate(den, head, eval_scenes, eval_cond, st.sample_steps, st.eval_seeds)
        r = results[name]
        log(f"  eval {name}: L2 {r['l2'].mean():.4f} CD {r['chamfer'].mean():.4f} IoU {r['iou'].mean():.4f} "
            f"({time.perf_counter() - t0:.0f}s)")

    log(f"[1/5] evaluating the base model on {2 * n} held-out scenes")
    do_eval("base", None)

    # Stage I
    log(f"[2/5] Stage I: flow matching on {st.sft_scenes} simulated drops, head + DiT LoRA, {st.sft_steps} steps")
    encoder = new_head(args.seed)
    den.add_lora(st.lora_rank, targets=LORA_TARGETS, seed=args.seed)
    sft_data = video_set([drop_scene(SFT_SEED + i) for i in range(st.sft_scenes)], backbone)
    cfg1 = TrainConfig(steps=st.sft_steps, lr=st.lr_sft, batch_size=st.batch, seed=args.seed,
                       warmup_steps=min(20, st.sft_steps))
    t0 = time.perf_counter()
    StageTrainer("sft", den, encoder, sft_data, cfg1).run(_progress("stage I", log, t0))
    do_eval("Stage I", encoder.head)

    # candidates + labels
    log(f"[3/5] candidates: {st.candidates} per start image for {st.dpo_scenes} drops, ranked vs ground truth")
    pairs = make_pairs(den, encoder.head, [drop_scene(DPO_SEED + i) for i in range(st.dpo_scenes)], backbone, st,
                       log)

    # Stage II
    log(f"[4/5] Stage II: Flow-DPO on a DiT LoRA (reference: LoRA off), beta {st.beta}, {st.dpo_steps} steps")
    den.fold_lora(seed=args.seed + 1)
    cfg2 = TrainConfig(steps=st.dpo_steps, lr=st.lr_lora, batch_size=st.dpo_batch, seed=args.seed + 1,
                       beta=st.beta)
    t0 = time.perf_counter()
    StageTrainer("dpo-lora", den, encoder, pairs, cfg2).run(_progress("stage II", log, t0))
    do_eval("Stage II", encoder.head)

    # Stage III
    log(f"[5/5] Stage III: Flow-DPO on the physical head only (reference: frozen head copy), {st.dpo_steps} steps")
    den.fold_lora(seed=args.seed + 2)
    den.set_lora_enabled(False)  # the folded LoRA is zero: skip its compute
    cfg3 = TrainConfig(steps=st.dpo_steps, lr=st.lr_head, batch_size=st.dpo_batch, seed=args.seed + 2,
                       beta=st.beta)
    t0 = time.perf_counter()
    StageTrainer("dpo-head", den, encoder, pairs, cfg3).run(_progress("stage III", log, t0))
    do_eval("Stage III", encoder.head)

    table = format_table(results, n)
    wall = time.perf_counter() - t_start
    log("")
    log(f"PhysMaster proxy benchmark ({n} seen + {n} unseen held-out drops, {SIZE}x{SIZE}, {FRAMES} frames; "
        "L2/CD lower is better, IoU higher)")
    log(table)
    gif = write_gif(out / "comparison.gif", [s.frames for s in eval_scenes],
                    {"base": videos["base"], "Stage I": videos["Stage I"], "Stage III": videos["Stage III"]},
                    st.gif_scenes)
    (out / "table.txt").write_text(table + "\n", encoding="utf-8")
    summary = {"settings": st.__dict__, "seed": args.seed, "wall_seconds": wall, "pairs": len(pairs),
               "per_scene": {k: {m: v.tolist() for m, v in r.items()} for k, r in results.items()},
               "scenes": {"seen": n, "unseen": n}}
    (out / "results.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    encoder.provenance.setdefault("stages", []).extend(
        [{"stage": "sft", "steps": st.sft_steps}, {"stage": "dpo-lora", "steps": st.dpo_steps, "beta": st.beta},
         {"stage": "dpo-head", "steps": st.dpo_steps, "beta": st.beta}])
    encoder.provenance.update({"base_model": "physmaster demo tiny Wan", "dataset": "proxy drops", "seed": args.seed})
    encoder.save(out / "demo_encoder.safetensors")
    log(f"\nwrote {gif} (ground truth | base | Stage I | Stage III), {out / 'table.txt'}, "
        f"{out / 'results.json'} in {wall:.0f}s")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run(argparse.ArgumentParser().parse_args()))
