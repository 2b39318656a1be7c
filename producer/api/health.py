"""``GET /healthz``: is the broker reachable, and which workers serve this API's queue.

200 with ``status: ok`` when Redis answers and at least one worker serving ``broker.queue`` has a
heartbeat fresher than ``worker.lease_timeout_s``; 200 with ``status: no_workers`` when Redis
answers but no live worker serves the queue (the API can take jobs; they wait in the queue;
``workers.other_queues`` counts live workers of other queues); 503 ``broker_unavailable`` when
Redis does not answer. Open without a token, for load balancers and compose healthchecks.
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
    queue = ctx.settings.broker.queue
    try:
        await ctx.run(ctx.client.store.ping)
        live = await ctx.run(ctx.client.workers)
    except VlqError as e:
        body: dict[str, Any] = {"status": "broker_unavailable", "broker": {"ok": False, "error": e.message},
                                "workers": {"live": 0, "names": [], "other_queues": 0}}
        return JSONResponse(body, status_code=503)
    serving = sorted(w["name"] for w in live if w.get("queue") == queue)
    body = {
        "status": "ok" if serving else "no_workers",
        "broker": {"ok": True},
        "workers": {"live": len(serving), "names": serving, "other_queues": len(live) - len(serving)},
        "queue": queue,
        "model": ctx.settings.api.served_model,
    }
    return JSONResponse(body)
