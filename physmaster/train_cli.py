"""`python -m physmaster train-sft` / `train-dpo`: train a PhysEncoder (and a DiT LoRA) on a diffusers Wan model,
on one device or data-parallel on N processes with Hugging Face accelerate:

    python -m physmaster train-dpo --model M --pairs DATASET --out OUT ...           # one process, one device
    accelerate launch -m physmaster train-dpo --model M --pairs DATASET --out OUT ... # N processes (DDP)

Inputs are what ComfyUI wrote, read by their one reader:
- `train-dpo --pairs DIR`: a preference dataset folder exactly as PhysMasterPreferencePicker writes it
  (`output/physmaster/preferences/<name>`: dataset.json, groups/<id>.safetensors, checksummed pairs.jsonl), read
  through `physmaster.preferences` (torn or edited lines, missing or unusable groups are named and skipped).
- `train-sft --videos DIR`: a video set as PhysMasterSaveTrainingVideos writes it (`output/physmaster/videos/
  <name>`), read through `physmaster.videoset`.
The stored ComfyUI conditioning becomes the Wan transformer's inputs in `physmaster.backends.comfy_inputs` (latents
normalised with the VAE's statistics: `--latent-norm`). `--model` is a diffusers transformer folder or the Wan
`.safetensors` ComfyUI loads from models/diffusion_models.

Deprecated (still read, with a DeprecationWarning): the earlier side-by-side layouts, a folder of `<name>.safetensors`
videos (`latent`, `context`, `features`, `image_cond` | `first_frame_latent`) for SFT, and `pairs.jsonl` beside
`<group>.safetensors` files (`latents`, `context`, ...) for DPO; their latents are used as stored.

Outputs in --out, written by the main process only: `encoder.safetensors` (PhysEncoder with provenance: stage
history, base model, dataset name and size, processes, steps, lr, beta, seed), `lora.safetensors` (the DiT LoRA in
the key layout ComfyUI's LoraLoaderModelOnly loads) and `checkpoints/` (resumable state: run the same command
again after a kill, with any process count of the same global batch). `--batch-size` is per process: the global
batch is batch size x processes x --grad-accum.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

import torch

from .errors import CheckpointError, PhysMasterError

HELP = "train a PhysEncoder (+ DiT LoRA) on a diffusers Wan transformer: Stage I SFT or Stage II/III Flow-DPO"


def add_arguments(parser: argparse.ArgumentParser, name: str = "train-sft") -> None:
    parser.add_argument("--model", required=True, help="folder of a diffusers WanTransformer3DModel "
                        "(config.json + .safetensors), e.g. Wan2.1-I2V-14B-480P-Diffusers/transformer, or the Wan "
                        ".safetensors file ComfyUI loads from models/diffusion_models")
    if name == "train-sft":
        parser.add_argument("--videos", required=True, help="video set folder (PhysMasterSaveTrainingVideos: "
                            "output/physmaster/videos/<name>)")
    else:
        parser.add_argument("--pairs", required=True, help="preference dataset folder as the picker writes it "
                            "(output/physmaster/preferences/<name>)")
        parser.add_argument("--sources", default="human,judge", help="which labels to train on (default "
                            "human,judge)")
        parser.add_argument("--stage", choices=("lora", "head"), default="head",
                            help="Stage II trains the DiT LoRA, Stage III (default) the physical head only")
        parser.add_argument("--beta", type=float, default=500.0, help="Flow-DPO beta (> 0; default 500)")
        parser.add_argument("--margin-use", default="ignore", type=lambda s: s.replace("-", " "),
                            choices=("ignore", "weight", "filter", "filter and weight"),
                            help="how the pairs' margins are used: ignore (default: every pair weighs the same), "
                                 "weight (each pair's loss scaled by its margin over its source's mean margin), "
                                 "filter (judge pairs below --min-margin dropped; a person's pairs are kept), "
                                 "filter-and-weight")
        parser.add_argument("--min-margin", type=float, default=0.1,
                            help="with --margin-use filter: the lowest judge confidence (0..1) kept (default 0.1)")
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
    parser.add_argument("--batch-size", type=int, default=1, help="videos or pairs per step *per process* (the "
                        "global batch is this x processes x --grad-accum)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-every", type=int, default=50, help="save resumable state every K steps")
    parser.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint in --out")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="less memory, ~30%% slower")
    parser.add_argument("--shift", type=float, default=1.0, help="timestep shift of t sampling (Wan: 3-5)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="dtype of the frozen DiT (losses are always float32)")
    parser.add_argument("--device", default=None, help="'cpu' to train on the CPU; by default accelerate picks "
                        "each process's device (one GPU per process under accelerate launch)")
    parser.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default=None,
                        help="autocast of the forward passes (default: accelerate's config / launch flag, else no)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default 1)")
    parser.add_argument("--latent-norm", default="auto", help="latent statistics to normalise the stored "
                        "(ComfyUI) latents with: auto (Wan 2.1's, for 16 channels), none, or a diffusers VAE "
                        "config.json / folder (e.g. Wan2.2-TI2V-5B-Diffusers/vae)")
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


def _deprecated(what: str, fix: str) -> None:
    import warnings

    text = f"{what} uses the deprecated side-by-side layout; {fix} (see the train command's --help)"
    warnings.warn(text, DeprecationWarning, stacklevel=3)
    print(f"warning: {text}", file=sys.stderr)


def read_video_folder(folder: str | Path):
    """Deprecated side-by-side SFT layout (a folder of `<name>.safetensors` with `latent`, `context`, ...)."""
    from .training import VideoSample, VideoSet

    folder = Path(folder)
    _deprecated(str(folder), "save a video set with PhysMasterSaveTrainingVideos instead")
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
    """Deprecated side-by-side DPO layout (`pairs.jsonl` beside `<group>.safetensors`; no checksums)."""
    from .training import PreferencePair, PreferenceSet

    folder = Path(folder)
    _deprecated(str(folder), "mark a preference dataset with PhysMasterPreferencePicker instead")
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




def is_legacy_pairs(folder: Path) -> bool:
    return not (folder / "groups").is_dir() and not (folder / "dataset.json").exists() and \
        (folder / "pairs.jsonl").is_file() and any(folder.glob("*.safetensors"))


# -- the picker's dataset and the video sets, through their one reader ---------------------------------------------
def _model_checks(where: str, fix_file: str, shape, width: int, model) -> None:
    """A dataset made with another model: latent channels and context width against --model."""
    cfg = model.config
    problems = []
    if int(shape[0]) != int(cfg.out_channels):
        problems.append(f"its latents have {shape[0]} channels but --model takes {cfg.out_channels}")
    if int(width) != int(cfg.text_dim):
        problems.append(f"its text context is {width} wide but --model's is {cfg.text_dim}")
    if problems:
        raise PhysMasterError(f"{where} was made with another model ({fix_file}: " + "; ".join(problems) +
                              "): pass the --model the data was sampled with, or a dataset made with this one")


def read_preference_dataset(folder: str | Path, model, latent_norm: str = "auto", sources=("human", "judge"),
                            report=print):
    """A picker-written preference dataset -> PreferenceSet for the diffusers Wan backend. Reads only through
    `physmaster.preferences` (checksums, answers, group checks); each skipped entry is reported by name."""
    from .backends.comfy_inputs import model_latents, resolve_latent_norm, wan_conditioning
    from .preferences import PreferenceDataset
    from .training import PreferencePair, PreferenceSet

    ds = PreferenceDataset(Path(folder))
    if not ds.path.is_dir():
        raise PhysMasterError(f"--pairs {folder}: no such folder (a preference dataset is a folder in "
                              "output/physmaster/preferences/)")
    info = ds.info()
    pairs, stats = ds.read_pairs()
    if info is None and pairs:  # no dataset.json: the first group's header says what the dataset holds
        _, shape, width = ds.check_group(pairs[0].group)
        info = {"latent_shape": shape, "context_dim": width}
    if info is not None:
        _model_checks(f"preference dataset {ds.path}", "dataset.json", info["latent_shape"], info["context_dim"],
                      model)
    for problem in stats.problems:
        report(f"warning: {ds.path.name}: {problem}; skipped")
    pairs = [p for p in pairs if p.source in sources]
    pairs, problems = ds.screen_pairs(pairs)
    for problem in problems:
        report(f"warning: {ds.path.name}: {problem}")
    if not pairs:
        raise PhysMasterError(f"preference dataset {ds.path} has no usable pairs ({stats.summary()}); mark pairs "
                              "with PhysMasterPreferencePicker, or check --sources")
    norm = resolve_latent_norm(latent_norm, int(info["latent_shape"][0]))
    cfg = model.config
    items, groups = [], {}
    for p in pairs:
        if p.group not in groups:
            where = f"group file {ds.group_path(p.group)}"
            try:
                tensors = ds.load_group(p.group)
            except PhysMasterError as e:
                report(f"warning: {e}")
                groups[p.group] = None
                continue
            latents = model_latents(tensors["latents"], norm)
            cond = wan_conditioning(tensors, in_channels=cfg.in_channels, latent_shape=latents.shape[1:], norm=norm,
                                    image_dim=cfg.image_dim, where=where)
            groups[p.group] = (latents, cond)
        if groups[p.group] is None:
            continue
        latents, cond = groups[p.group]
        items.append(PreferencePair(cond, latents[p.winner], latents[p.loser], p.source, p.margin, p.group))
    data = PreferenceSet(items)
    if data.skips:
        report(f"warning: {data.skip_summary()}")
    return data, ds.name


def read_video_dataset(folder: str | Path, model, latent_norm: str = "auto", report=print):
    """A video set (PhysMasterSaveTrainingVideos) -> VideoSet for the diffusers Wan backend, via physmaster.videoset."""
    from .backends.comfy_inputs import model_latents, resolve_latent_norm, wan_conditioning
    from .training import VideoSample, VideoSet
    from .videoset import VideoDataset

    vs = VideoDataset(Path(folder))
    usable, problems = vs.read()
    info = vs.info()
    _model_checks(f"video set {vs.path}", "dataset.json", info["latent_shape"], info["context_dim"], model)
    for problem in problems:
        report(f"warning: {problem}")
    if not usable:
        raise PhysMasterError(f"video set {vs.path} has no usable videos" + (f" ({'; '.join(problems)})"
                                                                               if problems else ""))
    norm = resolve_latent_norm(latent_norm, int(info["latent_shape"][0]))
    samples = []
    for vid in usable:
        tensors = vs.load(vid)
        latents = model_latents(tensors["latents"], norm)
        cond = wan_conditioning(tensors, in_channels=model.config.in_channels, latent_shape=latents.shape[1:],
                                norm=norm, image_dim=model.config.image_dim, where=f"{vs.file_path(vid)}")
        samples += [VideoSample(latents[i], cond, f"{vid[:8]}:{i}") for i in range(latents.shape[0])]
    data = VideoSet(samples)
    if data.skips:
        report(f"warning: {data.skip_summary()}")
    return data, vs.name


# -- processes ------------------------------------------------------------------------------------------------------
OUT_LOCK = ".physmaster_train.lock"


def make_accelerator(args):
    from accelerate import Accelerator

    device = getattr(args, "device", None)
    return Accelerator(cpu=device == "cpu", mixed_precision=getattr(args, "mixed_precision", None))


def agree(accelerator, error: BaseException | None, what: str) -> None:
    """Collective: every process reports whether its part of `what` failed; if any did, every process raises
    the first error (so no process waits forever on one that stopped)."""
    if accelerator.num_processes == 1:
        if error is not None:
            raise error
        return
    from accelerate.utils import gather_object

    text = None if error is None else f"{type(error).__name__}: {error}"
    texts = gather_object([text])
    failed = [(i, t) for i, t in enumerate(texts) if t is not None]
    if error is not None:
        raise error
    if failed:
        i, t = failed[0]
        raise PhysMasterError(f"process {i} failed while {what}: {t.split(': ', 1)[-1]}")


def check_same_arguments(accelerator, args, extra: dict | None = None) -> None:
    """Collective: every process must have been started with the same arguments (and see the same data)."""
    if accelerator.num_processes == 1:
        return
    from accelerate.utils import gather_object

    mine = {k: v for k, v in sorted(vars(args).items()) if not k.startswith("_")}
    mine = {k: v if isinstance(v, (int, float, str, bool, type(None))) else str(v) for k, v in mine.items()}
    mine.update(extra or {})
    everyone = gather_object([mine])
    first = everyone[0]
    for rank, theirs in enumerate(everyone[1:], 1):
        diffs = [f"--{k.replace('_', '-')} {first.get(k)!r} in process 0 but {theirs.get(k)!r} in process {rank}"
                 for k in sorted(set(first) | set(theirs)) if first.get(k) != theirs.get(k)]
        if diffs:
            raise PhysMasterError("the processes were started with different arguments (" + "; ".join(diffs[:4]) +
                                  "): start every process with the same command line (accelerate launch does)")


class OutputLock:
    """The main process holds `--out`'s lock for the whole run; another run on the same folder is refused."""

    def __init__(self, accelerator, out: Path):
        from filelock import FileLock, Timeout

        self.lock = None
        error = None
        if accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            lock = FileLock(str(out / OUT_LOCK), timeout=0)
            try:
                lock.acquire()
                self.lock = lock
            except Timeout:
                error = PhysMasterError(f"another training run is writing to --out {out} (it holds {out / OUT_LOCK}); "
                                        "wait for it to finish or choose another --out")
        agree(accelerator, error, f"locking --out {out}")

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _data_digest(data) -> str:
    import hashlib

    h = hashlib.sha256()
    items = getattr(data, "pairs", None) or getattr(data, "samples", [])
    for item in items:
        for t in ((item.winner, item.loser) if hasattr(item, "winner") else (item.latent,)):
            h.update(t.float().contiguous().numpy().tobytes()[:4096])
        h.update(str(getattr(item, "group", getattr(item, "name", ""))).encode())
    return f"{len(items)}:{h.hexdigest()[:16]}"


# -- run ----------------------------------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    command = getattr(args, "_command", "train-sft")
    sft = command == "train-sft"
    stage = "sft" if sft else f"dpo-{args.stage}"
    out = Path(args.out)
    dtype = getattr(torch, args.dtype)
    accelerator = make_accelerator(args)
    main = accelerator.is_main_process
    world = accelerator.num_processes

    def report(text: str) -> None:
        if main:
            print(text, file=sys.stderr if text.startswith("warning") else sys.stdout, flush=True)

    try:
        check_same_arguments(accelerator, args)
        lock = OutputLock(accelerator, out)
        try:
            return _train(args, accelerator, stage, sft, out, dtype, report, world, main)
        finally:
            lock.release()
    finally:
        close_process_group()


def close_process_group() -> None:
    """Leave the process group before exiting, on success and on error: a process that exits with the gloo
    group still open can take a peer down with SIGABRT instead of the peer's own clear error (exit code 2)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _train(args, accelerator, stage, sft, out, dtype, report, world, main) -> int:
    from .backends.diffusers_wan import WanDenoiser
    from .encoder import HeadConfig, PhysEncoder, load_encoder
    from .training import StageTrainer, TrainConfig, record_stage

    device = accelerator.device
    if args.device not in (None, "cpu") and world == 1:
        device = torch.device(args.device)
    data = encoder = den = None
    error = None
    try:
        den = WanDenoiser.from_pretrained(args.model, dtype=dtype, device=device)
        source = Path(args.videos if sft else args.pairs)
        if sft:
            if (source / "dataset.json").exists() or (source / "videos").is_dir():
                data, dataset = read_video_dataset(source, den.model, args.latent_norm, report)
            else:
                data, dataset = read_video_folder(source), source.resolve().name
        elif is_legacy_pairs(source):
            data, dataset = read_preference_folder(source), source.resolve().name
        else:
            wanted = tuple(s.strip() for s in args.sources.split(",") if s.strip())
            if not wanted or any(s not in ("human", "judge") for s in wanted):
                raise PhysMasterError(f"--sources must name human and/or judge, got {args.sources!r}")
            data, dataset = read_preference_dataset(source, den.model, args.latent_norm, wanted, report)
        first = data[0].cond
        if args.encoder:
            encoder = load_encoder(args.encoder, device=device)
            width = None if first.features is None else int(first.features.shape[-1])
            if encoder.config.context_dim != den.context_dim:
                raise PhysMasterError(f"--encoder {args.encoder} emits {encoder.config.context_dim}-wide tokens but "
                                      f"--model's text context is {den.context_dim} wide")
            if width is not None and encoder.config.in_dim != width:
                raise PhysMasterError(f"--encoder {args.encoder} reads {encoder.config.in_dim}-wide backbone features "
                                      f"but the data's are {width} wide (made with another backbone)")
        else:
            if first.features is None:
                raise PhysMasterError("the data has no 'features' (backbone hidden states): cannot size a new "
                                      "encoder (mark the pairs with PhysMasterApply in the graph)")
            width = int(first.features.shape[-1])
            heads = 8 if args.head_width % 8 == 0 else 1
            encoder = PhysEncoder.new(HeadConfig(in_dim=width, context_dim=den.context_dim, num_tokens=args.tokens,
                                                 hidden_dim=args.head_width, heads=heads), seed=args.seed,
                                      name="physmaster")
            encoder.head.to(device)
        encoder.head.float()
    except (PhysMasterError, OSError) as e:
        error = e
    agree(accelerator, error, "reading the model and the data")
    check_same_arguments(accelerator, args, {"data": _data_digest(data)})

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
                         gradient_checkpointing=args.gradient_checkpointing, shift=args.shift,
                         grad_accum=args.grad_accum, margin_use=getattr(args, "margin_use", "ignore"),
                         min_margin=getattr(args, "min_margin", 0.0))
    trainer = StageTrainer(stage, den, encoder, data, config, out / "checkpoints", resume=not args.no_resume,
                           accelerator=accelerator)
    report(f"{stage}: {len(trainer.data)} {'videos' if sft else 'pairs'} from {dataset}; {world} process"
           f"{'es' if world > 1 else ''} x batch {config.batch_size} x accumulation {config.grad_accum} = global "
           f"batch {trainer.global_batch}")
    if trainer.margins is not None and config.margin_use != "ignore":
        report(f"{stage}: {trainer.margins.summary()}")
    if trainer.step:
        report(f"resuming {stage} from step {trainer.step} ({trainer.checkpoint_path})")

    fault = os.environ.get("PHYSMASTER_FAULT_KILL", "")  # tests: "RANK:STEP" = that process SIGKILLs itself there

    def progress(step, total, logs):
        if fault and fault == f"{accelerator.process_index}:{step}":
            os.kill(os.getpid(), signal.SIGKILL)
        if step == total or step % max(1, total // 20) == 0:
            extra = "".join(f" {k} {logs[k]:.4g}" for k in ("accuracy", "margin") if k in logs)
            report(f"[{stage}] step {step}/{total} loss {logs['loss']:.5f}{extra}")

    done_before = trainer.step
    result = trainer.run(progress)
    steps = result.steps_done - done_before
    if steps > 0 and result.seconds > 0:
        items = steps * trainer.global_batch
        report(f"trained {steps} steps in {result.seconds:.2f} s: {items / result.seconds:.3f} "
               f"{'videos' if sft else 'pairs'}/s, {result.seconds / items:.4f} s per {'video' if sft else 'pair'}")
    if not main:
        return 1 if result.stopped else 0
    record_stage(encoder, result, config, base_model=Path(args.model).resolve().name.removesuffix(".safetensors"),
                 dataset=dataset, dataset_size=len(trainer.data),
                 extra={"lora": bool(den.has_lora), "processes": world, "global_batch": trainer.global_batch,
                        "grad_accum": config.grad_accum, "mixed_precision": str(accelerator.mixed_precision)})
    enc_path = encoder.save(out / "encoder.safetensors")
    report(f"wrote {enc_path}")
    if den.has_lora:
        lora_path = den.save_lora(out / "lora.safetensors", metadata={"physmaster.provenance": encoder.provenance})
        report(f"wrote {lora_path}")
    if result.stopped:
        report(f"warning: {result.stopped}")
        return 1
    return 0
