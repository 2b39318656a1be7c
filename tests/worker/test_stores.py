"""Result stores against a private Redis and moto's S3 server."""

from __future__ import annotations

import boto3
import pytest
from botocore.stub import Stubber

from producer.config import Settings
from producer.errors import ConfigError, StoreRejected, StoreUnavailable
from producer.keys import Keys
from producer.schema import Destination
from producer.state import JobStore
from worker.stores import RedisResultStore, ResultStores, S3ResultStore, check_default_bucket

DOC = {"object": "chat.completion", "choices": [{"message": {"content": "一只熊猫"}}]}


@pytest.fixture
def s3(s3_server: str):
    client = boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")
    client.create_bucket(Bucket="results")
    return client


def test_redis_results_are_keyed_by_job_id_and_expire(redis_server: str, key_prefix: str) -> None:
    store = JobStore.from_url(redis_server, Keys(key_prefix), 60)
    results = RedisResultStore(store.redis, store.keys, ttl_s=60)
    assert results.put("job-1", DOC) == f"redis:{key_prefix}:result:job-1"
    results.put("job-1", DOC)  # a redelivery rewrites the same key
    assert results.get("job-1") == DOC
    assert 0 < store.redis.ttl(store.keys.result("job-1")) <= 60
    assert results.get("job-2") is None


def test_s3_results_are_json_objects_under_the_prefix(s3) -> None:
    store = S3ResultStore(s3, "results", "runs/a")
    assert store.put("job-1", DOC) == "s3://results/runs/a/job-1.json"
    head = s3.head_object(Bucket="results", Key="runs/a/job-1.json")
    assert head["ContentType"] == "application/json"
    store.put("job-1", DOC)
    listed = s3.list_objects_v2(Bucket="results", Prefix="runs/a/")
    assert [o["Key"] for o in listed["Contents"]] == ["runs/a/job-1.json"]
    assert store.get("job-1") == DOC
    assert store.get("job-404") is None


def test_a_missing_bucket_is_a_permanent_store_rejected(s3) -> None:
    with pytest.raises(StoreRejected) as e:
        S3ResultStore(s3, "no-such-bucket").put("job-1", DOC)
    assert "NoSuchBucket" in e.value.message


def test_missing_credentials_are_a_permanent_store_rejected_saying_to_give_some(
    s3_server: str, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))  # a host with no credentials
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    client = boto3.session.Session(region_name="us-east-1").client("s3", endpoint_url=s3_server)
    with pytest.raises(StoreRejected) as e:
        S3ResultStore(client, "results").put("job-1", DOC)
    assert "Unable to locate credentials" in e.value.message and "AWS_ACCESS_KEY_ID" in e.value.message


@pytest.mark.parametrize("code,status", [("SlowDown", 503), ("InternalError", 500)])
def test_s3_server_errors_are_transient(code: str, status: int) -> None:
    client = boto3.client("s3", region_name="us-east-1")
    with Stubber(client) as stub:
        stub.add_client_error("put_object", service_error_code=code, http_status_code=status)
        with pytest.raises(StoreUnavailable) as e:
            S3ResultStore(client, "results").put("job-1", DOC)
    assert e.value.retryable


def test_an_unreachable_s3_endpoint_is_transient() -> None:
    from botocore.config import Config

    from tests.conftest import free_port

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{free_port()}", region_name="us-east-1",
                          config=Config(retries={"max_attempts": 1}, connect_timeout=1))
    with pytest.raises(StoreUnavailable):
        S3ResultStore(client, "results").put("job-1", DOC)


def test_each_destination_gets_its_store(s3_server: str, redis_server: str, key_prefix: str) -> None:
    settings = Settings.load(key_prefix=key_prefix,
                             store={"s3": {"endpoint_url": s3_server, "region": "us-east-1"}})
    store = JobStore.from_url(redis_server, Keys(key_prefix), 60)
    stores = ResultStores.from_settings(settings, store.redis)
    assert isinstance(stores.for_destination(Destination()), RedisResultStore)
    s3_store = stores.for_destination(Destination(kind="s3", bucket="b", prefix="p/"))
    assert isinstance(s3_store, S3ResultStore) and (s3_store.bucket, s3_store.prefix) == ("b", "p/")
    assert stores.for_destination(Destination(kind="s3", bucket="c")).s3 is s3_store.s3


def test_a_worker_checks_its_default_bucket_before_serving(s3, s3_server: str) -> None:
    def settings(bucket: str, kind: str = "s3") -> Settings:
        return Settings.load(store={"kind": kind, "s3": {"bucket": bucket, "endpoint_url": s3_server,
                                                         "region": "us-east-1"}})

    check_default_bucket(settings("results"), s3)  # exists: nothing to say
    check_default_bucket(settings("no-such-bucket", kind="redis"), s3)  # results go to Redis: not checked
    with pytest.raises(ConfigError, match="store.s3.bucket 'no-such-bucket' cannot take results: .*create the bucket"):
        check_default_bucket(settings("no-such-bucket"), s3)
