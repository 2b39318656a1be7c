"""OpenAI's error shape for every failure: ``{"error": {"message", "type", "code", "param"}}``.

:class:`producer.errors.VlqError` codes map to HTTP statuses (bad input 400, unknown ids 404,
conflicts 409, transient trouble 503); FastAPI's own validation errors and malformed JSON become
400 ``invalid_request``; anything unexpected is a 500 ``internal_error`` whose details go to
the log, not to the client.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from producer.api.request_id import current_request_id
from producer.errors import VlqError

log = logging.getLogger(__name__)

# Codes whose class's HTTP status is not the best answer to an HTTP client.
STATUS_BY_CODE: dict[str, int] = {
    "deadline_exceeded": 504,
    "timeout": 504,  # the API stopped waiting for a job (which goes on)
    "engine_unavailable": 503,
    "cancelled": 409,
}

_CODE_BY_STATUS: dict[int, str] = {
    400: "invalid_request",
    401: "invalid_api_key",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "request_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
}


def error_type(status: int) -> str:
    """OpenAI's ``type`` for an HTTP status."""
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(message: str, code: str | None, status: int, param: Any = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type(status), "code": code, "param": param}}


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    param: Any = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """A JSON response in OpenAI's error shape."""
    code = code if code is not None else _CODE_BY_STATUS.get(status)
    return JSONResponse(error_body(message, code, status, param), status_code=status, headers=headers)


def status_of(error: VlqError) -> int:
    return STATUS_BY_CODE.get(error.code, error.http_status)


def vlq_error_body(error: VlqError) -> dict[str, Any]:
    """The error body for a coded vlq error (also used inside streams and batch error files)."""
    param = error.context.get("param")
    return error_body(error.message, error.code, status_of(error), param)


def vlq_error_response(error: VlqError) -> JSONResponse:
    status = status_of(error)
    if status >= 500:
        log.warning("%s: %s (request %s)", error.code, error.message, current_request_id())
    return JSONResponse(vlq_error_body(error), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "header")]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON: send one JSON object", None
    where = f"{param}: " if param else ""
    return f"invalid request: {where}{first.get('msg', 'invalid value')}", param


def install(app: FastAPI) -> None:
    """Register the handlers that turn every error into OpenAI's shape."""

    @app.exception_handler(VlqError)
    async def _vlq(request: Request, exc: VlqError) -> JSONResponse:
        return vlq_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see GET /docs for the API"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Served outside the other middleware: the request id comes from the request's state.
        request_id = getattr(request.state, "request_id", None)
        log.exception("unexpected error on %s %s (request %s)", request.method, request.url.path, request_id)
        return error_response(500, f"internal error; the server log has the details (request {request_id})",
                              "internal_error", headers={"x-request-id": request_id} if request_id else None)
