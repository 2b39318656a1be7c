"""The error tree shared by producers and workers.

Every error carries a stable machine-readable ``code`` (what lands in a failed job's record and in
the API's error body), a human ``message`` that says what to do next, and optional context. Bad
input is permanent (the job fails at once); transient errors are retried with backoff.

    VlqError
    ├── BadInput                     permanent, the user's to fix (HTTP 400)
    │   ├── InvalidRequest           invalid_request
    │   ├── UnsupportedContent       unsupported_content
    │   ├── TooManyImages            too_many_images
    │   ├── PromptTooLong            prompt_too_long
    │   ├── MalformedJob             malformed_job
    │   ├── DuplicateJob             duplicate_job
    │   └── ImageError               image_* (decode, size, forbidden URL, fetch 4xx)
    ├── TransientError               retried with backoff, then failed with its code
    │   ├── ImageFetchTimeout        image_fetch_timeout
    │   ├── ImageFetchUnavailable    image_fetch_unavailable (5xx, 429, refused, cut off)
    │   ├── StoreUnavailable         store_unavailable
    │   └── BrokerUnavailable        broker_unavailable
    ├── EngineError                  engine_error, deadline_exceeded, engine_unavailable
    │   └── WorkerLost               worker_lost (its workers kept dying while running it)
    ├── CheckpointError              checkpoint_error
    ├── ConfigError                  config_error
    ├── StoreRejected                store_rejected (the result store refused a write: 4xx)
    ├── JobNotFound                  not_found (HTTP 404)
    ├── JobNotFinished               not_finished (HTTP 409: no result yet)
    └── JobCancelled                 cancelled
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar


class VlqError(Exception):
    """Base of every vlq error: a stable ``code``, a human ``message`` and optional context."""

    code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False
    http_status: ClassVar[int] = 500

    def __init__(self, message: str, *, code: str | None = None, **context: Any) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code  # type: ignore[misc]  # an instance may refine its class's code
        self.context = context

    def with_note(self, note: str) -> VlqError:
        """A copy of this error (same class, code and context) whose message ends with ``note``."""
        noted = copy.copy(self)
        noted.message = f"{self.message}; {note}"
        noted.args = (noted.message,)
        return noted

    def to_dict(self) -> dict[str, Any]:
        """The JSON form stored in a failed job's record: ``{"code", "message", ...context}``."""
        return {"code": self.code, "message": self.message, **self.context}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(code={self.code!r}, message={self.message!r})"


# -- bad input: permanent, the user's to fix ----------------------------------------------------


class BadInput(VlqError):
    code = "invalid_request"
    http_status = 400


class InvalidRequest(BadInput):
    code = "invalid_request"


class UnsupportedContent(BadInput):
    code = "unsupported_content"


class TooManyImages(BadInput):
    code = "too_many_images"


class PromptTooLong(BadInput):
    code = "prompt_too_long"


class MalformedJob(BadInput):
    code = "malformed_job"


class DuplicateJob(BadInput):
    code = "duplicate_job"
    http_status = 409


class ImageError(BadInput):
    """An image that cannot be used. Codes: image_decode_failed, image_too_large,
    image_url_forbidden, image_fetch_failed."""

    code = "image_fetch_failed"


class ImageDecodeError(ImageError):
    code = "image_decode_failed"


class ImageTooLarge(ImageError):
    code = "image_too_large"


class ImageURLForbidden(ImageError):
    code = "image_url_forbidden"


class ImageFetchError(ImageError):
    code = "image_fetch_failed"


# -- transient: retried with backoff ------------------------------------------------------------


class TransientError(VlqError):
    """Trouble that may pass. A worker retries the job with backoff and, when the retries run out,
    fails it with ``remedy`` added to the message."""

    code = "transient_error"
    retryable = True
    http_status = 503
    remedy: ClassVar[str] = "submit the job again later"


class ImageFetchTimeout(TransientError):
    code = "image_fetch_timeout"
    remedy = "check that the workers can reach the URL, or send the image inline as a data: URL"


class ImageFetchUnavailable(TransientError):
    """The image's server is down or overloaded (5xx, 429, connection refused or cut off)."""

    code = "image_fetch_unavailable"
    remedy = ImageFetchTimeout.remedy


class StoreUnavailable(TransientError):
    code = "store_unavailable"
    remedy = "check that the result store (conf/store.yaml) is reachable from the workers"


class BrokerUnavailable(TransientError):
    code = "broker_unavailable"
    remedy = "check that Redis (broker.url) is reachable from the workers"


# -- engine, checkpoints, configuration ---------------------------------------------------------


class EngineError(VlqError):
    """The engine could not produce an answer. Codes: engine_error, deadline_exceeded,
    engine_unavailable."""

    code = "engine_error"


class DeadlineExceeded(EngineError):
    code = "deadline_exceeded"


class EngineUnavailable(EngineError):
    code = "engine_unavailable"


class WorkerLost(EngineError):
    """The job's worker stopped heartbeating while running it (died, was killed, lost the GPU)
    more than ``worker.max_reclaims`` times: the job itself may be what kills workers."""

    code = "worker_lost"


class CheckpointError(VlqError):
    """A model folder that cannot be loaded: a missing, unexpected or wrongly shaped tensor."""

    code = "checkpoint_error"


class ConfigError(VlqError):
    code = "config_error"


class StoreRejected(VlqError):
    """The result store refused a write for good (no such bucket, access denied)."""

    code = "store_rejected"


class JobNotFound(VlqError):
    code = "not_found"
    http_status = 404


class JobNotFinished(VlqError):
    """The job has no result yet (still queued or running, or the wait timed out)."""

    code = "not_finished"
    http_status = 409


class JobCancelled(VlqError):
    code = "cancelled"
    http_status = 409


def error_from_dict(data: dict[str, Any]) -> VlqError:
    """Rebuild an error from its stored ``to_dict()`` form (the class is the closest by code)."""
    data = dict(data)
    code = str(data.pop("code", VlqError.code))
    message = str(data.pop("message", ""))
    cls = _BY_CODE.get(code, VlqError)
    return cls(message, code=code, **data)


def _all_subclasses(cls: type[VlqError]) -> list[type[VlqError]]:
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


_BY_CODE: dict[str, type[VlqError]] = {c.code: c for c in _all_subclasses(VlqError)}
