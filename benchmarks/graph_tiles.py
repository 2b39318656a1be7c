"""CUDA GEMV tiles timed where they run: inside the int8 decode graph.

    python -m benchmarks.graph_tiles [--batches 2] [--shapes c_attn,gate_up,down,c_proj,lm_head]
                                     [--replays 40] [--rounds 3] [--extra W,U,T[,S[,B]];...] [--only-extra]
                                     [--norm-tiles] [--json FILE]

:mod:`benchmarks.gemv_bench` times each GEMV alone, in a graph of calls to itself; inside the
decode step, between the RMSNorm and attention kernels, the same kernels run up to 4 us faster or
slower (docs/benchmarks.md, run 45), so a tile that wins alone need not win there. This builds the
real architecture (``config.json`` as :mod:`benchmarks.engine_bench` finds it) with random int8
weights and, per batch size and shape, in turn: captures the decode graph with each candidate
CUDA GEMV tile (:func:`benchmarks.gemv_bench.cuda_candidates`) for that shape, the shapes before
it on their best so far, and times graph replays (CUDA events; the median of ``--rounds`` runs
of ``--replays`` replays, candidates interleaved round by round). It prints each candidate's us
per step and, per batch size, the built-in tiles against the best, again interleaved. Every
built-in candidate's output is checked against float64 math by :mod:`benchmarks.gemv_bench`;
``--extra`` tiles are not: check a pick there before taking it. ``--norm-tiles`` tunes
``kernels.NORM_TILES`` instead, the tiles of the GEMVs that run the RMSNorm inside (give
``--shapes c_attn,gate_up,lm_head``); :mod:`benchmarks.step_bench` checks the built-in ones.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.engine_bench import (  # noqa: E402
    DEVICE_DIR, SHARED, first_existing, llm_shapes, random_model, show_environment)
from benchmarks.gemv_bench import cuda_candidates, int8_gemv  # noqa: E402
from worker.engine.model import kernels  # noqa: E402
from worker.engine.model.args import QwenVLArgs  # noqa: E402
from worker.engine.model.cuda_gemv import CudaTile  # noqa: E402
from worker.engine.model.fast import FastQwenVL  # noqa: E402
from worker.engine.model.quant import quantize_llm  # noqa: E402

POSITION = 300  # each row's new token: the seed's 285-token prompt plus a few decoded ones


def step_us(fast: FastQwenVL, batch: int, replays: int, position: int = POSITION) -> float:
    """Capture the batch's decode graph with the tiles set now, then us per replay (CUDA events),
    each row's new token at ``position``.
    The capture writes position 0 of the cache rows, which is why FastQwenVL does it only in
    setup_cache; here no answer is read, only the time."""
    fast._decode_graphs.pop(batch, None)
    torch.cuda.synchronize()
    fast._decode_graphs[batch] = fast._capture_decode(batch)
    device = fast.device
    tokens = torch.zeros(batch, dtype=torch.long, device=device)
    positions = torch.full((batch,), position, dtype=torch.long, device=device)
    slots = torch.arange(batch, device=device)
    for _ in range(3):
        fast.decode(tokens, positions, slots)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(replays):
        fast.decode(tokens, positions, slots)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / replays


def interleaved(fast: FastQwenVL, batch: int, settings: dict[str, Callable[[], AbstractContextManager]],
                replays: int, rounds: int, position: int = POSITION) -> dict[str, list[float]]:
    """us per step with each setting (a context the graph is captured in), the settings taking
    turns each round: every round's time, per setting."""
    runs: dict[str, list[float]] = {label: [] for label in settings}
    for _ in range(rounds):
        for label, setting in settings.items():
            with setting():
                runs[label].append(step_us(fast, batch, replays, position))
    return runs


def add_step_options(parser: argparse.ArgumentParser, positions: str) -> None:
    """The options of a :func:`step_table`: ``--positions`` (a list of ints), ``--rounds``, ``--replays``."""
    parser.add_argument("--positions", default=positions, type=lambda text: [int(p) for p in text.split(",")],
                        help="comma list: each row's new position in the step part")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--replays", type=int, default=40)


def step_table(fast: FastQwenVL, weights: str, settings: dict[str, Callable[[], AbstractContextManager]],
               positions: list[int], rounds: int, replays: int, batches: tuple[int, ...] = (1, 2)) -> dict:
    """:func:`interleaved` for each batch size and each row's new ``position``: ``{"<weights> batch
    B position P": {"median_us": {setting: us}, "runs": ...}}``, each line printed as it comes."""
    out = {}
    for batch in batches:
        for position in positions:
            runs = interleaved(fast, batch, settings, replays, rounds, position)
            median_us = medians(runs)
            out[f"{weights} batch {batch} position {position}"] = {"median_us": median_us, "runs": runs}
            print(f"  step {weights} batch {batch} position {position}: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in median_us.items()) + " us", flush=True)
    return out


def with_tiles(tiles: dict, table: str = "cuda") -> Callable[[], AbstractContextManager]:
    """The setting "the built-in GEMV choice with these ``CUDA_TILES``" (``table`` "norm": with
    these ``NORM_TILES``, the tiles of the GEMVs with the RMSNorm inside)."""
    if table == "norm":
        return lambda: kernels.norm_tiles(tiles)
    return lambda: int8_gemv(kernels.INT8_GEMV, dict(kernels.INT8_GEMV_BY_SHAPE), cuda_tiles=tiles)


def medians(runs: dict[str, list[float]]) -> dict[str, float]:
    return {label: statistics.median(times) for label, times in runs.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="2")
    parser.add_argument("--shapes", default="gate_up,c_attn,down,c_proj,lm_head")
    parser.add_argument("--replays", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--extra", default="", metavar="W,U,T[,S[,B]];W,U,T[,S[,B]]",
                        help="more candidate tiles (wrows, unroll, threads[, ksplit[, blocks_per_sm]]), "
                             "';'-separated")
    parser.add_argument("--norm-tiles", action="store_true",
                        help="tune NORM_TILES (the GEMVs with the RMSNorm inside: c_attn, gate_up, lm_head) instead "
                             "of CUDA_TILES")
    parser.add_argument("--only-extra", action="store_true",
                        help="try only the built-in tile and the --extra ones, not the standard candidates")
    a = parser.parse_args(argv)
    device = torch.device("cuda")
    show_environment(device)
    args = QwenVLArgs.from_hf_config(first_existing(DEVICE_DIR / "config.json", SHARED / "qwen-vl" / "config.json"))
    model = random_model(args, device, torch.bfloat16)
    quantize_llm(model)
    torch.cuda.empty_cache()
    fast = FastQwenVL(model)
    batches = [int(b) for b in a.batches.split(",")]
    fast.setup_cache(max(batches), 2048)
    shapes = llm_shapes(args)
    out: dict = {}
    extra = [CudaTile(*(int(v) for v in t.split(","))) for t in filter(None, a.extra.split(";"))]
    table = "norm" if a.norm_tiles else "cuda"
    for batch in batches:
        built_in = dict(kernels.NORM_TILES if a.norm_tiles else kernels.CUDA_TILES)
        best = dict(built_in)
        for name in a.shapes.split(","):
            n, k = shapes[name]
            key = (n, k, batch)
            if kernels.int8_gemv_variant(n, k, batch) != "cuda":
                print(f"batch {batch} {name}: not on the CUDA GEMV, skipped", flush=True)
                continue
            current = built_in.get(key, CudaTile())
            standard = [] if a.only_extra else cuda_candidates()
            candidates = {str(tuple(t)): {**best, key: t} for t in dict.fromkeys([current, *standard, *extra])}
            times = medians(interleaved(fast, batch,
                                        {label: with_tiles(tiles, table) for label, tiles in candidates.items()},
                                        a.replays, a.rounds))
            pick = min(times, key=times.get)
            best[key] = candidates[pick][key]
            out[f"batch {batch} {name}"] = times
            print(f"batch {batch} {name} {key}: built-in {tuple(current)} {times[str(tuple(current))]:.1f} us/step, "
                  f"best {pick} {times[pick]:.1f}", flush=True)
            for label, us in sorted(times.items(), key=lambda kv: kv[1])[:8]:
                print(f"    {label}: {us:.1f}", flush=True)
        final = medians(interleaved(fast, batch, {"built-in": with_tiles(built_in, table),
                                                  "best": with_tiles(best, table)}, a.replays, 2 * a.rounds))
        changed = {str(key): tuple(tile) for key, tile in best.items() if built_in.get(key) != tile}
        out[f"batch {batch} final"] = {**final, "changed": changed}
        print(f"batch {batch}: built-in {final['built-in']:.1f} us/step, best {final['best']:.1f}; changed {changed}",
              flush=True)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
