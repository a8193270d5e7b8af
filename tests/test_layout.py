"""The pack's structural rules (shared/DESIGN.md section 2), checked without ComfyUI."""

import ast
import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HOST_ONLY = {"comfy", "comfy_api", "comfy_extras", "comfy_execution", "folder_paths", "server", "node_helpers",
             "nodes", "latent_preview", "execution"}


def _imports(path: Path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, 0, alias.name
        elif isinstance(node, ast.ImportFrom):
            yield node.lineno, node.level, node.module or ""


def test_core_never_imports_the_host_nor_itself_absolutely():
    bad = []
    for path in (ROOT / "physmaster").rglob("*.py"):
        for line, level, name in _imports(path):
            top = name.split(".")[0]
            if level == 0 and top in HOST_ONLY:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} (host code)")
            if level == 0 and top == "physmaster":
                # inside ComfyUI the core is `<pack folder>.physmaster`, so absolute imports would load a 2nd copy
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} absolutely; use a relative import")
    assert not bad, "\n".join(bad)


def test_nodes_import_the_core_relatively():
    bad = []
    for path in (ROOT / "nodes").rglob("*.py"):
        for line, level, name in _imports(path):
            if level == 0 and name.split(".")[0] == "physmaster":
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name} absolutely")
    assert not bad, "\n".join(bad)


def test_no_pickle_loading():
    bad = []
    for path in ROOT.rglob("*.py"):
        if any(part.startswith(".") for part in path.relative_to(ROOT).parts) or "stubs" in path.parts:
            continue
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                bad.append(f"{path.relative_to(ROOT)}: torch.load without weights_only=True")
        if re.search(r"^\s*import pickle|pickle\.loads?\(", text, re.M) and path.name != "test_layout.py":
            bad.append(f"{path.relative_to(ROOT)}: uses pickle")
    assert not bad, "\n".join(bad)


def test_entry_point_imports_without_comfyui():
    spec = importlib.util.spec_from_file_location("physmaster_pack_probe", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        assert module.WEB_DIRECTORY == "./web"
        assert callable(module.comfy_entrypoint)
        assert not hasattr(module, "NODE_CLASS_MAPPINGS")  # V3 only, or ComfyUI ignores comfy_entrypoint
        assert "comfy_api" not in sys.modules  # nothing from the host is imported at import time
    finally:
        sys.modules.pop(spec.name, None)


def test_every_node_has_a_help_page():
    schema = json.loads((ROOT / "tests" / "node_schema.json").read_text())
    ours = [n for n, info in schema["nodes"].items() if info.get("pack") == "physmaster"]
    assert ours
    missing = [n for n in ours if not (ROOT / "web" / "docs" / f"{n}.md").is_file()]
    assert not missing, f"no web/docs page for {missing}"


def test_packaging_installs_only_the_core():
    text = (ROOT / "pyproject.toml").read_text()
    assert 'include = ["physmaster", "physmaster.*"]' in text
    req = (ROOT / "requirements.txt").read_text()
    assert not re.search(r"^torch", req, re.M), "never pin torch in requirements.txt"
    assert not re.search(r"numpy\s*(<|==)", req), "no upper pin on numpy"
