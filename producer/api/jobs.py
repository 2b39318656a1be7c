"""vlq's own job endpoints: submit and poll single jobs, and sets of jobs as a batch.

- ``POST /v1/jobs``: a chat.completions body, or ``{"request": body, "metadata", "destination",
  "batch_id", "id"}``; answers 202 with the job at once.
- ``GET /v1/jobs/{id}``: status, timestamps, attempts, error ``{code, message}``, and ``result``
  when it succeeded; ``?wait=S`` long-polls up to S seconds for the job to finish.
- ``DELETE /v1/jobs/{id}``: cancel (queued: never runs; running: aborted by its worker).
- ``POST /v1/job_batches``: ``{"requests": [body, ...], "metadata", "destination"}``, all checked
  before any is queued; ``GET /v1/job_batches/{id}``: counts by status and the job ids;
  ``DELETE /v1/job_batches/{id}``: cancel every unfinished job. An OpenAI batch's id is also a
  job batch id.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from producer.api.context import get_ctx, read_json_object
from producer.errors import BadInput, InvalidRequest, JobNotFinished, JobNotFound, VlqError
from producer.schema import Destination
from producer.state import BatchCounts, JobRecord

log = logging.getLogger(__name__)
router = APIRouter(tags=["jobs"])

MAX_BATCH_REQUESTS = 50_000


class JobEnvelope(BaseModel):
    """``POST /v1/jobs`` with options around the chat request."""

    model_config = ConfigDict(extra="forbid")

    request: dict[str, Any]
    metadata: dict[str, Any] = Field(default_factory=dict)
    destination: Destination | None = None
    batch_id: str | None = None
    id: str | None = None


class JobBatchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[dict[str, Any]] = Field(min_length=1, max_length=MAX_BATCH_REQUESTS)
    metadata: dict[str, Any] = Field(default_factory=dict)
    destination: Destination | None = None
    id: str | None = None


def _parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        first = e.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise InvalidRequest(f"invalid request: {where}: {first['msg']}", param=where) from None


def job_view(record: JobRecord, result: dict[str, Any] | None = None) -> dict[str, Any]:
    """The public form of a job (no request body)."""
    data = record.public()
    for internal in ("destination", "queue"):
        data.pop(internal, None)
    metadata: dict[str, Any] = {}
    if record.job_json:
        try:
            metadata = record.job().metadata
        except VlqError:
            pass
    return {"id": record.id, "object": "job", **data, "metadata": metadata, "result": result}


def batch_view(counts: BatchCounts, job_ids: list[str] | None) -> dict[str, Any]:
    return {
        "id": counts.batch_id,
        "object": "job_batch",
        **counts.model_dump(exclude={"batch_id"}),
        "finished": counts.finished,
        "done": counts.done,
        "job_ids": job_ids,
    }


@router.post("/v1/jobs", status_code=202, summary="Submit one job; returns its id at once")
async def create_job(request: Request) -> JSONResponse:
    ctx = get_ctx(request)
    body = await read_json_object(request)
    env = _parse(JobEnvelope, body) if "request" in body else JobEnvelope(request=body)
    await ctx.run(ctx.preflight.check, env.request)
    handle = await ctx.run(
        ctx.client.submit,
        env.request,
        destination=env.destination,
        batch_id=env.batch_id,
        metadata=env.metadata,
        job_id=env.id,
    )
    ctx.metrics.submitted("jobs")
    log.info("job %s: submitted (request %s)", handle.id, request.state.request_id)
    record = await ctx.run(ctx.client.status, handle.id)
    return JSONResponse(job_view(record), status_code=202)


@router.get("/v1/jobs/{job_id}", summary="A job's status, error and result")
async def get_job(
    request: Request,
    job_id: str,
    wait: float = Query(0.0, ge=0, description="seconds to wait for the job to finish"),
) -> dict[str, Any]:
    ctx = get_ctx(request)
    record = await ctx.run(ctx.client.status, job_id)
    if wait > 0 and not record.is_terminal:
        try:
            timeout = min(wait, ctx.settings.api.wait_timeout_s)
            record = await ctx.wait_for_job(job_id, timeout, request) or record
        except JobNotFinished:
            record = await ctx.run(ctx.client.status, job_id)
    result = None
    if record.status.value == "succeeded":
        try:
            result = await ctx.run(ctx.client.result_of, record)
        except JobNotFound as e:
            view = job_view(record)
            view["error"] = {"code": e.code, "message": e.message}
            return view
    return job_view(record, result)


@router.delete("/v1/jobs/{job_id}", summary="Cancel a job")
async def cancel_job(request: Request, job_id: str) -> dict[str, Any]:
    ctx = get_ctx(request)
    outcome = await ctx.run(ctx.client.cancel, job_id)
    record = await ctx.run(ctx.client.status, job_id)
    return {**job_view(record), "cancel": outcome}


@router.post("/v1/job_batches", status_code=202, summary="Submit many jobs as one batch")
async def create_job_batch(request: Request) -> JSONResponse:
    ctx = get_ctx(request)
    env: JobBatchCreate = _parse(JobBatchCreate, await read_json_object(request))

    def check_all() -> None:
        for i, body in enumerate(env.requests):
            try:
                ctx.preflight.check(body)
            except BadInput as e:
                param = e.context.get("param")
                raise type(e)(f"requests[{i}]: {e.message}", code=e.code,
                              param=f"requests[{i}]" + (f".{param}" if param else "")) from None

    await ctx.run(check_all)
    handles = await ctx.run(
        ctx.client.submit_many, env.requests, batch_id=env.id, destination=env.destination,
        metadata=env.metadata, validate=False,
    )
    ctx.metrics.submitted("job_batches", len(handles))
    batch_id = handles[0].batch_id
    log.info("batch %s: %d jobs submitted (request %s)", batch_id, len(handles), request.state.request_id)
    counts = await ctx.run(ctx.client.batch, batch_id)
    return JSONResponse(batch_view(counts, [h.id for h in handles]), status_code=202)


@router.get("/v1/job_batches/{batch_id}", summary="A batch's counts by status and its job ids")
async def get_job_batch(
    request: Request, batch_id: str, include_jobs: bool = Query(True, description="list the job ids")
) -> dict[str, Any]:
    ctx = get_ctx(request)
    counts = await ctx.run(ctx.client.batch, batch_id)
    job_ids = await ctx.run(ctx.client.batch_jobs, batch_id) if include_jobs else None
    return batch_view(counts, job_ids)


@router.delete("/v1/job_batches/{batch_id}", summary="Cancel every unfinished job of a batch")
async def cancel_job_batch(request: Request, batch_id: str) -> dict[str, Any]:
    ctx = get_ctx(request)
    await ctx.run(ctx.client.batch, batch_id)  # 404 for an unknown batch

    def cancel_all() -> None:
        for job_id in ctx.client.batch_jobs(batch_id):
            ctx.client.store.cancel(job_id)

    await ctx.run(cancel_all)
    counts = await ctx.run(ctx.client.batch, batch_id)
    return batch_view(counts, None)
