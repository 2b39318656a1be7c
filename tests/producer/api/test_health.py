"""/healthz: broker reachable, workers seen; 503 when Redis is gone."""

from __future__ import annotations

import httpx
import pytest

from producer.api import create_app
from producer.config import Settings
from tests.conftest import REPO, free_port
from tests.producer.api.conftest import Api, serve


@pytest.mark.integration
def test_healthz_sees_the_broker_and_the_live_worker(api: Api) -> None:
    with api.http() as http:
        health = http.get("/healthz").json()
    assert health["status"] == "ok" and health["broker"] == {"ok": True}
    assert health["workers"]["live"] == 1 and health["queue"] == api.stack.settings.broker.queue


def test_healthz_without_workers_says_so_and_stays_up(redis_server: str) -> None:
    settings = Settings.load(REPO / "conf", key_prefix="vlqtest-noworkers",
                             broker={"url": redis_server, "queue": "vlqtest-noworkers"})
    with serve(create_app(settings)) as url, httpx.Client(base_url=url) as http:
        response = http.get("/healthz")
    assert response.status_code == 200
    assert response.json()["status"] == "no_workers" and response.json()["workers"]["live"] == 0


def test_healthz_is_503_when_redis_cannot_be_reached() -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    settings = Settings.load(REPO / "conf", broker={"url": dead, "connect_timeout_s": 0.5})
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=30) as http:
        response = http.get("/healthz")
        jobs = http.post("/v1/jobs", json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 503
    assert response.json()["status"] == "broker_unavailable" and response.json()["broker"]["ok"] is False
    assert jobs.status_code == 503 and jobs.json()["error"]["code"] == "broker_unavailable"
