"""``GET /metrics``: Prometheus text format.

Read from Redis at each scrape (the whole deployment, whichever process submitted the jobs):

- ``vlq_jobs{status}``: jobs queued and running now (gauges);
- ``vlq_jobs_finished_total{status}``: jobs that ended succeeded, failed or cancelled (counters,
  kept in Redis, so they survive API restarts);
- ``vlq_queue_depth{queue}``: messages waiting in the broker's queue;
- ``vlq_workers_live{queue}``: workers whose heartbeat is fresher than ``worker.lease_timeout_s``,
  by the queue they serve (this API's queue always listed, 0 when none serves it);
- ``vlq_openai_batches_active``: OpenAI batches not yet final;
- ``vlq_dead_letters``: queue entries that were not jobs, kept in ``<prefix>:dead`` (newest
  10,000) for an operator to read (``redis-cli LRANGE <prefix>:dead 0 9``);
- ``vlq_broker_up``: 1 when Redis answered the scrape.

Observed by this API process, for the jobs it answers (chat completions, finalized OpenAI
batches): ``vlq_job_latency_seconds`` (submitted -> finished), ``vlq_job_queue_seconds``
(submitted -> started), ``vlq_prompt_tokens_total``, ``vlq_completion_tokens_total`` (rate() of it
is tokens/s), ``vlq_decode_tokens_per_second`` (per job: completion tokens over the engine's
decode time); and ``vlq_api_jobs_submitted_total{endpoint}``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from producer.api.context import get_ctx
from producer.errors import VlqError
from producer.state import JobRecord

log = logging.getLogger(__name__)
router = APIRouter(tags=["metrics"])

_LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
_TPS_BUCKETS = (1, 2, 5, 10, 20, 40, 60, 80, 100, 150, 200, 400, 800)


class _RedisCollector(Collector):
    def __init__(self, ctx_getter: Any) -> None:
        self._ctx = ctx_getter

    def describe(self) -> list[Any]:
        return []  # read at scrape time only (never at registration)

    def collect(self) -> Iterator[Any]:
        ctx = self._ctx()
        store = ctx.client.store
        up = GaugeMetricFamily("vlq_broker_up", "1 when Redis answered this scrape")
        try:
            stats = store.stats()
            with store.redis.pipeline(transaction=False) as pipe:
                for key in store.keys.queue_lists(ctx.settings.broker.queue):
                    pipe.llen(key)
                depth = sum(pipe.execute())
            workers = ctx.client.workers()
            active = len(ctx.batches.active_ids())
            dead = store.redis.llen(store.keys.dead_letters)
        except (VlqError, OSError) as e:
            log.warning("metrics: Redis unavailable: %s", e)
            up.add_metric([], 0)
            yield up
            return
        except Exception as e:  # redis-py errors other than connection ones
            log.warning("metrics: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        current = GaugeMetricFamily("vlq_jobs", "jobs queued or running now", labels=["status"])
        for status in ("queued", "running"):
            current.add_metric([status], max(0, stats.get(status, 0)))
        yield current
        finished = CounterMetricFamily(
            "vlq_jobs_finished", "jobs that ended, by final status", labels=["status"])
        for status in ("succeeded", "failed", "cancelled"):
            finished.add_metric([status], stats.get(status, 0))
        yield finished
        queue = GaugeMetricFamily("vlq_queue_depth", "messages waiting in the broker queue", labels=["queue"])
        queue.add_metric([ctx.settings.broker.queue], depth)
        yield queue
        by_queue = {ctx.settings.broker.queue: 0}
        for worker in workers:
            by_queue[str(worker.get("queue"))] = by_queue.get(str(worker.get("queue")), 0) + 1
        live = GaugeMetricFamily("vlq_workers_live", "workers with a fresh heartbeat, by queue", labels=["queue"])
        for name, count in sorted(by_queue.items()):
            live.add_metric([name], count)
        yield live
        batches = GaugeMetricFamily("vlq_openai_batches_active", "OpenAI batches not yet final")
        batches.add_metric([], active)
        yield batches
        letters = GaugeMetricFamily("vlq_dead_letters", "queue entries that were not jobs, kept for reading")
        letters.add_metric([], dead)
        yield letters


class ApiMetrics:
    """This API's Prometheus registry (one per app, so several apps can share a process)."""

    def __init__(self, ctx_getter: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs_submitted = Counter(
            "vlq_api_jobs_submitted", "jobs submitted through this API", ["endpoint"], registry=r)
        self.latency = Histogram(
            "vlq_job_latency_seconds", "job submitted -> finished (jobs answered by this API)",
            ["status"], buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram(
            "vlq_job_queue_seconds", "job submitted -> started (jobs answered by this API)",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("vlq_prompt_tokens", "prompt tokens of answered jobs", registry=r)
        self.completion_tokens = Counter(
            "vlq_completion_tokens", "completion tokens of answered jobs (rate() = tokens/s)", registry=r)
        self.decode_tps = Histogram(
            "vlq_decode_tokens_per_second", "per job: completion tokens / engine decode time",
            buckets=_TPS_BUCKETS, registry=r)
        r.register(_RedisCollector(ctx_getter))

    def submitted(self, endpoint: str, n: int = 1) -> None:
        self.jobs_submitted.labels(endpoint).inc(n)

    def observe(self, record: JobRecord | None, document: dict[str, Any] | None) -> None:
        """Count one finished job (call once per job)."""
        if record is not None and record.finished_at and record.created_at:
            self.latency.labels(record.status.value).observe(max(0.0, record.finished_at - record.created_at))
            if record.started_at:
                self.queue_wait.observe(max(0.0, record.started_at - record.created_at))
        if not document:
            return
        usage = document.get("usage") or {}
        self.prompt_tokens.inc(int(usage.get("prompt_tokens") or 0))
        completion = int(usage.get("completion_tokens") or 0)
        self.completion_tokens.inc(completion)
        decode_ms = ((document.get("vlq") or {}).get("timings") or {}).get("decode")
        if completion and decode_ms:
            self.decode_tps.observe(completion / (float(decode_ms) / 1000.0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


@router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    ctx = get_ctx(request)
    body = await ctx.run(ctx.metrics.render)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
