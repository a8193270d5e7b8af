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


async def _pick(request: web.Request) -> web.Response:
    if request.content_length is not None and request.content_length > MAX_BODY:
        return web.json_response({"error": "request too large"}, status=413)
    try:
        body = json.loads((await request.content.read(MAX_BODY + 1))[:MAX_BODY + 1])
    except (ValueError, UnicodeDecodeError):
        return web.json_response({"error": "body must be JSON: {\"request_id\": ..., \"choice\": ...}"}, status=400)
    if not isinstance(body, dict) or set(body) != {"request_id", "choice"}:
        return web.json_response({"error": "send exactly {\"request_id\": ..., \"choice\": ...}"}, status=400)
    try:
        choice = PENDING.answer(body["request_id"], body["choice"])
    except ChoiceRejected as e:
        status = 404 if "unknown" in str(e) or "answered" in str(e) else 400
        log.info("PhysMaster picker: rejected an answer: %s", e)
        return web.json_response({"error": str(e)}, status=status)
    return web.json_response({"ok": True, "choice": choice})


def register() -> None:
    global _registered
    if _registered or PromptServer.instance is None:
        return
    PromptServer.instance.routes.post("/physmaster/pick")(_pick)
    _registered = True
