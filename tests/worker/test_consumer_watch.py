"""A worker whose broker consumer stopped asking for jobs is noticed, and only such a worker."""

from __future__ import annotations

from worker.consumer_watch import ConsumerWatch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def watch_with(pulse_age: float, stall_s: float = 60.0, threads: int = 4):
    clock, fired = Clock(), []
    watch = ConsumerWatch(lambda: pulse_age, threads=threads, stall_s=stall_s, on_stall=fired.append, clock=clock)
    return watch, clock, fired


def test_a_consumer_silent_while_redis_answers_and_threads_are_free_is_reported_once() -> None:
    watch, clock, fired = watch_with(pulse_age=500)
    assert not watch.check(running=1)  # the quiet time starts now
    clock.now += 59
    assert not watch.check(running=1)
    clock.now += 2
    assert watch.check(running=1) and len(fired) == 1
    assert "no job in 500s" in fired[0] and "3 of 4 threads are free" in fired[0]
    clock.now += 100
    assert not watch.check(running=0) and len(fired) == 1  # once


def test_a_consumer_that_polls_is_never_reported() -> None:
    watch, clock, fired = watch_with(pulse_age=0.8)
    for _ in range(100):
        clock.now += 10
        watch.check(running=0)
    assert fired == []


def test_busy_threads_and_redis_outages_restart_the_quiet_time() -> None:
    watch, clock, fired = watch_with(pulse_age=500)
    watch.check(running=0)
    clock.now += 50
    watch.check(running=4)  # every thread busy: the consumer rightly asks for nothing
    clock.now += 30
    assert not watch.check(running=3)  # free again 0 s ago
    clock.now += 50
    watch.redis_down()  # the consumer may be reconnecting along with everyone else
    clock.now += 30
    assert not watch.check(running=0)
    clock.now += 61
    assert watch.check(running=0) and len(fired) == 1


def test_a_stall_time_of_zero_turns_the_watch_off() -> None:
    watch, clock, fired = watch_with(pulse_age=10_000, stall_s=0)
    watch.check(running=0)
    clock.now += 10_000
    assert not watch.check(running=0) and fired == []
