"""One request's life inside the engine: :class:`Sequence`.

A sequence is WAITING in the scheduler's queue, RUNNING in a KV-cache slot, then FINISHED. It
owns its answer: the ids, the text decoded so far (through the tokenizer's streaming decoder, so
a UTF-8 character split across tokens is never shown half), the stop rules, the part of the text
already streamed, its timings and why it ended.

Stop rules, in order, after each new token (unless ``ignore_stop``):

1. a stop token id ends the answer; the id counts in ``completion_tokens`` and is not in the text;
2. a stop string that appears in the text ends the answer; the text is cut where it begins;
3. ``max_tokens`` answer tokens end it with finish_reason ``length``.

Streaming never shows text that a stop string could still swallow: the tail of the text that is
a prefix of some stop string is held back until the next token decides. With logprobs asked, each
token's entry is streamed with the text that completes it.

With ``logprobs`` asked for, each token's :class:`TokenLogprob` is kept with it; the result lists
those of the tokens that make up the text (not the stop token, nor tokens after a stop string's cut).
"""

from __future__ import annotations

import enum
import logging
import time
from concurrent.futures import Future
from typing import Protocol

from producer.errors import DeadlineExceeded, VlqError
from worker.engine.types import FinishReason, GenerationRequest, GenerationResult, TokenLogprob

log = logging.getLogger(__name__)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class TextDecoder(Protocol):
    """The streaming decoder of :class:`worker.engine.tokenizer.StreamDecoder`."""

    def feed(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class Sequence:
    """A request in the engine, with its answer so far.

    ``max_tokens`` is the request's own limit after the engine clipped it to the KV cache
    (see :class:`worker.engine.engine.TorchEngine`); ``seed`` is the seed actually used.
    """

    def __init__(
        self,
        request: GenerationRequest,
        decoder: TextDecoder,
        *,
        max_tokens: int,
        seed: int,
        future: Future[GenerationResult] | None = None,
    ) -> None:
        self.request = request
        self.decoder = decoder
        self.max_tokens = max_tokens
        self.seed = seed
        self.future: Future[GenerationResult] = future if future is not None else Future()
        self.status = SequenceStatus.WAITING
        self.slot: int | None = None
        self.output_ids: list[int] = []
        self.text = ""
        # With logprobs asked: each answer token's entry, and where the text stood before it.
        self.logprobs: list[TokenLogprob] | None = [] if request.sampling.logprobs is not None else None
        self._text_starts: list[int] = []
        self._cut_at: int | None = None  # where a stop string cut the text
        self.finish_reason: FinishReason | None = None
        self.error: VlqError | None = None
        self.on_delta = request.on_delta  # set to None by the engine if the callback fails
        # (features, CUDA event or None) from ModelRunner.encode_ahead, until its prefill takes them
        self.encoded_images: tuple | None = None
        self._streamed = 0  # characters of ``text`` already handed to on_delta
        self._streamed_logprobs = 0  # entries of ``logprobs`` already handed to on_delta
        params = request.sampling
        self._stop_ids = frozenset(() if params.ignore_stop else params.stop_token_ids)
        self._stop_strings = tuple(s for s in params.stop if s) if not params.ignore_stop else ()
        # Timings: monotonic instants, and seconds spent in each engine phase.
        self.submitted_at = time.monotonic()
        self.admitted_at: float | None = None
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self.vision_s = 0.0
        self.prefill_s = 0.0
        self.decode_s = 0.0

    # -- shape of the sequence ------------------------------------------------------------------

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt plus answer tokens."""
        return self.prompt_len + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    # -- growing the answer ---------------------------------------------------------------------

    @property
    def wants_logprobs(self) -> int | None:
        """How many top tokens to report per answer token (None: no logprobs)."""
        return self.request.sampling.logprobs

    def append_token(self, token_id: int, logprob: TokenLogprob | None = None) -> bool:
        """Add one sampled token (and its logprob entry, when asked) and apply the stop rules;
        True when the answer is complete."""
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.output_ids.append(token_id)
        if self.logprobs is not None and logprob is not None:
            self.logprobs.append(logprob)
            self._text_starts.append(len(self.text))
        if token_id in self._stop_ids:
            self._add_text(self.decoder.flush())
            self.finish_reason = "stop"
            return True
        if self._add_text(self.decoder.feed(token_id)):
            self.finish_reason = "stop"
            return True
        if len(self.output_ids) >= self.max_tokens:
            self.finish_reason = "stop" if self._add_text(self.decoder.flush()) else "length"
            return True
        return False

    def _add_text(self, piece: str) -> bool:
        """Append decoded text; True (and the text cut) when it completes a stop string."""
        if not piece:
            return False
        start = len(self.text)
        self.text += piece
        if not self._stop_strings:
            return False
        cut = None
        for stop in self._stop_strings:
            at = self.text.find(stop, max(0, start - len(stop) + 1))
            if at >= 0 and (cut is None or at < cut):
                cut = at
        if cut is None:
            return False
        self.text = self.text[:cut]
        self._cut_at = cut
        return True

    def take_delta(self) -> str:
        """The text not yet streamed that no stop string can still swallow; marks it streamed."""
        end = len(self.text)
        if not self.is_finished and self._stop_strings:
            end -= self._held_back()
        if end <= self._streamed:
            return ""
        delta = self.text[self._streamed:end]
        self._streamed = end
        return delta

    def take_logprobs(self) -> list[TokenLogprob]:
        """The logprob entries not yet streamed of the tokens whose text has all been streamed
        (once finished: the rest of the answer's entries); marks them streamed."""
        if self.logprobs is None:
            return []
        if self.is_finished:
            ready = (self._content_logprobs() or [])[self._streamed_logprobs:]
        else:  # streamed text is never cut: a token inside it is part of the answer
            end, last = self._streamed_logprobs, len(self.logprobs) - 1
            while end <= last and self._text_end(end) <= self._streamed:
                if end == last and self._text_starts[end] == len(self.text):
                    break  # no text yet (part of a character): it goes with the text it begins
                end += 1
            ready = self.logprobs[self._streamed_logprobs:end]
        self._streamed_logprobs += len(ready)
        return ready

    def _text_end(self, i: int) -> int:
        """Where the text stood after the token of logprob entry ``i``."""
        return self._text_starts[i + 1] if i + 1 < len(self._text_starts) else len(self.text)

    def stream(self) -> None:
        """Hand the new text (:meth:`take_delta`) and the logprob entries it completes
        (:meth:`take_logprobs`) to ``on_delta``; a callback that raises is logged and not called
        again for this request."""
        if self.on_delta is None or self.error is not None:
            return
        delta = self.take_delta()
        entries = self.take_logprobs()
        if not delta and not entries:
            return
        try:
            self.on_delta(delta, entries)
        except Exception:
            log.exception("on_delta of %s failed; streaming stops for it", self.request_id)
            self.on_delta = None

    def _held_back(self) -> int:
        """Length of the longest tail of the text that begins some stop string."""
        held = 0
        for stop in self._stop_strings:
            for k in range(min(len(stop) - 1, len(self.text)), held, -1):
                if self.text.endswith(stop[:k]):
                    held = k
                    break
        return held

    # -- the end --------------------------------------------------------------------------------

    def result(self) -> GenerationResult:
        """The finished answer with its token counts and timings (milliseconds)."""
        assert self.finish_reason is not None, "result() of an unfinished sequence"
        return GenerationResult(
            request_id=self.request_id,
            text=self.text,
            token_ids=list(self.output_ids),
            finish_reason=self.finish_reason,
            prompt_tokens=self.prompt_len,
            completion_tokens=len(self.output_ids),
            timings=self.timings_ms(),
            logprobs=(logprobs := self._content_logprobs()),
            logprob_spans=None if logprobs is None else [
                (min(self._text_starts[i], len(self.text)), min(self._text_end(i), len(self.text)))
                for i in range(len(logprobs))],
        )

    def _content_logprobs(self) -> list[TokenLogprob] | None:
        """The entries of the tokens that make up ``text``: not a stop token, nor the tokens
        that began after where a stop string cut the text."""
        if self.logprobs is None:
            return None
        kept = []
        for entry, start in zip(self.logprobs, self._text_starts):
            if entry.token_id in self._stop_ids or (self._cut_at is not None and start >= self._cut_at):
                break
            kept.append(entry)
        return kept

    def deadline_error(self) -> DeadlineExceeded:
        """The error of a request stopped at its deadline."""
        return DeadlineExceeded(
            f"request {self.request_id} passed its deadline after {len(self.output_ids)} "
            "answer tokens; allow it more time or ask for fewer max_tokens",
            request_id=self.request_id, completion_tokens=len(self.output_ids))

    def timings_ms(self) -> dict[str, float]:
        """queued, vision, prefill, decode, ttft and total, in milliseconds."""
        end = self.finished_at or time.monotonic()

        def ms(seconds: float) -> float:
            return round(seconds * 1000.0, 3)

        first = self.first_token_at or end
        return {
            "queued": ms((self.admitted_at or end) - self.submitted_at),
            "vision": ms(self.vision_s),
            "prefill": ms(self.prefill_s),
            "decode": ms(self.decode_s),
            "ttft": ms(first - self.submitted_at),
            "total": ms(end - self.submitted_at),
        }

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, slot={self.slot}, "
                f"prompt={self.prompt_len}, output={len(self.output_ids)})")
