"""``POST /v1/chat/completions``: OpenAI's endpoint over the queue.

The request is checked (:class:`producer.preflight.Preflight`), enqueued as one job and waited
for; the answer is the job's result: OpenAI's ``chat.completion`` (real ``finish_reason``, stop
or length; ``usage``) plus ``boxes``, the parsed grounding. Every response carries the job id in
the ``x-vlq-job-id`` header. A client that disconnects while waiting cancels its job.

With ``"stream": true`` the answer arrives as server-sent ``chat.completion.chunk`` events while
the worker produces tokens (relayed through the job's Redis stream), each naming the answering
engine's ``system_fingerprint``: a first chunk with the assistant role, content chunks, a last
chunk with ``finish_reason`` (and ``boxes``; with ``logprobs`` asked, every answer token's entry)
that also carries ``usage``, then ``data: [DONE]``. With ``stream_options.include_usage`` the
usage comes instead in one more chunk with empty ``choices``, as OpenAI sends it. A job that
fails before its first token answers with a plain HTTP error; one that fails later sends an
``error`` event.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from producer.api.context import ApiContext, get_ctx, read_json_object
from producer.api.errors import vlq_error_body, vlq_error_response
from producer.client import StreamEvent
from producer.errors import JobNotFinished, VlqError
from producer.schema import ChatRequest

log = logging.getLogger(__name__)
router = APIRouter(tags=["chat"])

RESULT_AFTER_DONE_S = 10.0  # how long a stream waits for the result document after its last token


@router.post("/v1/chat/completions", summary="Create a chat completion (OpenAI-compatible)")
async def chat_completions(request: Request) -> Response:
    ctx = get_ctx(request)
    body = await read_json_object(request)
    chat = await ctx.run(ctx.preflight.check, body)
    created = int(time.time())
    handle = await ctx.run(ctx.client.submit, body)
    ctx.metrics.submitted("chat.completions")
    log.info("job %s: submitted (request %s)", handle.id, request.state.request_id)
    headers = {"x-vlq-job-id": handle.id}
    timeout = ctx.settings.api.wait_timeout_s
    if chat.stream:
        return await _stream(ctx, handle.id, chat, created, timeout, headers)
    try:
        record = await ctx.wait_for_job(handle.id, timeout, request)
    except JobNotFinished as e:
        return _job_error(VlqError(e.message, code="timeout", job_id=handle.id), headers)
    if record is None:
        log.info("job %s: client went away, cancelling", handle.id)
        await ctx.run(ctx.client.cancel, handle.id)
        return Response(status_code=499)
    try:
        document = await ctx.run(ctx.client.result_of, record)
    except VlqError as e:  # the job failed: its own code and status, and which job it was
        ctx.metrics.observe(record, None)
        return _job_error(e, headers)
    ctx.metrics.observe(record, document)
    return JSONResponse(document, headers=headers)


def _job_error(error: VlqError, headers: dict[str, str]) -> Response:
    """The error of a job that was enqueued: it has run its own retries (or, on a timeout, goes
    on), so ``x-should-retry: false`` keeps the OpenAI SDKs from sending it again as new jobs."""
    response = vlq_error_response(error)
    response.headers.update(headers)
    response.headers["x-should-retry"] = "false"
    return response


def _logprobs_of(document: dict[str, Any]) -> Any:
    """A result document's ``choices[0].logprobs`` (None when not asked for)."""
    choices = document.get("choices") or [{}]
    return choices[0].get("logprobs")


def _sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _stream(
    ctx: ApiContext, job_id: str, chat: ChatRequest, created: int, timeout: float, headers: dict[str, str]
) -> Response:
    events = ctx.client.stream(job_id, idle_timeout=timeout)  # a stream may run long while tokens flow
    try:
        first: StreamEvent | None = await ctx.run_blocking(next, events, None)
    except JobNotFinished as e:
        return _job_error(VlqError(e.message, code="timeout", job_id=job_id), headers)
    except VlqError as e:  # failed before its first token: a plain HTTP error
        return _job_error(e, headers)
    model = chat.model or ctx.settings.api.served_model
    include_usage = bool((chat.stream_options or {}).get("include_usage"))
    fingerprint = first.system_fingerprint if first is not None else None  # every chunk carries it

    def chunk(delta: dict[str, Any], finish_reason: str | None = None, logprobs: list[dict[str, Any]] | None = None,
              **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": f"chatcmpl-{job_id}",
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": fingerprint,
            "choices": [{"index": 0, "delta": delta,
                         "logprobs": {"content": logprobs, "refusal": None} if logprobs else None,
                         "finish_reason": finish_reason}],
        }
        if include_usage:
            out["usage"] = None
        out.update(extra)
        return out

    async def body() -> AsyncIterator[str]:
        nonlocal fingerprint
        ended = False  # the job reached an end (done or failed): nothing to cancel
        sent = 0  # logprob entries sent so far
        try:
            yield _sse(chunk({"role": "assistant", "content": ""}))
            event = first
            while event is not None:
                fingerprint = event.system_fingerprint or fingerprint
                if event.type == "delta" and (event.text or event.logprobs):
                    yield _sse(chunk({"content": event.text}, logprobs=event.logprobs))
                    sent += len(event.logprobs)
                elif event.type == "done":
                    ended = True
                    document = event.result or await _result(ctx, job_id)
                    fingerprint = (document or {}).get("system_fingerprint") or fingerprint
                    last = chunk({}, event.finish_reason)
                    if document is not None:
                        last["boxes"] = document.get("boxes", [])
                        rest = ((_logprobs_of(document) or {}).get("content") or [])[sent:]
                        last["choices"][0]["logprobs"] = {"content": rest, "refusal": None} if rest else None
                        record = await ctx.run(ctx.client.status, job_id)
                        ctx.metrics.observe(record, document)
                    if include_usage:
                        yield _sse(last)
                        yield _sse({**chunk({}), "choices": [], "usage": event.usage})
                    else:
                        yield _sse({**last, "usage": event.usage})
                    break
                event = await ctx.run_blocking(next, events, None)
            ended = True
            yield "data: [DONE]\n\n"
        except VlqError as e:
            ended = True
            code = "timeout" if isinstance(e, JobNotFinished) else e.code
            err = vlq_error_body(VlqError(e.message, code=code, **e.context))
            yield _sse(err)
            yield "data: [DONE]\n\n"
        finally:
            if not ended:  # the client went away mid-answer: stop spending GPU time on it
                with anyio.CancelScope(shield=True):
                    log.info("job %s: stream closed early, cancelling", job_id)
                    try:
                        await ctx.run(ctx.client.cancel, job_id)
                    except VlqError as e:
                        log.warning("job %s: could not cancel: %s", job_id, e)

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _result(ctx: ApiContext, job_id: str) -> dict[str, Any] | None:
    """The result document written just after the last token (boxes, fingerprint)."""
    try:
        return await ctx.run_blocking(ctx.client.result, job_id, RESULT_AFTER_DONE_S)
    except VlqError as e:
        log.warning("job %s: no result document after its stream ended: %s", job_id, e.message)
        return None
