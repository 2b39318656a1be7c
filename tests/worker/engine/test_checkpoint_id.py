"""checkpoint_id tells checkpoints of one architecture apart by their weights, cheaply."""

from __future__ import annotations

from pathlib import Path

from worker.engine.checkpoint_id import SAMPLE_BYTES, checkpoint_id


def folder(root: Path, name: str, weights: bytes, config: bytes = b'{"hidden_size": 8}') -> Path:
    path = root / name
    path.mkdir()
    (path / "config.json").write_bytes(config)
    (path / "model.safetensors").write_bytes(weights)
    return path


def test_the_same_files_give_the_same_id_under_the_folders_name(tmp_path: Path) -> None:
    a = folder(tmp_path, "base", b"\x01" * 5000)
    assert checkpoint_id(a) == checkpoint_id(a)
    assert checkpoint_id(a).startswith("base@") and len(checkpoint_id(a)) == len("base@") + 12
    assert checkpoint_id(folder(tmp_path, "copy", b"\x01" * 5000)).split("@")[1] == checkpoint_id(a).split("@")[1]


def test_weights_of_the_same_size_and_config_that_differ_give_another_id(tmp_path: Path) -> None:
    size = 10 * SAMPLE_BYTES
    base = bytearray(size)
    tuned = bytearray(size)
    tuned[size // 2] = 1  # the middle sample: a fine-tune changes every tensor
    assert checkpoint_id(folder(tmp_path, "a", bytes(base))).split("@")[1] != \
        checkpoint_id(folder(tmp_path, "b", bytes(tuned))).split("@")[1]


def test_another_config_gives_another_id(tmp_path: Path) -> None:
    a = folder(tmp_path, "a", b"w", config=b'{"layers": 2}')
    b = folder(tmp_path, "b", b"w", config=b'{"layers": 3}')
    assert checkpoint_id(a).split("@")[1] != checkpoint_id(b).split("@")[1]
