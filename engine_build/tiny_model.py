"""A tiny random Qwen-VL-Chat checkpoint in the official layout, for tests and the demo.

    python -m engine_build.tiny_model --out DIR [--tokenizer PATH/qwen.tiktoken] [--seed N]
                                      [--teach EXAMPLES.jsonl]

The folder has what a real Qwen-VL-Chat folder has: ``config.json`` with the real keys (small
dimensions, but the real 448 px / patch 14 / 256-query vision geometry and the real
``seq_length`` 2048, so dynamic NTK and logn attention are exercised by long prompts),
``generation_config.json``, ``tokenizer_config.json``, ``qwen.tiktoken`` and seeded random
``model.safetensors`` (bf16) under the official tensor names, plus ``vlq-manifest.json`` saying
what it is. The official remote code loads it unmodified.

With ``--tokenizer`` the real vocabulary is copied and ``vocab_size`` stays 151,936; without it a
small vocabulary is written (:mod:`engine_build.tiny_vocab`) and ``vocab_size`` covers its ranks
and the 217 special tokens, rounded up to a multiple of 128.

Random weights never answer anything useful; :func:`teach` (``--teach``) fine-tunes the decoder
on a few ``{"request": <chat request>, "answer": "<text>"}`` examples until greedy decoding
reproduces each answer exactly, so that integration tests and the demo can get, say, a real
grounding answer ``<ref>女生</ref><box>(441,382),(733,811)</box>`` out of the whole pipeline.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import torch
import torch.nn.functional as F

from engine_build.manifest import read_manifest, readable_by_all, write_manifest
from producer.errors import InvalidRequest
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
    readable_by_all(out / "model.safetensors")


def _count_ranks(vocab_file: Path) -> int:
    with vocab_file.open("rb") as f:
        return sum(1 for line in f if line.strip())


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# -- teaching -------------------------------------------------------------------------------------

GROUNDING_TAG = re.compile(r"(</?(?:ref|box|quad)>)")
TEACH_MARGIN = 2.0  # logits by which each answer token must beat the runner-up before saving


@dataclass
class _Example:
    ids: torch.Tensor  # [1, P + A - 1]: prompt + answer without its last token (teacher forcing)
    prompt_len: int
    targets: torch.Tensor  # [A]: answer ids + <|im_end|>
    features: torch.Tensor | None  # [N, 256, hidden]
    image_slots: list[int]


def answer_ids(tokenizer, text: str) -> list[int]:
    """The ids the model should emit for ``text``: grounding tags as their special tokens (as the
    real model writes them), everything else as plain text, then ``<|im_end|>``."""
    ids: list[int] = []
    for piece in GROUNDING_TAG.split(text):
        if GROUNDING_TAG.fullmatch(piece):
            ids.append(tokenizer.special_id(piece))
        elif piece:
            ids += tokenizer.encode(piece)
    return ids + [tokenizer.im_end_id]


def load_examples(path: Path) -> list[dict]:
    """Read teaching examples from JSON lines ``{"request": {...}, "answer": "..."}``."""
    examples = []
    for lineno, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            example = json.loads(line)
        except ValueError as e:
            raise InvalidRequest(f"{path}:{lineno} is not JSON: {e}") from None
        if not isinstance(example, dict) or not isinstance(example.get("answer"), str) or "request" not in example:
            raise InvalidRequest(f'{path}:{lineno}: expected {{"request": {{...}}, "answer": "..."}}')
        examples.append(example)
    if not examples:
        raise InvalidRequest(f"{path} holds no examples")
    return examples


def teach(model_dir: Path, examples: Sequence[dict], steps: int = 400, seed: int = 0, lr: float = 5e-3,
          base_dir: Path | None = None) -> int:
    """Fine-tune the decoder of the checkpoint in ``model_dir`` until greedy decoding answers each
    example's request with exactly its answer (then ``<|im_end|>``); save the weights in place.

    Each example is ``{"request": <OpenAI chat request>, "answer": "<text>"}``; image URLs are file
    paths (``file://`` optional), relative ones resolved against ``base_dir`` (default: the current
    directory). Training is Adam on cross-entropy over the answer tokens only, teacher-forced through
    the cache-free forward, on the decoder blocks and final norm (the vision tower, the token
    embedding and the LM head stay as they are, which keeps each step cheap). Success is checked
    through ``prefill``/``decode`` with the weights rounded to bf16, as saved. Returns the steps
    taken; raises RuntimeError when ``steps`` do not suffice.
    """
    from producer.schema import parse_chat_request
    from worker.engine.model.checkpoint import load_model
    from worker.engine.prompt import build_prompt
    from worker.engine.tokenizer import QwenTokenizer

    model_dir = Path(model_dir)
    base_dir = Path.cwd() if base_dir is None else Path(base_dir)
    torch.manual_seed(seed)
    tokenizer = QwenTokenizer.from_model_dir(model_dir)
    model = load_model(model_dir, "cpu", torch.float32)
    batch = []
    for example in examples:
        prompt = build_prompt(parse_chat_request(_file_urls(example["request"])), tokenizer)
        targets = answer_ids(tokenizer, example["answer"])
        features = None
        if prompt.image_urls:
            pixels = _load_pixels(prompt.image_urls, base_dir)
            with torch.no_grad():
                features = model.encode_images(pixels)
        batch.append(_Example(torch.tensor([prompt.ids + targets[:-1]]), len(prompt.ids), torch.tensor(targets),
                              features, prompt.image_slots))

    decoder = model.transformer
    params = [*decoder.h.parameters(), *decoder.ln_f.parameters()]  # the big vocab tables stay fixed: fast
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(params, lr=lr)
    for step in range(1, steps + 1):
        loss, margin = torch.zeros(()), math.inf
        for ex in batch:
            hidden = decoder(decoder.embed(ex.ids, ex.features, ex.image_slots))  # [1, T, C]
            logits = model.lm_head(hidden[0, ex.prompt_len - 1:])  # [A, V]: each answer token's prediction
            loss = loss + F.cross_entropy(logits, ex.targets)
            margin = min(margin, _min_margin(logits.detach(), ex.targets))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if margin >= TEACH_MARGIN and _greedy_reproduces(model, batch):
            _round_to_bf16(model)
            if _greedy_reproduces(model, batch):
                save_weights(model_dir, model.state_dict())
                _record_teaching(model_dir, examples, step, seed)
                return step
    raise RuntimeError(f"teaching did not converge in {steps} steps; pass more steps or fewer examples")


def _min_margin(logits: torch.Tensor, targets: torch.Tensor) -> float:
    target = logits.gather(1, targets[:, None])[:, 0]
    runner_up = logits.scatter(1, targets[:, None], -math.inf).max(dim=1).values
    return (target - runner_up).min().item()


@torch.no_grad()
def _greedy_reproduces(model: QwenVL, batch: list[_Example]) -> bool:
    """Whether greedy prefill + decode yields each example's targets exactly."""
    for ex in batch:
        prompt = ex.ids[0, :ex.prompt_len]
        model.setup_cache(1, ex.prompt_len + len(ex.targets))
        logits = model.prefill(prompt, 0, ex.features, ex.image_slots)
        for i, want in enumerate(ex.targets.tolist()):
            if int(logits.argmax()) != want:
                return False
            if i + 1 < len(ex.targets):
                logits = model.decode(torch.tensor([want]), torch.tensor([ex.prompt_len + i]), torch.tensor([0]))[0]
    return True


@torch.no_grad()
def _round_to_bf16(model: QwenVL) -> None:
    for p in model.parameters():
        p.copy_(p.to(torch.bfloat16).float())


def _load_pixels(urls: Sequence[str], base_dir: Path) -> torch.Tensor:
    from PIL import Image

    from worker.engine.model.preprocess import preprocess_images

    images = []
    for url in urls:
        path = Path(unquote(url[len("file://"):]) if url.startswith("file://") else url)
        path = path if path.is_absolute() else base_dir / path
        if not path.is_file():
            raise InvalidRequest(f"teaching image {url} not found (looked at {path}); use file paths")
        with Image.open(path) as image:
            image.load()
            images.append(image)
    return preprocess_images(images)


def _file_urls(request: dict) -> dict:
    """``request`` with each image given as a bare path turned into a ``file://`` URL (teaching
    files name images by path; a chat request needs a URL)."""
    from producer.schema import IMAGE_URL_SCHEMES

    def part(p: Any) -> Any:
        url = (p.get("image_url") or {}).get("url") if isinstance(p, dict) and p.get("type") == "image_url" else None
        if isinstance(url, str) and url and not url.lower().startswith(IMAGE_URL_SCHEMES):
            return {**p, "image_url": {**p["image_url"], "url": "file://" + url}}
        return p

    messages = [{**m, "content": [part(p) for p in m["content"]]} if isinstance(m, dict)
                and isinstance(m.get("content"), list) else m for m in request.get("messages") or []]
    return {**request, "messages": messages}


def _record_teaching(model_dir: Path, examples: Sequence[dict], steps: int, seed: int) -> None:
    build = dict(read_manifest(model_dir).build)
    build["weights"] = "random, taught"
    build["taught"] = [*build.get("taught", []),
                       {"answers": [ex["answer"] for ex in examples], "steps": steps, "seed": seed,
                        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}]
    write_manifest(model_dir, step="tiny_model", source=model_dir, dtype="bfloat16", quantization="none", build=build)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine_build.tiny_model",
                                     description="Write a tiny random Qwen-VL-Chat checkpoint folder.")
    parser.add_argument("--out", required=True, type=Path, help="folder to write")
    parser.add_argument("--tokenizer", type=Path, default=None,
                        help="qwen.tiktoken to copy (the real one keeps vocab 151,936); default: a tiny vocabulary")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    parser.add_argument("--teach", type=Path, default=None, metavar="EXAMPLES.jsonl",
                        help='then fine-tune until greedy answers reproduce these {"request", "answer"} lines '
                             "(image paths relative to the file)")
    parser.add_argument("--teach-steps", type=int, default=400, help="most optimiser steps for --teach")
    args = parser.parse_args(argv)
    if args.tokenizer is not None and not args.tokenizer.is_file():
        parser.error(f"--tokenizer {args.tokenizer} is not a file")
    examples = None
    if args.teach is not None:
        if not args.teach.is_file():
            parser.error(f"--teach {args.teach} is not a file")
        try:
            examples = load_examples(args.teach)
        except InvalidRequest as e:
            parser.error(e.message)
    out = write_tiny_model(args.out, tokenizer=args.tokenizer, seed=args.seed)
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file())
    print(f"wrote {out} ({size / 1e6:.1f} MB, seed {args.seed})")
    if examples is not None:
        steps = teach(out, examples, steps=args.teach_steps, seed=args.seed, base_dir=args.teach.parent)
        print(f"taught {len(examples)} example(s) in {steps} steps: greedy answers now reproduce them")


if __name__ == "__main__":
    main()
