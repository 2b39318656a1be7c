"""vlq: the GPU side (Celery app and tasks, image intake, result stores, engines)."""
