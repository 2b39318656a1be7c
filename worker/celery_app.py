"""The worker's Celery app, built from :class:`producer.config.Settings`.

Starts from the settings the producer uses (:func:`producer.broker.celery_config`: Redis broker,
JSON only, no result backend, the queue, the visibility timeout) and adds what only a worker
needs: late acknowledgement, re-queueing on worker loss, prefetch 1, no remote-control chatter.

Why these: with ``task_acks_late`` a message is acknowledged after the task returns, so a worker
that dies mid-job leaves it to be delivered again; ``task_reject_on_worker_lost`` keeps Celery
from acknowledging it anyway when the pool loses a worker; ``worker_prefetch_multiplier=1``
reserves only as many messages as there are threads. Redis redelivers an unacknowledged message
only after ``visibility_timeout``, which must exceed the longest job (checked here); a killed
worker's job is recovered far sooner through leases (:mod:`worker.leases`).
"""

from __future__ import annotations

import json
import logging
import time

import redis
from celery import Celery
from kombu.transport import redis as kombu_redis

from producer.broker import celery_config
from producer.config import Settings
from producer.errors import BrokerUnavailable, ConfigError
from producer.keys import Keys
from producer.state import safe_url

log = logging.getLogger(__name__)


def check_timeouts(settings: Settings) -> None:
    """Refuse settings where Redis would redeliver a job that is still running or waiting to retry."""
    visibility = settings.broker.visibility_timeout_s
    longest = settings.worker.job_timeout_s + settings.worker.retry_backoff_max_s
    if visibility <= longest:
        raise ConfigError(
            f"broker.visibility_timeout_s ({visibility}) must exceed worker.job_timeout_s +"
            f" worker.retry_backoff_max_s ({longest:g}); otherwise Redis delivers running jobs again"
        )
    if settings.worker.lease_timeout_s <= 2 * settings.worker.heartbeat_s:
        raise ConfigError(
            f"worker.lease_timeout_s ({settings.worker.lease_timeout_s:g}) must be more than twice"
            f" worker.heartbeat_s ({settings.worker.heartbeat_s:g}), or live jobs look dead"
        )


class Pulse:
    """When the broker consumer of this process last asked Redis for a job (its BRPOP), for
    :class:`worker.consumer_watch.ConsumerWatch`."""

    def __init__(self) -> None:
        self.at = time.monotonic()

    def touch(self) -> None:
        self.at = time.monotonic()

    def age(self) -> float:
        """Seconds since the last BRPOP was sent."""
        return time.monotonic() - self.at


CONSUMER_PULSE = Pulse()


class GuardedChannel(kombu_redis.Channel):
    """kombu's Redis channel, except that an entry on the queue list that is not a message
    (bytes pushed by hand, a foreign producer) is moved to vlq's dead letters instead of raising
    out of the consumer loop, which would stop the worker ("Unrecoverable error"). Every BRPOP it
    sends touches :data:`CONSUMER_PULSE`."""

    def _brpop_start(self, timeout=None):
        CONSUMER_PULSE.touch()
        return super()._brpop_start(timeout)

    def _brpop_read(self, **options):
        popped: dict[str, object] = {}
        parse = self.client.parse_response

        def capture(*args, **kwargs):
            popped["reply"] = reply = parse(*args, **kwargs)
            return reply

        # Keep the raw reply of this one read, so a bad entry can be dead-lettered as it was.
        self.client.parse_response = capture
        try:
            return super()._brpop_read(**options)
        except Exception as e:
            # Before an entry was popped this is the connection's business (Empty, errors that
            # make kombu reconnect). After, the entry itself failed to decode or deliver
            # (kombu counts even a KeyError on a missing field as a connection error).
            if not popped.get("reply"):
                raise
            self._dead_letter(popped["reply"], e)
            return True
        finally:
            del self.client.parse_response

    def _dead_letter(self, reply: object, error: Exception) -> None:
        raw = reply[1] if isinstance(reply, (list, tuple)) and len(reply) == 2 else reply
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else repr(raw)
        key = self.connection.client.transport_options.get("vlq_dead_letters")
        log.error("dropped a queue entry that is not a Celery message (%s: %s)", type(error).__name__, error)
        if not key:
            return
        entry = {"at": time.time(), "raw": text[:10000],
                 "reason": {"code": "malformed_job", "message": f"not a Celery message: {error}"}}
        try:
            with self.conn_or_acquire() as client:
                plain = redis.Redis(connection_pool=client.connection_pool)  # key is already prefixed
                plain.lpush(key, json.dumps(entry))
                plain.ltrim(key, 0, 9999)
        except Exception:  # the dead letter is a courtesy; the consumer must go on
            log.exception("could not dead-letter the entry")


class GuardedRedisTransport(kombu_redis.Transport):
    """The Redis transport with :class:`GuardedChannel`."""

    Channel = GuardedChannel


def make_celery_app(settings: Settings) -> Celery:
    """The worker's Celery app (tasks are registered by :func:`worker.tasks.register`)."""
    check_timeouts(settings)
    app = Celery("vlq-worker", set_as_current=True)
    app.conf.update(celery_config(settings))
    options = dict(app.conf.broker_transport_options)
    options["vlq_dead_letters"] = Keys(settings.key_prefix).dead_letters
    app.conf.update(
        broker_transport=f"{__name__}:GuardedRedisTransport",
        broker_transport_options=options,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A task that raised has been handled by us (coded failure); ack it.
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_send_task_events=False,
        task_send_sent_event=False,
        worker_enable_remote_control=False,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        # Connection loss re-queues unacknowledged jobs; leases keep duplicates from running.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_max_retries=None,
    )
    return app


def wait_for_broker(settings: Settings, timeout_s: float | None = None) -> None:
    """Wait (bounded, logged) until Redis answers PING; raise :class:`BrokerUnavailable` if not.

    Run at worker start so that a worker started beside its Redis (compose, systemd) does not
    die on the first refused connection, and one pointed at the wrong URL says so clearly.
    """
    timeout_s = settings.broker.startup_wait_s if timeout_s is None else timeout_s
    url = settings.broker.url
    client = redis.Redis.from_url(url, socket_connect_timeout=settings.broker.connect_timeout_s,
                                  socket_timeout=settings.broker.connect_timeout_s)
    deadline = time.monotonic() + timeout_s
    delay = 0.2
    attempt = 0
    try:
        while True:
            attempt += 1
            try:
                client.ping()
                if attempt > 1:
                    log.info("broker %s is up after %d attempts", safe_url(url), attempt)
                return
            except (redis.ConnectionError, redis.TimeoutError) as e:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerUnavailable(
                        f"Redis at {safe_url(url)} did not answer within {timeout_s:g}s: {e}"
                    ) from e
                log.warning("waiting for the broker %s (attempt %d): %s", safe_url(url), attempt, e)
                time.sleep(min(delay, left))
                delay = min(delay * 2, 5.0)
    finally:
        client.close()
