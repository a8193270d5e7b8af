"""`python -m physmaster demo --fast`: the pipeline runs end to end and writes its table and GIF."""

import json

import numpy as np
import pytest

pytest.importorskip("physmaster.physics")

from physmaster.cli import main  # noqa: E402
from physmaster.demo import ProxyBackbone, bootstrap_ci, format_table  # noqa: E402


@pytest.mark.slow
def test_demo_fast(tmp_path, capsys):
    rc = main(["demo", "--fast", "--out", str(tmp_path), "--seed", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    for row in ("base", "Stage I", "Stage II", "Stage III"):
        assert f"\n{row:10s}|" in out
    table = (tmp_path / "table.txt").read_text()
    assert "Stage III - Stage II" in table
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["per_scene"]) == {"base", "Stage I", "Stage II", "Stage III"}
    for stage in res["per_scene"].values():
        for metric in ("l2", "chamfer", "iou"):
            assert len(stage[metric]) == 4 and np.all(np.isfinite(stage[metric]))
    gif = tmp_path / "comparison.gif"
    assert gif.read_bytes()[:6] == b"GIF89a"
    from PIL import Image
    with Image.open(gif) as im:
        assert im.n_frames == 8 and im.size[0] > 4 * 32
    assert (tmp_path / "demo_encoder.safetensors").is_file()


def test_table_and_bootstrap():
    r = {"base": {"l2": np.array([0.2, 0.2, 0.4, 0.4]), "chamfer": np.ones(4), "iou": np.zeros(4)},
         "Stage I": {"l2": np.array([0.1, 0.1, 0.2, 0.2]), "chamfer": np.ones(4), "iou": np.ones(4)}}
    text = format_table(r, 2)
    assert "base      |  0.2000" in text and "0.4000" in text and "0.3000" in text  # seen, unseen, average
    assert "L2 -0.1500 (-50.0%)" in text
    lo, hi = bootstrap_ci(np.array([-1.0, -1.0, -1.0]))
    assert lo == hi == -1.0


def test_backbone_is_deterministic_and_frozen():
    img = np.random.default_rng(0).random((2, 32, 32, 3)).astype(np.float32)
    import torch
    a = ProxyBackbone()(torch.from_numpy(img))
    b = ProxyBackbone()(torch.from_numpy(img))
    assert a.shape == (2, 65, 64) and torch.equal(a, b) and not a.requires_grad


def test_held_out_scenes_are_disjoint_from_training_and_candidates():
    from physmaster.demo import DPO_SEED, EVAL_SEED, SFT_SEED, Settings

    st = Settings()
    train = set(range(SFT_SEED, SFT_SEED + st.sft_scenes)) | set(range(DPO_SEED, DPO_SEED + st.dpo_scenes))
    held_out = set(range(EVAL_SEED, EVAL_SEED + st.eval_scenes))
    assert not train & held_out
    assert st.candidates >= 2 and st.eval_seeds >= 1
