"""The worker's Celery app: reliability settings, timeouts, and the bounded broker wait."""

from __future__ import annotations

import time

import pytest

from producer.broker import TASK_NAME, producer_app
from producer.config import Settings
from producer.errors import BrokerUnavailable, ConfigError
from worker.celery_app import check_timeouts, make_celery_app, wait_for_broker


def settings(**kw) -> Settings:
    return Settings.load(**kw)


def test_worker_app_acks_late_rejects_on_loss_and_prefetches_one() -> None:
    conf = make_celery_app(settings()).conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1


def test_both_sides_speak_json_only_without_a_result_backend() -> None:
    for app in (make_celery_app(settings()), producer_app(settings())):
        assert app.conf.task_serializer == "json"
        assert list(app.conf.accept_content) == ["json"]
        assert app.conf.result_backend is None


def test_both_sides_share_the_visibility_timeout_and_queue() -> None:
    s = settings(broker={"visibility_timeout_s": 7200, "queue": "gpu-a"})
    for app in (make_celery_app(s), producer_app(s)):
        assert app.conf.broker_transport_options["visibility_timeout"] == 7200
        assert app.conf.task_default_queue == "gpu-a"


def test_a_visibility_timeout_shorter_than_a_job_is_refused() -> None:
    with pytest.raises(ConfigError, match="visibility_timeout_s"):
        check_timeouts(settings(broker={"visibility_timeout_s": 600}, worker={"job_timeout_s": 900}))


def test_a_lease_timeout_close_to_the_heartbeat_is_refused() -> None:
    with pytest.raises(ConfigError, match="lease_timeout_s"):
        check_timeouts(settings(worker={"heartbeat_s": 2, "lease_timeout_s": 3}))


def test_the_producer_sends_by_task_name_without_worker_code() -> None:
    import subprocess
    import sys

    code = ("import sys, producer.client, producer.broker, producer.cli;"
            "bad = [m for m in sys.modules if m.startswith(('torch', 'worker'))];"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert TASK_NAME == "vlq.run_job"


def test_waiting_for_the_broker_returns_once_redis_answers(redis_server: str) -> None:
    wait_for_broker(settings(broker={"url": redis_server}), timeout_s=5)


def test_waiting_for_an_absent_broker_gives_up_after_its_bound() -> None:
    from tests.conftest import free_port

    s = settings(broker={"url": f"redis://127.0.0.1:{free_port()}/0", "connect_timeout_s": 0.2})
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailable, match="did not answer within 1s"):
        wait_for_broker(s, timeout_s=1)
    assert time.monotonic() - t0 < 5


def test_a_polling_consumer_keeps_its_pulse_fresh(redis_server: str, key_prefix: str) -> None:
    from tests.worker.scripted_worker import scripted_worker
    from worker.celery_app import CONSUMER_PULSE

    s = settings(key_prefix=key_prefix, broker={"url": redis_server, "queue": key_prefix})
    with scripted_worker(s):
        time.sleep(2.5)  # idle: the consumer asks Redis again every second (BRPOP's timeout)
        assert CONSUMER_PULSE.age() < 2.0
