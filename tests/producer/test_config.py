"""Settings: YAML files per concern, VLQ_* variables over them, and errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.config import Settings
from producer.errors import ConfigError
from tests.conftest import REPO


@pytest.fixture(autouse=True)
def _no_vlq_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [n for n in os.environ if n.startswith("VLQ_")]:
        monkeypatch.delenv(name)


def test_a_yaml_file_fills_its_section_and_a_variable_wins_over_it(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "engine.yaml").write_text("max_batch_size: 4\nmax_images: 3\n")
    monkeypatch.setenv("VLQ_ENGINE_MAX_BATCH_SIZE", "6")
    monkeypatch.setenv("VLQ_IMAGES_ALLOWED_ROOTS", '["/data"]')
    monkeypatch.setenv("VLQ_STORE_S3", '{"bucket": "results", "region": "eu-west-1"}')
    settings = Settings.load(tmp_path)
    assert settings.engine.max_batch_size == 6 and settings.engine.max_images == 3
    assert settings.images.allowed_roots == [Path("/data")]
    assert settings.store.s3.bucket == "results" and settings.store.s3.region == "eu-west-1"


def test_a_bad_value_names_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLQ_ENGINE_MAX_BATCH_SIZE", "two")
    with pytest.raises(ConfigError, match="bad setting engine.max_batch_size: Input should be a valid integer"):
        Settings.load()


def test_an_unknown_setting_lists_what_its_section_holds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLQ_ENGINE_MAX_BATCHSIZE", "2")
    with pytest.raises(ConfigError) as err:
        Settings.load()
    assert "there is no setting engine.max_batchsize: engine holds model_dir" in err.value.message
    assert "max_batch_size" in err.value.message


def test_a_nested_section_spelled_as_one_variable_per_field_says_to_give_it_as_json(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLQ_STORE_S3_BUCKET", "results")
    with pytest.raises(ConfigError) as err:
        Settings.load()
    assert "there is no setting store.s3_bucket" in err.value.message
    assert """VLQ_STORE_S3='{"bucket": ...}'""" in err.value.message


def test_an_unknown_key_in_a_yaml_file_is_refused_too(tmp_path: Path) -> None:
    (tmp_path / "worker.yaml").write_text("concurency: 3\n")
    with pytest.raises(ConfigError, match="there is no setting worker.concurency: worker holds"):
        Settings.load(tmp_path)


@pytest.mark.parametrize("name, value", [("VLQ_IMAGES_ALLOWED_ROOTS", "/data"), ("VLQ_STORE_S3", "{bucket: x}")])
def test_a_variable_that_should_be_json_is_named_with_how_to_write_it(monkeypatch: pytest.MonkeyPatch, name: str,
                                                                      value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=f"cannot read {name}: lists and sections are given as JSON"):
        Settings.load()


@pytest.mark.parametrize("url", ["http://localhost:6379", "localhost:6379", "amqp://guest@localhost//"])
def test_a_broker_url_that_is_not_redis_is_refused_at_load(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("VLQ_BROKER_URL", url)
    with pytest.raises(ConfigError, match="bad setting broker.url: .* is not a Redis URL: write redis://"):
        Settings.load()


@pytest.mark.parametrize("name, meant", [("VLQ_WORKR_CONCURRENCY", "VLQ_WORKER_CONCURRENCY"),
                                         ("VLQ_IMAGE_ALLOWED_ROOTS", "VLQ_IMAGES_ALLOWED_ROOTS"),
                                         ("VLQ_KEYPREFIX", "VLQ_KEY_PREFIX")])
def test_a_variable_that_sets_nothing_is_refused_naming_the_one_meant(monkeypatch: pytest.MonkeyPatch, name: str,
                                                                      meant: str) -> None:
    monkeypatch.setenv(name, "3")
    with pytest.raises(ConfigError, match=f"{name} sets nothing: did you mean {meant}"):
        Settings.load()


def test_the_variables_of_the_cli_tests_and_demo_are_not_taken_for_typos(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("VLQ_DEBUG", "VLQ_CONF_DIR", "VLQ_REQUIRE_SHARED", "VLQ_SHARED_DIR", "VLQ_TOKENIZER"):
        monkeypatch.setenv(name, str(REPO / "conf") if name == "VLQ_CONF_DIR" else "1")
    Settings.load()


def test_a_yml_file_in_the_conf_folder_is_not_silently_skipped(tmp_path: Path) -> None:
    (tmp_path / "broker.yml").write_text("url: redis://elsewhere:6379/0\n")
    with pytest.raises(ConfigError, match="broker.yml: vlq reads conf/\\*.yaml only; rename it to broker.yaml"):
        Settings.load(tmp_path)


def test_a_broker_url_redis_cannot_use_is_refused_at_load(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VLQ_BROKER_URL", "redis://127.0.0.1:notaport/0")
    with pytest.raises(ConfigError, match="not a usable Redis URL .*Port could not be cast"):
        Settings.load()


def test_the_settings_say_where_they_came_from_for_the_start_up_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in [k for k in os.environ if k.startswith("VLQ_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("VLQ_WORKER_CONCURRENCY", "3")
    monkeypatch.setenv("VLQ_DEBUG", "1")  # not a setting: not listed
    assert Settings.load(REPO / "conf").source() == f"{(REPO / 'conf').resolve()} + VLQ_WORKER_CONCURRENCY"
