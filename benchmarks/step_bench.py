"""The decoder's RMSNorms inside the int8 CUDA GEMVs (``kernels.NORM_IN_GEMV``) against their own launches.

    python -m benchmarks.step_bench [--skip checks,model,step] [--positions 300,700] [--rounds 3]
                                    [--replays 40] [--model-repeats 1] [--json FILE]

Three parts, each skippable:

- ``checks``: per fused shape (``c_attn``, ``[w1 | w2]`` with the gate, ``lm_head`` after a norm,
  on ``kernels.NORM_TILES``; both ``c_proj`` before a residual add) and 1 and 2 rows of x: the
  fused GEMV against the separate launches (Triton ``rms_norm``, then the GEMV, then torch's add),
  bit for bit, and both against the same GEMV fed x normalised in float64 (rounded where the model
  rounds), in bf16 ulps; the normalised x itself, read back exactly through an identity weight
  (scale 1), against float64 and against ``rms_norm``'s; ten repeats, bit for bit.
- ``model``: the real Qwen-VL-Chat architecture (``config.json`` as :mod:`benchmarks.engine_bench`
  finds it) with random int8 weights: the 1-image prompt and 16 decode steps fed the eager
  model's greedy tokens, logits of the fast path with the norms inside the GEMVs and apart,
  against the eager int8 model's (relative error, greedy agreement) and each other;
  ``--model-repeats N``: each setting N times, every run against its first, bit for bit.
- ``step``: us per int8 decode graph replay at batch 1 and 2, each row's new token at each of
  ``--positions``, the norms apart (the tiles of ``kernels.CUDA_TILES``) and inside the GEMVs,
  interleaved ``--rounds`` times (the median).

Prints the card and versions first; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.attention_bench import ulps  # noqa: E402
from benchmarks.engine_bench import (  # noqa: E402
    DEVICE_DIR, SHARED, first_existing, forced_logits, llm_shapes, random_model, seed_prompt, show_environment)
from benchmarks.graph_tiles import add_step_options, step_table  # noqa: E402
from worker.engine.model import cuda_gemv, kernels  # noqa: E402
from worker.engine.model.args import QwenVLArgs  # noqa: E402
from worker.engine.model.fast import FastQwenVL  # noqa: E402
from worker.engine.model.quant import quantize_llm  # noqa: E402
from worker.engine.tokenizer import QwenTokenizer  # noqa: E402

EPS = 1e-6


def float64_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The decoder's RMSNorm with its sum of squares and rsqrt in float64, rounded where the model
    rounds (after the scaling, after the weight)."""
    xd = x.double()
    normed = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return (normed.double() * weight.double()).to(x.dtype)


def fused(x, q, scale, *, norm=None, residual=None, gated=False) -> torch.Tensor:
    """:func:`kernels.norm_linear` with the fusion, asserting it ran (not the separate launches)."""
    with kernels.norms_in_gemv(True):
        assert kernels.fuses_in_gemv(x, q, scale, norm=norm, residual=residual, gated=gated), \
            "the fused GEMV cannot run these operands here"
        y = kernels.norm_linear(x, q, scale, norm=norm, residual=residual, gated=gated)
    assert not cuda_gemv.disabled(), f"the CUDA GEMV was turned off: {cuda_gemv.disabled()}"
    return y


def separate(x, q, scale, *, norm=None, residual=None, gated=False) -> torch.Tensor:
    with kernels.norms_in_gemv(False):
        return kernels.norm_linear(x, q, scale, norm=norm, residual=residual, gated=gated)


def differing(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a != b).sum())


def check_shape(name: str, n: int, k: int, rows: int, device: torch.device) -> dict:
    gen = torch.Generator(device=device).manual_seed(n + rows)
    q, scale = kernels.quantize_int8(torch.randn(n, k, device=device, dtype=torch.bfloat16, generator=gen))
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16, generator=gen) * 3
    gated = name == "gate_up"
    row: dict = {"shape": name, "N": n, "K": k, "rows": rows}
    if name in ("c_proj", "down"):  # the residual add after the GEMV
        residual = torch.randn(rows, n, device=device, dtype=torch.bfloat16, generator=gen) * 3
        out = fused(x, q, scale, residual=residual)
        row["bits_equal_separate"] = torch.equal(out, separate(x, q, scale, residual=residual))
        row["repeats_bit_equal"] = all(torch.equal(fused(x, q, scale, residual=residual), out) for _ in range(10))
        return row
    weight = (1 + 0.2 * torch.randn(k, device=device, generator=gen)).to(torch.bfloat16)
    norm = (weight, EPS)
    out = fused(x, q, scale, norm=norm, gated=gated)
    apart = separate(x, q, scale, norm=norm, gated=gated)
    exact = kernels.gated_linear(float64_norm(x, weight), q, scale) if gated else \
        kernels.int8_linear(float64_norm(x, weight), q, scale)  # the same GEMV on x normalised in float64
    row["outputs_differing_from_separate"] = differing(out, apart)
    for label, y in (("fused", out), ("separate", apart)):
        row[f"{label}_outputs_differing_from_float64_norm"] = differing(y, exact)
        row[f"{label}_max_ulp_vs_float64_norm"] = float(ulps(y, exact.double()).max())
    row["repeats_bit_equal"] = all(torch.equal(fused(x, q, scale, norm=norm, gated=gated), out) for _ in range(10))
    return row


def check_normalised_x(k: int, rows: int, device: torch.device) -> dict:
    """The fused GEMV's normalised x, read back through an identity weight (every output is one
    bf16 value of x times 1): against float64 and against ``rms_norm``."""
    gen = torch.Generator(device=device).manual_seed(7 + rows)
    q = kernels.store_int8(torch.eye(k, device=device, dtype=torch.int8))
    scale = torch.ones(k, device=device)
    weight = (1 + 0.2 * torch.randn(k, device=device, generator=gen)).to(torch.bfloat16)
    trials = 20
    out = {"K": k, "rows": rows, "values": trials * rows * k, "differing_fused_vs_float64": 0,
           "differing_triton_vs_float64": 0, "differing_fused_vs_triton": 0}
    for trial in range(trials):  # magnitudes from 1e-3 to 1e3
        x = torch.randn(rows, k, device=device, dtype=torch.bfloat16, generator=gen) * 10.0 ** (trial % 7 - 3)
        mine = fused(x, q, scale, norm=(weight, EPS))
        triton, _ = kernels.rms_norm(x, weight, EPS)
        exact = float64_norm(x, weight)
        out["differing_fused_vs_float64"] += differing(mine, exact)
        out["differing_triton_vs_float64"] += differing(triton, exact)
        out["differing_fused_vs_triton"] += differing(mine, triton)
    return out


def checks(args: QwenVLArgs, device: torch.device) -> dict:
    shapes = llm_shapes(args)
    rows_out, xs = [], []
    for name in ("c_attn", "gate_up", "lm_head", "c_proj", "down"):
        n, k = shapes[name]
        for rows in (1, 2):  # the batch sizes whose GEMVs run on the CUDA GEMV (kernels.INT8_GEMV_BY_SHAPE)
            row = check_shape(name, n, k, rows, device)
            rows_out.append(row)
            print("  check " + ", ".join(f"{key} {value}" for key, value in row.items()), flush=True)
    for rows in (1, 2):
        row = check_normalised_x(args.llm.hidden_size, rows, device)
        xs.append(row)
        print("  normalised x " + ", ".join(f"{key} {value}" for key, value in row.items()), flush=True)
    return {"gemvs": rows_out, "normalised_x": xs}


def model_check(fast_of: dict, model, s: SimpleNamespace, feats: torch.Tensor, repeats: int = 1) -> dict:
    """Eager int8 greedy logits, then the fast path in each of two settings (contexts its graphs are
    captured in) fed the eager tokens, ``repeats`` times each (settings taking turns; every repeat
    against the first, step by step: a race would move bits)."""
    model.setup_cache(2, s.max_seq_len)
    eager, tokens = forced_logits(model, s, feats, None)
    out = {}
    logits = {}
    moved: dict[str, list] = {label: [] for label in fast_of}
    for repeat in range(repeats):
        for label, setting in fast_of.items():
            with setting():
                fast = FastQwenVL(model)
                fast.setup_cache(2, s.max_seq_len)
                got, _ = forced_logits(fast, s, feats, tokens)
                del fast
            first = logits.setdefault(label, got)
            steps = [i for i in range(len(got)) if not torch.equal(got[i], first[i])]
            if steps:
                moved[label].append({"repeat": repeat, "steps": steps})
    for label, got in logits.items():
        rel = [((got[i] - eager[i]).norm() / eager[i].norm()).item() for i in (0, 1)]
        out[label] = {"rel_err_vs_eager_prefill": rel[0], "rel_err_vs_eager_decode_1": rel[1],
                      "rel_err_vs_eager_worst_step": max(((got[i] - eager[i]).norm() / eager[i].norm()).item()
                                                          for i in range(len(got))),
                      "greedy_agree_with_eager": f"{int((got.argmax(-1) == eager.argmax(-1)).sum())}/{len(got)}",
                      "repeats": repeats, "repeats_differing_from_the_first": moved[label]}
        print(f"  model {label}: " + ", ".join(f"{k} {v}" for k, v in out[label].items()), flush=True)
    labels = list(logits)
    a, b = logits[labels[0]], logits[labels[1]]
    out["worst_rel_err_between"] = max(((a[i] - b[i]).norm() / b[i].norm()).item() for i in range(len(a)))
    out["bit_equal_between"] = torch.equal(a, b)
    print(f"  model {labels[0]} vs {labels[1]}: worst rel err {out['worst_rel_err_between']:.2e}, bit equal "
          f"{out['bit_equal_between']}", flush=True)
    return out


def step(model, positions: list[int], rounds: int, replays: int) -> dict:
    settings = {"norms apart": lambda: kernels.norms_in_gemv(False), "in GEMVs": lambda: kernels.norms_in_gemv(True)}
    fast = FastQwenVL(model)
    fast.setup_cache(2, 2048)
    return step_table(fast, "int8", settings, positions, rounds, replays)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_options(parser, positions="300,700")
    parser.add_argument("--skip", default="", help="comma-separated: checks, model, step")
    parser.add_argument("--model-repeats", type=int, default=1,
                        help="run the fast path this many times per setting in the model part (every run's logits "
                             "against the first's, bit for bit)")
    parser.add_argument("--json", type=Path, default=None)
    a = parser.parse_args(argv)
    device = torch.device("cuda")
    env = show_environment(device)
    skip = set(filter(None, a.skip.split(",")))
    args = QwenVLArgs.from_hf_config(first_existing(DEVICE_DIR / "config.json", SHARED / "qwen-vl" / "config.json"))
    result: dict = {"environment": env}
    if "checks" not in skip:
        result["checks"] = checks(args, device)
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
        result["model"] = model_check({"norms in GEMVs": lambda: kernels.norms_in_gemv(True),
                                       "norms apart": lambda: kernels.norms_in_gemv(False)}, model, s, feats,
                                      a.model_repeats)
    if "step" not in skip:
        result["step"] = step(model, a.positions, a.rounds, a.replays)
    result["cuda_gemv_disabled"] = cuda_gemv.disabled()
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 1 if cuda_gemv.disabled() else 0


if __name__ == "__main__":
    raise SystemExit(main())
