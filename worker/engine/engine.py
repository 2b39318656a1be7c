"""The PyTorch engine: :class:`TorchEngine`, continuous batching over a static KV cache.

Callers (Celery threads, ``vlq generate``) :meth:`~TorchEngine.submit` requests and wait on the
returned future; one scheduler thread owns the model and loops :meth:`~TorchEngine.step`::

    schedule -> prefill the admitted / decode the running batch -> sample -> postprocess

so at most ``max_batch_size`` requests are in flight and a waiting request takes a slot on the
step after one frees (Sequence -> Scheduler -> ModelRunner, as in nano-vllm).

Rules the engine enforces itself:

- Length: a request's prompt plus answer fit in ``max_seq_len`` (one KV-cache row). A prompt of
  ``max_seq_len`` tokens or more is refused with ``PromptTooLong``; otherwise ``max_tokens`` is
  clipped to ``max_seq_len - prompt_tokens`` and an answer that reaches that end says
  finish_reason ``length``.
- Stops: the request's ``stop_token_ids`` and ``stop`` strings, exactly as given in its
  :class:`SamplingParams` (the chat layer puts Qwen's ``<|im_end|>`` etc. there); see
  :mod:`worker.engine.sequence`.
- Deadlines: a request still unfinished at its ``deadline`` (``time.monotonic()``) leaves its
  slot at the next step and its future raises ``DeadlineExceeded``; :meth:`abort` does the same
  with ``JobCancelled``.
- Faults: an exception inside the model fails only the requests of that call with
  ``EngineError`` (prefill: that one request; decode: the running batch) and the engine keeps
  serving.
- Seeds: a request without a seed gets a random one; the same seed gives the same answer
  whatever else is in the batch.

Speed (on a :class:`worker.engine.model.qwen_vl.QwenVL`): the runner serves it through the fast
path (fused kernels, CUDA-graph decode when ``cuda_graphs``), ``quantization="int8"`` makes the
LLM int8 weight-only (:mod:`worker.engine.model.quant`), during each decode step the images of
the next waiting request are encoded ahead of its admission, and (``lookahead``, on with graphs)
the next decode step is launched before the host reads this one's tokens.

Streaming: ``on_delta`` is called from the engine thread with each new piece of answer text
(never half a UTF-8 character, never text a stop string will remove) and, with logprobs asked,
the entries of the tokens whose text it completes; all of it before the future resolves; if the
callback raises, it is logged and not called again for that request.
"""

from __future__ import annotations

import logging
import secrets
import time
from concurrent.futures import Future

import torch

from producer.errors import (
    ConfigError,
    EngineError,
    EngineUnavailable,
    InvalidRequest,
    PromptTooLong,
    VlqError,
)
from worker.engine.mailbox import ABORT, SUBMIT, Mailbox, aborted, duplicate_request, internal_error
from worker.engine.runner import ModelRunner
from worker.engine.scheduler import Scheduler
from worker.engine.sequence import Sequence
from worker.engine.types import IMAGE_TOKENS, GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

QUANTIZATIONS = ("none", "int8")


class TorchEngine:
    """The :class:`worker.engine.types.Engine` of the PyTorch model.

    ``tokenizer`` needs ``stream_decoder()`` and ``n_vocab`` (:class:`QwenTokenizer`). With
    ``start=False`` no thread runs and the caller drives :meth:`step` (tests).
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_batch_size: int = 2,
        max_seq_len: int = 32768,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        feature_cache_images: int = 64,
        quantization: str = "none",
        cuda_graphs: bool = True,
        fast_path: bool = True,
        lookahead: bool | None = None,
        start: bool = True,
    ) -> None:
        if quantization not in QUANTIZATIONS:
            raise ConfigError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATIONS)}")
        if quantization == "int8":
            from worker.engine.model.quant import quantize_llm
            from worker.engine.model.qwen_vl import QwenVL

            if not isinstance(model, QwenVL):
                raise ConfigError(f"int8 quantization needs a QwenVL model, not {type(model).__name__}")
            quantize_llm(model)
        self.quantization = quantization
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.tokenizer = tokenizer
        self.scheduler = Scheduler(max_batch_size)
        self.runner = ModelRunner(
            model,
            max_batch_size=max_batch_size,
            max_seq_len=max_seq_len,
            device=device,
            dtype=dtype,
            feature_cache_images=feature_cache_images,
            allowed_vocab=getattr(tokenizer, "n_vocab", None),
            fast_path=fast_path,
            cuda_graphs=cuda_graphs,
            lookahead=lookahead,
        )
        self._mailbox = Mailbox("vlq-engine")  # (SUBMIT, Sequence) | (ABORT, request_id)
        if start:
            self.start()

    # -- the Engine protocol --------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        """Queue ``request``; the future resolves to its result or raises a VlqError."""
        future: Future[GenerationResult] = Future()
        try:
            seq = self._new_sequence(request, future)
        except VlqError as e:
            future.set_exception(e)
            return future
        if not self._mailbox.post(SUBMIT, seq):
            future.set_exception(EngineUnavailable("the engine is closed", request_id=request.request_id))
        return future

    def abort(self, request_id: str) -> None:
        """Stop ``request_id`` (waiting or running); its future raises JobCancelled."""
        self._mailbox.post(ABORT, request_id)

    def close(self) -> None:
        """Stop the scheduler thread; unfinished requests fail with EngineUnavailable."""
        error = EngineUnavailable("the engine was closed before the request finished")
        for kind, seq in self._mailbox.close():
            if kind == SUBMIT and not seq.future.done():
                seq.future.set_exception(error)
        self._fail_in_flight(error)

    # -- the loop -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler thread."""
        self._mailbox.start(self.step, self.scheduler.has_work,
                            lambda e: self._fail_in_flight(internal_error(e)))

    def step(self) -> None:
        """One scheduling step: admit or decode, sample, and hand out what finished."""
        self._take_mail()
        self._expire(time.monotonic())
        seqs, is_prefill = self.scheduler.schedule()
        seqs, token_ids = self._run(seqs, is_prefill)
        finished = self.scheduler.postprocess(seqs, token_ids, self.runner.last_logprobs if seqs else None)
        for seq in seqs:
            seq.stream()
        for seq in finished:
            self._resolve(seq)

    def has_work(self) -> bool:
        """Requests waiting, running, or not yet taken in."""
        return self._mailbox.has_mail() or self.scheduler.has_work()

    # -- step parts -----------------------------------------------------------------------------

    def _take_mail(self) -> None:
        for kind, item in self._mailbox.take():
            if kind == SUBMIT:
                seq = item
                if not seq.future.set_running_or_notify_cancel():
                    continue  # cancelled through Future.cancel() before it was taken in
                if self.scheduler.find(seq.request_id) is not None:
                    seq.future.set_exception(duplicate_request(seq.request_id))
                    continue
                self.scheduler.add(seq)
            else:
                seq = self.scheduler.find(item)
                if seq is not None:
                    self._finish(seq, aborted(item))

    def _expire(self, now: float) -> None:
        for seq in self.scheduler.expired(now):
            self._finish(seq, seq.deadline_error())

    def _run(self, seqs: list[Sequence], is_prefill: bool) -> tuple[list[Sequence], list[int]]:
        """Model and sampler work; a failure ends only the sequences it touched."""
        if is_prefill:
            admitted, seqs = seqs, []
            for seq in admitted:
                try:
                    self.runner.prefill(seq)
                    seqs.append(seq)
                except Exception as e:
                    self._fail_model([seq], e, "prefill")
        if not seqs:
            return [], []
        t0 = time.monotonic()
        try:
            if not is_prefill:
                self.runner.decode(seqs)
                self._encode_ahead()  # while the decode step runs on the GPU
            token_ids = self.runner.sample(seqs, lookahead=not is_prefill and self._worth_looking_ahead(seqs))
        except Exception as e:
            self._fail_model(seqs, e, "prefill" if is_prefill else "decode")
            return [], []
        elapsed = time.monotonic() - t0
        for seq in seqs:
            if is_prefill:
                seq.prefill_s += elapsed
            else:
                seq.decode_s += elapsed
        return seqs, token_ids

    def _worth_looking_ahead(self, seqs: list[Sequence]) -> bool:
        """Launch the next decode step before this one's tokens are read (ModelRunner.sample)
        unless every answer ends now by length, or one does and a waiting request will take its
        slot (the step would be dropped and delay that prefill)."""
        ending = [len(seq.output_ids) + 1 >= seq.max_tokens for seq in seqs]
        return not all(ending) and (not self.scheduler.waiting or not any(ending))

    def _encode_ahead(self) -> None:
        """Encode the images of the first waiting request (among those the free slots will take
        next) that has not been encoded yet: one request per decode step."""
        for seq in list(self.scheduler.waiting)[:self.max_batch_size]:
            try:
                if self.runner.encode_ahead(seq):
                    return
            except Exception:  # its prefill encodes again and fails that request properly
                log.debug("encoding %s ahead of admission failed", seq.request_id, exc_info=True)
                return

    # -- endings --------------------------------------------------------------------------------

    def _resolve(self, seq: Sequence) -> None:
        """Release a finished sequence's slot and settle its future."""
        self.runner.release(seq)
        if seq.future.done():
            return
        if seq.error is not None:
            seq.future.set_exception(seq.error)
        else:
            seq.future.set_result(seq.result())

    def _finish(self, seq: Sequence, error: VlqError) -> None:
        self.scheduler.finish(seq, error)
        self._resolve(seq)

    def _fail_model(self, seqs: list[Sequence], exc: Exception, phase: str) -> None:
        log.error("model %s failed for %s", phase, [s.request_id for s in seqs], exc_info=exc)
        for seq in seqs:
            if isinstance(exc, VlqError):
                error = exc
            else:
                error = EngineError(
                    f"the model failed during {phase}: {type(exc).__name__}: {exc}",
                    request_id=seq.request_id, phase=phase)
                error.__cause__ = exc
            self._finish(seq, error)

    def _fail_in_flight(self, error: VlqError) -> None:
        for seq in [*self.scheduler.running.values(), *self.scheduler.waiting]:
            self._finish(seq, error)

    # -- admission ------------------------------------------------------------------------------

    def _new_sequence(self, request: GenerationRequest, future: Future) -> Sequence:
        """Check ``request`` against the engine's limits and wrap it (caller's thread)."""
        n = len(request.prompt_ids)
        if n == 0:
            raise InvalidRequest("the prompt is empty", request_id=request.request_id)
        if n >= self.max_seq_len:
            raise PromptTooLong(
                f"the prompt is {n} tokens but this engine holds at most {self.max_seq_len} tokens "
                "per request (prompt + answer); shorten the prompt",
                request_id=request.request_id, prompt_tokens=n, max_seq_len=self.max_seq_len)
        for k, start in enumerate(request.image_slots):
            if start < 0 or start + IMAGE_TOKENS > n:
                raise InvalidRequest(
                    f"image {k} has slots {start}..{start + IMAGE_TOKENS - 1} outside the "
                    f"{n}-token prompt", request_id=request.request_id)
        params = request.sampling
        if params.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1", request_id=request.request_id)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        return Sequence(
            request,
            self.tokenizer.stream_decoder(),
            max_tokens=min(params.max_tokens, self.max_seq_len - n),
            seed=seed,
            future=future,
        )
