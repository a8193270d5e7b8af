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
