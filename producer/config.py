"""Configuration: ``conf/*.yaml`` (one file per concern) + ``VLQ_*`` environment overrides.

Each YAML file in the configuration folder fills the section named like the file
(``conf/engine.yaml`` -> ``settings.engine``). Environment variables override files:
``VLQ_BROKER_URL`` sets ``broker.url``, ``VLQ_ENGINE_MAX_BATCH_SIZE`` sets
``engine.max_batch_size``; top-level fields are ``VLQ_KEY_PREFIX`` and so on. Lists and
mappings are given as JSON (``VLQ_IMAGES_ALLOWED_ROOTS='["/data"]'``).

The folder is ``$VLQ_CONF_DIR`` when set, else ``./conf`` when it exists; without either the
defaults below apply. Settings are validated once at start-up and passed down explicitly.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal

import redis.connection
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsError,
    SettingsConfigDict,
)

from producer.errors import ConfigError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class BrokerSettings(_Section):
    """Redis: the Celery broker and the job state store."""

    url: str = "redis://127.0.0.1:6379/0"
    queue: str = "vlq"

    @field_validator("url")
    @classmethod
    def _redis_url(cls, v: str) -> str:
        if v.split("://", 1)[0] not in ("redis", "rediss", "unix"):
            raise ValueError(f"{v!r} is not a Redis URL: write redis://host:6379/0 (rediss:// for TLS)")
        try:
            redis.connection.parse_url(v)  # what redis-py will make of it: port, db, options
        except ValueError as e:
            raise ValueError(f"{v!r} is not a usable Redis URL ({e}): write redis://host:6379/0") from None
        return v
    # Redis redelivers an unacknowledged message after this many seconds; it must exceed the
    # longest job plus its queue wait. Crashed workers are recovered sooner by leases.
    visibility_timeout_s: int = Field(default=6 * 3600, ge=60)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    # A starting worker waits this long (logging each attempt) for Redis before giving up.
    startup_wait_s: float = Field(default=60.0, ge=0)


class S3Settings(_Section):
    bucket: str | None = None
    prefix: str = "results/"
    endpoint_url: str | None = None
    region: str | None = None


class StoreSettings(_Section):
    """Where results go unless a job names its own destination."""

    kind: Literal["redis", "s3"] = "redis"
    ttl_s: int = Field(default=7 * 24 * 3600, ge=1)
    s3: S3Settings = S3Settings()

    @model_validator(mode="after")
    def _bucket_for_s3(self) -> StoreSettings:
        if self.kind == "s3" and not self.s3.bucket:
            raise ValueError("store.kind is s3 but store.s3.bucket is not set")
        return self


class ImageSettings(_Section):
    """Image intake limits."""

    max_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_pixels: int = Field(default=8192 * 8192, ge=1)
    fetch_timeout_s: float = Field(default=10.0, gt=0)
    # file:// URLs are served only from under these folders; none means file:// is refused.
    allowed_roots: list[Path] = Field(default_factory=list)
    allow_http: bool = True
    allow_s3: bool = True
    # http(s) images only from hosts matching these globs ("*.example.com", "images.example.org");
    # empty allows any host. Checked for the URL and for every redirect hop.
    allowed_hosts: list[str] = Field(default_factory=list)
    # Refuse http(s) hosts with any loopback, private, link-local, multicast or reserved address
    # (cloud metadata at 169.254.169.254, localhost services): on for workers that fetch URLs from
    # untrusted jobs. The HTTP(S)_PROXY variables are ignored while it is on.
    block_private_networks: bool = False

    @field_validator("allowed_hosts")
    @classmethod
    def _host_globs(cls, hosts: list[str]) -> list[str]:
        for host in hosts:
            if "/" in host or host.count(":") == 1:  # a URL or host:port (IPv6 literals have 2+ colons)
                raise ValueError(f"{host!r} is not a host glob: write hosts like images.example.com or"
                                 " *.example.com, without scheme, port or path")
        return hosts


class EngineSettings(_Section):
    """The engine pair a worker holds. Defaults follow the seed's TensorRT-LLM build."""

    model_dir: Path | None = None
    backend: Literal["torch", "trtllm"] = "torch"
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["none", "int8"] = "none"
    max_batch_size: int = Field(default=2, ge=1)
    max_images: int = Field(default=26, ge=1)
    max_input_len: int = Field(default=30720, ge=1)
    max_seq_len: int = Field(default=32768, ge=2)
    default_max_tokens: int = Field(default=2048, ge=1)
    cuda_graphs: bool = True
    feature_cache_images: int = Field(default=64, ge=0)
    engine_dir: Path | None = None  # TensorRT engines (backend trtllm)

    @model_validator(mode="after")
    def _lengths(self) -> EngineSettings:
        if self.max_input_len >= self.max_seq_len:
            raise ValueError("engine.max_input_len must be below engine.max_seq_len")
        return self


class WorkerSettings(_Section):
    """Worker process behaviour."""

    # Celery threads; None means max_batch_size + 2 so the next jobs' images load while the
    # engine's slots are busy.
    concurrency: int | None = Field(default=None, ge=1)
    heartbeat_s: float = Field(default=2.0, gt=0)
    lease_timeout_s: float = Field(default=30.0, gt=0)
    job_timeout_s: float = Field(default=1800.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    # Re-enqueues of a job whose worker died while running it; one more loss fails it worker_lost,
    # so a job that crashes workers cannot take the fleet down one worker at a time.
    max_reclaims: int = Field(default=3, ge=0)
    retry_backoff_s: float = Field(default=2.0, ge=0)
    retry_backoff_max_s: float = Field(default=120.0, ge=0)
    # A worker whose broker consumer has sent Redis no BRPOP for this long, while Redis answered
    # and a thread was free, stops (exit 1) for its supervisor to restart it; 0: never.
    consumer_stall_s: float = Field(default=120.0, ge=0)


class ApiSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    auth_tokens: list[str] = Field(default_factory=list)
    max_body_bytes: int = Field(default=64 * 1024 * 1024, ge=1)
    served_model: str = "Qwen-VL-Chat"
    wait_timeout_s: float = Field(default=600.0, gt=0)


class Settings(BaseSettings):
    """All of vlq's settings. Build with :meth:`load`; pass the object down explicitly."""

    model_config = SettingsConfigDict(
        env_prefix="VLQ_",
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="forbid",
    )

    key_prefix: str = Field(default="vlq", pattern=r"^[\w.:-]+$")
    broker: BrokerSettings = BrokerSettings()
    store: StoreSettings = StoreSettings()
    images: ImageSettings = ImageSettings()
    engine: EngineSettings = EngineSettings()
    worker: WorkerSettings = WorkerSettings()
    api: ApiSettings = ApiSettings()

    # Set by load(): the YAML folder read, if any. Not a setting of its own.
    _conf_dir: Path | None = None

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # init (explicit overrides) > environment > YAML files > defaults
        yaml_values = _read_conf_dir(_CONF_DIR_FOR_LOAD.get("dir"))
        return (init_settings, env_settings, InitSettingsSource(settings_cls, yaml_values))

    @classmethod
    def load(cls, conf_dir: str | Path | None = None, **overrides: Any) -> Settings:
        """Read the YAML folder and the environment, apply ``overrides``, validate.

        Raises :class:`producer.errors.ConfigError` naming the bad setting.
        """
        folder = _resolve_conf_dir(conf_dir)
        _check_variables()
        _CONF_DIR_FOR_LOAD["dir"] = folder
        try:
            settings = cls(**overrides)
        except SettingsError as e:  # a VLQ_* variable that should be JSON and is not
            raise ConfigError(_unreadable_variable(e)) from None
        except ValidationError as e:
            first = e.errors(include_url=False)[0]
            where = ".".join(str(p) for p in first["loc"])
            if first["type"] == "extra_forbidden":
                raise ConfigError(f"there is no setting {where}: {_known_settings(first['loc'])} "
                                  "(check conf/*.yaml and VLQ_* variables)") from None
            raise ConfigError(
                f"bad setting {where}: {first['msg'].removeprefix('Value error, ')} (check conf/*.yaml and VLQ_*"
                " variables)"
            ) from None
        finally:
            _CONF_DIR_FOR_LOAD.pop("dir", None)
        settings._conf_dir = folder
        return settings

    def source(self) -> str:
        """Where these settings came from, for start-up logs: the YAML folder and the VLQ_*
        variables set."""
        names = sorted(k for k in os.environ if k.upper().startswith("VLQ_") and k.upper() not in NOT_SETTINGS)
        folder = str(self._conf_dir.resolve()) if self._conf_dir is not None else "no conf folder (defaults)"
        return folder + (f" + {', '.join(names)}" if names else "")


# VLQ_* variables that are not settings: read by the CLI, the test suite and the demo script.
NOT_SETTINGS = frozenset({"VLQ_CONF_DIR", "VLQ_DEBUG", "VLQ_REQUIRE_SHARED", "VLQ_SHARED_DIR", "VLQ_TOKENIZER"})


def setting_variables() -> list[str]:
    """Every VLQ_* variable that sets something: each top-level field, each section as JSON, and
    each field of a section."""
    names = []
    for name, field in Settings.model_fields.items():
        names.append(f"VLQ_{name.upper()}")
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            names += [f"VLQ_{name.upper()}_{sub.upper()}" for sub in field.annotation.model_fields]
    return names


def _check_variables() -> None:
    """Refuse a VLQ_* variable that names no section or top-level setting (a typo such as
    VLQ_WORKR_CONCURRENCY would otherwise be ignored without a word), naming the closest real
    one. An unknown setting of a known section is left to the section's own check, which lists
    what the section holds."""
    known = set(setting_variables())
    sections = tuple(f"VLQ_{name.upper()}_" for name, field in Settings.model_fields.items()
                     if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel))
    for name in sorted(os.environ):
        upper = name.upper()
        if not upper.startswith("VLQ_") or upper in known or upper in NOT_SETTINGS or upper.startswith(sections):
            continue
        close = difflib.get_close_matches(upper, sorted(known), n=1, cutoff=0.75)
        hint = f"did you mean {close[0]}?" if close else "see conf/*.yaml for the settings there are"
        raise ConfigError(f"{name} sets nothing: {hint} (variables are VLQ_<SECTION>_<SETTING>, e.g."
                          " VLQ_WORKER_CONCURRENCY)")


def _unreadable_variable(e: SettingsError) -> str:
    """Which VLQ_* variables a settings section failed to parse from, and how to write them."""
    found = re.search(r'field "(\w+)"', str(e))
    prefix = f"VLQ_{found.group(1).upper()}_" if found else "VLQ_"
    names = sorted(k for k in os.environ if k.upper().startswith(prefix))
    return (f"cannot read {', '.join(names) or 'the VLQ_* variables'}: lists and sections are given as JSON,"
            """ e.g. VLQ_IMAGES_ALLOWED_ROOTS='["/data"]' or VLQ_STORE_S3='{"bucket": "results"}'""")


def _known_settings(loc: tuple[Any, ...]) -> str:
    """What the section of an unknown setting ``loc`` holds; for a name that begins with one of its
    nested sections (``store.s3_bucket``), how to give that section (JSON, one variable)."""
    model: Any = Settings
    for part in loc[:-1]:
        field = model.model_fields.get(str(part))
        if field is None or not isinstance(field.annotation, type) or not issubclass(field.annotation, BaseModel):
            return "see conf/*.yaml for the settings there are"
        model = field.annotation
    section = ".".join(str(p) for p in loc[:-1]) or "the top level"
    names = ", ".join(model.model_fields)
    for name, field in model.model_fields.items():
        nested = field.annotation
        if isinstance(nested, type) and issubclass(nested, BaseModel) and str(loc[-1]).startswith(name + "_"):
            var = "VLQ_" + "_".join(str(p).upper() for p in (*loc[:-1], name))
            inner = str(loc[-1])[len(name) + 1:]
            return (f"{section} holds {names}; {name} is a section of its own, given as JSON: "
                    f"{var}='{{\"{inner}\": ...}}'")
    return f"{section} holds {names}"


_CONF_DIR_FOR_LOAD: dict[str, Path | None] = {}


def _resolve_conf_dir(conf_dir: str | Path | None) -> Path | None:
    if conf_dir is not None:
        path = Path(conf_dir)
        if not path.is_dir():
            raise ConfigError(f"configuration folder {path} does not exist")
        return path
    env = os.environ.get("VLQ_CONF_DIR")
    if env:
        return _resolve_conf_dir(env)
    local = Path("conf")
    return local if local.is_dir() else None


def _read_conf_dir(folder: Path | None) -> dict[str, Any]:
    if folder is None:
        return {}
    sections = set(Settings.model_fields)
    values: dict[str, Any] = {}
    for path in sorted(folder.glob("*.yml")):
        raise ConfigError(f"{path}: vlq reads conf/*.yaml only; rename it to {path.with_suffix('.yaml').name}")
    for path in sorted(folder.glob("*.yaml")):
        name = path.stem
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML: {e}") from None
        if name == "vlq":  # top-level fields (key_prefix, ...)
            values.update(data)
        elif name in sections:
            values[name] = data
        else:
            raise ConfigError(f"{path}: unknown section {name!r}; expected one of {sorted(sections)}")
    return values
