"""HTTP route the preference picker's frontend posts to. Accepts only {request_id, choice}; trusts nothing else."""

from __future__ import annotations

import json
import logging

from aiohttp import web
from server import PromptServer

from ..physmaster.picker import ChoiceRejected, PendingChoices

log = logging.getLogger("physmaster")

#: the one registry of requests waiting for a person (one per server process)
PENDING = PendingChoices()
MAX_BODY = 4096

_registered = False


SHAPE = "send exactly {\"request_id\": ..., \"choice\": ...} as JSON"


def _bad(message: str, status: int = 400) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _pick(request: web.Request) -> web.Response:
    """Every malformed body is a 4xx with a sentence; nothing a client sends can make it a 500."""
    if request.content_length is not None and request.content_length > MAX_BODY:
        return _bad(f"request too large: at most {MAX_BODY} bytes", 413)
    try:  # read(n) returns what has arrived (up to n): read until the end or past the bound
        raw = b""
        while len(raw) <= MAX_BODY:
            chunk = await request.content.read(MAX_BODY + 1 - len(raw))
            if not chunk:
                break
            raw += chunk
    except Exception as e:  # a client that hangs up or sends a broken chunked body
        return _bad(f"could not read the request body ({type(e).__name__}): {SHAPE}")
    if len(raw) > MAX_BODY:  # chunked bodies have no Content-Length
        return _bad(f"request too large: at most {MAX_BODY} bytes", 413)
    try:
        body = json.loads(raw.decode("utf-8"))
    except RecursionError:
        return _bad(f"body is nested too deeply: {SHAPE}")
    except (ValueError, UnicodeDecodeError):
        return _bad(f"body must be UTF-8 JSON: {SHAPE}")
    if not isinstance(body, dict) or set(body) != {"request_id", "choice"}:
        return _bad(SHAPE)
    try:
        choice = PENDING.answer(body["request_id"], body["choice"])
    except ChoiceRejected as e:
        status = 404 if "unknown" in str(e) or "answered" in str(e) else 400
        log.info("PhysMaster picker: rejected an answer: %s", e)
        return _bad(str(e), status)
    except RecursionError:
        return _bad(f"choice is nested too deeply: {SHAPE}")
    except (ValueError, TypeError, OverflowError, KeyError) as e:
        log.info("PhysMaster picker: rejected a malformed answer: %r", e)
        return _bad(f"malformed choice ({type(e).__name__}: {str(e)[:200]}): send {{\"best\": i, \"worst\": j}}, "
                    "{\"ranking\": [...]} or {\"skip\": true}")
    return web.json_response({"ok": True, "choice": choice})


def register() -> None:
    global _registered
    if _registered or PromptServer.instance is None:
        return
    PromptServer.instance.routes.post("/physmaster/pick")(_pick)
    _registered = True
