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
    """What the variants benches (`demo_stage2_variants.py`, `demo_stage3_variants.py`) train and score on, as the
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
