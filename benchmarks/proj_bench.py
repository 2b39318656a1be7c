"""The decode attention and its int8 ``c_proj`` in one launch (``kernels.ATTENTION_PROJ``) against two.

    python -m benchmarks.proj_bench [--skip checks,model,step] [--positions 300,700] [--rounds 3]
                                    [--replays 40] [--weights-at 0,1,2] [--json FILE]

Three parts, each skippable:

- ``checks``: the real layer's sizes (32 heads of 128, ``c_proj`` 4096 x 4096 int8), 1 and 2
  rows at several positions, logn on and off: the one launch (each ``--weights-at`` placement of
  the weight copies) against the CUDA attention followed by the CUDA GEMV with the residual add
  (on ``kernels.CUDA_TILES``), bit for bit, and the caches each writes; ten repeats, bit for bit.
- ``model``: the real Qwen-VL-Chat architecture with random int8 weights: the 1-image prompt and
  16 decode steps fed the eager model's greedy tokens, logits with the one launch and with two,
  against the eager int8 model's and each other (:func:`benchmarks.step_bench.model_check`).
- ``step``: us per int8 decode graph replay at batch 1 and 2, each row's new token at each of
  ``--positions``: two launches, and the one launch with each ``--weights-at``, interleaved
  ``--rounds`` times (the median).

Prints the card and versions first; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.attention_bench import BASE  # noqa: E402
from benchmarks.engine_bench import (  # noqa: E402
    DEVICE_DIR, SHARED, first_existing, random_model, seed_prompt, show_environment)
from benchmarks.graph_tiles import add_step_options, step_table  # noqa: E402
from benchmarks.step_bench import model_check  # noqa: E402
from worker.engine.model import cuda_attention_proj, cuda_gemv, kernels  # noqa: E402
from worker.engine.model.args import QwenVLArgs  # noqa: E402
from worker.engine.model.decoder import rotary_inv_freq  # noqa: E402
from worker.engine.model.fast import FastQwenVL  # noqa: E402
from worker.engine.model.quant import quantize_llm  # noqa: E402
from worker.engine.tokenizer import QwenTokenizer  # noqa: E402

HEADS, D = 32, 128
CASES = [(1, [300], True), (1, [0], True), (1, [1999], False), (2, [300, 301], True), (2, [700, 40], True),
         (2, [0, 1999], False)]


@contextmanager
def weights_at(where: int):
    """Compile the one launch with its weight copies put in flight at ``where`` (WEIGHTS_AT)."""
    saved = cuda_attention_proj.WEIGHTS_AT
    cuda_attention_proj.WEIGHTS_AT = where
    try:
        yield
    finally:
        cuda_attention_proj.WEIGHTS_AT = saved


def check_case(batch: int, positions: list[int], logn_on: bool, placements: list[int], device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(100 * batch + positions[0])
    slots_n = batch + 1
    k_cache = torch.randn(slots_n, HEADS, 2048, D, device=device, dtype=torch.bfloat16, generator=gen)
    v_cache = torch.randn(slots_n, HEADS, 2048, D, device=device, dtype=torch.bfloat16, generator=gen)
    qkv = torch.randn(batch, 3 * HEADS * D, device=device, dtype=torch.bfloat16, generator=gen) * 2
    pos = torch.tensor(positions, device=device)
    slots = torch.arange(slots_n - 1, slots_n - 1 - batch, -1, device=device)  # not 0 .. B-1
    inv_freq = torch.stack([rotary_inv_freq(D, BASE, 1.0 + 0.3 * s, device) for s in range(slots_n)])
    logn = (1.0 + torch.rand(2048, device=device, generator=gen) * 0.3) if logn_on else None
    c = HEADS * D
    q, scale = kernels.quantize_int8(torch.randn(c, c, device=device, dtype=torch.bfloat16, generator=gen))
    residual = torch.randn(batch, c, device=device, dtype=torch.bfloat16, generator=gen) * 3

    k_two, v_two = k_cache.clone(), v_cache.clone()
    with kernels.settings(ATTENTION_PROJ=False):
        attn = kernels.rotary_attention(qkv, pos, slots, inv_freq, logn, k_two, v_two, HEADS)
        two = kernels.norm_linear(attn, q, scale, residual=residual)
    row: dict = {"batch": batch, "positions": positions, "logn": logn_on}
    for where in placements:
        with weights_at(where):
            k_one, v_one = k_cache.clone(), v_cache.clone()
            one = kernels.attention_proj(qkv, pos, slots, inv_freq, logn, k_one, v_one, HEADS, q, scale, None, residual)
            assert one is not None, f"the one launch cannot run here ({cuda_gemv.disabled('proj')})"
            row[f"at{where}_bit_equal_two_launches"] = torch.equal(one, two)
            row[f"at{where}_outputs_differing"] = int((one != two).sum())
            row[f"at{where}_caches_bit_equal"] = torch.equal(k_one, k_two) and torch.equal(v_one, v_two)
            same = True
            for _ in range(10):
                k, v = k_cache.clone(), v_cache.clone()
                again = kernels.attention_proj(qkv, pos, slots, inv_freq, logn, k, v, HEADS, q, scale, None, residual)
                same &= bool(torch.equal(again, one))
            row[f"at{where}_repeats_bit_equal"] = same
    return row


def checks(placements: list[int], device: torch.device) -> list[dict]:
    rows = []
    for batch, positions, logn_on in CASES:
        row = check_case(batch, positions, logn_on, placements, device)
        rows.append(row)
        print("  check " + ", ".join(f"{key} {value}" for key, value in row.items()), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_options(parser, positions="300,700")
    parser.add_argument("--skip", default="", help="comma-separated: checks, model, step")
    parser.add_argument("--weights-at", default="0,1,2", type=lambda text: [int(p) for p in text.split(",")],
                        help="where the one launch puts its weight copies in flight (cuda_attention_proj.WEIGHTS_AT)")
    parser.add_argument("--json", type=Path, default=None)
    a = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="  %(name)s: %(message)s")
    logging.getLogger(cuda_attention_proj.__name__).setLevel(logging.INFO)  # whether its blocks fit
    device = torch.device("cuda")
    env = show_environment(device)
    print(f"  built-in WEIGHTS_AT {cuda_attention_proj.WEIGHTS_AT}, attention tile {tuple(kernels.ATTENTION_TILE)}",
          flush=True)
    skip = set(filter(None, a.skip.split(",")))
    result: dict = {"environment": env}
    if "checks" not in skip:
        result["checks"] = checks(a.weights_at, device)
    args = QwenVLArgs.from_hf_config(first_existing(DEVICE_DIR / "config.json", SHARED / "qwen-vl" / "config.json"))
    if not {"model", "step"} <= skip:
        model = random_model(args, device, torch.bfloat16)
        quantize_llm(model)
        torch.cuda.empty_cache()
    if "model" not in skip:
        tok = QwenTokenizer.from_file(first_existing(DEVICE_DIR / "qwen.tiktoken", SHARED / "qwen-vl" / "qwen.tiktoken"))
        ids, slot = seed_prompt(tok)
        s = SimpleNamespace(ids=ids, slot=slot, device=device, max_seq_len=2048)
        pixels = torch.randn(1, 3, args.vision.image_size, args.vision.image_size, device=device, dtype=torch.bfloat16)
        with torch.inference_mode():
            feats = model.encode_images(pixels)
        result["model"] = model_check({"one launch": lambda: kernels.settings(ATTENTION_PROJ=True),
                                       "two launches": lambda: kernels.settings(ATTENTION_PROJ=False)},
                                      model, s, feats)
    if "step" not in skip:
        settings = {"two launches": lambda: kernels.settings(ATTENTION_PROJ=False)}
        for where in a.weights_at:
            settings[f"one launch, weights at {where}"] = lambda where=where: weights_at(where)
        fast = FastQwenVL(model)
        fast.setup_cache(2, 2048)
        result["step"] = step_table(fast, "int8", settings, a.positions, a.rounds, a.replays)
    result["disabled"] = {kernel: cuda_gemv.disabled(kernel) for kernel in ("gemv", "attention", "proj")}
    print(f"  kernels turned off: {result['disabled']}", flush=True)
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 1 if any(result["disabled"].values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
