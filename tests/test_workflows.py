"""Every shipped workflow matches the node schema snapshot (caught in CI, without ComfyUI)."""

import copy
import json
from pathlib import Path

import pytest

from workflow_api import WorkflowError, load_schema, ui_to_api, workflow_node_types

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
SCHEMA = load_schema()["nodes"]


def test_workflows_exist():
    assert any(p.name == "physmaster_wan_i2v.json" for p in WORKFLOWS)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_schema(path):
    workflow = json.loads(path.read_text())
    assert workflow.get("version") == 0.4 and workflow.get("nodes") and workflow.get("links") is not None
    prompt = ui_to_api(workflow, SCHEMA)
    assert any(v["class_type"].startswith("PhysMaster") for v in prompt.values())
    # every node type the workflow uses is pinned in the snapshot (so a host change shows up in the host test)
    assert workflow_node_types(workflow) <= set(SCHEMA)


def test_wan_workflow_wiring():
    prompt = ui_to_api(json.loads((ROOT / "workflows" / "physmaster_wan_i2v.json").read_text()), SCHEMA)
    by_type = {v["class_type"]: (k, v) for k, v in prompt.items()}
    apply_id, apply = by_type["PhysMasterApply"]
    i2v_id, _ = by_type["WanImageToVideo"]
    assert apply["inputs"]["positive"] == [i2v_id, 0] and apply["inputs"]["negative"] == [i2v_id, 1]
    _, ks = by_type["KSampler"]
    assert ks["inputs"]["positive"] == [apply_id, 0] and ks["inputs"]["negative"] == [apply_id, 1]
    for needed in ("LoadImage", "CLIPVisionLoader", "CLIPVisionEncode", "PhysMasterEncode", "UNETLoader",
                   "CLIPLoader", "CLIPTextEncode", "VAEDecode", "SaveVideo"):
        assert needed in by_type, needed


def test_checker_catches_a_missing_widget_and_a_wrong_link():
    workflow = json.loads((ROOT / "workflows" / "physmaster_wan_i2v.json").read_text())
    broken = copy.deepcopy(workflow)
    node = next(n for n in broken["nodes"] if n["type"] == "PhysMasterApply")
    node["widgets_values"] = node["widgets_values"][:1]
    with pytest.raises(WorkflowError, match=r"PhysMasterApply\): widgets_values has too few values"):
        ui_to_api(broken, SCHEMA)
    broken = copy.deepcopy(workflow)
    node = next(n for n in broken["nodes"] if n["type"] == "PhysMasterEncode")
    node["type"] = "PhysMasterEncodeRenamed"
    with pytest.raises(WorkflowError, match="unknown node type 'PhysMasterEncodeRenamed'"):
        ui_to_api(broken, SCHEMA)


def test_schema_has_every_physmaster_node():
    ours = {n for n, v in SCHEMA.items() if v["pack"] == "physmaster"}
    assert {"PhysMasterEncoderLoader", "PhysMasterEncoderNew", "PhysMasterEncoderSave", "PhysMasterEncode",
            "PhysMasterApply"} <= ours
    apply = SCHEMA["PhysMasterApply"]
    assert apply["input_order"]["required"] == ["positive", "negative", "physical_tokens", "strength", "apply_to"]
    assert apply["output"] == ["CONDITIONING", "CONDITIONING"]
