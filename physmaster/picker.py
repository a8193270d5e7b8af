"""Waiting for a person's choice among N candidate videos (host-independent part of the preference picker).

The node registers a pending request (a random correlation id), tells the browser, and waits. The browser's answer
arrives through an HTTP route that hands it to `PendingChoices.answer`: only a known, still-pending id and a
well-formed choice are accepted; everything else is rejected with a reason (and never touches disk). Stale answers
(an id that timed out, was cancelled or already answered) are ignored.

A choice is either `{"best": i, "worst": j}` (the quick path) or `{"ranking": [i, [j, k], l, ...]}` (best first,
every candidate once; a list inside is a tie), or `{"skip": true}`. `choice_pairs` turns it into (winner, loser,
margin) pairs: for a ranking, all ordered pairs or best vs each (`RANKING_PAIRS`), ties giving no pair, the margin the
rank gap (1 for best vs worst).

After an answer is saved, the node registers how to take it back (`PendingChoices.saved`); the browser's
`{"undo": true}` for that request id (within `UNDO_SECONDS`) runs it once: the picker drops the answer's group with a
tombstone, so nothing is rewritten.

The route hands the raw body to `parse_answer` (or `PendingChoices.answer_body`). Every way a body can be wrong
raises a `ChoiceRejected`: `MalformedAnswer` for a body that is not a well-formed answer (too large, not JSON,
nested too deeply, wrong fields or types: HTTP 400) and `StaleAnswer` for an id that is unknown, expired or already
answered (HTTP 404). Nothing else escapes, so a forged body can never make the route fail with a 500.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import PhysMasterError, describe

#: largest POST body accepted: an answer is tens of bytes (a ranking of 64 candidates about 300)
MAX_BODY = 4096
#: how a ranking becomes pairs (the picker's ranking_pairs widget); the first is what a ranking always gave
RANKING_PAIRS = ("all ordered pairs", "best vs each")
#: how long after saving an answer its "undo" is accepted, and how many saved answers are remembered for it
UNDO_SECONDS = 3600.0
UNDO_KEEP = 256


class ChoiceRejected(PhysMasterError):
    """An answer that is not accepted (nothing is stored); the message says why."""


class MalformedAnswer(ChoiceRejected):
    """The body or the choice is not a well-formed answer: the route answers 400."""


class StaleAnswer(ChoiceRejected):
    """The request id is unknown, expired, cancelled or already answered: the route answers 404."""


class UndoFailed(ChoiceRejected):
    """An undo that was accepted but could not be written (a full disk): the route answers 409; it can be retried."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def parse_json_object(body: bytes | str, keys: set[str], max_body: int, error: type[Exception], what: str,
                      shape: str) -> dict:
    """A POST body, bounded in size and depth, as a JSON object (UTF-8, no NaN) with exactly `keys`; anything else
    raises `error`, naming `what` the body should be and its `shape`. The picker's answers and the review's drops
    are both read by it."""
    if not isinstance(body, (bytes, bytearray, str)):
        raise error(f"body must be JSON text, got {type(body).__name__}")
    if len(body) > max_body:
        raise error(f"request body is {len(body)} bytes, more than {what} can be ({max_body})")
    if not isinstance(body, str):  # a browser sends UTF-8; json.loads would also guess UTF-16/32 from the bytes
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise error(f"body must be JSON in UTF-8: {shape}") from None
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise error(f"body is nested too deeply to be {what}: send {shape}") from None
    except ValueError:  # JSONDecodeError, NaN, over-long integers
        raise error(f"body must be JSON: {shape}") from None
    if not isinstance(data, dict) or set(data) != keys:
        raise error(f"send exactly {shape}")
    return data


def parse_answer(body: bytes | str) -> tuple[str, Any]:
    """(request_id, choice) from a POST body `{"request_id": "...", "choice": {...}}`, bounded in size and depth.
    Raises MalformedAnswer for anything else; the choice itself is checked by `PendingChoices.answer`."""
    data = parse_json_object(body, {"request_id", "choice"}, MAX_BODY, MalformedAnswer, "an answer",
                             "{\"request_id\": ..., \"choice\": ...}")
    request_id = data["request_id"]
    if not isinstance(request_id, str) or len(request_id) > 64:
        raise MalformedAnswer(f"request_id must be the id the picker sent, got {describe(request_id)}")
    return request_id, data["choice"]


def validate_choice(choice: Any, n: int) -> dict:
    """Check a choice posted by a browser for a request with `n` candidates; return it normalised."""
    if not isinstance(choice, dict):
        raise MalformedAnswer("choice must be an object like {\"best\": 0, \"worst\": 1} or {\"ranking\": [...]}")
    keys = set(choice)
    if keys == {"skip"} and choice["skip"] is True:
        return {"skip": True}

    def index(v, what):
        if type(v) is not int or not 0 <= v < n:
            raise MalformedAnswer(f"{what} must be a candidate index 0..{n - 1}, got {describe(v)}")
        return v

    if keys == {"best", "worst"}:
        best, worst = index(choice["best"], "best"), index(choice["worst"], "worst")
        if best == worst:
            raise MalformedAnswer("best and worst must be different candidates")
        return {"best": best, "worst": worst}
    if keys == {"ranking"}:
        ranking = choice["ranking"]
        if not isinstance(ranking, list) or len(ranking) > n:
            raise MalformedAnswer(f"ranking must list every candidate 0..{n - 1} exactly once, best first")
        tiers = []
        for entry in ranking:  # a candidate, or a list of tied candidates
            if isinstance(entry, list) and 1 <= len(entry) <= n:
                tier = [index(v, "ranking entry") for v in entry]
                tiers.append(tier[0] if len(tier) == 1 else tier)
            else:
                tiers.append(index(entry, "ranking entry"))
        placed = [i for t in tiers for i in (t if isinstance(t, list) else [t])]
        if sorted(placed) != list(range(n)):
            raise MalformedAnswer(f"ranking must list every candidate 0..{n - 1} exactly once, best first "
                                  "(tied candidates in a list)")
        return {"ranking": tiers}
    fields = ", ".join(describe(k) for k in sorted(map(str, keys))[:5]) or "none"
    raise MalformedAnswer(f"unexpected fields {fields}; send best+worst, ranking, or skip")


def ranking_tiers(choice: dict) -> list[list[int]]:
    """The tiers of a (validated) ranking choice, best first: [[2], [0, 3], [1]]."""
    return [list(t) if isinstance(t, list) else [t] for t in choice["ranking"]]


def choice_pairs(choice: dict, ranking_pairs: str = RANKING_PAIRS[0]) -> list[tuple[int, int, float]]:
    """(winner, loser, margin) pairs of a validated choice.

    best/worst: one pair, margin 1. A ranking: "all ordered pairs" gives every pair of candidates in different
    tiers; "best vs each" only the top tier against each other candidate. Tied candidates give no pair. The margin
    is the rank gap over the largest gap: (tier of loser - tier of winner) / (tiers - 1), so best over worst is 1."""
    if ranking_pairs not in RANKING_PAIRS:
        raise PhysMasterError(f"ranking_pairs must be one of {RANKING_PAIRS}, got {ranking_pairs!r}")
    if choice.get("skip"):
        return []
    if "ranking" not in choice:
        return [(choice["best"], choice["worst"], 1.0)]
    tiers = ranking_tiers(choice)
    span = len(tiers) - 1
    tops = range(len(tiers)) if ranking_pairs == RANKING_PAIRS[0] else range(min(1, len(tiers)))
    return [(w, lo, (j - i) / span) for i in tops for j in range(i + 1, len(tiers))
            for w in tiers[i] for lo in tiers[j]]


def choice_to_pairs(choice: dict) -> list[tuple[int, int]]:
    """(winner, loser) pairs: best over worst, or every ordered pair of a ranking."""
    return [(w, lo) for w, lo, _ in choice_pairs(choice)]


@dataclass
class _Pending:
    n: int
    node_id: str
    created: float
    event: threading.Event = field(default_factory=threading.Event)
    choice: dict | None = None


class PendingChoices:
    """Thread-safe registry of requests waiting for a person's choice."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[str, _Pending] = {}
        self._saved: dict[str, tuple[float, Callable[[], str]]] = {}

    def create(self, n: int, node_id: str) -> str:
        if n < 2:
            raise PhysMasterError(f"the preference picker needs at least 2 candidates, got {n}: sample with "
                                  "batch_size >= 2 (one batch = the candidates of one start image)")
        request_id = secrets.token_hex(16)
        with self._lock:
            self._pending[request_id] = _Pending(n=n, node_id=str(node_id), created=time.monotonic())
        return request_id

    def pending_ids(self) -> list[str]:
        with self._lock:
            return list(self._pending)

    def answer(self, request_id: Any, choice: Any) -> dict:
        """Accept a browser's answer. Raises StaleAnswer for an unknown/stale id, MalformedAnswer for a malformed
        choice (both are ChoiceRejected)."""
        if not isinstance(request_id, str):
            raise MalformedAnswer("request_id must be a string")
        if isinstance(choice, dict) and set(choice) == {"undo"}:
            return self._undo(request_id, choice["undo"])
        with self._lock:
            pending = self._pending.get(request_id)
            if pending is None:
                raise StaleAnswer("unknown or expired request id (the picker stopped waiting for it)")
            normalised = validate_choice(choice, pending.n)
            if pending.choice is not None:
                raise StaleAnswer("this request was already answered")
            pending.choice = normalised
            pending.event.set()
            return normalised

    def saved(self, request_id: str, undo: Callable[[], str]) -> None:
        """The answer to `request_id` is on disk; `undo()` takes it back (returning a sentence saying so) and may
        be called once, by `{"undo": true}` within UNDO_SECONDS. The oldest of more than UNDO_KEEP are forgotten."""
        now = time.monotonic()
        with self._lock:
            for rid, (when, _) in list(self._saved.items()):
                if now - when > UNDO_SECONDS:
                    del self._saved[rid]
            self._saved[request_id] = (now, undo)
            while len(self._saved) > UNDO_KEEP:
                del self._saved[next(iter(self._saved))]

    def _undo(self, request_id: str, flag: Any) -> dict:
        if flag is not True:
            raise MalformedAnswer(f"undo must be true, got {describe(flag)}")
        with self._lock:
            when, undo = self._saved.pop(request_id, (None, None))
            waiting = request_id in self._pending
        if undo is None or time.monotonic() - when > UNDO_SECONDS:
            why = ("nothing is saved for it yet: mark first" if waiting else
                   "it saved nothing, was already undone, or is older than the undo window "
                   f"({UNDO_SECONDS / 60:.0f} min); drop its pairs with PhysMasterPreferenceReview")
            raise StaleAnswer(f"nothing to undo for this request: {why}")
        try:
            message = undo()
        except PhysMasterError as e:  # could not be written: nothing changed, so it may be retried
            with self._lock:
                self._saved[request_id] = (when, undo)
            raise UndoFailed(f"could not undo: {e}") from e
        return {"undo": True, "message": message}

    def answer_body(self, body: bytes | str) -> dict:
        """`parse_answer` then `answer`: what the route calls with the raw POST body. Raises only ChoiceRejected
        (MalformedAnswer -> 400, StaleAnswer -> 404)."""
        return self.answer(*parse_answer(body))

    def wait(self, request_id: str, timeout: float, check_interrupt: Callable[[], None] | None = None,
             poll: float = 0.1) -> dict | None:
        """Block until answered (returns the choice), or `timeout` seconds pass (returns None).

        `check_interrupt` is called every `poll` seconds; an exception it raises (the host's Cancel) ends the
        wait. The request is forgotten on every way out, so a late answer is rejected as stale.
        """
        with self._lock:
            pending = self._pending[request_id]
        deadline = time.monotonic() + max(0.0, float(timeout))
        try:
            while True:
                if check_interrupt is not None:
                    check_interrupt()
                left = deadline - time.monotonic()
                if pending.event.wait(min(poll, max(left, 0.0))):
                    return pending.choice
                if left <= 0:
                    return None
        finally:
            with self._lock:
                self._pending.pop(request_id, None)

    def cancel(self, request_id: str) -> None:
        with self._lock:
            self._pending.pop(request_id, None)
