import json
import multiprocessing as mp

import pytest
import torch

from physmaster.preferences import DatasetError, PreferenceDataset, validate_name


def _group(ds, n=3, shape=(4, 2, 8, 8), ctx=16):
    return ds.add_group(torch.randn(n, *shape), torch.randn(1, 5, ctx), extras={"features": torch.randn(1, 7, 12)},
                        meta={"prompt": "a ball"})


def test_roundtrip_and_stats(tmp_path):
    ds = PreferenceDataset.open(tmp_path, "balls", create=True)
    g = _group(ds)
    ds.add_pair(g, 0, 2, "human", 0.0)
    ds.add_pair(g, 1, 2, "judge", 0.3)
    pairs, stats = ds.read_pairs()
    assert [(p.winner, p.loser, p.source) for p in pairs] == [(0, 2, "human"), (1, 2, "judge")]
    assert (stats.groups, stats.pairs, stats.human, stats.judge, stats.problems) == (1, 2, 1, 1, [])
    tensors = ds.load_group(g)
    assert tensors["latents"].shape == (3, 4, 2, 8, 8) and tensors["features"].shape == (1, 7, 12)
    assert ds.group_meta(g)["prompt"] == "a ball"
    assert "2 usable pairs (1 human, 1 judge)" in stats.summary()


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "a\\b", "..", "x..y", ".hidden", "a" * 65, "name with space",
                                 "evil\n", "evil\r\n", "\nevil", "evil\x00"])
def test_names_validated(bad, tmp_path):
    with pytest.raises(DatasetError, match="invalid dataset name"):
        validate_name(bad)
    with pytest.raises(DatasetError):
        PreferenceDataset.open(tmp_path, bad, create=True)
    assert list(tmp_path.iterdir()) == []


def test_group_ids_are_matched_in_full(tmp_path):
    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    with pytest.raises(DatasetError, match="invalid group id"):
        ds.group_path("a" * 32 + "\n")


def test_missing_dataset_is_named(tmp_path):
    with pytest.raises(DatasetError, match="'nope' not found"):
        PreferenceDataset.open(tmp_path, "nope")


def test_bad_pairs_rejected_on_write(tmp_path):
    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    g = _group(ds, n=2)
    with pytest.raises(DatasetError, match="out of range"):
        ds.add_pair(g, 0, 5, "human")
    with pytest.raises(DatasetError, match="different"):
        ds.add_pair(g, 1, 1, "human")
    with pytest.raises(DatasetError, match="source"):
        ds.add_pair(g, 0, 1, "crowd")
    with pytest.raises(DatasetError, match="invalid group id"):
        ds.add_pair("../../etc/passwd", 0, 1, "human")
    with pytest.raises(DatasetError, match="at least 2"):
        ds.add_group(torch.randn(1, 4, 2, 8, 8), torch.randn(1, 5, 16))


def test_other_model_is_named(tmp_path):
    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    _group(ds)
    with pytest.raises(DatasetError, match=r"another model.*latent shape \[4, 2, 8, 8\] vs \[4, 2, 8, 16\]"):
        ds.add_group(torch.randn(2, 4, 2, 8, 16), torch.randn(1, 5, 16))
    with pytest.raises(DatasetError, match="context width 16 vs 32"):
        ds.check_compatible([4, 2, 8, 8], 32)


def test_torn_and_corrupt_lines_are_skipped_and_reported(tmp_path):
    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    g = _group(ds)
    ds.add_pair(g, 0, 1, "human")
    with open(ds.pairs_path, "ab") as f:  # a writer killed mid-line
        f.write(b'{"group": "' + g.encode() + b'", "winner": 2, "lo')
    ds.add_pair(g, 2, 1, "human")  # must not be glued onto the torn line
    with open(ds.pairs_path, "a") as f:
        bad = json.loads(ds.pairs_path.read_text().splitlines()[0])
        bad["winner"] = 2  # edited without a valid checksum
        f.write(json.dumps(bad) + "\n")
        f.write("not json\n")
    pairs, stats = ds.read_pairs()
    assert [(p.winner, p.loser) for p in pairs] == [(0, 1), (2, 1)]
    assert len(stats.problems) == 3 and all("pairs.jsonl line" in p for p in stats.problems)


def test_missing_or_corrupt_group_skips_its_pairs(tmp_path):
    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    g1, g2 = _group(ds), _group(ds)
    ds.add_pair(g1, 0, 1, "human")
    ds.add_pair(g2, 0, 1, "human")
    ds.group_path(g2).write_bytes(b"garbage")
    pairs, stats = ds.read_pairs()
    assert [p.group for p in pairs] == [g1]
    assert any("unreadable" in p for p in stats.problems) and any("missing" in p for p in stats.problems)


def _writer(path, group, start, count):
    ds = PreferenceDataset(path)
    for i in range(count):
        ds.add_pair(group, (start + i) % 3, (start + i + 1) % 3, "human", float(i))


def test_two_processes_append_at_once(tmp_path):
    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    g = _group(ds)
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(ds.path, g, s, 150)) for s in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    pairs, stats = ds.read_pairs()
    assert stats.problems == [] and len(pairs) == 300


def test_merge(tmp_path):
    a = PreferenceDataset.open(tmp_path, "a", create=True)
    b = PreferenceDataset.open(tmp_path, "b", create=True)
    ga, gb = _group(a), _group(b)
    a.add_pair(ga, 0, 1, "human")
    b.add_pair(gb, 1, 2, "judge", 0.5)
    a.merge_from(b)
    a.merge_from(b)  # idempotent
    pairs, stats = a.read_pairs()
    assert (stats.groups, stats.pairs, stats.human, stats.judge) == (2, 2, 1, 1)
    c = PreferenceDataset.open(tmp_path, "c", create=True)
    c.add_group(torch.randn(2, 1, 1, 4, 4), torch.randn(1, 5, 16))
    with pytest.raises(DatasetError, match="another model"):
        a.merge_from(c)


def test_group_with_shared_tensors(tmp_path):
    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    hidden = torch.randn(1, 7, 12)
    g = ds.add_group(torch.randn(2, 4, 2, 8, 8), torch.randn(1, 5, 16),
                     extras={"features": hidden, "clip_vision.penultimate_hidden_states": hidden})
    t = ds.load_group(g)
    assert torch.equal(t["features"], t["clip_vision.penultimate_hidden_states"])
