"""The review of a saved dataset (issue 13): listing with stats, drops through a session token, tombstones only."""

import json

import pytest
import torch

from physmaster.preferences import PreferenceDataset
from physmaster.review import (DropFailed, MalformedReview, ReviewSessions, UnknownReview, parse_review_body,
                               review_listing)


def _dataset(tmp_path):
    ds = PreferenceDataset.open(tmp_path, "rev", create=True)
    g4, _ = ds.add_group_with_pairs(torch.randn(4, 2, 1, 4, 4), torch.randn(1, 3, 8),
                                    [(2, 0, 0.5), (2, 1, 1.0), (0, 1, 0.5)], "human")
    g3, _ = ds.add_group_with_pairs(torch.randn(3, 2, 1, 4, 4), torch.randn(1, 3, 8), [(1, 2, 0.3)], "judge")
    return ds, g4, g3


def test_listing_shows_groups_pairs_and_stats(tmp_path):
    ds, g4, g3 = _dataset(tmp_path)
    listing = review_listing(ds)
    assert [g["id"] for g in listing["groups"]] == [g3, g4]  # newest first
    assert listing["stats"] == {"groups": 2, "pairs": 4, "human": 3, "judge": 1, "dropped": 0, "dropped_groups": 0,
                                "candidates_per_group": {"3": 1, "4": 1}, "problems": []}
    first = listing["groups"][1]
    assert first["candidates"] == 4 and not first["dropped"]
    assert [(p["winner"], p["loser"], p["source"], p["margin"]) for p in first["pairs"]] == \
        [(2, 0, "human", 0.5), (2, 1, "human", 1.0), (0, 1, "human", 0.5)]
    json.dumps(listing)  # what the node sends to the browser
    assert review_listing(ds, max_groups=1)["shown"] == 1 and review_listing(ds, 1)["total_groups"] == 2


def test_drops_through_a_session_append_tombstones(tmp_path):
    ds, g4, g3 = _dataset(tmp_path)
    sessions = ReviewSessions()
    token = sessions.create(ds, 20)
    pair = sessions.listing(token)["groups"][1]["pairs"][2]
    before = ds.pairs_path.read_bytes()
    answer = sessions.drop_body(json.dumps({"token": token, "drop": {"group": g4, **{k: pair[k] for k in (
        "winner", "loser", "source", "created")}}}))
    assert answer["message"] == f"Dropped pair 1 > 2 of group {g4[:8]}."
    assert ds.pairs_path.read_bytes().startswith(before)
    review = answer["review"]
    assert [p["dropped"] for p in review["groups"][1]["pairs"]] == [False, False, True]
    assert review["stats"]["pairs"] == 3 and review["stats"]["dropped"] == 1
    answer = sessions.drop_body(json.dumps({"token": token, "drop": {"group": g3}}))
    assert answer["message"] == f"Dropped group {g3[:8]} (1 pair)."
    assert answer["review"]["groups"][0]["dropped"] and answer["review"]["stats"]["candidates_per_group"] == {"4": 1}
    again = sessions.drop_body(json.dumps({"token": token, "drop": {"group": g3}}))
    assert again["message"].endswith("already dropped")
    pairs, stats = ds.read_pairs()  # what training reads
    assert [(p.winner, p.loser) for p in pairs] == [(2, 0), (2, 1)] and stats.human == 2 and stats.judge == 0


@pytest.mark.parametrize("body,error,match", [
    (b"[" * 2000, MalformedReview, "nested too deeply"),
    (b"x" * 3000, MalformedReview, "more than a drop can be"),
    (b"{}", MalformedReview, "send exactly"),
    (b'{"token": 5, "drop": {"group": "a"}}', MalformedReview, "token must be"),
    (b'{"token": "t", "drop": {"group": "a", "path": "../x"}}', MalformedReview, "drop must be"),
    (b'{"token": "t", "drop": {"group": "a", "winner": "0", "loser": 1, "source": "human", "created": "x"}}',
     MalformedReview, "'winner' is '0'"),
    (b'{"token": "t", "drop": {"group": ["a"]}}', MalformedReview, "a JSON list"),
    (b'{"token": "0000", "drop": {"group": "a"}}', UnknownReview, "unknown or expired"),
])
def test_bad_drops_are_rejected_and_write_nothing(body, error, match, tmp_path):
    ds, _, _ = _dataset(tmp_path)
    sessions = ReviewSessions()
    sessions.create(ds, 20)
    before = ds.pairs_path.read_bytes()
    with pytest.raises(error, match=match):
        sessions.drop_body(body)
    assert ds.pairs_path.read_bytes() == before


def test_a_drop_must_name_what_is_in_the_dataset(tmp_path):
    ds, g4, _ = _dataset(tmp_path)
    sessions = ReviewSessions()
    token = sessions.create(ds, 20)
    before = ds.pairs_path.read_bytes()
    for drop, match in [({"group": "../../etc"}, "has no group"), ({"group": "f" * 32}, "has no group"),
                        ({"group": g4, "winner": 0, "loser": 2, "source": "human", "created": "now"}, "no such pair")]:
        with pytest.raises(MalformedReview, match=match):
            sessions.drop_body(json.dumps({"token": token, "drop": drop}))
    assert ds.pairs_path.read_bytes() == before
    assert parse_review_body(json.dumps({"token": token, "drop": {"group": g4}})) == (token, {"group": g4})


def test_a_drop_that_cannot_be_written_changes_nothing(tmp_path, monkeypatch):
    import errno
    import os

    ds, g4, _ = _dataset(tmp_path)
    sessions = ReviewSessions()
    token = sessions.create(ds, 20)
    before = ds.pairs_path.read_bytes()

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(DropFailed, match="could not drop: could not save a tombstone"):
        sessions.drop_body(json.dumps({"token": token, "drop": {"group": g4}}))
    monkeypatch.undo()
    assert ds.pairs_path.read_bytes() == before and ds.read_pairs()[1].pairs == 4


def test_sessions_expire(tmp_path, monkeypatch):
    import physmaster.review as review

    ds, g4, _ = _dataset(tmp_path)
    sessions = ReviewSessions()
    token = sessions.create(ds, 20)
    monkeypatch.setattr(review, "SESSION_SECONDS", 0.0)
    with pytest.raises(UnknownReview):
        sessions.drop_body(json.dumps({"token": token, "drop": {"group": g4}}))
