import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from physmaster.errors import PhysMasterError
from physmaster.physics import render_scene, write_split
from physmaster.physics import dataset as dataset_mod

ROOT = Path(__file__).resolve().parents[1]


def test_write_split_layout_and_content(tmp_path):
    out = tmp_path / "ds"
    index = write_split("unseen", 3, out, size=48, frames=12, fps=12.0, start_seed=5)
    on_disk = json.loads((out / "index.json").read_text())
    assert on_disk["count"] == 3 and on_disk["split"] == "unseen" and index["path"] == str(out.resolve())
    assert [s["seed"] for s in on_disk["scenes"]] == [5, 6, 7]
    entry = on_disk["scenes"][1]
    sc = render_scene(6, "unseen", size=48, frames=12, fps=12.0)
    pngs = sorted((out / entry["frames"]).glob("*.png"))
    assert len(pngs) == 12
    img = np.asarray(Image.open(pngs[4])).astype(np.float32) / 255
    assert np.abs(img - sc.frames[4]).max() <= 1 / 255 + 1e-6
    t = load_file(str(out / entry["masks"]))
    assert np.array_equal(t["masks"].astype(bool), sc.masks)
    assert np.allclose(t["trajectories"], sc.trajectories)
    assert json.loads((out / entry["meta"]).read_text()) == json.loads(json.dumps(sc.meta))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_refuses_non_empty_folder_unless_forced(tmp_path):
    out = tmp_path / "ds"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(PhysMasterError, match="--force"):
        write_split("seen", 1, out, frames=4)
    assert (out / "keep.txt").read_text() == "mine"
    write_split("seen", 1, out, frames=4, force=True)
    assert not (out / "keep.txt").exists() and (out / "index.json").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    write_split("seen", 1, empty, frames=4)  # an empty folder is fine
    assert (empty / "index.json").exists()


def test_failure_leaves_nothing_half_written(tmp_path, monkeypatch):
    out = tmp_path / "ds"
    calls = {"n": 0}
    real = dataset_mod.write_scene

    def flaky(scene, folder):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real(scene, folder)

    monkeypatch.setattr(dataset_mod, "write_scene", flaky)
    with pytest.raises(OSError):
        write_split("seen", 3, out, frames=4)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    # a failed --force run keeps the old dataset
    monkeypatch.setattr(dataset_mod, "write_scene", real)
    write_split("seen", 1, out, frames=4)
    before = (out / "index.json").read_text()
    calls["n"] = 0
    monkeypatch.setattr(dataset_mod, "write_scene", flaky)
    with pytest.raises(OSError):
        write_split("seen", 3, out, frames=4, force=True)
    assert (out / "index.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


def test_bad_arguments(tmp_path):
    with pytest.raises(PhysMasterError, match="split"):
        write_split("val", 1, tmp_path / "a")
    with pytest.raises(PhysMasterError, match="count"):
        write_split("seen", 0, tmp_path / "a")
    with pytest.raises(PhysMasterError, match="png"):
        write_split("seen", 1, tmp_path / "a", fmt="mp4")
    assert not (tmp_path / "a").exists()


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "physmaster", "scenes", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli_writes_and_reports(tmp_path):
    out = tmp_path / "cli"
    r = _cli("--split", "unseen", "--count", "2", "--out", str(out), "--size", "32", "--frames", "8",
             "--fps", "8", "--seed", "3")
    assert r.returncode == 0, r.stderr
    assert "wrote 2 unseen scene(s)" in r.stdout and str(out) in r.stdout
    index = json.loads((out / "index.json").read_text())
    assert [s["seed"] for s in index["scenes"]] == [3, 4] and index["size"] == 32
    again = _cli("--count", "1", "--out", str(out))
    assert again.returncode == 2 and "--force" in again.stderr and "Traceback" not in again.stderr
    forced = _cli("--count", "1", "--out", str(out), "--force", "--frames", "4")
    assert forced.returncode == 0 and json.loads((out / "index.json").read_text())["count"] == 1
