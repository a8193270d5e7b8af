"""`python -m physmaster train-sft` / `train-dpo`: train a PhysEncoder (and a DiT LoRA) on a diffusers Wan model.

Inputs are *pre-encoded* (latents and embeddings, not pixels): encode videos with the model's VAE, prompts with
its text encoder and start images with the backbone (e.g. in ComfyUI, or with diffusers), and write them as:

- SFT video folder: one `<name>.safetensors` per video with tensors
    `latent` [C, T, H, W]; `context` [L, D] (text encoder hidden states); `features` [P, C_in] (backbone hidden
    states of the start image, what the PhysHead reads); and either `image_cond` [4 + C, T, H, W] (Wan I2V
    mask + first-frame latent) or `first_frame_latent` [C, H, W] (the CLI builds the mask, see
    `physmaster.backends.diffusers_wan.make_i2v_condition`); optionally `image_embeds` [N, D_img] (Wan 2.1 CLIP).
- DPO preference folder (DESIGN.md section 5, minimal reader): `pairs.jsonl`, one JSON object per line
    {"group": "<g>", "winner": i, "loser": j, "source": "judge"|"human", "margin": m}, and `<g>.safetensors`
    holding the group's shared `context`, `features`, `image_cond`/`first_frame_latent` (as above) and
    `latents` [N, C, T, H, W] (the N candidates). Torn or invalid lines are reported and skipped.

Outputs in --out: `encoder.safetensors` (PhysEncoder with provenance: stage history, base model, dataset,
steps, lr, beta, seed), `lora.safetensors` (diffusers-format DiT LoRA, when the stage trains or keeps one) and
`checkpoints/` (resumable training state: run the same command again to continue an interrupted run).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from .errors import CheckpointError, PhysMasterError

HELP = "train a PhysEncoder (+ DiT LoRA) on a diffusers Wan transformer: Stage I SFT or Stage II/III Flow-DPO"


def add_arguments(parser: argparse.ArgumentParser, name: str = "train-sft") -> None:
    parser.add_argument("--model", required=True, help="folder of a diffusers WanTransformer3DModel "
                        "(config.json + .safetensors), e.g. Wan2.1-I2V-14B-480P-Diffusers/transformer")
    if name == "train-sft":
        parser.add_argument("--videos", required=True, help="folder of pre-encoded videos (see --help text)")
    else:
        parser.add_argument("--pairs", required=True, help="preference folder: pairs.jsonl + group .safetensors")
        parser.add_argument("--stage", choices=("lora", "head"), default="head",
                            help="Stage II trains the DiT LoRA, Stage III (default) the physical head only")
        parser.add_argument("--beta", type=float, default=500.0, help="Flow-DPO beta (> 0; default 500)")
    parser.add_argument("--out", required=True, help="output folder (encoder, LoRA, checkpoints)")
    parser.add_argument("--encoder", help="PhysEncoder .safetensors to start from (default: a new one)")
    parser.add_argument("--tokens", type=int, default=16, help="physical tokens of a new encoder (default 16)")
    parser.add_argument("--head-width", type=int, default=512, help="hidden width of a new encoder's head")
    parser.add_argument("--lora", help="DiT LoRA .safetensors from an earlier stage to start from")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--lora-alpha", type=float, default=None, help="(default: the rank)")
    parser.add_argument("--lora-targets", default="to_q,to_k,to_v,to_out.0",
                        help="comma-separated module names for the LoRA (default to_q,to_k,to_v,to_out.0)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-4 SFT, 1e-5 DPO "
                        "LoRA, 1e-4 DPO head)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=50, help="save resumable state every K steps")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="less memory, ~30%% slower")
    parser.add_argument("--shift", type=float, default=1.0, help="timestep shift of t sampling (Wan: 3-5)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the frozen DiT (losses are always float32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.set_defaults(_command=name)


# -- data -------------------------------------------------------------------------------------------------------
def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable .safetensors file ({e})") from None


def _cond_from(t: dict[str, torch.Tensor], latent_shape, where: str):
    from .backends.diffusers_wan import make_i2v_condition
    from .training import Conditioning

    if "context" not in t:
        raise PhysMasterError(f"{where} has no 'context' tensor (text encoder hidden states [L, D])")
    image_cond = t.get("image_cond")
    if image_cond is None and "first_frame_latent" in t:
        image_cond = make_i2v_condition(t["first_frame_latent"].float()[None], latent_shape[1])[0]
    feats = t.get("features")
    emb = t.get("image_embeds")
    return Conditioning(context=t["context"].float()[None],
                        features=None if feats is None else feats.float()[None],
                        image_cond=None if image_cond is None else image_cond.float()[None],
                        image_embeds=None if emb is None else emb.float()[None])


def read_video_folder(folder: str | Path):
    from .training import VideoSample, VideoSet

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PhysMasterError(f"{folder} has no .safetensors video files (see `python -m physmaster train-sft "
                              "--help` for the format)")
    samples = []
    for f in files:
        t = _load_safetensors(f)
        if "latent" not in t:
            raise PhysMasterError(f"{f} has no 'latent' tensor [C, T, H, W]")
        lat = t["latent"].float()
        samples.append(VideoSample(lat, _cond_from(t, lat.shape, str(f)), f.stem))
    return VideoSet(samples)


def read_preference_folder(folder: str | Path):
    from .training import PreferencePair, PreferenceSet

    folder = Path(folder)
    jl = folder / "pairs.jsonl"
    if not jl.is_file():
        raise PhysMasterError(f"{folder} has no pairs.jsonl")
    groups: dict[str, dict] = {}
    pairs, bad = [], []
    for n, line in enumerate(jl.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            g, w, l = rec["group"], rec["winner"], rec["loser"]
            if type(g) is not str or type(w) is not int or type(l) is not int:  # refused, never coerced
                raise ValueError("group must be a name, winner and loser whole numbers")
            if "/" in g or "\\" in g or ".." in g:
                raise ValueError(f"bad group name {g!r}")
            if g not in groups:
                groups[g] = _load_safetensors(folder / f"{g}.safetensors")
            lat = groups[g]["latents"]
            if not (0 <= w < lat.shape[0] and 0 <= l < lat.shape[0]):
                raise ValueError(f"candidate index out of range (group has {lat.shape[0]})")
            cond = _cond_from(groups[g], lat.shape[1:], f"{g}.safetensors")
            margin = float(rec.get("margin", 1.0))
            pairs.append(PreferencePair(cond, lat[w].float(), lat[l].float(), str(rec.get("source", "judge")),
                                        margin if math.isfinite(margin) else 1.0, g))
        except RecursionError:
            bad.append(f"line {n}: nested too deeply")
        except (ValueError, KeyError, TypeError, OverflowError, CheckpointError) as e:
            bad.append(f"line {n}: {e}")
    for b in bad:
        print(f"warning: pairs.jsonl {b}; skipped", file=sys.stderr)
    return PreferenceSet(pairs)


# -- run ----------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from .backends.diffusers_wan import WanDenoiser
    from .encoder import HeadConfig, PhysEncoder, load_encoder
    from .training import StageTrainer, TrainConfig, record_stage

    command = getattr(args, "_command", "train-sft")
    sft = command == "train-sft"
    stage = "sft" if sft else f"dpo-{args.stage}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)

    data = read_video_folder(args.videos) if sft else read_preference_folder(args.pairs)
    first = data[0].cond
    den = WanDenoiser.from_pretrained(args.model, dtype=dtype, device=device)
    if args.encoder:
        encoder = load_encoder(args.encoder, device=device)
    else:
        if first.features is None:
            raise PhysMasterError("the data has no 'features' (backbone hidden states): cannot size a new encoder")
        width = int(first.features.shape[-1])
        heads = 8 if args.head_width % 8 == 0 else 1
        encoder = PhysEncoder.new(HeadConfig(in_dim=width, context_dim=den.context_dim, num_tokens=args.tokens,
                                             hidden_dim=args.head_width, heads=heads), seed=args.seed, name="physmaster")
        encoder.head.to(device)
    encoder.head.float()

    targets = [s.strip() for s in args.lora_targets.split(",") if s.strip()]
    if args.lora:
        den.load_lora(args.lora)
        if stage == "dpo-lora":
            den.fold_lora(seed=args.seed)  # the reference of Stage II = the model with the earlier LoRA
    elif stage in ("sft", "dpo-lora"):
        den.add_lora(args.lora_rank, args.lora_alpha, targets, seed=args.seed)
    for p in den.lora_parameters():
        p.data = p.data.float()  # train LoRA weights in float32 whatever the DiT's dtype

    lr = args.lr if args.lr is not None else (1e-5 if stage == "dpo-lora" else 1e-4)
    config = TrainConfig(steps=args.steps, lr=lr, batch_size=args.batch_size, seed=args.seed,
                         beta=getattr(args, "beta", 500.0), checkpoint_every=args.checkpoint_every,
                         gradient_checkpointing=args.gradient_checkpointing, shift=args.shift)
    trainer = StageTrainer(stage, den, encoder, data, config, out / "checkpoints", resume=not args.no_resume)
    if trainer.step:
        print(f"resuming {stage} from step {trainer.step} ({trainer.checkpoint_path})")

    def progress(step, total, logs):
        if step == total or step % max(1, total // 20) == 0:
            extra = "".join(f" {k} {logs[k]:.4g}" for k in ("accuracy", "margin") if k in logs)
            print(f"[{stage}] step {step}/{total} loss {logs['loss']:.5f}{extra}", flush=True)

    result = trainer.run(progress)
    dataset = str(Path(args.videos if sft else args.pairs).resolve().name)
    record_stage(encoder, result, config, base_model=str(Path(args.model).resolve().name), dataset=dataset,
                 dataset_size=len(data), extra={"lora": bool(den.has_lora)})
    enc_path = encoder.save(out / "encoder.safetensors")
    print(f"wrote {enc_path}")
    if den.has_lora:
        lora_path = den.save_lora(out / "lora.safetensors", metadata={"physmaster.provenance": encoder.provenance})
        print(f"wrote {lora_path}")
    if result.stopped:
        print(f"warning: {result.stopped}", file=sys.stderr)
        return 1
    return 0
