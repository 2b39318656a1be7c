"""The TensorRT-LLM engine pair behind the :class:`worker.engine.types.Engine` protocol.

:class:`TrtllmEngine` takes the same :class:`GenerationRequest` as the torch engine and gives the
same :class:`GenerationResult`. Per request, on its scheduler thread:

1. the TensorRT vision engine encodes the request's images (cached by image content);
2. the request becomes an executor ``Request`` (:func:`worker.engine.trtllm.requests.build_spec`):
   image slots carry the ids ``vocab_size + k``, the features are its prompt table, its extra ids
   key KV-cache reuse by image content, stop ids are stop words, sampling is mapped;
3. TensorRT-LLM's executor runs it with in-flight batching, at most ``max_batch_size`` at a time
   (vlq admits no more than that, so waiting requests stay abortable and their deadlines apply);
4. streamed tokens go through the torch engine's own :class:`worker.engine.sequence.Sequence`,
   so stop ids, stop strings, ``finish_reason`` (``length`` when ``max_tokens`` cut the answer),
   ``completion_tokens`` (the stop token counted) and ``on_delta`` streaming behave exactly as
   in the torch backend. A stop string ends the request early: vlq cancels it in the executor.

Engine files (``engine.engine_dir``)::

    ENGINE_DIR/llm/       trtllm-build output: config.json, rank0.engine (build_llm)
    ENGINE_DIR/vision/    vision.plan (build_vit)

:meth:`TrtllmEngine.from_settings` refuses to start, with :class:`EngineUnavailable` naming
everything that is missing and the commands that make it, when TensorRT-LLM or TensorRT do not
import or the engine files are absent. Everything but the two adapters that touch TensorRT
(:class:`TrtllmExecutor`, :class:`worker.engine.trtllm.vision.TrtVisionEngine`) runs on CPU in
the tests, against a scripted executor.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Sequence as Seq
from concurrent.futures import Future
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any, Protocol

from producer.errors import EngineError, EngineUnavailable, VlqError
from worker.engine.mailbox import ABORT, SUBMIT, Mailbox, aborted, duplicate_request, internal_error
from worker.engine.sequence import Sequence, SequenceStatus
from worker.engine.trtllm.requests import EngineLimits, LlmRequestSpec, build_spec, finish_reason, prompt_table
from worker.engine.types import GenerationRequest, GenerationResult

log = logging.getLogger(__name__)

LLM_SUBDIR = "llm"
VISION_SUBDIR = "vision"
VISION_PLAN = "vision.plan"
LLM_ENGINE_FILE = "rank0.engine"

INSTALL = ("pip install tensorrt_llm==0.16.0 --extra-index-url https://pypi.nvidia.com "
           "(brings tensorrt; or run the worker in NVIDIA's TensorRT-LLM container)")


# -- the engine files ---------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineFiles:
    """Where the engine pair lives under ``engine_dir``."""

    engine_dir: Path

    @property
    def llm_dir(self) -> Path:
        return self.engine_dir / LLM_SUBDIR

    @property
    def vision_plan(self) -> Path:
        return self.engine_dir / VISION_SUBDIR / VISION_PLAN

    def build_commands(self, model_dir: Path | str | None) -> list[str]:
        model = str(model_dir) if model_dir else "HF_DIR"
        ckpt = self.engine_dir / "checkpoint"
        return [
            f"python -m engine_build.convert_checkpoint --model-dir {model} --out {ckpt} --weight-only int8",
            f"python -m engine_build.build_llm --checkpoint-dir {ckpt} --output-dir {self.llm_dir}",
            f"python -m engine_build.build_vit --model-dir {model} --out {self.vision_plan.parent}",
        ]


def _importable(module: str) -> str | None:
    """None when ``module`` imports, else why not."""
    try:
        __import__(module)
    except Exception as e:  # ImportError, or a CUDA/MPI library missing under it
        return f"{type(e).__name__}: {e}"
    return None


def missing_requirements(engine_dir: Path | None, model_dir: Path | None = None) -> list[str]:
    """Everything the trtllm backend lacks here, each with what to do; empty when it can start."""
    problems = []
    for module, what in (("tensorrt_llm", "TensorRT-LLM"), ("tensorrt", "TensorRT")):
        why = _importable(module)
        if why is not None:
            problems.append(f"{what} is not importable ({why}); install it on a CUDA host: {INSTALL}")
    if engine_dir is None:
        problems.append("engine.engine_dir is not set (VLQ_ENGINE_ENGINE_DIR); point it at the folder "
                        "holding llm/ and vision/ built by engine_build")
        return problems
    files = EngineFiles(Path(engine_dir))
    commands = files.build_commands(model_dir)
    if not (files.llm_dir / "config.json").is_file() or not (files.llm_dir / LLM_ENGINE_FILE).is_file():
        problems.append(f"no LLM engine in {files.llm_dir} (config.json + {LLM_ENGINE_FILE}); build it: "
                        f"{commands[0]} && {commands[1]}")
    if not files.vision_plan.is_file():
        problems.append(f"no vision engine {files.vision_plan}; build it: {commands[2]}")
    return problems


def read_engine_limits(llm_dir: Path, *, max_images: int) -> tuple[EngineLimits, str]:
    """The LLM engine's limits and dtype, from trtllm-build's ``config.json``."""
    path = llm_dir / "config.json"
    try:
        config = json.loads(path.read_text())
        build, pretrained = config["build_config"], config["pretrained_config"]
        limits = EngineLimits(
            vocab_size=int(pretrained["vocab_size"]),
            max_batch_size=int(build["max_batch_size"]),
            max_input_len=int(build["max_input_len"]),
            max_seq_len=int(build["max_seq_len"]),
            max_prompt_rows=int(build.get("max_prompt_embedding_table_size") or 0),
            max_images=max_images,
        )
        dtype = str(pretrained["dtype"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EngineUnavailable(f"{path} is not a TensorRT-LLM engine config ({e}); rebuild with "
                                "python -m engine_build.build_llm") from None
    if limits.max_prompt_rows <= 0:
        raise EngineUnavailable(f"{llm_dir} was built without a prompt table (max_multimodal_len 0), so it "
                                "cannot take images; rebuild with python -m engine_build.build_llm")
    return limits, dtype


# -- the LLM executor, behind a small interface -------------------------------------------------


@dataclass
class LlmOutput:
    """One executor response in plain values: the new tokens of one request."""

    llm_id: int
    tokens: list[int]
    is_final: bool
    finish_reason: str | None = None  # stop | length | cancelled | timed_out
    error: str | None = None


class LlmExecutor(Protocol):
    """What :class:`TrtllmEngine` needs from TensorRT-LLM (see :class:`TrtllmExecutor`)."""

    def enqueue(self, spec: LlmRequestSpec, table: Any | None) -> int: ...

    def poll(self, timeout_s: float) -> list[LlmOutput]: ...

    def cancel(self, llm_id: int) -> None: ...

    def close(self) -> None: ...


class TrtllmExecutor:
    """TensorRT-LLM's C++ executor (``tensorrt_llm.bindings.executor``, v0.16 API).

    In-flight batching, guaranteed-no-evict scheduling, paged KV cache with block reuse (the
    grps deployment's settings); streaming responses without the input tokens.
    """

    def __init__(self, llm_dir: Path, *, max_batch_size: int, kv_cache_free_gpu_memory_fraction: float = 0.7,
                 enable_block_reuse: bool = True, device_id: int | None = None) -> None:
        from tensorrt_llm.bindings import executor as trtllm

        self._x = trtllm
        config = trtllm.ExecutorConfig(
            max_beam_width=1,
            scheduler_config=trtllm.SchedulerConfig(trtllm.CapacitySchedulerPolicy.GUARANTEED_NO_EVICT),
            kv_cache_config=trtllm.KvCacheConfig(
                free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction,
                enable_block_reuse=enable_block_reuse),
        )
        config.max_batch_size = max_batch_size
        config.batching_type = trtllm.BatchingType.INFLIGHT
        if device_id:
            config.parallel_config = trtllm.ParallelConfig(
                trtllm.CommunicationType.MPI, trtllm.CommunicationMode.LEADER, device_ids=[device_id])
        self.executor = trtllm.Executor(Path(llm_dir), trtllm.ModelType.DECODER_ONLY, config)

    def _sampling_config(self, kwargs: dict[str, Any]):
        try:
            return self._x.SamplingConfig(**kwargs)
        except TypeError:  # releases before `seed` was added call it `random_seed`
            kwargs = dict(kwargs)
            kwargs["random_seed"] = kwargs.pop("seed")
            return self._x.SamplingConfig(**kwargs)

    def enqueue(self, spec: LlmRequestSpec, table: Any | None) -> int:
        x = self._x
        ptuning = None
        if table is not None:
            ptuning = x.PromptTuningConfig(embedding_table=table, input_token_extra_ids=spec.extra_ids)
        kwargs = dict(
            input_token_ids=spec.input_ids,
            streaming=spec.streaming,
            sampling_config=self._sampling_config(spec.sampling),
            output_config=x.OutputConfig(exclude_input_from_output=True),
            end_id=spec.end_id,
            pad_id=spec.pad_id,
            stop_words=spec.stop_words or None,
            prompt_tuning_config=ptuning,
        )
        try:
            request = x.Request(max_tokens=spec.max_tokens, **kwargs)
        except TypeError:  # before v0.13 the argument was max_new_tokens
            request = x.Request(max_new_tokens=spec.max_tokens, **kwargs)
        return int(self.executor.enqueue_request(request))

    def poll(self, timeout_s: float) -> list[LlmOutput]:
        outputs = []
        for response in self.executor.await_responses(timeout=timedelta(seconds=timeout_s)):
            llm_id = int(response.request_id)
            if response.has_error():
                outputs.append(LlmOutput(llm_id, [], True, error=str(response.error_msg)))
                continue
            result = response.result
            beams = result.output_token_ids
            reasons = getattr(result, "finish_reasons", None) or [None]
            outputs.append(LlmOutput(llm_id, [int(t) for t in (beams[0] if beams else [])],
                                     bool(result.is_final), finish_reason(reasons[0])))
        return outputs

    def cancel(self, llm_id: int) -> None:
        self.executor.cancel_request(llm_id)

    def close(self) -> None:
        self.executor.shutdown()


# -- the engine ---------------------------------------------------------------------------------


class _Live:
    """A request the executor holds: its sequence, its prompt table (kept alive while the
    executor may read it) and when it was enqueued."""

    __slots__ = ("seq", "spec", "table", "enqueued_at")

    def __init__(self, seq: Sequence, spec: LlmRequestSpec, table: Any | None) -> None:
        self.seq = seq
        self.spec = spec
        self.table = table
        self.enqueued_at = time.monotonic()


class TrtllmEngine:
    """The Engine of a TensorRT vision engine + TensorRT-LLM executor pair.

    ``vision`` has ``encode(images) -> [N, 256, hidden]`` in the LLM's dtype and device
    (:class:`worker.engine.trtllm.vision.VisionFeatures`); ``llm`` is an :class:`LlmExecutor`;
    ``tokenizer`` gives ``stream_decoder()`` and ``endoftext_id``. ``start=False`` runs no
    thread: the caller drives :meth:`step` (tests).
    """

    def __init__(self, vision, llm: LlmExecutor, tokenizer, limits: EngineLimits, *,
                 max_batch_size: int | None = None, poll_interval_s: float = 0.005, start: bool = True) -> None:
        self.vision = vision
        self.llm = llm
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_batch_size = min(max_batch_size or limits.max_batch_size, limits.max_batch_size)
        self.max_seq_len = limits.max_seq_len
        self.poll_interval_s = poll_interval_s
        self.pad_id = int(tokenizer.endoftext_id)
        self._waiting: deque[tuple[Sequence, LlmRequestSpec]] = deque()
        self._live: dict[int, _Live] = {}  # executor id -> request
        # Executor ids cancelled by vlq whose final response is pending -> their prompt tables.
        self._draining: dict[int, Any] = {}
        self._mailbox = Mailbox("vlq-trtllm-engine")  # (SUBMIT, (Sequence, spec)) | (ABORT, request_id)
        if start:
            self.start()

    @classmethod
    def from_settings(cls, engine_settings, tokenizer) -> TrtllmEngine:
        """Load the engine pair named by ``engine_settings`` (:class:`producer.config.EngineSettings`).

        Raises :class:`EngineUnavailable` listing every missing piece (TensorRT-LLM, TensorRT,
        engine files) with the install / build commands; the worker refuses to start on it.
        """
        engine_dir = Path(engine_settings.engine_dir) if engine_settings.engine_dir else None
        problems = missing_requirements(engine_dir, engine_settings.model_dir)
        if str(engine_settings.device).startswith("cpu"):
            problems.append("engine.device is cpu, but TensorRT engines run on CUDA devices only; "
                            "set engine.device to auto or cuda:N")
        if problems:
            raise EngineUnavailable(
                "backend trtllm cannot start:\n  - " + "\n  - ".join(problems)
                + "\n(see docs/tensorrt.md, or set engine.backend: torch)",
                problems=problems)
        import torch

        from worker.engine.trtllm.vision import TrtVisionEngine, VisionFeatures

        files = EngineFiles(engine_dir)
        limits, llm_dtype = read_engine_limits(files.llm_dir, max_images=engine_settings.max_images)
        if tokenizer.n_vocab > limits.vocab_size:
            raise EngineUnavailable(
                f"the LLM engine in {files.llm_dir} has vocab_size {limits.vocab_size} but the tokenizer of "
                f"{engine_settings.model_dir} has {tokenizer.n_vocab} tokens: the engines were built from "
                "another model; rebuild them from engine.model_dir")
        # The worker's own limits apply where they are tighter than the engine's.
        limits = replace(limits, max_input_len=min(limits.max_input_len, engine_settings.max_input_len),
                         max_seq_len=min(limits.max_seq_len, engine_settings.max_seq_len))
        if engine_settings.max_batch_size > limits.max_batch_size:
            log.warning("engine.max_batch_size %d exceeds the LLM engine's %d; using %d",
                        engine_settings.max_batch_size, limits.max_batch_size, limits.max_batch_size)
        device = torch.device("cuda" if engine_settings.device in ("auto", "cuda") else engine_settings.device)
        device_id = device.index or 0
        vit = TrtVisionEngine(files.vision_plan, device=torch.device("cuda", device_id))
        vision = VisionFeatures(vit, max_batch=vit.max_batch, device=torch.device("cuda", device_id),
                                dtype=getattr(torch, llm_dtype), cache_images=engine_settings.feature_cache_images)
        llm = TrtllmExecutor(files.llm_dir, max_batch_size=min(engine_settings.max_batch_size, limits.max_batch_size),
                             device_id=device_id)
        return cls(vision, llm, tokenizer, limits, max_batch_size=engine_settings.max_batch_size)

    # -- the Engine protocol --------------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        """Queue ``request``; the future resolves to its result or raises a VlqError."""
        future: Future[GenerationResult] = Future()
        try:
            spec = build_spec(request, self.limits, pad_id=self.pad_id)
            seq = Sequence(request, self.tokenizer.stream_decoder(), max_tokens=spec.max_tokens,
                           seed=spec.seed, future=future)
        except VlqError as e:
            future.set_exception(e)
            return future
        if not self._mailbox.post(SUBMIT, (seq, spec)):
            future.set_exception(EngineUnavailable("the engine is closed", request_id=request.request_id))
        return future

    def abort(self, request_id: str) -> None:
        """Stop ``request_id`` (waiting or running); its future raises JobCancelled."""
        self._mailbox.post(ABORT, request_id)

    def close(self) -> None:
        """Stop the scheduler thread and the executor; unfinished requests fail."""
        error = EngineUnavailable("the engine was closed before the request finished")
        for kind, item in self._mailbox.close():
            if kind == SUBMIT and not item[0].future.done():
                item[0].future.set_exception(error)
        self._fail_all(error)
        self.llm.close()

    # -- the loop -------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler thread."""
        self._mailbox.start(lambda: self.step(self.poll_interval_s), self._busy,
                            lambda e: self._fail_all(internal_error(e)))

    def has_work(self) -> bool:
        """Requests waiting, in the executor, or not yet taken in."""
        return self._mailbox.has_mail() or self._busy()

    def _busy(self) -> bool:
        return bool(self._waiting or self._live or self._draining)

    @property
    def in_flight(self) -> int:
        """Requests the executor holds, cancelled ones whose final response is pending included."""
        return len(self._live) + len(self._draining)

    def step(self, timeout_s: float = 0.0) -> None:
        """Take new work, expire deadlines, admit up to the batch limit, handle responses."""
        self._take_mail()
        self._expire(time.monotonic())
        self._admit()
        if self._live or self._draining:
            self._handle(self.llm.poll(timeout_s))

    # -- step parts -----------------------------------------------------------------------------

    def _take_mail(self) -> None:
        for kind, item in self._mailbox.take():
            if kind == SUBMIT:
                seq, spec = item
                if not seq.future.set_running_or_notify_cancel():
                    continue  # cancelled through Future.cancel() before it was taken in
                if self._find(seq.request_id) is not None:
                    seq.future.set_exception(duplicate_request(seq.request_id))
                    continue
                self._waiting.append((seq, spec))
            else:
                seq = self._find(item)
                if seq is not None:
                    self._end(seq, aborted(item))

    def _find(self, request_id: str) -> Sequence | None:
        for seq, _ in self._waiting:
            if seq.request_id == request_id:
                return seq
        for live in self._live.values():
            if live.seq.request_id == request_id:
                return live.seq
        return None

    def _expire(self, now: float) -> None:
        seqs = [seq for seq, _ in self._waiting] + [live.seq for live in self._live.values()]
        for seq in seqs:
            deadline = seq.request.deadline
            if deadline is not None and now >= deadline:
                self._end(seq, seq.deadline_error())

    def _admit(self) -> None:
        while self._waiting and self.in_flight < self.max_batch_size:
            seq, spec = self._waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.admitted_at = time.monotonic()
            try:
                table = None
                if seq.request.images:
                    t0 = time.monotonic()
                    table = prompt_table(self.vision.encode(seq.request.images))  # [N*256, hidden]
                    seq.vision_s += time.monotonic() - t0
                llm_id = self.llm.enqueue(spec, table)
            except Exception as e:
                log.error("admitting %s failed", seq.request_id, exc_info=e)
                error = e if isinstance(e, VlqError) else EngineError(
                    f"the engine could not start the request: {type(e).__name__}: {e}", request_id=seq.request_id)
                self._resolve(seq, error)
                continue
            self._live[llm_id] = _Live(seq, spec, table)

    def _handle(self, outputs: Seq[LlmOutput]) -> None:
        for out in outputs:
            if out.llm_id in self._draining:
                if out.is_final:
                    del self._draining[out.llm_id]
                continue
            live = self._live.get(out.llm_id)
            if live is None:
                continue
            seq = live.seq
            if out.error is not None:
                del self._live[out.llm_id]
                self._resolve(seq, EngineError(f"TensorRT-LLM failed the request: {out.error}",
                                               request_id=seq.request_id))
                continue
            done = False
            for token in out.tokens:
                if seq.first_token_at is None:
                    seq.prefill_s = time.monotonic() - live.enqueued_at
                if seq.append_token(token):
                    done = True
                    break
            seq.stream()
            if not done and out.is_final:
                done = self._ended_by_executor(seq, live.spec, out)
                if not done:  # settled with an error
                    del self._live[out.llm_id]
                    continue
            if done:
                del self._live[out.llm_id]
                if not out.is_final:  # a stop string, or our max_tokens: free the executor's slot
                    self.llm.cancel(out.llm_id)
                    self._draining[out.llm_id] = live.table
                self._resolve(seq)

    def _ended_by_executor(self, seq: Sequence, spec: LlmRequestSpec, out: LlmOutput) -> bool:
        """The executor finished a request that our stop rules had not ended; settle it."""
        if out.finish_reason == "stop" and spec.stop_token_ids:
            # A release that drops the stop token from its output: count it, as the torch engine does.
            return seq.append_token(spec.stop_token_ids[0])
        if out.finish_reason == "length" and seq.output_ids:
            # The executor's own length limit came first (it clips to its max_seq_len too).
            seq.text += seq.decoder.flush()
            seq.finish_reason = "length"
            return True
        self._resolve(seq, EngineError(
            f"TensorRT-LLM ended the request after {len(seq.output_ids)} tokens ({out.finish_reason})",
            request_id=seq.request_id))
        return False

    # -- endings --------------------------------------------------------------------------------

    def _end(self, seq: Sequence, error: VlqError) -> None:
        """Stop a waiting or live request with ``error``."""
        self._waiting = deque((s, p) for s, p in self._waiting if s is not seq)
        for llm_id, live in list(self._live.items()):
            if live.seq is seq:
                del self._live[llm_id]
                self.llm.cancel(llm_id)
                self._draining[llm_id] = live.table
        self._resolve(seq, error)

    def _resolve(self, seq: Sequence, error: VlqError | None = None) -> None:
        if seq.status is SequenceStatus.FINISHED and seq.future.done():
            return
        seq.status = SequenceStatus.FINISHED
        seq.error = error
        seq.finished_at = time.monotonic()
        if seq.first_token_at is not None:
            seq.decode_s = seq.finished_at - seq.first_token_at
        if error is None:
            seq.stream()
        if seq.future.done():
            return
        if error is not None:
            seq.future.set_exception(error)
        else:
            seq.future.set_result(seq.result())

    def _fail_all(self, error: VlqError) -> None:
        seqs = [seq for seq, _ in self._waiting] + [live.seq for live in self._live.values()]
        for seq in seqs:
            self._end(seq, error)
