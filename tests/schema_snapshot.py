"""Build the node schema snapshot from a live /object_info (used by tests/host/test_schema.py)."""

from __future__ import annotations

import json
from pathlib import Path

from workflow_api import SCHEMA_PATH, reduce_object_info, workflow_node_types

ROOT = Path(__file__).resolve().parents[1]


def wanted_nodes(object_info: dict) -> dict[str, str]:
    ours = {n: "physmaster" for n in object_info if n.startswith("PhysMaster") and not n.startswith("PhysMasterTest")}
    core: set[str] = set()
    for path in sorted((ROOT / "workflows").glob("*.json")):
        core |= workflow_node_types(json.loads(path.read_text()))
    return {**{n: "core" for n in core if n in object_info and n not in ours}, **ours}


def build(object_info: dict) -> dict:
    return reduce_object_info(object_info, wanted_nodes(object_info))


def write(object_info: dict, path: Path = SCHEMA_PATH) -> None:
    path.write_text(json.dumps(build(object_info), indent=1, sort_keys=True) + "\n")
