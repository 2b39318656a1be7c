"""Continuous batching: which sequences hold the KV cache's slots, and what runs next.

The scheduler keeps a FIFO of WAITING sequences and at most ``max_batch_size`` RUNNING ones,
each in its own slot (row) of the static KV cache. :meth:`Scheduler.schedule` admits waiting
sequences into free slots (a prefill step) and otherwise hands back the running batch (a decode
step); :meth:`Scheduler.postprocess` appends the sampled tokens and releases the slot of every
sequence that finished, so the next waiting request is admitted on the very next step.
A sequence that fails, is aborted or passes its deadline leaves through :meth:`finish` at once.
"""

from __future__ import annotations

import heapq
import time
from collections import deque
from collections.abc import Iterable

from producer.errors import VlqError
from worker.engine.sequence import Sequence, SequenceStatus
from worker.engine.types import TokenLogprob


class Scheduler:
    """Waiting queue plus slot table for up to ``max_batch_size`` running sequences."""

    def __init__(self, max_batch_size: int) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, not {max_batch_size}")
        self.max_batch_size = max_batch_size
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self._free_slots = list(range(max_batch_size))  # a heap: the lowest free slot first

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def find(self, request_id: str) -> Sequence | None:
        """The unfinished sequence of ``request_id``, if any."""
        for seq in self.running.values():
            if seq.request_id == request_id:
                return seq
        for seq in self.waiting:
            if seq.request_id == request_id:
                return seq
        return None

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The next step's sequences and whether it is a prefill.

        Waiting sequences take free slots first (prefill step, in arrival order); with no one to
        admit, every running sequence decodes one token together (ordered by slot).
        """
        admitted: list[Sequence] = []
        now = time.monotonic()
        while self.waiting and self._free_slots:
            seq = self.waiting.popleft()
            seq.slot = heapq.heappop(self._free_slots)
            seq.status = SequenceStatus.RUNNING
            seq.admitted_at = now
            self.running[seq.slot] = seq
            admitted.append(seq)
        if admitted:
            return admitted, True
        return [self.running[slot] for slot in sorted(self.running)], False

    def postprocess(self, seqs: Iterable[Sequence], token_ids: Iterable[int],
                    logprobs: Iterable[TokenLogprob | None] | None = None) -> list[Sequence]:
        """Append each sequence's new token (and its logprob entry, if any); finish and return
        those whose answer is complete."""
        seqs = list(seqs)
        finished = []
        entries = [None] * len(seqs) if logprobs is None else logprobs
        for seq, token_id, entry in zip(seqs, token_ids, entries, strict=True):
            if seq.is_finished:  # failed or aborted during the step
                continue
            if seq.append_token(int(token_id), entry):
                self.finish(seq)
                finished.append(seq)
        return finished

    def finish(self, seq: Sequence, error: VlqError | None = None) -> None:
        """End ``seq`` now (done, failed, aborted or expired) and free its slot."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            del self.running[seq.slot]
            heapq.heappush(self._free_slots, seq.slot)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.error = error
        seq.finished_at = time.monotonic()

    def expired(self, now: float) -> list[Sequence]:
        """Unfinished sequences whose deadline has passed."""
        return [
            seq
            for seq in (*self.running.values(), *self.waiting)
            if seq.request.deadline is not None and now >= seq.request.deadline
        ]

    def __repr__(self) -> str:
        return (f"Scheduler(running={sorted(self.running)}, waiting={len(self.waiting)}, "
                f"max_batch_size={self.max_batch_size})")
