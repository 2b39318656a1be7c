"""/metrics: Prometheus text with jobs by status, queue depth, workers, latency and tokens."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from producer.api import create_app
from producer.client import Client
from producer.config import Settings
from tests.conftest import REPO
from tests.producer.api.conftest import Api, serve


def scrape(http: httpx.Client) -> dict[tuple[str, tuple], float]:
    response = http.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_jobs_by_status_and_queue_depth_come_from_redis(redis_server: str, key_prefix: str) -> None:
    # No worker serves this queue, so what was submitted stays where it was put.
    settings = Settings.load(REPO / "conf", key_prefix=key_prefix, broker={"url": redis_server, "queue": key_prefix})
    body = {"messages": [{"role": "user", "content": "hi"}]}
    with Client(settings) as client:
        handles = [client.submit(body) for _ in range(3)]
        assert handles[0].cancel() == "cancelled"
        with serve(create_app(settings, client)) as url, httpx.Client(base_url=url) as http:
            m = scrape(http)
    assert m[("vlq_broker_up", ())] == 1
    assert m[("vlq_jobs", (("status", "queued"),))] == 2
    assert m[("vlq_jobs", (("status", "running"),))] == 0
    assert m[("vlq_jobs_finished_total", (("status", "cancelled"),))] == 1
    assert m[("vlq_queue_depth", (("queue", key_prefix),))] == 3  # the cancelled one's message waits too
    assert m[("vlq_workers_live", (("queue", key_prefix),))] == 0  # listed even when none serves it


def test_live_workers_count_by_queue_and_dead_letters_show(redis_server: str, key_prefix: str) -> None:
    settings = Settings.load(REPO / "conf", key_prefix=key_prefix, broker={"url": redis_server, "queue": key_prefix})
    with Client(settings) as client:
        store = client.store
        store.register_worker("w-ours", {"queue": key_prefix})
        store.register_worker("w-other-1", {"queue": "elsewhere"})
        store.register_worker("w-other-2", {"queue": "elsewhere"})
        store.redis.lpush(store.keys.dead_letters, '{"raw": "junk"}', '{"raw": "more junk"}')
        with serve(create_app(settings, client)) as url, httpx.Client(base_url=url) as http:
            m = scrape(http)
            health = http.get("/healthz").json()
            store.unregister_worker("w-ours")
            alone = http.get("/healthz").json()
    assert m[("vlq_workers_live", (("queue", key_prefix),))] == 1
    assert m[("vlq_workers_live", (("queue", "elsewhere"),))] == 2
    assert m[("vlq_dead_letters", ())] == 2
    assert health["status"] == "ok" and health["workers"] == {"live": 1, "names": ["w-ours"], "other_queues": 2}
    # workers of other queues do not make this API's queue served
    assert alone["status"] == "no_workers" and alone["workers"]["other_queues"] == 2


@pytest.mark.integration
def test_answered_jobs_show_in_latency_and_token_counters(api: Api) -> None:
    url = (api.stack.images / "demo.jpeg").as_uri()
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "这是什么"}]}], "max_tokens": 3}
    with api.http() as http:
        before = scrape(http)
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        after = scrape(http)

    def grew(name: str, labels: tuple = ()) -> float:
        return after.get((name, labels), 0) - before.get((name, labels), 0)

    assert grew("vlq_completion_tokens_total") == 3 and grew("vlq_prompt_tokens_total") == 285
    assert grew("vlq_job_latency_seconds_count", (("status", "succeeded"),)) == 1
    assert grew("vlq_decode_tokens_per_second_count") == 1
    assert grew("vlq_api_jobs_submitted_total", (("endpoint", "chat.completions"),)) == 1
    assert grew("vlq_jobs_finished_total", (("status", "succeeded"),)) >= 1
    assert after[("vlq_workers_live", (("queue", api.stack.settings.broker.queue),))] == 1
