"""vlq's job endpoints through a real `vlq api` and worker: submit, poll, cancel, job batches."""

from __future__ import annotations

import time

import pytest

from tests.producer.api.conftest import Api, assert_openai_error

pytestmark = pytest.mark.integration


def body(api: Api, **kw) -> dict:
    url = (api.stack.images / "demo.jpeg").as_uri()
    return {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "这是什么"}]}],
        "max_tokens": 4, **kw}


def test_a_posted_job_answers_with_its_id_at_once_and_polls_to_its_result(api: Api) -> None:
    with api.http() as http:
        created = http.post("/v1/jobs", json=body(api, seed=2))
        assert created.status_code == 202
        job = created.json()
        assert job["object"] == "job" and job["id"].startswith("job-")
        assert job["status"] in ("queued", "running") and job["result"] is None
        done = http.get(f"/v1/jobs/{job['id']}", params={"wait": 60}).json()
    assert done["status"] == "succeeded" and done["attempts"] == 1 and done["error"] is None
    assert done["created_at"] <= done["started_at"] <= done["finished_at"]
    assert done["result"]["usage"]["prompt_tokens"] == 285
    assert done["result"]["vlq"]["job_id"] == job["id"]


def test_an_envelope_sets_the_jobs_id_metadata_and_batch(api: Api) -> None:
    with api.http() as http:
        created = http.post("/v1/jobs", json={"request": body(api), "id": "api-envelope-1",
                                              "metadata": {"photo": "demo"}, "batch_id": "api-env-batch"})
        assert created.status_code == 202, created.text
        done = http.get("/v1/jobs/api-envelope-1", params={"wait": 60}).json()
        again = http.post("/v1/jobs", json={"request": body(api), "id": "api-envelope-1"})
        view = http.get("/v1/job_batches/api-env-batch").json()
    assert done["metadata"] == {"photo": "demo"} and done["batch_id"] == "api-env-batch"
    assert_openai_error(again, 409, "duplicate_job")
    assert view["total"] == 1 and view["succeeded"] == 1 and view["job_ids"] == ["api-envelope-1"]


def test_an_envelope_with_unknown_fields_is_refused(api: Api) -> None:
    with api.http() as http:
        err = assert_openai_error(http.post("/v1/jobs", json={"request": body(api), "priority": 1}), 400,
                                  "invalid_request")
    assert err["param"] == "priority"


def test_a_failed_job_shows_its_error_code_and_message(api: Api) -> None:
    missing = (api.stack.images / "no-such-photo.jpg").as_uri()
    bad = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": missing}}, {"type": "text", "text": "hi"}]}]}
    with api.http() as http:
        job_id = http.post("/v1/jobs", json=bad).json()["id"]
        job = http.get(f"/v1/jobs/{job_id}", params={"wait": 60}).json()
    assert job["status"] == "failed" and job["result"] is None
    assert job["error"]["code"].startswith("image_") and "no-such-photo" in job["error"]["message"]


def test_a_running_job_can_be_cancelled(api: Api) -> None:
    with api.http() as http:
        job_id = http.post("/v1/jobs", json=body(api, max_tokens=400)).json()["id"]
        cancelled = http.delete(f"/v1/jobs/{job_id}").json()
        assert cancelled["cancel"] in ("cancelled", "cancelling")
        deadline = time.monotonic() + 60
        while (job := http.get(f"/v1/jobs/{job_id}").json())["status"] != "cancelled":
            assert time.monotonic() < deadline, job
            time.sleep(0.1)
        assert http.delete(f"/v1/jobs/{job_id}").json()["cancel"] == "cancelled"  # stays cancelled
    assert job["cancel_requested"] is True or job["started_at"] is None


def test_an_unknown_job_is_a_404_in_openai_shape(api: Api) -> None:
    with api.http() as http:
        errors = [assert_openai_error(http.get("/v1/jobs/job-doesnotexist"), 404, "not_found"),
                  assert_openai_error(http.delete("/v1/jobs/job-doesnotexist"), 404, "not_found"),
                  assert_openai_error(http.get("/v1/job_batches/nope"), 404, "not_found")]
    for err in errors:  # the deployment's Redis and key prefix are no business of the caller's
        assert "redis://" not in err["message"] and "key prefix" not in err["message"], err
        assert "never submitted" in err["message"]


def test_a_job_batch_counts_its_jobs_until_done(api: Api) -> None:
    with api.http() as http:
        created = http.post("/v1/job_batches", json={"requests": [body(api, seed=1), body(api, seed=2)],
                                                     "metadata": {"run": "a"}})
        assert created.status_code == 202, created.text
        batch = created.json()
        assert batch["object"] == "job_batch" and batch["total"] == 2 and len(batch["job_ids"]) == 2
        deadline = time.monotonic() + 90
        while not (view := http.get(f"/v1/job_batches/{batch['id']}").json())["done"]:
            assert time.monotonic() < deadline, view
            time.sleep(0.2)
        job = http.get(f"/v1/jobs/{batch['job_ids'][1]}").json()
    assert (view["succeeded"], view["failed"], view["finished"]) == (2, 0, 2)
    assert job["metadata"] == {"run": "a"} and job["batch_id"] == batch["id"]


def test_one_bad_request_in_a_job_batch_submits_nothing(api: Api) -> None:
    stats = api.stack.store.stats()
    bad = {"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}
    with api.http() as http:
        err = assert_openai_error(http.post("/v1/job_batches", json={"requests": [body(api), bad]}), 400,
                                  "unsupported_content")
    assert err["param"].startswith("requests[1]") and err["message"].startswith("requests[1]")
    after = api.stack.store.stats()
    assert sum(after.values()) == sum(stats.values())  # nothing was recorded
