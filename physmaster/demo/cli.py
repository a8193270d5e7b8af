"""`python -m physmaster demo`: PhysMaster's Table 1 on the drop proxy world, on a CPU, in minutes.

Rows (each DPO stage's candidates are sampled from the model that stage starts from):
  base                   the tiny I2V model pretrained on generic motion (no physical tokens)
  Stage I                SFT on drops: physical head + DiT LoRA
  Stage I + DPO encoder  Stage I, then Flow-DPO on the head only (pairs from the Stage I model)
  Stage II               Stage I, then Flow-DPO on a fresh DiT LoRA (pairs from the Stage I model)
  Stage III              Stage II, then Flow-DPO on the head only (pairs from the Stage II model)
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import time
from pathlib import Path

import numpy as np
import torch

HELP = "PhysMaster's Table 1 (Stage I SFT, Stage II/III Flow-DPO) on the drop proxy world, on CPU"
EVAL_SEED = 900_000
SCENES_PER_EVAL_SEED = 1_000  # held-out scene seeds each eval seed owns (`held_out_base`); --scenes' limit
# the settings with a range, and how their errors say it (the flags and `--set` check them through `_out_of_range`)
LIMITS = {"eval_scenes": (1, SCENES_PER_EVAL_SEED, f"1 and {SCENES_PER_EVAL_SEED}"),
          "eval_videos": (1, 64, "1 and 64"), "guidance": (1.0, 10.0, "1 (off) and 10"),
          "token_guidance": (1.0, 10.0, "1 (off) and 10"),
          "head_t_min": (0.0, 0.99, "0 and 0.99"), "head_soup": (1, 16, "1 (one run) and 16"),
          "head_pairs_per_image": (1, 64, "1 and 64"), "sft_recoloured": (0, 7, "0 (none) and 7"),
          "head_scenes": (1, 4096, "1 and 4096"), "head_dpo_steps": (1, 100_000, "1 and 100000"),
          "head_bag": (1, 16, "1 (one run) and 16"), "head_recoloured": (0.0, 1.0, "0 (none) and 1 (all)"),
          "stage_three_recoloured": (0.0, 1.0, "0 (none) and 1 (all)"),
          "online_later_relooked": (0.0, 1.0, "0 (none) and 1 (all)"),
          "stage_three_relooked": (0.0, 1.0, "0 (none) and 1 (all)"),
          "head_beta": (1.0, 100_000.0, "1 and 100000"), "head_dpo_positive": (0.0, 1000.0, "0 (off) and 1000"),
          "head_rounds": (1, 16, "1 (offline) and 16"),
          "influence_videos": (1, 64, "1 and 64 (at most --eval-videos are used)")}


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _out_of_range(field: str, value) -> str | None:
    """What is wrong with `value` for the setting `field` of `LIMITS`, or None."""
    lo, hi, text = LIMITS[field]
    return None if lo <= value <= hi else f"must be between {text}, got {value}"


def _ranged(field: str):
    def parse(text: str) -> float:
        value = float(text)
        if problem := _out_of_range(field, value):
            raise argparse.ArgumentTypeError(problem)
        return value
    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="physmaster_demo", help="output folder (table, GIF, results.json)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (head, LoRA, data order, candidates)")
    parser.add_argument("--eval-seed", type=_non_negative, default=0,
                        help="draws the held-out scenes (and their noises) anew; 0 = the default set")
    parser.add_argument("--seeds", type=int, default=1, help="run K training seeds (seed, seed+1, ...) and print "
                        "each row as mean ± sd across them (K times as long)")
    parser.add_argument("--scenes", type=int, default=None, help="held-out scenes per split (default 100)")
    parser.add_argument("--eval-videos", type=int, default=None, metavar="K",
                        help="videos per held-out scene and row, the same noises for every row (default 4)")
    parser.add_argument("--guidance", type=_ranged("guidance"), default=1.0,
                        help="sample guided by the pretrained base model with this weight (autoguidance; 1 = off, "
                        "the default; 2 halves Stage I's avg L2 but leaves Stage II no significant gain: "
                        "bench/FINDINGS.md)")
    parser.add_argument("--token-guidance", type=_ranged("token_guidance"), default=1.0, metavar="W",
                        help="classifier-free guidance on the physical tokens at every sampling (against the tokens "
                        "zeroed; 1 = off, the default; 2.5 took 13-27%% off the rows' avg L2 on two runs, with Stage "
                        "I a little less coherent; sampling costs twice as much: bench/FINDINGS.md)")
    parser.add_argument("--judge-labels", action="store_true",
                        help="add the row 'Stage III (judge labels)': Stage III with every pair labelled by the "
                        "physics judge alone, no ground truth (about 100 s more)")
    parser.add_argument("--motion-weight", type=float, default=None, metavar="W",
                        help="Stage I's flow-matching loss up-weighted W-fold where the latent moves (0 = uniform; "
                        "default 1: Stage I keeps the object on the unseen drops, coherence >= 0.93 on seeds 0-3; "
                        "bench/FINDINGS.md, \"Stage II's LoRA on the cross-attention\")")
    parser.add_argument("--online", type=_non_negative, default=0, metavar="K",
                        help="after Stage II, K online rounds: fresh candidates from the current model, labelled by "
                        "the physics judge alone, Flow-DPO on the head with the current head as reference (a row "
                        "each)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="change one of the demo's settings (`pipeline.Settings`, e.g. lr_lora=3e-4 or "
                        "dpo_steps=100; repeatable; applied after the other flags, recorded in results.json): how "
                        "the runs in bench/FINDINGS.md that change a setting are repeated")
    parser.add_argument("--fast", action="store_true", help="a seconds-long smoke run; numbers mean nothing")
    parser.add_argument("--make-base", action="store_true",
                        help="remake the shipped weights (autoencoder, backbone, base DiT; slow)")
    parser.add_argument("--assets", default=None, help="weights file (default: the shipped one)")
    parser.add_argument("--plain-objects", action="store_true",
                        help="with --make-base: an autoencoder that decodes every object without its pattern, so "
                        "the material reaches the video model only through the physical tokens (the default, "
                        "and the shipped weights; kept for the commands that name it)")
    parser.add_argument("--patterned-objects", action="store_true",
                        help="with --make-base and --assets FILE: the earlier autoencoder, which decodes each frame "
                        "pattern included, so the video model can read the bounce from the first frame's latent "
                        "(bench/FINDINGS.md)")


def held_out_base(eval_seed: int) -> int:
    """First scene seed of a held-out set: 900000 for the default set (eval seed 0, as before), else a range of
    1000 seeds per eval seed above 10 million, far from every training, candidate and asset seed."""
    return EVAL_SEED if int(eval_seed) == 0 else 10_000_000 + SCENES_PER_EVAL_SEED * int(eval_seed)


def held_out(n: int, eval_seed: int):
    from .world import drop_scene

    base = held_out_base(eval_seed)
    return [drop_scene(base + i, "seen") for i in range(n)] + [drop_scene(base + i, "unseen") for i in range(n)]


def held_out_set(vm, backbone, n: int, eval_seed: int, k: int):
    """The held-out drops of `held_out(n, eval_seed)`, their conditioning repeated for `k` videos each, and the
    noise seed of every video (the same noises for every row) -> (scenes, conditioning, noise seeds)."""
    scenes = held_out(n, eval_seed)
    cond = vm.conditioning(np.stack([s.frames[0] for s in scenes]), backbone)
    noises = [EVAL_SEED * 7 + 100_003 * int(eval_seed) + i for i in range(len(scenes) * k)]
    return scenes, cond.map(lambda x: x.repeat_interleave(k, 0)), noises


def videos_per_scene(n_scenes: int, k: int, per: int) -> list[int]:
    """Indices of the first `per` (at most `k`) of each scene's `k` consecutive videos."""
    per = max(1, min(int(per), k))
    return [j * k + i for j in range(n_scenes) for i in range(per)]


def run_once(assets, st, seed: int, eval_seed: int, log) -> dict:
    """All rows for one training seed -> {"results", "influence", "videos", "pairs", "scenes"}."""
    from .evaluation import material_read, score_scenes
    from .world import material_renderings
    from .pipeline import (anchor_videos, dpo, freeze_dit, head_pairs, judge_agreements, judge_pairs, lora_pairs,
                           online_candidates, online_dpo_settings, sample_candidates, stage_one,
                           stage_three_candidates, stage_three_rounds, stage_two_rounds)
    from .backbone import head_input
    from .report import JUDGE_ROW, online_row

    vm, backbone = assets
    backbone = head_input(backbone, st.head_reads)
    vm = dataclasses.replace(vm, den=copy.deepcopy(vm.den))  # each seed trains a fresh copy of the shipped base
    vm.guidance = float(st.guidance)
    vm.token_guidance = float(st.token_guidance)
    k = st.eval_videos
    scenes, rep, noises = held_out_set(vm, backbone, st.eval_scenes, eval_seed, k)
    results, shown, influence = {}, {}, {}
    renderings = []  # each held-out drop with the three materials' bounces (material read), made at first use

    def evaluate(name, head, token_scale=1.0, videos=None):
        """A row's held-out videos and scores (`videos`: only those of these indices, `videos_per_scene`)."""
        t0 = time.perf_counter()
        cond, seeds, per = rep, noises, k
        if videos is not None:
            cond, seeds, per = rep.map(lambda x: x[videos]), [noises[i] for i in videos], len(videos) // len(scenes)
        vids = vm.decode(vm.sample(head, cond, seeds, st.sample_steps, token_scale=token_scale))
        r = score_scenes(vids, scenes, per)
        what = "" if token_scale else f" (tokens zeroed{'' if per == k else f', {per} of {k} videos a drop'})"
        log(f"  eval {name}{what}: L2 {r['l2'].mean():.4f} CD "
            f"{r['chamfer'].mean():.4f} IoU {r['iou'].mean():.4f} coherence {r['coherence'].mean():.3f} "
            f"({time.perf_counter() - t0:.0f}s)")
        if token_scale:
            results[name], shown[name] = r, vids[::k]  # the first video of each drop: the gif
        return r, vids

    def with_influence(name, head):
        """The row, then again with the tokens zeroed on the first `influence_videos` of each drop's videos (the
        same noises): token influence and material read, each on those videos with and without the tokens."""
        r, vids = evaluate(name, head)
        sub = videos_per_scene(len(scenes), k, st.influence_videos)
        per = len(sub) // len(scenes)
        r0, vids0 = evaluate(name, head, token_scale=0.0, videos=sub)
        vids = [vids[i] for i in sub]
        r = r if per == k else score_scenes(vids, scenes, per)
        if not renderings:
            renderings.extend(material_renderings(s) for s in scenes)
        (right, n), (right0, _) = (material_read(v, scenes, per, renderings) for v in (vids, vids0))
        n_seen = st.eval_scenes  # held_out: the seen drops, then as many unseen ones
        gain = r0["l2"] - r["l2"]
        influence[name] = {"l2": float(r["l2"].mean()), "l2_zeroed": float(r0["l2"].mean()),
                           "per_scene_l2": r["l2"].tolist(), "per_scene_l2_zeroed": r0["l2"].tolist(),
                           "videos_per_scene": per, "material_videos": n,
                           "by_split": {"seen": float(gain[:n_seen].mean()), "unseen": float(gain[n_seen:].mean())},
                           "material_read": right / n if n else None,
                           "material_read_zeroed": right0 / n if n else None}

    total = 6 + int(st.judge_labels) + st.online_rounds
    log(f"[1/{total}] base model")
    evaluate("base", None)
    log(f"[2/{total}] Stage I: SFT of the physical head + DiT LoRA on drops")
    encoder = stage_one(vm, backbone, st, seed, log)
    with_influence("Stage I", encoder.head)
    log(f"[3/{total}] candidates from the Stage I model")
    # one draw for both: Stage II's pairs from the first dpo_scenes start images, the head's from head_scenes (its
    # own draw when some of the head's start images are recoloured: Stage II's LoRA keeps the plain ones, and the
    # start images both draws show plain are sampled once)
    shared = st.head_recoloured == 0
    cands_1 = sample_candidates(vm, encoder.head, backbone, st, seed, "Stage I",
                                scenes=max(st.dpo_scenes, st.head_scenes) if shared else st.dpo_scenes)
    later = st.lora_recoloured and not shared  # Stage II's pairs from the head's draw, its recoloured start images too
    pairs_1 = None if later else lora_pairs(cands_1.first(st.dpo_scenes), st, log, "Stage I")
    agreement = judge_agreements(cands_1.first(st.dpo_scenes), "Stage I candidates")
    log(f"[4/{total}] Stage I + DPO on the encoder only")
    enc_only = encoder.clone()
    same = (shared and not st.head_pairs_whole and not st.head_pairs_all and not st.lora_pairs_all
            and st.head_pairs_per_image == st.pairs_per_image and st.head_scenes == st.dpo_scenes)
    if not shared:
        cands_1 = sample_candidates(vm, encoder.head, backbone, st, seed, "Stage I", scenes=st.head_scenes,
                                    recoloured=st.head_recoloured, reuse=cands_1)
    if later:
        pairs_1 = lora_pairs(cands_1.first(st.dpo_scenes), st, log, "Stage I")
    head_pairs_1 = pairs_1 if same else head_pairs(cands_1.first(st.head_scenes), st, log, "Stage I")
    del cands_1  # its videos: a few hundred MB at the default head_scenes
    head_anchor = anchor_videos(vm, backbone, st) if st.head_anchor > 0 else None  # every head stage's (off: None)
    dpo("dpo-head", vm, enc_only, head_pairs_1, st, seed + 1, log, "Stage I + DPO encoder", anchor=head_anchor)
    evaluate("Stage I + DPO encoder", enc_only.head)
    log(f"[5/{total}] Stage II: Flow-DPO on a DiT LoRA (reference: the Stage I model)")
    stage_two_rounds(vm, encoder, pairs_1, st, seed, log, backbone)
    evaluate("Stage II", encoder.head)
    log(f"[6/{total}] Stage III: candidates from the Stage II model, Flow-DPO on the head only")
    freeze_dit(vm, seed)
    cands_2 = stage_three_candidates(vm, encoder.head, backbone, st, seed)
    pairs_2 = head_pairs(cands_2, st, log, "Stage II")
    stage_two_encoder = encoder.clone()  # what the judge-labelled row and the online rounds start from
    stage_three_rounds(vm, encoder, pairs_2, st, seed, log, backbone, anchor=head_anchor)
    with_influence("Stage III", encoder.head)
    agreement.update(judge_agreements(cands_2.first(st.dpo_scenes), "Stage II candidates"))
    names = ["base", "Stage I", "Stage I + DPO encoder", "Stage II", "Stage III"]
    # pairs from each model's candidates: Stage I's for Stage II (the LoRA), and the head's own from Stage I's
    # (Stage I + DPO encoder) and from Stage II's (Stage III)
    n_pairs = {"Stage I": len(pairs_1), "Stage II": len(pairs_2), "Stage I, the head's": len(head_pairs_1)}
    step = 6

    def judged_dpo(name, encoder_, cands, dpo_seed, source, sv=st):
        """Flow-DPO on the head with the judge's labels of `cands` (candidates of the model `source` names), at
        the settings `sv`; no pair confident enough: the model is kept."""
        pairs = judge_pairs(cands, st, log, source)
        if pairs is None:
            gap = f" and score gap {st.min_margin}" if st.judge_margin == "gap" else ""
            log(f"  no pair reached the judge's min confidence {st.judge_min_confidence}{gap}: {name} is its "
                "starting model unchanged")
        else:
            dpo("dpo-head", vm, encoder_, pairs, sv, dpo_seed, log, name, anchor=head_anchor)
        evaluate(name, encoder_.head)
        names.append(name)
        n_pairs[name] = 0 if pairs is None else len(pairs)

    if st.judge_labels:
        step += 1
        log(f"[{step}/{total}] {JUDGE_ROW}: the Stage II candidates labelled by the physics judge alone")
        judged_dpo(JUDGE_ROW, stage_two_encoder.clone(), cands_2, seed + 3, "Stage II")
    online = stage_two_encoder.clone()
    for r in range(1, st.online_rounds + 1):
        name = online_row(r)
        step += 1
        log(f"[{step}/{total}] {name}: fresh candidates from the current model, judged, Flow-DPO on the head "
            "(reference: the current head)")
        cands_r = online_candidates(vm, online.head, backbone, st, seed, r, name)
        agreement.update(judge_agreements(cands_r.first(st.dpo_scenes), name + " candidates"))
        judged_dpo(name, online, cands_r, seed + 3 + r, "Stage II" if r == 1 else online_row(r - 1),
                   sv=online_dpo_settings(st, r))
    ordered = {name: results[name] for name in names}
    return {"results": ordered, "influence": influence, "videos": shown, "scenes": scenes, "encoder": encoder,
            "pairs": n_pairs, "judge_agreement": agreement}


def run(args: argparse.Namespace) -> int:
    from .assets import ASSET_FILE, load_assets
    from .pipeline import Settings
    from ..fileio import atomic_write_text
    from .report import format_run, seeds_table, write_gif, write_results

    torch.set_num_threads(max(1, torch.get_num_threads()))
    out = Path(args.out)
    t_start = time.perf_counter()

    def log(msg):
        print(msg, flush=True)

    if args.make_base:
        from .assets import make_assets

        if args.set:
            raise SystemExit("--set changes the demo's run; --make-base does not read it (leave --set out)")
        if args.plain_objects and args.patterned_objects:
            raise SystemExit("--plain-objects and --patterned-objects ask for two different autoencoders; give one")
        if args.patterned_objects and not args.assets:
            raise SystemExit("--patterned-objects makes other weights than the shipped ones; give --assets FILE "
                             "for them")

        make_assets(Path(args.assets) if args.assets else ASSET_FILE, seed=args.seed, fast=args.fast, log=log,
                    plain_objects=not args.patterned_objects)
        return 0
    for flag in ("--plain-objects", "--patterned-objects"):
        if getattr(args, flag[2:].replace("-", "_")):
            raise SystemExit(f"{flag} chooses how --make-base trains the autoencoder; a run reads the weights "
                             f"of --assets FILE (leave {flag} out)")
    st = Settings.fast() if args.fast else Settings()
    st.guidance = float(args.guidance)
    st.token_guidance = float(args.token_guidance)
    st.online_rounds = int(args.online)
    st.judge_labels = bool(args.judge_labels)
    if args.motion_weight is not None:
        if not (args.motion_weight >= 0 and np.isfinite(args.motion_weight)):
            raise SystemExit(f"--motion-weight must be a number >= 0, got {args.motion_weight}")
        st.motion_weight = float(args.motion_weight)
    for flag, field, value in (("--scenes", "eval_scenes", args.scenes), ("--eval-videos", "eval_videos",
                                                                          args.eval_videos)):
        if value is not None:
            if problem := _out_of_range(field, value):
                raise SystemExit(f"{flag} {problem}")
            setattr(st, field, int(value))
    st = checked_settings(st, args.set)
    if problem := _unwritable(out):
        raise SystemExit(f"--out {out}: {problem}")
    vm, backbone, info = load_assets(Path(args.assets) if args.assets else ASSET_FILE)
    log(f"proxy world: {info['ae']['steps']}-step autoencoder, {info['backbone']['steps']}-step geometry backbone, "
        f"base DiT pretrained {info['dit']['steps']} steps on generic motion")
    runs = []
    for i in range(max(1, int(args.seeds))):
        seed = int(args.seed) + i
        if args.seeds > 1:
            log(f"=== training seed {seed} ({i + 1}/{args.seeds})")
        runs.append(run_once((vm, backbone), st, seed, int(args.eval_seed), log))
    n = st.eval_scenes
    last = runs[-1]
    wall = time.perf_counter() - t_start
    log("")
    log(f"PhysMaster proxy benchmark: {n} seen + {n} unseen held-out drops (eval seed {args.eval_seed}), "
        f"{st.eval_videos} videos each, 32x32, 8 frames; L2/CD lower is better, IoU and coherence higher")
    text = format_run(last, n) + "\n"
    log(text[:-1])
    if len(runs) > 1:
        multi = seeds_table([r["results"] for r in runs], n)
        log(f"\nacross {len(runs)} training seeds (average of seen and unseen), mean ± sd:\n{multi}")
        text += f"\nacross {len(runs)} training seeds, mean ± sd:\n{multi}\n"
    atomic_write_text(out / "table.txt", text)
    gif = write_gif(out / "comparison.gif", [s.frames for s in last["scenes"]],
                    {k: last["videos"][k] for k in ("base", "Stage I", "Stage III")}, st.gif_scenes)
    summary = {"settings": dict(st.__dict__), "seed": args.seed, "seeds": [int(args.seed) + i for i in
                                                                          range(len(runs))],
               "eval_seed": args.eval_seed, "wall_seconds": wall, "assets": info,
               "scenes": {"seen": n, "unseen": n},
               "runs": [{"seed": int(args.seed) + i, "pairs": r["pairs"], "judge_agreement": r["judge_agreement"],
                         "rows": {name: {"per_scene": {m: _finite_or_none(v) for m, v in res.items()
                                                       if m not in ("coherence", "frame_l2")},
                                         "coherence": float(res["coherence"].mean()),
                                         "per_scene_coherence": res["coherence"].tolist()}
                                  for name, res in r["results"].items()},
                         "token_influence": {name: {"l2": v["l2"], "l2_zeroed": v["l2_zeroed"],
                                                    "influence": v["l2_zeroed"] - v["l2"],
                                                    **{m: v[m] for m in ("material_read", "material_read_zeroed",
                                                                         "material_videos", "by_split",
                                                                         "videos_per_scene", "per_scene_l2",
                                                                         "per_scene_l2_zeroed")}}
                                             for name, v in r["influence"].items()}}
                        for i, r in enumerate(runs)]}
    summary["per_scene"] = summary["runs"][-1]["rows"]
    summary["judge_agreement"] = summary["runs"][-1]["judge_agreement"]
    write_results(out / "results.json", summary)
    last["encoder"].save(out / "demo_encoder.safetensors")  # the Stage III head; its provenance lists the stages
    log(f"\nwrote {gif} (ground truth | base | Stage I | Stage III), {out / 'table.txt'}, {out / 'results.json'} "
        f"in {wall:.0f}s")
    return 0


def checked_settings(st, items):
    """`st` (`pipeline.Settings`) with `--set NAME=VALUE` items applied (the demo's and the benches'), checked as the
    flags that set the same fields are: a bad item is an error that names it, before anything is trained."""
    try:
        st = st.with_overrides(items)
    except ValueError as e:
        raise SystemExit(f"--set {e}") from None
    for field in LIMITS:
        if problem := _out_of_range(field, getattr(st, field)):
            raise SystemExit(f"--set: {field} {problem}")
    from .backbone import check_head_reads

    try:
        check_head_reads(st.head_reads)
    except ValueError as e:
        raise SystemExit(f"--set: {e}") from None
    from ..training.stages import lora_module_parts, unmatched_lora_parts
    from .generator import lora_parameter_names

    names = lora_parameter_names() if lora_module_parts(st.lora_modules) else []  # "": every layer, nothing to check
    if unknown := unmatched_lora_parts(st.lora_modules, names):
        raise SystemExit(f"--set: lora_modules={st.lora_modules!r}: {', '.join(unknown)} is in none of the DiT's LoRA "
                         f"layer names (e.g. {names[0]}, {names[-1]}); use parts such as attn1, attn2, ffn, proj_out "
                         "or leave it empty (lora_modules=) for every layer")
    if lora_module_parts(st.head_modules):
        from .pipeline import new_head

        names = [n for n, _ in new_head(st).head.named_parameters()]
        if unknown := unmatched_lora_parts(st.head_modules, names):
            raise SystemExit(f"--set: head_modules={st.head_modules!r}: {', '.join(unknown)} is in none of the head's "
                             f"parameter names ({', '.join(names)}); use parts of them or leave it empty "
                             "(head_modules=) for the whole head")
    negative = [f"{k}={v}" for k, v in vars(st).items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and not (v >= 0 and np.isfinite(v))]
    if negative:
        raise SystemExit(f"--set: settings must be finite numbers >= 0, got {', '.join(negative)}")
    return st


def _unwritable(out: Path) -> str | None:
    """Why the demo could not write its outputs into folder `out`, or None. Checked before anything trains, and
    nothing is created until the run ends (every output is written whole, through `fileio.atomic_path`), so a
    refused or failed run leaves no empty folder behind."""
    if out.exists() and not out.is_dir():
        return "is a file, not a folder; give a folder for the table, GIF and results.json"
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, so the folder cannot be made there; give another --out"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot write in {parent}; give a folder you can write to"
    return None


def _finite_or_none(values: np.ndarray) -> list:
    """A per-scene array as a JSON list: NaN (`l2_found` of a scene whose object is never found) as null."""
    return [float(v) if np.isfinite(v) else None for v in values]
