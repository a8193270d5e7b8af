"""Host tests: a real ComfyUI (COMFYUI_PATH) started once per session; skipped cleanly without it.

Run:  COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/host -q
(the server runs with the Python that runs pytest, so use the ComfyUI venv).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HOST_DIR = Path(__file__).resolve().parent
if str(HOST_DIR) not in sys.path:  # so `import harness` works whatever the import mode
    sys.path.insert(0, str(HOST_DIR))

SKIP_REASON = "host tests need a real ComfyUI checkout: set COMFYUI_PATH (see tests/host/conftest.py)"


def comfyui_path_or_none() -> str | None:
    return os.environ.get("COMFYUI_PATH") or None


def pytest_collection_modifyitems(config, items):
    skip = None if comfyui_path_or_none() else pytest.mark.skip(reason=SKIP_REASON)
    for item in items:
        if HOST_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.host)
            if skip is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    value = comfyui_path_or_none()
    if value is None:
        pytest.skip(SKIP_REASON)
    path = Path(value).expanduser().resolve()
    if not (path / "main.py").is_file():
        raise pytest.UsageError(f"COMFYUI_PATH={value!r} is not a ComfyUI checkout (no main.py there)")
    return path


@pytest.fixture(scope="session")
def tiny_models(comfyui_path) -> dict:
    """name -> Path of the cached tiny model files (written on first use; see tiny_models.MODELS)."""
    import tiny_models as tm

    return tm.ensure_tiny_models(comfyui_path=str(comfyui_path))


@pytest.fixture(scope="session")
def host(comfyui_path, tiny_models):
    """One ComfyUI server for the whole session, with every tiny model linked into its model folders."""
    import harness
    import tiny_models as tm

    models = tm.model_folders(tiny_models)
    keep = bool(os.environ.get("PHYSMASTER_HOST_KEEP"))
    h = harness.ComfyHost(comfyui_path, models=models, keep_root=keep)
    h.start()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture
def fresh_host_cache(host):
    """Empties ComfyUI's node-output cache (and unloads models) before the test."""
    host.free()
    return host


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and "host" in item.fixturenames:
        h = item.funcargs.get("host")
        if h is not None:
            report.sections.append(("ComfyUI server log", h.log_tail(60)))
    return report
