"""Decode attention on the GPU: the CUDA kernel (``cuda_attention``) against the Triton one.

    python -m benchmarks.attention_bench [--tiles C,T,P,U;...] [--skip checks,alone,step]
                                         [--positions 300] [--rounds 3] [--replays 40] [--json FILE]

Three parts, each skippable:

- ``checks``: per case (1, 2 and 4 rows; new positions from 0 to 1,999, some at a range's edge;
  per-slot rotary frequencies, logn on and off) both kernels' outputs against float64 attention
  over the same rotated query and cache, in bf16 units (ulps) of the reference; the caches each
  wrote, compared bit for bit; ten repeats of the CUDA kernel, bit for bit.
- ``alone``: us per call (a CUDA graph of 20 calls) at 1 and 2 rows of 350 and 800 positions, for
  the Triton kernel and each CUDA tile (``--tiles``: cluster, threads, threads per position,
  unroll: :class:`~worker.engine.model.cuda_attention.AttentionTile`; the built-in
  :data:`kernels.ATTENTION_TILE` always).
- ``step``: the real Qwen-VL-Chat architecture (``config.json`` as :mod:`benchmarks.engine_bench`
  finds it) with random weights, bf16 then int8: us per decode graph replay at batch 1 and 2 with
  each kernel (and each ``--tiles`` tile), interleaved ``--rounds`` times (the median), each row's new
  token at each of ``--positions``.

Prints the card and versions first; ``--json`` writes every figure.
"""

from __future__ import annotations

import argparse
import json
import sys
from functools import partial
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.engine_bench import (  # noqa: E402
    DEVICE_DIR, SHARED, Clock, attention_alone, first_existing, random_model, show_environment)
from benchmarks.graph_tiles import add_step_options, step_table  # noqa: E402
from worker.engine.model import cuda_attention, cuda_gemv, kernels  # noqa: E402
from worker.engine.model.args import QwenVLArgs  # noqa: E402
from worker.engine.model.cuda_attention import AttentionTile  # noqa: E402
from worker.engine.model.decoder import rotary_inv_freq  # noqa: E402
from worker.engine.model.fast import FastQwenVL  # noqa: E402
from worker.engine.model.quant import quantize_llm  # noqa: E402

HEADS, D, BASE = 32, 128, 10000.0


def reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, positions: torch.Tensor,
              slots: torch.Tensor) -> torch.Tensor:
    """float64 attention of ``q [B, H, D]`` over each row's cache positions ``0 .. positions[b]`` ->
    ``[B, H * D]``."""
    rows = []
    for b in range(q.shape[0]):
        length = int(positions[b]) + 1
        k = k_cache[int(slots[b]), :, :length].double()  # [H, L, D]
        v = v_cache[int(slots[b]), :, :length].double()
        scores = torch.einsum("hd,hld->hl", q[b].double() * (q.shape[-1] ** -0.5), k)
        rows.append(torch.einsum("hl,hld->hd", scores.softmax(-1), v).reshape(-1))
    return torch.stack(rows)


def ulps(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|out - ref| in units of the last place of a bf16 at ``ref``'s magnitude."""
    exponent = torch.floor(torch.log2(ref.abs().clamp_min(2.0 ** -126)))
    return (out.double() - ref).abs() / torch.exp2(exponent - 7)


def check_case(batch: int, positions: list[int], logn_on: bool, tile: AttentionTile, device: torch.device) -> dict:
    """One case: both kernels against float64 math, their caches, ten CUDA repeats."""
    gen = torch.Generator(device=device).manual_seed(1000 * batch + positions[0])
    slots_n = max(batch, 2) + 1
    k_cache = torch.randn(slots_n, HEADS, 2048, D, device=device, dtype=torch.bfloat16, generator=gen)
    v_cache = torch.randn(slots_n, HEADS, 2048, D, device=device, dtype=torch.bfloat16, generator=gen)
    qkv = torch.randn(batch, 3 * HEADS * D, device=device, dtype=torch.bfloat16, generator=gen) * 2
    pos = torch.tensor(positions, device=device)
    slots = torch.arange(slots_n - 1, slots_n - 1 - batch, -1, device=device)  # not 0 .. B-1
    inv_freq = torch.stack([rotary_inv_freq(D, BASE, 1.0 + 0.3 * s, device) for s in range(slots_n)])
    logn = (1.0 + torch.rand(2048, device=device, generator=gen) * 0.3) if logn_on else None
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    q = kernels.rotary_to_cache(qkv, pos, slots, inv_freq, logn, ref_k, ref_v, HEADS)  # [B, H, D]
    ref = reference(q, ref_k, ref_v, pos, slots)
    assert cuda_attention.available(qkv, pos, slots, inv_freq, logn, k_cache, v_cache, HEADS, tile), \
        f"the CUDA kernel cannot run {tile} here"
    outs, caches = {}, {}
    for kernel in ("triton", "cuda"):
        k, v = k_cache.clone(), v_cache.clone()
        with kernels.attention_kernel(kernel, tile):
            outs[kernel] = kernels.rotary_attention(qkv, pos, slots, inv_freq, logn, k, v, HEADS)
        caches[kernel] = (k, v)
    repeats_equal = True
    for _ in range(10):
        k, v = k_cache.clone(), v_cache.clone()
        again = cuda_attention.rotary_attention(qkv, pos, slots, inv_freq, logn, k, v, HEADS, tile)
        repeats_equal &= bool(torch.equal(again, outs["cuda"]))
    row = {"batch": batch, "positions": positions, "logn": logn_on, "tile": list(tile),
           "repeats_bit_equal": repeats_equal}
    for kernel, out in outs.items():
        u = ulps(out, ref)
        row[f"{kernel}_max_ulp"] = float(u.max())
        row[f"{kernel}_mean_ulp"] = float(u.mean())
    row["caches_bit_equal"] = all(torch.equal(a, b) for a, b in zip(caches["cuda"], caches["triton"]))
    row["cache_matches_reference"] = all(torch.equal(a, b) for a, b in zip(caches["cuda"], (ref_k, ref_v)))
    for kernel, (k, v) in caches.items():  # where it differs from the rotary kernel's: (k/v, slot, head, pos, channel)
        wrong = [(name, *map(int, i)) for name, a, r in (("k", k, ref_k), ("v", v, ref_v))
                 for i in (a != r).nonzero()[:4]]
        row[f"{kernel}_cache_differs_at"] = wrong
    return row


def checks(tiles: list[AttentionTile], device: torch.device) -> list[dict]:
    cases = [(1, [0], False), (1, [1], True), (1, [7], False), (1, [284], True), (1, [349], False),
             (1, [799], True), (1, [1999], False), (2, [299, 300], True), (2, [0, 1000], False),
             (2, [63, 64], True), (4, [5, 300, 799, 1024], True)]
    rows = []
    for tile in tiles:
        for batch, positions, logn_on in cases:
            row = check_case(batch, positions, logn_on, tile, device)
            rows.append(row)
            print(f"  check {tuple(tile)} B={batch} pos={positions} logn={logn_on}: cuda max "
                  f"{row['cuda_max_ulp']:.2f} ulp (mean {row['cuda_mean_ulp']:.3f}), triton max "
                  f"{row['triton_max_ulp']:.2f} (mean {row['triton_mean_ulp']:.3f}); caches equal "
                  f"{row['caches_bit_equal']}, = reference rotary {row['cache_matches_reference']}; repeats equal "
                  f"{row['repeats_bit_equal']}", flush=True)
            if not row["cache_matches_reference"]:
                print(f"    cuda cache differs at {row['cuda_cache_differs_at']}; triton at "
                      f"{row['triton_cache_differs_at']}", flush=True)
    return rows


def alone(tiles: list[AttentionTile], device: torch.device) -> list[dict]:
    rows = []
    for kernel, tile in [("triton", None)] + [("cuda", t) for t in tiles]:
        def runs_cuda(*inputs, tile=tile):
            assert cuda_attention.available(*inputs, tile), f"the CUDA kernel cannot run {tile} here"

        with kernels.attention_kernel(kernel, tile):
            times = attention_alone(Clock(device), device, torch.bfloat16, HEADS, D, BASE,
                                    runs_cuda if kernel == "cuda" else None)
        rows += [{"kernel": kernel, "tile": list(tile) if tile else None, **r} for r in times]
        print(f"  alone {kernel} {tuple(tile) if tile else ''}: " + ", ".join(
            f"B={r['B']} L={r['length']} {r['us']:.2f} us ({r['GBps']:.0f} GB/s)" for r in times), flush=True)
    return rows


def step(tiles: list[AttentionTile], positions: list[int], rounds: int, replays: int, device: torch.device) -> dict:
    args = QwenVLArgs.from_hf_config(first_existing(DEVICE_DIR / "config.json", SHARED / "qwen-vl" / "config.json"))
    model = random_model(args, device, torch.bfloat16)
    settings = {"triton": lambda: kernels.attention_kernel("triton"),
                **{f"cuda {tuple(t)}": partial(kernels.attention_kernel, "cuda", t) for t in tiles}}
    out = {}
    for weights in ("bf16", "int8"):
        if weights == "int8":
            quantize_llm(model)
            torch.cuda.empty_cache()
        fast = FastQwenVL(model)
        fast.setup_cache(2, 2048)
        out.update(step_table(fast, weights, settings, positions, rounds, replays))
        del fast
        torch.cuda.empty_cache()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", default="", metavar="C,T,P,U;...", help="more CUDA tiles, ';'-separated")
    add_step_options(parser, positions="300")
    parser.add_argument("--skip", default="", help="comma-separated: checks, alone, step")
    parser.add_argument("--json", type=Path, default=None)
    a = parser.parse_args(argv)
    device = torch.device("cuda")
    env = show_environment(device)
    skip = set(filter(None, a.skip.split(",")))
    extra = [AttentionTile(*(int(v) for v in t.split(","))) for t in filter(None, a.tiles.split(";"))]
    tiles = list(dict.fromkeys([AttentionTile(*kernels.ATTENTION_TILE), *extra]))
    result: dict = {"environment": env}
    if "checks" not in skip:
        result["checks"] = checks(tiles, device)
    if "alone" not in skip:
        result["alone"] = alone(tiles, device)
    if "step" not in skip:
        result["step"] = step(tiles, a.positions, a.rounds, a.replays, device)
    off = cuda_gemv.disabled("attention")
    if off:
        print(f"  the CUDA kernel was turned off: {off}; the Triton kernel ran instead")
    result["cuda_disabled"] = off
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    return 1 if off else 0


if __name__ == "__main__":
    raise SystemExit(main())
