"""docker-compose.yml, checked by parsing it (no compose engine runs here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from producer.config import Settings

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def workers(compose: dict) -> dict[str, dict]:
    return {name: s for name, s in compose["services"].items() if s.get("command", [])[:2] == ["vlq", "worker"]}


def test_redis_keeps_an_append_only_file_and_reports_its_health(compose: dict) -> None:
    redis = compose["services"]["redis"]
    command = redis["command"]
    assert command[command.index("--appendonly") + 1] == "yes"
    assert command[command.index("--appendfsync") + 1] == "everysec"
    assert "ping" in redis["healthcheck"]["test"]
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_minio_is_healthchecked_and_its_bucket_made_before_anyone_writes(compose: dict) -> None:
    services = compose["services"]
    assert services["minio"]["healthcheck"]["test"]
    assert services["minio-bucket"]["depends_on"]["minio"]["condition"] == "service_healthy"
    assert "mc mb -p local/vlq-results" in services["minio-bucket"]["command"][0]


def test_the_api_serves_vlq_api_once_redis_is_healthy(compose: dict) -> None:
    api = compose["services"]["api"]
    assert api["command"][:2] == ["vlq", "api"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "127.0.0.1:8000:8000" in api["ports"]  # no tokens are set: this host only


def test_workers_do_not_fetch_images_from_the_compose_network(compose: dict) -> None:
    for name, worker in workers(compose).items():
        assert worker["environment"]["VLQ_IMAGES_BLOCK_PRIVATE_NETWORKS"] == "true", name


def test_there_is_one_worker_per_gpu_each_with_its_own_card(compose: dict) -> None:
    found = workers(compose)
    assert len(found) >= 2
    cards = []
    for name, worker in found.items():
        assert worker["command"][2] == "--model", name
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy", name
        [device] = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"], name
        cards += device["device_ids"]
        assert "--gpu" not in worker["command"], "a container sees only its own card, as device 0"
    assert len(cards) == len(set(cards)) == len(found)


def test_every_service_environment_is_a_valid_vlq_configuration(compose: dict, monkeypatch) -> None:
    for name, service in compose["services"].items():
        env = service.get("environment") or {}
        vlq_vars = {k: str(v) for k, v in env.items() if k.startswith("VLQ_")}
        if not vlq_vars:
            continue
        for k in [k for k in os.environ if k.startswith("VLQ_")]:
            monkeypatch.delenv(k)
        for k, v in vlq_vars.items():
            monkeypatch.setenv(k, v)
        settings = Settings.load(REPO / "conf")  # raises ConfigError on an unknown or bad setting
        assert settings.broker.url == "redis://redis:6379/0", name
        assert settings.store.kind == "s3" and settings.store.s3.endpoint_url == "http://minio:9000", name


def test_images_are_built_from_the_repository_dockerfile(compose: dict) -> None:
    built = [s for s in compose["services"].values() if "build" in s]
    assert built and all(s["build"]["dockerfile"] == "Dockerfile" for s in built)
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "torch==2.13.0" in dockerfile and '.[worker,s3]' in dockerfile
