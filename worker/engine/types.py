"""The engine contract: what goes into a generation backend and what comes out.

These types are shared by the PyTorch engine, the TensorRT-LLM engine and their callers
(:mod:`worker.engine.chat`, the worker's Celery task, ``vlq generate``). They import no torch, so
that the producer side and the tests of pure logic can use them anywhere.

Token conventions (Qwen-VL-Chat):
- ``prompt_ids`` are the ChatML prompt ids; each image occupies 256 consecutive slots whose ids
  are ``<imgpad>`` (151859 with the real tokenizer). ``image_slots[k]`` is the index of the first
  slot of image ``k``; the engine replaces those 256 embeddings with the image's vision features.
- ``completion_tokens`` counts the stop token when one ended the answer (as the seed does);
  ``text`` never contains it.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Protocol

IMAGE_TOKENS = 256  # vision features per image, fixed by the resampler's 16x16 queries

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class SamplingParams:
    """Per-request decoding settings. ``temperature == 0`` means greedy.

    ``stop`` strings end the answer when its decoded text contains one (the string itself is cut
    from the text); ``stop_token_ids`` end it on those ids (counted in completion_tokens).
    """

    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    seed: int | None = None
    repetition_penalty: float = 1.0
    # OpenAI's penalties on the answer's own tokens: logit -= presence * (count > 0) + frequency * count.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    # Forced decoding length for benchmarks: ignore stop tokens until max_tokens.
    ignore_stop: bool = False
    # OpenAI's logprobs: None = off; k >= 0 = each answer token's log-probability and the k most
    # likely tokens at its position, from the model's own distribution (before temperature,
    # penalties, top-k and top-p).
    logprobs: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


@dataclass(frozen=True)
class ImageInput:
    """One preprocessed image: ``pixels`` is a float32 tensor [3, 448, 448] (CLIP-normalised);
    ``key`` identifies its content (sha256 of the source bytes) for the vision-feature cache."""

    pixels: Any
    key: str | None = None


@dataclass
class GenerationRequest:
    """One prompt for the engine: ids, the images that fill its slots, and how to sample."""

    request_id: str
    prompt_ids: list[int]
    image_slots: list[int] = field(default_factory=list)
    images: list[ImageInput] = field(default_factory=list)
    sampling: SamplingParams = SamplingParams()
    # Absolute time.monotonic() after which the engine stops the request (DeadlineExceeded).
    deadline: float | None = None
    # Called from the engine's thread with each new piece of answer text and, with logprobs asked,
    # the entries of the tokens whose text has now all been handed over (streaming); must be quick.
    on_delta: Callable[[str, list[TokenLogprob]], None] | None = None

    def __post_init__(self) -> None:
        if len(self.image_slots) != len(self.images):
            raise ValueError(
                f"{len(self.images)} images for {len(self.image_slots)} image slots in {self.request_id}"
            )


@dataclass(frozen=True)
class TokenLogprob:
    """One answer token's log-probability and, when asked, the ``top`` most likely tokens at its
    position as ``(token_id, logprob)`` pairs, most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class GenerationResult:
    """What the engine produced for one request."""

    request_id: str
    text: str
    token_ids: list[int]  # completion ids, the stop token included when one ended the answer
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    # Milliseconds: queued (submit -> admitted), vision, prefill, decode, ttft (submit -> first
    # token), total (submit -> finished).
    timings: dict[str, float] = field(default_factory=dict)
    # With SamplingParams.logprobs: one entry per token of ``text`` (not the stop token, nor
    # tokens after where a stop string cut the text), and per entry the characters [start, end) of
    # ``text`` its token produced (empty for a token whose bytes a later token's character finishes).
    logprobs: list[TokenLogprob] | None = None
    logprob_spans: list[tuple[int, int]] | None = None


class Engine(Protocol):
    """A generation backend holding one engine pair (vision encoder + LLM) on one device.

    Implementations run their own scheduler thread, keep at most ``max_batch_size`` requests in
    flight and admit a waiting request as soon as a slot frees. ``submit`` never blocks on the
    GPU; the returned future resolves to a :class:`GenerationResult` or raises a
    :class:`producer.errors.VlqError` (``DeadlineExceeded``, ``EngineError``...).
    """

    max_batch_size: int

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]: ...

    def abort(self, request_id: str) -> None:
        """Stop a request early (cancelled job); its future raises JobCancelled."""
        ...

    def close(self) -> None: ...
