"""HTTP routes the preference picker's and the review's frontend post to. They carry answers and drops, never media
(previews are files the host's own /view serves). Each accepts one small JSON body and trusts nothing else.

/physmaster/pick takes {request_id, choice}: the core parses and checks it (`PendingChoices.answer_body`): a
malformed body is a 400, a stale request id a 404, a body past the bound a 413, an undo that could not be written
a 409. /physmaster/review takes {token, drop} (`ReviewSessions.drop_body`): 400, 404, 413 and 409 alike. Both read
the body to its end, bounded, and do their disk work off the event loop.
"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from server import PromptServer

from ..physmaster import review
from ..physmaster.picker import MAX_BODY, ChoiceRejected, PendingChoices, StaleAnswer, UndoFailed

log = logging.getLogger("physmaster")

#: the one registry of requests waiting for a person (one per server process)
PENDING = PendingChoices()
#: the open reviews (PhysMasterPreferenceReview) that accept drops
REVIEWS = review.ReviewSessions()

_registered = False


def _bad(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _read_body(request: web.Request, limit: int, shape: str) -> bytes | web.Response:
    """The whole body, or a 413/400 response. read(n) returns what has arrived (up to n): read until the end or
    past the bound."""
    too_large = f"request too large: at most {limit} bytes"
    if request.content_length is not None and request.content_length > limit:
        return _bad(too_large, 413)
    try:
        raw = b""
        while len(raw) <= limit:
            chunk = await request.content.read(limit + 1 - len(raw))
            if not chunk:
                break
            raw += chunk
    except Exception as e:  # a client that hangs up or sends a broken chunked body
        return _bad(f"could not read the request body ({type(e).__name__}): send exactly {shape} as JSON")
    if len(raw) > limit:  # chunked bodies have no Content-Length
        return _bad(too_large, 413)
    return raw


async def _pick(request: web.Request) -> web.Response:
    """Every malformed body is a 4xx with a sentence; nothing a client sends can make it a 500."""
    raw = await _read_body(request, MAX_BODY, "{\"request_id\": ..., \"choice\": ...}")
    if isinstance(raw, web.Response):
        return raw
    try:  # an undo writes a tombstone (it may wait for the dataset's lock): off the event loop
        choice = await asyncio.get_running_loop().run_in_executor(None, PENDING.answer_body, raw)
    except StaleAnswer as e:
        log.info("PhysMaster picker: rejected a stale answer: %s", e)
        return _bad(str(e), 404)
    except UndoFailed as e:
        log.warning("PhysMaster picker: %s", e)
        return _bad(str(e), 409)
    except ChoiceRejected as e:  # MalformedAnswer: not a well-formed answer
        log.info("PhysMaster picker: rejected a malformed answer: %s", e)
        return _bad(str(e), 400)
    return web.json_response({"ok": True, "choice": choice})


async def _review(request: web.Request) -> web.Response:
    """A drop from the review: 400 malformed or naming nothing in the dataset, 404 unknown review, 409 not written."""
    raw = await _read_body(request, review.MAX_BODY, "{\"token\": ..., \"drop\": {...}}")
    if isinstance(raw, web.Response):
        return raw
    try:
        answer = await asyncio.get_running_loop().run_in_executor(None, REVIEWS.drop_body, raw)
    except review.UnknownReview as e:
        return _bad(str(e), 404)
    except review.DropFailed as e:
        log.warning("PhysMaster review: %s", e)
        return _bad(str(e), 409)
    except review.ReviewRejected as e:
        log.info("PhysMaster review: rejected a drop: %s", e)
        return _bad(str(e), 400)
    log.info("PhysMaster review: %s", answer["message"])
    return web.json_response(answer)


def register() -> None:
    global _registered
    if _registered or PromptServer.instance is None:
        return
    PromptServer.instance.routes.post("/physmaster/pick")(_pick)
    PromptServer.instance.routes.post("/physmaster/review")(_review)
    _registered = True
