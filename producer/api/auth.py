"""Bearer-token auth and the request size limit, as one ASGI middleware in front of every route.

With ``api.auth_tokens`` set, every route but ``/healthz`` wants ``Authorization: Bearer
<token>`` matching one of them (compared in constant time), else 401 ``invalid_api_key``. A body
over ``api.max_body_bytes`` is refused with 413 ``request_too_large``: at once when its
``Content-Length`` says so, or as soon as a chunked body crosses the limit.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable

from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producer.api.errors import error_response

OPEN_PATHS = frozenset({"/healthz"})


def _too_large(limit: int) -> str:
    return (f"the request body is larger than {limit} bytes (api.max_body_bytes); send a smaller"
            " body, or images by URL instead of inline data: URIs")


class GuardMiddleware:
    """Refuses unauthenticated and oversized requests before any route runs."""

    def __init__(self, app: ASGIApp, *, tokens: Iterable[str], max_body_bytes: int) -> None:
        self.app = app
        self.tokens = [t.encode() for t in tokens if t]
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or ())
        if self.tokens and scope["path"] not in OPEN_PATHS and not self._authorized(headers):
            response = error_response(
                401,
                "missing or invalid API key: send the header 'Authorization: Bearer <token>' with"
                " one of the server's api.auth_tokens",
                "invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await error_response(400, "the Content-Length header is not a number")(scope, receive, send)
                return
            if declared > self.max_body_bytes:
                await error_response(413, _too_large(self.max_body_bytes))(scope, receive, send)
                return
        await self.app(scope, self._limited(receive), send)

    def _authorized(self, headers: dict[bytes, bytes]) -> bool:
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        token = token.strip()
        if scheme.lower() != b"bearer" or not token:
            return False
        ok = False
        for expected in self.tokens:  # no early exit: the time taken says nothing about the tokens
            ok |= hmac.compare_digest(token, expected)
        return ok

    def _limited(self, receive: Receive) -> Receive:
        seen = 0
        limit = self.max_body_bytes

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise HTTPException(413, _too_large(limit))
            return message

        return limited_receive
