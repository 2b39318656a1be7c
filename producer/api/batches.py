"""OpenAI Batch API: create, read, list and cancel batches (:mod:`producer.batches` does the work).

Batches move on without anyone polling: :class:`BatchRefresher` runs
:meth:`producer.batches.Batches.refresh` for every unfinished batch every second, and right away
when a batch is created, read or cancelled (a read waits up to a second for that refresh, so a
small batch is usually ``completed`` on the first poll after its last request). Several API
processes may run the loop: a per-batch lock in Redis keeps the work single.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import anyio
from fastapi import APIRouter, Query, Request

from producer.api.context import ApiContext, get_ctx, list_page, read_json_object
from producer.batches import Batches, BatchObject
from producer.errors import InvalidRequest, VlqError
from producer.outage import Outage

log = logging.getLogger(__name__)
router = APIRouter(tags=["batches"])

REFRESH_INTERVAL_S = 1.0
READ_WAIT_S = 1.0  # a read waits this long for the refresh it started


class BatchRefresher:
    """Runs ``Batches.refresh`` off the event loop, at most once at a time per batch."""

    def __init__(self, batches: Batches, interval_s: float = REFRESH_INTERVAL_S) -> None:
        self.batches = batches
        self.interval_s = interval_s
        self._running: dict[str, asyncio.Task[BatchObject | None]] = {}

    def kick(self, batch_id: str) -> asyncio.Task[BatchObject | None]:
        """Start a refresh of ``batch_id`` (or return the one already running)."""
        task = self._running.get(batch_id)
        if task is None or task.done():
            task = asyncio.get_running_loop().create_task(self._refresh(batch_id))
            self._running[batch_id] = task
            task.add_done_callback(lambda t: self._forget(batch_id, t))
        return task

    def _forget(self, batch_id: str, task: asyncio.Task[BatchObject | None]) -> None:
        if self._running.get(batch_id) is task:
            del self._running[batch_id]

    async def _refresh(self, batch_id: str) -> BatchObject | None:
        try:
            return await anyio.to_thread.run_sync(self.batches.refresh, batch_id)
        except VlqError as e:
            log.warning("batch %s: refresh failed: [%s] %s", batch_id, e.code, e.message)
        except Exception:
            log.exception("batch %s: refresh failed", batch_id)
        return None

    async def run(self) -> None:
        """Refresh every unfinished batch, forever (cancel the task to stop)."""
        outage = Outage(log, "batch refresher")  # Redis away: one warning, not one a second
        while True:
            try:
                for batch_id in await anyio.to_thread.run_sync(self.batches.active_ids):
                    self.kick(batch_id)
            except VlqError as e:
                outage.failed(e.message)
            else:
                outage.ok()
            await asyncio.sleep(self.interval_s)

    async def fresh(self, batch_id: str) -> BatchObject:
        """The batch after a refresh, or as it is now if the refresh takes longer than a read
        should wait."""
        task = self.kick(batch_id)
        done, _ = await asyncio.wait({task}, timeout=READ_WAIT_S)
        if done and task.result() is not None:
            return task.result()
        return await anyio.to_thread.run_sync(self.batches.get, batch_id)


def _dump(batch: BatchObject) -> dict[str, Any]:
    return batch.model_dump(mode="json")


@router.post("/v1/batches", summary="Create a batch from an uploaded input file")
async def create_batch(request: Request) -> dict[str, Any]:
    ctx: ApiContext = get_ctx(request)
    body = await read_json_object(request)
    for field in ("input_file_id", "endpoint"):
        if not isinstance(body.get(field), str):
            raise InvalidRequest(f"{field} is required (a string)", param=field)
    batch = await ctx.run(
        ctx.batches.create,
        body["input_file_id"],
        body["endpoint"],
        body.get("completion_window", "24h"),
        body.get("metadata"),
    )
    ctx.refresher.kick(batch.id)
    log.info("batch %s: created from file %s (request %s)", batch.id, body["input_file_id"], request.state.request_id)
    return _dump(batch)


@router.get("/v1/batches", summary="List batches, newest first")
async def list_batches(
    request: Request, after: str | None = None, limit: int = Query(20, ge=1, le=100)
) -> dict[str, Any]:
    ctx = get_ctx(request)
    batches, has_more = await ctx.run(ctx.batches.list, after=after, limit=limit)
    return list_page([_dump(b) for b in batches], has_more)


@router.get("/v1/batches/{batch_id}", summary="A batch: status, request_counts, output and error files")
async def get_batch(request: Request, batch_id: str) -> dict[str, Any]:
    ctx = get_ctx(request)
    batch = await ctx.run(ctx.batches.get, batch_id)
    if not batch.is_final:
        batch = await ctx.refresher.fresh(batch_id)
    return _dump(batch)


@router.post("/v1/batches/{batch_id}/cancel", summary="Cancel a batch")
async def cancel_batch(request: Request, batch_id: str) -> dict[str, Any]:
    ctx = get_ctx(request)
    batch = await ctx.run(ctx.batches.cancel, batch_id)
    ctx.refresher.kick(batch_id)
    return _dump(batch)
