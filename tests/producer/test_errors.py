"""The error tree's copies with a note: what a worker adds when it retries or gives up."""

from __future__ import annotations

from producer.errors import ImageFetchUnavailable, TransientError, VlqError


def test_a_noted_error_keeps_its_class_code_and_context_and_leaves_the_original_alone() -> None:
    error = ImageFetchUnavailable("the image server answered 503", url="https://example.com/a.jpg", status=503)
    noted = error.with_note("retry 1 of 3 in 2.0s")
    assert type(noted) is ImageFetchUnavailable and noted.retryable
    assert noted.to_dict() == {"code": "image_fetch_unavailable", "url": "https://example.com/a.jpg", "status": 503,
                               "message": "the image server answered 503; retry 1 of 3 in 2.0s"}
    assert str(noted) == noted.message
    assert error.message == "the image server answered 503"


def test_a_refined_code_survives_the_note() -> None:
    error = VlqError("the API stopped waiting", code="timeout", job_id="job-1")
    assert error.with_note("the job goes on").to_dict() == {
        "code": "timeout", "message": "the API stopped waiting; the job goes on", "job_id": "job-1"}


def test_every_kind_of_transient_error_says_what_to_check_when_retries_run_out() -> None:
    kinds = TransientError.__subclasses__()
    assert {kind.code for kind in kinds} == {
        "image_fetch_timeout", "image_fetch_unavailable", "store_unavailable", "broker_unavailable"}
    for kind in kinds:
        assert kind.remedy != TransientError.remedy and kind.remedy.startswith("check"), kind
