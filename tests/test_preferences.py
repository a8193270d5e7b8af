import json
import multiprocessing as mp
import re

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
    assert any("unreadable" in p for p in stats.problems)
    assert any(f"group {g2} is unusable" in p for p in stats.problems) and list(stats.bad_groups) == [g2]
    ds.group_path(g1).unlink()
    pairs, stats = ds.read_pairs()
    assert pairs == [] and any(f"group {g1} is missing" in p for p in stats.problems)


def _writer(path, group, start, count):
    ds = PreferenceDataset(path)
    for i in range(count):
        ds.add_pair(group, (start + i) % 3, (start + i + 1) % 3, "human", float(i))


def run_at_once(*jobs):
    """Start every (target, args) in its own spawned process, then wait; each must exit 0."""
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=target, args=args) for target, args in jobs]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0


def test_two_processes_append_at_once(tmp_path):
    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    g = _group(ds)
    run_at_once((_writer, (ds.path, g, 0, 150)), (_writer, (ds.path, g, 1, 150)))
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


# -- a write completes or raises (issue 9, item 2) -----------------------------------------------------------------
def _fake_write(monkeypatch, path, behave):
    """Replace os.write for the file at `path` only (matched by inode); `behave(real_write, fd, data)` decides."""
    import os

    real, ino = os.write, os.stat(path).st_ino
    calls = []

    def fake(fd, data):
        if os.fstat(fd).st_ino != ino:
            return real(fd, data)
        calls.append(bytes(data))
        return behave(real, fd, bytes(data))

    monkeypatch.setattr(os, "write", fake)
    return calls


def test_short_writes_are_continued(tmp_path, monkeypatch):
    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    g = _group(ds, n=4)
    ds.add_pair(g, 0, 1, "human")
    calls = _fake_write(monkeypatch, ds.pairs_path, lambda real, fd, data: real(fd, data[:7]))
    ds.add_pair(g, 2, 3, "judge", 0.5)
    ds.add_pairs(g, [(3, 0), (3, 1), (0, 1, 2.0)], "human")
    assert len(calls) > 20  # every line went out 7 bytes at a time
    pairs, stats = ds.read_pairs()
    assert [(p.winner, p.loser, p.margin) for p in pairs] == [(0, 1, 0.0), (2, 3, 0.5), (3, 0, 0.0), (3, 1, 0.0),
                                                              (0, 1, 2.0)]
    assert stats.problems == []


@pytest.mark.parametrize("failure", ["enospc after a short write", "no progress", "fsync fails"])
def test_a_full_disk_raises_and_leaves_nothing_behind(failure, tmp_path, monkeypatch):
    import errno
    import os

    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    g = _group(ds, n=4)
    ds.add_pair(g, 0, 1, "human")
    before = ds.pairs_path.read_bytes()
    if failure == "fsync fails":
        real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error"))
                            if os.fstat(fd).st_ino == os.stat(ds.pairs_path).st_ino else real_fsync(fd))
        match = "I/O error"
    else:
        state = {"written": 0}

        def behave(real, fd, data):
            if failure == "no progress":
                return 0
            if state["written"]:
                raise OSError(errno.ENOSPC, "No space left on device")
            state["written"] = real(fd, data[:10])  # part of the first line reaches the disk
            return state["written"]

        _fake_write(monkeypatch, ds.pairs_path, behave)
        match = "[Nn]o space left"
    with pytest.raises(DatasetError, match=match) as e:
        ds.add_pairs(g, [(3, 0), (3, 1), (0, 1)], "human")
    assert "nothing of this answer was saved" in str(e.value) and "pairs.jsonl" in str(e.value)
    with pytest.raises(DatasetError, match=match):
        ds.add_pair(g, 2, 1, "human")
    assert ds.pairs_path.read_bytes() == before  # rolled back to the previous size: no torn line
    monkeypatch.undo()
    ds.add_pair(g, 2, 3, "human")  # the disk has room again
    pairs, stats = ds.read_pairs()
    assert [(p.winner, p.loser) for p in pairs] == [(0, 1), (2, 3)] and stats.problems == []


# -- a person's answer is saved whole or not at all (issue 9, item 3) ------------------------------------------------
def test_an_answer_is_read_whole_or_not_at_all(tmp_path):
    from physmaster.picker import choice_to_pairs

    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    g = _group(ds, n=4)
    ds.add_pair(g, 0, 1, "judge")
    start = ds.pairs_path.stat().st_size
    ranking = choice_to_pairs({"ranking": [3, 1, 0, 2]})
    written = ds.add_pairs(g, ranking, "human")
    assert len(written) == 6 and len({p.created for p in written}) == 1
    data = ds.pairs_path.read_bytes()
    assert data.count(b"\n") == 7  # one line per pair, the answer's 6 in one append
    seen = set()
    for cut in range(start, len(data) + 1):  # a kill or a crash can leave any prefix of the append on disk
        ds.pairs_path.write_bytes(data[:cut])
        pairs, stats = ds.read_pairs()
        humans = [(p.winner, p.loser) for p in pairs if p.source == "human"]
        assert humans in ([], ranking), cut
        assert [(p.winner, p.loser) for p in pairs if p.source == "judge"] == [(0, 1)]
        if not humans and data[start:cut].count(b"\n"):
            assert any("of an answer's 6 pairs are saved" in p for p in stats.problems), (cut, stats.problems)
        seen.add(len(humans))
    assert seen == {0, 6}
    ds.pairs_path.write_bytes(data[:start + 700])  # torn mid-answer, then the next answer arrives
    ds.add_pairs(g, [(2, 3), (2, 0)], "human")
    pairs, stats = ds.read_pairs()
    assert [(p.winner, p.loser, p.source) for p in pairs] == [(0, 1, "judge"), (2, 3, "human"), (2, 0, "human")]


def test_group_with_pairs_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    import errno

    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    latents, context = torch.randn(3, 4, 2, 8, 8), torch.randn(1, 5, 16)
    with pytest.raises(DatasetError, match="out of range"):
        ds.add_group_with_pairs(latents, context, [(0, 1), (0, 3)], "human")
    assert ds.group_ids() == []  # checked before anything was written
    g, pairs = ds.add_group_with_pairs(latents, context, [(0, 1), (0, 2), (1, 2)], "human", meta={"prompt": "x"})
    assert [(p.group, p.winner, p.loser) for p in pairs] == [(g, 0, 1), (g, 0, 2), (g, 1, 2)]
    assert ds.group_meta(g)["prompt"] == "x" and ds.read_pairs()[1].pairs == 3
    before = ds.pairs_path.read_bytes()

    def full(real, fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    _fake_write(monkeypatch, ds.pairs_path, full)
    with pytest.raises(DatasetError, match="No space left"):
        ds.add_group_with_pairs(latents, context, [(2, 1)], "human")
    assert ds.group_ids() == [g] and ds.pairs_path.read_bytes() == before  # the new group was removed again


def test_an_answer_whose_file_cannot_be_opened_is_a_dataset_error_and_leaves_nothing(tmp_path):
    """Not only a failed write: a pairs.jsonl that cannot be opened (or locked) is a DatasetError too, so the picker
    can tell the person, and the answer's new group is removed again."""
    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    g = _group(ds)
    ds.pairs_path.mkdir()  # opening it for appending fails (IsADirectoryError), even as root
    with pytest.raises(DatasetError, match="could not save 3 pairs to .*nothing of this answer was saved"):
        ds.add_group_with_pairs(torch.randn(3, 4, 2, 8, 8), torch.randn(1, 5, 16), [(0, 1), (0, 2), (1, 2)], "human")
    with pytest.raises(DatasetError, match="could not save 1 pair to"):
        ds.add_pair(g, 0, 1, "human")
    assert ds.group_ids() == [g]


def test_writers_share_one_filelock(tmp_path, monkeypatch):
    from filelock import FileLock

    import physmaster.preferences as prefs

    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    g = _group(ds)
    monkeypatch.setattr(prefs, "LOCK_TIMEOUT", 0.2)
    with FileLock(str(ds.path / ".lock")):  # another writer holds the dataset
        with pytest.raises(DatasetError, match="stayed locked by another writer"):
            ds.add_pair(g, 0, 1, "human")
    ds.add_pair(g, 0, 1, "human")
    assert ds.read_pairs()[1].pairs == 1


# -- untrusted lines and groups are reported and skipped, never raised (issue 9, item 4) -----------------------------
def _line(**record):
    """A pairs.jsonl line with a valid checksum, as a forger (or a newer writer) would make it."""
    from physmaster.preferences import _crc

    record = {"source": "human", "margin": 0.0, "created": "2025-01-01T00:00:00+00:00", **record}
    record["crc"] = _crc(record)
    return json.dumps(record, sort_keys=True).encode()


def test_hostile_lines_are_reported_and_skipped(tmp_path):
    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    g = _group(ds)
    ds.add_pair(g, 0, 1, "human")
    hostile = [
        (b"[" * 100_000, "100000 bytes, longer than a pair line can be (4096)"),
        (b"[" * 3000, "nested too deeply"),
        (_line(group=g, winner=float("inf"), loser=1).replace(b"Infinity", b"1e999"),
         "winner must be a whole number (a candidate index), got inf"),
        (_line(group=g, winner=2.7, loser=1), "winner must be a whole number (a candidate index), got 2.7"),
        (_line(group=g, winner=True, loser=0), "winner must be a whole number (a candidate index), got True"),
        (_line(group=g, winner=2, loser=1.0), "loser must be a whole number (a candidate index), got 1.0"),
        (_line(group=g, winner=2, loser=1, source=["human"]),
         "source must be one of ('human', 'judge'), got a JSON list"),
        (_line(group=g, winner=2, loser=1, margin=10**400), "int too large to convert to float"),
        (_line(group=g, winner=2, loser=1).replace(b'"margin": 0.0', b'"margin": NaN'), "NaN is not a number"),
        (_line(group=[g], winner=2, loser=1), "group must be a group id, got a JSON list"),
        (_line(group=g, winner=2, loser=1, answer="x", answer_size=2), "answer must be an answer id"),
        (_line(group=g, winner=10**50, loser=1), f"indices {10**50}/1 invalid"),
        (b"[1, 2]", "not a JSON object but a JSON list"),
        (b'{"group": "' + g.encode() + b'", "winner": 2, "loser": 1}', "checksum mismatch"),
    ]
    with open(ds.pairs_path, "ab") as f:
        for line, _ in hostile:
            f.write(line + b"\n")
    ds.add_pair(g, 2, 1, "judge", 0.25)
    pairs, stats = ds.read_pairs()
    assert [(p.winner, p.loser, p.source) for p in pairs] == [(0, 1, "human"), (2, 1, "judge")]
    assert len(stats.problems) == len(hostile)
    for lineno, ((_, want), got) in enumerate(zip(hostile, stats.problems), 2):
        assert got.startswith(f"pairs.jsonl line {lineno}: ") and want in got, (want, got)


@pytest.mark.parametrize("meta, want", [
    ('{"candidates": "abc"}', "field 'candidates' must be a whole number 2..4096, got 'abc'"),
    ('{"candidates": null}', "field 'candidates' must be a whole number 2..4096, got None"),
    ('{"candidates": 1e999}', "field 'candidates' must be a whole number 2..4096, got inf"),
    ('{"candidates": 3.0}', "got 3.0"),
    ('{"candidates": true}', "got True"),
    ('{"candidates": 100000000}', "got 100000000"),
    ('{"id": "x"}', "got None"),
    ("[3, 3]", "metadata must be a JSON object, not a JSON list"),
    ('"text"', "metadata must be a JSON object, not 'text'"),
    ("[" * 100_000, "metadata is nested too deeply"),
    ("{nope", "metadata is not valid JSON"),
])
def test_hostile_group_metadata_is_reported_and_skipped(meta, want, tmp_path):
    from safetensors.torch import save_file

    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    good = _group(ds)
    ds.add_pair(good, 0, 1, "human")
    bad = "f" * 32
    save_file({"latents": torch.zeros(3, 4, 2, 8, 8), "context": torch.zeros(1, 5, 16)},
              str(ds.group_path(bad)), metadata={"physmaster.group": meta})
    with open(ds.pairs_path, "ab") as f:
        f.write(_line(group=bad, winner=0, loser=1) + b"\n")
    pairs, stats = ds.read_pairs()
    assert [p.group for p in pairs] == [good] and stats.groups == 1
    assert list(stats.bad_groups) == [bad]
    assert want in stats.bad_groups[bad] and f"groups/{bad}.safetensors in dataset 'd'" in stats.bad_groups[bad]
    assert stats.problems == [stats.bad_groups[bad], f"pairs.jsonl line 2: group {bad} is unusable (see above)"]
    with pytest.raises(DatasetError, match="group file"):
        ds.add_pair(bad, 0, 1, "human")


# -- the Dataset node's stats check what training will (issue 9, item 11) ----------------------------------------
def _forge(ds, latents, context, candidates, group="e" * 32):
    from safetensors.torch import save_file

    save_file({"latents": latents, "context": context}, str(ds.group_path(group)),
              metadata={"physmaster.group": json.dumps({"id": group, "candidates": candidates})})
    return group


@pytest.mark.parametrize("case", ["fewer latents", "other latent shape", "other context width", "no context",
                                  "integer latents"])
def test_groups_are_checked_as_training_will(case, tmp_path):
    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    good = _group(ds, n=3)
    ds.add_pair(good, 2, 0, "human")
    latents, context, want = torch.zeros(3, 4, 2, 8, 8), torch.zeros(1, 5, 16), None
    if case == "fewer latents":  # training failed with "index 2 is out of bounds"
        latents = latents[:2]
        want = "holds 2 candidate latents but its metadata says 3 candidates"
    elif case == "other latent shape":
        latents = torch.zeros(3, 4, 2, 8, 16)
        want = "its latents are shaped [4, 2, 8, 16] per candidate, but the dataset's are [4, 2, 8, 8]"
    elif case == "other context width":
        context = torch.zeros(1, 5, 32)
        want = "its context is 32 wide, but the dataset's is 16"
    elif case == "no context":
        context = torch.zeros(5, 16)
        want = "has no 'context' tensor [batch, length, width]"
    else:
        latents = torch.zeros(3, 4, 2, 8, 8, dtype=torch.int64)
        want = "its latents are I64, not floating point"
    bad = _forge(ds, latents, context, candidates=3)
    with open(ds.pairs_path, "ab") as f:
        f.write(_line(group=bad, winner=2, loser=0) + b"\n")
    pairs, stats = ds.read_pairs()
    assert [p.group for p in pairs] == [good]
    message = stats.bad_groups[bad]
    assert message.startswith(f"group file groups/{bad}.safetensors in dataset 'd'") and want in message
    assert "1 groups, 1 usable pairs (1 human, 0 judge); 1 unusable group; 2 entries skipped" in stats.summary()
    with pytest.raises(DatasetError, match=re.escape(want)):
        ds.check_group(bad, [4, 2, 8, 8], 16)
    assert ds.check_group(good, [4, 2, 8, 8], 16) == (3, [4, 2, 8, 8], 16)


def test_groups_agree_without_dataset_json_and_a_broken_one_is_reported(tmp_path):
    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    first = _group(ds)
    ds.info_path.unlink()  # e.g. a hand-assembled dataset: the first group sets the shapes
    other = _forge(ds, torch.zeros(3, 4, 2, 8, 16), torch.zeros(1, 5, 16), 3, group="f" * 32)
    _, stats = ds.read_pairs()
    assert stats.groups == 1 and list(stats.bad_groups) == [other] and first not in stats.bad_groups
    for text, want in [("[1]", "must hold a JSON object, not a JSON list"),
                       ('{"latent_shape": [4, 2, 8, 8], "context_dim": "abc"}',
                        "context_dim must be a whole number 1..1048576, got 'abc'"),
                       ('{"latent_shape": [4, 2.5], "context_dim": 16}', "latent_shape must be a list"),
                       ('{"latent_shape": ' + "[" * 5000, "nested too deeply"),
                       ('{"latent_shape": [4, 2, 8, 8], "context_dim": 16, "format_version": 7}', "newer")]:
        ds.info_path.write_text(text)
        with pytest.raises(DatasetError, match=re.escape(want)):
            ds.info()
        pairs, stats = ds.read_pairs()  # reported, and the groups are still checked against each other
        assert want in stats.problems[0] and stats.groups == 1 and list(stats.bad_groups) == [other]


# -- no litter (issue 9, item 13) -----------------------------------------------------------------------------------
def test_a_dataset_folder_is_made_only_by_a_write(tmp_path):
    ds = PreferenceDataset.open(tmp_path, "later", create=True)  # the picker opens, then the person cancels
    ds.check_compatible([4, 2, 8, 8], 16)
    pairs, stats = ds.read_pairs()
    assert (pairs, stats.groups, stats.problems) == ([], 0, [])
    with pytest.raises(DatasetError, match="missing"):
        ds.add_pair("a" * 32, 0, 1, "human")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DatasetError, match="'later' not found"):
        PreferenceDataset.open(tmp_path, "later")
    g = _group(ds)
    assert {p.name for p in ds.path.iterdir()} - {".lock"} == {"dataset.json", "groups"}  # .lock: filelock's
    assert PreferenceDataset.open(tmp_path, "later").group_ids() == [g]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DatasetError, match="is a file, not a preference dataset folder"):
        PreferenceDataset.open(tmp_path, "afile", create=True)


def test_stale_temp_files_of_killed_writers_are_removed_on_open(tmp_path):
    import os
    import time

    from physmaster.fileio import atomic_path

    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    g = _group(ds)

    def killed_write(target):  # what a writer SIGKILLed inside atomic_path leaves: its temp file, never renamed
        tmp = atomic_path(target).__enter__()
        tmp.write_bytes(b"x" * 1000)
        return tmp

    old_group = killed_write(ds.path / "groups" / ("b" * 32 + ".safetensors"))
    old_info = killed_write(ds.info_path)
    live = killed_write(ds.path / "groups" / ("c" * 32 + ".safetensors"))  # a writer still at work
    keep = [ds.path / ".notes.tmp", ds.path / "groups" / "x.safetensors.abcdefgh.tmp"]  # not named by atomic_path
    for p in keep:
        p.write_text("mine")
    odd = ds.path / ".link.abcdefgh.tmp"
    odd.symlink_to(ds.info_path)
    two_hours_ago = time.time() - 7200
    for p in [old_group, old_info, *keep]:
        os.utime(p, (two_hours_ago, two_hours_ago))
    os.utime(odd, (two_hours_ago, two_hours_ago), follow_symlinks=False)
    assert old_group.name.startswith("." + "b" * 32 + ".safetensors.") and old_group.name.endswith(".tmp")

    PreferenceDataset.open(tmp_path, "d")
    assert not old_group.exists() and not old_info.exists()
    assert live.exists() and all(p.exists() for p in keep) and odd.is_symlink()
    assert ds.group_ids() == [g] and ds.info() is not None


def test_a_group_that_cannot_be_written_is_a_dataset_error(tmp_path, monkeypatch):
    import safetensors.torch

    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    g = _group(ds)

    def full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise Exception("Error while serializing: I/O error: No space left on device (os error 28)")  # as safetensors

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(DatasetError, match="could not save a group to .*No space left on device.*nothing of it"):
        ds.add_group_with_pairs(torch.randn(3, 4, 2, 8, 8), torch.randn(1, 5, 16), [(0, 1)], "human")
    assert ds.group_ids() == [g] and sorted(p.name for p in (ds.path / "groups").iterdir()) == [f"{g}.safetensors"]


# -- tombstones (issue 13): dropping appends a checksummed line that every reader honours ------------------------
def test_a_dropped_pair_is_left_out_by_readers_and_stats(tmp_path):
    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    g = _group(ds, n=4)
    ds.add_pairs(g, [(0, 1, 1.0), (0, 2, 0.5), (3, 1, 0.5)], "human")
    ds.add_pair(g, 2, 1, "judge", 0.2)
    before = ds.pairs_path.read_bytes()
    pairs, _ = ds.read_pairs()
    wrong = pairs[1]
    drop = ds.drop_pair(wrong, "clicked the wrong one")
    assert ds.pairs_path.read_bytes().startswith(before)  # appended, never rewritten
    tomb = json.loads(ds.pairs_path.read_bytes()[len(before):])
    assert tomb["drop"] == "pair" and tomb["crc"] and (tomb["winner"], tomb["loser"]) == (0, 2)
    assert drop.pair == wrong.key() and drop.reason == "clicked the wrong one"
    pairs, stats = ds.read_pairs()
    assert [(p.winner, p.loser, p.source) for p in pairs] == [(0, 1, "human"), (3, 1, "human"), (2, 1, "judge")]
    assert (stats.pairs, stats.human, stats.judge, stats.dropped, stats.groups) == (3, 2, 1, 1, 1)
    assert stats.problems == [] and "1 pair dropped" in stats.summary()
    every, stats2 = ds.read_pairs(include_dropped=True)
    assert len(every) == 4 and [ds.is_dropped(p) for p in every] == [False, True, False, False]
    assert stats2.pairs == 3  # the stats never count a dropped pair
    kept, problems = ds.screen_pairs(pairs)
    assert kept == pairs and problems == []


def test_a_dropped_group_drops_all_its_pairs_even_later_ones(tmp_path):
    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    g1, g2 = _group(ds), _group(ds)
    ds.add_pairs(g1, [(0, 1), (0, 2), (1, 2)], "human")
    ds.add_pair(g2, 2, 0, "judge", 0.4)
    ds.drop_group(g1, "bad start image")
    ds.add_pair(g1, 2, 1, "human")  # written after the drop: the group stays dropped
    pairs, stats = ds.read_pairs()
    assert [(p.group, p.winner, p.loser) for p in pairs] == [(g2, 2, 0)]
    assert (stats.groups, stats.pairs, stats.human, stats.judge, stats.dropped) == (1, 1, 0, 1, 4)
    assert stats.dropped_groups == {g1} and "4 pairs dropped (1 whole group)" in stats.summary()
    assert ds.drops().groups == {g1} and ds.group_path(g1).is_file()  # the group file is kept
    # a merge takes only what is not dropped
    other = PreferenceDataset.open(tmp_path, "other", create=True)
    other.merge_from(ds)
    assert other.group_ids() == [g2] and [(p.winner, p.loser) for p in other.read_pairs()[0]] == [(2, 0)]
    with pytest.raises(DatasetError, match="invalid group id"):
        ds.drop_group("../../x")


def test_an_edited_or_torn_tombstone_is_reported_and_ignored(tmp_path):
    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    g = _group(ds)
    ds.add_pairs(g, [(0, 1), (2, 1)], "human")
    start = ds.pairs_path.stat().st_size
    ds.drop_pair(ds.read_pairs()[0][0])
    data = ds.pairs_path.read_bytes()
    edited = data[:start] + data[start:].replace(b'"winner": 0', b'"winner": 2')
    ds.pairs_path.write_bytes(edited)
    pairs, stats = ds.read_pairs()
    assert len(pairs) == 2 and stats.dropped == 0  # an edited tombstone drops nothing
    assert any("checksum mismatch" in p for p in stats.problems)
    for cut in range(start + 1, len(data) - 1):  # a writer killed mid-tombstone: nothing dropped, line reported
        ds.pairs_path.write_bytes(data[:cut])
        pairs, stats = ds.read_pairs()
        assert len(pairs) == 2 and stats.dropped == 0, cut
        assert len(stats.problems) == 1, (cut, stats.problems)
    ds.drop_group(g)  # the next append ends the torn line first
    pairs, stats = ds.read_pairs()
    assert pairs == [] and stats.dropped == 2 and len(stats.problems) == 1


@pytest.mark.parametrize("field,value,want", [
    ("drop", "answer", "drop must be one of"), ("group", "../x", "group must be a group id"),
    ("winner", "0", "winner must be a whole number"), ("source", "crowd", "source must be one of"),
    ("reason", "x" * 201, "reason must be a text"), ("pair_created", 5, "pair_created must be"),
])
def test_hostile_tombstones_are_reported_and_skipped(field, value, want, tmp_path):
    from physmaster.preferences import _crc

    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    g = _group(ds)
    ds.add_pair(g, 0, 1, "human")
    record = {"drop": "pair", "group": g, "winner": 0, "loser": 1, "source": "human",
              "pair_created": ds.read_pairs()[0][0].created, "created": "now", "reason": ""}
    record[field] = value
    record["crc"] = _crc(record)
    with open(ds.pairs_path, "a") as f:
        f.write(json.dumps(record) + "\n")
    pairs, stats = ds.read_pairs()
    assert len(pairs) == 1 and stats.dropped == 0
    assert len(stats.problems) == 1 and want in stats.problems[0], stats.problems


def _dropper(path, groups):
    ds = PreferenceDataset(path)
    for g in groups:
        ds.drop_group(g, "two writers")


def test_drops_and_answers_from_two_processes_at_once(tmp_path):
    ds = PreferenceDataset.open(tmp_path, "d", create=True)
    g = _group(ds)
    others = [_group(ds, n=2) for _ in range(40)]
    for o in others:
        ds.add_pair(o, 0, 1, "judge")
    run_at_once((_writer, (ds.path, g, 0, 150)), (_dropper, (ds.path, others)))
    pairs, stats = ds.read_pairs()
    assert stats.problems == [] and len(pairs) == 150 and {p.group for p in pairs} == {g}
    assert stats.dropped == 40 and stats.groups == 1


def test_opening_a_missing_or_misplaced_folder_says_what_to_do(tmp_path):
    from physmaster.videoset import VideoDataset, VideoSetError

    for cls, error, what, advice in ((PreferenceDataset, DatasetError, "preference dataset",
                                      "PhysMasterPreferencePicker"),
                                     (VideoDataset, VideoSetError, "video set", "PhysMasterSaveTrainingVideos")):
        with pytest.raises(error, match=f"{what} 'nope' not found in .*{advice} first, or check the name"):
            cls.open(tmp_path, "nope")
        (tmp_path / "afile").write_text("x")
        with pytest.raises(error, match=f"is a file, not a {what} folder: choose another name"):
            cls.open(tmp_path, "afile", create=True)
        assert cls.open(tmp_path, "new", create=True).path == tmp_path / "new"
        assert not (tmp_path / "new").exists()  # opening writes nothing
