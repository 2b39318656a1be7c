"""The mailbox between callers' threads and an engine's scheduler thread."""

from __future__ import annotations

import threading

from worker.engine.mailbox import ABORT, SUBMIT, Mailbox


def test_posts_are_taken_in_order_and_only_once():
    box = Mailbox("test")
    box.post(SUBMIT, "a")
    box.post(ABORT, "a")
    assert box.has_mail()
    assert box.take() == [(SUBMIT, "a"), (ABORT, "a")]
    assert box.take() == [] and not box.has_mail()


def test_the_thread_steps_while_there_is_mail_or_work_and_sleeps_otherwise():
    box = Mailbox("test")
    work = {"left": 3}
    stepped = threading.Event()
    steps = []

    def step():
        box.take()
        steps.append(work["left"])
        if work["left"]:
            work["left"] -= 1
        if not work["left"]:
            stepped.set()

    box.post(SUBMIT, "go")
    box.start(step, busy=lambda: work["left"] > 0, on_error=lambda e: None)
    assert stepped.wait(5)
    assert box.close() == []
    assert steps[:3] == [3, 2, 1]  # kept stepping while busy, then slept until closed


def test_a_failing_step_is_reported_and_the_thread_keeps_serving():
    box = Mailbox("test")
    failed, served = threading.Event(), threading.Event()
    errors = []

    def step():
        for _, item in box.take():
            if item == "boom":
                raise RuntimeError("boom")
            served.set()

    def on_error(e):
        errors.append(e)
        failed.set()

    box.start(step, busy=lambda: False, on_error=on_error)
    box.post(SUBMIT, "boom")
    assert failed.wait(5)
    box.post(SUBMIT, "fine")
    assert served.wait(5)
    box.close()
    assert [str(e) for e in errors] == ["boom"]


def test_a_closed_mailbox_refuses_posts_and_returns_what_was_never_taken():
    box = Mailbox("test")
    box.post(SUBMIT, "never taken")
    assert box.close() == [(SUBMIT, "never taken")]
    assert box.post(SUBMIT, "late") is False
