"""The FastAPI application: ``create_app(settings)`` wires the routers to one SDK client.

The API only translates HTTP into SDK calls (:class:`producer.client.Client`,
:class:`producer.batches.Batches`, :class:`producer.files.FileStore`); behaviour lives in the SDK.
Served by ``vlq api`` (uvicorn), or by any ASGI server::

    from producer.api import create_app
    from producer.config import Settings
    app = create_app(Settings.load())
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator

from fastapi import FastAPI

from producer import __version__
from producer.api import batches, chat, errors, files, health, jobs, metrics, models
from producer.api.auth import GuardMiddleware
from producer.api.context import ApiContext
from producer.api.request_id import RequestIdMiddleware
from producer.batches import Batches
from producer.client import Client
from producer.config import Settings
from producer.files import FileStore
from producer.preflight import Preflight
from producer.state import safe_url

log = logging.getLogger(__name__)


def create_app(settings: Settings, client: Client | None = None) -> FastAPI:
    """An app for ``settings``. ``client`` defaults to one built from the same settings (and is
    then closed with the app); pass your own to share it."""
    own_client = client is None
    client = client or Client(settings, name_store=False)  # API callers need not learn the Redis host
    file_store = FileStore.from_settings(settings)
    preflight = Preflight(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx: ApiContext = app.state.vlq
        loop_task = asyncio.get_running_loop().create_task(ctx.refresher.run())
        log.info("vlq api: queue %r of %s, keys %s:*, settings from %s, auth %s, prompt-length pre-flight %s",
                 settings.broker.queue, safe_url(settings.broker.url), settings.key_prefix, settings.source(),
                 "on" if settings.api.auth_tokens else "off",
                 "on" if preflight.checks_prompt_length
                 else "off (workers check prompt lengths; set engine.model_dir to refuse long prompts here)")
        try:
            yield
        finally:
            loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop_task
            file_store.close()
            if own_client:
                client.close()

    app = FastAPI(
        title="vlq",
        version=__version__,
        summary="Qwen-VL-Chat over a job queue: OpenAI chat completions, Files and Batches, job polling.",
        lifespan=lifespan,
    )
    ctx = ApiContext(
        settings=settings,
        client=client,
        files=file_store,
        batches=None,  # type: ignore[arg-type]  # set below (it reports to the metrics)
        preflight=preflight,
        metrics=None,
        refresher=None,
        started_at=time.time(),
    )
    ctx.metrics = metrics.ApiMetrics(lambda: ctx)
    ctx.batches = Batches(client, file_store, preflight=preflight.check,
                          served_model=settings.api.served_model, on_result=ctx.metrics.observe)
    ctx.refresher = batches.BatchRefresher(ctx.batches)
    app.state.vlq = ctx

    errors.install(app)
    app.add_middleware(GuardMiddleware, tokens=settings.api.auth_tokens,
                       max_body_bytes=settings.api.max_body_bytes)
    app.add_middleware(RequestIdMiddleware)  # added last: outermost, so refusals carry the id too
    for module in (chat, jobs, files, batches, models, health, metrics):
        app.include_router(module.router)
    return app
