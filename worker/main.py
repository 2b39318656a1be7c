"""``vlq worker``: one process per GPU, one engine pair, a Celery threads pool feeding it.

The shape (see docs/queue.md):

- ``CUDA_VISIBLE_DEVICES`` is set *before* torch is imported, so the process sees only its card;
- one :class:`worker.engine.chat.ChatEngine` is built at start and shared by every thread; its
  scheduler, not Celery, keeps at most ``engine.max_batch_size`` requests on the GPU;
- Celery's threads pool runs ``max_batch_size + 2`` jobs at once by default, so while the engine
  is full the next jobs' images are already being fetched and decoded (a prefork pool would build
  one engine per child, or run one job at a time);
- a lease keeper thread heartbeats running jobs and reclaims those of dead workers;
- SIGTERM/SIGINT shut down warmly: no new jobs, running ones finish, then the engine closes.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

from producer.broker import send_job
from producer.config import Settings
from producer.errors import ConfigError, StoreUnavailable
from producer.keys import Keys
from producer.schema import Job
from producer.state import JobStore, safe_url

log = logging.getLogger("vlq.worker")


def node_name(gpu: int | None) -> str:
    """A unique Celery node name: device, host, pid and a random tag (restarts never collide)."""
    device = f"gpu{gpu}" if gpu is not None else "cpu"
    return f"vlq-{device}-{os.getpid()}-{uuid.uuid4().hex[:6]}@{socket.gethostname()}"


def pin_gpu(gpu: int | None) -> None:
    """Make ``gpu`` the only card this process sees. Must run before torch is imported."""
    if gpu is None:
        return
    if "torch" in sys.modules:
        raise ConfigError("torch was imported before the GPU was pinned; start the worker through"
                          " vlq worker --gpu N, or set CUDA_VISIBLE_DEVICES yourself")
    os.environ["CUDA_VISIBLE_DEVICES"] = str(gpu)


def worker_settings(
    settings: Settings,
    model_dir: str | Path | None = None,
    queue: str | None = None,
    concurrency: int | None = None,
    gpu: int | None = None,
) -> Settings:
    """``settings`` with the command line's model folder, queue, concurrency and GPU applied (a
    GPU asked for makes an ``auto`` device ``cuda``: no quiet fallback to the CPU)."""
    engine = settings.engine
    if model_dir is not None:
        engine = engine.model_copy(update={"model_dir": Path(model_dir)})
    if gpu is not None and engine.device == "auto":
        engine = engine.model_copy(update={"device": "cuda"})
    elif gpu is not None and engine.device == "cpu":
        raise ConfigError(f"--gpu {gpu} asks for a GPU but engine.device is cpu: leave one of them out"
                          " (VLQ_ENGINE_DEVICE=auto, or no --gpu)")
    if engine.model_dir is None:
        raise ConfigError("no model folder: pass --model DIR or set engine.model_dir")
    if Path(engine.model_dir).is_file():
        raise ConfigError(f"{engine.model_dir} is a file: --model takes the model's folder (config.json,"
                          " qwen.tiktoken and the weights)")
    if not Path(engine.model_dir).is_dir():
        raise ConfigError(f"model folder {engine.model_dir} does not exist: check --model (or engine.model_dir)")
    broker = settings.broker.model_copy(update={"queue": queue}) if queue else settings.broker
    work = settings.worker
    if concurrency is not None:
        work = work.model_copy(update={"concurrency": concurrency})
    return settings.model_copy(update={"engine": engine, "broker": broker, "worker": work})


# Celery's own line per task received and per task finished: vlq logs one line per job with what
# matters (status, milliseconds, attempt, error code), so these only show at DEBUG.
PER_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace")


def configure_logging(loglevel: str) -> None:
    """Log to stderr at ``loglevel``, with Celery's per-task lines only at DEBUG."""
    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in PER_TASK_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)


def run_worker(
    settings: Settings,
    model_dir: str | Path | None = None,
    gpu: int | None = None,
    queue: str | None = None,
    concurrency: int | None = None,
    *,
    loglevel: str = "INFO",
) -> int:
    """Run a worker until it is told to stop; returns its exit code."""
    pin_gpu(gpu)  # before anything below imports torch
    settings = worker_settings(settings, model_dir, queue, concurrency, gpu)
    configure_logging(loglevel)
    from worker.celery_app import CONSUMER_PULSE, check_timeouts, make_celery_app, wait_for_broker

    check_timeouts(settings)
    wait_for_broker(settings)
    from worker.stores import check_default_bucket

    try:
        check_default_bucket(settings)
    except StoreUnavailable as e:  # S3 down for now: jobs retry their writes, so start anyway
        log.warning("the result bucket cannot be reached yet: %s", e.message)

    from celery.signals import worker_shutting_down

    from worker.consumer_watch import ConsumerWatch
    from worker.engine.chat import ChatEngine  # imports torch: after the GPU is pinned
    from worker.images import ImageLoader
    from worker.leases import LeaseKeeper
    from worker.stores import ResultStores
    from worker.tasks import EventWriter, JobRunner, register

    queue_name = settings.broker.queue
    threads = settings.worker.concurrency or settings.engine.max_batch_size + 2
    name = node_name(gpu)
    log.info("worker %s: loading %s (backend %s)", name, settings.engine.model_dir,
             settings.engine.backend)
    engine = ChatEngine.from_settings(settings.engine, model_name=settings.api.served_model)
    log.info("worker %s: checkpoint %s", name, engine.checkpoint)
    images = ImageLoader(settings.images, settings.store.s3)
    store = JobStore.from_settings(settings)
    app = make_celery_app(settings)

    def requeue(job: Job, job_queue: str) -> None:
        send_job(app, job, job_queue or queue_name, ahead=True)  # its users have waited their turn already

    stalled: list[str] = []

    def stop_stalled(reason: str) -> None:  # in the lease keeper's thread
        stalled.append(reason)
        log.critical("worker %s: %s; stopping so that its supervisor starts a fresh one (exit 1); its running"
                     " jobs finish first", name, reason)
        leases.retire()
        os.kill(os.getpid(), signal.SIGTERM)  # Celery's warm shutdown

    watch = ConsumerWatch(CONSUMER_PULSE.age, threads=threads, stall_s=settings.worker.consumer_stall_s,
                          on_stall=stop_stalled)
    leases = LeaseKeeper(
        store,
        worker_name=name,
        heartbeat_s=settings.worker.heartbeat_s,
        lease_timeout_s=settings.worker.lease_timeout_s,
        max_reclaims=settings.worker.max_reclaims,
        requeue=requeue,
        info={"gpu": gpu, "queue": queue_name, "model": str(settings.engine.model_dir),
              "checkpoint": engine.checkpoint, "backend": settings.engine.backend, "concurrency": threads},
        watch=watch,
    )
    events = EventWriter(store)
    runner = JobRunner(
        settings,
        store=store,
        engine=engine,
        images=images,
        results=ResultStores.from_settings(settings, store.redis),
        leases=leases,
        worker_name=name,
        queue_name=queue_name,
        events=events,
    )
    register(app, runner)
    CONSUMER_PULSE.touch()  # loading the model took a while; the consumer starts now
    leases.start()

    def say_what_is_left(**_: Any) -> None:  # SIGTERM / Ctrl-C: Celery finishes the running jobs first
        running = leases.running()
        log.info("worker %s: stopping; waiting for %d running job(s)%s", name, len(running),
                 f": {', '.join(running)}" if running else "")

    worker_shutting_down.connect(say_what_is_left, weak=False)
    log.info("worker %s: serving queue %r of %s with %d threads (engine batch %d), keys %s:*, settings from %s",
             name, queue_name, safe_url(settings.broker.url), threads, settings.engine.max_batch_size,
             Keys(settings.key_prefix).prefix, settings.source())
    try:
        celery_worker = app.Worker(
            hostname=name,
            pool="threads",
            concurrency=threads,
            queues=[queue_name],
            loglevel=loglevel,
            # No gossip/mingle/heartbeat between workers: unused here, and a known cause of
            # workers that stop consuming (celery#2296).
            without_gossip=True,
            without_mingle=True,
            without_heartbeat=True,
            optimization="fair",
            quiet=True,
        )
        celery_worker.start()
        return 1 if stalled else int(celery_worker.exitcode or 0)
    finally:
        log.info("worker %s: shutting down", name)
        leases.stop()
        events.close()
        images.close()
        engine.close()
        store.close()
