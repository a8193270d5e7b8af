"""Runs bench/bench_gpu_wan14b.py (same arguments) with stubs for what a bare GPU machine lacks (bench/gpu/check.sh).

ComfyUI imports PyAV at module level (comfy_api/latest/_input*/video_types.py, _ui.py) but the bench never
touches video, and PyAV's wheel (36 MB) does not fit the carried payload. Where `av` is not installed it is
served by the pack's own host-test stub finder (tests/host/stubs/host_stubs.py): imports work, any call raises.
torchvision/torchaudio are stubbed the same way only where they are missing (as the bench itself does).
"""
import importlib
import importlib.machinery
import os
import runpy
import sys

repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(repo, "tests", "host", "stubs"))
import host_stubs  # noqa: E402

stubbed = host_stubs.install()  # torchvision/torchaudio, only those not installed
for name in ("torchvision", "torchaudio"):  # installed but failing to import (e.g. a mismatched build): stub it
    if name not in stubbed:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001
            print(f"[gpu_check] import {name} failed ({exc!r}): stubbing it", file=sys.stderr, flush=True)
            stubbed = host_stubs.stub([name])
if importlib.machinery.PathFinder.find_spec("av") is None:
    stubbed = host_stubs.stub(["av"])
if stubbed:
    print(f"[gpu_check] stubbed (import only): {', '.join(stubbed)}", file=sys.stderr, flush=True)

# ComfyUI's own log lines (model loads, "loaded partially ...") help read the GPU run; BENCH_LOG=WARNING quiets them
import logging  # noqa: E402

logging.basicConfig(level=os.environ.get("BENCH_LOG", "INFO"), format="[%(levelname)s %(name)s] %(message)s")
logging.getLogger("alembic").setLevel(logging.WARNING)

script = os.path.join(repo, "bench", "bench_gpu_wan14b.py")
sys.argv = [script] + sys.argv[1:]
runpy.run_path(script, run_name="__main__")
