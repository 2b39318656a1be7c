from __future__ import annotations

import json

import pytest
import torch

from producer.errors import ConfigError
from worker.engine.model.args import QwenVLArgs
from worker.engine.model.qwen_vl import QwenVL


@pytest.fixture
def real_config(shared_data):
    return json.loads((shared_data / "qwen-vl" / "config.json").read_text())


def test_real_config_gives_the_published_architecture(real_config):
    args = QwenVLArgs.from_hf_config(real_config)
    llm, vision = args.llm, args.vision
    assert (llm.vocab_size, llm.hidden_size, llm.num_layers, llm.num_heads) == (151936, 4096, 32, 32)
    assert (llm.head_dim, llm.mlp_dim, llm.rotary_dim) == (128, 11008, 128)
    assert (llm.seq_length, llm.rotary_emb_base, llm.layer_norm_eps) == (2048, 10000.0, 1e-6)
    assert llm.use_dynamic_ntk and llm.use_logn_attn and llm.no_bias and not llm.tie_word_embeddings
    assert (vision.grid_size, vision.num_patches, vision.head_dim, vision.mlp_width) == (32, 1024, 104, 8192)
    assert (vision.n_queries, vision.query_grid, vision.pool_heads, vision.output_dim) == (256, 16, 32, 4096)
    assert (vision.image_start_id, vision.image_end_id, vision.image_pad_id) == (151857, 151858, 151859)
    assert args.torch_dtype == "bfloat16"


def test_real_config_builds_the_published_parameter_counts(real_config):
    with torch.device("meta"):
        model = QwenVL(QwenVLArgs.from_hf_config(real_config))
    vit = sum(p.numel() for p in model.transformer.visual.parameters())
    resampler = sum(p.numel() for p in model.transformer.visual.attn_pool.parameters())
    llm = sum(p.numel() for p in model.parameters()) - vit
    assert vit == 1_935_610_624
    assert resampler == 76_054_528
    assert llm == 7_721_324_544


def test_config_loads_from_a_dict_a_file_or_its_folder(shared_data, real_config):
    folder = shared_data / "qwen-vl"
    assert QwenVLArgs.from_hf_config(folder) == QwenVLArgs.from_hf_config(folder / "config.json")
    assert QwenVLArgs.from_hf_config(folder) == QwenVLArgs.from_hf_config(real_config)


def test_a_missing_key_is_a_config_error_naming_it(real_config):
    del real_config["kv_channels"]
    with pytest.raises(ConfigError, match="kv_channels"):
        QwenVLArgs.from_hf_config(real_config)


def test_a_missing_config_file_says_where_it_looked(tmp_path):
    with pytest.raises(ConfigError, match="config.json") as err:
        QwenVLArgs.from_hf_config(tmp_path)
    assert err.value.code == "config_error"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kv_channels": 64}, "kv_channels"),
        ({"hidden_size": 2048, "kv_channels": 64}, "output_dim"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"vocab_size": 151000}, "image_start_id"),
    ],
)
def test_inconsistent_configs_are_refused_with_the_reason(real_config, change, message):
    real_config = {**real_config, **change}
    with pytest.raises(ConfigError, match=message):
        QwenVLArgs.from_hf_config(real_config)


def test_a_resampler_width_not_a_multiple_of_128_is_refused(real_config):
    real_config["visual"] = {**real_config["visual"], "output_dim": 4000}
    real_config["hidden_size"] = 4000
    with pytest.raises(ConfigError, match="multiple of 128"):
        QwenVLArgs.from_hf_config(real_config)
