"""What `vlq status` shows a person: local times with their age, how long a job waited and ran."""

from __future__ import annotations

import pytest

from producer.cli.show import batch_lines, job_lines, moment, span
from producer.schema import JobStatus
from producer.state import BatchCounts, JobRecord

T0 = 1_764_330_000.0  # a Unix time; the lines show it in the local zone


@pytest.mark.parametrize("seconds, shown", [(0.4213, "0.42s"), (12.34, "12.3s"), (185, "3m 05s"),
                                            (7_800, "2h 10m"), (273_600, "3d 4h"), (-1, "0.00s")])
def test_spans_read_as_a_person_would_say_them(seconds: float, shown: str) -> None:
    assert span(seconds) == shown


def test_a_finished_job_shows_when_it_ran_how_long_it_waited_and_ran_and_where_its_result_is() -> None:
    record = JobRecord(id="job-1", status=JobStatus.SUCCEEDED, created_at=T0, queued_at=T0 + 0.01,
                       started_at=T0 + 2.51, finished_at=T0 + 5.61, heartbeat_at=T0 + 5, attempts=1,
                       worker="host-a:gpu0", result_location="s3://bucket/results/job-1.json")
    lines = job_lines(record, now=T0 + 125)
    assert lines[0] == "job-1  succeeded"
    assert lines[1] == f"  created   {moment(T0)} (2m 05s ago)"
    assert lines[2] == f"  started   {moment(T0 + 2.51)} (after 2.50s in the queue)"
    assert lines[3] == f"  finished  {moment(T0 + 5.61)} (ran 3.10s)"
    assert lines[4:] == ["  worker    host-a:gpu0", "  attempts  1", "  result    s3://bucket/results/job-1.json"]
    assert "1764330000" not in "\n".join(lines)


def test_a_running_job_shows_its_heartbeat_and_why_it_runs_again() -> None:
    record = JobRecord(id="job-2", status=JobStatus.RUNNING, created_at=T0, started_at=T0 + 1, heartbeat_at=T0 + 9,
                       attempts=3, retries=1, reclaims=1, cancel_requested=True,
                       last_error={"code": "image_fetch_unavailable", "message": "the host said 503"})
    shown = "\n".join(job_lines(record, now=T0 + 10))
    assert "heartbeat   1.00s ago" in shown and "finished" not in shown
    assert "attempts    3 (run again 1 after errors, 1 after its worker stopped)" in shown
    assert "last error  [image_fetch_unavailable] the host said 503" in shown
    assert "cancel      requested" in shown


def test_a_failed_job_shows_its_error_code_and_message() -> None:
    record = JobRecord(id="job-3", status=JobStatus.FAILED, created_at=T0, attempts=1,
                       error={"code": "image_decode_failed", "message": "not an image"})
    assert job_lines(record, now=T0)[-1] == "  error     [image_decode_failed] not an image"


def test_a_batch_shows_its_progress_and_how_to_read_its_results() -> None:
    running = BatchCounts(batch_id="batch-1", total=5, queued=1, running=1, succeeded=2, failed=1)
    assert batch_lines(running) == [
        "batch-1  in progress: 3 of 5 finished (1 queued, 1 running, 2 succeeded, 1 failed)",
        "  results: vlq result batch-1 --batch --wait"]
    assert batch_lines(BatchCounts(batch_id="batch-1", total=2, succeeded=2))[0] == (
        "batch-1  done: 2 of 2 finished (2 succeeded)")
