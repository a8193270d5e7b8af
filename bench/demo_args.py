"""What the demo benches share on their command lines and outputs: `--set NAME=VALUE` (the demo's `Settings`), and for those
that can run on either base, `--base shipped|drop` with `--cache DIR` (`demo_drop_base.py`'s wrong-physics drop
base, pretrained once); comma lists; the JSON they write. One parser each, so the benches cannot drift apart."""

from __future__ import annotations

import argparse
from pathlib import Path


def ints(text: str) -> list[int]:
    """"0,1,2" -> [0, 1, 2] (argparse type)."""
    return [int(x) for x in text.split(",") if x.strip()]


def floats(text: str) -> list[float]:
    """"0,1,1.5" -> [0.0, 1.0, 1.5] (argparse type)."""
    return [float(x) for x in text.split(",") if x.strip()]


def write_json(path: Path, obj) -> None:
    """A bench's figures as JSON, never a half-written file."""
    import json

    from physmaster.fileio import atomic_path

    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(obj, indent=1))


def variant_type(fields: tuple[str, ...], what: str):
    """The argparse type of a variants bench's `--variant`: "NAME:SET,SET" -> (NAME, ["FIELD=VALUE", ...]) ("NAME:"
    is the run's settings), refusing a FIELD outside `fields` (`what` names them in the error). A piece without
    "=" continues the value before it, so a list value keeps its commas ("head_modules=out_norm,out_proj")."""

    def variant(text: str) -> tuple[str, list[str]]:
        name, sep, rest = text.partition(":")
        if not name or not sep:
            raise argparse.ArgumentTypeError(f"{text!r}: use NAME:FIELD=VALUE,FIELD=VALUE (or NAME: for no change)")
        items = []
        for x in (x for x in rest.split(",") if x.strip()):
            if "=" in x or not items:
                items.append(x)
            else:
                items[-1] += "," + x
        bad = [x for x in items if x.partition("=")[0] not in fields]
        if bad:
            raise argparse.ArgumentTypeError(f"{text!r}: a variant changes only {what} ({', '.join(fields)}), not "
                                             f"{', '.join(bad)}; give the others with --set for every variant")
        return name, items

    return variant


def add_set(ap: argparse.ArgumentParser, example: str = "beta=500") -> None:
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help=f"change one of the demo's Settings (repeatable), e.g. {example}")


def add_base(ap: argparse.ArgumentParser, choose: bool = True) -> None:
    """`--cache DIR` for the drop base, and with `choose` `--base shipped|drop`."""
    if choose:
        ap.add_argument("--base", choices=["shipped", "drop"], default="shipped")
        ap.add_argument("--assets", type=Path, default=None,
                        help="with --base shipped: another weights file than the shipped one, e.g. one made by "
                        "python -m physmaster demo --make-base --patterned-objects --assets FILE")
    ap.add_argument("--cache", type=Path, default=None, help="folder for the drop base (saved once, then read)")


def settings(args: argparse.Namespace):
    """The demo's Settings with `--set` applied and checked as the demo checks it (`cli.checked_settings`)."""
    from physmaster.demo.cli import checked_settings
    from physmaster.demo.pipeline import Settings

    return checked_settings(Settings(), args.set)


def load_world(args: argparse.Namespace, drop: bool | None = None):
    """(video model, backbone) of the shipped assets (or `--assets FILE`'s), with the drop base's DiT when `--base
    drop` (or `drop`)."""
    from physmaster.demo.assets import ASSET_FILE, load_assets

    use_drop = getattr(args, "base", "shipped") == "drop" if drop is None else drop
    assets = getattr(args, "assets", None)
    if assets is not None and use_drop:
        raise SystemExit("--assets and --base drop: the drop base is pretrained on the shipped autoencoder's latents "
                         "and cached for it; use one of them")
    vm, backbone, _ = load_assets(assets or ASSET_FILE)
    if use_drop:
        from demo_drop_base import drop_base

        drop_base(vm, args.cache)
    return vm, backbone


def variants_world(args: argparse.Namespace, st):
    """What the variants benches (`demo_stage2_variants.py`, `demo_online_variants.py`, and through
    `stage_three_start` `demo_stage3_variants.py` and `demo_judge_variants.py`) train and score on, as the
    demo's `cli.run_once` makes it: the shipped world with a fresh copy of the base DiT, the head's input, the
    sampling's guidance, the held-out set of `args.eval_seed` (default: `args.seed`), and `evaluate(head)`, a head's
    held-out scores. Returns (vm, backbone, scenes, evaluate)."""
    import copy
    import dataclasses

    from physmaster.demo.backbone import head_input
    from physmaster.demo.cli import held_out_set
    from physmaster.demo.evaluation import score_scenes

    vm, backbone = load_world(args, drop=False)
    backbone = head_input(backbone, st.head_reads)
    vm = dataclasses.replace(vm, den=copy.deepcopy(vm.den))
    vm.guidance, vm.token_guidance = float(st.guidance), float(st.token_guidance)
    eval_seed = int(args.seed) if args.eval_seed is None else int(args.eval_seed)
    scenes, rep, noises = held_out_set(vm, backbone, st.eval_scenes, eval_seed, st.eval_videos)

    def evaluate(head):
        return score_scenes(vm.decode(vm.sample(head, rep, noises, st.sample_steps)), scenes, st.eval_videos)

    return vm, backbone, scenes, evaluate


def demo_to_stage_two(vm, backbone, st, seed: int, log, evaluate):
    """The demo's Stage I and Stage II (`cli.run_once`; a candidate's noise depends on its index alone, so the plain
    draw of Stage II's start images is the demo's, and Stage II's model the demo's, to the digit), then the DiT
    frozen for the head's stages. Returns (encoder, Stage I's held-out scores, Stage II's)."""
    from physmaster.demo import pipeline as P

    encoder = P.stage_one(vm, backbone, st, seed, log)
    shared = st.head_recoloured == 0
    draw = P.sample_candidates(vm, encoder.head, backbone, st, seed, "Stage I",
                               scenes=max(st.dpo_scenes, st.head_scenes) if shared else st.dpo_scenes)
    if st.lora_recoloured and not shared:
        draw = P.sample_candidates(vm, encoder.head, backbone, st, seed, "Stage I", scenes=st.head_scenes,
                                   recoloured=st.head_recoloured, reuse=draw)
    r1 = evaluate(encoder.head)
    P.stage_two_rounds(vm, encoder, P.lora_pairs(draw.first(st.dpo_scenes), st, log, "Stage I"), st, seed, log,
                       backbone)
    del draw
    r2 = evaluate(encoder.head)
    n = st.eval_scenes
    log(f"Stage I: avg L2 {r1['l2'].mean():.4f}; Stage II: avg L2 {r2['l2'].mean():.4f} (seen "
        f"{r2['l2'][:n].mean():.4f}, unseen {r2['l2'][n:].mean():.4f}), coherence {r2['coherence'].mean():.3f}")
    P.freeze_dit(vm, seed)
    return encoder, r1, r2


def versus(r: dict, ref: dict, n: int, vs: str) -> tuple[dict, str]:
    """One variant's held-out scores `r` against the row it builds on, `ref` (`score_scenes` of the same drops, the
    first `n` seen): its row for the JSON (avg L2, seen, unseen, coherence, and each paired difference with its
    bootstrap 95% interval: avg L2 under `vs`, the lost frames' part, where both find the object) and the text a
    bench prints ("-4.3%* [lo, hi]; lost frames ...; where found ..."; `*` / `+`: interval below / above 0)."""
    import numpy as np

    from physmaster.demo.evaluation import bootstrap_ci, paired_found

    d = r["l2"] - ref["l2"]
    lost = r["l2_lost"] - ref["l2_lost"]
    found = paired_found(r["frame_l2"], ref["frame_l2"])
    (lo, hi), (llo, lhi), (flo, fhi) = (bootstrap_ci(x) for x in (d, lost, found))

    def mark(a, b):
        return "*" if b < 0 else "+" if a > 0 else ""

    text = (f"{100 * d.mean() / ref['l2'].mean():+.1f}%{mark(lo, hi)} [{lo:+.4f}, {hi:+.4f}]; lost frames "
            f"{lost.mean():+.4f}{mark(llo, lhi)} [{llo:+.4f}, {lhi:+.4f}]; where found {found.mean():+.4f}"
            f"{mark(flo, fhi)} [{flo:+.4f}, {fhi:+.4f}]")
    row = {"l2": float(r["l2"].mean()), "seen": float(r["l2"][:n].mean()), "unseen": float(r["l2"][n:].mean()),
           vs: [float(d.mean()), lo, hi], "lost": [float(lost.mean()), llo, lhi],
           "found": [float(np.mean(found)), flo, fhi], "coherence": float(r["coherence"].mean())}
    return row, text


def variants_parser(doc: str, fields: tuple[str, ...], what: str, set_example: str,
                    seed: int = 0) -> argparse.ArgumentParser:
    """The variants benches' command line: --seed (default `seed`), --eval-seed, --variant NAME:SET,SET (only
    `fields`, which `what` names), --fast, --out and --set; a bench adds its own before parsing."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=seed, help="training seed (as the demo's --seed)")
    ap.add_argument("--eval-seed", type=int, default=None, help="held-out scenes (default: the training seed)")
    ap.add_argument("--variant", type=variant_type(fields, what), action="append", required=True,
                    metavar="NAME:SET,SET")
    ap.add_argument("--fast", action="store_true", help="the demo's smoke settings (numbers mean nothing)")
    ap.add_argument("--out", type=Path, default=None, help="write the figures here as JSON")
    add_set(ap, set_example)
    return ap


def variants_settings(args: argparse.Namespace, base=None):
    """(the run's Settings: `base`, default the demo's or with --fast its smoke settings, with --set applied;
    [(variant name, its items, its Settings)]), each checked as the demo checks it; torch on the machine's cores."""
    import torch

    from physmaster.demo.cli import checked_settings
    from physmaster.demo.pipeline import Settings

    torch.set_num_threads(max(1, torch.get_num_threads()))
    st = checked_settings(base if base is not None else Settings.fast() if args.fast else Settings(), args.set)
    return st, [(name, items, checked_settings(st, items)) for name, items in args.variant]


def stage_three_start(args: argparse.Namespace, st, log):
    """What the benches of the head's stages from one Stage II start from (`demo_stage3_variants.py`,
    `demo_judge_variants.py`): the world (`variants_world`), the demo's Stage I and Stage II (`demo_to_stage_two`)
    and Stage III's candidates of the Stage II model (`stage_three_recoloured` of its start images recoloured).
    Returns a namespace: vm, backbone, evaluate, n (held-out drops per split), seed, eval_seed, encoder (the
    Stage II model's), r1 / r2 (Stage I's / Stage II's held-out scores), cands, rows (Stage I's and Stage II's
    figures for the JSON)."""
    from types import SimpleNamespace

    from physmaster.demo import pipeline as P

    seed = int(args.seed)
    vm, backbone, _, evaluate = variants_world(args, st)
    encoder, r1, r2 = demo_to_stage_two(vm, backbone, st, seed, log, evaluate)
    cands = P.stage_three_candidates(vm, encoder.head, backbone, st, seed)
    rows = {"Stage I": {"l2": float(r1["l2"].mean())},
            "Stage II": {"l2": float(r2["l2"].mean()), "coherence": float(r2["coherence"].mean())}}
    return SimpleNamespace(vm=vm, backbone=backbone, evaluate=evaluate, n=st.eval_scenes, seed=seed,
                           eval_seed=seed if args.eval_seed is None else int(args.eval_seed), encoder=encoder,
                           r1=r1, r2=r2, cands=cands, rows=rows)
