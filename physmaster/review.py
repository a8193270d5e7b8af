"""Reviewing a saved preference dataset in the graph (host-independent part of PhysMasterPreferenceReview).

The node lists a dataset's groups with their pairs (`review_listing`) and opens a *review session*: a random token
bound to that one dataset, kept in memory for `SESSION_SECONDS`. The browser drops a wrong pair or a whole group by
posting `{"token": ..., "drop": {"group": g}}` or `{"token": ..., "drop": {"group": g, "winner": w, "loser": l,
"source": s, "created": c}}` (a pair as the listing shows it). Only a known token and a group or pair that exists in
its dataset are accepted; a drop appends a tombstone (`PreferenceDataset.drop_group` / `drop_pair`), never rewrites.

Every way a body can be wrong raises a `ReviewRejected` (`MalformedReview`: 400, `UnknownReview`: 404); a drop
that cannot be written is a `DropFailed` (409) and nothing is changed.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections import Counter

from .errors import PhysMasterError, describe
from .picker import parse_json_object
from .preferences import DatasetError, PreferenceDataset

#: largest POST body accepted (a drop is about 200 bytes)
MAX_BODY = 2048
#: how long a review session (the node's listing in the browser) accepts drops after its last use
SESSION_SECONDS = 6 * 3600.0
MAX_SESSIONS = 64


class ReviewRejected(PhysMasterError):
    """A drop that is not accepted (nothing is written); the message says why."""


class MalformedReview(ReviewRejected):
    """Not a well-formed drop, or it names no group/pair of the dataset: HTTP 400."""


class UnknownReview(ReviewRejected):
    """The token is unknown or expired (the server restarted, or the review is old): HTTP 404."""


class DropFailed(ReviewRejected):
    """The drop was valid but could not be written (a full disk): HTTP 409; nothing changed."""


def parse_review_body(body: bytes | str) -> tuple[str, dict]:
    """(token, drop) from a POST body, bounded in size and depth; MalformedReview for anything else."""
    data = parse_json_object(body, {"token", "drop"}, MAX_BODY, MalformedReview, "a drop",
                             "{\"token\": ..., \"drop\": {\"group\": ...}}")
    token, drop = data["token"], data["drop"]
    if not isinstance(token, str) or len(token) > 64:
        raise MalformedReview(f"token must be the review's token, got {describe(token)}")
    if not isinstance(drop, dict) or "group" not in drop or set(drop) not in (
            {"group"}, {"group", "winner", "loser", "source", "created"}):
        raise MalformedReview("drop must be {\"group\": id} or a pair {\"group\", \"winner\", \"loser\", "
                              "\"source\", \"created\"} as the review lists it")
    for key, value in drop.items():
        ok = type(value) is int if key in ("winner", "loser") else isinstance(value, str) and len(value) <= 64
        if not ok:
            raise MalformedReview(f"drop field {key!r} is {describe(value)}, not what the review lists")
    return token, drop


def _group_created(dataset: PreferenceDataset, group: str) -> str:
    try:
        created = dataset.group_meta(group).get("created")
    except DatasetError:
        return ""
    return created if isinstance(created, str) else ""


def review_listing(dataset: PreferenceDataset, max_groups: int = 20,
                   previews: dict[str, list[dict]] | None = None) -> dict:
    """What the review shows, JSON-ready: the stats (pairs by source, groups, candidates per group, dropped) and
    the newest `max_groups` groups, each with its pairs (dropped ones flagged) and, when given, its previews."""
    pairs, stats = dataset.read_pairs(include_dropped=True)
    drops = dataset.drops()
    by_group: dict[str, list] = {}
    for p in pairs:
        by_group.setdefault(p.group, []).append(p)
    groups = sorted(set(dataset.group_ids()) | set(by_group),
                    key=lambda g: (_group_created(dataset, g), g), reverse=True)
    sizes: Counter = Counter()
    listed = []
    for g in groups:
        n = None
        if g not in stats.bad_groups:
            try:
                n = dataset.group_size(g)
            except DatasetError:
                n = None
        dropped = g in drops.groups
        if n is not None and not dropped:
            sizes[n] += 1
        if len(listed) >= max_groups:
            continue
        listed.append({
            "id": g, "candidates": n, "created": _group_created(dataset, g), "dropped": dropped,
            "problem": stats.bad_groups.get(g, ""),
            "previews": (previews or {}).get(g),
            "pairs": [{"winner": p.winner, "loser": p.loser, "source": p.source, "margin": p.margin,
                       "created": p.created, "dropped": p in drops} for p in by_group.get(g, [])],
        })
    return {
        "dataset": dataset.name, "summary": stats.summary(),
        "stats": {"groups": stats.groups, "pairs": stats.pairs, "human": stats.human, "judge": stats.judge,
                  "dropped": stats.dropped, "dropped_groups": len(stats.dropped_groups),
                  "candidates_per_group": {str(k): v for k, v in sorted(sizes.items())},
                  "problems": stats.problems[:20]},
        "groups": listed, "shown": len(listed), "total_groups": len(groups),
    }


class ReviewSessions:
    """Thread-safe registry of open reviews: token -> (dataset, how it was listed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, dict] = {}

    def create(self, dataset: PreferenceDataset, max_groups: int, previews: dict[str, list[dict]] | None = None) -> str:
        token = secrets.token_hex(16)
        now = time.monotonic()
        with self._lock:
            for t, s in list(self._sessions.items()):
                if now - s["used"] > SESSION_SECONDS:
                    del self._sessions[t]
            self._sessions[token] = {"dataset": dataset, "max_groups": max_groups, "previews": previews or {},
                                     "used": now}
            while len(self._sessions) > MAX_SESSIONS:
                del self._sessions[next(iter(self._sessions))]
        return token

    def listing(self, token: str) -> dict:
        session = self._session(token)
        return {**review_listing(session["dataset"], session["max_groups"], session["previews"]), "token": token}

    def _session(self, token: str) -> dict:
        with self._lock:
            session = self._sessions.get(token)
            if session is None or time.monotonic() - session["used"] > SESSION_SECONDS:
                self._sessions.pop(token, None)
                raise UnknownReview("unknown or expired review: run PhysMasterPreferenceReview again")
            session["used"] = time.monotonic()
            return session

    def drop_body(self, body: bytes | str) -> dict:
        """Parse a drop, check it names a group or pair of the session's dataset, append the tombstone. Returns
        {"ok": True, "message": ..., "review": the new listing}. Raises only ReviewRejected."""
        token, drop = parse_review_body(body)
        dataset: PreferenceDataset = self._session(token)["dataset"]
        group = drop["group"]
        pairs, _ = dataset.read_pairs(include_dropped=True)
        drops = dataset.drops()
        try:
            if set(drop) == {"group"}:
                if group not in dataset.group_ids() and not any(p.group == group for p in pairs):
                    raise MalformedReview(f"dataset {dataset.name!r} has no group {describe(group)}")
                if group in drops.groups:
                    message = f"group {group[:8]} was already dropped"
                else:
                    dataset.drop_group(group, "dropped in the review")
                    count = sum(p.group == group and p not in drops for p in pairs)
                    message = f"Dropped group {group[:8]} ({count} pair{'s' if count != 1 else ''})."
            else:
                match = [p for p in pairs if (p.group, p.winner, p.loser, p.source, p.created) ==
                         (group, drop["winner"], drop["loser"], drop["source"], drop["created"])]
                if not match:
                    raise MalformedReview(f"dataset {dataset.name!r} has no such pair in group {describe(group)}")
                if match[0] in drops:
                    message = "that pair was already dropped"
                else:
                    dataset.drop_pair(match[0], "dropped in the review")
                    message = f"Dropped pair {match[0].winner + 1} > {match[0].loser + 1} of group {group[:8]}."
        except DatasetError as e:  # could not be written: nothing changed
            raise DropFailed(f"could not drop: {e}") from e
        return {"ok": True, "message": message, "review": self.listing(token)}
