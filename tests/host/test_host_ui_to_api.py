"""ui_to_api against a real ComfyUI's /object_info, and a converted UI workflow run end to end."""

from __future__ import annotations

import pytest

import harness
import tiny_models as tm
from test_host_smoke import SIZE, _run_and_load, wan21_i2v_prompt

pytestmark = [pytest.mark.host]


def _node(nid, ntype, widgets=None, inputs=(), outputs=(), mode=0, title=None):
    node = {"id": nid, "type": ntype, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": nid, "mode": mode,
            "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs], "properties": {}}
    if widgets is not None:
        node["widgets_values"] = widgets
    if title:
        node["title"] = title
    return node


def _in(name, typ, link=None, widget=False):
    d = {"name": name, "type": typ, "link": link}
    if widget:
        d["widget"] = {"name": name}
    return d


def _out(name, typ, links=()):
    return {"name": name, "type": typ, "links": list(links)}


def wan21_ui_workflow() -> dict:
    """A UI-format Wan 2.1 I2V workflow (what the frontend saves) with the awkward parts the converter must
    handle: seed control values, a PrimitiveNode driving a converted widget, a Reroute, a Note, a muted node,
    a bypassed node."""
    unet, vae = tm.MODELS["wan21_i2v"][1], tm.MODELS["wan21_vae"][1]
    nodes = [
        _node(1, "UNETLoader", [unet, "default"], outputs=[_out("MODEL", "MODEL", [7])]),
        _node(2, "VAELoader", [vae], outputs=[_out("VAE", "VAE", [3])]),
        _node(3, "PhysMasterTest_RandomImage", [7, "fixed", SIZE, SIZE, 1], outputs=[_out("IMAGE", "IMAGE", [1])]),
        _node(4, "PhysMasterTest_RandomConditioning", [1, "fixed", 32, 4096, 1, 1.0, False, 20, True],
              outputs=[_out("CONDITIONING", "CONDITIONING", [4])], title="positive"),
        _node(5, "PhysMasterTest_RandomConditioning", [2, "randomize", 32, 4096, 1, 1.0, False, 12, True],
              outputs=[_out("CONDITIONING", "CONDITIONING", [5])], title="negative"),
        _node(6, "WanImageToVideo", [SIZE, SIZE, 5, 1],
              inputs=[_in("positive", "CONDITIONING", 4), _in("negative", "CONDITIONING", 5), _in("vae", "VAE", 3),
                      _in("clip_vision_output", "CLIP_VISION_OUTPUT"), _in("start_image", "IMAGE", 2),
                      _in("width", "INT", widget=True)],
              outputs=[_out("positive", "CONDITIONING", [8]), _out("negative", "CONDITIONING", [9]),
                       _out("latent", "LATENT", [10])]),
        _node(7, "KSampler", [42, "fixed", 2, 2.0, "euler", "simple", 1.0],
              inputs=[_in("model", "MODEL", 7), _in("positive", "CONDITIONING", 8),
                      _in("negative", "CONDITIONING", 9), _in("latent_image", "LATENT", 10),
                      _in("seed", "INT", 12, widget=True)],
              outputs=[_out("LATENT", "LATENT", [11, 13])]),
        _node(13, "LatentMultiply", [0.0], mode=harness.MODE_BYPASS,
              inputs=[_in("samples", "LATENT", 13)], outputs=[_out("LATENT", "LATENT", [14])]),
        _node(8, "SaveLatent", ["smoke/ui_wan21"], inputs=[_in("samples", "LATENT", 14)]),
        _node(9, "Note", ["a note the converter must drop"]),
        _node(10, "Reroute", None, inputs=[_in("", "*", 1)], outputs=[_out("", "IMAGE", [2])]),
        _node(11, "SaveLatent", ["smoke/muted"], mode=harness.MODE_MUTED, inputs=[_in("samples", "LATENT", 11)]),
        _node(12, "PrimitiveNode", [42, "fixed"], outputs=[_out("INT", "INT", [12])]),
    ]
    links = [
        [1, 3, 0, 10, 0, "IMAGE"], [2, 10, 0, 6, 4, "IMAGE"], [3, 2, 0, 6, 2, "VAE"],
        [4, 4, 0, 6, 0, "CONDITIONING"], [5, 5, 0, 6, 1, "CONDITIONING"], [7, 1, 0, 7, 0, "MODEL"],
        [8, 6, 0, 7, 1, "CONDITIONING"], [9, 6, 1, 7, 2, "CONDITIONING"], [10, 6, 2, 7, 3, "LATENT"],
        [11, 7, 0, 11, 0, "LATENT"], [12, 12, 0, 7, 4, "INT"], [13, 7, 0, 13, 0, "LATENT"],
        [14, 13, 0, 8, 0, "LATENT"],
    ]
    return {"id": "physmaster-host-test", "revision": 0, "last_node_id": 13, "last_link_id": 14, "nodes": nodes,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


def test_ui_to_api_maps_widgets_and_links(host):
    api = harness.ui_to_api(wan21_ui_workflow(), host.object_info())
    assert sorted(api, key=int) == ["1", "2", "3", "4", "5", "6", "7", "8"]
    assert api["3"]["inputs"] == {"seed": 7, "width": SIZE, "height": SIZE, "batch": 1}
    assert api["4"]["inputs"] == {"seed": 1, "length": 32, "width": 4096, "batch": 1, "scale": 1.0,
                                  "attention_mask": False, "valid_length": 20, "zero_out_masked": True}
    assert api["4"]["_meta"]["title"] == "positive"
    assert api["6"]["inputs"] == {"positive": ["4", 0], "negative": ["5", 0], "vae": ["2", 0],
                                  "start_image": ["3", 0], "width": SIZE, "height": SIZE, "length": 5,
                                  "batch_size": 1}
    assert api["7"]["inputs"] == {"model": ["1", 0], "seed": 42, "steps": 2, "cfg": 2.0, "sampler_name": "euler",
                                  "scheduler": "simple", "positive": ["6", 0], "negative": ["6", 1],
                                  "latent_image": ["6", 2], "denoise": 1.0}
    assert api["8"]["inputs"] == {"samples": ["7", 0], "filename_prefix": "smoke/ui_wan21"}


def test_ui_workflow_runs_like_the_api_prompt(host):
    host.free()
    from_ui, _ = _run_and_load(host, harness.ui_to_api(wan21_ui_workflow(), host.object_info()))
    host.free()
    from_api, _ = _run_and_load(host, wan21_i2v_prompt("smoke/api_wan21", clip_vision=False))
    assert (from_ui == from_api).all()


def test_ui_to_api_rejects_unknown_nodes(host):
    wf = {"nodes": [_node(1, "NoSuchNode_PhysMasterTest", [1])], "links": []}
    with pytest.raises(harness.WorkflowError, match="NoSuchNode_PhysMasterTest"):
        harness.ui_to_api(wf, host.object_info())
