"""A probe, not a setting: the int8 GEMVs' last warps asking L2 for the next GEMV's first weights.

    python -m benchmarks.prefetch_probe [--sizes 0,2,4,8] [--positions 300,700] [--rounds 3]

In the int8 decode step three of a layer's five launches are followed by another GEMV (``c_proj``
-> ``[w1 | w2]`` -> MLP ``c_proj`` -> the next layer's ``c_attn``, or ``lm_head``). As a GEMV's
last warps finish they leave DRAM idle; here each of them asks L2 for its share of the first N MB
of the next GEMV's weights (``cp.async.bulk.prefetch.L2``, :func:`cuda_gemv.int8_gemv`'s
``prefetch``), so that the next launch starts on L2 hits. The decode graph is captured once per
size; its logits must equal those without prefetching bit for bit (a prefetch is a hint), and
its step is timed at batch 2 and 1, the sizes taking turns.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.engine_bench import DEVICE_DIR, SHARED, first_existing, random_model, show_environment  # noqa: E402
from benchmarks.graph_tiles import step_table  # noqa: E402
from worker.engine.model import cuda_gemv, kernels  # noqa: E402
from worker.engine.model.args import QwenVLArgs  # noqa: E402
from worker.engine.model.fast import FastQwenVL  # noqa: E402
from worker.engine.model.quant import quantize_llm  # noqa: E402

_bytes = [0]


def install(fast: FastQwenVL) -> None:
    """Route the CUDA GEMVs of ``fast``'s decode through one that prefetches the next weights."""
    layers = fast._layers
    plan = {}
    for i, layer in enumerate(layers):
        plan[layer.c_proj.qweight.data_ptr()] = layer.gate_up.qweight
        plan[layer.gate_up.qweight.data_ptr()] = layer.down.qweight
        plan[layer.down.qweight.data_ptr()] = (layers[i + 1].c_attn.qweight if i + 1 < len(layers)
                                               else fast.model.lm_head.qweight)
    original = kernels._int8_gemv_cuda

    def gemv(x, weight, scale, bias, tile, gated, norm=None, residual=None):
        nxt = plan.get(weight.data_ptr())
        if not _bytes[0] or nxt is None or not cuda_gemv.available(x, weight, scale, bias):
            return original(x, weight, scale, bias, tile, gated, norm, residual)
        return cuda_gemv.int8_gemv(x, weight, scale, bias, tile, gated, norm, residual, prefetch=(nxt, _bytes[0]))

    kernels._int8_gemv_cuda = gemv


@contextlib.contextmanager
def prefetching(size: int):
    _bytes[0], before = size, _bytes[0]
    try:
        yield
    finally:
        _bytes[0] = before


def logits_of(fast: FastQwenVL, batch: int, size: int, position: int = 300) -> torch.Tensor:
    with prefetching(size):
        fast._decode_graphs.pop(batch, None)
        fast._decode_graphs[batch] = fast._capture_decode(batch)
    device = fast.device
    tokens = torch.arange(1, batch + 1, device=device) * 1000
    positions = torch.full((batch,), position, device=device)
    return fast.decode(tokens, positions, torch.arange(batch, device=device)).clone()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="0,2,4,8", help="MB of the next weights to prefetch (0: none)")
    parser.add_argument("--positions", default="300,700")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replays", type=int, default=50)
    parser.add_argument("--batches", default="2,1")
    parser.add_argument("--kind", type=int, default=1, help="1: one bulk prefetch a warp, 2: a line a lane")
    a = parser.parse_args(argv)
    cuda_gemv.PREFETCH_KIND = a.kind
    device = torch.device("cuda")
    show_environment(device)
    args = QwenVLArgs.from_hf_config(first_existing(DEVICE_DIR / "config.json", SHARED / "qwen-vl" / "config.json"))
    model = random_model(args, device, torch.bfloat16)
    quantize_llm(model)
    torch.cuda.empty_cache()
    fast = FastQwenVL(model)
    fast.setup_cache(2, 2048)
    install(fast)
    sizes = [int(float(s) * 2**20) for s in a.sizes.split(",")]
    batches = tuple(int(b) for b in a.batches.split(","))
    with torch.inference_mode():
        for batch in batches:
            plain = logits_of(fast, batch, 0)
            for size in sizes[1:]:
                print(f"  batch {batch}, prefetch {size / 2**20:g} MB: logits bit-equal to none "
                      f"{bool(torch.equal(plain, logits_of(fast, batch, size)))}", flush=True)
        settings = {f"{size / 2**20:g} MB": (lambda size: lambda: prefetching(size))(size) for size in sizes}
        step_table(fast, "int8", settings, [int(p) for p in a.positions.split(",")], a.rounds, a.replays, batches)
    return 0 if not cuda_gemv.disabled() else 1


if __name__ == "__main__":
    raise SystemExit(main())
