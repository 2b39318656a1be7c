"""What a :class:`GenerationRequest` becomes for TensorRT-LLM's executor. Plain Python, no TensorRT.

TensorRT-LLM feeds image features to the LLM as a *prompt table* (p-tuning): an input id at or
above the model's ``vocab_size`` reads row ``id - vocab_size`` of the request's own table instead
of the embedding matrix. So for a request with images:

- the 256 slots of image ``k`` (0-based, counted across the whole request) get the ids
  ``vocab_size + 256 k .. vocab_size + 256 k + 255`` (:func:`image_token_ids`);
- the table is the images' features stacked in the same order, ``[n_images * 256, hidden]``
  (:func:`prompt_table`);
- every input token gets an *extra id* for KV-cache reuse (:func:`input_token_extra_ids`): 0 for
  text, and for an image's tokens a 63-bit hash of that image's content
  (:func:`image_content_id`). TensorRT-LLM keys reusable KV blocks by (token id, extra id), so
  two requests that share a prefix with the same image reuse its blocks, while the same fake
  ids standing for a different image never do.

Stops and sampling map onto the executor's ``Request`` as plain values
(:func:`stop_words`, :func:`sampling_kwargs`); :class:`LlmRequestSpec` carries them all.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from producer.errors import InvalidRequest, PromptTooLong, TooManyImages
from worker.engine.types import IMAGE_TOKENS, GenerationRequest, ImageInput, SamplingParams

_SEED_MASK = (1 << 64) - 1


def check_image_slots(prompt_len: int, image_slots: Sequence[int], image_tokens: int = IMAGE_TOKENS) -> None:
    """Each image's slots lie inside the prompt, in order and without overlap."""
    end = 0
    for k, start in enumerate(image_slots):
        if start < end or start + image_tokens > prompt_len:
            raise InvalidRequest(
                f"image {k} has slots {start}..{start + image_tokens - 1}, outside the "
                f"{prompt_len}-token prompt or overlapping image {k - 1}"
            )
        end = start + image_tokens


def image_token_ids(prompt_ids: Sequence[int], image_slots: Sequence[int], vocab_size: int,
                    image_tokens: int = IMAGE_TOKENS) -> list[int]:
    """``prompt_ids`` with image ``k``'s slots set to ``vocab_size + k * image_tokens + j``."""
    check_image_slots(len(prompt_ids), image_slots, image_tokens)
    ids = list(prompt_ids)
    for k, start in enumerate(image_slots):
        first = vocab_size + k * image_tokens
        ids[start:start + image_tokens] = range(first, first + image_tokens)
    return ids


def prompt_table(features: Any) -> Any:
    """Image features ``[N, 256, hidden]`` (a tensor, or a sequence of ``[256, hidden]``) ->
    the request's prompt table ``[N * 256, hidden]``, rows in image order, contiguous."""
    import torch

    if not isinstance(features, torch.Tensor):
        features = torch.stack(list(features))  # [N, 256, hidden]
    n, rows, hidden = features.shape
    return features.reshape(n * rows, hidden).contiguous()  # [N*256, hidden]


def image_content_id(image: ImageInput) -> int:
    """A non-zero 63-bit id of the image's content: from its ``key`` (sha256 of the source
    bytes) when it has one, else from the pixels themselves."""
    if image.key is not None:
        material = b"key:" + image.key.encode()
    else:
        import torch

        pixels = torch.as_tensor(image.pixels).detach().to("cpu", torch.float32).contiguous()
        material = b"pixels:" + str(tuple(pixels.shape)).encode() + pixels.numpy().tobytes()
    value = int.from_bytes(hashlib.sha256(material).digest()[:8], "big") >> 1
    return value or 1


def input_token_extra_ids(prompt_len: int, image_slots: Sequence[int], image_ids: Sequence[int],
                          image_tokens: int = IMAGE_TOKENS) -> list[int]:
    """One extra id per input token: 0 for text, ``image_ids[k]`` on image ``k``'s slots."""
    if len(image_slots) != len(image_ids):
        raise ValueError(f"{len(image_ids)} image ids for {len(image_slots)} images")
    check_image_slots(prompt_len, image_slots, image_tokens)
    extra = [0] * prompt_len
    for start, image_id in zip(image_slots, image_ids):
        extra[start:start + image_tokens] = [image_id] * image_tokens
    return extra


def stop_words(sampling: SamplingParams) -> list[list[int]]:
    """The executor's ``stop_words``: one single-token word per stop id (none with
    ``ignore_stop``). Stop *strings* are matched on the decoded text by the engine instead."""
    if sampling.ignore_stop:
        return []
    return [[int(token)] for token in dict.fromkeys(sampling.stop_token_ids)]


def sampling_kwargs(sampling: SamplingParams, seed: int) -> dict[str, Any]:
    """Keyword arguments for ``tensorrt_llm.bindings.executor.SamplingConfig``.

    Greedy (temperature 0 or top_k 1) is ``top_k=1``. Otherwise temperature, ``top_p`` (always
    given: TensorRT-LLM reads top_k 0 with top_p 0 as greedy) and ``top_k`` when set. Penalties
    only when they change anything. ``seed`` is masked to the executor's uint64.
    """
    kwargs: dict[str, Any] = {"beam_width": 1, "seed": int(seed) & _SEED_MASK}
    if sampling.greedy:
        kwargs["top_k"] = 1
    else:
        kwargs["temperature"] = float(sampling.temperature)
        kwargs["top_p"] = float(sampling.top_p)
        if sampling.top_k > 0:
            kwargs["top_k"] = int(sampling.top_k)
    if sampling.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = float(sampling.repetition_penalty)
    presence = getattr(sampling, "presence_penalty", 0.0)
    frequency = getattr(sampling, "frequency_penalty", 0.0)
    if presence:
        kwargs["presence_penalty"] = float(presence)
    if frequency:
        kwargs["frequency_penalty"] = float(frequency)
    return kwargs


@dataclass
class LlmRequestSpec:
    """Everything the executor's ``Request`` needs, as plain values.

    ``input_ids`` carry the fake image ids; ``extra_ids`` is None without images (no prompt
    table); ``max_tokens`` is already clipped to the engine's ``max_seq_len``.
    """

    request_id: str
    input_ids: list[int]
    max_tokens: int
    sampling: dict[str, Any]
    stop_words: list[list[int]]
    pad_id: int
    end_id: int | None = None
    extra_ids: list[int] | None = None
    image_rows: int = 0
    streaming: bool = True
    seed: int = 0
    stop_token_ids: tuple[int, ...] = field(default=())


@dataclass(frozen=True)
class EngineLimits:
    """What the built LLM engine accepts (from its config.json) and the worker allows."""

    vocab_size: int
    max_batch_size: int
    max_input_len: int
    max_seq_len: int
    max_prompt_rows: int  # the engine's max_prompt_embedding_table_size (max_multimodal_len)
    max_images: int = 26

    @property
    def rows_per_request(self) -> int:
        """Prompt-table rows one request may use while ``max_batch_size`` requests are in flight."""
        return self.max_prompt_rows // self.max_batch_size


def build_spec(request: GenerationRequest, limits: EngineLimits, *, pad_id: int,
               seed: int | None = None) -> LlmRequestSpec:
    """Check ``request`` against ``limits`` and turn it into an :class:`LlmRequestSpec`.

    Raises :class:`PromptTooLong`, :class:`TooManyImages` or :class:`InvalidRequest` (bad input
    that would otherwise fail inside the executor with a less useful message, and ``logprobs``,
    which this backend does not report).
    """
    rid = request.request_id
    n = len(request.prompt_ids)
    if n == 0:
        raise InvalidRequest("the prompt is empty", request_id=rid)
    if n > limits.max_input_len or n >= limits.max_seq_len:
        cap = min(limits.max_input_len, limits.max_seq_len - 1)
        raise PromptTooLong(
            f"the prompt is {n} tokens but this TensorRT-LLM engine takes at most {cap}; "
            "shorten the prompt or send fewer images",
            request_id=rid, prompt_tokens=n, max_input_len=cap)
    n_images = len(request.images)
    rows = n_images * IMAGE_TOKENS
    if n_images > limits.max_images or rows > limits.rows_per_request:
        most = min(limits.max_images, limits.rows_per_request // IMAGE_TOKENS)
        raise TooManyImages(
            f"{n_images} images, but this engine takes at most {most} per request "
            f"(max_multimodal_len {limits.max_prompt_rows} over max_batch_size {limits.max_batch_size})",
            request_id=rid, images=n_images, max_images=most)
    if min(request.prompt_ids) < 0 or max(request.prompt_ids) >= limits.vocab_size:
        raise InvalidRequest(f"prompt ids must lie in 0..{limits.vocab_size - 1}", request_id=rid)
    params = request.sampling
    if params.max_tokens < 1:
        raise InvalidRequest("max_tokens must be at least 1", request_id=rid)
    if params.logprobs is not None:
        raise InvalidRequest(
            "logprobs are not served by the trtllm backend; leave logprobs and top_logprobs out, "
            "or send the request to workers with engine.backend torch", request_id=rid, param="logprobs")

    ids = image_token_ids(request.prompt_ids, request.image_slots, limits.vocab_size)
    extra = None
    if request.images:
        image_ids = [image_content_id(image) for image in request.images]
        extra = input_token_extra_ids(n, request.image_slots, image_ids)
    seed = seed if seed is not None else (params.seed if params.seed is not None else secrets.randbits(63))
    return LlmRequestSpec(
        request_id=rid,
        input_ids=ids,
        max_tokens=min(params.max_tokens, limits.max_seq_len - n),
        sampling=sampling_kwargs(params, seed),
        stop_words=stop_words(params),
        pad_id=pad_id,
        end_id=None,  # stops come as stop words, so the stop token stays in the output
        extra_ids=extra,
        image_rows=rows,
        seed=seed,
        stop_token_ids=() if params.ignore_stop else tuple(params.stop_token_ids),
    )


FINISH_REASONS = {"END_ID": "stop", "STOP_WORDS": "stop", "LENGTH": "length",
                  "CANCELLED": "cancelled", "TIMED_OUT": "timed_out", "NOT_FINISHED": None}


def finish_reason(value: Any) -> str | None:
    """An executor ``FinishReason`` (enum or name) as vlq's word: stop, length, cancelled..."""
    if value is None:
        return None
    name = getattr(value, "name", None) or str(value).rsplit(".", 1)[-1]
    return FINISH_REASONS.get(name, name.lower())
