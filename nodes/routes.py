"""HTTP route the preference picker's frontend posts to. Accepts only {request_id, choice}; trusts nothing else.

The route only reads the body (to its end, bounded); the core parses and checks it (`PendingChoices.answer_body`):
a malformed body is a 400, a stale request id a 404, a body past the bound a 413.
"""

from __future__ import annotations

import logging

from aiohttp import web
from server import PromptServer

from ..physmaster.picker import MAX_BODY, ChoiceRejected, PendingChoices, StaleAnswer

log = logging.getLogger("physmaster")

#: the one registry of requests waiting for a person (one per server process)
PENDING = PendingChoices()

_registered = False


def _bad(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _pick(request: web.Request) -> web.Response:
    """Every malformed body is a 4xx with a sentence; nothing a client sends can make it a 500."""
    too_large = f"request too large: at most {MAX_BODY} bytes"
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _bad(too_large, 413)
    try:  # read(n) returns what has arrived (up to n): read until the end or past the bound
        raw = b""
        while len(raw) <= MAX_BODY:
            chunk = await request.content.read(MAX_BODY + 1 - len(raw))
            if not chunk:
                break
            raw += chunk
    except Exception as e:  # a client that hangs up or sends a broken chunked body
        return _bad(f"could not read the request body ({type(e).__name__}): send exactly "
                    "{\"request_id\": ..., \"choice\": ...} as JSON")
    if len(raw) > MAX_BODY:  # chunked bodies have no Content-Length
        return _bad(too_large, 413)
    try:
        choice = PENDING.answer_body(raw)
    except StaleAnswer as e:
        log.info("PhysMaster picker: rejected a stale answer: %s", e)
        return _bad(str(e), 404)
    except ChoiceRejected as e:  # MalformedAnswer: not a well-formed answer
        log.info("PhysMaster picker: rejected a malformed answer: %s", e)
        return _bad(str(e), 400)
    return web.json_response({"ok": True, "choice": choice})


def register() -> None:
    global _registered
    if _registered or PromptServer.instance is None:
        return
    PromptServer.instance.routes.post("/physmaster/pick")(_pick)
    _registered = True
