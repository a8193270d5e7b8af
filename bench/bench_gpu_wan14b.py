"""Ready for a GPU: PhysMaster training on a Wan 2.1 I2V 14B-shaped random DiT in fp8, as on a 24 GB card.

One command, unattended, no download: builds the model's random fp8 weights on the GPU tensor by tensor (never a
whole bf16 copy), hands them to ComfyUI's own loader (as UNETLoader with weight_dtype fp8_e4m3fn does), then runs
the train nodes' code path (shared weights, bypass LoRA, partial loading, bf16 autocast, split passes,
activations on the CPU) for 3 Stage III steps on one pair at 480p x 81 frames and 3 Stage II steps at 33 frames.
Prints, per run, the measured peak VRAM (torch.cuda.max_memory_allocated), seconds per step and the accounting's
prediction. `--vram-gib 24` makes ComfyUI treat the card as a 24 GB one (the rest reserved), so partial loading
keeps what fits there; the goal is a measured peak <= 22 GiB.

    COMFYUI_PATH=/path/to/ComfyUI python bench/bench_gpu_wan14b.py [--vram-gib 24] [--steps 3]
    COMFYUI_PATH=... python bench/bench_gpu_wan14b.py --plan-only   # the accounting table only (CPU is enough)

On a GPU machine without network (no ComfyUI, no pip): `bash bench/gpu/prepare.sh /path/to/ComfyUI` here, carry
`.comfy` and `.whl` there, and run `bash bench/gpu/check.sh` (installs what is missing, a CPU smoke run first, then
this bench with `--vram-gib 24`, GPU memory sampled by nvidia-smi alongside; the log in `$OUT`).

Budget: under 8 minutes on one H100/H200 (weights ~1 min, Stage III ~3-4 min, Stage II ~1-2 min: estimated from
FLOPs, not measured here; no GPU was available when this was written).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WAN14B_I2V = dict(model_type="i2v", dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=36, out_dim=16,
                  text_dim=4096, freq_dim=256, eps=1e-6, patch_size=(1, 2, 2), window_size=(-1, -1), qk_norm=True,
                  cross_attn_norm=True)
TEXT_TOKENS = 512  # umT5-XXL context as Wan pads it
HEAD = dict(in_dim=1280, context_dim=4096, num_tokens=16, hidden_dim=1024, depth=2, heads=8)


def setup_comfy(comfy: str, cpu: bool):
    sys.path.insert(0, comfy)
    sys.path.insert(0, str(ROOT / "tests" / "host" / "stubs"))
    try:
        import sitecustomize  # noqa: F401  (stubs torchvision/torchaudio where they are not installed)
    except ImportError:
        pass
    os.chdir(comfy)
    from comfy.cli_args import args
    args.cpu = cpu
    args.disable_dynamic_vram = True  # in-process: the legacy ModelPatcher (what the train nodes use)
    import server
    server.PromptServer.instance = None
    spec = importlib.util.spec_from_file_location("physmaster_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pack = importlib.util.module_from_spec(spec)
    sys.modules["physmaster_pack"] = pack
    spec.loader.exec_module(pack)
    return importlib.import_module("physmaster_pack.nodes.training_nodes"), \
        importlib.import_module("physmaster_pack.nodes.accounting")


SMOKE = dict(WAN14B_I2V, dim=256, ffn_dim=512, num_heads=2, num_layers=2)  # --smoke-cpu: the same code, tiny


def meta_wan14b(config=None):
    import torch
    import comfy.ops
    from comfy.ldm.wan.model import WanModel
    with torch.device("meta"):
        return WanModel(operations=comfy.ops.manual_cast, dtype=torch.float8_e4m3fn, **(config or WAN14B_I2V))


def plan_table(acc, memory) -> None:
    """What fits on 24 and 16 GB cards (accounting only), Stage III and Stage II, fp8 weights."""
    import torch
    dm = meta_wan14b()
    gib = 2 ** 30
    from physmaster_pack.physmaster.encoder import HeadConfig
    head_params = memory.head_parameter_count(HeadConfig(**HEAD))
    lora = acc.lora_parameter_count(dm, 16)
    print(f"Wan 2.1 I2V 14B: {sum(p.numel() for p in dm.parameters()) / 1e9:.1f} B parameters, fp8 weights "
          f"{acc.weight_stats(dm)[0] / gib:.1f} GiB; head {head_params / 1e6:.1f} M; LoRA rank 16 {lora / 1e6:.0f} M")
    rows = [(832, 480, 81), (832, 480, 49), (832, 480, 33), (624, 352, 81), (624, 352, 49), (480, 272, 81)]
    profiles = {}
    for card in (24, 16):
        avail = (card - 2) * gib  # 2 GiB for the CUDA context, the desktop and fragmentation
        print(f"\n{card} GB card (budget {avail / gib:.0f} GiB):")
        print(f"{'stage':<10} {'video':<16} {'tokens':>7} {'options':<70} {'peak GiB':>8} {'non-weight':>9} "
              f"{'resident':>9} {'RAM act.':>8} {'step ÷ sampling':>15}")
        for w, h, frames in rows:
            t = (frames - 1) // 4 + 1
            if (w, h, frames) not in profiles:
                profiles[w, h, frames] = acc.wan_profile(dm, (16, t, h // 8, w // 8), TEXT_TOKENS + HEAD["num_tokens"],
                                                         torch.bfloat16, fused_attention=True)  # a GPU's SDPA
            profile = profiles[w, h, frames]
            for stage, train in (("dpo-head", head_params), ("dpo-lora", 0)):
                def est(plan, _stage=stage, _train=train, _profile=profile):
                    return acc.estimate(dm, None, 0, plan, dtype=torch.bfloat16, trainable_params=_train,
                                        lora_params=lora if _stage == "dpo-lora" else 0, available=avail,
                                        profile=_profile)
                fits = memory.fitting_plans(est, memory.TrainingPlan(stage=stage), avail)
                name = "III (head)" if stage == "dpo-head" else "II (LoRA)"
                if not fits:
                    print(f"{name:<10} {f'{w}x{h}x{frames}':<16} {profile.tokens:>7} {'does not fit':<70}")
                    continue
                best = fits[0]
                print(f"{name:<10} {f'{w}x{h}x{frames}':<16} {profile.tokens:>7} {best.plan.describe():<70} "
                      f"{best.peak / gib:>8.1f} {best.without_weights / gib:>9.1f} "
                      f"{best.weights_resident / gib:>9.1f} {best.host_activations / gib:>8.1f} "
                      f"{step_ratio(best):>15}")


def step_ratio(est) -> str:
    """Compute of one training step over one sampling step (a sampling step = cond + uncond: 2 forward passes of
    one video), counting a backward as 2 forwards: per video, reference 1 + policy 1 (+ pre-pass 1 when split)
    + checkpoint recompute 1 + backward 2. Streaming offloaded weights adds PCIe time on top."""
    p = est.plan
    per_video = 1 + 1 + (1 if p.split_passes else 0) + (1 if p.gradient_checkpointing else 0) + 2
    off = est.weights - est.weights_resident
    text = f"{2 * per_video / 2:.0f}x"
    if off > 0:
        sweeps = 4 if not p.split_passes else 8  # weight passes per pair: ref, (pre), fwd, recompute+bwd
        text += f" +{sweeps * off / 2**30 / 25:.0f}s PCIe"
    return text


def random_fp8_state_dict(device, config=None):
    """Wan 14B I2V weights (ComfyUI's key names), random, fp8 (norms and modulations kept bf16 like real fp8
    checkpoints), made on the GPU tensor by tensor and moved to the CPU."""
    import torch
    dm = meta_wan14b(config)
    sd = {}
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in dm.state_dict().items():
        shape = tuple(p.shape)
        if p.ndim >= 2 and "modulation" not in name:
            t = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=g) * (shape[-1] ** -0.5)
            t = t.to(torch.float8_e4m3fn)
        elif name.endswith("weight") and p.ndim == 1:
            t = torch.ones(shape, device=device, dtype=torch.bfloat16)
        else:
            t = torch.randn(shape, device=device, dtype=torch.bfloat16, generator=g) * 0.02
        sd[f"model.diffusion_model.{name}"] = t.to("cpu")
    return sd


def one_pair(frames: int, w: int = 832, h: int = 480, seed: int = 0) -> dict:
    """A picker group as stored on disk (conditioning + 2 candidate latents), random."""
    import torch
    g = torch.Generator().manual_seed(seed)
    t = (frames - 1) // 4 + 1
    lat = (16, t, h // 8, w // 8)
    mask = torch.zeros(1, 4, t, h // 8, w // 8)
    mask[:, :, 0] = 1.0
    return {"context": torch.randn(1, TEXT_TOKENS, 4096, generator=g) * 0.1,
            "cond.concat_latent_image": torch.randn(1, *lat, generator=g),
            "cond.concat_mask": mask,
            "clip_vision.penultimate_hidden_states": torch.randn(1, 257, 1280, generator=g),
            "features": torch.randn(1, 257, 1280, generator=g),
            "latents": torch.randn(2, *lat, generator=g)}


def train(tn, model, encoder, group: dict, stage: str, steps: int, options):
    """The PhysMasterTrainDPO node's body (nodes/training_nodes.py) on one in-memory pair."""
    import torch
    from physmaster_pack.physmaster.training import PreferencePair, PreferenceSet, TrainConfig
    stages = {"III": ["dpo-head"], "II": ["dpo-lora"]}[stage]
    lora_rank = 16
    tokens = int(group["context"].shape[-2]) + encoder.config.num_tokens
    text, memory = tn.memory_preflight(model, stages, tuple(group["latents"].shape[1:]), tokens, encoder, lora_rank,
                                       1, True, options)
    config = TrainConfig(steps=steps, lr=1e-5, batch_size=1, seed=0, beta=500.0, gradient_checkpointing=True,
                         split_passes=options.split_passes, activations_on_cpu=options.activations_on_cpu)

    def make_inputs():
        return [tn.comfy_conditioning({k: tn._clone(v) for k, v in group.items()})], tn._clone(group["latents"][:1])

    def build(conds):
        cond, constants = tn._conditioning_from_processed(group["context"], None, group["features"], conds[0])
        pair = PreferencePair(cond=cond, winner=tn._clone(group["latents"][0]), loser=tn._clone(group["latents"][1]))
        return {s: PreferenceSet([pair]) for s in stages}, constants, False

    node = types.SimpleNamespace(hidden=None)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    enc, lora_sd, loss_map, summary, histories, _ = tn._run(node, model, encoder, stages, make_inputs, build, config,
                                                           lora_rank, "bench", 1, options, memory)
    wall = time.monotonic() - t0
    (run,) = histories
    return text, memory, run, wall


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vram-gib", type=float, default=24.0, help="treat the GPU as this big (0 = as it is)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--plan-only", action="store_true", help="print the accounting table and stop (no GPU)")
    ap.add_argument("--smoke-cpu", action="store_true", help="the same code path on the CPU with a tiny Wan, "
                                                             "one step, 64x64 (checks the script, measures nothing)")
    args = ap.parse_args()
    comfy = os.environ.get("COMFYUI_PATH")
    if not comfy:
        print("set COMFYUI_PATH to a ComfyUI checkout", file=sys.stderr)
        return 2
    import torch
    if not (args.plan_only or args.smoke_cpu) and not torch.cuda.is_available():
        print("no CUDA device: run with --plan-only for the accounting table", file=sys.stderr)
        return 2
    tn, acc = setup_comfy(comfy, cpu=args.plan_only or args.smoke_cpu)
    memory = importlib.import_module("physmaster_pack.physmaster.memory")
    t_start = time.monotonic()
    if args.plan_only:
        plan_table(acc, memory)
        return 0

    import comfy.model_management as mm
    import comfy.sd
    from physmaster_pack.physmaster.encoder import HeadConfig, PhysEncoder
    device = mm.get_torch_device()
    config, size = (SMOKE, (64, 64)) if args.smoke_cpu else (WAN14B_I2V, (832, 480))
    if not args.smoke_cpu:
        total = torch.cuda.get_device_properties(device).total_memory
        if args.vram_gib:
            mm.EXTRA_RESERVED_VRAM = max(0, int(total - args.vram_gib * 2 ** 30))
        print(f"{torch.cuda.get_device_name(device)}, {total / 2**30:.0f} GiB; acting as "
              f"{args.vram_gib or total / 2**30:.0f} GiB (reserved {mm.EXTRA_RESERVED_VRAM / 2**30:.0f} GiB)",
              flush=True)
    t0 = time.monotonic()
    with torch.inference_mode():  # as ComfyUI runs its loaders: the weights are inference tensors
        sd = random_fp8_state_dict(device, config)
        model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float8_e4m3fn})
    del sd
    print(f"random fp8 Wan 14B loaded in {time.monotonic() - t0:.0f} s "
          f"({sum(p.numel() for p in model.model.diffusion_model.parameters()) / 1e9:.1f} B parameters)", flush=True)
    encoder = PhysEncoder.new(HeadConfig(**HEAD), seed=0)
    options = tn.MemoryOptions(training_dtype="bf16", offloading=True, split_passes=True, activations_on_cpu=True)
    if args.smoke_cpu:
        options = tn.MemoryOptions(training_dtype="fp32", split_passes=True)
    for stage, frames in (("III", 81 if not args.smoke_cpu else 5), ("II", 33 if not args.smoke_cpu else 5)):
        group = one_pair(frames, *size)
        text, memory, run, wall = train(tn, model, encoder, group, stage, 1 if args.smoke_cpu else args.steps,
                                        options)
        h = run["history"]
        per_step = run["seconds"] / max(1, len(h))
        measured = run["memory"]["measured_peak"] or 0
        print(f"Stage {stage}, 480p x {frames} frames ({memory['profile']['tokens']} tokens), {len(h)} steps: "
              f"{per_step:.1f} s/step (run {wall:.0f} s); peak VRAM measured {measured / 2**30:.2f} GiB, "
              f"predicted {memory['peak'] / 2**30:.2f} GiB ({measured / memory['peak']:.2f}x); losses "
              f"{[round(x['loss'], 4) for x in h]}", flush=True)
        print(f"  pre-flight: {text}", flush=True)
    print(f"total {time.monotonic() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
