import json
import threading
import time

import pytest

from physmaster.errors import PhysMasterError
from physmaster.picker import ChoiceRejected, PendingChoices, choice_to_pairs, validate_choice


def test_validate_choice_forms():
    assert validate_choice({"best": 2, "worst": 0}, 3) == {"best": 2, "worst": 0}
    assert validate_choice({"ranking": [1, 0, 2]}, 3) == {"ranking": [1, 0, 2]}
    assert validate_choice({"skip": True}, 3) == {"skip": True}


@pytest.mark.parametrize("bad,match", [
    ({"best": 0, "worst": 0}, "different"),
    ({"best": 3, "worst": 0}, "0..2"),
    ({"best": True, "worst": 0}, "candidate index"),
    ({"best": "0", "worst": 1}, "candidate index"),
    ({"ranking": [0, 1]}, "exactly once"),
    ({"ranking": [0, 0, 1]}, "exactly once"),
    ({"best": 0, "worst": 1, "path": "/etc/passwd"}, "unexpected fields"),
    ({"file": "../x"}, "unexpected fields"),
    ("0,1", "must be an object"),
])
def test_validate_choice_rejects(bad, match):
    with pytest.raises(ChoiceRejected, match=match):
        validate_choice(bad, 3)


def test_pairs_from_choices():
    assert choice_to_pairs({"best": 2, "worst": 0}) == [(2, 0)]
    assert choice_to_pairs({"ranking": [2, 0, 1]}) == [(2, 0), (2, 1), (0, 1)]
    assert choice_to_pairs({"skip": True}) == []


def test_answer_wakes_the_waiter():
    reg = PendingChoices()
    rid = reg.create(3, "7")
    threading.Timer(0.2, lambda: reg.answer(rid, {"best": 1, "worst": 2})).start()
    t0 = time.monotonic()
    assert reg.wait(rid, timeout=10) == {"best": 1, "worst": 2}
    assert time.monotonic() - t0 < 5
    with pytest.raises(ChoiceRejected, match="unknown or expired"):  # late duplicate
        reg.answer(rid, {"best": 0, "worst": 2})


def test_timeout_then_stale_answer_rejected():
    reg = PendingChoices()
    rid = reg.create(2, "1")
    assert reg.wait(rid, timeout=0.2) is None
    with pytest.raises(ChoiceRejected, match="unknown or expired"):
        reg.answer(rid, {"best": 0, "worst": 1})


def test_forged_id_and_bad_choice_do_not_resolve():
    reg = PendingChoices()
    rid = reg.create(2, "1")
    with pytest.raises(ChoiceRejected, match="unknown"):
        reg.answer("f" * 32, {"best": 0, "worst": 1})
    with pytest.raises(ChoiceRejected):
        reg.answer(rid, {"best": 0, "worst": 5})
    assert rid in reg.pending_ids()  # a bad answer does not consume the request
    reg.answer(rid, {"best": 1, "worst": 0})
    assert reg.wait(rid, timeout=1) == {"best": 1, "worst": 0}


def test_interrupt_ends_the_wait():
    reg = PendingChoices()
    rid = reg.create(2, "1")
    calls = []

    def check():
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        reg.wait(rid, timeout=30, check_interrupt=check, poll=0.01)
    assert rid not in reg.pending_ids()


def test_two_requests_at_once_are_independent():
    reg = PendingChoices()
    a, b = reg.create(2, "1"), reg.create(3, "2")
    assert a != b
    reg.answer(b, {"ranking": [2, 1, 0]})
    assert reg.wait(a, timeout=0.1) is None
    assert reg.wait(b, timeout=0.1) == {"ranking": [2, 1, 0]}


def test_batch_of_one_is_a_clear_error():
    with pytest.raises(PhysMasterError, match="at least 2 candidates.*batch_size"):
        PendingChoices().create(1, "1")


# -- any malformed body is a clear rejection, never a crash (issue 9, item 7) -----------------------------------------
@pytest.mark.parametrize("body, match", [
    (b"[" * 4000, "nested too deeply"),
    (b'{"request_id": "x", "choice": ' + b"[" * 4000, "nested too deeply"),
    (b"{" * 2000, "must be JSON"),
    (b"[1, 2]", "send exactly"),
    (b"42", "send exactly"),
    (b'"text"', "send exactly"),
    (b"null", "send exactly"),
    (b"", "must be JSON"),
    (b"\xff\xfe not utf-8", "must be JSON in UTF-8"),
    ('{"request_id": "a", "choice": {"skip": true}}'.encode("utf-16"), "must be JSON in UTF-8"),  # valid, not UTF-8
    (b'{"request_id": "a", "choice": {"best": NaN, "worst": 0}}', "must be JSON"),
    (b'{"request_id": "a", "choice": {}, "extra": 1}', "send exactly"),
    (b'{"request_id": 5, "choice": {}}', "request_id must be the id the picker sent, got 5"),
    (b'{"request_id": ["a"], "choice": {}}', "got a JSON list"),
    (b'{"request_id": "' + b"a" * 100 + b'", "choice": {}}', "request_id must be the id"),
    (b" " * 5000, r"5000 bytes, more than an answer can be \(4096\)"),
])
def test_malformed_bodies_are_rejected_clearly(body, match):
    from physmaster.picker import MalformedAnswer, parse_answer

    with pytest.raises(MalformedAnswer, match=match):
        parse_answer(body)
    reg = PendingChoices()
    rid = reg.create(3, "n")
    with pytest.raises(ChoiceRejected, match=match):
        reg.answer_body(body)
    assert reg.pending_ids() == [rid]  # nothing answered


def test_answer_body_sorts_stale_from_malformed():
    import json

    from physmaster.picker import MalformedAnswer, StaleAnswer

    reg = PendingChoices()
    rid = reg.create(3, "n")
    deep = {"ranking": json.loads("[" * 500 + "]" * 500)}
    for choice, match in [(deep, "ranking entry must be a candidate index 0..2, got a JSON list"),
                          ({"best": 10**100, "worst": 0}, "got a huge number"),
                          ({"best": 0.0, "worst": 1}, "got 0.0"),
                          ({"ranking": "012"}, "exactly once"),
                          ({"x" * 100: 1}, "unexpected fields 'xxxx"),
                          ([0, 1], "must be an object")]:
        with pytest.raises(MalformedAnswer, match=match):
            reg.answer_body(json.dumps({"request_id": rid, "choice": choice}))
    with pytest.raises(StaleAnswer, match="unknown or expired"):
        reg.answer_body(json.dumps({"request_id": "0" * 32, "choice": {"best": 0, "worst": 1}}))
    assert reg.answer_body(json.dumps({"request_id": rid, "choice": {"ranking": [2, 0, 1]}})) == {"ranking": [2, 0, 1]}
    with pytest.raises(StaleAnswer, match="already answered"):
        reg.answer_body(json.dumps({"request_id": rid, "choice": {"best": 0, "worst": 1}}).encode())


def test_random_bodies_raise_only_choice_rejected():
    import random

    reg = PendingChoices()
    rid = reg.create(4, "n")
    rng = random.Random(9)
    alphabet = ['[', ']', '{', '}', '"', ':', ',', '0', '1', '-', 'e', '9', 'true', 'null', ' ', '"best"', '"worst"',
                '"ranking"', '"choice"', '"request_id"', f'"{rid}"', '\\u0000', '\x00', '1e999']
    for _ in range(400):
        body = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        try:
            reg.answer_body(body)
        except ChoiceRejected:
            pass


# -- ranking with ties, pairs policy, margins, undo (issue 13) -------------------------------------------------------
def test_a_ranking_with_ties_is_validated_and_normalised():
    assert validate_choice({"ranking": [2, [0, 3], 1]}, 4) == {"ranking": [2, [0, 3], 1]}
    assert validate_choice({"ranking": [[2], 0, [1]]}, 3) == {"ranking": [2, 0, 1]}  # a tie of one is a place
    assert validate_choice({"ranking": [[0, 1, 2]]}, 3) == {"ranking": [[0, 1, 2]]}  # all equal: allowed, no pair
    for bad, match in [({"ranking": [2, [0, 0], 1]}, "exactly once"), ({"ranking": [2, [], 0, 1]}, "got a JSON list"),
                       ({"ranking": [2, [0, [3]], 1]}, "got a JSON list"), ({"ranking": [2, [0], 1]}, "exactly once"),
                       ({"ranking": [[0, 1, 2, 3, 3]]}, "got a JSON list")]:
        with pytest.raises(ChoiceRejected, match=match):
            validate_choice(bad, 4)


def test_pairs_a_ranking_implies():
    from physmaster.picker import choice_pairs

    ranking = {"ranking": [3, 1, 0, 2]}
    assert choice_pairs(ranking) == [(3, 1, 1 / 3), (3, 0, 2 / 3), (3, 2, 1.0), (1, 0, 1 / 3), (1, 2, 2 / 3),
                                     (0, 2, 1 / 3)]
    assert choice_pairs(ranking, "best vs each") == [(3, 1, 1 / 3), (3, 0, 2 / 3), (3, 2, 1.0)]
    tied = validate_choice({"ranking": [2, [0, 3], 1]}, 4)
    assert choice_pairs(tied) == [(2, 0, 0.5), (2, 3, 0.5), (2, 1, 1.0), (0, 1, 0.5), (3, 1, 0.5)]
    assert choice_pairs(tied, "best vs each") == [(2, 0, 0.5), (2, 3, 0.5), (2, 1, 1.0)]
    top_tie = validate_choice({"ranking": [[1, 2], 0]}, 3)
    assert choice_pairs(top_tie, "best vs each") == [(1, 0, 1.0), (2, 0, 1.0)]
    assert choice_pairs({"ranking": [[0, 1, 2]]}) == []
    assert choice_pairs({"best": 2, "worst": 0}, "best vs each") == [(2, 0, 1.0)]  # the quick path is one pair
    assert choice_to_pairs({"ranking": [3, 1, 0, 2]}) == [(w, lo) for w, lo, _ in choice_pairs(ranking)]
    with pytest.raises(PhysMasterError, match="ranking_pairs must be one of"):
        choice_pairs(ranking, "some")


def test_undo_takes_a_saved_answer_back_once():
    from physmaster.picker import StaleAnswer, UndoFailed

    reg = PendingChoices()
    rid = reg.create(3, "7")
    with pytest.raises(StaleAnswer, match="nothing is saved for it yet"):
        reg.answer(rid, {"undo": True})
    reg.answer(rid, {"best": 0, "worst": 1})
    assert reg.wait(rid, timeout=1) == {"best": 0, "worst": 1}
    calls = []

    def undo():
        calls.append(1)
        if len(calls) == 1:
            raise PhysMasterError("disk full")
        return "Undone: 1 pair dropped."

    reg.saved(rid, undo)
    with pytest.raises(ChoiceRejected, match="undo must be true"):
        reg.answer(rid, {"undo": 1})
    with pytest.raises(UndoFailed, match="could not undo: disk full"):
        reg.answer(rid, {"undo": True})
    assert reg.answer_body(json.dumps({"request_id": rid, "choice": {"undo": True}})) == \
        {"undo": True, "message": "Undone: 1 pair dropped."}
    with pytest.raises(StaleAnswer, match="already undone"):
        reg.answer(rid, {"undo": True})
    with pytest.raises(StaleAnswer, match="nothing to undo"):
        reg.answer("f" * 32, {"undo": True})
    assert len(calls) == 2


def test_undo_window_and_memory_are_bounded(monkeypatch):
    import physmaster.picker as picker

    reg = PendingChoices()
    monkeypatch.setattr(picker, "UNDO_KEEP", 3)
    for i in range(5):
        reg.saved(f"r{i}", lambda i=i: f"undone {i}")
    with pytest.raises(ChoiceRejected, match="nothing to undo"):
        reg.answer("r0", {"undo": True})
    assert reg.answer("r4", {"undo": True})["message"] == "undone 4"
    monkeypatch.setattr(picker, "UNDO_SECONDS", 0.0)
    with pytest.raises(ChoiceRejected, match="older than the undo window"):
        reg.answer("r3", {"undo": True})
