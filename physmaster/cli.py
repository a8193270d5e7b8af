"""`python -m physmaster <command>`: each command lives in its own module, imported only when run.

A command module provides `HELP` (one line), `add_arguments(parser)` and `run(args) -> int`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "demo": "physmaster.demo",
    "scenes": "physmaster.physics.cli",
    "train-sft": "physmaster.train_cli",
    "train-dpo": "physmaster.train_cli",
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m physmaster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = argv[0] if argv and not argv[0].startswith("-") else None
    for name, module_name in COMMANDS.items():
        if wanted is not None and name != wanted:
            sub.add_parser(name, help="(see its --help)")
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("physmaster"):
                sub.add_parser(name, help="(not available in this version)")
                continue
            raise
        p = sub.add_parser(name, help=getattr(module, "HELP", None), description=getattr(module, "HELP", None))
        if name in ("train-sft", "train-dpo"):
            module.add_arguments(p, name)
        else:
            module.add_arguments(p)
        p.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    from .errors import PhysMasterError

    try:
        return int(args._run(args) or 0)
    except PhysMasterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
