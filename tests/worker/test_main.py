"""Worker start-up pieces: GPU pinning before torch, settings from the command line, node names."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from producer.config import Settings
from producer.errors import ConfigError
from worker.main import node_name, worker_settings


def test_the_gpu_is_pinned_before_torch_is_imported() -> None:
    code = ("import os, sys; from worker.main import pin_gpu; pin_gpu(3);"
            "assert 'torch' not in sys.modules; print(os.environ['CUDA_VISIBLE_DEVICES'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "3"


def test_pinning_after_torch_was_imported_is_refused() -> None:
    code = ("import torch; from worker.main import pin_gpu\n"
            "try:\n    pin_gpu(0)\nexcept Exception as e:\n    print(type(e).__name__, e.code)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ConfigError config_error"


def test_command_line_flags_override_the_settings(tmp_path: Path) -> None:
    s = worker_settings(Settings.load(), model_dir=tmp_path, queue="gpu-big", concurrency=7)
    assert (s.engine.model_dir, s.broker.queue, s.worker.concurrency) == (tmp_path, "gpu-big", 7)


def test_a_missing_model_folder_is_a_clear_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        worker_settings(Settings.load(), model_dir=tmp_path / "nope")
    with pytest.raises(ConfigError, match="--model"):
        worker_settings(Settings.load(engine={"model_dir": None}))
    (tmp_path / "photo.jpg").write_bytes(b"x")
    with pytest.raises(ConfigError, match="is a file: --model takes the model's folder"):
        worker_settings(Settings.load(), model_dir=tmp_path / "photo.jpg")


def test_a_gpu_asked_for_is_never_quietly_the_cpu(tmp_path: Path) -> None:
    assert worker_settings(Settings.load(), model_dir=tmp_path, gpu=0).engine.device == "cuda"
    assert worker_settings(Settings.load(), model_dir=tmp_path).engine.device == "auto"
    with pytest.raises(ConfigError, match="--gpu 0 asks for a GPU but engine.device is cpu"):
        worker_settings(Settings.load(engine={"device": "cpu"}), model_dir=tmp_path, gpu=0)


def test_node_names_are_unique_per_start() -> None:
    a, b = node_name(0), node_name(0)
    assert a != b and a.startswith("vlq-gpu0-") and node_name(None).startswith("vlq-cpu-")


@pytest.mark.parametrize(("level", "per_task_lines"), [("INFO", False), ("DEBUG", True)])
def test_celerys_per_task_lines_show_only_at_debug(level: str, per_task_lines: bool) -> None:
    probe = ("import logging; from worker.main import configure_logging, PER_TASK_LOGGERS; "
             f"configure_logging({level!r}); "
             "print([logging.getLogger(n).isEnabledFor(logging.INFO) for n in PER_TASK_LOGGERS], "
             "logging.getLogger('worker.tasks').isEnabledFor(logging.INFO), "
             "logging.getLogger('celery.app.trace').isEnabledFor(logging.ERROR))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert out == [f"[{per_task_lines},", f"{per_task_lines}]", "True", "True"]
