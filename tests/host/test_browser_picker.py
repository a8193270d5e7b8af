"""End to end in a real browser: the real ComfyUI frontend (comfyui-frontend-package) in Debian's chromium, driven
by playwright-core from npm, opens the shipped marking workflow (tiny models swapped in), queues it, clicks a
winner and a loser inside the picker node, and the pair lands on disk. Screenshots go to tests/host/artifacts/.

Needs: /usr/bin/chromium (apt-get install chromium), node, and `npm install` in tests/host/browser/."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

import tiny_models as tm
from test_host_smoke import SIZE
from test_picker_host import pairs_on_disk

pytestmark = [pytest.mark.host, pytest.mark.browser, pytest.mark.slow]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BROWSER_DIR = HERE / "browser"
ARTIFACTS = HERE / "artifacts"


def _requirements() -> str | None:
    if not Path("/usr/bin/chromium").exists() and not shutil.which("chromium"):
        return "Debian's chromium is not installed (apt-get install chromium)"
    if not shutil.which("node"):
        return "node is not installed"
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed (cd tests/host/browser && npm install)"
    return None


def marking_workflow_with_tiny_models(encoder_name: str, image_name: str, dataset: str) -> dict:
    """workflows/physmaster_mark_preferences.json in UI format, edited the way a person would: tiny models
    chosen in the loaders, a small size, and the text encoder replaced by the harness's random conditioning."""
    wf = json.loads((ROOT / "workflows" / "physmaster_mark_preferences.json").read_text())
    nodes = {n["id"]: n for n in wf["nodes"]}
    values = {"UNETLoader": [tm.MODELS["wan21_i2v"][1], "default"],
              "VAELoader": [tm.MODELS["wan21_vae"][1]],
              "CLIPVisionLoader": [tm.MODELS["clip_vision_h"][1]],
              "PhysMasterEncoderLoader": [encoder_name],
              "LoadImage": [image_name, "image"]}
    clip_loader = next(n for n in nodes.values() if n["type"] == "CLIPLoader")
    dead_links = set(clip_loader["outputs"][0]["links"])
    for node in nodes.values():
        t = node["type"]
        if t in values:
            node["widgets_values"] = values[t]
        elif t == "WanImageToVideo":
            node["widgets_values"] = [SIZE, SIZE, 5, 3]
        elif t == "KSampler":
            node["widgets_values"] = [11, "fixed", 2, 2.0, "euler", "simple", 1.0]
        elif t == "PhysMasterPreferencePicker":
            node["widgets_values"][0] = dataset
            node["widgets_values"][2] = 300
        elif t == "CLIPTextEncode":
            node["type"] = "PhysMasterTest_RandomConditioning"
            node["properties"]["Node name for S&R"] = node["type"]
            node["inputs"] = [i for i in node["inputs"] if i["name"] != "clip"]
            node["widgets_values"] = [node["id"], "fixed", 32, 4096, 1, 1.0, False, 0, False]
    wf["nodes"] = [n for n in wf["nodes"] if n["type"] != "CLIPLoader"]
    wf["links"] = [lk for lk in wf["links"] if lk[0] not in dead_links]
    return wf


@pytest.mark.parametrize("mode", ["root", "subgraph"])
def test_mark_a_pair_in_the_real_frontend(host, tmp_path, mode):
    missing = _requirements()
    if missing:
        pytest.skip(missing)
    from PIL import Image
    from test_physmaster_nodes import _encoder_file

    host.add_model_file("physmaster", _encoder_file(tmp_path))
    image = tmp_path / "start.png"
    Image.new("RGB", (SIZE, SIZE), (40, 160, 90)).save(image)
    image_name = host.upload_image(image, "physmaster_browser_start.png")
    dataset = f"browser_pairs_{mode}"
    workflow = marking_workflow_with_tiny_models("PhysEncoder_00001_.safetensors", image_name, dataset)
    wf_path = tmp_path / "marking.json"
    wf_path.write_text(json.dumps(workflow))
    ARTIFACTS.mkdir(exist_ok=True)
    proc = subprocess.run(["node", str(BROWSER_DIR / "pick_in_browser.mjs"), host.url, str(wf_path), str(ARTIFACTS),
                           "2", "0", mode], cwd=BROWSER_DIR, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"browser run failed:\n{proc.stdout}\n{proc.stderr}\n{host.log_tail(40)}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["candidates"] == 3
    # the node's own word, sent once the pair is on disk (not the browser's guess when its POST was accepted)
    assert result["status"].strip() == f"Saved 1 pair to {dataset}.", result["status"]
    deadline_pairs = []
    import time
    for _ in range(120):
        deadline_pairs = pairs_on_disk(host, dataset)
        if deadline_pairs:
            break
        time.sleep(0.5)
    assert [(p["winner"], p["loser"], p["source"]) for p in deadline_pairs] == [(2, 0, "human")]
    suffix = "" if mode == "root" else f"_{mode}"
    for shot in ("picker_waiting", "picker_best_marked", "picker_saved"):
        assert (ARTIFACTS / f"{shot}{suffix}.png").stat().st_size > 10_000
    if mode == "subgraph":  # the picker ran inside the subgraph: the group on disk records its execution id
        from physmaster.preferences import PreferenceDataset
        ds = PreferenceDataset.open(host.output_dir / "physmaster" / "preferences", dataset)
        assert ":" in ds.group_meta(deadline_pairs[0]["group"])["node"]
