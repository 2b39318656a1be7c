"""Decode GEMVs on the device: the tensor-core ("dot") kernel, the Triton FMA GEMV and the CUDA C++
GEMVs (FMA, "cuda"; tensor cores, "mma"), per weight shape.

Used by :mod:`benchmarks.engine_bench` (its int8 section). For every LLM weight shape and 1 and 2
rows of x it

- checks each kernel's output against float64 math on the same int8 weights (error in bf16 units
  in the last place of the reference: a correctly rounded float32 sum is within 1), the FMA
  GEMV's fused split-K sum and gate against its separate launches, bit for bit, the CUDA GEMV's
  gate against torch's ``w1 * silu(w2)`` of its plain output, repeated calls against the first
  (a race would move bits), and the CUDA GEMV on shapes and row counts the layers do not have
  (:func:`cuda_edge_cases`);
- times each (CUDA graph of calls over copies bigger than L2) as us per call and GB/s of weight
  bytes, the FMA and CUDA GEMVs with each candidate tile;
- picks, per shape and row count, the fastest FMA and CUDA tiles that passed and the fastest of
  the three kernels: the tables the engine-level int8 decode variants run with.

bf16 weights get the same timing for one FMA tile (reported only: the bf16 default is unchanged).

Run alone, ``python -m benchmarks.gemv_bench`` prints that comparison for the real architecture's
shapes; ``--mma-only`` times the tensor-core CUDA GEMV's tiles against the built-in CUDA GEMV
tile only (docs/benchmarks.md, runs 34-43); ``--dot-sweep`` times the int8 tensor-core GEMV with
wider tiles than the built-in ones (:func:`dot_sweep`; runs 10 and 12).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from worker.engine.model import kernels
from worker.engine.model.kernels import CudaTile, FmaTile, MmaTile, cuda_gemv

ROWS = (1, 2)
L2_PAST_BYTES = 256e6  # weight copies rotated per timing: well past the 50 MB L2 of an H100
ULP_LIMIT = 1.0  # bf16 units in the last place of the float64 result


def fma_candidates(n: int, weight_bytes: int) -> list[FmaTile]:
    """FMA GEMV tiles tried for an ``[n, K]`` weight (``n``: output rows, or one half of a gated
    ``[w1 | w2]``): 16 or 32 bytes per thread and row; narrow shapes split K (4, and 2 for one
    tile)."""
    split = 1 if n >= 8192 else 4
    if weight_bytes == 2:
        return [FmaTile(16, 256, 4, split, False, "magic")]
    tiles = [FmaTile(16, 512, 4, split, False, "prmt"), FmaTile(16, 512, 4, split, False, "magic"),
             FmaTile(16, 512, 4, split, False, "i2f"), FmaTile(16, 512, 4, split, True, "prmt"),
             FmaTile(8, 512, 4, split, True, "prmt"), FmaTile(32, 512, 8, split, False, "prmt"),
             # 32 bytes per thread and row: twice the weight bytes in flight per program
             FmaTile(16, 1024, 4, split, False, "prmt"), FmaTile(8, 1024, 4, split, False, "prmt"),
             FmaTile(32, 1024, 8, split, False, "prmt")]
    if split > 1:
        tiles.append(FmaTile(16, 512, 4, 2, False, "prmt"))
    return tiles


def cuda_candidates() -> list[CudaTile]:
    """CUDA GEMV launch shapes tried for every shape: 1-8 output rows per warp, 1-16 loads of 16
    bytes per weight row and thread in flight, 32-256 threads a block, 1-4 warps per row group."""
    return [CudaTile(1, 4), CudaTile(1, 8), CudaTile(1, 16), CudaTile(2, 2), CudaTile(2, 4), CudaTile(2, 8),
            CudaTile(4, 1), CudaTile(4, 2), CudaTile(4, 4), CudaTile(8, 1), CudaTile(2, 8, 256), CudaTile(1, 8, 256),
            CudaTile(4, 2, 256), CudaTile(2, 1), CudaTile(1, 2), CudaTile(3, 2), CudaTile(2, 3), CudaTile(2, 2, 64),
            CudaTile(2, 2, 256), CudaTile(1, 1), CudaTile(1, 1, 64), CudaTile(1, 2, 64), CudaTile(1, 2, 256),
            CudaTile(1, 3), CudaTile(2, 1, 64), CudaTile(1, 1, 32), CudaTile(1, 2, 32), CudaTile(2, 1, 32),
            CudaTile(2, 2, 32), CudaTile(4, 1, 64), CudaTile(4, 2, 64), CudaTile(1, 4, 64), CudaTile(4, 1, 32),
            CudaTile(1, 1, 128, 2), CudaTile(1, 2, 128, 2), CudaTile(2, 2, 256, 4)]


def mma_candidates() -> list[MmaTile]:
    """Tensor-core CUDA GEMV launch shapes tried for every shape: 1-8 groups of 16 weight rows a
    block, K split over 1-16 warps a group, 1-8 chunks of 64 weights per row in flight."""
    return [MmaTile(1, 4, 1), MmaTile(1, 4, 2), MmaTile(1, 4, 4), MmaTile(1, 8, 1), MmaTile(1, 8, 2),
            MmaTile(2, 2, 2), MmaTile(2, 4, 2), MmaTile(2, 2, 4), MmaTile(4, 1, 2), MmaTile(4, 1, 4),
            MmaTile(2, 1, 4), MmaTile(4, 2, 2), MmaTile(8, 1, 2), MmaTile(1, 2, 4), MmaTile(2, 1, 2),
            MmaTile(4, 1, 1), MmaTile(1, 2, 2), MmaTile(2, 2, 1),
            # more warps a group: more bytes in flight, fewer chunks each
            MmaTile(1, 8, 4), MmaTile(1, 8, 8), MmaTile(2, 8, 2), MmaTile(1, 16, 1), MmaTile(1, 16, 2),
            MmaTile(1, 16, 4)]


def ulp_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    """Largest ``|y - ref|`` in bf16 units in the last place of ``ref`` (float64), with an
    absolute floor of 1e-5 of ``max |ref|`` for results that cancel to nearly zero."""
    ref = ref.double()
    ulp = torch.exp2(torch.floor(torch.log2(ref.abs().clamp_min(1e-30))) - 7)
    floor = 1e-5 * ref.abs().max()
    return ((y.double() - ref).abs() / (ulp + floor)).max().item()


def reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None, chunk: int = 16384) -> torch.Tensor:
    """``x @ (q * scale).T`` in float64, ``chunk`` weight rows at a time -> ``[M, N]`` (``q``: stored
    int8, :func:`kernels.store_int8`, or model-dtype weights)."""
    out = []
    for first in range(0, q.shape[0], chunk):
        w = q[first:first + chunk].double()
        if q.dtype == kernels.INT8_STORAGE:
            w = w - kernels.INT8_OFFSET
        if scale is not None:
            w = w * scale[first:first + chunk].double()[:, None]
        out.append(x.double() @ w.T)
    return torch.cat(out, dim=1)


def int8_gemv(default: str, by_shape: dict | None = None, tiles: dict | None = None, cuda_tiles: dict | None = None,
              mma_tiles: dict | None = None):
    """:func:`kernels.settings` with ``kernels.INT8_GEMV = default``, ``INT8_GEMV_BY_SHAPE =
    by_shape`` (none: empty) and the given tile tables (``FMA_TILES``, ``CUDA_TILES``,
    ``MMA_TILES``; none: unchanged), each a copy."""
    tables = {"FMA_TILES": tiles, "CUDA_TILES": cuda_tiles, "MMA_TILES": mma_tiles}
    return kernels.settings(INT8_GEMV=default, INT8_GEMV_BY_SHAPE=dict(by_shape or {}),
                            **{name: dict(table) for name, table in tables.items() if table is not None})


def triton_only(by_shape: dict) -> dict:
    """``by_shape`` (an ``INT8_GEMV_BY_SHAPE``) with each CUDA GEMV on the Triton kernel measured
    next fastest: the FMA GEMV at one row, the tensor cores at more."""
    return {key: ("fma" if key[2] == 1 else "dot") if variant in ("cuda", "mma") else variant
            for key, variant in by_shape.items()}


def _timed(graph_s: Callable[[list], float], fn, weights: list, x: torch.Tensor) -> float:
    """Seconds per call of ``fn(x, *weight)`` over the rotating ``weights``."""
    return graph_s([lambda w=w: fn(x, *w) for w in weights])


def repeat_check(call, repeats: int) -> tuple[torch.Tensor, dict]:
    """``call()``'s first answer, and how many of ``repeats`` more calls gave other bits."""
    first = call()
    moved = sum(not torch.equal(call(), first) for _ in range(repeats))
    return first, {"runs that differ": f"{moved}/{repeats}"}


def _gate_matches_torch(gate: torch.Tensor, plain: torch.Tensor) -> bool:
    """Whether a gated GEMV's output is torch's ``w1 * silu(w2)`` of the plain GEMV's halves."""
    f = plain.shape[1] // 2
    return torch.equal(gate, plain[:, :f] * torch.nn.functional.silu(plain[:, f:]))


def _fma_checks(x, q, scale, tile: FmaTile, gated: bool, repeats: int) -> dict:
    """The FMA GEMV's repeats, and its fused reductions against its separate launches, bit for bit."""
    first, out = repeat_check(lambda: kernels._gemv_fma(x, q, scale, None, tile, gated), repeats)
    if tile.split_k > 1:
        with kernels.fused_epilogues(False):
            separate = kernels._gemv_fma(x, q, scale, None, tile, gated)
        out["split-K sum equal to separate launch"] = torch.equal(first, separate)
    if gated:
        out["gate equal to silu_mul of the plain GEMV"] = torch.equal(
            first, kernels.silu_mul(kernels._gemv_fma(x, q, scale, None, tile)))
    return out


def _gate_checks(gemv: Callable) -> Callable:
    """The checks of a CUDA GEMV ``gemv(x, q, scale, bias, tile, gated)``: its repeats, and its
    gate against torch's ``w1 * silu(w2)`` of its plain output."""
    def checks(x, q, scale, tile, gated: bool, repeats: int) -> dict:
        first, out = repeat_check(lambda: gemv(x, q, scale, None, tile, gated), repeats)
        if gated:
            out["gate equal to torch's w1 * silu(w2) of the plain GEMV"] = _gate_matches_torch(
                first, gemv(x, q, scale, None, tile, False))
        return out
    return checks


# Per kernel family: the GEMV call (x, q, scale, tile, gated), the checks of its picked tile and
# the tile type.
FAMILIES = {
    "fma": (lambda x, q, s, t, gated=False: kernels._gemv_fma(x, q, s, None, t, gated), _fma_checks, FmaTile),
    "cuda": (lambda x, q, s, t, gated=False: cuda_gemv.int8_gemv(x, q, s, None, t, gated),
             _gate_checks(cuda_gemv.int8_gemv), CudaTile),
    "mma": (lambda x, q, s, t, gated=False: cuda_gemv.int8_gemv_mma(x, q, s, None, t, gated),
            _gate_checks(cuda_gemv.int8_gemv_mma), MmaTile),
}


def _family_row(family: str, candidates: list, graph_s, layers: list, x: torch.Tensor, ref: torch.Tensor,
                gated: bool, nbytes: int, label: str, checks: bool, repeats: int) -> dict:
    """Every candidate tile of one kernel family on one shape: its error against ``ref`` (the plain
    GEMV) and its time (gated when the shape is), as row entries ``{family: [...]}`` plus, for the
    fastest tile within :data:`ULP_LIMIT`, ``{family}_best / _us / _GBps / _max_ulp`` (and
    ``_checks`` when ``checks``)."""
    call, check, _ = FAMILIES[family]
    q, scale = layers[0]
    results = {}
    for tile in candidates:
        try:
            err = ulp_error(call(x, q, scale, tile), ref)
            results[tile] = (_timed(graph_s, lambda x_, w_, s_, t=tile: call(x_, w_, s_, t, gated), layers, x), err)
        except Exception as e:  # a tile that does not compile or launch here is not a candidate
            print(f"   {label} {family} {tuple(tile)}: {type(e).__name__}: {str(e)[:300]}", flush=True)
    row = {family: [{"tile": tuple(t), "us": r[0] * 1e6, "GBps": nbytes / r[0] / 1e9, "max_ulp": r[1],
                     "passed": r[1] <= ULP_LIMIT} for t, r in results.items()]}
    passing = {t: r for t, r in results.items() if r[1] <= ULP_LIMIT}
    if passing:
        best = min(passing, key=lambda t: passing[t][0])
        seconds, err = passing[best]
        row.update({f"{family}_best": tuple(best), f"{family}_us": seconds * 1e6, f"{family}_GBps": nbytes / seconds / 1e9,
                    f"{family}_max_ulp": err})
        if checks:
            row[f"{family}_checks"] = check(x, q, scale, best, gated, repeats)
    return row


def _tile_cases(gemv: Callable, x, q, scale, bias, ref, tile, label: str, gate: bool = True) -> dict[str, float]:
    """One tile of a CUDA GEMV ``gemv(x, q, scale, bias, tile, gated)`` on one case: its error with
    ``bias`` against ``ref`` and (``gate``) whether its gate is torch's ``w1 * silu(w2)`` of its
    plain output (0 when it is, inf when not)."""
    out = {f"{label} bias": ulp_error(gemv(x, q, scale, bias, tile), ref)}
    if gate:
        same = _gate_matches_torch(gemv(x, q, scale, None, tile, True), gemv(x, q, scale, None, tile))
        out[f"{label} gated == torch gate"] = 0.0 if same else float("inf")
    return out


def _edge_inputs(device: torch.device, dtype: torch.dtype, seed: int, shapes, max_rows: int):
    """Per ``(n, k)`` of ``shapes``: an int8 weight, its scale, a bf16 bias and the cases ``(m, x,
    x @ (q * scale).T + bias in float64)`` for 1 to ``max_rows`` random rows, made as they are
    read."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for n, k in shapes:
        q, scale = kernels.quantize_int8(torch.randn(n, k, device=device, dtype=dtype, generator=gen) / math.sqrt(k))
        bias = torch.randn(n, device=device, dtype=dtype, generator=gen)

        def cases(q=q, scale=scale, bias=bias, k=k):
            for m in range(1, max_rows + 1):
                x = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
                yield m, x, reference(x, q, scale) + bias.double()

        yield n, k, q, scale, bias, cases()


def cuda_edge_cases(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """The CUDA GEMV on the cases the layer shapes do not cover, against float64 math (bf16 ulps):
    1-4 rows, widths that leave warps and lanes idle (N not a multiple of the rows per block, K
    not a multiple of 512), a bias, the gate (its halves checked through the plain GEMV and
    torch's ``w1 * silu(w2)``, so a 1-ulp rounding of either half moves the gate by rounding
    only). Empty when the CUDA GEMV is not available here."""
    out = {}
    for n, k, q, scale, bias, cases in _edge_inputs(device, dtype, 5, ((1000, 4096), (4096, 11008), (37, 688)),
                                                    cuda_gemv.MAX_ROWS):
        for m, x, ref in cases:
            if not cuda_gemv.available(x, q):
                return {}
            for tile in (CudaTile(), CudaTile(4, 2), CudaTile(1, 16, 256), CudaTile(8, 1), CudaTile(2, 2, 128, 2),
                         CudaTile(1, 1, 256, 8)):
                out.update(_tile_cases(cuda_gemv.int8_gemv, x, q, scale, bias, ref, tile,
                                       f"[{n}x{k}] M={m} {tuple(tile)}", gate=n % 2 == 0))
    return out


def mma_edge_cases(device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """The tensor-core CUDA GEMV on the cases the layer shapes do not cover, against float64 math
    (bf16 ulps): 1-8 rows (as many as fit its shared memory), blocks with idle groups, uneven
    shares of K, a bias, the gate (through torch's ``w1 * silu(w2)`` of its plain output), and
    rows of x that f16 cannot hold as they are (values past 65504, a row of tiny values, one huge
    value among ordinary ones, a zero row), which it scales by a power of two. Empty when it is
    not available here."""
    out = {}
    tiles = (MmaTile(), MmaTile(1, 8, 4), MmaTile(4, 1, 1), MmaTile(3, 2, 3), MmaTile(1, 16, 2))
    for n, k, q, scale, bias, cases in _edge_inputs(device, dtype, 6, ((1024, 4096), (4096, 11008), (48, 704)),
                                                    cuda_gemv.MMA_MAX_ROWS):
        for m, x, ref in cases:
            if not cuda_gemv.mma_available(x, q):
                if m == 1:
                    return {}
                continue
            for tile in tiles:
                if cuda_gemv.mma_available(x, q, tile=tile):
                    out.update(_tile_cases(cuda_gemv.int8_gemv_mma, x, q, scale, bias, ref, tile,
                                           f"[{n}x{k}] M={m} {tuple(tile)}"))
        x = torch.randn(4, k, device=device, dtype=dtype, generator=torch.Generator(device=device).manual_seed(n))
        x[0] *= 1e5  # past f16's range
        x[1] *= 1e-9  # below it
        x[2, k // 3] = 3e6  # one value past it
        x[3] = 0.0
        ref = reference(x, q, scale)
        for tile in tiles:
            if cuda_gemv.mma_available(x, q, tile=tile):
                y = cuda_gemv.int8_gemv_mma(x, q, scale, None, tile)
                label = f"[{n}x{k}] {tuple(tile)}"
                out[f"{label} rows out of f16 range"] = ulp_error(y[:3], ref[:3])
                out[f"{label} zero row"] = 0.0 if bool((y[3] == 0).all()) else float("inf")
    return out


def gemv_variants(shapes: dict[str, tuple[int, int]], device: torch.device, dtype: torch.dtype,
                  graph_s: Callable[[list], float], repeats: int = 10, quick: bool = False,
                  candidates: dict[str, Callable] | None = None) -> dict:
    """Check and time the int8 (and bf16) decode GEMVs per shape; see the module docstring.

    ``shapes``: layer name -> ``(rows, K)`` of its weight (``gate_up`` is ``[w1 | w2]`` and runs
    gated, as in decode); ``graph_s(calls)``: seconds per call of ``calls`` in a CUDA graph.
    ``candidates``: family -> ``f((N, K, M), n_out, weight_bytes)`` giving the tiles to try instead
    of the built-in lists (a family mapped to None is not run). Returns ``{"rows": [...], "choice":
    {(N, K, M): "dot" | "fma" | "cuda" | "mma"}, "fma_tiles": {(N, K, 1, M): FmaTile}, "cuda_tiles":
    {(N, K, M): CudaTile}, "mma_tiles": {(N, K, M): MmaTile}, "worst_ulp": {"dot": ..., "fma": ...,
    ...}}`` (the worst of the picked tiles, and of the CUDA GEMVs' edge cases)."""
    rows_out, choice, picked = [], {}, {"fma": {}, "cuda": {}, "mma": {}}
    worst = {"dot": 0.0, "fma": 0.0}
    sweeps = {"fma": lambda key, n_out, b: fma_candidates(n_out, b)[:2 if quick else None],
              "cuda": lambda key, n_out, b: cuda_candidates(),
              "mma": lambda key, n_out, b: mma_candidates(), **(candidates or {})}
    gen = torch.Generator(device=device).manual_seed(7)
    for family, edge_cases in (("cuda", cuda_edge_cases), ("mma", mma_edge_cases)):
        edge = edge_cases(device, dtype) if device.type == "cuda" and sweeps[family] else {}
        if edge:
            worst_edge = max(edge.values())
            print(f"   {family} GEMV edge cases: worst {worst_edge:.2f} ulp over {len(edge)}"
                  + "".join(f"\n      {case}: {err:.2f}" for case, err in edge.items() if err > ULP_LIMIT),
                  flush=True)
            worst[f"{family} edge cases"] = worst_edge
    for name, (n, k) in shapes.items():
        gated = name == "gate_up"
        out_n = n // 2 if gated else n
        copies = max(1, math.ceil(L2_PAST_BYTES / (n * k))) if device.type == "cuda" else 1
        for kind in ("int8", "bf16"):
            weight_bytes = 1 if kind == "int8" else 2
            layers = []
            for _ in range(copies if kind == "int8" else max(1, math.ceil(copies / 2))):
                w = torch.randn(n, k, device=device, dtype=dtype, generator=gen) / math.sqrt(k)
                layers.append(kernels.quantize_int8(w) if kind == "int8" else (w, None))
            nbytes = n * k * weight_bytes + (n * 4 if kind == "int8" else 0)
            dot_tile = kernels.few_rows_tiles(n, k, weight_bytes)
            for m in ROWS:
                x = torch.randn(m, k, device=device, dtype=dtype, generator=gen)
                q, scale = layers[0]
                ref = reference(x, q, scale)

                def dot(x_, w_, s_):
                    return kernels._matmul(x_, w_, s_, None, dot_tile, gated)

                dot_err = ulp_error(kernels._matmul(x, q, scale, None, dot_tile), ref)
                dot_s = _timed(graph_s, dot, layers, x)
                row = {"layer": name, "N": n, "K": k, "weights": kind, "M": m, "gated": gated,
                       "dot_tile": dot_tile, "dot_us": dot_s * 1e6, "dot_GBps": nbytes / dot_s / 1e9,
                       "dot_max_ulp": dot_err}
                label = f"{name} {kind} M={m}"
                mma_here = any(cuda_gemv.mma_available(x, q, tile=t) for t in mma_candidates())
                runs = {"fma": bool(sweeps["fma"]),
                        "cuda": kind == "int8" and bool(sweeps["cuda"]) and cuda_gemv.available(x, q),
                        "mma": kind == "int8" and bool(sweeps["mma"]) and mma_here}
                for family in (f for f in FAMILIES if runs[f]):
                    tiles = [t for t in sweeps[family]((n, k, m), out_n, weight_bytes)
                             if family != "mma" or cuda_gemv.mma_available(x, q, tile=t)]
                    row.update(_family_row(family, tiles, graph_s, layers, x, ref, gated, nbytes, label,
                                           kind == "int8", repeats))
                times = {"dot": dot_s, **{f: row[f"{f}_us"] / 1e6 for f in FAMILIES if f"{f}_best" in row}}
                row["faster"] = min(times, key=times.get)
                if kind == "int8":
                    choice[(n, k, m)] = row["faster"]
                    worst["dot"] = max(worst["dot"], dot_err)
                    for family, (_, _, tile_type) in FAMILIES.items():
                        if f"{family}_best" in row:
                            picked.setdefault(family, {})[(n, k, 1, m) if family == "fma" else (n, k, m)] = tile_type(
                                *row[f"{family}_best"])
                            worst[family] = max(worst.get(family, 0.0), row[f"{family}_max_ulp"])
                rows_out.append(row)
                _print_row(row)
            del layers
    return {"rows": rows_out, "choice": choice, "fma_tiles": picked["fma"], "cuda_tiles": picked["cuda"],
            "mma_tiles": picked["mma"], "worst_ulp": worst}


def _print_row(row: dict) -> None:
    lines = [f"   {row['layer']} [{row['N']}x{row['K']}] {row['weights']} M={row['M']}: dot {row['dot_us']:.1f} us "
             f"({row['dot_GBps']:,.0f} GB/s, {row['dot_max_ulp']:.2f} ulp)"]
    for family in FAMILIES:
        if f"{family}_best" not in row:
            if row.get(family):
                lines.append(f"      no {family} tile passed")
            continue
        checks = row.get(f"{family}_checks")
        lines.append(f"      {family} {row[f'{family}_best']} {row[f'{family}_us']:.1f} us "
                     f"({row[f'{family}_GBps']:,.0f} GB/s, {row[f'{family}_max_ulp']:.2f} ulp)"
                     + (f"; checks {checks}" if checks else ""))
        others = sorted((f for f in row[family] if f["tile"] != tuple(row[f"{family}_best"])), key=lambda f: f["us"])
        lines += [f"        {f['tile']}: {f['us']:.1f} us {f['GBps']:,.0f} GB/s {f['max_ulp']:.2f} ulp"
                  + ("" if f["passed"] else " FAILED") for f in others]
    lines.append(f"      -> {row['faster']}")
    print("\n".join(lines), flush=True)


def summary_lines(result: dict) -> list[str]:
    """A short table: per shape and M, dot vs the best tile of each family (us, GB/s) and the pick."""
    columns = ["layer", "weights", "M", "dot us (GB/s)", *[c for f in FAMILIES for c in (f"{f} us (GB/s)", f"{f} tile")],
               "max ulp " + " / ".join(("dot", *FAMILIES)), "faster"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in result["rows"]:
        cells = [f"{r['dot_us']:.1f} ({r['dot_GBps']:,.0f})"]
        for f in FAMILIES:
            found = f"{f}_best" in r
            cells += [f"{r[f'{f}_us']:.1f} ({r[f'{f}_GBps']:,.0f})", str(r[f"{f}_best"])] if found else ["-", "-"]
        ulps = " / ".join(f"{r.get(f'{f}_max_ulp', float('nan')):.2f}" for f in ("dot", *FAMILIES))
        lines.append(f"| {r['layer']} | {r['weights']} | {r['M']} | {' | '.join(cells)} | {ulps} | {r['faster']} |")
    return lines


def dot_candidates(n: int) -> list[tuple]:
    """Tensor-core GEMV tiles ``(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, split_k)`` tried for an
    int8 ``[n, K]`` weight by :func:`dot_sweep`: wider K blocks, more warps and deeper pipelines
    (more weight bytes in flight per program), or fewer stages and warps (more programs per
    multiprocessor), than the built-in tiles; wide shapes split K 1 or 2, narrow ones 2 or 4."""
    shapes = [(16, 32, 256, 4, 4), (16, 32, 512, 4, 4), (16, 32, 512, 8, 4), (16, 64, 512, 8, 4),
              (16, 32, 1024, 8, 3), (16, 64, 256, 8, 6), (16, 32, 256, 4, 6), (16, 128, 256, 8, 4),
              (16, 64, 512, 4, 3),
              # fewer stages or warps: less shared memory per program, more programs per SM
              (16, 64, 256, 4, 4), (16, 64, 256, 4, 3), (16, 64, 256, 4, 2), (16, 32, 256, 4, 3),
              (16, 32, 256, 2, 3), (16, 64, 128, 4, 4), (16, 64, 256, 2, 4)]
    splits = (1, 2) if n >= 8192 else (2, 4)
    return [(*shape, split) for split in splits for shape in shapes]


def dot_sweep(shapes: dict[str, tuple[int, int]], device: torch.device, dtype: torch.dtype,
              graph_s: Callable[[list], float]) -> dict:
    """The int8 tensor-core GEMV with each :func:`dot_candidates` tile, per layer shape (``lm_head``
    left out) and 1 and 2 rows: us per call, GB/s and error against float64 math -> rows, and
    the fastest passing tile per shape by the sum of its 1- and 2-row times."""
    rows, best = [], {}
    gen = torch.Generator(device=device).manual_seed(11)
    for name, (n, k) in shapes.items():
        if name == "lm_head":
            continue
        gated = name == "gate_up"
        copies = max(1, math.ceil(L2_PAST_BYTES / (n * k))) if device.type == "cuda" else 1
        layers = [kernels.quantize_int8(torch.randn(n, k, device=device, dtype=dtype, generator=gen) / math.sqrt(k))
                  for _ in range(copies)]
        nbytes = n * k + n * 4
        xs = {m: torch.randn(m, k, device=device, dtype=dtype, generator=gen) for m in ROWS}
        refs = {m: reference(xs[m], *layers[0]) for m in ROWS}
        totals = {}
        for tile in dot_candidates(n // 2 if gated else n):
            try:
                errs = [ulp_error(kernels._matmul(xs[m], *layers[0], None, tile), refs[m]) for m in ROWS]
                seconds = [_timed(graph_s, lambda x_, w_, s_, t=tile: kernels._matmul(x_, w_, s_, None, t, gated),
                                  layers, xs[m]) for m in ROWS]
            except Exception as e:  # out of shared memory and the like: not a candidate here
                print(f"   {name} {tile}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            passed = max(errs) <= ULP_LIMIT
            rows.append({"layer": name, "N": n, "K": k, "tile": tile, "us": [s * 1e6 for s in seconds],
                         "GBps": [nbytes / s / 1e9 for s in seconds], "max_ulp": max(errs), "passed": passed})
            if passed:
                totals[tile] = seconds
            print(f"   {name} [{n}x{k}] {tile}: " + ", ".join(
                f"M={m} {s * 1e6:.1f} us ({nbytes / s / 1e9:,.0f} GB/s)" for m, s in zip(ROWS, seconds))
                + f", {max(errs):.2f} ulp" + ("" if passed else " FAILED"), flush=True)
        if totals:
            for m_index, m in enumerate(ROWS):
                pick = min(totals, key=lambda t: totals[t][m_index])
                best[(n, k, m)] = pick
                print(f"   {name} M={m}: best {pick} {totals[pick][m_index] * 1e6:.1f} us "
                      f"({nbytes / totals[pick][m_index] / 1e9:,.0f} GB/s); built-in "
                      f"{kernels.few_rows_tiles(n, k, 1)}", flush=True)
        del layers
    return {"rows": rows, "best": best}


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.gemv_bench [--dot-sweep]``: the dot / FMA / CUDA comparison of
    :func:`gemv_variants`, or the int8 tensor-core tile sweep of :func:`dot_sweep`, for the real
    architecture's shapes (config.json as the engine benchmark finds it) on this machine's GPU."""
    import argparse

    from benchmarks.engine_bench import SHARED, DEVICE_DIR, Clock, first_existing, llm_shapes, show_environment
    from worker.engine.model.args import QwenVLArgs

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dot-sweep", action="store_true", help="sweep the int8 tensor-core GEMV tiles instead")
    parser.add_argument("--mma-only", action="store_true",
                        help="time the tensor-core CUDA GEMV's tiles against the built-in CUDA GEMV tile only")
    a = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    show_environment(device)
    args = QwenVLArgs.from_hf_config(first_existing(DEVICE_DIR / "config.json", SHARED / "qwen-vl" / "config.json"))
    clock = Clock(device)
    if a.dot_sweep:
        result = dot_sweep(llm_shapes(args), device, dtype, clock.graph_s)
        print("best: " + ", ".join(f"{k}: {v}" for k, v in result["best"].items()))
    else:
        candidates = None
        if a.mma_only:
            candidates = {"fma": None, "cuda": lambda key, n_out, b: [kernels.CUDA_TILES.get(key, CudaTile())]}
        print("\n".join(summary_lines(gemv_variants(llm_shapes(args), device, dtype, clock.graph_s,
                                                     candidates=candidates))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
