"""The wire contract between producers and workers.

A :class:`Job` is a frozen, versioned message: an id, the OpenAI chat.completions request body
verbatim, where its result goes, an optional batch id and free metadata. It carries image
*references* (http(s), file://, data:, s3:// URLs), never pixels. Both sides import this module;
it needs no torch.

The request body travels as a plain JSON object so that a job whose body is wrong still reaches
a worker and ends ``failed`` with a precise code; :func:`parse_chat_request` is the one place that
turns a body into a typed :class:`ChatRequest` or raises the :mod:`producer.errors` error for it.
Producers call it before enqueueing (fail fast), workers call it again (trust nothing).
"""

from __future__ import annotations

import enum
import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from producer.errors import InvalidRequest, MalformedJob, UnsupportedContent

SCHEMA_VERSION = 1
MAX_TOP_K = 1 << 20  # above any vocabulary: a larger top_k is refused rather than overflowing the engine


def new_job_id() -> str:
    """A fresh job id: ``job-`` and 24 hex digits (sortable by nothing; unique by uuid4)."""
    return "job-" + uuid.uuid4().hex[:24]


class JobStatus(str, enum.Enum):
    """A job's lifecycle. Status moves only forward: see :meth:`can_move_to`."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)

    def can_move_to(self, new: JobStatus) -> bool:
        """True when ``self -> new`` is a forward move (running -> running is a new attempt)."""
        if self.is_terminal:
            return False
        if self is JobStatus.RUNNING:
            return new is not JobStatus.QUEUED
        return True


# -- the OpenAI chat.completions request ---------------------------------------------------------


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    type: Literal["text"] = "text"
    text: str


IMAGE_URL_SCHEMES = ("http://", "https://", "file://", "s3://", "data:")


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    url: str = Field(min_length=1)
    detail: Literal["auto", "low", "high"] | None = None

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, v: str) -> str:
        if not v.lower().startswith(IMAGE_URL_SCHEMES):
            hint = f" (a file on the workers: file://{v})" if v.startswith("/") else ""
            raise ValueError(f"{v[:200]!r} is not an image URL: use http(s)://, file://{hint}, s3:// or"
                             " data:image/...;base64,")
        return v


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)
    type: Literal["image_url"] = "image_url"
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _url_string_allowed(cls, v: Any) -> Any:
        # Some clients send {"image_url": "https://..."}; accept it as the url.
        return {"url": v} if isinstance(v, str) else v


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]
_PART_TYPES = {"text": TextPart, "image_url": ImagePart}


class Message(BaseModel):
    """One chat message. ``content`` is a string or a list of text / image_url parts."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    @field_validator("role", mode="before")
    @classmethod
    def _developer_is_system(cls, v: Any) -> Any:
        # Newer OpenAI clients send the system prompt as role "developer" (as vLLM, read it as "system").
        if isinstance(v, str) and v not in ("system", "user", "assistant", "developer"):
            raise PydanticCustomError("role", "Input should be 'user', 'assistant', 'system' or 'developer', not"
                                      " '{role}' (tool messages are not supported)", {"role": v})
        return "system" if v == "developer" else v

    @field_validator("content", mode="before")
    @classmethod
    def _known_part_types(cls, v: Any) -> Any:
        if isinstance(v, list):
            for i, part in enumerate(v):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind not in _PART_TYPES:
                    raise PydanticCustomError(
                        "unsupported_content",
                        "content part {index} has type '{kind}'; vlq accepts 'text' and 'image_url'",
                        {"index": i, "kind": kind},
                    )
        return v

    @property
    def parts(self) -> list[TextPart | ImagePart]:
        """The content as a list of parts (a plain string is one text part)."""
        if isinstance(self.content, str):
            return [TextPart(text=self.content)]
        return list(self.content)

    @property
    def image_urls(self) -> list[str]:
        return [p.image_url.url for p in self.parts if isinstance(p, ImagePart)]

    @property
    def text(self) -> str:
        """The text parts joined (a system message's prompt)."""
        return "".join(p.text for p in self.parts if isinstance(p, TextPart))


class ChatRequest(BaseModel):
    """The subset of OpenAI's chat.completions body that vlq serves.

    Unknown top-level fields are ignored, as OpenAI-compatible servers do; unsupported features
    that would change the answer (tools, n > 1, ``logit_bias``, a JSON ``response_format``) are
    refused.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str = ""
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=MAX_TOP_K)  # 0 or -1 (vLLM's spelling): no top-k
    seed: int | None = None
    stop: str | list[str] | None = None
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = 1
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None  # the older spelling of tools
    function_call: Any = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    user: str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: dict[str, Any] | None = None
    logit_bias: dict[str, Any] | None = None

    @field_validator("stream", "n", mode="before")
    @classmethod
    def _null_is_the_default(cls, v: Any, info: ValidationInfo) -> Any:
        # OpenAI's schema lets clients send null for these; some send every default that way.
        return cls.model_fields[info.field_name].default if v is None else v

    @model_validator(mode="before")
    @classmethod
    def _no_tool_calls(cls, data: Any) -> Any:
        # Before the fields: an assistant message with tool_calls has content null, which would
        # otherwise be reported as a wrong content type.
        messages = data.get("messages") if isinstance(data, dict) else None
        for i, message in enumerate(messages if isinstance(messages, list) else ()):
            for field in ("tool_calls", "function_call"):
                if isinstance(message, dict) and message.get(field):
                    _refuse(f"messages[{i}].{field}", f"messages[{i}] holds {field}, but tools (function calling)"
                            " are not supported by Qwen-VL-Chat: send the conversation as text")
        return data

    @model_validator(mode="after")
    def _supported(self) -> ChatRequest:
        if self.n != 1:
            _refuse("n", "n must be 1: vlq returns one choice per request")
        if self.tools or self.functions:
            _refuse("tools" if self.tools else "functions",
                    "tools (function calling) are not supported by Qwen-VL-Chat")
        for name in ("tool_choice", "function_call"):
            if getattr(self, name) not in (None, "none"):
                _refuse(name, f"{name} needs tools, which Qwen-VL-Chat does not support: leave it out")
        if self.modalities and set(self.modalities) != {"text"}:
            _refuse("modalities", 'vlq answers in text only: leave modalities out, or send ["text"]')
        if self.audio:
            _refuse("audio", "audio output is not supported: vlq answers in text only")
        if self.stream_options is not None and not self.stream:
            _refuse("stream_options", "stream_options is only allowed with stream: true")
        if self.logit_bias:
            _refuse("logit_bias", "logit_bias is not supported: leave it out, or steer the answer in the prompt")
        if self.top_logprobs and not self.logprobs:
            _refuse("top_logprobs", "top_logprobs needs logprobs: true")
        kind = (self.response_format or {}).get("type", "text")
        if kind != "text":
            _refuse("response_format", (
                f"response_format {kind!r} is not supported: Qwen-VL-Chat has no constrained decoding; "
                "ask for JSON in the prompt and parse the answer, or leave response_format out"))
        for i, msg in enumerate(self.messages):
            if msg.role == "system" and i != 0:
                _refuse(f"messages[{i}].role", f"messages[{i}] is a system message: only the first message may be one")
            if msg.role == "system" and msg.image_urls:
                _refuse(f"messages[{i}].content", "the system message holds text only: put images in a user message")
        if self.messages[-1].role != "user":
            _refuse(f"messages[{len(self.messages) - 1}].role", "the last message must come from the user")
        return self

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def image_urls(self) -> list[str]:
        """Every image URL of the conversation, in order (picture 1, 2, ...)."""
        return [url for m in self.messages for url in m.image_urls]

    @property
    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    @property
    def logprobs_top(self) -> int | None:
        """None without ``logprobs``; else how many top tokens to report per answer token."""
        return (self.top_logprobs or 0) if self.logprobs else None


def _refuse(param: str, message: str) -> None:
    """Refuse a request from a model validator, naming the field (``param``) at fault."""
    raise PydanticCustomError("refused", "{message}", {"message": message, "param": param})


def parse_chat_request(body: Any) -> ChatRequest:
    """Validate an OpenAI chat.completions body, raising a coded :class:`producer.errors.BadInput`.

    An unknown content-part type raises :class:`UnsupportedContent`; anything else wrong raises
    :class:`InvalidRequest` whose message names the offending field.
    """
    if not isinstance(body, dict):
        raise InvalidRequest(f"the request body must be a JSON object, not {type(body).__name__}")
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        for err in errors:
            if err["type"] == "unsupported_content":
                raise UnsupportedContent(err["msg"], param=_loc(err["loc"])) from None
            if err["type"] == "refused":
                raise InvalidRequest(err["ctx"]["message"], param=err["ctx"]["param"]) from None
        first = max(errors, key=lambda err: len(err["loc"]))  # the deepest: a union's real branch
        raise InvalidRequest(
            f"invalid request: {_loc(first['loc'])}: {first['msg'].removeprefix('Value error, ')}",
            param=_loc(first["loc"])
        ) from None


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("str", "list[tagged-union[TextPart,ImagePart]]", "function-after[_supported(), ChatRequest]"):
            continue
        elif part in _PART_TYPES and i > 0 and isinstance(loc[i - 1], int):
            continue  # the content part's type tag, not a field
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


# -- the job message ------------------------------------------------------------------------------


class Destination(BaseModel):
    """Where a job's result is written: the worker's Redis (with TTL) or an S3 bucket/prefix."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: Literal["redis", "s3"] = "redis"
    bucket: str | None = None
    prefix: str = ""

    @model_validator(mode="after")
    def _bucket_for_s3(self) -> Destination:
        if self.kind == "s3" and not self.bucket:
            raise ValueError("an s3 destination needs a bucket")
        return self


class Job(BaseModel):
    """One unit of work: a chat request, where its result goes, and bookkeeping.

    Frozen and versioned: a worker refuses a ``schema_version`` it does not know with
    ``malformed_job`` rather than guessing.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = SCHEMA_VERSION
    id: str = Field(default_factory=new_job_id, min_length=1, max_length=200, pattern=r"^[\w.:-]+$")
    created_at: float = Field(default_factory=time.time)
    request: dict[str, Any]
    destination: Destination = Destination()
    batch_id: str | None = Field(default=None, max_length=200, pattern=r"^[\w.:-]+$")
    metadata: dict[str, Any] = Field(default_factory=dict)

    def chat_request(self) -> ChatRequest:
        """The typed request (raises a coded BadInput when the body is wrong)."""
        return parse_chat_request(self.request)

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_wire(cls, data: Any) -> Job:
        """Decode a job from its JSON string or dict, raising :class:`MalformedJob` if it is not one."""
        try:
            if isinstance(data, (str, bytes)):
                return cls.model_validate_json(data)
            return cls.model_validate(data)
        except ValidationError as e:
            first = e.errors(include_url=False)[0]
            raise MalformedJob(
                f"not a vlq job (schema_version {SCHEMA_VERSION}): {_loc(first['loc'])}: {first['msg']}"
            ) from None
