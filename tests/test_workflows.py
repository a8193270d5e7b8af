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


def test_the_landed_marking_workflow_loads_unchanged_after_the_picker_grew_a_widget():
    """Issue 13: ranking_pairs was appended to the picker as an optional widget; the marking workflow saved before
    it has no value for it and still converts (the frontend and the host use the default)."""
    workflow = json.loads((ROOT / "workflows" / "physmaster_mark_preferences.json").read_text())
    node = next(n for n in workflow["nodes"] if n["type"] == "PhysMasterPreferencePicker")
    assert node["widgets_values"] == ["my_preferences", "ask", 600, "skip", 16.0]  # as it landed
    picker = SCHEMA["PhysMasterPreferencePicker"]
    assert picker["input_order"]["optional"][3] == "ranking_pairs"  # where it landed (min_confidence came after)
    assert picker["input"]["optional"]["ranking_pairs"][1]["default"] == "all ordered pairs"
    prompt = ui_to_api(workflow, SCHEMA)
    inputs = next(v for v in prompt.values() if v["class_type"] == "PhysMasterPreferencePicker")["inputs"]
    assert "ranking_pairs" not in inputs
    assert (inputs["dataset_name"], inputs["mode"], inputs["timeout_seconds"], inputs["fps"]) == \
        ("my_preferences", "ask", 600, 16.0)
    node["widgets_values"].append("best vs each")  # a workflow saved now carries it
    inputs = next(v for v in ui_to_api(workflow, SCHEMA).values()
                  if v["class_type"] == "PhysMasterPreferencePicker")["inputs"]
    assert inputs["ranking_pairs"] == "best vs each"
    node["widgets_values"] = node["widgets_values"][:4]  # a required widget missing is still an error
    with pytest.raises(WorkflowError, match="too few values"):
        ui_to_api(workflow, SCHEMA)


def test_widgets_appended_for_margins_leave_the_landed_workflows_unchanged():
    """Issue 11 item 4: min_confidence (picker) and margin_use / min_margin (Train DPO) were appended as optional
    widgets; workflows saved before them convert unchanged (the defaults apply), and ones saved now carry them."""
    picker = SCHEMA["PhysMasterPreferencePicker"]
    assert picker["input_order"]["optional"][-2:] == ["ranking_pairs", "min_confidence"]
    assert picker["input"]["optional"]["min_confidence"] == ["FLOAT", {"default": 0.1, "max": 1.0, "min": 0.0}]
    dpo = SCHEMA["PhysMasterTrainDPO"]
    assert dpo["input_order"]["optional"][-3:] == ["quantized_backward", "margin_use", "min_margin"]
    assert dpo["input"]["optional"]["margin_use"][1] == {"default": "ignore",
                                                        "options": ["ignore", "weight", "filter", "filter and weight"]}
    workflow = json.loads((ROOT / "workflows" / "physmaster_train_dpo.json").read_text())
    node = next(n for n in workflow["nodes"] if n["type"] == "PhysMasterTrainDPO")
    assert len(node["widgets_values"]) == 13  # as it landed: no margin widgets
    inputs = next(v for v in ui_to_api(workflow, SCHEMA).values() if v["class_type"] == "PhysMasterTrainDPO")["inputs"]
    assert "margin_use" not in inputs and inputs["beta"] == 500.0 and inputs["quantized_backward"] is False
    node["widgets_values"] += ["filter", 0.25]
    inputs = next(v for v in ui_to_api(workflow, SCHEMA).values() if v["class_type"] == "PhysMasterTrainDPO")["inputs"]
    assert (inputs["margin_use"], inputs["min_margin"]) == ("filter", 0.25)
    workflow = json.loads((ROOT / "workflows" / "physmaster_mark_preferences.json").read_text())
    node = next(n for n in workflow["nodes"] if n["type"] == "PhysMasterPreferencePicker")
    node["widgets_values"] += ["all ordered pairs", 0.3]
    inputs = next(v for v in ui_to_api(workflow, SCHEMA).values()
                  if v["class_type"] == "PhysMasterPreferencePicker")["inputs"]
    assert inputs["min_confidence"] == 0.3 and inputs["mode"] == "ask"
