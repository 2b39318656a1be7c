from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from engine_build.tiny_model import TINY_CONFIG, random_state_dict
from producer.errors import CheckpointError
from worker.engine.model.args import QwenVLArgs
from worker.engine.model.checkpoint import load_model

VOCAB = 640


@pytest.fixture(scope="module")
def config() -> dict:
    config = json.loads(json.dumps(TINY_CONFIG))
    config["vocab_size"] = VOCAB
    config["visual"]["image_start_id"] = VOCAB - 8
    return config


@pytest.fixture(scope="module")
def weights(config) -> dict[str, torch.Tensor]:
    return random_state_dict(QwenVLArgs.from_hf_config(config), seed=3)


def write_folder(folder: Path, config: dict, state: dict[str, torch.Tensor], *, fmt: str = "safetensors",
                 shards: int = 1) -> Path:
    """A model folder in the HF layout: one file, or ``shards`` files and an index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    names = sorted(state)
    if shards == 1:
        groups = {("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin"): names}
    else:
        stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
        groups = {f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}": names[i::shards] for i in range(shards)}
        index = {"metadata": {}, "weight_map": {n: f for f, group in groups.items() for n in group}}
        (folder / f"{'model.safetensors' if fmt == 'safetensors' else 'pytorch_model.bin'}.index.json").write_text(
            json.dumps(index))
    for file_name, group in groups.items():
        part = {n: state[n].contiguous() for n in group}
        if fmt == "safetensors":
            save_file(part, str(folder / file_name))
        else:
            torch.save(part, folder / file_name)
    return folder


def assert_loaded(model, state):
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert torch.equal(loaded[name], tensor), name


@pytest.mark.parametrize(("fmt", "shards"), [("safetensors", 1), ("safetensors", 3), ("bin", 1), ("bin", 2)])
def test_every_weight_layout_loads_the_same_tensors(tmp_path, config, weights, fmt, shards):
    folder = write_folder(tmp_path / "m", config, weights, fmt=fmt, shards=shards)
    model = load_model(folder, "cpu", torch.float32)
    assert_loaded(model, weights)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_loading_in_bfloat16_converts_every_tensor(tmp_path, config, weights):
    model = load_model(write_folder(tmp_path / "m", config, weights), "cpu", torch.bfloat16)
    assert {t.dtype for t in model.state_dict().values()} == {torch.bfloat16}
    assert model.transformer.visual.pool_key_pos.dtype == torch.bfloat16
    with torch.no_grad():
        assert model.encode_images(torch.zeros(1, 3, 448, 448)).dtype == torch.bfloat16


def test_a_missing_tensor_is_named(tmp_path, config, weights):
    state = {k: v for k, v in weights.items() if k != "transformer.h.1.mlp.w2.weight"}
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.1\.mlp\.w2\.weight' \(shape \[256, 128\]\) is missing") as err:
        load_model(write_folder(tmp_path / "m", config, state), "cpu")
    assert err.value.code == "checkpoint_error"
    assert err.value.context["missing"] == ["transformer.h.1.mlp.w2.weight"]


def test_an_unexpected_tensor_is_named_with_its_file(tmp_path, config, weights):
    state = {**weights, "transformer.h.2.ln_1.weight": torch.ones(128)}
    folder = write_folder(tmp_path / "m", config, state, shards=2)
    with pytest.raises(CheckpointError, match=r"'transformer\.h\.2\.ln_1\.weight' in model-0000\d-of-00002\.safetensors"):
        load_model(folder, "cpu")


def test_a_wrongly_shaped_tensor_is_named_with_its_file_and_both_shapes(tmp_path, config, weights):
    state = {**weights, "transformer.visual.proj": torch.zeros(128, 64)}
    with pytest.raises(CheckpointError, match=r"'transformer\.visual\.proj' in model\.safetensors has shape "
                                              r"\[128, 64\], the model expects \[128, 128\]"):
        load_model(write_folder(tmp_path / "m", config, state), "cpu")


def test_known_non_persistent_buffers_in_a_checkpoint_are_ignored(tmp_path, config, weights):
    state = {**weights, "transformer.h.0.attn.masked_bias": torch.tensor(-1e4),
             "transformer.h.1.attn.rotary_emb.inv_freq": torch.ones(16), "transformer.rotary_emb.inv_freq": torch.ones(16)}
    assert_loaded(load_model(write_folder(tmp_path / "m", config, state, fmt="bin"), "cpu"), weights)


def test_an_index_naming_a_missing_shard_is_an_error(tmp_path, config, weights):
    folder = write_folder(tmp_path / "m", config, weights, shards=2)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors, which is not in"):
        load_model(folder, "cpu")


def test_an_index_placing_a_tensor_in_the_wrong_shard_is_an_error(tmp_path, config, weights):
    folder = write_folder(tmp_path / "m", config, weights, shards=2)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head.weight"] = (
        "model-00001-of-00002.safetensors" if index["weight_map"]["lm_head.weight"].startswith("model-00002")
        else "model-00002-of-00002.safetensors")
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"places tensor 'lm_head\.weight' in model-0000\d-of-00002\.safetensors, which lacks it"):
        load_model(folder, "cpu")


def test_a_folder_without_weights_or_config_says_what_it_expected(tmp_path, config):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(tmp_path / "nowhere", "cpu")
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(tmp_path, "cpu")
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="expected one of model.safetensors.index.json, model.safetensors"):
        load_model(tmp_path, "cpu")


def test_a_corrupt_weight_file_is_a_checkpoint_error(tmp_path, config):
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path, "cpu")
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(tmp_path, "cpu")
