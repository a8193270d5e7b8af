"""Waiting for a person's choice among N candidate videos (host-independent part of the preference picker).

The node registers a pending request (a random correlation id), tells the browser, and waits. The browser's answer
arrives through an HTTP route that hands it to `PendingChoices.answer`: only a known, still-pending id and a
well-formed choice are accepted; everything else is rejected with a reason (and never touches disk). Stale answers
(an id that timed out, was cancelled or already answered) are ignored.

A choice is either `{"best": i, "worst": j}` or `{"ranking": [i, j, k, ...]}` (best first, every candidate once), or
`{"skip": true}`. `choice_to_pairs` turns it into (winner, loser) pairs.

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


class ChoiceRejected(PhysMasterError):
    """An answer that is not accepted (nothing is stored); the message says why."""


class MalformedAnswer(ChoiceRejected):
    """The body or the choice is not a well-formed answer: the route answers 400."""


class StaleAnswer(ChoiceRejected):
    """The request id is unknown, expired, cancelled or already answered: the route answers 404."""


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def parse_answer(body: bytes | str) -> tuple[str, Any]:
    """(request_id, choice) from a POST body `{"request_id": "...", "choice": {...}}`, bounded in size and depth.
    Raises MalformedAnswer for anything else; the choice itself is checked by `PendingChoices.answer`."""
    if not isinstance(body, (bytes, bytearray, str)):
        raise MalformedAnswer(f"body must be JSON text, got {type(body).__name__}")
    if len(body) > MAX_BODY:
        raise MalformedAnswer(f"request body is {len(body)} bytes, more than an answer can be ({MAX_BODY})")
    if not isinstance(body, str):  # a browser sends UTF-8; json.loads would also guess UTF-16/32 from the bytes
        try:
            body = bytes(body).decode("utf-8")
        except UnicodeDecodeError:
            raise MalformedAnswer("body must be JSON in UTF-8: {\"request_id\": ..., \"choice\": ...}") from None
    try:
        data = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise MalformedAnswer("body is nested too deeply to be an answer: send {\"request_id\": ..., "
                              "\"choice\": ...}") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, NaN, over-long integers
        raise MalformedAnswer("body must be JSON: {\"request_id\": ..., \"choice\": ...}") from None
    if not isinstance(data, dict) or set(data) != {"request_id", "choice"}:
        raise MalformedAnswer("send exactly {\"request_id\": ..., \"choice\": ...}")
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
        if not isinstance(ranking, list) or sorted(index(v, "ranking entry") for v in ranking) != list(range(n)):
            raise MalformedAnswer(f"ranking must list every candidate 0..{n - 1} exactly once, best first")
        return {"ranking": list(ranking)}
    fields = ", ".join(describe(k) for k in sorted(map(str, keys))[:5]) or "none"
    raise MalformedAnswer(f"unexpected fields {fields}; send best+worst, ranking, or skip")


def choice_to_pairs(choice: dict) -> list[tuple[int, int]]:
    """(winner, loser) pairs: best over worst, or every ordered pair of a ranking."""
    if choice.get("skip"):
        return []
    if "ranking" in choice:
        r = choice["ranking"]
        return [(r[i], r[j]) for i in range(len(r)) for j in range(i + 1, len(r))]
    return [(choice["best"], choice["worst"])]


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
