"""A failure repeated every tick is logged once, then now and then, then when it ends."""

from __future__ import annotations

import logging

import pytest

from producer.outage import Outage


def test_an_outage_is_one_warning_a_reminder_a_minute_and_one_line_when_it_ends(
    caplog: pytest.LogCaptureFixture
) -> None:
    now = [100.0]
    outage = Outage(logging.getLogger("test.outage"), "lease keeper", every_s=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.outage"):
        for _ in range(90):  # a heartbeat every 2 s for 3 minutes, Redis away
            outage.failed("cannot reach Redis")
            now[0] += 2
        outage.ok()
        outage.ok()  # nothing more to say
    assert [r.getMessage() for r in caplog.records] == [
        "lease keeper: cannot reach Redis",
        "lease keeper: still failing after 60s: cannot reach Redis",
        "lease keeper: still failing after 120s: cannot reach Redis",
        "lease keeper: working again after 180s",
    ]
