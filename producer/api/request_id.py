"""An ``x-request-id`` on every response, as OpenAI's API sends one.

A client may send its own ``x-request-id`` (1-128 letters, digits and ``._:-``), which is kept;
otherwise the API makes one (``req_`` and 32 hex digits). Every response carries it, errors and
refusals by the auth guard included, so a user can quote it; the API's log lines about the request
name it too (``job … submitted by request …``, and the traceback behind a 500), and the OpenAI SDKs
expose it (``completion._request_id`` in Python).
"""

from __future__ import annotations

import contextvars
import re
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("vlq_request_id", default=None)


def current_request_id() -> str | None:
    """The id of the HTTP request being served in this context (None outside one)."""
    return _current.get()


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex


def request_id_of(headers: dict[bytes, bytes]) -> str:
    """The client's ``x-request-id`` when it is a usable id, else a new one."""
    sent = headers.get(HEADER, b"").decode("latin-1").strip()
    return sent if _CLIENT_ID.fullmatch(sent) else new_request_id()


class RequestIdMiddleware:
    """Gives each HTTP request its id (``scope["state"]["request_id"]``, :func:`current_request_id`)
    and adds it to the response's headers. Install it outermost, so that every response has it."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_of(dict(scope.get("headers") or ()))
        scope.setdefault("state", {})["request_id"] = request_id
        value = request_id.encode("latin-1")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", ()) if k.lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, value)]}
            await send(message)

        token = _current.set(request_id)
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)
