"""``GET /healthz``: is the broker reachable, and which workers have been seen lately.

200 with ``status: ok`` when Redis answers and at least one worker heartbeat is fresher than
``worker.lease_timeout_s``; 200 with ``status: no_workers`` when Redis answers but no worker is
live (the API can take jobs; they wait in the queue); 503 ``broker_unavailable`` when Redis does
not answer. Open without a token, for load balancers and compose healthchecks.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from producer.api.context import get_ctx
from producer.errors import VlqError

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Broker reachable, workers seen")
async def healthz(request: Request) -> JSONResponse:
    ctx = get_ctx(request)
    store = ctx.client.store
    try:
        await ctx.run(store.ping)
        workers = await ctx.run(store.workers, ctx.settings.worker.lease_timeout_s)
    except VlqError as e:
        body: dict[str, Any] = {"status": "broker_unavailable", "broker": {"ok": False, "error": e.message},
                                "workers": {"live": 0, "names": []}}
        return JSONResponse(body, status_code=503)
    body = {
        "status": "ok" if workers else "no_workers",
        "broker": {"ok": True},
        "workers": {"live": len(workers), "names": sorted(workers)},
        "queue": ctx.settings.broker.queue,
        "model": ctx.settings.api.served_model,
    }
    return JSONResponse(body)
