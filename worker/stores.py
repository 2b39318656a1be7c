"""Result stores: where a finished job's JSON document is written.

A result is keyed by its job id alone, so a redelivered job rewrites the same key with an
equivalent document and a job never has two results. Each store's ``put`` returns the location
recorded in the job's record (``redis:<key>`` or ``s3://bucket/key``), which is where readers
(the SDK, the API) look.

- :class:`RedisResultStore`: a string at ``Keys.result(id)`` with the store's TTL.
- :class:`S3ResultStore`: ``<prefix><job_id>.json`` with ``ContentType: application/json``.
  Server errors (5xx, SlowDown) and connection failures raise :class:`StoreUnavailable`
  (retried by the task); a refusal (no such bucket, access denied) raises
  :class:`StoreRejected`.

:class:`ResultStores` picks the store for a job's :class:`producer.schema.Destination`.
"""

from __future__ import annotations

import json
import threading
from typing import Any, Protocol

import redis

from producer.config import Settings
from producer.errors import ConfigError, StoreRejected, StoreUnavailable
from producer.keys import Keys
from producer.schema import Destination
from producer.state import redis_errors

_S3_TRANSIENT_CODES = {
    "SlowDown",
    "ServiceUnavailable",
    "InternalError",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "503",
    "500",
}


class ResultStore(Protocol):
    def put(self, job_id: str, document: dict[str, Any]) -> str:
        """Write the document; return its location."""
        ...

    def get(self, job_id: str) -> dict[str, Any] | None: ...


def encode(document: dict[str, Any]) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


class RedisResultStore:
    """Results as Redis strings under ``Keys.result(job_id)``, expiring after ``ttl_s``."""

    def __init__(self, client: redis.Redis, keys: Keys, ttl_s: int, url: str = "") -> None:
        self.redis = client
        self.keys = keys
        self.ttl_s = int(ttl_s)
        self.url = url

    def put(self, job_id: str, document: dict[str, Any]) -> str:
        key = self.keys.result(job_id)
        with redis_errors(self.url):
            self.redis.set(key, encode(document), ex=self.ttl_s)
        return f"redis:{key}"

    def get(self, job_id: str) -> dict[str, Any] | None:
        with redis_errors(self.url):
            raw = self.redis.get(self.keys.result(job_id))
        return json.loads(raw) if raw is not None else None


class S3ResultStore:
    """Results as S3 objects ``<prefix><job_id>.json`` in ``bucket``."""

    def __init__(self, client: Any, bucket: str, prefix: str = "") -> None:
        self.s3 = client
        self.bucket = bucket
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"

    def key(self, job_id: str) -> str:
        return f"{self.prefix}{job_id}.json"

    def put(self, job_id: str, document: dict[str, Any]) -> str:
        key = self.key(job_id)
        self._call(
            "write",
            key,
            lambda: self.s3.put_object(
                Bucket=self.bucket, Key=key, Body=encode(document), ContentType="application/json"
            ),
        )
        return f"s3://{self.bucket}/{key}"

    def get(self, job_id: str) -> dict[str, Any] | None:
        key = self.key(job_id)
        try:
            body = self._call(
                "read", key, lambda: self.s3.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            )
        except StoreRejected as e:
            if e.context.get("s3_code") in ("NoSuchKey", "404"):
                return None
            raise
        return json.loads(body)

    def check(self) -> None:
        """Raise :class:`StoreRejected` when the bucket does not exist or refuses these
        credentials (:class:`StoreUnavailable` when S3 cannot be reached)."""
        self._call("reach", "", lambda: self.s3.head_bucket(Bucket=self.bucket))

    def _call(self, what: str, key: str, fn: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        where = f"s3://{self.bucket}/{key}"
        try:
            return fn()
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
            if status >= 500 or code in _S3_TRANSIENT_CODES:
                raise StoreUnavailable(f"S3 could not {what} {where}: {code} {err.get('Message', '')}".strip(),
                                       s3_code=code) from e
            raise StoreRejected(
                f"S3 refused to {what} {where}: {code} {err.get('Message', '')}; check the bucket,"
                " the endpoint (store.s3.endpoint_url) and the credentials",
                s3_code=code,
            ) from e
        except NoCredentialsError as e:  # the same on every try: not a store that is away
            raise StoreRejected(
                f"S3 could not {what} {where}: {e}; give the workers AWS credentials (AWS_ACCESS_KEY_ID and"
                " AWS_SECRET_ACCESS_KEY, or ~/.aws/credentials)") from e
        except BotoCoreError as e:
            raise StoreUnavailable(f"S3 could not {what} {where}: {e}") from e


def make_s3_client(settings: Settings) -> Any:
    """A boto3 S3 client for ``store.s3`` (endpoint, region); credentials from the environment."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:  # pragma: no cover - depends on the install
        from producer.errors import ConfigError

        raise ConfigError("S3 results need boto3: pip install 'vlq[s3]'") from None
    s3 = settings.store.s3
    return boto3.client(
        "s3",
        endpoint_url=s3.endpoint_url,
        region_name=s3.region,
        config=Config(
            connect_timeout=5,
            read_timeout=30,
            retries={"max_attempts": 2, "mode": "standard"},
        ),
    )


def check_default_bucket(settings: Settings, client: Any = None) -> None:
    """With ``store.kind`` s3, check that ``store.s3.bucket`` exists and takes this worker's
    credentials, before any GPU time goes into answers that could not be written: a bucket S3
    refuses raises :class:`ConfigError`; S3 out of reach raises :class:`StoreUnavailable`."""
    if settings.store.kind != "s3":
        return
    s3 = settings.store.s3
    try:
        S3ResultStore(client or make_s3_client(settings), s3.bucket or "", s3.prefix).check()
    except StoreRejected as e:
        raise ConfigError(f"store.s3.bucket {s3.bucket!r} cannot take results: {e.message}; create the bucket"
                          " or set store.s3.bucket (VLQ_STORE_S3) to one that exists") from None


class ResultStores:
    """The store for each job's destination: Redis, or S3 with the destination's bucket/prefix
    (one boto3 client, made on first use and shared: boto3 clients are thread-safe)."""

    def __init__(self, settings: Settings, redis_store: RedisResultStore, s3_client: Any = None) -> None:
        self.settings = settings
        self.redis = redis_store
        self._s3_client = s3_client
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings, client: redis.Redis) -> ResultStores:
        keys = Keys(settings.key_prefix)
        return cls(settings, RedisResultStore(client, keys, settings.store.ttl_s, settings.broker.url))

    def s3_client(self) -> Any:
        with self._lock:
            if self._s3_client is None:
                self._s3_client = make_s3_client(self.settings)
            return self._s3_client

    def for_destination(self, destination: Destination) -> ResultStore:
        if destination.kind == "s3":
            return S3ResultStore(self.s3_client(), destination.bucket or "", destination.prefix)
        return self.redis
