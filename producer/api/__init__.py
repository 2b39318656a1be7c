"""vlq's HTTP API: OpenAI chat completions, Files and Batches over the queue, plus job polling.
See :func:`producer.api.app.create_app` and docs/api.md."""

from producer.api.app import create_app

__all__ = ["create_app"]
