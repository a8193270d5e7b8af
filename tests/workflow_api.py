"""UI-format workflows <-> ComfyUI's API format, driven by node schemas in /object_info format.

Used by the CI test (against the checked-in snapshot tests/node_schema.json, no ComfyUI needed) and by the host
tests (against the live /object_info). Widget rules follow the frontend: INT/FLOAT/STRING/BOOLEAN/COMBO inputs are
widgets in input order (required, then optional); an INT with `control_after_generate` (or named seed/noise_seed)
is followed by its control value; an input with `image_upload` gets an `upload` value; a V3 dynamic combo is
followed by the widgets of the option it selects. Frontend-only nodes (notes, reroutes) are dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"
FRONTEND_ONLY = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
SCHEMA_PATH = Path(__file__).with_name("node_schema.json")


class WorkflowError(ValueError):
    pass


def _is_widget(spec: list) -> bool:
    t = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput") or opts.get("rawLink") or opts.get("hidden"):  # hidden: legacy inputs the frontend does not show
        return False
    return isinstance(t, list) or t in WIDGET_TYPES or t == DYNAMIC_COMBO


def _ordered_inputs(info: dict) -> list[tuple[str, list]]:
    order = info.get("input_order") or {s: list(info.get("input", {}).get(s, {})) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info.get("input", {}).get(section, {}).get(name)
            if spec is not None:
                out.append((name, spec))
    return out


def socket_inputs(info: dict) -> dict[str, str]:
    """Socket inputs (name -> type) of a node."""
    return {n: s[0] for n, s in _ordered_inputs(info) if not _is_widget(s)}


def map_widgets(node_type: str, info: dict, values: list, node_id: Any = "?") -> dict[str, Any]:
    """Map a UI node's widgets_values onto input names. Raises WorkflowError when the count is off.

    Widgets appended to a node as *optional* inputs after a workflow was saved have no value in it: like the
    frontend (which leaves such widgets at their defaults), they are left out, so the host uses their defaults."""
    values = list(values)
    out: dict[str, Any] = {}
    optional = set(info.get("input", {}).get("optional", {}))

    def take(what: str):
        if not values:
            raise WorkflowError(f"node {node_id} ({node_type}): widgets_values has too few values (ran out at "
                                f"{what!r}); the node's inputs changed or the workflow is from another version")
        return values.pop(0)

    def walk(inputs: list[tuple[str, list]], prefix: str) -> None:
        for name, spec in inputs:
            if not _is_widget(spec):
                continue
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            key = prefix + name
            if not values and not prefix and name in optional:  # appended after the workflow was saved
                continue
            value = take(key)
            out[key] = value
            if spec[0] == "INT" and (opts.get("control_after_generate") or name in ("seed", "noise_seed")):
                take(f"{key} (control_after_generate)")
            if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload"):
                take(f"{key} (upload)")
            if spec[0] == DYNAMIC_COMBO:
                chosen = next((o for o in opts.get("options", []) if o.get("key") == value), None)
                if chosen is None:
                    raise WorkflowError(f"node {node_id} ({node_type}): {key} = {value!r} is not one of "
                                        f"{[o.get('key') for o in opts.get('options', [])]}")
                walk(_ordered_inputs({"input": chosen.get("inputs", {})}), key + ".")

    walk(_ordered_inputs(info), "")
    if values:
        raise WorkflowError(f"node {node_id} ({node_type}): widgets_values has {len(values)} value(s) too many "
                            f"({values!r}); the node's inputs changed or the workflow is from another version")
    return out


MODE_MUTED, MODE_BYPASS = 2, 4


def _links(workflow: dict) -> dict[int, tuple[int, int, int, int, Any]]:
    out = {}
    for link in workflow.get("links", []):
        if isinstance(link, dict):
            lid, src, slot, dst, dslot, typ = (link["id"], link["origin_id"], link["origin_slot"],
                                                link["target_id"], link["target_slot"], link.get("type"))
        else:
            lid, src, slot, dst, dslot, typ = link[:6]
        out[int(lid)] = (int(src), int(slot), int(dst), int(dslot), typ)
    return out


def ui_to_api(workflow: dict, object_info: dict) -> dict[str, dict]:
    """Convert a UI-format workflow (what the frontend saves) into an API prompt (what POST /prompt takes).

    Checks as it goes, and raises one WorkflowError listing every problem: unknown node types, widget counts
    that do not match the node's inputs, links to outputs that do not exist or of the wrong type, required
    inputs left unconnected. Links become `[source_id, slot]`; reroutes are resolved through; a PrimitiveNode
    feeding a converted widget leaves the target's own widget value; muted nodes (mode 2) are dropped; bypassed
    nodes (mode 4) are rewired input-to-output by type, as the frontend does. Subgraphs are not supported.
    """
    nodes = {int(n["id"]): n for n in workflow.get("nodes", [])}
    links = _links(workflow)
    subgraphs = {sg.get("id") for sg in (workflow.get("definitions") or {}).get("subgraphs", [])}
    problems: list[str] = []

    def resolve(link_id, seen=()):
        """Follow a link back through reroutes and bypassed nodes: (node_id, slot), "primitive" or None."""
        if link_id is None or int(link_id) not in links:
            return None
        src, slot, _, _, _ = links[int(link_id)]
        node = nodes.get(src)
        if node is None or (src, slot) in seen:
            return None
        seen = seen + ((src, slot),)
        if node["type"] == "Reroute":
            ins = node.get("inputs") or []
            return resolve(ins[0].get("link") if ins else None, seen)
        if node["type"] == "PrimitiveNode":
            return "primitive"
        mode = node.get("mode", 0)
        if mode == MODE_MUTED:
            return None
        if mode == MODE_BYPASS:
            outs = node.get("outputs") or []
            out_type = outs[slot].get("type") if slot < len(outs) else None
            linked = [i for i in (node.get("inputs") or []) if i.get("link") is not None]
            match = [i for i in linked if out_type is not None and i.get("type") == out_type]
            if match:
                return resolve(match[0]["link"], seen)
            return None
        return src, slot

    prompt: dict[str, dict] = {}
    for nid, node in sorted(nodes.items()):
        t = node["type"]
        if t in FRONTEND_ONLY or node.get("mode", 0) in (MODE_MUTED, MODE_BYPASS):
            continue
        if t in subgraphs:
            raise WorkflowError(f"node {nid} is a subgraph ({t}); subgraphs are not supported by ui_to_api")
        info = object_info.get(t)
        if info is None:
            problems.append(f"node {nid}: unknown node type {t!r} (not installed, or renamed)")
            continue
        values = node.get("widgets_values") or []
        try:
            if isinstance(values, dict):
                names = {n for n, s in _ordered_inputs(info) if _is_widget(s)}
                inputs = {k: v for k, v in values.items() if k in names}
            else:
                inputs = map_widgets(t, info, values, nid)
        except WorkflowError as e:
            problems.append(str(e))
            continue
        sockets = socket_inputs(info)
        widget_names = {n for n, s in _ordered_inputs(info) if _is_widget(s)}
        for inp in node.get("inputs") or []:
            name = inp["name"]
            if isinstance(inp.get("widget"), dict):
                name = inp["widget"].get("name", name)
            if name not in sockets and name not in widget_names:
                problems.append(f"node {nid} ({t}): input {name!r} does not exist on the node")
                continue
            link = inp.get("link")
            if link is None:
                continue
            src = resolve(link)
            if src == "primitive":
                continue
            if src is None:
                if name in sockets:
                    inputs.pop(name, None)
                continue
            src_id, slot = src
            outputs = object_info.get(nodes[src_id]["type"], {}).get("output", [])
            if slot >= len(outputs):
                problems.append(f"node {nid} ({t}): input {name!r} links to output {slot} of node {src_id} "
                                f"({nodes[src_id]['type']}), which has {len(outputs)} outputs")
                continue
            want, got = sockets.get(name), outputs[slot]
            if want is not None and "*" not in (want, got) and got not in str(want).split(","):
                problems.append(f"node {nid} ({t}): input {name!r} wants {want} but gets {got} from node "
                                f"{src_id} ({nodes[src_id]['type']})")
            inputs[name] = [str(src_id), slot]
        for name in sockets:
            if name in info.get("input", {}).get("required", {}) and name not in inputs:
                problems.append(f"node {nid} ({t}): required input {name!r} is not connected")
        prompt[str(nid)] = {"class_type": t, "inputs": inputs,
                            "_meta": {"title": node.get("title") or info.get("display_name") or t}}
    if problems:
        raise WorkflowError("; ".join(problems))
    return prompt


# --- the schema snapshot -------------------------------------------------------------------------------------------

_KEEP_OPTS = ("control_after_generate", "image_upload", "forceInput", "hidden", "default", "min", "max", "options")


def _reduce_spec(spec: list, keep_options: bool) -> list:
    t = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    kept = {k: v for k, v in opts.items() if k in _KEEP_OPTS}
    if isinstance(t, list):
        t = t if keep_options else []
    if t == "COMBO" and not keep_options:
        kept.pop("options", None)
    if t == DYNAMIC_COMBO:
        kept["options"] = [{"key": o["key"], "inputs": {s: {n: _reduce_spec(v, keep_options) for n, v in d.items()}
                                                        for s, d in o.get("inputs", {}).items()}}
                           for o in opts.get("options", [])]
    return [t, kept] if kept else [t]


#: combos whose options are files on the machine, not part of the public API
FILE_LISTS = {("PhysMasterEncoderLoader", "encoder_name")}


def reduce_object_info(object_info: dict, node_ids: dict[str, str]) -> dict:
    """The public-API part of each node's schema: inputs (name, type, order), widget flags, outputs.

    `node_ids` maps node id -> pack ("physmaster" or "core"). File-list combos are stored empty (they depend on
    the machine); static combo options of our own nodes are kept.
    """
    nodes = {}
    for node_id, pack in sorted(node_ids.items()):
        info = object_info[node_id]
        keep = pack == "physmaster"
        nodes[node_id] = {
            "pack": pack,
            "input": {s: {n: _reduce_spec(v, keep and (node_id, n) not in FILE_LISTS)
                          for n, v in info.get("input", {}).get(s, {}).items()}
                      for s in ("required", "optional") if info.get("input", {}).get(s)},
            "input_order": {s: v for s, v in info.get("input_order", {}).items() if s in ("required", "optional")},
            "output": list(info.get("output", [])),
            "output_name": list(info.get("output_name", [])),
            "output_node": bool(info.get("output_node", False)),
        }
    return {"comment": "Public API of the PhysMaster nodes (and the core nodes our workflows use), taken from a "
                       "live ComfyUI's /object_info. Regenerate with PHYSMASTER_UPDATE_SCHEMA=1 and the host tests; "
                       "only append inputs/outputs to a landed node.",
            "nodes": nodes}


def load_schema(path: Path = SCHEMA_PATH) -> dict:
    return json.loads(Path(path).read_text())


def workflow_node_types(workflow: dict) -> set[str]:
    return {n["type"] for n in workflow.get("nodes", []) if n["type"] not in FRONTEND_ONLY}
