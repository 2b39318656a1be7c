"""Continuous batching: slots, admission order, and slots freed at once."""

from __future__ import annotations

import time

import pytest

from producer.errors import JobCancelled
from worker.engine.scheduler import Scheduler
from worker.engine.sequence import Sequence, SequenceStatus
from worker.engine.types import GenerationRequest, SamplingParams

IM_END = 258


def seq(tok, rid: str, deadline: float | None = None) -> Sequence:
    params = SamplingParams(max_tokens=10, stop_token_ids=(IM_END,))
    request = GenerationRequest(rid, [1, 2], sampling=params, deadline=deadline)
    return Sequence(request, tok.stream_decoder(), max_tokens=10, seed=0)


def test_at_most_max_batch_size_sequences_run_and_the_rest_wait_in_order(byte_tokenizer):
    sched = Scheduler(max_batch_size=2)
    a, b, c = (seq(byte_tokenizer, r) for r in "abc")
    for s in (a, b, c):
        sched.add(s)
    admitted, is_prefill = sched.schedule()
    assert is_prefill and admitted == [a, b]
    assert (a.slot, b.slot) == (0, 1)
    assert list(sched.waiting) == [c] and c.status is SequenceStatus.WAITING
    batch, is_prefill = sched.schedule()
    assert not is_prefill and batch == [a, b]


def test_a_finished_sequence_frees_its_slot_for_the_next_waiting_one(byte_tokenizer):
    sched = Scheduler(max_batch_size=2)
    a, b, c = (seq(byte_tokenizer, r) for r in "abc")
    for s in (a, b, c):
        sched.add(s)
    sched.schedule()
    finished = sched.postprocess([a, b], [ord("x"), IM_END])
    assert finished == [b] and b.status is SequenceStatus.FINISHED
    assert sorted(sched.running) == [0]
    admitted, is_prefill = sched.schedule()
    assert is_prefill and admitted == [c] and c.slot == 1
    batch, _ = sched.schedule()
    assert batch == [a, c]


def test_the_lowest_free_slot_is_taken_first(byte_tokenizer):
    sched = Scheduler(max_batch_size=3)
    seqs = [seq(byte_tokenizer, str(i)) for i in range(3)]
    for s in seqs:
        sched.add(s)
    sched.schedule()
    sched.finish(seqs[2])
    sched.finish(seqs[0])
    late = seq(byte_tokenizer, "late")
    sched.add(late)
    sched.schedule()
    assert late.slot == 0


def test_finishing_a_waiting_sequence_takes_it_out_of_the_queue(byte_tokenizer):
    sched = Scheduler(max_batch_size=1)
    a, b = seq(byte_tokenizer, "a"), seq(byte_tokenizer, "b")
    sched.add(a)
    sched.add(b)
    sched.schedule()
    error = JobCancelled("aborted")
    sched.finish(b, error)
    assert not sched.waiting and b.error is error and b.is_finished
    sched.finish(b)  # twice is harmless
    assert sched.find("b") is None and sched.find("a") is a


def test_sequences_past_their_deadline_are_reported_running_or_waiting(byte_tokenizer):
    sched = Scheduler(max_batch_size=1)
    now = time.monotonic()
    a = seq(byte_tokenizer, "a", deadline=now + 1)
    b = seq(byte_tokenizer, "b", deadline=now + 5)
    c = seq(byte_tokenizer, "c")
    for s in (a, b, c):
        sched.add(s)
    sched.schedule()
    assert sched.expired(now) == []
    assert sched.expired(now + 2) == [a]
    assert sched.expired(now + 10) == [a, b]


def test_an_empty_scheduler_has_nothing_to_run():
    sched = Scheduler(max_batch_size=2)
    assert not sched.has_work()
    assert sched.schedule() == ([], False)
    with pytest.raises(ValueError):
        Scheduler(max_batch_size=0)
