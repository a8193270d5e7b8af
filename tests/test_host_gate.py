"""The host tests' gate: with COMFYUI_PATH set but run from a Python without ComfyUI's requirements, they skip
with one sentence saying which Python to use, instead of erroring once per test."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_host_tests_skip_with_one_sentence_in_a_python_without_comfyui_requirements(tmp_path):
    fake = tmp_path / "ComfyUI"
    fake.mkdir()
    (fake / "main.py").write_text("raise SystemExit('never run')\n")
    (fake / "requirements.txt").write_text("torch\ntorchvision\nphysmaster-no-such-package-a>=1.0\n"
                                           "physmaster_no_such_package_b==0.4.13\n#non essential dependencies:\n"
                                           "physmaster-no-such-optional\n")
    env = dict(os.environ, COMFYUI_PATH=str(fake))
    proc = subprocess.run([sys.executable, "-m", "pytest", "tests/host", "-q", "-rs", "-p", "no:cacheprovider"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert "skipped" in last and "error" not in last and "failed" not in last and "passed" not in last, last
    assert "physmaster-no-such-package-a, physmaster_no_such_package_b" in out
    assert "physmaster-no-such-optional" not in out and "torchvision" not in out.split("lacks", 1)[1][:200]
    assert "run them with ComfyUI's own Python" in out
    assert "No module named" not in out
