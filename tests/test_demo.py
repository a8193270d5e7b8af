"""The demo package: its world, parts, figures and the `--fast` end-to-end run."""

import dataclasses
import itertools
import json
import re

import numpy as np
import pytest
import torch

from physmaster.cli import main
from physmaster.demo import bootstrap_ci, format_table
from physmaster.demo.assets import ASSET_FILE, load_assets, save_assets
from physmaster.demo.autoencoder import FrameAutoencoder
from physmaster.demo.backbone import TARGETS, GeometryBackbone, geometry_targets
from physmaster.demo.evaluation import coherence, material_blind_l2, material_confusion, material_read, score_video
from physmaster.demo.world import FRAMES, MATERIALS, SIZE, drop_scene, material_renderings, material_restitution


def bench_module(name: str):
    """A script of bench/ imported as a module (bench/ is not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_bench(name: str, *args: str, timeout: int = 600):
    """bench/NAME.py run under the demo's smoke settings (`--fast`) with these arguments -> the finished process."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    return subprocess.run([sys.executable, str(script), "--fast", *args], capture_output=True, text=True,
                          timeout=timeout)


def variants_rows(name: str, tmp_path, *variants: str):
    """A variants bench (bench/NAME.py) run with these `--variant`s under the smoke settings -> (the finished
    process, the rows of the JSON it wrote); it must exit 0."""
    out = tmp_path / "variants.json"
    run = run_bench(name, *(x for v in variants for x in ("--variant", v)), "--out", str(out))
    assert run.returncode == 0, run.stderr[-2000:]
    return run, json.loads(out.read_text())["rows"]


def test_head_anchor_reaches_every_head_stage(tmp_path, capsys):
    """`--set head_anchor=W`: each of the head's Flow-DPO stages gets the anchor videos (the trainer logs the
    drift, 0 at the first step where the head is its reference); off (the default), none logs it."""
    assert main(["demo", "--fast", "--out", str(tmp_path / "on"), "--set", "head_anchor=10", "--judge-labels",
                 "--online", "1"]) == 0
    out = capsys.readouterr().out
    for name in ("Stage I + DPO encoder", "Stage III", "Stage III (judge labels)", "online round 1 (judge)"):
        assert re.search(rf"\[{re.escape(name)}\] 1/2 loss [0-9.]+ .* anchor 0\.00e\+00", out), name
        assert re.search(rf"\[{re.escape(name)}\] 2/2 loss [0-9.]+ .* anchor [1-9]\.[0-9]{{2}}e-", out), name
    assert "[Stage II] 2/2" in out and " anchor " not in out.split("[Stage II] 2/2")[1].splitlines()[0]
    assert main(["demo", "--fast", "--out", str(tmp_path / "off")]) == 0
    assert " anchor " not in capsys.readouterr().out


def test_online_steps_reach_the_online_rounds_only(tmp_path, capsys):
    """`--set online_steps=N`: each online round trains the head N steps; the judge-labelled row and Stage III keep
    `head_dpo_steps`. A negative count is refused and names the fix."""
    from physmaster.demo.pipeline import Settings, online_dpo_settings

    assert main(["demo", "--fast", "--out", str(tmp_path), "--set", "online_steps=3", "--judge-labels",
                 "--online", "1"]) == 0
    out = capsys.readouterr().out
    assert "[online round 1 (judge)] 3/3 loss" in out and "[online round 1 (judge)] 2/2" not in out
    assert "[Stage III (judge labels)] 2/2 loss" in out and "[Stage III] 2/2 loss" in out
    assert Settings().online_steps == 0
    st = Settings()
    assert online_dpo_settings(Settings(online_later_batch=0), 2) == Settings(online_later_batch=0)
    assert online_dpo_settings(st, 1) is st and online_dpo_settings(Settings(online_steps=7), 2).head_dpo_steps == 7
    with pytest.raises(ValueError, match="online_steps=-1: use a number of steps >= 1, or 0 for head_dpo_steps"):
        Settings(online_steps=-1)


def test_online_later_batch_reaches_the_later_online_rounds_only():
    """`--set online_later_batch=N`: every online round after the first learns from N pairs a Flow-DPO step; round 1
    and every other stage keep `dpo_batch`, and `online_steps` still applies to every round. A negative batch is
    refused and names the fix."""
    from physmaster.demo.pipeline import Settings, online_dpo_settings

    assert Settings().online_later_batch == 48
    st = Settings(online_later_batch=24)
    assert online_dpo_settings(st, 1) is st and st.dpo_batch == 8
    assert [(online_dpo_settings(st, r).dpo_batch, online_dpo_settings(st, r).head_dpo_steps) for r in (2, 3)] == \
        [(24, st.head_dpo_steps)] * 2
    st = Settings(online_later_batch=16, online_steps=100)
    assert [(online_dpo_settings(st, r).dpo_batch, online_dpo_settings(st, r).head_dpo_steps) for r in (1, 2)] == \
        [(8, 100), (16, 100)]
    with pytest.raises(ValueError, match="online_later_batch=-2: use a number of pairs >= 1, or 0 for dpo_batch"):
        Settings(online_later_batch=-2)


def test_online_later_scenes_reach_the_later_online_rounds_only(tmp_path, capsys):
    """`--set online_later_scenes=N`: every online round after the first draws its candidates of N start images;
    round 1, Stage III and the judge-labelled row keep `head_scenes`. A negative count is refused and names the fix."""
    from physmaster.demo.pipeline import Settings, online_scenes

    assert main(["demo", "--fast", "--out", str(tmp_path), "--set", "online_later_scenes=5", "--judge-labels",
                 "--online", "3"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "pairs from" in x]
    assert len(lines) == 7, lines  # Stage II's, Stage I + DPO encoder's, Stage III's, the judge row's, 3 rounds
    assert all(" from 3 start images" in x for x in lines[2:5]), lines
    assert " from 5 start images" in lines[5] and "online round 1 (judge) model" in lines[5]
    assert " from 5 start images" in lines[6] and "online round 2 (judge) model" in lines[6]
    st = Settings.fast()
    assert [online_scenes(st, r) for r in (1, 2, 3)] == [st.head_scenes] * 3
    st = Settings(online_later_scenes=192)
    assert [online_scenes(st, r) for r in (1, 2, 3)] == [96, 192, 192]
    with pytest.raises(ValueError, match="online_later_scenes=-1: use a number of start images >= 1, or 0 for "
                                         "head_scenes"):
        Settings(online_later_scenes=-1)


def test_online_variants_bench_trains_each_round_two_from_the_same_round_one(tmp_path):
    """bench/demo_online_variants.py (smoke settings): one Stage I, Stage II and online round 1, then a round 2 per
    variant from the same round 1, each scored against it and written to JSON; a variant that would change more than
    round 2 is refused and names the fix."""
    run, rows = variants_rows("demo_online_variants", tmp_path, "default:",
                              "steady:online_later_scenes=5,judge_min_confidence=0,lr_head=1e-9")
    assert list(rows) == ["Stage I", "Stage II", "online round 1 (judge)", "default", "steady"]
    assert rows["steady"]["set"] == ["online_later_scenes=5", "judge_min_confidence=0", "lr_head=1e-9"]
    assert rows["default"]["set"] == [] and rows["steady"]["pairs"] > 0
    assert " from 5 start images" in run.stdout and "x 2 candidates of the online round 1 (judge) model" in run.stdout
    first = rows["online round 1 (judge)"]
    assert first["l2"] == pytest.approx(rows["Stage II"]["l2"] + first["vs_previous"][0], abs=1e-6)
    for name in ("default", "steady"):
        mean, lo, hi = rows[name]["vs_previous"]
        assert lo <= mean <= hi
        assert rows[name]["l2"] == pytest.approx(first["l2"] + mean, abs=1e-6)
    assert rows["steady"]["vs_previous"][0] == pytest.approx(0.0, abs=1e-6)  # a head that cannot move: round 1
    bad = run_bench("demo_online_variants", "--variant", "x:lora_rank=8", timeout=120)
    assert bad.returncode == 2 and "only online round 2's draw, pairs and Flow-DPO" in bad.stderr
    assert "--set" in bad.stderr


def test_demo_fast(tmp_path, capsys):
    rc = main(["demo", "--fast", "--out", str(tmp_path), "--seed", "1", "--judge-labels", "--online", "1"])
    assert rc == 0
    out = capsys.readouterr().out
    names = ("base", "Stage I", "Stage I + DPO encoder", "Stage II", "Stage III", "Stage III (judge labels)",
            "online round 1 (judge)")
    for row in names:
        assert f"\n{row:24s}|" in out
    assert "token influence" in out and "coherence" in out
    assert "why frames are not coherent" in out and "  Stage III: coherent " in out
    table = (tmp_path / "table.txt").read_text()
    assert "Stage III - Stage II" in table and "Stage II - Stage I" in table and "Stage I - base" in table
    res = json.loads((tmp_path / "results.json").read_text())
    rows = res["runs"][0]["rows"]
    assert list(rows) == list(names)
    assert "Stage III (judge labels) - Stage II" in table and "online round 1 (judge) - Stage II" in table
    assert "judge vs ground-truth L2 on the Stage I candidates" in out
    agreement = res["judge_agreement"]
    # the head's stages' start images are partly recoloured (`head_recoloured`, Stage III's and the online rounds'
    # `stage_three_recoloured`): their candidates are judged apart
    # each set also in its motion view: the pairs of candidates that both keep the object, from the same ranking
    sets = ["Stage I candidates", "Stage II candidates", "online round 1 (judge) candidates",
            "Stage II candidates (recoloured start images)",
            "online round 1 (judge) candidates (recoloured start images)"]
    assert set(agreement) == set(sets) | {name + ", the motion" for name in sets}
    for name, a in agreement.items():
        assert 0.0 <= a["overall"] <= 1.0 and a["n_pairs"] == len(a["per_pair"]["agree"])
        assert sum(t["n_pairs"] for t in a["terciles"]) == a["n_pairs"]
        assert a["kept_only"] == name.endswith(", the motion")
        assert a["min_gap"] == (0.005 if a["kept_only"] else 0.02)
    assert "pairs of candidates that both keep the object in every frame and whose L2 differs by >= 0.005" in out
    for row in rows.values():
        for metric in ("l2", "chamfer", "iou"):
            assert len(row["per_scene"][metric]) == 4 and np.all(np.isfinite(row["per_scene"][metric]))
        assert 0.0 <= row["coherence"] <= 1.0
        # L2 = lost frames' share + located frames' errors; the error where found is null only if never found
        lost = np.array(row["per_scene"]["l2_lost"])
        assert np.all((lost >= 0) & (lost <= 1 / np.sqrt(2) + 1e-9))
        assert np.all(lost <= np.array(row["per_scene"]["l2"]) + 1e-9)
        assert "frame_l2" not in row["per_scene"]
        # coherence and the four reasons a frame misses it add up to every counted frame, scene by scene
        parts = np.array(row["per_scene_coherence"]) + sum(
            np.array(row["per_scene"][f"miss_{m}"]) for m in ("lost", "fragments", "too_small", "too_large"))
        assert np.allclose(parts, 1.0)
        found = row["per_scene"]["l2_found"]
        assert len(found) == 4 and all(f is None or 0.0 <= f <= 1.0 for f in found)
    sources = out.split("where avg L2 comes from", 1)[1]
    assert "Stage III - Stage II: lost " in sources and "; where both find it " in sources
    assert sources.count("% of frames: seen ") == len(names)
    pairs_lines = [x for x in out.splitlines() if "candidates of the Stage II model" in x and "pairs from" in x
                   and "judge-labelled" not in x]
    assert len(pairs_lines) == 1 and "of the candidates lose the object in some frame" in pairs_lines[0]
    # the judge-labelled row and online round 1 both label candidates of the Stage II model, and say so
    judged = [x for x in out.splitlines() if "judge-labelled pairs from" in x]
    assert len(judged) == 2 and all("candidates of the Stage II model" in x for x in judged)
    influence = res["runs"][0]["token_influence"]
    assert set(influence) == {"Stage I", "Stage III"}
    for v in influence.values():  # the 2 + 2 fast held-out drops: read only where their materials' drops differ
        assert 0 <= v["material_videos"] <= 4
        for key in ("material_read", "material_read_zeroed"):
            assert v[key] is None if v["material_videos"] == 0 else 0.0 <= v[key] <= 1.0
        # the influence per split: the first 2 held-out drops are the seen ones, the last 2 the unseen
        gain = np.array(v["per_scene_l2_zeroed"]) - np.array(v["per_scene_l2"])
        assert len(gain) == 4 and v["videos_per_scene"] == 1
        # one video a drop (--fast): the videos with tokens are the row's own
        assert v["per_scene_l2"] == rows["Stage III" if v is influence["Stage III"] else "Stage I"]["per_scene"]["l2"]
        assert v["by_split"]["seen"] == pytest.approx(gain[:2].mean(), abs=1e-9)
        assert v["by_split"]["unseen"] == pytest.approx(gain[2:].mean(), abs=1e-9)
        assert v["influence"] == pytest.approx(gain.mean(), abs=1e-9)
    line = next(x for x in out.splitlines() if x.startswith("token influence"))
    assert line.count("; seen ") == 2 and line.count(", unseen ") == 2
    assert res["wall_seconds"] > 0 and res["settings"]["sft_steps"] == 2
    gif = tmp_path / "comparison.gif"
    assert gif.read_bytes()[:6] == b"GIF89a"
    from PIL import Image
    with Image.open(gif) as im:
        assert im.n_frames == FRAMES and im.size[0] > 4 * SIZE
    assert (tmp_path / "demo_encoder.safetensors").is_file()


def test_eval_seed_draws_other_scenes(tmp_path):
    from physmaster.demo.cli import held_out

    a, b = held_out(3, 0), held_out(3, 1)
    assert [s.meta["seed"] for s in a] != [s.meta["seed"] for s in b]
    assert len(a) == 6 and [s.meta["split"] for s in a] == ["seen"] * 3 + ["unseen"] * 3


def test_table_and_bootstrap():
    r = {"base": {"l2": np.array([0.2, 0.2, 0.4, 0.4]), "chamfer": np.ones(4), "iou": np.zeros(4),
                  "coherence": np.ones(4)},
         "Stage I": {"l2": np.array([0.1, 0.1, 0.2, 0.2]), "chamfer": np.ones(4), "iou": np.ones(4),
                     "coherence": np.full(4, 0.5)}}
    text = format_table(r, 2)
    assert "0.2000" in text and "0.4000" in text and "0.3000" in text  # seen, unseen, average
    assert "L2 -0.1500 (-50.0%)" in text and "Stage I - base" in text
    assert "     0.500" in text  # coherence column
    lo, hi = bootstrap_ci(np.array([-1.0, -1.0, -1.0]))
    assert lo == hi == -1.0


def test_where_l2_comes_from():
    from physmaster.demo.report import format_sources

    s, nan = 1 / np.sqrt(2), np.nan
    r = {"Stage II": {"l2": np.array([0.1, 0.2, 0.1, 0.2]), "l2_lost": np.array([0.0, s / 8, 0.0, s / 8]),
                      "l2_found": np.array([0.1, 0.2, 0.1, nan]),
                      "frame_l2": np.array([[0.1, 0.1], [0.2, nan], [0.1, 0.1], [nan, nan]])},
         "Stage III": {"l2": np.array([0.05, 0.2, 0.05, 0.2]), "l2_lost": np.array([0.0, s / 8, 0.0, s / 8]),
                       "l2_found": np.array([0.05, 0.1, 0.05, 0.1]),
                       "frame_l2": np.array([[0.0, 0.1], [nan, 0.1], [0.05, 0.05], [0.1, nan]])}}
    text = format_sources(r)
    assert "Stage II: 0.1500 = lost 0.0442 (6.2% of frames) + located 0.1058; where found 0.1333" in text
    # lost frames unchanged; on the frames both rows find (scene 2 has none in common): -0.05 and -0.05
    assert "Stage III - Stage II: lost +0.0000 [+0.0000, +0.0000]; where both find it -0.0500" in text
    assert "(2 scenes)" in text
    assert "Stage II: 0.1500 = lost 0.0442 (6.2% of frames: seen 6.2%, unseen 6.2%)" in format_sources(r, 2)
    r["Stage II"]["l2_lost"] = np.array([0.0, 0.0, s / 4, s / 4])  # all lost frames in the unseen half
    assert "(12.5% of frames: seen 0.0%, unseen 25.0%)" in format_sources(r, 2)
    assert format_sources({"base": {"l2": np.ones(2)}}) == ""  # results without the parts: nothing to say


def test_the_world_is_determined_by_the_start_image():
    """Nominal gravity and a material law: equal colours bounce alike, the image fixes the motion."""
    s = drop_scene(3)
    assert s.meta["gravity_norm"] == pytest.approx(3.0)
    assert s.meta["restitution"] == pytest.approx(material_restitution(s.meta["texture"]))
    assert material_restitution("flat") < material_restitution("stripes") < material_restitution("checker")
    assert s.frames.shape == (FRAMES, SIZE, SIZE, 3)
    assert np.array_equal(s.frames, drop_scene(3).frames)
    assert 20 <= s.object_masks()[0].sum() <= 150  # objects big enough to be shapes at 32 px


def test_recoloured_changes_the_look_only():
    """Stage I's colour augmentation: channels permuted, half the time inverted; one draw per clip, by seed."""
    from physmaster.demo.world import recoloured

    f = drop_scene(3).frames
    inverted = 0
    for seed in range(12):
        r = recoloured(f, seed)
        assert r.shape == f.shape and r.dtype == np.float32 and 0.0 <= r.min() and r.max() <= 1.0
        assert np.array_equal(r, recoloured(f, seed))
        matches = [(p, inv) for p in itertools.permutations(range(3)) for inv in (False, True)
                   if np.allclose(r, (1.0 - f[..., list(p)]) if inv else f[..., list(p)], atol=1e-6)]
        assert matches, "not a permutation (or its inversion) of the clip's channels"
        inverted += all(inv for _, inv in matches)
    assert 2 <= inverted <= 10  # about half the draws invert
    # a light background turns dark: what the unseen split's slate asks of Stage I
    assert f[0, 0, 0].mean() > 0.5 and min(recoloured(f, s)[0, 0, 0].mean() for s in range(12)) < 0.35


def test_relooked_reaches_looks_recolouring_does_not_and_keeps_the_object_visible():
    """The later online rounds' look change (`world.relooked`): recoloured, then hues turned by any angle, saturation
    and gamma drawn; one draw per clip, by seed. Colours outside the permutations' reach, the same pixels changed
    alike in every frame (the masks stay the drop's), the object's contrast with the background kept."""
    from physmaster.demo.world import recoloured, relooked
    from physmaster.physics.pattern import surface_pattern

    reached = read = 0
    for seed in range(12):
        s = drop_scene(100 + seed)
        f, mask = s.frames, s.object_masks()[0]
        r = relooked(f, seed, mask)
        assert r.shape == f.shape and r.dtype == np.float32 and 0.0 <= r.min() and r.max() <= 1.0
        assert np.array_equal(r, relooked(f, seed, mask))
        base = recoloured(f, seed)
        reached += not np.allclose(r, base, atol=1e-3)
        # the object still stands out of its background by at least half its recoloured contrast, and its
        # material's pattern still reads (the judge's prior: 296 of 300 drops, 299 recoloured)
        def contrast(x):
            return np.linalg.norm(x[0][mask].mean(0) - x[0][~mask].mean(0))
        assert contrast(r) >= max(0.1, 0.5 * contrast(base)) - 1e-6 or np.array_equal(r, base)
        read += surface_pattern(r[0], mask) == s.meta["texture"]
    assert read >= 11
    assert reached >= 10  # nearly every draw leaves the permutations' looks
    # an object the same colour as its background cannot keep half its contrast: the recoloured clip comes back
    flat = np.full((2, 8, 8, 3), 0.5, np.float32)
    box = np.zeros((8, 8), bool)
    box[2:5, 2:5] = True
    assert np.array_equal(relooked(flat, 3, box), recoloured(flat, 3))


def test_relooked_shares_reach_their_draws_only(tmp_path, capsys):
    """`--set online_later_relooked=S`: that share of each online round's start images after the first is relooked
    (and counted apart in the log); round 1 draws none at --fast (3 start images; a quarter relooked is the 4th).
    `stage_three_relooked`: Stage III's and round 1's. A share outside 0-1 is refused and names the range."""
    from physmaster.demo.pipeline import Settings, dpo_scene, online_relooked, scene_look

    assert main(["demo", "--fast", "--out", str(tmp_path), "--set", "online_later_relooked=1", "--online", "2"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "pairs from" in x]
    assert "relooked" not in lines[-2] and "online round 1 (judge) model" in lines[-1]
    assert "from 3 start images (3 relooked) x 2 candidates" in lines[-1], lines[-1]
    agreement = json.loads((tmp_path / "results.json").read_text())["judge_agreement"]  # judged apart from the others
    assert {k for k in agreement if "online round 2" in k} == {
        "online round 2 (judge) candidates (relooked start images)",
        "online round 2 (judge) candidates (relooked start images), the motion"}
    assert [online_relooked(Settings(stage_three_relooked=0.0, online_later_relooked=0.5), r)
            for r in (1, 2, 3)] == [0.0, 0.5, 0.5]
    # `stage_three_relooked`: Stage III's draw, which online round 1 draws as well
    assert main(["demo", "--fast", "--out", str(tmp_path / "3"), "--set", "stage_three_relooked=1", "--set",
                 "online_later_relooked=0", "--online", "2"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "pairs from" in x]
    assert "(3 relooked) x 2 candidates of the Stage II model" in lines[2], lines[2]
    assert "(3 relooked)" in lines[3] and "relooked" not in lines[4] and "round 1 (judge) model" in lines[4]
    assert [online_relooked(Settings(stage_three_relooked=0.25, online_later_relooked=0.5), r)
            for r in (1, 2)] == [0.25, 0.5]
    # every second one relooked, the others recoloured where the recoloured share alone would (1, 2, 3, 5, 6, 7 of
    # 8 at three quarters); the masks stay the drop's
    scenes = [dpo_scene(50 + i, i, 0.75, 0.5) for i in range(8)]
    assert [s.meta.get("relooked", 0) for s in scenes] == [0, 1] * 4
    assert [s.meta.get("recoloured", 0) for s in scenes] == [0, 1, 1, 1, 0, 1, 1, 1]
    assert all(np.array_equal(s.masks, drop_scene(50 + i).masks) for i, s in enumerate(scenes))
    # Stage III's default draw: of every 4 start images one relooked, two recoloured, one plain (24 / 48 / 24 of 96)
    st = Settings()
    scenes = [dpo_scene(50 + i, i, st.stage_three_recoloured, st.stage_three_relooked) for i in range(96)]
    looks = [scene_look(s) for s in scenes]
    assert looks[:8] == ["plain", "recoloured", "recoloured", "relooked"] * 2
    assert [looks.count(k) for k in ("relooked", "recoloured", "plain")] == [24, 48, 24]
    with pytest.raises(SystemExit, match="online_later_relooked must be between 0 \\(none\\) and 1 \\(all\\)"):
        main(["demo", "--fast", "--out", str(tmp_path / "x"), "--set", "online_later_relooked=1.5"])
    assert not (tmp_path / "x").exists()


def test_stage_one_set_gains_its_recoloured_copies():
    from physmaster.demo.pipeline import Settings, sft_videos

    vm, bb, _ = load_assets()
    st = dataclasses.replace(Settings.fast(), sft_recoloured=0)
    assert Settings().sft_recoloured == 2  # the demo's Stage I: each drop and two recoloured copies
    plain = sft_videos(vm, bb, st)
    both = sft_videos(vm, bb, dataclasses.replace(st, sft_recoloured=2))
    assert len(plain) == st.sft_scenes and len(both) == 3 * st.sft_scenes
    names = [s.name for s in both]
    assert names[:st.sft_scenes] == [s.name for s in plain] and names[st.sft_scenes].endswith("c1")
    assert len(set(names)) == len(names)
    assert torch.equal(both[0].latent, plain[0].latent)
    assert not torch.allclose(both[st.sft_scenes].latent, plain[0].latent)
    # Stage II's anchor (`lora_anchor`): the first recoloured copies, the same clips as Stage I's
    from physmaster.demo.pipeline import anchor_videos

    anchor = anchor_videos(vm, bb, st)
    assert [a.name for a in anchor] == names[st.sft_scenes:2 * st.sft_scenes]
    assert all(torch.equal(a.latent, b.latent) for a, b in zip(anchor, list(both)[st.sft_scenes:]))


def test_lora_recoloured_gives_stage_two_the_heads_draw(tmp_path, capsys):
    """`lora_recoloured`: Stage II's pairs come from the head's draw of the Stage I model (its recoloured start
    images too); off (the default), from the plain draw alone."""
    assert main(["demo", "--fast", "--out", str(tmp_path), "--set", "head_recoloured=1",
                 "--set", "lora_recoloured=1"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "pairs from" in x]
    assert len(lines) == 3, lines
    assert "(3 recoloured) x 2 candidates of the Stage I model" in lines[0]  # Stage II's
    assert "mean similarity x coherence gap" in lines[0] and "mean similarity gap" in lines[1]
    assert "(3 recoloured) x 2 candidates of the Stage I model" in lines[1]  # Stage I + DPO encoder's
    assert "(2 recoloured) x 2 candidates of the Stage II model" in lines[2]  # Stage III's: stage_three_recoloured
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["lora_recoloured"] is True
    from physmaster.demo.pipeline import Settings
    with pytest.raises(ValueError, match="head_recoloured=0 makes none; set head_recoloured above 0"):
        Settings(lora_recoloured=True, head_recoloured=0.0)


def test_dpo_start_images_recoloured_by_share():
    """The DPO stages' start scenes: seen drops, every 1/share-th recoloured (its look only: the masks, the
    material and the motion are the drop's own, so the truth still labels the candidates)."""
    from physmaster.demo.pipeline import DPO_SEED, dpo_scene
    from physmaster.demo.world import recoloured

    for share, expect in ((0.0, [0] * 8), (0.5, [0, 1] * 4), (0.25, [0, 0, 0, 1] * 2), (1.0, [1] * 8)):
        scenes = [dpo_scene(DPO_SEED + i, i, share) for i in range(8)]
        assert [s.meta.get("recoloured", 0) for s in scenes] == expect, share
        for i, s in enumerate(scenes):
            plain = drop_scene(DPO_SEED + i, "seen")
            assert np.array_equal(s.object_masks(), plain.object_masks()) and s.meta["texture"] == plain.meta["texture"]
            want = recoloured(plain.frames, (DPO_SEED + i) * 1000 + 1) if expect[i] else plain.frames
            assert np.array_equal(s.frames, want)


def test_head_recoloured_reaches_the_heads_stages_only(tmp_path, capsys):
    """`head_recoloured`: Stage I + DPO encoder samples candidates on recoloured start images; Stage II's LoRA keeps
    its pairs from the plain ones, and Stage III and the online rounds draw their own share
    (`stage_three_recoloured`)."""
    assert main(["demo", "--fast", "--out", str(tmp_path), "--set", "head_recoloured=1", "--set",
                 "stage_three_recoloured=0", "--online", "1"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "pairs from" in x]
    assert len(lines) == 4, lines
    assert "recoloured" not in lines[0] and " of the Stage I model" in lines[0]  # Stage II's
    assert "(3 recoloured) x 2 candidates of the Stage I model" in lines[1]  # Stage I + DPO encoder's
    assert "from 3 start images x 2 candidates of the Stage II model" in lines[2]  # Stage III's: none recoloured
    assert "from 3 start images x 2 candidates of the Stage II model" in lines[3] and "judge-labelled" in lines[3]
    settings = json.loads((tmp_path / "results.json").read_text())["settings"]
    assert settings["head_recoloured"] == 1.0 and settings["stage_three_recoloured"] == 0.0


def test_stage_three_recoloured_reaches_stage_three_and_the_online_rounds_only(tmp_path, capsys):
    """`stage_three_recoloured`: Stage III's draw of the Stage II model (which the judge-labelled row learns from
    too) and each online round's draw; Stage I + DPO encoder keeps `head_recoloured`'s."""
    assert main(["demo", "--fast", "--out", str(tmp_path), "--set", "head_recoloured=0.5", "--set",
                 "stage_three_recoloured=1", "--judge-labels", "--online", "1"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "pairs from" in x]
    assert len(lines) == 5, lines
    assert "(1 recoloured) x 2 candidates of the Stage I model" in lines[1]  # Stage I + DPO encoder's: a half of 3
    # Stage III's, the judge-labelled row's (the same draw), online round 1's (its own draw of the Stage II model)
    assert all("(3 recoloured) x 2 candidates of the Stage II model" in x for x in lines[2:5])
    assert "judge-labelled" in lines[3] and "judge-labelled" in lines[4]
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["stage_three_recoloured"] == 1.0


def test_lora_rounds_learn_from_the_current_models_candidates(tmp_path, capsys, monkeypatch):
    """`lora_rounds`: after Stage II's first round (the Stage I model's pairs), each later round samples fresh
    candidates of other start images from the model the round before made and trains a fresh LoRA on their pairs;
    one round (the default) is offline Stage II as before, and fewer than one is refused by name."""
    from physmaster.demo import pipeline as P

    calls = []
    real = P.sample_candidates

    def spy(vm, head, backbone, st, seed, tag, **kw):
        named = list(vm.den.module.named_parameters())
        lora_b = sum(float(p.detach().abs().sum()) for n, p in named if "lora_B" in n and "attn2" in n)
        base = sum(float(p.detach().double().sum()) for n, p in named if "lora_" not in n)
        calls.append((tag, kw.get("scene_base", P.DPO_SEED), lora_b, base))
        return real(vm, head, backbone, st, seed, tag, **kw)

    monkeypatch.setattr(P, "sample_candidates", spy)
    assert main(["demo", "--fast", "--out", str(tmp_path), "--set", "lora_rounds=3"]) == 0
    out = capsys.readouterr().out
    rounds = [(tag, base) for tag, base, *_ in calls if tag.startswith("Stage II round")]
    assert rounds == [("Stage II round 1", P.LORA_ROUND_SEED + 2000), ("Stage II round 2", P.LORA_ROUND_SEED + 3000)]
    for r in (1, 2):
        assert f"pairs from 3 start images x 2 candidates of the Stage II round {r} model" in out
    assert "[Stage II round 2] 2/2" in out and "[Stage II round 3] 2/2" in out and "[Stage II round 4]" not in out
    # each round samples from the model the round before made (its cross-attention LoRA trained, not zero), and
    # the next round folds that LoRA into the weights (the reference moves) before training a fresh one
    (_, _, b1, w1), (_, _, b2, w2) = [c for c in calls if c[0].startswith("Stage II round")]
    assert b1 > 0 and b2 > 0 and w1 != w2
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["lora_rounds"] == 3
    with pytest.raises(ValueError, match="lora_rounds=0: Stage II needs at least one round"):
        P.Settings().with_overrides(["lora_rounds=0"])


def test_head_rounds_learn_from_the_current_heads_candidates(tmp_path, capsys, monkeypatch):
    """`head_rounds`: after Stage III's first round (the Stage II model's pairs), each later round samples fresh
    candidates of other start images from the head the round before made (the DiT frozen) and trains the head on
    their pairs from there; fewer than one round is refused by name."""
    from physmaster.demo import pipeline as P

    calls = []
    real = P.sample_candidates

    def spy(vm, head, backbone, st, seed, tag, **kw):
        calls.append((tag, kw.get("scene_base", P.DPO_SEED), kw.get("recoloured", 0.0),
                      {k: v.detach().clone() for k, v in head.state_dict().items()}))
        return real(vm, head, backbone, st, seed, tag, **kw)

    monkeypatch.setattr(P, "sample_candidates", spy)
    assert main(["demo", "--fast", "--out", str(tmp_path), "--set", "head_rounds=3"]) == 0
    out = capsys.readouterr().out
    rounds = [c for c in calls if c[0].startswith("Stage III round")]
    assert [(tag, base) for tag, base, *_ in rounds] == [("Stage III round 1", P.HEAD_ROUND_SEED + 2000),
                                                         ("Stage III round 2", P.HEAD_ROUND_SEED + 3000)]
    assert all(r[2] == P.Settings.fast().stage_three_recoloured for r in rounds)  # drawn as round 1's
    for r in (1, 2):
        assert f"x 2 candidates of the Stage III round {r} model" in out
    assert "[Stage III round 2] 2/2" in out and "[Stage III round 3] 2/2" in out and "[Stage III round 4]" not in out
    # each round samples from the head the round before trained: Stage II's head, then two other heads
    (stage_two,) = [c[3] for c in calls if c[0] == "Stage II"]
    h1, h2 = rounds[0][3], rounds[1][3]
    assert any(not torch.equal(stage_two[k], h1[k]) for k in h1)
    assert any(not torch.equal(h1[k], h2[k]) for k in h1)
    assert json.loads((tmp_path / "results.json").read_text())["settings"]["head_rounds"] == 3
    with pytest.raises(ValueError, match="head_rounds=0: Stage III needs at least one round"):
        P.Settings().with_overrides(["head_rounds=0"])


def test_geometry_targets_and_backbone_shapes():
    s = drop_scene(5)
    t = geometry_targets(s)
    assert t.shape == (len(TARGETS),) and np.all(np.isfinite(t))
    assert t[TARGETS.index("restitution")] == pytest.approx(s.meta["restitution"])
    net = GeometryBackbone()
    img = torch.from_numpy(np.stack([s.frames[0], drop_scene(6).frames[0]]))
    h = net(img)
    assert h.shape == (2, 17, 64) and not h.requires_grad
    assert net.predict(img).shape == (2, len(TARGETS))


def test_head_input_gives_the_head_the_hidden_states_the_summary_or_the_geometry():
    """`Settings.head_reads`: the backbone itself, its summary token alone, or its geometry read-out as one token
    padded to the width; anything else is refused by name."""
    from physmaster.demo.backbone import HeadInput, head_input

    net = GeometryBackbone()
    img = torch.from_numpy(np.stack([drop_scene(5).frames[0], drop_scene(6).frames[0]]))
    hidden = net(img)
    assert head_input(net, "hidden") is net
    summary = head_input(net, "summary")(img)
    assert summary.shape == (2, 1, 64) and torch.equal(summary, hidden[:, :1])
    geometry = head_input(net, "geometry")(img)
    assert geometry.shape == (2, 1, 64) and not geometry.requires_grad
    assert torch.equal(geometry[:, 0, :len(TARGETS)], net.predict(img))
    assert not geometry[:, 0, len(TARGETS):].any()
    with pytest.raises(ValueError, match="head_reads must be one of hidden, summary, geometry, got 'pixels'"):
        HeadInput(net, "pixels")


def test_coherence_counts_whole_objects_only():
    gt = np.zeros((4, 32, 32), bool)
    gt[:, 10:16, 10:16] = True  # area 36
    one = gt.copy()
    frag = gt.copy()
    frag[:, 25:29, 25:29] = True  # a second fragment of 16 px: the largest holds 36 / 52 < 90%
    big = np.zeros_like(gt)
    big[:, 5:20, 5:20] = True  # 225 px > 2 x 36
    assert coherence({"foreground": one}, one, gt) == 1.0
    assert coherence({"foreground": frag}, gt, gt) == 0.0
    assert coherence({"foreground": big}, big, gt) == 0.0
    mixed = {"foreground": np.concatenate([one[:2], frag[2:]])}
    assert coherence(mixed, gt, gt) == 0.5


def test_material_read_finds_the_material_a_video_bounces_with():
    """A drop rendered with its own material is read as it; rendered with another material's restitution, as
    that one; drops whose materials do not differ within the clip are not counted."""
    scenes = [drop_scene(900_000 + i) for i in range(12)]
    counted = [s for s in scenes if material_renderings(s) is not None]
    assert counted
    s = counted[0]
    masks, own = material_renderings(s)
    assert set(masks) == {r for _, r in MATERIALS.values()} and own == material_restitution(s.meta["texture"])
    other = next(r for r in masks if r != own)
    wrong = drop_scene(s.meta["seed"], s.meta["split"], restitution=other).frames
    assert material_read([s.frames, wrong], [s], 2) == (1, 2)
    assert material_read([x.frames for x in scenes], scenes, 1) == (len(counted), len(counted))


def test_rendering_l2_segments_once_and_scores_as_score_video(monkeypatch):
    """`rendering_l2` gives each rendering the L2 `score_video` gives it, segmenting the video once per distinct
    first mask: once for a drop's three materials (they share the start), twice with another drop's masks."""
    import physmaster.demo.evaluation as evaluation

    scenes = [drop_scene(900_000 + i) for i in range(12)]
    s = next(x for x in scenes if material_renderings(x) is not None)
    masks, _ = material_renderings(s)
    video = drop_scene(s.meta["seed"], s.meta["split"], restitution=max(masks)).frames * 0.9 + 0.05
    other = next(x for x in scenes if not np.array_equal(x.object_masks()[0], masks[max(masks)][0]))
    calls = []
    real = evaluation.segment_object
    monkeypatch.setattr(evaluation, "segment_object", lambda *a, **k: calls.append(1) or real(*a, **k))
    got = evaluation.rendering_l2(video, masks)
    assert len(calls) == 1
    got_mixed = evaluation.rendering_l2(video, {**masks, "other": other.object_masks()})
    assert len(calls) == 3
    monkeypatch.undo()
    assert got == {r: score_video(video, mk)["l2"] for r, mk in masks.items()}
    assert got_mixed["other"] == score_video(video, other.object_masks())["l2"] != got[max(masks)]
    assert len(set(got.values())) > 1  # the renderings differ, and so do their L2s


def test_material_confusion_and_the_material_blind_floor():
    """A video bounced with another material's restitution lands in that material's column, and its gap is the
    L2 between the two renderings; a model perfect but for the material scores that L2, and 0 with the own one."""
    scenes = [drop_scene(900_000 + i) for i in range(12)]
    s = next(x for x in scenes if material_renderings(x) is not None)
    masks, own = material_renderings(s)
    other = max((r for r in masks if r != own), key=lambda r: abs(r - own))
    wrong = drop_scene(s.meta["seed"], s.meta["split"], restitution=other)
    out = material_confusion([s.frames, wrong.frames], [s], 2)
    order = out["order"]
    assert order == tuple(sorted(r for _, r in MATERIALS.values()))
    expected = np.zeros((3, 3), dtype=np.int64)
    expected[order.index(own), order.index(own)] = 1
    expected[order.index(own), order.index(other)] = 1
    assert (out["counts"] == expected).all()
    blind = material_blind_l2([s], other)
    assert blind.shape == (1,) and blind[0] > 0.01
    assert out["gap"] == pytest.approx([blind[0] / 2])  # one of the scene's two videos misread
    assert material_blind_l2([s], own).tolist() == [0.0]
    truth = material_confusion([x.frames for x in scenes], scenes, 1)
    assert np.trace(truth["counts"]) == truth["counts"].sum() > 0 and not truth["gap"].any()


def test_ground_truth_video_scores_as_perfect():
    s = drop_scene(11)
    r = score_video(s.frames, s.object_masks())
    assert r["coherence"] == 1.0 and r["l2"] < 0.01 and r["iou"] > 0.8


def test_assets_roundtrip_and_refuse_other_models(tmp_path):
    from physmaster.demo.generator import new_dit
    from physmaster.errors import CheckpointError

    path = save_assets(tmp_path / "a.safetensors", FrameAutoencoder(), GeometryBackbone(), new_dit(0),
                       {"ae": {"steps": 1}, "backbone": {"steps": 1}, "dit": {"steps": 1}})
    vm, bb, info = load_assets(path)
    assert info["ae"]["steps"] == 1 and not any(p.requires_grad for p in vm.den.model.parameters())
    with pytest.raises(CheckpointError, match="--make-base"):
        load_assets(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(CheckpointError, match="not a readable demo asset"):
        load_assets(tmp_path / "bad.safetensors")


def test_shipped_assets_record_how_they_were_made():
    _, _, info = load_assets(ASSET_FILE)
    for part in ("ae", "backbone", "dit"):
        assert info[part]["command"].startswith("python -m physmaster demo --make-base")
        for key in ("seed", "steps", "seconds", "final_loss"):
            assert key in info[part]
    assert ASSET_FILE.stat().st_size < 20e6


def test_shipped_backbone_reads_the_material_the_latent_keeps_only_in_part():
    """The physical tokens can only add what the backbone reads: the material (the bounce), which the video
    model's first-frame latent keeps in about 64% of seen and 41% of unseen start images. The backbone without
    the pooled pattern branch read it in 50-60% of these (seen and unseen); the shipped one must read it well on both
    splits (87 / 97% seen, 83 / 70% unseen on eval seeds 0 / 1)."""
    from physmaster.demo.cli import held_out

    _, backbone, _ = load_assets(ASSET_FILE)
    right = {"seen": [], "unseen": []}
    for eval_seed in (0, 1):
        scenes = held_out(30, eval_seed)
        read = backbone.read_restitution(torch.from_numpy(np.stack([s.frames[0] for s in scenes]))).tolist()
        for s, r in zip(scenes, read):
            right[s.meta["split"]].append(r == pytest.approx(s.meta["restitution"]))
    assert np.mean(right["seen"]) >= 0.8 and np.mean(right["unseen"]) >= 0.7, \
        {k: float(np.mean(v)) for k, v in right.items()}


def test_held_out_scenes_are_disjoint_from_training_and_candidates():
    from physmaster.demo.assets import ASSET_SEEDS
    from physmaster.demo.cli import held_out_base
    from physmaster.demo.pipeline import DPO_SEED, SFT_SEED, Settings

    st = Settings()
    drawn = max(st.dpo_scenes, st.head_scenes)  # Stage I's candidates serve Stage II and the head
    train = set(range(SFT_SEED, SFT_SEED + st.sft_scenes)) | set(range(DPO_SEED, DPO_SEED + drawn))
    assert held_out_base(0) == 900_000  # the default set is the one earlier versions used
    for eval_seed in (0, 1, 7, 10, 123, 10**6):
        held = set(range(held_out_base(eval_seed), held_out_base(eval_seed) + 1000))
        assert not train & held and all(not 0 <= h - a < 10_000 for h in held for a in ASSET_SEEDS)
    assert st.candidates >= 2 and st.eval_videos >= 1


def test_seeds_run_in_turn_and_report_mean_and_sd(tmp_path, capsys):
    rc = main(["demo", "--fast", "--out", str(tmp_path), "--seed", "3", "--seeds", "2", "--eval-seed", "2"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "=== training seed 3 (1/2)" in out and "=== training seed 4 (2/2)" in out
    assert "across 2 training seeds" in out and " ± " in out
    res = json.loads((tmp_path / "results.json").read_text())
    assert [r["seed"] for r in res["runs"]] == [3, 4] and res["eval_seed"] == 2
    assert "across 2 training seeds" in (tmp_path / "table.txt").read_text()


def test_sampling_is_guided_by_the_frozen_base_model(tmp_path):
    """v = v_base + w (v_model - v_base): the base row samples as the base, a changed model's change is scaled
    by w, and the guide stays the pretrained base whatever training does to `den`."""
    from physmaster.demo.generator import new_dit

    path = save_assets(tmp_path / "a.safetensors", FrameAutoencoder(), GeometryBackbone(), new_dit(0),
                       {"ae": {"steps": 1}, "backbone": {"steps": 1}, "dit": {"steps": 1}})
    vm, bb, _ = load_assets(path)
    assert vm.guide is not None and vm.guide.model is not vm.den.model
    cond = vm.conditioning(np.stack([drop_scene(s).frames[0] for s in (1, 2)]), bb)
    plain = vm.sample(None, cond, [5, 6], steps=1)
    vm.guidance = 3.0
    assert torch.equal(vm.sample(None, cond, [5, 6], steps=1), plain)  # base row: the guide is the model
    with torch.no_grad():
        for p in vm.den.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    noise = torch.stack([torch.randn(plain.shape[1:], generator=torch.Generator().manual_seed(n)) for n in (5, 6)])
    t = torch.ones(2)
    v_model = vm.den.predict_velocity(noise, t, cond).float()
    v_base = vm.guide.predict_velocity(noise, t, cond).float()
    guided = vm.sample(None, cond, [5, 6], steps=1)
    assert torch.allclose(guided, noise - (v_base + 3.0 * (v_model - v_base)), atol=1e-5)
    assert not torch.allclose(guided, noise - v_model, atol=1e-3)
    vm.guidance = 1.0
    assert torch.allclose(vm.sample(None, cond, [5, 6], steps=1), noise - v_model, atol=1e-6)


def test_token_guidance_is_classifier_free_guidance_against_zeroed_tokens(tmp_path):
    """v = v(tokens zeroed) + w (v(tokens) - v(tokens zeroed)): w = 1 is the unguided sampler bit for bit, the
    tokens' change is scaled w-fold, and "tokens zeroed" (token_scale 0, the token-influence figure) samples as
    the zeroed model whatever w is."""
    from physmaster.demo.generator import new_dit
    from physmaster.demo.pipeline import Settings, new_head

    path = save_assets(tmp_path / "a.safetensors", FrameAutoencoder(), GeometryBackbone(), new_dit(0),
                       {"ae": {"steps": 1}, "backbone": {"steps": 1}, "dit": {"steps": 1}})
    vm, bb, _ = load_assets(path)
    head = new_head(dataclasses.replace(Settings(), head_gain=4.0), seed=3).head
    cond = vm.conditioning(np.stack([drop_scene(s).frames[0] for s in (1, 2)]), bb)
    plain = vm.sample(head, cond, [5, 6], steps=1)
    zeroed = vm.sample(head, cond, [5, 6], steps=1, token_scale=0.0)
    noise = torch.stack([torch.randn(plain.shape[1:], generator=torch.Generator().manual_seed(n)) for n in (5, 6)])
    t = torch.ones(2)
    with torch.no_grad():
        tokens = head(cond.features)
        v_tok = vm.den.predict_velocity(noise, t, cond.with_tokens(tokens)).float()
        v_zero = vm.den.predict_velocity(noise, t, cond.with_tokens(torch.zeros_like(tokens))).float()
    assert torch.allclose(plain, noise - v_tok, atol=1e-6) and torch.allclose(zeroed, noise - v_zero, atol=1e-6)
    assert (v_tok - v_zero).abs().max() > 1e-3  # the tokens move this DiT
    vm.token_guidance = 2.5
    guided = vm.sample(head, cond, [5, 6], steps=1)
    assert torch.allclose(guided, noise - (v_zero + 2.5 * (v_tok - v_zero)), atol=1e-5)
    assert not torch.allclose(guided, plain, atol=1e-3)
    assert torch.allclose(vm.sample(head, cond, [5, 6], steps=1, token_scale=0.0), zeroed, atol=1e-6)
    assert torch.equal(vm.sample(None, cond, [5, 6], steps=1), vm.sample(None, cond, [5, 6], steps=1))  # no head
    vm.token_guidance = 1.0
    assert torch.equal(vm.sample(head, cond, [5, 6], steps=1), plain)


def test_token_guidance_flag_is_recorded_and_checked(tmp_path, capsys):
    assert main(["demo", "--fast", "--out", str(tmp_path), "--token-guidance", "2.5"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["settings"]["token_guidance"] == 2.5
    from physmaster.demo.pipeline import Settings
    assert Settings().token_guidance == 1.0  # off by default: the default run is the one the README quotes
    for bad in ("0.5", "nan", "11"):
        with pytest.raises(SystemExit):
            main(["demo", "--fast", "--out", str(tmp_path), "--token-guidance", bad])
        assert f"--token-guidance: must be between 1 (off) and 10, got {float(bad)}" in capsys.readouterr().err


def test_guidance_flag_is_recorded_and_checked(tmp_path, capsys):
    assert main(["demo", "--fast", "--out", str(tmp_path), "--guidance", "2"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["settings"]["guidance"] == 2.0
    from physmaster.demo.pipeline import Settings
    assert Settings().guidance == 1.0  # off by default: the default run is the one the README quotes
    with pytest.raises(SystemExit):
        main(["demo", "--fast", "--out", str(tmp_path), "--guidance", "0.5"])
    assert "must be between 1 (off) and 10, got 0.5" in capsys.readouterr().err


def test_token_influence_on_the_first_videos_of_each_drop(tmp_path, capsys):
    from physmaster.demo.cli import videos_per_scene

    assert videos_per_scene(3, 4, 2) == [0, 1, 4, 5, 8, 9]
    assert videos_per_scene(2, 2, 9) == [0, 1, 2, 3] and videos_per_scene(2, 3, 0) == [0, 3]
    assert main(["demo", "--fast", "--out", str(tmp_path), "--scenes", "2", "--eval-videos", "3",
                 "--set", "influence_videos=1"]) == 0
    out = capsys.readouterr().out
    assert out.count("(tokens zeroed, 1 of 3 videos a drop)") == 2
    assert ("token influence (held-out avg L2 with the physical tokens zeroed minus with them, on the first video "
            "of each drop)") in out
    res = json.loads((tmp_path / "results.json").read_text())
    for name, v in res["runs"][0]["token_influence"].items():
        assert v["videos_per_scene"] == 1 and len(v["per_scene_l2"]) == len(v["per_scene_l2_zeroed"]) == 4
        assert v["influence"] == pytest.approx(np.mean(v["per_scene_l2_zeroed"]) - np.mean(v["per_scene_l2"]))
        assert v["material_videos"] <= 4  # one video a drop read, with and without the tokens
    with pytest.raises(SystemExit, match="influence_videos must be between 1 and 64"):
        main(["demo", "--fast", "--out", str(tmp_path), "--set", "influence_videos=0"])


def test_eval_videos_and_scenes_set_the_held_out_set(tmp_path, capsys):
    assert main(["demo", "--fast", "--out", str(tmp_path), "--scenes", "3", "--eval-videos", "2"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["settings"]["eval_videos"] == 2 and res["settings"]["eval_scenes"] == 3
    assert all(len(r["per_scene"]["l2"]) == 6 for r in res["runs"][0]["rows"].values())  # 3 seen + 3 unseen
    assert "3 seen + 3 unseen held-out drops (eval seed 0), 2 videos each" in capsys.readouterr().out
    for name, v in res["runs"][0]["token_influence"].items():  # both videos (influence_videos 2): the row's own
        assert v["videos_per_scene"] == 2 and v["per_scene_l2"] == res["runs"][0]["rows"][name]["per_scene"]["l2"]
    from physmaster.demo.pipeline import Settings
    assert (Settings().eval_scenes, Settings().eval_videos) == (100, 4)  # the README's runs
    with pytest.raises(SystemExit, match="--eval-videos must be between 1 and 64, got 0"):
        main(["demo", "--fast", "--out", str(tmp_path), "--eval-videos", "0"])
    with pytest.raises(SystemExit, match="--scenes must be between 1 and 1000, got 1001"):
        main(["demo", "--fast", "--out", str(tmp_path), "--scenes", "1001"])


def test_set_changes_a_setting_and_refuses_bad_items(tmp_path):
    """`--set NAME=VALUE` (the benches' override, now the demo's too) reaches the run and results.json; a bad
    item is refused before anything trains, with an error that names it."""
    assert main(["demo", "--fast", "--out", str(tmp_path), "--set", "lr_lora=3e-4", "--set", "dpo_steps=3",
                 "--set", "head_t_min=0.5", "--set", "head_reads=geometry"]) == 0
    settings = json.loads((tmp_path / "results.json").read_text())["settings"]
    assert (settings["lr_lora"], settings["dpo_steps"], settings["sft_steps"]) == (3e-4, 3, 2)  # 2: --fast's
    assert settings["head_reads"] == "geometry"
    from physmaster.encoder import load_encoder

    stages = load_encoder(tmp_path / "demo_encoder.safetensors").provenance["stages"]
    ranges = {s["stage"]: s.get("t_range") for s in stages}  # head_t_min: the head's stages only
    assert ranges == {"sft": None, "dpo-lora": None, "dpo-head": [0.5, 1.0]}, ranges
    for item, message in (("nope=1", "--set 'nope=1': use NAME=VALUE with NAME one of"),
                          ("dpo_steps=2.5", "--set 'dpo_steps=2.5': '2.5' is not an integer"),
                          ("eval_scenes=1001", "--set: eval_scenes must be between 1 and 1000, got 1001"),
                          ("guidance=0.5", r"--set: guidance must be between 1 \(off\) and 10, got 0.5"),
                          ("token_guidance=0", r"--set: token_guidance must be between 1 \(off\) and 10, got 0.0"),
                          ("head_t_min=1", "--set: head_t_min must be between 0 and 0.99, got 1.0"),
                          ("head_soup=0", r"--set: head_soup must be between 1 \(one run\) and 16, got 0"),
                          ("head_pairs_per_image=0", "--set: head_pairs_per_image must be between 1 and 64, got 0"),
                          ("head_scenes=0", "--set: head_scenes must be between 1 and 4096, got 0"),
                          ("head_bag=17", r"--set: head_bag must be between 1 \(one run\) and 16, got 17"),
                          ("sft_recoloured=8", r"--set: sft_recoloured must be between 0 \(none\) and 7, got 8"),
                          ("head_recoloured=1.5",
                           r"--set: head_recoloured must be between 0 \(none\) and 1 \(all\), got 1.5"),
                          ("head_reads=pixels",
                           "--set: head_reads must be one of hidden, summary, geometry, got 'pixels'"),
                          ("lr_head=-1", "--set: settings must be finite numbers >= 0, got lr_head=-1.0"),
                          ("beta=nan", "--set: settings must be finite numbers >= 0, got beta=nan")):
        with pytest.raises(SystemExit, match=message):
            main(["demo", "--fast", "--out", str(tmp_path / "bad"), "--set", item])
    assert not (tmp_path / "bad").exists()  # a refused run makes no folder
    with pytest.raises(SystemExit, match="--set changes the demo's run; --make-base does not read it"):
        main(["demo", "--make-base", "--fast", "--assets", str(tmp_path / "w.safetensors"), "--set", "beta=1"])
    assert not (tmp_path / "w.safetensors").exists()


def test_out_is_checked_before_training_and_made_only_at_the_end(tmp_path, monkeypatch):
    """`--out` that is a file, or that lies under a file, is refused before the assets load; a run that fails
    midway leaves no folder and no half-written table behind."""
    import physmaster.demo.cli as demo_cli

    (tmp_path / "f").write_text("mine")
    for out, message in ((tmp_path / "f", "is a file, not a folder"),
                         (tmp_path / "f" / "run", f"{tmp_path / 'f'} is a file, so the folder cannot be made there")):
        with pytest.raises(SystemExit, match=re.escape(f"--out {out}: {message}")):
            main(["demo", "--fast", "--out", str(out)])
    assert (tmp_path / "f").read_text() == "mine"

    def broken(*a, **k):
        raise RuntimeError("stopped midway")

    monkeypatch.setattr(demo_cli, "run_once", broken)
    with pytest.raises(RuntimeError, match="stopped midway"):
        main(["demo", "--fast", "--out", str(tmp_path / "new" / "run")])
    assert not (tmp_path / "new").exists()


def test_bad_motion_weight_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="--motion-weight must be a number >= 0"):
        main(["demo", "--fast", "--out", str(tmp_path), "--motion-weight", "-1"])


@pytest.mark.parametrize("item, message", [
    ("head_modules=blocks,qeuries",
     r"head_modules='blocks,qeuries': qeuries is in none of the head's parameter names "
     r"\(layer_logits, queries, gain, "),
    ("lora_modules=attn2,atn1",
     r"lora_modules='attn2,atn1': atn1 is in none of the DiT's LoRA layer names \(e\.g\. blocks\.0\.attn1\.to_q"),
])
def test_unknown_module_names_are_refused_before_anything_trains(tmp_path, item, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit, match=message):
        main(["demo", "--fast", "--out", str(out), "--set", item])
    assert not out.exists()


def test_material_read_skips_drops_whose_materials_look_alike(monkeypatch):
    """A drop whose three restitutions render the same clip (no impact within it) says nothing about the
    material: it is left out of the count, not scored as right or wrong."""
    import physmaster.demo.world as world

    s = drop_scene(900_001)
    monkeypatch.setattr(world, "render", lambda *a, **k: s)  # every restitution renders this very clip
    assert world.material_renderings(s) is None
    assert material_read([s.frames], [s], 1) == (0, 0)
    assert material_confusion([s.frames], [s], 1)["gap"].tolist() == [0.0]
    assert material_blind_l2([s], 0.85).tolist() == [0.0]


def test_prompt_override_and_pretraining_on_from_a_model(tmp_path):
    """`VideoModel.prompt` replaces the constant prompt in every conditioning; `pretrain_dit(den=...)` trains that
    model on in place (bench/demo_caption_base.py's caption phase) instead of a fresh one."""
    from physmaster.demo.generator import new_dit, pretrain_dit, prompt_context

    path = save_assets(tmp_path / "a.safetensors", FrameAutoencoder(), GeometryBackbone(), new_dit(0),
                       {"ae": {"steps": 1}, "backbone": {"steps": 1}, "dit": {"steps": 1}})
    vm, bb, _ = load_assets(path)
    images = np.stack([drop_scene(s).frames[0] for s in (1, 2)])
    assert torch.equal(vm.conditioning(images, bb).context, prompt_context().expand(2, -1, -1))
    vm.prompt = torch.full((1, 4, 32), 0.5)
    cond = vm.conditioning(images, bb)
    assert cond.context.shape == (2, 4, 32) and bool((cond.context == 0.5).all())
    lat = vm.encode([drop_scene(s).frames for s in (1, 2)])
    before = {k: v.clone() for k, v in vm.den.model.state_dict().items()}
    den, info = pretrain_dit(lat, cond, steps=2, batch=2, log=None, den=vm.den)
    assert den is vm.den and info["steps"] == 2 and np.isfinite(info["final_loss"])
    assert any(not torch.equal(before[k], v) for k, v in den.model.state_dict().items())


def test_new_dit_overrides_and_pretraining_with_an_ema_of_the_weights():
    """`new_dit(**overrides)` builds the demo's DiT with fields of its config changed (a deeper base) and refuses a
    field it does not have; `pretrain_dit(ema_decay=d)` returns the moving average of the trained weights: after one
    step, min(d, 2/11) of the initial weights and the rest of the trained ones, exactly."""
    from physmaster.demo.generator import MODEL, new_dit, pretrain_dit, pretraining_condition

    deep = new_dit(0, num_layers=2)
    assert len(deep.model.blocks) == 2 and len(new_dit(0).model.blocks) == MODEL["num_layers"]
    with pytest.raises(ValueError, match=r"\['depth'\] are not fields of the demo's DiT config; use some of"):
        new_dit(0, depth=8)
    g = torch.Generator().manual_seed(0)
    lat = torch.randn(2, MODEL["latent_channels"], FRAMES, SIZE // 4, SIZE // 4, generator=g)
    cond = pretraining_condition(lat)
    init = {k: v.clone() for k, v in new_dit(0, num_layers=1).model.state_dict().items()}
    raw, info = pretrain_dit(lat, cond, steps=1, batch=2, log=None, den=new_dit(0, num_layers=1))
    assert "ema_decay" not in info
    avg, info = pretrain_dit(lat, cond, steps=1, batch=2, log=None, den=new_dit(0, num_layers=1), ema_decay=0.9)
    assert info["ema_decay"] == 0.9
    trained = raw.model.state_dict()
    changed = [k for k in init if not torch.equal(init[k], trained[k])]
    assert changed
    d = 2 / 11
    for k, v in avg.model.state_dict().items():
        assert torch.allclose(v, d * init[k] + (1 - d) * trained[k], atol=1e-6), k
    assert not any(p.requires_grad for p in avg.model.parameters())
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\), got 1.0"):
        pretrain_dit(lat, cond, steps=1, batch=2, log=None, ema_decay=1.0)


def test_base_scale_bench_runs_both_bases_side_by_side(tmp_path, capsys):
    """bench/demo_base_scale.py at smoke size: pretrains the other base (cached, then read), trains Stage I on it and
    on the shipped base, and writes avg L2 and coherence by split and by unseen background for both."""
    import json

    mod = bench_module("demo_base_scale")
    tiny = ["--set", "sft_steps=2", "--set", "sft_scenes=4", "--set", "eval_scenes=3", "--set", "sample_steps=2",
            "--set", "batch=2", "--eval-seeds", "3", "--cache", str(tmp_path / "c")]
    out = tmp_path / "f.json"
    assert mod.main(["--layers", "1", "--steps", "2", "--videos", "4", "--out", str(out)] + tiny) == 0
    figures = json.loads(out.read_text())
    assert set(figures) == {"args", "shipped base", "1-block base", "seconds"}
    for label in ("shipped base", "1-block base"):
        assert set(figures[label]) == {"base, eval seed 3", "Stage I, eval seed 3"}
        r = figures[label]["Stage I, eval seed 3"]
        assert 0.0 <= r["coherence seen"] <= 1.0 and r["l2"] == pytest.approx((r["l2 seen"] + r["l2 unseen"]) / 2)
    assert (tmp_path / "c" / "base_layers1_steps2_v4_ema0.999_s7.safetensors").is_file()
    assert "1-block base read from" not in capsys.readouterr().out
    assert mod.main(["--layers", "1", "--steps", "2", "--videos", "4"] + tiny) == 0
    assert "1-block base read from" in capsys.readouterr().out
    assert mod.main(["--layers", "1", "--steps", "2", "--videos", "4", "--pretrain-seed", "8"] + tiny) == 0
    assert "1-block base read from" not in capsys.readouterr().out  # another seed: another base, not the cache
    assert (tmp_path / "c" / "base_layers1_steps2_v4_ema0.999_s8.safetensors").is_file()
    with pytest.raises(SystemExit, match=r"--ema must be in \[0, 1\), got 1.0"):
        mod.main(["--continue-steps", "2", "--ema", "1"] + tiny)
    with pytest.raises(SystemExit):  # one of --layers / --continue-steps
        mod.main(tiny)


def test_candidate_files_for_the_judge_bench(tmp_path, capsys):
    """bench/demo_candidates.py writes the Stage I and Stage II models' candidates in the format bench_judge.py
    --candidates reads (uint8 videos and true drops, ground-truth L2, scene seeds), and bench_judge reads them."""
    mod = bench_module("demo_candidates")
    tiny = [f"--set={x}" for x in ("sft_scenes=4", "sft_steps=2", "dpo_scenes=3", "head_scenes=3", "candidates=2",
                                    "pairs_per_image=1", "min_margin=0", "dpo_steps=2", "sample_steps=2", "batch=2",
                                    "dpo_batch=2")]
    assert mod.main(["--seed", "1", "--out", str(tmp_path)] + tiny) == 0
    for stage in (1, 2):
        with np.load(tmp_path / f"stage{stage}_candidates.npz") as d:
            assert d["videos"].dtype == np.uint8 and d["videos"].shape == (3, 2, FRAMES, SIZE, SIZE, 3)
            assert d["gt_frames"].dtype == np.uint8 and d["gt_frames"].shape == (3, FRAMES, SIZE, SIZE, 3)
            assert d["l2"].shape == (3, 2) and np.isfinite(d["l2"]).all() and (d["l2"] >= 0).all()
            assert len(set(d["seeds"].tolist())) == 3
            truth = (np.clip(drop_scene(int(d["seeds"][0])).frames, 0, 1) * 255 + 0.5).astype(np.uint8)
            np.testing.assert_array_equal(d["gt_frames"][0], truth)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stage1_candidates.npz", "stage2_candidates.npz"]
    judge_bench = bench_module("bench_judge")
    assert judge_bench.candidates(type("A", (), {"candidates": str(tmp_path / "stage2_candidates.npz"),
                                                 "fps": 6.0, "min_gap": 0.0})()) == 0
    assert "agreement" in capsys.readouterr().out


def test_token_guidance_bench(tmp_path, capsys):
    """bench/demo_token_guidance.py: the truth's and the reconstructions' coherence, then a row per guidance weight,
    each against the first with its interval, misses by split and coherence by background, in print and JSON."""
    mod = bench_module("demo_token_guidance")
    tiny = [f"--set={x}" for x in ("sft_scenes=4", "sft_steps=2", "eval_scenes=3", "batch=2", "sample_steps=2")]
    out = tmp_path / "tg.json"
    assert mod.main(["--seed", "1", "--weights", "1,2.5", "--json", str(out)] + tiny) == 0
    printed = capsys.readouterr().out
    assert "token guidance 1:" in printed and "token guidance 2.5:" in printed and "coherence by background" in printed
    res = json.loads(out.read_text())
    assert [r["weight"] for r in res["rows"]] == [1.0, 2.5]
    assert res["rows"][0]["interval"] == [0.0, 0.0] and len(res["rows"][1]["per_scene_l2"]) == 6
    assert res["truth"]["coherence"] > 0.6 and set(res["truth"]["splits"]) == {"seen", "unseen"}
    for row in [res["truth"], res["reconstructed"]] + res["rows"]:
        for part in row["splits"].values():  # coherence and its misses share out the frames
            assert abs(part["coherence"] + sum(part[m] for m in ("lost", "fragments", "too_small", "too_large"))
                       - 1) < 1e-9
    with pytest.raises(SystemExit, match="--weights"):
        mod.main(["--weights", "0.5"] + tiny)


def test_wrong_physics_drop_base_world():
    """bench/demo_drop_base.py's base world: drops of both splits from rest, at half the nominal gravity and one
    restitution for every material, deterministic by seed, and slower than the demo's true drop of the same seed."""
    from physmaster.demo.world import NOMINAL_GRAVITY

    mod = bench_module("demo_drop_base")
    scenes = [mod.base_scene(1_000_000 + i) for i in range(24)]
    assert {s.meta["split"] for s in scenes} == {"seen", "unseen"}
    assert {s.meta["texture"] for s in scenes} == set(MATERIALS)
    for s in scenes:
        assert s.meta["gravity"] == pytest.approx(NOMINAL_GRAVITY * SIZE * 0.5)
        assert s.meta["restitution"] == 0.55 and tuple(s.meta["initial_velocity"]) == (0.0, 0.0)
        assert s.frames.shape == (FRAMES, SIZE, SIZE, 3)
    again = mod.base_scene(1_000_003)
    assert np.array_equal(again.frames, scenes[3].frames)
    # the same layout as the true drop, falling slower: by the third frame the true drop is lower
    s = scenes[0]
    true = drop_scene(s.meta["seed"], s.meta["split"])
    assert true.meta["initial_position"] == s.meta["initial_position"]
    assert true.trajectories[2, 0, 1] > s.trajectories[2, 0, 1] + 0.5


def test_make_assets_fast_writes_a_loadable_file_with_its_records(tmp_path):
    """`--make-base`'s path end to end at 2 steps a part: the file loads, records command, seed, steps, wall time
    and final loss per part, and the base DiT is pretrained on the constant prompt and each video's first frame."""
    from physmaster.demo.assets import make_assets
    from physmaster.demo.generator import pretraining_condition, prompt_context

    path = make_assets(tmp_path / "w.safetensors", seed=3, fast=True, log=lambda m: None)
    vm, bb, info = load_assets(path)
    assert info["seed"] == 3 and info["command"] == "python -m physmaster demo --make-base --seed 3"
    for part in ("ae", "backbone", "dit"):
        assert info[part]["steps"] == 2 and info[part]["seed"] == 3 and info[part]["seconds"] > 0
        assert np.isfinite(info[part]["final_loss"])
    lat = vm.encode([drop_scene(s).frames for s in (1, 2)])
    cond = pretraining_condition(lat)
    assert torch.equal(cond.context, prompt_context().expand(2, -1, -1)) and cond.features is None
    assert cond.image_cond.shape[0] == 2 and cond.image_cond.shape[2] == FRAMES
    assert torch.equal(pretraining_condition(lat, torch.ones(2, 4, 32)).context, torch.ones(2, 4, 32))


def test_rebase_pretrains_once_then_reads_the_cache(tmp_path):
    """`generator.rebase` (the base benches): the first call pretrains and saves, the guide follows the new base;
    the next reads the file and never calls `pretrain`."""
    from physmaster.demo.generator import new_dit, pretrain_dit, pretraining_condition, rebase

    path = save_assets(tmp_path / "a.safetensors", FrameAutoencoder(), GeometryBackbone(), new_dit(0),
                       {"ae": {"steps": 1}, "backbone": {"steps": 1}, "dit": {"steps": 1}})
    vm, _, _ = load_assets(path)
    lat = vm.encode([drop_scene(s).frames for s in (1, 2)])
    calls = []

    def pretrain(vm_):
        calls.append(1)
        return pretrain_dit(lat, pretraining_condition(lat), steps=2, batch=2, seed=5, log=None)

    cache = tmp_path / "c" / "base.safetensors"
    rebase(vm, cache, pretrain, "test base")
    trained = {k: v.clone() for k, v in vm.den.model.state_dict().items()}
    assert calls == [1] and cache.is_file() and list(cache.parent.iterdir()) == [cache]  # no temp file left
    assert all(torch.equal(trained[k], v) for k, v in vm.guide.model.state_dict().items())
    vm2, _, _ = load_assets(path)
    assert not all(torch.equal(trained[k], v) for k, v in vm2.den.model.state_dict().items())
    rebase(vm2, cache, pretrain, "test base")
    assert calls == [1]
    assert all(torch.equal(trained[k], v) for k, v in vm2.den.model.state_dict().items())
    assert all(torch.equal(trained[k], v) for k, v in vm2.guide.model.state_dict().items())


def test_flipped_pairs_swap_labels_at_random_and_keep_every_pair():
    """The placebo of bench/demo_placebo.py: the same pairs, about half of them with winner and loser swapped,
    the same swaps for the same seed; 0 and 1 swap none and all; a fraction outside [0, 1] is refused."""
    from physmaster.demo.pipeline import flipped_pairs
    from physmaster.training import Conditioning, PreferencePair, PreferenceSet

    g = torch.Generator().manual_seed(0)
    cond = Conditioning(context=torch.zeros(1, 4, 32))
    src = PreferenceSet(PreferencePair(cond, torch.randn(2, 3, 2, 2, generator=g), torch.randn(2, 3, 2, 2, generator=g),
                                       "similarity", 0.3, f"g{i}") for i in range(200))

    def swapped(ps):
        assert [p.group for p in ps.pairs] == [p.group for p in src.pairs]
        out = []
        for a, b in zip(ps.pairs, src.pairs):
            same = torch.equal(a.winner, b.winner) and torch.equal(a.loser, b.loser)
            flip = torch.equal(a.winner, b.loser) and torch.equal(a.loser, b.winner)
            assert same != flip and a.margin == b.margin and a.source == b.source
            out.append(flip)
        return out

    half = swapped(flipped_pairs(src, seed=3))
    assert 70 <= sum(half) <= 130
    assert swapped(flipped_pairs(src, seed=3)) == half
    assert swapped(flipped_pairs(src, seed=4)) != half
    assert sum(swapped(flipped_pairs(src, 3, fraction=0.0))) == 0
    assert sum(swapped(flipped_pairs(src, 3, fraction=1.0))) == 200
    with pytest.raises(ValueError, match="between 0 and 1"):
        flipped_pairs(src, 3, fraction=1.5)


def test_settings_overrides_parse_and_name_the_bad_item():
    """The benches' `--set NAME=VALUE`: typed by the field, repeatable; an unknown name, a missing value or a value
    of the wrong type is a clear error naming the item."""
    from physmaster.demo.pipeline import Settings

    st = Settings().with_overrides(["beta=500", "lora_rank=16", "judge_labels=yes"])
    assert (st.beta, st.lora_rank, st.judge_labels) == (500.0, 16, True)
    assert Settings().with_overrides([]) == Settings()
    with pytest.raises(ValueError, match=r"'bta=5'.*NAME one of .*'beta'"):
        Settings().with_overrides(["bta=5"])
    with pytest.raises(ValueError, match=r"'beta='"):
        Settings().with_overrides(["beta="])
    with pytest.raises(ValueError, match=r"'lora_rank=1.5': '1.5' is not an integer"):
        Settings().with_overrides(["lora_rank=1.5"])
    assert not Settings().with_overrides(["judge_prior=off"]).judge_prior
    assert not Settings().with_overrides(["judge_prior=0"]).judge_prior
    assert Settings().with_overrides(["judge_prior=0", "judge_prior=On"]).judge_prior
    with pytest.raises(ValueError, match=r"'judge_prior=maybe': 'maybe' is not a yes or no"):
        Settings().with_overrides(["judge_prior=maybe"])
    assert Settings().lora_modules == "attn2"
    assert Settings().with_overrides(["lora_modules="]).lora_modules == ""  # a text field may be empty


def test_head_sft_probe_trains_the_head_alone():
    """bench/demo_stage3.py's `--head-sft`: from a frozen DiT (after `freeze_dit`), flow matching on the
    ground-truth drops moves a copy of the head and nothing else: the DiT's weights and the given head stay as
    they were."""
    from physmaster.demo.pipeline import Settings, freeze_dit, sft_videos, stage_one

    mod = bench_module("demo_stage3")
    st = Settings.fast()
    vm, bb, _ = load_assets()
    encoder = stage_one(vm, bb, st, 0, lambda m: None)
    freeze_dit(vm, 0)
    dit = {k: v.clone() for k, v in vm.den.model.state_dict().items()}
    head = {k: v.clone() for k, v in encoder.head.state_dict().items()}
    trained = mod.head_sft(vm, encoder, sft_videos(vm, bb, st), st, steps=3, lr=1e-2)
    assert trained is not encoder
    assert all(torch.equal(head[k], v) for k, v in encoder.head.state_dict().items())
    assert any(not torch.equal(head[k], v) for k, v in trained.head.state_dict().items())
    assert all(torch.equal(dit[k], v) for k, v in vm.den.model.state_dict().items())


def test_coherence_parts_say_why_each_frame_misses():
    """Every frame where the truth shows the object is coherent or missed for exactly one reason, in the order
    lost, fragments, too small, too large; the parts sum to 1 and `coherence` is the coherent part."""
    from physmaster.demo.evaluation import MISSES, coherence_parts

    gt = np.zeros((6, 32, 32), bool)
    gt[:, 10:16, 10:16] = True  # area 36
    masks = gt.copy()
    fg = gt.copy()
    masks[1] = False  # lost
    fg[1] = False
    fg[2, 25:29, 25:29] = True  # a second fragment outside the kept mask: 36 / 52 < 90%
    masks[3] = False
    masks[3, 10:14, 10:14] = True  # 16 px < half of 36
    fg[3] = masks[3]
    masks[4, 5:20, 5:20] = True  # 225 px > twice 36
    fg[4] = masks[4]
    gt_blank = gt.copy()
    gt_blank[5] = False  # the truth does not show the object: not counted
    parts = coherence_parts({"foreground": fg}, masks, gt_blank)
    assert set(parts) == {"coherence", *MISSES}
    assert parts == pytest.approx({"coherence": 0.2, "lost": 0.2, "fragments": 0.2, "too_small": 0.2,
                                   "too_large": 0.2})
    assert coherence({"foreground": fg}, masks, gt_blank) == pytest.approx(0.2)


def test_the_report_prints_why_frames_miss_coherence():
    from physmaster.demo.evaluation import MISSES
    from physmaster.demo.report import format_coherence

    def row(coh, lost):
        r = {"coherence": np.array([coh, coh, 1.0, 1.0])}
        r.update({f"miss_{m}": np.zeros(4) for m in MISSES})
        r["miss_lost"] = np.array([lost, lost, 0.0, 0.0])
        return r

    text = format_coherence({"base": row(0.5, 0.5), "Stage I": row(0.75, 0.25)}, n_seen=2)
    assert ("  base: coherent 75.0%; lost 25.0%, fragments 0.0%, too small 0.0%, too large 0.0%; "
            "seen 0.500 | unseen 1.000") in text
    assert "  Stage I: coherent 87.5%; lost 12.5%" in text
    assert format_coherence({"base": {"coherence": np.ones(2)}}, 1) == ""


def test_plain_objects_decoder_targets_and_their_flag(tmp_path):
    """`--make-base` (the shipped weights): the autoencoder's targets are the same scenes with every object drawn
    without its pattern (same masks, same motion, bounce included; only object pixels differ), and the file records
    it. `--patterned-objects` makes the earlier autoencoder, and is refused where it would overwrite the shipped
    weights; either flag is refused where a run would ignore it."""
    from physmaster.demo.assets import make_assets
    from physmaster.demo.autoencoder import train_autoencoder
    from physmaster.demo.world import generic_scene

    patterned = next(s for s in range(100) if drop_scene(s, "unseen").meta["texture"] != "flat")
    moving = next(s for s in range(100) if generic_scene(s).meta["texture"] != "flat")
    for a, b in ((drop_scene(patterned, "unseen"), drop_scene(patterned, "unseen", plain=True)),
                 (generic_scene(moving), generic_scene(moving, plain=True))):
        masks = a.object_masks().astype(bool)
        assert np.array_equal(masks, b.object_masks()) and b.meta["texture"] == "flat"
        assert (np.abs(a.frames - b.frames).max(-1) > 1e-6).sum() > 20
    a, b = drop_scene(patterned, "unseen"), drop_scene(patterned, "unseen", plain=True)
    near = masks = a.object_masks().astype(bool)  # the drop: the object and its anti-aliased one-pixel rim
    for axis in (1, 2):
        for shift in (1, -1):
            near = near | np.roll(masks, shift, axis)
    assert not ((np.abs(a.frames - b.frames).max(-1) > 1e-6) & ~near).any()  # the pattern, on the object only
    assert drop_scene(patterned, plain=True).meta["restitution"] == drop_scene(patterned).meta["restitution"]
    x = torch.rand(4, 3, SIZE, SIZE)
    with pytest.raises(ValueError, match=r"targets must have the frames' shape \(4, 3, 32, 32\), got \(2, 3, 32, 32\)"):
        train_autoencoder(x, torch.zeros(4, SIZE, SIZE), 1, targets=x[:2], log=None)
    info = load_assets(make_assets(tmp_path / "p.safetensors", fast=True, log=lambda m: None))[2]
    assert info["ae"]["command"] == "python -m physmaster demo --make-base"
    assert info["ae"]["decodes"].startswith("every object plain")
    assert load_assets(ASSET_FILE)[2]["ae"]["decodes"].startswith("every object plain")  # the shipped file
    other = str(tmp_path / "q.safetensors")
    assert main(["demo", "--make-base", "--fast", "--patterned-objects", "--assets", other]) == 0
    info = load_assets(tmp_path / "q.safetensors")[2]
    assert info["ae"]["command"] == "python -m physmaster demo --make-base --patterned-objects"
    assert "decodes" not in info["ae"]
    shipped = ASSET_FILE.read_bytes()
    with pytest.raises(SystemExit, match="--patterned-objects makes other weights than the shipped ones; give "):
        main(["demo", "--make-base", "--fast", "--patterned-objects"])
    with pytest.raises(SystemExit, match="--plain-objects and --patterned-objects ask for two different autoencoders"):
        main(["demo", "--make-base", "--fast", "--plain-objects", "--patterned-objects", "--assets",
              str(tmp_path / "r.safetensors")])
    assert ASSET_FILE.read_bytes() == shipped and not (tmp_path / "r.safetensors").exists()
    for flag in ("--plain-objects", "--patterned-objects"):
        with pytest.raises(SystemExit, match=f"{flag} chooses how --make-base trains the autoencoder"):
            main(["demo", "--fast", "--out", str(tmp_path / "run"), flag])
    assert not (tmp_path / "run").exists()


def test_benches_read_other_weights_with_assets(tmp_path):
    """The benches' `--assets FILE` (demo_args.load_world): the video model and backbone come from that file, as
    the demo's `--assets` does; with `--base drop` it is refused (the drop base is cached for the shipped latents)."""
    import argparse

    from physmaster.demo.generator import new_dit

    demo_args = bench_module("demo_args")
    ap = argparse.ArgumentParser()
    demo_args.add_base(ap)
    ae = FrameAutoencoder()
    path = save_assets(tmp_path / "other.safetensors", ae, GeometryBackbone(), new_dit(0),
                       {"ae": {"steps": 1}, "backbone": {"steps": 1}, "dit": {"steps": 1}})
    vm, _ = demo_args.load_world(ap.parse_args(["--assets", str(path)]))
    assert all(torch.equal(a, b) for a, b in zip(vm.ae.state_dict().values(), ae.state_dict().values()))
    shipped, _ = demo_args.load_world(ap.parse_args([]))
    assert not torch.equal(shipped.ae.decoder[0].weight, vm.ae.decoder[0].weight)
    with pytest.raises(SystemExit, match="--assets and --base drop: the drop base is pretrained on the shipped"):
        demo_args.load_world(ap.parse_args(["--assets", str(path), "--base", "drop"]))


def _fast_stage_two_pairs():
    """A fast Stage I with its DiT frozen (as after Stage II) and ground-truth pairs of its candidates:
    (quiet log, settings, video model, encoder, pairs)."""
    import dataclasses

    from physmaster.demo.pipeline import Settings, freeze_dit, gt_pairs, sample_candidates, stage_one

    quiet = lambda m: None  # noqa: E731
    st = dataclasses.replace(Settings.fast(), dpo_steps=3)
    vm, bb, _ = load_assets()
    encoder = stage_one(vm, bb, st, 0, quiet)
    freeze_dit(vm, 0)
    return quiet, st, vm, encoder, gt_pairs(sample_candidates(vm, encoder.head, bb, st, 0, "Stage II"), st, quiet, "")


def test_candidates_reuse_the_plain_draws_videos():
    """`sample_candidates(..., reuse=plain)`: the start images both draws show plain take the plain draw's
    candidates (latents, videos, scores), the others are sampled with the noises a fresh draw gives them, so the
    result is the fresh draw's; a reuse of other scenes is refused."""
    import dataclasses

    from physmaster.demo.pipeline import Settings, sample_candidates

    st = dataclasses.replace(Settings.fast(), candidates=3)
    vm, bb, _ = load_assets()
    plain = sample_candidates(vm, None, bb, st, 0, "Stage I", scenes=3)
    fresh = sample_candidates(vm, None, bb, st, 0, "Stage I", scenes=4, recoloured=0.5)
    calls = []
    sample = vm.sample
    vm.sample = lambda head, cond, noises, steps: calls.append(len(noises)) or sample(head, cond, noises, steps)
    try:
        both = sample_candidates(vm, None, bb, st, 0, "Stage I", scenes=4, recoloured=0.5, reuse=plain)
    finally:
        vm.sample = sample
    assert calls == [6]  # start images 1 and 3 (recoloured) x 3 candidates; 0 and 2 from the plain draw
    assert [s.meta.get("recoloured", 0) for s in both.scenes] == [0, 1, 0, 1]
    assert both.latents.shape == (12, *plain.latents.shape[1:])
    assert torch.allclose(both.latents, fresh.latents, atol=1e-5)
    assert torch.equal(both.latents[:3], plain.latents[:3]) and torch.equal(both.latents[6:9], plain.latents[6:9])
    assert all(np.allclose(a, b, atol=1e-4) for a, b in zip(both.videos, fresh.videos))
    np.testing.assert_allclose(both.l2, fresh.l2, atol=1e-4)
    np.testing.assert_array_equal(both.similarity[[0, 2]], plain.similarity[[0, 2]])
    with pytest.raises(ValueError, match="reuse must be a plain draw of the same scenes"):
        sample_candidates(vm, None, bb, st, 0, "Stage I", scenes=4, recoloured=0.5, reuse=fresh)


def test_head_soup_averages_heads_trained_on_other_draws():
    """`head_soup=K` (the head's Flow-DPO stages): K heads trained from the same start on other draws of t, noise
    and batch order, their weights averaged; the DiT untouched, the run recorded once with its K."""
    import dataclasses

    from physmaster.demo.pipeline import dpo

    quiet, st, vm, encoder, pairs = _fast_stage_two_pairs()
    assert len(pairs) > 0
    dit = {k: v.clone() for k, v in vm.den.model.state_dict().items()}
    runs = []
    for seed in (5, 5 + 7919):
        one = encoder.clone()
        dpo("dpo-head", vm, one, pairs, st, seed, quiet, "one")
        runs.append(one.head.state_dict())
    assert any(not torch.allclose(runs[0][k], runs[1][k]) for k in runs[0])  # other draws, other heads
    soup = encoder.clone()
    dpo("dpo-head", vm, soup, pairs, dataclasses.replace(st, head_soup=2), 5, quiet, "soup")
    for k, v in soup.head.state_dict().items():
        torch.testing.assert_close(v, (runs[0][k] + runs[1][k]) / 2)
    assert soup.provenance["stages"][-1]["soup"] == 2 and len(soup.provenance["stages"]) == len(
        encoder.provenance["stages"]) + 1
    assert all(torch.equal(dit[k], v) for k, v in vm.den.model.state_dict().items())


def test_head_stages_draw_more_start_images_and_take_their_own_steps():
    """The head's Flow-DPO stages learn from `head_scenes` start images for `head_dpo_steps` steps; Stage II from
    the first `dpo_scenes` of the same draw (`Candidates.first`: a candidate's noise depends on its index alone)
    for `dpo_steps`."""
    import dataclasses

    from physmaster.demo.pipeline import Settings, dpo, gt_pairs, sample_candidates, stage_one

    quiet = lambda m: None  # noqa: E731
    st = dataclasses.replace(Settings.fast(), dpo_scenes=2, head_scenes=3, dpo_steps=2, head_dpo_steps=3)
    vm, bb, _ = load_assets()
    encoder = stage_one(vm, bb, st, 0, quiet)
    many = sample_candidates(vm, encoder.head, bb, st, 0, "Stage I", scenes=st.head_scenes)
    few = sample_candidates(vm, encoder.head, bb, st, 0, "Stage I")
    assert (len(many.scenes), len(many.videos), many.l2.shape) == (3, 6, (3, 2))
    first = many.first(st.dpo_scenes)
    assert [s.meta["seed"] for s in first.scenes] == [s.meta["seed"] for s in few.scenes]
    assert (first.l2.shape, first.similarity.shape, first.lost.shape, len(first.videos)) == ((2, 2),) * 3 + (4,)
    assert first.cond.context.shape[0] == 2 and first.latents.shape[0] == 4
    torch.testing.assert_close(first.latents, few.latents, atol=1e-4, rtol=1e-4)  # the same noises
    assert many.first(5) is many
    pairs = gt_pairs(many, st, quiet, "")
    head, lora = encoder.clone(), encoder.clone()
    dpo("dpo-head", vm, head, pairs, st, 1, quiet, "head")
    dpo("dpo-lora", vm, lora, pairs, st, 2, quiet, "lora")
    assert head.provenance["stages"][-1]["steps_planned"] == 3 and lora.provenance["stages"][-1]["steps_planned"] == 2
    # each stage's own margin use: both by gap by default; Stage II's every pair 1 with lora_margin_use "ignore"
    assert head.provenance["stages"][-1]["margin_use"] == lora.provenance["stages"][-1]["margin_use"] == "weight"
    dpo("dpo-lora", vm, lora, pairs, dataclasses.replace(st, lora_margin_use="ignore"), 2, quiet, "lora")
    assert "margin_use" not in lora.provenance["stages"][-1] and lora.provenance["stages"][-1]["beta"] == 500.0


def test_head_bag_averages_heads_trained_without_one_group_of_start_images_each():
    """`head_bag=K`: K heads from the same start, each trained on the pairs of all but one of K groups of start
    images (same draws), their weights averaged; K larger than the start images with pairs, or with a soup, refused."""
    import dataclasses

    from physmaster.demo.pipeline import bagged, dpo

    quiet, st, vm, encoder, pairs = _fast_stage_two_pairs()
    groups = list(dict.fromkeys(p.group for p in pairs.pairs))
    assert len(groups) == 3
    parts = bagged(pairs, 2)  # groups [g0, g1] and [g2] left out in turn
    assert [sorted({p.group for p in part.pairs}) for part in parts] == [[groups[2]], sorted(groups[:2])]
    runs = []
    for part in parts:
        one = encoder.clone()
        dpo("dpo-head", vm, one, part, st, 5, quiet, "one")
        runs.append(one.head.state_dict())
    bag = encoder.clone()
    dpo("dpo-head", vm, bag, pairs, dataclasses.replace(st, head_bag=2), 5, quiet, "bag")
    for k, v in bag.head.state_dict().items():
        torch.testing.assert_close(v, (runs[0][k] + runs[1][k]) / 2)
    assert bag.provenance["stages"][-1]["bag"] == 2
    with pytest.raises(ValueError, match="head_bag=4 needs pairs from at least 4 start images, got 3"):
        bagged(pairs, 4)
    with pytest.raises(ValueError, match="head_soup=2 and head_bag=2 both average heads"):
        dpo("dpo-head", vm, encoder.clone(), pairs, dataclasses.replace(st, head_bag=2, head_soup=2), 5, quiet, "x")
    with pytest.raises(SystemExit, match="head_soup=2 and head_bag=2 both average heads"):
        main(["demo", "--fast", "--set", "head_bag=2", "--set", "head_soup=2"])


def _candidates(similarity, lost):
    """pipeline.Candidates of one start image with these similarities and lost-frame L2s (latents: the index)."""
    from physmaster.demo.pipeline import Candidates
    from physmaster.training import Conditioning

    k = len(similarity)
    scene = drop_scene(3)
    lat = torch.arange(k, dtype=torch.float32).view(k, 1, 1, 1, 1).expand(k, 2, 2, 2, 2).contiguous()
    sims, lost = np.array([similarity], float), np.array([lost], float)
    return Candidates([scene], Conditioning(context=torch.zeros(1, 4, 32)), lat, [None] * k, 1 - sims, sims, k,
                      0.0, lost)


def test_head_pairs_among_candidates_that_keep_the_object():
    """The head's nested pairs (`head_pairs` without `head_pairs_all`): with `head_pairs_whole` only candidates that
    keep the object in every frame are paired (best vs worst among them, then the next), up to
    `head_pairs_per_image`; Stage II's pairs (`gt_pairs`) keep every candidate; with no whole pair at all, the head's
    pairs fall back to every candidate."""
    import dataclasses

    from physmaster.demo.pipeline import Settings, gt_pairs, head_pairs

    quiet, logs = (lambda m: None), []
    c = _candidates([0.9, 0.8, 0.7, 0.5, 0.4, 0.1], [0, 0, 0.2, 0, 0, 0.5])
    ids = lambda ps: [(int(p.winner.flatten()[0]), int(p.loser.flatten()[0])) for p in ps.pairs]  # noqa: E731
    st = dataclasses.replace(Settings(), head_pairs_whole=True, head_pairs_per_image=4, head_pairs_all=False)
    assert ids(gt_pairs(c, st, quiet, "")) == [(0, 5), (1, 4)]  # pairs_per_image 2, every candidate
    assert ids(head_pairs(c, st, logs.append, "Stage II")) == [(0, 4), (1, 3)]  # 4 whole ones: 2 pairs at most
    assert "keep the object in every frame" in logs[-1]
    assert ids(head_pairs(c, dataclasses.replace(st, head_pairs_per_image=1), quiet, "")) == [(0, 4)]
    assert ids(head_pairs(c, dataclasses.replace(st, head_pairs_whole=False), quiet, "")) == [(0, 5), (1, 4), (2, 3)]
    lost_all = _candidates([0.9, 0.5, 0.1, 0.0], [0.1, 0.1, 0.1, 0.1])
    logs.clear()
    assert ids(head_pairs(lost_all, st, logs.append, "Stage II")) == [(0, 3), (1, 2)]
    assert "no pair of Stage II candidates that keep the object in every frame" in logs[0]


def test_head_pairs_all_pairs_every_ordered_pair_above_the_margin():
    """`head_pairs_all`: every pair of a start image's candidates, the more similar one the winner, whose similarity
    gap is at least `min_margin` (not only 1st vs last, 2nd vs second-to-last); with `head_pairs_whole` among the
    whole candidates only. `gt_pairs` without it stays nested; Stage II's pairs follow `lora_pairs_all`."""
    import dataclasses

    from physmaster.demo.pipeline import Settings, gt_pairs, head_pairs, lora_pairs

    quiet = lambda m: None  # noqa: E731
    c = _candidates([0.9, 0.8, 0.7, 0.5, 0.4, 0.1], [0, 0, 0.2, 0, 0, 0.5])
    ids = lambda ps: sorted((int(p.winner.flatten()[0]), int(p.loser.flatten()[0])) for p in ps.pairs)  # noqa: E731
    st = dataclasses.replace(Settings(), head_pairs_all=True, min_margin=0.15)
    sims = [0.9, 0.8, 0.7, 0.5, 0.4, 0.1]
    want = sorted((a, b) for a in range(6) for b in range(6) if sims[a] - sims[b] >= 0.15 - 1e-12)
    got = head_pairs(c, st, quiet, "")
    assert ids(got) == want and len(want) == 12  # (0, 1), (1, 2), (3, 4) are closer than the margin
    assert all(p.margin == pytest.approx(sims[int(p.winner.flatten()[0])] - sims[int(p.loser.flatten()[0])])
               for p in got.pairs)
    whole = head_pairs(c, dataclasses.replace(st, head_pairs_whole=True), quiet, "")
    assert ids(whole) == [(0, 3), (0, 4), (1, 3), (1, 4)]  # candidates 2 and 5 lose the object
    assert ids(gt_pairs(c, st, quiet, "")) == [(0, 5), (1, 4)]  # pairs_per_image 2, nested
    # Stage II's own switch (on by default): every pair too, its labels counting coherence (none given: similarity)
    assert Settings().lora_pairs_all and ids(lora_pairs(c, st, quiet, "")) == want
    assert ids(lora_pairs(c, dataclasses.replace(st, lora_pairs_all=False), quiet, "")) == [(0, 5), (1, 4)]
    with pytest.raises(ValueError, match="head_margin_use='gap': use one of"):
        Settings(head_margin_use="gap")
    with pytest.raises(ValueError, match="lora_margin_use='gap': use one of"):
        Settings(lora_margin_use="gap")


def test_judge_label_pairs_all_pairs_are_the_judges_own_ranking():
    """`judge_label_pairs(..., all_pairs=True)`: every pair the judge ranks with confidence >= min_confidence, each
    with the confidence `rank_candidates` gives it, its better-scored candidate the winner."""
    from physmaster.demo.judging import judge_label_pairs
    from physmaster.demo.world import FPS
    from physmaster.physics import rank_candidates

    scene = drop_scene(11)
    true = scene.frames.astype(np.float32)
    videos = [true, drop_scene(11, restitution=0.0).frames.astype(np.float32),
              drop_scene(11, restitution=0.95).frames.astype(np.float32), np.roll(true, 3, axis=2)]
    results, ranked = rank_candidates(videos, fps=FPS, min_margin=0.0, reference=true[0])
    every = judge_label_pairs(videos, true[0], FPS, min_confidence=0.0, all_pairs=True)
    assert sorted(every) == sorted((w, lo, c) for w, lo, c in ranked if c > 0)
    assert len(every) > len(judge_label_pairs(videos, true[0], FPS, min_confidence=0.0)) >= 1
    assert all(results[w].score > results[lo].score for w, lo, _ in every)
    sure = judge_label_pairs(videos, true[0], FPS, min_confidence=0.3, all_pairs=True)
    assert sure == [p for p in every if p[2] >= 0.3] and 0 < len(sure) < len(every)


def test_judge_pairs_every_ranked_pair_or_nested():
    """The judge-labelled row's pairs (`judge_pairs`) are every pair the judge ranks at `judge_min_confidence` (0.1
    by default, the picker's), as the ground-truth head stages take every pair; `judge_pairs_all` off gives its
    nested ones (best vs worst, ...)."""
    import dataclasses

    from physmaster.demo.pipeline import Candidates, Settings, judge_pairs
    from physmaster.training import Conditioning

    scene = drop_scene(11)
    true = scene.frames.astype(np.float32)
    videos = [true, drop_scene(11, restitution=0.0).frames.astype(np.float32),
              drop_scene(11, restitution=0.95).frames.astype(np.float32), np.roll(true, 3, axis=2)]
    lat = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1, 1).expand(4, 2, 2, 2, 2).contiguous()
    c = Candidates([scene], Conditioning(context=torch.zeros(1, 4, 32)), lat, videos, np.zeros((1, 4)),
                   np.zeros((1, 4)), 4, 0.0, np.zeros((1, 4)))
    assert Settings().head_pairs_all and Settings().judge_pairs_all and Settings().judge_min_confidence == 0.1
    st = dataclasses.replace(Settings(), judge_min_confidence=0.0, judge_margin="confidence")
    ids = lambda ps: [(int(p.winner.flatten()[0]), int(p.loser.flatten()[0])) for p in ps.pairs]  # noqa: E731
    assert ids(judge_pairs(c, dataclasses.replace(st, judge_pairs_all=False), lambda m: None, "")) == [(0, 2), (1, 3)]
    every = judge_pairs(c, st, lambda m: None, "")
    assert len(every.pairs) == 6 and {(0, 2), (1, 3)} <= set(ids(every))
    margins = [p.margin for p in every.pairs]  # the judge is less than half sure of each of these pairs
    assert max(margins) < 0.5 and judge_pairs(c, dataclasses.replace(st, judge_min_confidence=0.5), lambda m: None,
                                              "") is None  # none kept at 0.5 (the default before)
    default = judge_pairs(c, dataclasses.replace(Settings(), judge_margin="confidence"), lambda m: None, "")
    # at 0.1, those the judge is at least 10% sure of
    assert [p.margin for p in default.pairs] == [m for m in margins if m >= 0.1] and len(default.pairs) == 6
    sure = judge_pairs(c, dataclasses.replace(st, judge_min_confidence=0.3), lambda m: None, "")
    assert [p.margin for p in sure.pairs] == [m for m in margins if m >= 0.3] and len(sure.pairs) == 3


def test_judge_pairs_weigh_by_the_judges_score_gap_cut_at_min_margin():
    """By default (`judge_margin="gap"`) a judge-labelled pair's margin is the gap between its candidates' judge
    scores, and pairs whose gap is under `min_margin` are left out, as Stage III's ground-truth pairs carry and are
    cut at the gap in similarity; the confidence floor still applies. A margin kind it does not know is refused."""
    import dataclasses

    from physmaster.demo.judging import judge_label_pairs
    from physmaster.demo.pipeline import Candidates, Settings, judge_pairs
    from physmaster.demo.world import FPS
    from physmaster.errors import PhysMasterError
    from physmaster.physics import rank_candidates
    from physmaster.training import Conditioning

    scene = drop_scene(11)
    true = scene.frames.astype(np.float32)
    videos = [true, drop_scene(11, restitution=0.0).frames.astype(np.float32),
              drop_scene(11, restitution=0.95).frames.astype(np.float32), np.roll(true, 3, axis=2)]
    results, ranked = rank_candidates(videos, fps=FPS, min_margin=0.0, reference=true[0])
    score = [r.score for r in results]
    gaps = judge_label_pairs(videos, true[0], FPS, min_confidence=0.0, all_pairs=True, margin="gap")
    assert sorted(gaps) == sorted((w, lo, score[w] - score[lo]) for w, lo, c in ranked if c > 0)
    cut = sorted(g for _, _, g in gaps)[len(gaps) // 2]  # keeps the upper half of the gaps
    kept = judge_label_pairs(videos, true[0], FPS, min_confidence=0.0, all_pairs=True, margin="gap", min_gap=cut)
    assert kept == [p for p in gaps if p[2] >= cut] and 0 < len(kept) < len(gaps)
    sure = {(w, lo) for w, lo, c in ranked if c >= 0.3}
    both = judge_label_pairs(videos, true[0], FPS, min_confidence=0.3, all_pairs=True, margin="gap", min_gap=cut)
    assert both == [p for p in kept if p[:2] in sure]
    with pytest.raises(PhysMasterError, match="margin='size': use one of"):
        judge_label_pairs(videos, true[0], FPS, margin="size")

    lat = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1, 1).expand(4, 2, 2, 2, 2).contiguous()
    c = Candidates([scene], Conditioning(context=torch.zeros(1, 4, 32)), lat, videos, np.zeros((1, 4)),
                   np.zeros((1, 4)), 4, 0.0, np.zeros((1, 4)))
    assert Settings().judge_margin == "gap" and Settings().min_margin == 0.05
    st = dataclasses.replace(Settings(), min_margin=0.1)  # these four candidates' gaps are 0.06-0.34
    at = {(w, lo): score[w] - score[lo] for w, lo, conf in ranked if conf >= st.judge_min_confidence}
    got = judge_pairs(c, st, lambda m: None, "")
    ids = [(int(p.winner.flatten()[0]), int(p.loser.flatten()[0])) for p in got.pairs]
    assert {wl: at[wl] for wl in ids} == {wl: g for wl, g in at.items() if g >= 0.1}
    assert [p.margin for p in got.pairs] == [at[wl] for wl in ids] and 1 <= len(ids) < len(at)
    with pytest.raises(ValueError, match="judge_margin='size': use one of"):
        dataclasses.replace(st, judge_margin="size")


def test_judge_pairs_whole_only_leave_out_a_video_that_loses_the_object():
    """`judge_label_pairs(..., whole_only=True)`: a candidate in which the judge's track loses the object is in no
    pair (without it, the judge pairs it as the worst)."""
    from physmaster.demo.judging import judge_label_pairs
    from physmaster.demo.world import FPS

    scene = drop_scene(11)
    true = scene.frames.astype(np.float32)
    lost, masks = true.copy(), scene.object_masks()
    for f in (4, 5):  # the object painted over with the background just left of it, row by row
        for y in np.where(masks[f].any(1))[0]:
            xs = np.where(masks[f][y])[0]
            lost[f, y, xs] = true[f, y, max(xs.min() - 2, 0)]
    slow = drop_scene(11, restitution=0.0).frames.astype(np.float32)
    videos = [true, lost, slow, true.copy()]
    every = judge_label_pairs(videos, true[0], FPS, min_confidence=0.0)
    assert 1 in {i for p in every for i in p[:2]}
    whole = judge_label_pairs(videos, true[0], FPS, min_confidence=0.0, whole_only=True)
    assert whole and all(1 not in p[:2] for p in whole) and len(whole) <= 1


def test_ground_truth_labels_count_a_hedge_by_its_incoherent_frames():
    """A hedge (the object drawn twice along its fall from frame 3 on: its centroid between the two) is more similar
    to the truth than a crisp video of the drop with another material's bounce on most drops, by
    `physics.gt_similarity` alone. With `label_coherence` each candidate's similarity is multiplied by its coherence
    in the labels of the stages it names (lora: Stage II's; all: the head's stages' too), and the crisp video wins
    there, as a rater who sees two objects would have it; the other stages keep the similarity alone."""
    from physmaster.demo.pipeline import Candidates, Settings, head_pairs, label_scores, lora_pairs
    from physmaster.physics import gt_similarity
    from physmaster.training.denoiser import Conditioning

    quiet = lambda m: None  # noqa: E731
    scenes, sims, cohs = [], [], []
    for seed in range(900000, 900040):
        s = drop_scene(seed, "seen")
        frames, gt = s.frames.astype(np.float32), s.object_masks()
        hedge = frames.copy()
        for t in range(3, FRAMES):
            above = np.roll(gt[t], -9, axis=0)
            hedge[t][above] = np.roll(frames[t], -9, axis=0)[above]
        own = material_restitution(s.meta["texture"])
        other = next(r for _, r in MATERIALS.values() if r != own)
        crisp = drop_scene(seed, "seen", restitution=other).frames.astype(np.float32)
        m = [score_video(hedge, gt), score_video(crisp, gt)]
        scenes.append(s)
        sims.append([gt_similarity(x) for x in m])
        cohs.append([x["coherence"] for x in m])
    n = len(scenes)
    sims, cohs = np.array(sims), np.array(cohs)
    assert cohs[:, 0].mean() < 0.7 and cohs[:, 1].min() > 0.9
    latents = torch.arange(2 * n, dtype=torch.float32).reshape(2 * n, 1, 1, 1, 1).expand(2 * n, 1, 2, 2, 2)
    c = Candidates(scenes, Conditioning(context=torch.zeros(n, 1, 4)), latents.contiguous(), [None] * 2 * n,
                   l2=np.zeros((n, 2)), similarity=sims, k=2, seconds=0.0, lost=np.zeros((n, 2)), coherence=cohs)
    for j in range(n):
        np.testing.assert_array_equal(label_scores(c, j, False), sims[j])
        np.testing.assert_allclose(label_scores(c, j, True), sims[j] * cohs[j])

    def hedge_wins(pairs):
        """How many start images' pair prefers the hedge (candidate 0; each latent is filled with its index)."""
        return sum(int(p.winner.flatten()[0]) % 2 == 0 for p in pairs.pairs)

    def st(which):
        return Settings(label_coherence=which, min_margin=0.0, pairs_per_image=1, head_pairs_per_image=1)

    by_similarity = hedge_wins(lora_pairs(c, st("off"), quiet, ""))
    assert by_similarity > n // 2 and by_similarity == int((sims[:, 0] > sims[:, 1]).sum())
    assert hedge_wins(lora_pairs(c, st("lora"), quiet, "")) < n // 5
    assert hedge_wins(head_pairs(c, st("lora"), quiet, "")) == by_similarity
    assert hedge_wins(head_pairs(c, st("all"), quiet, "")) < n // 5
    with pytest.raises(ValueError, match="label_coherence='yes': use one of"):
        Settings(label_coherence="yes")


def test_stage_two_variants_bench_trains_each_variant_from_the_same_stage_one(tmp_path):
    """bench/demo_stage2_variants.py (smoke settings): one Stage I, then a Stage II per variant, each scored against
    Stage I and written to JSON; a variant that would change more than Stage II is refused and names the fix."""
    _, rows = variants_rows("demo_stage2_variants", tmp_path, "default:", "anchored:lora_anchor=10")
    assert list(rows) == ["Stage I", "default", "anchored"]
    assert rows["anchored"]["set"] == ["lora_anchor=10"] and rows["default"]["set"] == []
    for name in ("default", "anchored"):
        mean, lo, hi = rows[name]["vs_stage_one"]
        assert lo <= mean <= hi and rows[name]["pairs"] > 0
        assert rows[name]["l2"] == pytest.approx(rows["Stage I"]["l2"] + mean, abs=1e-6)
    bad = run_bench("demo_stage2_variants", "--variant", "x:head_scenes=3", timeout=120)
    assert bad.returncode == 2 and "only Stage II's settings" in bad.stderr and "--set" in bad.stderr


def test_stage_three_variants_bench_trains_each_variant_from_the_same_stage_two(tmp_path):
    """bench/demo_stage3_variants.py (smoke settings): one Stage I and Stage II, then a Stage III per variant, each
    scored against Stage II and written to JSON; a variant that would change more than the head's Flow-DPO is
    refused and names the fix."""
    _, rows = variants_rows("demo_stage3_variants", tmp_path, "default:", "steady:head_beta=2000,lr_head=1e-9",
                            "dark:stage_three_recoloured=1")
    assert list(rows) == ["Stage I", "Stage II", "default", "steady", "dark"]
    # learnt from its own draw of the Stage II model, every start image recoloured
    assert rows["dark"]["set"] == ["stage_three_recoloured=1"] and rows["dark"]["pairs"] > 0
    assert rows["steady"]["set"] == ["head_beta=2000", "lr_head=1e-9"] and rows["default"]["set"] == []
    for name in ("default", "steady"):
        mean, lo, hi = rows[name]["vs_stage_two"]
        assert lo <= mean <= hi and rows[name]["pairs"] > 0
        assert rows[name]["l2"] == pytest.approx(rows["Stage II"]["l2"] + mean, abs=1e-6)
    assert rows["steady"]["vs_stage_two"][0] == pytest.approx(0.0, abs=1e-6)  # a head that cannot move: Stage II
    bad = run_bench("demo_stage3_variants", "--variant", "x:beta=3", timeout=120)
    assert bad.returncode == 2 and "only the head's Flow-DPO settings" in bad.stderr and "--set" in bad.stderr


def test_judge_variants_bench_trains_each_judge_row_from_the_same_stage_two(tmp_path):
    """bench/demo_judge_variants.py (smoke settings): one Stage I and Stage II, the ground truth's Stage III, then a
    judge-labelled row per variant, each scored against Stage II and written to JSON; a variant that would change
    more than the judge's pairs and the head's Flow-DPO is refused and names the fix."""
    _, rows = variants_rows("demo_judge_variants", tmp_path, "gap:",
                            "steady:judge_margin=confidence,judge_min_confidence=0,lr_head=1e-9")
    assert list(rows) == ["Stage I", "Stage II", "Stage III", "gap", "steady"]
    assert rows["steady"]["set"] == ["judge_margin=confidence", "judge_min_confidence=0", "lr_head=1e-9"]
    assert rows["gap"]["set"] == [] and rows["steady"]["pairs"] > 0
    for name in ("Stage III", "gap", "steady"):
        mean, lo, hi = rows[name]["vs_stage_two"]
        assert lo <= mean <= hi
        assert rows[name]["l2"] == pytest.approx(rows["Stage II"]["l2"] + mean, abs=1e-6)
    assert rows["steady"]["vs_stage_two"][0] == pytest.approx(0.0, abs=1e-6)  # a head that cannot move: Stage II
    bad = run_bench("demo_judge_variants", "--variant", "x:stage_three_recoloured=1", timeout=120)
    assert bad.returncode == 2 and "only the judge's pairs and the head's Flow-DPO" in bad.stderr
    assert "--set" in bad.stderr


def test_variant_parser_keeps_a_list_values_commas():
    """The variants benches' `--variant NAME:SET,SET`: a piece without "=" continues the value before it, so a
    comma-separated value (head_modules, lora_modules) stays whole; a field outside the bench's is refused."""
    import argparse
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from demo_args import variant_type

    parse = variant_type(("head_modules", "lr_head"), "the head's Flow-DPO settings")
    assert parse("inner:head_modules=blocks,queries,lr_head=1e-3") == (
        "inner", ["head_modules=blocks,queries", "lr_head=1e-3"])
    assert parse("default:") == ("default", [])
    with pytest.raises(argparse.ArgumentTypeError, match="not beta=3"):
        parse("x:head_modules=blocks,beta=3")
