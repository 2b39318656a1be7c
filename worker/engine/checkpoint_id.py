"""A short id of the weights in a model folder, so that results can say which checkpoint wrote them.

Two checkpoints of the same architecture (the base model and a fine-tune, or two random tiny
ones) share their ``config.json`` and weight index, so the id also reads the weights: each
weight file's name and size and three 1 MiB samples of its bytes (start, middle, end). Training
changes every tensor, so a fine-tune differs in every sample; reading 3 MiB a file keeps this
to milliseconds where hashing a 19 GB checkpoint would take a minute.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SAMPLE_BYTES = 1 << 20
WEIGHT_PATTERNS = ("*.safetensors", "*.bin")


def checkpoint_id(model_dir: str | Path) -> str:
    """``<folder name>@<12 hex digits>`` for the config and weights in ``model_dir``."""
    folder = Path(model_dir)
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for path in sorted({p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern)}):
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as f:
            for start in sorted({0, max(0, size // 2 - SAMPLE_BYTES // 2), max(0, size - SAMPLE_BYTES)}):
                f.seek(start)
                digest.update(f.read(SAMPLE_BYTES))
    return f"{folder.name}@{digest.hexdigest()[:12]}"
