"""engine_build.convert_checkpoint: Hugging Face Qwen-VL-Chat -> TensorRT-LLM checkpoint (LLM only)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from engine_build import convert_checkpoint as cc
from engine_build.manifest import read_manifest
from producer.errors import CheckpointError
from worker.engine.model import load_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def converted(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt-bf16")
    assert cc.main(["--model-dir", str(tiny_model_dir), "--out", str(out), "--converter", "vlq",
                    "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def converted_fp32(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ckpt-fp32")
    cc.run(tiny_model_dir, out, dtype="float32", weight_only="none", converter="vlq", progress=False)
    return out


def test_the_tiny_checkpoint_converts_to_trtllm_names_shapes_and_dtype(converted: Path, tiny_model_dir: Path):
    config = json.loads((converted / "config.json").read_text())
    hf = json.loads((tiny_model_dir / "config.json").read_text())
    with safe_open(str(converted / "rank0.safetensors"), framework="pt") as f:
        shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
        dtypes = {f.get_tensor(name).dtype for name in f.keys()}
    assert shapes == cc.expected_shapes(config)
    assert dtypes == {torch.bfloat16}
    assert not any("visual" in name for name in shapes)
    hidden, layers = hf["hidden_size"], hf["num_hidden_layers"]
    assert shapes["transformer.layers.0.attention.qkv.weight"] == (3 * hidden, hidden)
    assert shapes["transformer.layers.0.mlp.fc.weight"] == (hf["intermediate_size"] // 2, hidden)
    assert f"transformer.layers.{layers - 1}.post_layernorm.weight" in shapes
    assert shapes["lm_head.weight"] == (hf["vocab_size"], hidden)


def test_the_config_is_tensorrt_llms_qwen_config(converted: Path, tiny_model_dir: Path):
    config = json.loads((converted / "config.json").read_text())
    hf = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architecture"] == "QWenForCausalLM"
    assert config["qwen_type"] == "qwen"
    assert config["dtype"] == "bfloat16"
    assert config["vocab_size"] == hf["vocab_size"]
    assert config["intermediate_size"] == hf["intermediate_size"]  # TensorRT-LLM halves it for qwen
    assert config["head_size"] == hf["kv_channels"]
    assert config["num_key_value_heads"] == config["num_attention_heads"] == hf["num_attention_heads"]
    assert config["position_embedding_type"] == "rope_gpt_neox"
    assert config["rotary_base"] == float(hf["rotary_emb_base"])
    assert config["norm_epsilon"] == hf["layer_norm_epsilon"]
    assert config["attn_bias"] is True and config["mlp_bias"] is False
    assert config["seq_length"] == hf["seq_length"] and config["use_logn_attn"] is True
    assert config["mapping"] == {"world_size": 1, "tp_size": 1, "pp_size": 1}
    assert config["quantization"] == {"quant_algo": None, "kv_cache_quant_algo": None}


def test_the_weight_map_is_a_table_covering_every_llm_tensor(tiny_model_dir: Path):
    names = [name for name, _ in cc.iter_llm_tensors(tiny_model_dir)]
    mapped = {cc.trtllm_name(name) for name in names} - {None}
    config = cc.trtllm_config(cc.read_hf_config(tiny_model_dir), "bfloat16")
    assert mapped == set(cc.expected_shapes(config))
    assert cc.trtllm_name("transformer.h.7.mlp.w1.weight") == "transformer.layers.7.mlp.gate.weight"
    assert cc.trtllm_name("transformer.h.7.mlp.w2.weight") == "transformer.layers.7.mlp.fc.weight"
    assert cc.trtllm_name("transformer.visual.conv1.weight") is None


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def trtllm_reference_logits(ckpt: Path, ids: list[int]) -> torch.Tensor:
    """Logits [T, vocab] of a TensorRT-LLM QWenForCausalLM checkpoint, computed the way
    TensorRT-LLM's layers define it (RmsNorm, fused qkv + bias, rope_gpt_neox, causal attention,
    dense, GatedMLP ``proj(act(fc(x)) * gate(x))``, ln_f, lm_head), in float32."""
    config = json.loads((ckpt / "config.json").read_text())
    w = {k: v.float() for k, v in load_file(str(ckpt / "rank0.safetensors")).items()}
    eps, heads, hd = config["norm_epsilon"], config["num_attention_heads"], config["head_size"]
    rot = config["rotary_embedding_dim"]
    t = len(ids)
    x = w["transformer.vocab_embedding.weight"][torch.tensor(ids)]  # [T, H]
    inv = 1.0 / (config["rotary_base"] ** (torch.arange(0, rot, 2).float() / rot))
    freqs = torch.arange(t).float()[:, None] * inv[None]  # [T, rot/2]
    cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]

    def rope(v: torch.Tensor) -> torch.Tensor:  # [T, heads, hd], rotate-half (gpt-neox) style
        r, rest = v[..., :rot], v[..., rot:]
        half = torch.cat([-r[..., rot // 2:], r[..., :rot // 2]], -1)
        return torch.cat([r * cos + half * sin, rest], -1)

    mask = torch.full((t, t), float("-inf")).triu(1)
    for layer in range(config["num_hidden_layers"]):
        p = f"transformer.layers.{layer}."
        h = _rms_norm(x, w[p + "input_layernorm.weight"], eps)
        qkv = h @ w[p + "attention.qkv.weight"].T + w[p + "attention.qkv.bias"]
        q, k, v = (part.reshape(t, heads, hd) for part in qkv.split(heads * hd, -1))
        q, k = rope(q), rope(k)
        scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(hd) + mask
        attn = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(t, heads * hd)
        x = x + attn @ w[p + "attention.dense.weight"].T
        h = _rms_norm(x, w[p + "post_layernorm.weight"], eps)
        inter = torch.nn.functional.silu(h @ w[p + "mlp.fc.weight"].T) * (h @ w[p + "mlp.gate.weight"].T)
        x = x + inter @ w[p + "mlp.proj.weight"].T
    x = _rms_norm(x, w["transformer.ln_f.weight"], eps)
    return x @ w["lm_head.weight"].T


def test_converted_weights_under_tensorrt_llm_semantics_reproduce_the_pytorch_model(
        converted_fp32: Path, tiny_model_dir: Path):
    model = load_model(tiny_model_dir, dtype=torch.float32)
    ids = [44, 548, 198, 210, 525, 264, 109, 178, 13]  # inside any tiny vocabulary's ranks
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0]  # [T, vocab]
    got = trtllm_reference_logits(converted_fp32, ids)
    assert torch.allclose(got, expected, atol=2e-4, rtol=1e-4), (got - expected).abs().max()


def test_swapping_gate_and_fc_would_be_caught_by_the_reference(converted_fp32: Path, tiny_model_dir: Path,
                                                                tmp_path: Path):
    swapped = tmp_path / "swapped"
    shutil.copytree(converted_fp32, swapped)
    w = load_file(str(swapped / "rank0.safetensors"))
    for layer in range(json.loads((swapped / "config.json").read_text())["num_hidden_layers"]):
        p = f"transformer.layers.{layer}.mlp."
        w[p + "gate.weight"], w[p + "fc.weight"] = w[p + "fc.weight"], w[p + "gate.weight"]
    save_file(w, str(swapped / "rank0.safetensors"))
    model = load_model(tiny_model_dir, dtype=torch.float32)
    ids = [5, 17, 42, 99, 7]
    with torch.no_grad():
        expected = model(torch.tensor([ids]))[0]
    assert not torch.allclose(trtllm_reference_logits(swapped, ids), expected, atol=1e-2)


def test_weight_only_int8_writes_a_w8a16_checkpoint_that_trtllm_build_quantises(tiny_model_dir: Path,
                                                                                 tmp_path: Path):
    out = tmp_path / "int8"
    cc.run(tiny_model_dir, out, dtype="bfloat16", weight_only="int8", converter="vlq", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["quant_algo"] == "W8A16"
    with safe_open(str(out / "rank0.safetensors"), framework="pt") as f:
        assert f.get_tensor("transformer.layers.0.attention.qkv.weight").dtype == torch.bfloat16
    manifest = read_manifest(out)
    assert manifest.quantization == "weight_only_int8"
    assert manifest.build["weights_quantized_at"] == "build"
    assert manifest.build["converter"] == "vlq"


def test_the_manifest_names_the_source_checkpoint(converted: Path, tiny_model_dir: Path):
    manifest = read_manifest(converted)
    assert manifest.step == "convert_checkpoint"
    assert manifest.source["path"] == str(tiny_model_dir.resolve())
    assert "config.json" in manifest.source["files"]
    assert manifest.dtype == "bfloat16" and manifest.quantization == "none"
    assert manifest.build["vision_weights"] == "excluded"
    assert manifest.command[:3] == ["python", "-m", "engine_build.convert_checkpoint"]


def _copy_with_weights(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    weights = load_file(str(dst / "model.safetensors"))
    edit(weights)
    save_file(weights, str(dst / "model.safetensors"))
    return dst


def test_an_unknown_tensor_is_refused(tiny_model_dir: Path, tmp_path: Path):
    bad = _copy_with_weights(tiny_model_dir, tmp_path / "bad",
                             lambda w: w.__setitem__("transformer.h.0.attn.q_proj.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match="q_proj"):
        cc.convert_checkpoint(bad, tmp_path / "out", progress=False)


def test_a_missing_tensor_is_refused(tiny_model_dir: Path, tmp_path: Path):
    bad = _copy_with_weights(tiny_model_dir, tmp_path / "bad", lambda w: w.pop("transformer.ln_f.weight"))
    with pytest.raises(CheckpointError, match="lacks 1 LLM tensors"):
        cc.convert_checkpoint(bad, tmp_path / "out", progress=False)


def test_a_wrongly_shaped_tensor_is_refused(tiny_model_dir: Path, tmp_path: Path):
    bad = _copy_with_weights(tiny_model_dir, tmp_path / "bad",
                             lambda w: w.__setitem__("lm_head.weight", w["lm_head.weight"][:-1].clone()))
    with pytest.raises(CheckpointError, match="lm_head.weight has shape"):
        cc.convert_checkpoint(bad, tmp_path / "out", progress=False)


def test_a_folder_that_is_not_qwen_vl_is_refused_with_exit_code_1(tmp_path: Path, capsys):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert cc.main(["--model-dir", str(tmp_path), "--out", str(tmp_path / "o"), "--converter", "vlq"]) == 1
    assert "not Qwen-VL-Chat" in capsys.readouterr().err


@pytest.mark.skipif(cc.tensorrt_llm_available(), reason="TensorRT-LLM is installed here")
def test_asking_for_tensorrt_llms_converter_without_it_says_how_to_install(tiny_model_dir: Path, tmp_path: Path,
                                                                         capsys):
    code = cc.main(["--model-dir", str(tiny_model_dir), "--out", str(tmp_path / "o"),
                    "--converter", "tensorrt_llm"])
    assert code == 1
    err = capsys.readouterr().err
    assert "pip install tensorrt_llm" in err and "--converter vlq" in err


def test_help_lists_every_flag():
    out = subprocess.run([sys.executable, "-m", "engine_build.convert_checkpoint", "--help"],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    for flag in ("--model-dir", "--out", "--dtype", "--weight-only", "--converter"):
        assert flag in out
    assert "int8" in out and "bfloat16" in out
