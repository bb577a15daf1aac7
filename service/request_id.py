"""Request ids: every HTTP response carries `X-Request-Id`, and a 500 names it instead of its cause.

The id is the client's own `X-Request-Id` when it is a plain token (a gateway's trace id), else
a fresh one. It lives in the request's scope state and in a context variable, so the error
handlers, the SSE framing and the log lines of one request all see the same id.
"""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "x-request-id"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_current: ContextVar[str | None] = ContextVar("hotswap_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request this code runs for (None outside one)."""
    return _current.get()


def new_request_id(offered: str | None = None) -> str:
    if offered is not None and _CLIENT_ID.fullmatch(offered):
        return offered
    return uuid.uuid4().hex


class RequestIdMiddleware:
    """Gives each HTTP request an id and puts it in the response's `X-Request-Id` header."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = dict(scope.get("headers", ())).get(HEADER.encode())
        request_id = new_request_id(offered.decode("latin-1") if offered else None)
        scope.setdefault("state", {})["request_id"] = request_id
        _current.set(request_id)  # not reset: Starlette's outermost 500 handler runs after us

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        await self.app(scope, receive, send_with_id)
