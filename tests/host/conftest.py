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


# ComfyUI's requirements that the harness stubs (tests/host/stubs): not needed in the test Python
STUBBED = {"torchvision", "torchaudio"}


def comfyui_path_or_none() -> str | None:
    return os.environ.get("COMFYUI_PATH") or None


def missing_requirements(comfyui_path: str | os.PathLike) -> list[str]:
    """ComfyUI's essential requirements (its requirements.txt up to '#non essential') not installed in this
    Python. The server runs with this Python, so each one would fail every host test."""
    import re
    from importlib import metadata

    path = Path(comfyui_path).expanduser() / "requirements.txt"
    if not path.is_file():
        return []
    missing = []
    for line in path.read_text(errors="replace").splitlines():
        line = line.strip()
        if line.lower().startswith("#non essential") or line.lower().startswith("# non essential"):
            break
        if not line or line.startswith(("#", "-")):
            continue
        name = re.split(r"[\s<>=!~;\[@]", line, maxsplit=1)[0]
        if not name or name.lower() in STUBBED:
            continue
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def host_skip_reason() -> str | None:
    """Why the host tests cannot run in this Python (None when they can)."""
    value = comfyui_path_or_none()
    if value is None:
        return SKIP_REASON
    missing = missing_requirements(value)
    if missing:
        return (f"host tests need ComfyUI's requirements in the Python that runs pytest ({sys.executable} lacks "
                f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}): run them with ComfyUI's own "
                f"Python, e.g. COMFYUI_PATH={value} /path/to/comfyui-venv/bin/python -m pytest tests/host")
    return None


def pytest_collection_modifyitems(config, items):
    reason = host_skip_reason()
    skip = None if reason is None else pytest.mark.skip(reason=reason)
    for item in items:
        if HOST_DIR in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.host)
            if skip is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def comfyui_path() -> Path:
    value = comfyui_path_or_none()
    reason = host_skip_reason()
    if reason is not None:
        pytest.skip(reason)
    path = Path(value).expanduser().resolve()
    if not (path / "main.py").is_file():
        raise pytest.UsageError(f"COMFYUI_PATH={value!r} is not a ComfyUI checkout (no main.py there)")
    return path


@pytest.fixture(scope="session")
def tiny_models(comfyui_path) -> dict:
    """name -> Path of the cached tiny model files (written on first use; see tiny_models.MODELS)."""
    import tiny_models as tm

    return tm.ensure_tiny_models(tm.DEFAULT_MODELS, comfyui_path=str(comfyui_path))


@pytest.fixture(scope="session")
def host(comfyui_path, tiny_models):
    """One ComfyUI server for the whole session, with every tiny model linked into its model folders."""
    import harness
    import tiny_models as tm

    models = tm.model_folders(tiny_models)
    keep = bool(os.environ.get("PHYSMASTER_HOST_KEEP"))
    # a loaded machine starts ComfyUI slowly: PHYSMASTER_HOST_STARTUP_TIMEOUT seconds (default 240)
    timeout = float(os.environ.get("PHYSMASTER_HOST_STARTUP_TIMEOUT") or 240)
    h = harness.ComfyHost(comfyui_path, models=models, keep_root=keep, startup_timeout=timeout)
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
