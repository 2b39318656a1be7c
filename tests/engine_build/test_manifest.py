"""engine_build.manifest: provenance written beside every build output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine_build.manifest import (
    MANIFEST_FILE,
    read_manifest,
    safetensors_header_sha256,
    same_source,
    source_identity,
    write_manifest,
)
from producer.errors import CheckpointError


@pytest.fixture
def source(tmp_path: Path) -> Path:
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "qwen", "hidden_size": 8}))
    save_file({"w": torch.zeros(2, 3)}, str(folder / "model.safetensors"))
    return folder


def test_manifest_round_trips_with_source_hashes_flags_and_tool_versions(source: Path, tmp_path: Path):
    out = tmp_path / "out"
    path = write_manifest(out, step="build_vit", source=source, dtype="bfloat16", quantization="none",
                          build={"profile": {"min": 1, "opt": 13, "max": 26}}, tools={"tensorrt": "10.7.0"},
                          command=["python", "-m", "engine_build.build_vit"])
    assert path == out / MANIFEST_FILE
    manifest = read_manifest(out)
    assert manifest.step == "build_vit"
    assert manifest.dtype == "bfloat16" and manifest.quantization == "none"
    assert manifest.build["profile"] == {"min": 1, "opt": 13, "max": 26}
    assert manifest.tools["tensorrt"] == "10.7.0"
    assert manifest.tools["torch"] == torch.__version__
    assert manifest.tools["python"]
    assert manifest.vlq_version
    assert manifest.created.endswith("+00:00")
    assert manifest.command == ["python", "-m", "engine_build.build_vit"]
    assert manifest.source["path"] == str(source.resolve())
    assert set(manifest.source["files"]) == {"config.json", "model.safetensors#header"}
    assert same_source(manifest, source)


def test_a_changed_config_no_longer_matches_the_recorded_source(source: Path, tmp_path: Path):
    write_manifest(tmp_path / "out", step="convert_checkpoint", source=source, dtype="bfloat16",
                   quantization="none")
    (source / "config.json").write_text(json.dumps({"model_type": "qwen", "hidden_size": 16}))
    assert not same_source(read_manifest(tmp_path / "out"), source)


def test_a_single_shard_is_identified_by_its_header_not_its_data(source: Path, tmp_path: Path):
    shard = source / "model.safetensors"
    before = safetensors_header_sha256(shard)
    save_file({"w": torch.ones(2, 3)}, str(shard))  # same names and shapes, new values
    assert safetensors_header_sha256(shard) == before
    save_file({"w": torch.ones(3, 3)}, str(shard))  # a new shape changes the header
    assert safetensors_header_sha256(shard) != before


def test_an_index_identifies_sharded_weights(tmp_path: Path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}))
    assert set(source_identity(folder)["files"]) == {"config.json", "model.safetensors.index.json"}


def test_a_folder_without_a_manifest_says_which_step_writes_one(tmp_path: Path):
    with pytest.raises(CheckpointError, match="engine_build.convert_checkpoint"):
        read_manifest(tmp_path)


def test_a_malformed_manifest_is_a_checkpoint_error(tmp_path: Path):
    (tmp_path / MANIFEST_FILE).write_text(json.dumps({"step": "x", "manifest_version": 99}))
    with pytest.raises(CheckpointError, match="not a vlq manifest"):
        read_manifest(tmp_path)


def test_a_source_that_is_not_a_checkpoint_is_refused(tmp_path: Path):
    with pytest.raises(CheckpointError, match="does not exist"):
        source_identity(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        source_identity(tmp_path)
