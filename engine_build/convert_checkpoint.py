"""Convert a Hugging Face Qwen-VL-Chat folder into a TensorRT-LLM checkpoint (the LLM half only).

    python -m engine_build.convert_checkpoint --model-dir HF_DIR --out DIR \\
        [--dtype bfloat16|float16|float32] [--weight-only none|int8|int4] \\
        [--converter auto|tensorrt_llm|vlq]

The output is what ``trtllm-build --checkpoint_dir DIR`` reads: ``config.json`` (a
``QWenForCausalLM`` pretrained config) and ``rank0.safetensors`` (TensorRT-LLM weight names),
plus ``vlq-manifest.json``. The vision tower (``transformer.visual.*``) never enters it; it
becomes its own TensorRT engine (``engine_build.build_vit``).

Two converters write the same format:

- ``tensorrt_llm`` (the default where TensorRT-LLM imports): TensorRT-LLM's own Qwen conversion,
  as its ``examples/qwen/convert_checkpoint.py`` runs it in v0.16: ``load_hf_qwen`` (transformers
  with the folder's remote code) then ``QWenForCausalLM.from_hugging_face(...)`` and
  ``save_checkpoint``. Weight-only layers are quantised here into the kernel layout.
- ``vlq`` (anywhere, no GPU): renames the tensors by :data:`LAYER_WEIGHT_MAP` /
  :data:`GLOBAL_WEIGHT_MAP` and writes the config itself. With ``--weight-only int8|int4`` the
  config says ``W8A16``/``W4A16`` and the linear weights stay in ``--dtype``: TensorRT-LLM
  quantises such weights when ``trtllm-build`` loads the checkpoint
  (``PretrainedModel.from_checkpoint`` -> ``preprocess_weights`` -> ``weight_only_quantize_dict``
  quantises every ``qkv/dense/fc/proj/gate`` weight that is not int8 yet), on the build machine,
  for its GPU. The checkpoint is then twice the size of a pre-quantised one; the engine is the same.

Qwen (v1) specifics, as TensorRT-LLM's ``models/qwen`` has them: ``c_attn`` is already the fused
q|k|v projection with bias; ``mlp.w1`` is the gate (multiplied) and ``mlp.w2`` the activated
branch (``fc``): ``c_proj(w1(x) * silu(w2(x)))`` = ``proj(gate(x) * silu(fc(x)))``; the config's
``intermediate_size`` (22016) is twice the MLP width and TensorRT-LLM halves it for
``qwen_type == "qwen"``. TensorRT-LLM has no dynamic-NTK RoPE for Qwen v1 (it reads
``rope_scaling``, which Qwen-VL's config lacks), so past ``seq_length`` (2048) tokens the engine
and the PyTorch backend diverge; ``use_logn_attn`` is passed on for versions that implement it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from engine_build.manifest import readable_by_all, write_manifest
from producer.errors import CheckpointError, VlqError

DTYPES = ("bfloat16", "float16", "float32")
WEIGHT_ONLY = {"none": None, "int8": "W8A16", "int4": "W4A16"}
CONVERTERS = ("auto", "tensorrt_llm", "vlq")

# Hugging Face Qwen-VL-Chat name -> TensorRT-LLM name; "{i}" is the decoder layer index.
LAYER_WEIGHT_MAP: tuple[tuple[str, str], ...] = (
    ("transformer.h.{i}.ln_1.weight", "transformer.layers.{i}.input_layernorm.weight"),
    ("transformer.h.{i}.attn.c_attn.weight", "transformer.layers.{i}.attention.qkv.weight"),
    ("transformer.h.{i}.attn.c_attn.bias", "transformer.layers.{i}.attention.qkv.bias"),
    ("transformer.h.{i}.attn.c_proj.weight", "transformer.layers.{i}.attention.dense.weight"),
    ("transformer.h.{i}.ln_2.weight", "transformer.layers.{i}.post_layernorm.weight"),
    ("transformer.h.{i}.mlp.w1.weight", "transformer.layers.{i}.mlp.gate.weight"),
    ("transformer.h.{i}.mlp.w2.weight", "transformer.layers.{i}.mlp.fc.weight"),
    ("transformer.h.{i}.mlp.c_proj.weight", "transformer.layers.{i}.mlp.proj.weight"),
)
GLOBAL_WEIGHT_MAP: tuple[tuple[str, str], ...] = (
    ("transformer.wte.weight", "transformer.vocab_embedding.weight"),
    ("transformer.ln_f.weight", "transformer.ln_f.weight"),
    ("lm_head.weight", "lm_head.weight"),
)
VISION_PREFIX = "transformer.visual."

_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")


def _layer_patterns() -> list[tuple[re.Pattern[str], str]]:
    out = []
    for hf, trt in LAYER_WEIGHT_MAP:
        regex = re.escape(hf).replace(re.escape("{i}"), r"(?P<i>\d+)")
        out.append((re.compile(f"^{regex}$"), trt))
    return out


_LAYER_PATTERNS = _layer_patterns()
_GLOBALS = dict(GLOBAL_WEIGHT_MAP)


def trtllm_name(hf_name: str) -> str | None:
    """The TensorRT-LLM name of an LLM tensor; None for vision tensors and rotary buffers.

    Raises :class:`CheckpointError` for any other name: an unknown tensor means the folder is not
    Qwen-VL-Chat and a silent skip would build a wrong engine.
    """
    if hf_name.startswith(VISION_PREFIX) or hf_name.endswith("rotary_emb.inv_freq"):
        return None
    if hf_name in _GLOBALS:
        return _GLOBALS[hf_name]
    for pattern, trt in _LAYER_PATTERNS:
        match = pattern.match(hf_name)
        if match:
            return trt.format(i=int(match["i"]))
    raise CheckpointError(f"unexpected tensor {hf_name!r}: not a Qwen-VL-Chat weight name")


# -- reading the Hugging Face folder ------------------------------------------------------------


def read_hf_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: --model-dir must be a Qwen-VL-Chat folder") from None
    except ValueError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from None
    if config.get("model_type") != "qwen" or "visual" not in config:
        raise CheckpointError(
            f"{path}: model_type {config.get('model_type')!r} without a 'visual' section is not "
            "Qwen-VL-Chat (expected model_type 'qwen' and a visual config)"
        )
    return config


def weight_files(model_dir: Path) -> list[Path]:
    """The weight shards of a Hugging Face folder, from its index or the single-file names."""
    for index_name in _INDEX_FILES:
        index = model_dir / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError) as e:
                raise CheckpointError(f"{index} is not a weight index: {e}") from None
            files = [model_dir / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index} names shards that are missing: {', '.join(missing)}")
            return files
    for name in _SINGLE_FILES:
        if (model_dir / name).is_file():
            return [model_dir / name]
    raise CheckpointError(
        f"no weights in {model_dir}: expected {' or '.join(_INDEX_FILES + _SINGLE_FILES)}"
    )


def iter_llm_tensors(model_dir: Path) -> Iterator[tuple[str, Any]]:
    """Yield ``(hf_name, tensor)`` for every non-vision tensor, one shard at a time."""
    import torch
    from safetensors import safe_open

    for path in weight_files(model_dir):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if not name.startswith(VISION_PREFIX):
                        yield name, f.get_tensor(name)
        else:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            for name, tensor in state.items():
                if not name.startswith(VISION_PREFIX):
                    yield name, tensor
            del state


# -- the TensorRT-LLM checkpoint ----------------------------------------------------------------


def trtllm_config(hf: dict[str, Any], dtype: str, weight_only: str = "none") -> dict[str, Any]:
    """TensorRT-LLM's ``config.json`` for ``QWenForCausalLM`` (the fields ``QWenConfig`` writes).

    Only keys every version since v0.12 accepts are written (``mapping`` and ``quantization``
    minimal, no ``moe`` section: ``QWenConfig`` builds the no-MoE default itself).
    """
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if weight_only not in WEIGHT_ONLY:
        raise CheckpointError(f"weight-only {weight_only!r} is not one of {', '.join(WEIGHT_ONLY)}")
    hidden = int(hf["hidden_size"])
    heads = int(hf["num_attention_heads"])
    head_size = int(hf.get("kv_channels", hidden // heads))
    rotary_pct = float(hf.get("rotary_pct", 1.0))
    return {
        "architecture": "QWenForCausalLM",
        "dtype": dtype,
        "logits_dtype": "float32",
        "vocab_size": int(hf["vocab_size"]),
        "hidden_size": hidden,
        "num_hidden_layers": int(hf["num_hidden_layers"]),
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "head_size": head_size,
        "hidden_act": "silu",
        "intermediate_size": int(hf["intermediate_size"]),
        "norm_epsilon": float(hf.get("layer_norm_epsilon", 1e-6)),
        "position_embedding_type": "rope_gpt_neox",
        "max_position_embeddings": int(hf.get("max_position_embeddings", 8192)),
        "rotary_embedding_dim": int(head_size * rotary_pct),
        "rotary_base": float(hf.get("rotary_emb_base", 10000.0)),
        "rotary_scaling": hf.get("rope_scaling"),
        "use_parallel_embedding": False,
        "embedding_sharding_dim": 0,
        "share_embedding_table": False,
        "qk_layernorm": False,
        "mapping": {"world_size": 1, "tp_size": 1, "pp_size": 1},
        "quantization": {"quant_algo": WEIGHT_ONLY[weight_only], "kv_cache_quant_algo": None},
        "qwen_type": "qwen",
        "mlp_bias": False,
        "attn_bias": True,
        "disable_weight_only_quant_plugin": False,
        "seq_length": int(hf.get("seq_length", 2048)),
        "use_logn_attn": bool(hf.get("use_logn_attn", False)),
        "moe_intermediate_size": 0,
        "moe_shared_expert_intermediate_size": 0,
        "tie_word_embeddings": bool(hf.get("tie_word_embeddings", False)),
    }


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor ``rank0.safetensors`` must hold for ``config``, with its shape."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    qkv = 3 * config["num_attention_heads"] * config["head_size"]
    mlp = config["intermediate_size"] // 2  # Qwen v1 stores twice the MLP width
    per_layer = {
        "input_layernorm.weight": (hidden,),
        "attention.qkv.weight": (qkv, hidden),
        "attention.qkv.bias": (qkv,),
        "attention.dense.weight": (hidden, config["num_attention_heads"] * config["head_size"]),
        "post_layernorm.weight": (hidden,),
        "mlp.gate.weight": (mlp, hidden),
        "mlp.fc.weight": (mlp, hidden),
        "mlp.proj.weight": (hidden, mlp),
    }
    shapes = {
        "transformer.vocab_embedding.weight": (vocab, hidden),
        "transformer.ln_f.weight": (hidden,),
        "lm_head.weight": (vocab, hidden),
    }
    for i in range(config["num_hidden_layers"]):
        for suffix, shape in per_layer.items():
            shapes[f"transformer.layers.{i}.{suffix}"] = shape
    return shapes


def convert_checkpoint(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    dtype: str = "bfloat16",
    weight_only: str = "none",
    progress: bool = True,
) -> Path:
    """The ``vlq`` converter: write ``config.json`` + ``rank0.safetensors`` into ``out_dir``.

    Raises :class:`CheckpointError` for a folder that is not Qwen-VL-Chat (unknown, missing or
    wrongly shaped tensors).
    """
    import torch
    from safetensors.torch import save_file

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = trtllm_config(read_hf_config(model_dir), dtype, weight_only)
    want = expected_shapes(config)
    torch_dtype = getattr(torch, dtype)

    weights: dict[str, torch.Tensor] = {}
    tensors = iter_llm_tensors(model_dir)
    if progress:
        from tqdm import tqdm

        tensors = tqdm(tensors, total=len(want), desc="convert", unit="tensor", file=sys.stderr)
    for hf_name, tensor in tensors:
        name = trtllm_name(hf_name)
        if name is None:
            continue
        if name not in want:
            raise CheckpointError(
                f"{hf_name} -> {name} is beyond the config's {config['num_hidden_layers']} layers"
            )
        if tuple(tensor.shape) != want[name]:
            raise CheckpointError(
                f"{hf_name} has shape {tuple(tensor.shape)}, config.json implies {want[name]}"
            )
        weights[name] = tensor.to(torch_dtype).contiguous()
    missing = sorted(set(want) - set(weights))
    if missing:
        raise CheckpointError(
            f"{model_dir} lacks {len(missing)} LLM tensors, e.g. {missing[0]} (as TensorRT-LLM name)"
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(out_dir / "rank0.safetensors"), metadata={"format": "pt"})
    readable_by_all(out_dir / "rank0.safetensors")
    (out_dir / "config.json").write_text(json.dumps(config, indent=4) + "\n")
    return out_dir


def convert_with_tensorrt_llm(model_dir: Path, out_dir: Path, *, dtype: str, weight_only: str) -> Path:
    """TensorRT-LLM's own Qwen conversion (v0.16 API; quantises weight-only layers itself)."""
    # v0.16's Qwen-VL recipe converts from the loaded HF model with the legacy converter.
    os.environ.setdefault("TRTLLM_DISABLE_UNIFIED_CONVERTER", "1")
    from tensorrt_llm.mapping import Mapping
    from tensorrt_llm.models import QWenForCausalLM
    from tensorrt_llm.models.modeling_utils import QuantConfig
    from tensorrt_llm.models.qwen.convert import load_hf_qwen
    from tensorrt_llm.quantization import QuantAlgo

    read_hf_config(model_dir)  # refuse a non-Qwen-VL folder before loading 19 GB
    if not (model_dir / "modeling_qwen.py").is_file():
        raise CheckpointError(
            f"{model_dir} has no modeling_qwen.py: TensorRT-LLM's converter loads the model with "
            "transformers' remote code. Use the full Hugging Face folder, or --converter vlq"
        )
    quant = QuantConfig()
    if weight_only != "none":
        quant.quant_algo = getattr(QuantAlgo, WEIGHT_ONLY[weight_only])
    hf_model = load_hf_qwen(str(model_dir), True)  # (model_dir, load_model_on_cpu)
    mapping = Mapping(world_size=1, rank=0, tp_size=1, pp_size=1)
    qwen = QWenForCausalLM.from_hugging_face(hf_model, dtype, mapping=mapping, quant_config=quant)
    out_dir.mkdir(parents=True, exist_ok=True)
    qwen.save_checkpoint(str(out_dir), save_config=True)
    return out_dir


def tensorrt_llm_available() -> bool:
    try:
        import tensorrt_llm  # noqa: F401
    except Exception:  # ImportError, or a CUDA library missing underneath it
        return False
    return True


def run(model_dir: Path, out_dir: Path, *, dtype: str, weight_only: str, converter: str,
        progress: bool = True, command: list[str] | None = None) -> Path:
    """Convert, then write the manifest. Returns ``out_dir``."""
    if converter == "auto":
        converter = "tensorrt_llm" if tensorrt_llm_available() else "vlq"
    if converter == "tensorrt_llm":
        if not tensorrt_llm_available():
            raise CheckpointError(
                "--converter tensorrt_llm needs TensorRT-LLM: pip install tensorrt_llm==0.16.0 "
                "--extra-index-url https://pypi.nvidia.com (or use --converter vlq)"
            )
        convert_with_tensorrt_llm(model_dir, out_dir, dtype=dtype, weight_only=weight_only)
    else:
        convert_checkpoint(model_dir, out_dir, dtype=dtype, weight_only=weight_only, progress=progress)
    quantized_at = "build" if (converter == "vlq" and weight_only != "none") else "convert"
    write_manifest(
        out_dir,
        step="convert_checkpoint",
        source=model_dir,
        dtype=dtype,
        quantization=f"weight_only_{weight_only}" if weight_only != "none" else "none",
        build={
            "converter": converter,
            "quant_algo": WEIGHT_ONLY[weight_only],
            "weights_quantized_at": quantized_at if weight_only != "none" else None,
            "vision_weights": "excluded",
        },
        command=command,
    )
    return out_dir


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m engine_build.convert_checkpoint",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Next: python -m engine_build.build_llm --checkpoint-dir DIR --output-dir ENGINES/llm",
    )
    parser.add_argument("--model-dir", type=Path, required=True, help="Hugging Face Qwen-VL-Chat folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder (TensorRT-LLM checkpoint)")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weights and activations (default bfloat16)")
    parser.add_argument("--weight-only", choices=tuple(WEIGHT_ONLY), default="none",
                        help="weight-only quantisation of the decoder's linear layers (the seed: int8)")
    parser.add_argument("--converter", choices=CONVERTERS, default="auto",
                        help="auto: TensorRT-LLM's converter where it imports, else vlq's")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    try:
        run(args.model_dir, args.out, dtype=args.dtype, weight_only=args.weight_only,
            converter=args.converter, progress=not args.no_progress,
            command=["python", "-m", "engine_build.convert_checkpoint", *argv])
    except VlqError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 1
    print(f"wrote {args.out} in {time.monotonic() - started:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
