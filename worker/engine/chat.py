"""The chat layer: an OpenAI chat request + its images in, a ``chat.completion`` document out.

:class:`ChatEngine` loads a model folder once (tokenizer, weights, ``generation_config.json``)
and wraps a generation backend (:class:`worker.engine.engine.TorchEngine`, or the TensorRT-LLM
one). The worker's Celery threads and ``vlq generate`` call :meth:`ChatEngine.submit`, which does
the CPU work on the caller's thread (prompt ids, image preprocessing) so that it overlaps with
the GPU decoding other requests, then hands the request to the backend's scheduler thread.

Sampling settings, field by field, come from the first source that has one:

1. the request (``temperature``, ``top_p``, ``top_k``, ``seed``, ``stop``,
   ``repetition_penalty``, ``presence_penalty``, ``frequency_penalty``, ``max_tokens`` /
   ``max_completion_tokens``; ``logprobs`` / ``top_logprobs`` ask for the answer tokens'
   log-probabilities in ``choices[0].logprobs``);
2. the model's ``generation_config.json`` (``do_sample: false`` means greedy; ``temperature``,
   ``top_p``, ``top_k``, ``repetition_penalty``): the model author's tuned defaults win over
   OpenAI's, so a request that says nothing gets Qwen-VL-Chat's published behaviour (top_p 0.5);
3. OpenAI's defaults (temperature 1, top_p 1, no top-k, no penalties).

``max_tokens`` falls back to ``engine.default_max_tokens`` (the operator's setting), and the
engine clips it so that prompt + answer fit ``engine.max_seq_len`` (finish_reason ``length``).
A request without a seed gets a random one; the seed used is reported in ``vlq.seed``, and the
same seed gives the same answer. Answers stop on ``<|im_end|>``, ``<|im_start|>`` and
``<|endoftext|>`` (counted in ``completion_tokens``) and on the request's ``stop`` strings (cut).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from concurrent.futures import Future
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Sequence

from producer.config import EngineSettings
from producer.errors import ConfigError, EngineUnavailable, InvalidRequest, VlqError
from producer.schema import ChatRequest
from worker.engine.checkpoint_id import checkpoint_id
from worker.engine.grounding import ground_answer, score_boxes
from worker.engine.prompt import Prompt, build_prompt
from worker.engine.tokenizer import QwenTokenizer
from worker.engine.types import (
    Engine,
    GenerationRequest,
    GenerationResult,
    ImageInput,
    SamplingParams,
    TokenLogprob,
)

log = logging.getLogger(__name__)

try:
    VLQ_VERSION = version("vlq")
except PackageNotFoundError:  # running from a checkout that is not installed
    VLQ_VERSION = "dev"

GENERATION_CONFIG = "generation_config.json"


@dataclass(frozen=True)
class GenerationDefaults:
    """The sampling defaults of a model folder's ``generation_config.json`` (None: not given)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_model_dir(cls, model_dir: Path, vocab_size: int) -> GenerationDefaults:
        """Read ``generation_config.json`` if the folder has one (else no defaults)."""
        path = Path(model_dir) / GENERATION_CONFIG
        if not path.is_file():
            return cls()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict):
                raise ValueError("not a JSON object")
            temperature = _number(data, "temperature", float)
            if data.get("do_sample") is False:
                temperature = 0.0
            eos = data.get("eos_token_id")
            eos_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
            return cls(
                temperature=temperature,
                top_p=_number(data, "top_p", float),
                top_k=_number(data, "top_k", int),
                repetition_penalty=_number(data, "repetition_penalty", float),
                stop_token_ids=tuple(int(i) for i in eos_ids if 0 <= int(i) < vocab_size),
            )
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"{path} is not a usable generation config: {e}") from None


def _number(data: dict[str, Any], key: str, kind: type) -> Any:
    value = data.get(key)
    return None if value is None else kind(value)


def resolve_device(device: str, dtype: str) -> tuple[Any, Any]:
    """``engine.device`` / ``engine.dtype`` settings -> (torch.device, torch.dtype).

    ``auto`` picks CUDA with bfloat16 when torch sees a GPU, else CPU with float32.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"engine.device {device!r} is not a device (auto, cpu, cuda, cuda:N): {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EngineUnavailable(
            f"engine.device is {device} (or vlq worker --gpu asked for a GPU) but torch sees no CUDA"
            " device; install a CUDA build of torch, or leave --gpu out and set engine.device to cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise EngineUnavailable(f"engine.device {device}: only {torch.cuda.device_count()} CUDA devices visible")
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    return dev, getattr(torch, dtype)


class ChatEngine:
    """A model folder's tokenizer and generation backend, speaking OpenAI chat completions.

    Build with :meth:`from_settings`. Thread-safe: any number of threads may :meth:`submit`.
    """

    def __init__(
        self,
        settings: EngineSettings,
        tokenizer: QwenTokenizer,
        engine: Engine,
        *,
        defaults: GenerationDefaults = GenerationDefaults(),
        model_name: str = "Qwen-VL-Chat",
        device: str = "cpu",
        dtype: str = "float32",
        checkpoint: str | None = None,
    ) -> None:
        self.settings = settings
        self.checkpoint = checkpoint  # checkpoint_id of the weights: results say which wrote them
        self.tokenizer = tokenizer
        self.engine = engine
        self.defaults = defaults
        self.model_name = model_name
        self.device = device
        self.dtype = dtype
        self.system_fingerprint = f"vlq-{VLQ_VERSION}-{settings.backend}-{dtype}"
        self.stop_token_ids = tuple(dict.fromkeys((*tokenizer.stop_token_ids, *defaults.stop_token_ids)))
        # Prompts must leave room for one answer token in the engine's KV cache.
        self.max_input_len = min(settings.max_input_len, settings.max_seq_len - 1)

    @classmethod
    def from_settings(cls, engine: EngineSettings, *, tokenizer: QwenTokenizer | None = None,
                      model_name: str | None = None) -> ChatEngine:
        """Load ``engine.model_dir`` once and start the configured backend.

        ``tokenizer`` reuses one already loaded from the same folder; ``model_name`` is what
        results name as their ``model`` when the request names none (default: the folder's name;
        the worker passes ``api.served_model``, the name the API serves). Raises
        :class:`ConfigError` (no model folder), :class:`CheckpointError` (a folder that cannot
        be loaded) or :class:`EngineUnavailable` (the backend cannot run here).
        """
        if engine.model_dir is None:
            raise ConfigError("engine.model_dir is not set: point it (or --model) at a Qwen-VL-Chat folder")
        model_dir = Path(engine.model_dir)
        tokenizer = tokenizer or QwenTokenizer.from_model_dir(model_dir)
        defaults = GenerationDefaults.from_model_dir(model_dir, tokenizer.n_vocab)
        if engine.backend == "trtllm":
            backend = _trtllm_backend(engine, tokenizer)
            device, dtype = "cuda", "bfloat16"
        else:
            backend, device, dtype = _torch_backend(engine, tokenizer)
        log.info("engine ready: %s on %s (%s, %s), max_batch_size %d", model_dir, device,
                 engine.backend, dtype, engine.max_batch_size)
        return cls(engine, tokenizer, backend, defaults=defaults, model_name=model_name or model_dir.name,
                   device=device, dtype=dtype, checkpoint=checkpoint_id(model_dir))

    # -- requests -------------------------------------------------------------------------------

    def validate(self, request: ChatRequest) -> None:
        """Raise the coded BadInput error that :meth:`submit` would: too many images, a prompt
        over ``engine.max_input_len``, an unsupported content part, bad sampling fields."""
        self.prompt(request)
        self.sampling_params(request)

    def prompt(self, request: ChatRequest) -> Prompt:
        """The request's prompt ids and image slots, within this engine's limits."""
        return build_prompt(request, self.tokenizer, max_images=self.settings.max_images,
                            max_input_len=self.max_input_len)

    def sampling_params(self, request: ChatRequest, *, seed: int | None = None) -> SamplingParams:
        """The request's sampling settings, filled from generation_config.json, then OpenAI's
        defaults (see the module docstring). ``seed`` overrides the request's."""
        d = self.defaults
        if request.top_p is not None and request.top_p < 0:
            raise InvalidRequest(f"top_p must be between 0 and 1, not {request.top_p}", param="top_p")
        seed = request.seed if seed is None else seed
        return SamplingParams(
            max_tokens=request.effective_max_tokens or self.settings.default_max_tokens,
            temperature=_first(request.temperature, d.temperature, 1.0),
            top_p=_first(request.top_p, d.top_p, 1.0),
            top_k=max(_first(request.top_k, d.top_k, 0), 0),
            seed=seed,
            repetition_penalty=_first(request.repetition_penalty, d.repetition_penalty, 1.0),
            presence_penalty=request.presence_penalty or 0.0,
            frequency_penalty=request.frequency_penalty or 0.0,
            stop=tuple(request.stop_list),
            stop_token_ids=self.stop_token_ids,
            logprobs=request.logprobs_top,
        )

    def submit(
        self,
        request: ChatRequest,
        images: Sequence[Any],
        *,
        request_id: str,
        deadline: float | None = None,
        on_delta: Callable[[str, list[dict[str, Any]]], None] | None = None,
    ) -> Future[dict[str, Any]]:
        """Queue one chat request; the future resolves to its ``chat.completion`` dict.

        ``images`` are the request's :class:`worker.images.LoadedImage` in conversation order;
        they are preprocessed here, on the caller's thread. ``deadline`` is a
        ``time.monotonic()`` instant; ``on_delta`` receives answer text as it is produced (from
        the engine's thread), with the ``choices[0].logprobs.content`` entries of the tokens
        that text completes (an empty list when the request did not ask for logprobs). The
        future raises a coded :class:`producer.errors.VlqError`: BadInput for the request,
        DeadlineExceeded, JobCancelled, EngineError.
        """
        out: Future[dict[str, Any]] = Future()
        started = time.monotonic()
        try:
            prompt = self.prompt(request)
            if len(images) != len(prompt.image_urls):
                raise InvalidRequest(
                    f"{len(images)} images were given for the request's {len(prompt.image_urls)} image parts",
                    request_id=request_id)
            seed = request.seed if request.seed is not None else secrets.randbits(63)
            generation = GenerationRequest(
                request_id=request_id,
                prompt_ids=prompt.ids,
                image_slots=list(prompt.image_slots),
                images=[_image_input(image) for image in images],
                sampling=self.sampling_params(request, seed=seed),
                deadline=deadline,
                on_delta=None if on_delta is None else self._openai_delta(on_delta),
            )
        except VlqError as e:
            out.set_exception(e)
            return out
        preprocess_ms = round((time.monotonic() - started) * 1000.0, 3)
        sizes = [(int(image.width), int(image.height)) for image in images]

        def finish(done: Future[GenerationResult]) -> None:
            if out.done():  # the caller cancelled it
                return
            error = done.exception()
            if error is not None:
                out.set_exception(error)
                return
            try:
                out.set_result(self._completion(done.result(), request, sizes, seed, preprocess_ms))
            except Exception as e:  # a bug here must still settle the caller's future
                log.exception("building the completion of %s failed", request_id)
                out.set_exception(e)

        self.engine.submit(generation).add_done_callback(finish)
        # Future.cancel() on the returned future stops the request in the engine too.
        out.add_done_callback(lambda f: self.abort(request_id) if f.cancelled() else None)
        return out

    def abort(self, request_id: str) -> None:
        """Stop a submitted request; its future raises JobCancelled."""
        self.engine.abort(request_id)

    def close(self) -> None:
        """Stop the backend; unfinished requests fail."""
        self.engine.close()

    # -- the result document --------------------------------------------------------------------

    def _completion(self, result: GenerationResult, request: ChatRequest,
                    sizes: list[tuple[int, int]], seed: int, preprocess_ms: float) -> dict[str, Any]:
        boxes = ground_answer(result.text, request, sizes)
        if result.logprobs is not None:
            boxes = score_boxes(boxes, [(start, end, entry.logprob) for (start, end), entry
                                        in zip(result.logprob_spans, result.logprobs, strict=True)])
        return {
            "id": f"chatcmpl-{result.request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.model or self.model_name,
            "system_fingerprint": self.system_fingerprint,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": self._logprobs(result.logprobs),
                "finish_reason": result.finish_reason,
            }],
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
            "boxes": [box.to_dict() for box in boxes],
            "vlq": {
                "request_id": result.request_id,
                "seed": seed,
                "backend": self.settings.backend,
                "device": self.device,
                "checkpoint": self.checkpoint,
                "timings": {"preprocess": preprocess_ms, **result.timings},
            },
        }

    def _logprobs(self, entries: list[TokenLogprob] | None) -> dict[str, Any] | None:
        """OpenAI's ``choices[0].logprobs`` (:meth:`_logprob_content` of each answer token)."""
        if entries is None:
            return None
        return {"content": self._logprob_content(entries), "refusal": None}

    def _logprob_content(self, entries: list[TokenLogprob]) -> list[dict[str, Any]]:
        """Per answer token its text, log-probability, UTF-8 bytes (a token may hold part of a
        character: its text then shows U+FFFD, its bytes are exact) and the most likely tokens at
        its position."""

        def token(token_id: int, logprob: float) -> dict[str, Any]:
            data = self.tokenizer.token_bytes(token_id)
            return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

        return [{**token(e.token_id, e.logprob), "top_logprobs": [token(i, lp) for i, lp in e.top]}
                for e in entries]

    def _openai_delta(self, on_delta: Callable[[str, list[dict[str, Any]]], None]
                      ) -> Callable[[str, list[TokenLogprob]], None]:
        """The engine's ``on_delta`` that hands ``on_delta`` its text and OpenAI logprob entries."""
        return lambda text, entries: on_delta(text, self._logprob_content(entries))


def _first(*values: Any) -> Any:
    return next(v for v in values if v is not None)


def _image_input(image: Any) -> ImageInput:
    """A :class:`worker.images.LoadedImage` -> model pixels [3, 448, 448] and its content key."""
    from worker.engine.model.preprocess import preprocess_image

    return ImageInput(pixels=preprocess_image(image.image), key=image.sha256)


def _torch_backend(settings: EngineSettings, tokenizer: QwenTokenizer) -> tuple[Engine, str, str]:
    from worker.engine.engine import TorchEngine
    from worker.engine.model.checkpoint import load_model

    device, dtype = resolve_device(settings.device, settings.dtype)
    model = load_model(settings.model_dir, device=device, dtype=dtype)
    engine = TorchEngine(
        model,
        tokenizer,
        max_batch_size=settings.max_batch_size,
        max_seq_len=settings.max_seq_len,
        device=device,
        dtype=dtype,
        feature_cache_images=settings.feature_cache_images,
        quantization=settings.quantization,
        cuda_graphs=settings.cuda_graphs,
    )
    return engine, str(device), str(dtype).removeprefix("torch.")


def _trtllm_backend(settings: EngineSettings, tokenizer: QwenTokenizer) -> Engine:
    try:
        from worker.engine.trtllm import TrtllmEngine
    except ImportError as e:
        raise EngineUnavailable(
            f"engine.backend is trtllm but its module cannot be imported ({e}); install the "
            "trtllm extra (see docs) or set engine.backend to torch") from e
    return TrtllmEngine.from_settings(settings, tokenizer)
