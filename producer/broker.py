"""The Celery side of the wire: task name, message settings, and sending a job.

Producers send jobs by task *name* through a minimal Celery app, so they never import worker code
or torch. The worker's app (:mod:`worker.celery_app`) starts from the same :func:`celery_config`,
so both sides agree on the serializer and the Redis visibility timeout (when apps sharing a broker
disagree, the shortest timeout wins).
"""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu.exceptions import OperationalError

from producer.config import Settings
from producer.errors import BrokerUnavailable
from producer.keys import Keys
from producer.schema import Job

TASK_NAME = "vlq.run_job"


def celery_config(settings: Settings) -> dict[str, Any]:
    """Celery settings both sides share: JSON only, no result backend, the queue, the timeouts."""
    broker = settings.broker
    return {
        "broker_url": broker.url,
        "broker_transport_options": {
            # Redis redelivers a message not acknowledged within this many seconds.
            "visibility_timeout": broker.visibility_timeout_s,
            "socket_connect_timeout": broker.connect_timeout_s,
            "socket_keepalive": True,
            "retry_on_timeout": True,
            "health_check_interval": 30,
            # kombu's own keys under key_prefix too (producer.keys.Keys.broker).
            "global_keyprefix": Keys(settings.key_prefix).broker,
        },
        "broker_connection_timeout": broker.connect_timeout_s,
        "broker_connection_retry_on_startup": True,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        # Job state lives in our own records (producer.state), not in a Celery result backend.
        "result_backend": None,
        "task_ignore_result": True,
        "task_default_queue": broker.queue,
        "task_create_missing_queues": True,
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 3,
            "interval_start": 0.0,
            "interval_step": 0.5,
            "interval_max": 2.0,
        },
    }


def producer_app(settings: Settings) -> Celery:
    """A Celery app that only sends (no tasks registered, nothing imported from the worker)."""
    app = Celery("vlq-producer", set_as_current=False)
    app.conf.update(celery_config(settings))
    return app


# Redis serves a queue's priority lists in order, 0 first (kombu's steps 0, 3, 6, 9). New jobs
# go in at PRIORITY_NEW; a job sent ``ahead`` (re-enqueued because its worker died) at
# PRIORITY_AHEAD, so it runs next instead of after the whole backlog.
PRIORITY_AHEAD = 0
PRIORITY_NEW = 3


def send_job(
    app: Celery, job: Job, queue: str, *, producer: Any = None, countdown: float | None = None, ahead: bool = False
) -> None:
    """Send one task message carrying ``job`` as JSON (``ahead``: before the jobs waiting in the
    queue). Raises :class:`BrokerUnavailable`."""
    try:
        app.send_task(
            TASK_NAME,
            args=[job.to_json()],
            queue=queue,
            task_id=job.id,
            producer=producer,
            countdown=countdown,
            priority=PRIORITY_AHEAD if ahead else PRIORITY_NEW,
            ignore_result=True,
        )
    except OperationalError as e:
        raise BrokerUnavailable(f"cannot send job {job.id} to the broker: {e}") from e
