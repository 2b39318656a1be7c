"""``vlq`` command line. Command modules register themselves on :data:`producer.cli.app.app`.

Worker-side commands (``generate``, ``worker``) import torch only when they run, so the
producer's install keeps working without it.
"""

from producer.cli import api, annotate, export, generate, jobs, worker  # noqa: F401  (registration)
from producer.cli.app import app, main

__all__ = ["app", "main"]
