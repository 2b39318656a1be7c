"""A tiny random Qwen-VL-Chat checkpoint in the official layout, for tests and the demo.

    python -m engine_build.tiny_model --out DIR [--tokenizer PATH/qwen.tiktoken] [--seed N]

The folder has what a real Qwen-VL-Chat folder has: ``config.json`` with the real keys (small
dimensions, but the real 448 px / patch 14 / 256-query vision geometry and the real
``seq_length`` 2048, so dynamic NTK and logn attention are exercised by long prompts),
``generation_config.json``, ``tokenizer_config.json``, ``qwen.tiktoken`` and seeded random
``model.safetensors`` (bf16) under the official tensor names, plus ``vlq-manifest.json`` saying
what it is. The official remote code loads it unmodified.

With ``--tokenizer`` the real vocabulary is copied and ``vocab_size`` stays 151,936; without it a
small vocabulary is written (:mod:`engine_build.tiny_vocab`) and ``vocab_size`` covers its ranks
and the 217 special tokens, rounded up to a multiple of 128.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
from pathlib import Path

import torch

from engine_build.manifest import write_manifest
from worker.engine.model.args import QwenVLArgs
from worker.engine.model.qwen_vl import QwenVL
from worker.engine.model.vision import sincos_2d

N_SPECIAL_TOKENS = 217  # <|endoftext|>, <|im_start|>, <|im_end|>, 205 extras, 9 image/grounding tags
IMG_START_OFFSET = 214  # <img> is the 215th special token
VOCAB_MULTIPLE = 128  # rounds the real 151,643 ranks + 217 specials up to 151,936

# The real config.json's keys with the tiny model's values.
TINY_CONFIG = {
    "architectures": ["QWenLMHeadModel"],
    "attn_dropout_prob": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_qwen.QWenConfig",
        "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel",
    },
    "bf16": True,
    "emb_dropout_prob": 0.0,
    "fp16": False,
    "fp32": False,
    "hidden_size": 128,
    "initializer_range": 0.02,
    "intermediate_size": 512,
    "kv_channels": 32,
    "layer_norm_epsilon": 1e-06,
    "max_position_embeddings": 8192,
    "model_type": "qwen",
    "no_bias": True,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "onnx_safe": None,
    "rotary_emb_base": 10000,
    "rotary_pct": 1.0,
    "scale_attn_weights": True,
    "seq_length": 2048,
    "tie_word_embeddings": False,
    "tokenizer_type": "QWenTokenizer",
    "torch_dtype": "bfloat16",
    "transformers_version": "4.32.0",
    "use_cache": True,
    "use_dynamic_ntk": True,
    "use_flash_attn": "auto",
    "use_logn_attn": True,
    "visual": {
        "heads": 4,
        "image_size": 448,
        "image_start_id": 151857,
        "layers": 2,
        "mlp_ratio": 2.0,
        "output_dim": 128,
        "patch_size": 14,
        "width": 64,
    },
    "vocab_size": 151936,
}

GENERATION_CONFIG = {
    "chat_format": "chatml",
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "max_window_size": 6144,
    "max_new_tokens": 512,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.5,
    "transformers_version": "4.31.0",
}

TOKENIZER_CONFIG = {
    "model_max_length": 8192,
    "tokenizer_class": "QWenTokenizer",
    "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]},
}


def write_tiny_model(out: Path, tokenizer: Path | None = None, seed: int = 0) -> Path:
    """Write the tiny checkpoint folder ``out`` and return it.

    ``tokenizer`` is a ``qwen.tiktoken`` to copy (the real one keeps vocab 151,936); ``None``
    writes the tiny vocabulary. The same seed always gives the same weights.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    vocab_file = out / "qwen.tiktoken"
    if tokenizer is not None:
        shutil.copyfile(tokenizer, vocab_file)
    else:
        from engine_build.tiny_vocab import write_tiny_vocab

        write_tiny_vocab(vocab_file)
    n_ranks = _count_ranks(vocab_file)

    config = json.loads(json.dumps(TINY_CONFIG))
    config["vocab_size"] = math.ceil((n_ranks + N_SPECIAL_TOKENS) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    config["visual"]["image_start_id"] = n_ranks + IMG_START_OFFSET
    generation = dict(GENERATION_CONFIG, eos_token_id=n_ranks, pad_token_id=n_ranks)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", generation)
    _write_json(out / "tokenizer_config.json", TOKENIZER_CONFIG)

    state = random_state_dict(QwenVLArgs.from_hf_config(config), seed)
    save_weights(out, state)
    write_manifest(out, step="tiny_model", source=out, dtype="bfloat16", quantization="none",
                   build={"weights": "random", "seed": seed, "vocab_ranks": n_ranks,
                          "tokenizer": "copied" if tokenizer is not None else "tiny_vocab", "taught": []})
    return out


def random_state_dict(args: QwenVLArgs, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights (float32) under the official names, scaled so that activations stay
    near unit size and greedy decoding wanders rather than repeating one token."""
    with torch.device("meta"):
        model = QwenVL(args)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, meta in model.state_dict().items():
        state[name] = _init(name, tuple(meta.shape), args, gen)
    return state


def _init(name: str, shape: tuple[int, ...], args: QwenVLArgs, gen: torch.Generator) -> torch.Tensor:
    def normal(std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen) * std

    if name.endswith("attn_pool.pos_embed"):
        return sincos_2d(args.vision.output_dim, args.vision.query_grid)
    if name.endswith("wte.weight") or name.endswith("attn_pool.query"):
        return normal(1.0)
    if name == "lm_head.weight":
        return normal(2.0 / math.sqrt(shape[1]))  # logits of std ~2: clear greedy choices
    if name.endswith("positional_embedding"):
        return normal(0.5)
    is_norm = any(part in name for part in ("ln_", ".ln_")) and len(shape) == 1
    if is_norm:
        return (1.0 + normal(0.1)) if name.endswith("weight") else normal(0.05)
    if name.endswith("bias"):
        return normal(0.05)
    if name.endswith("visual.proj"):
        return normal(1.0 / math.sqrt(shape[0]))
    fan_in = math.prod(shape[1:])
    # Projections back into a residual stream get half the gain, so blocks refine rather than swamp.
    gain = 0.5 if name.endswith("c_proj.weight") or name.endswith("out_proj.weight") else 1.0
    return normal(gain / math.sqrt(fan_in))


def save_weights(out: Path, state: dict[str, torch.Tensor]) -> None:
    """Save ``state`` as bf16 ``out/model.safetensors`` (the official dtype)."""
    from safetensors.torch import save_file

    tensors = {name: tensor.detach().to(torch.bfloat16).contiguous() for name, tensor in state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})


def _count_ranks(vocab_file: Path) -> int:
    with vocab_file.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine_build.tiny_model",
                                     description="Write a tiny random Qwen-VL-Chat checkpoint folder.")
    parser.add_argument("--out", required=True, type=Path, help="folder to write")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="qwen.tiktoken to copy (the real one keeps vocab 151,936); default: a tiny vocabulary")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    args = parser.parse_args(argv)
    if args.tokenizer is not None and not args.tokenizer.is_file():
        parser.error(f"--tokenizer {args.tokenizer} is not a file")
    out = write_tiny_model(args.out, tokenizer=args.tokenizer, seed=args.seed)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB, seed {args.seed})")


if __name__ == "__main__":
    main()
