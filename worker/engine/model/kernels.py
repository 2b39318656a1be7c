"""Fused kernels of the serving path: Triton on CUDA, the same arithmetic in torch elsewhere.

Each public function takes and returns torch tensors and picks its implementation from the
input's device: a Triton kernel where Triton and CUDA are available (or under Triton's
interpreter, ``TRITON_INTERPRET=1``, for debugging on a CPU), otherwise a torch function doing
the same arithmetic in the same order of roundings as the eager model in
:mod:`worker.engine.model.decoder`. None of them reads a value back to the host on CUDA, so they
can be captured in a CUDA graph.

- :func:`rms_norm`: ``residual (+ add)`` then the decoder's RMSNorm, one pass;
  :func:`norm_linear`: the RMSNorm, a linear layer and the residual add, which for decode on the
  int8 CUDA GEMV is one launch (:data:`NORM_IN_GEMV`).
- :func:`silu_mul`: the MLP's ``w1(x) * silu(w2(x))`` from the fused ``[w1 | w2]`` output;
  :func:`gated_linear` computes it straight from ``x`` and the fused weight (for few rows one
  GEMV whose epilogue applies the gate).
- :func:`rotary_to_cache`: rotary embedding (per-slot NTK frequencies) and logn scaling of q, k
  from the fused ``c_attn`` output, k and v written straight into the KV cache.
- :func:`decode_attention`: one query per sequence over its own cache row, reading each row's
  length from device memory (split over the row, then combined: "flash decoding"; the last
  program of each head to finish does the combine).
  :func:`rotary_attention` is both in one launch for decoding: every program rotates its own
  copy of the query, and the program whose range holds the new position writes the new key and
  value into the cache and uses them from its registers. On Hopper that launch is the CUDA C++
  kernel of :mod:`.cuda_attention` (:data:`DECODE_ATTENTION`), whose blocks combine their ranges
  in distributed shared memory.
- :func:`int8_linear`: ``x @ (q * scale).T + bias`` for int8 per-output-channel weights, stored
  as ``q + 128`` in uint8 (:func:`quantize_int8`), without materialising the dequantised matrix
  (a GEMV-shaped kernel when ``x`` has few rows: on the tensor cores, or for 1-2 rows of the
  shapes in :data:`INT8_GEMV_BY_SHAPE` an FMA GEMV in Triton or in CUDA C++, :mod:`.cuda_gemv`);
  :func:`dense_linear` is the model-dtype linear (for few rows the same Triton GEMV unless
  :data:`DENSE_GEMV` says cuBLAS). Split-K partial sums are added by the last program of each
  output tile to finish, in split order.
- :func:`token_logprobs`: the log-probability of each row's sampled token and its top tokens,
  for OpenAI's ``logprobs`` (two passes: blocks of each row, then a merge per row).

"The last program to finish" is picked by an atomic ticket per tile (:func:`_tickets`), which
that program sets back to zero; the sum it then does always runs in the same order, so answers
do not depend on which program came last. These kernels must not run at the same time on two
streams of one device (they share the tickets); the serving path launches them on one.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import cuda_attention, cuda_gemv
from .cuda_attention import AttentionTile
from .cuda_gemv import CudaTile, MmaTile

try:  # Triton ships with CUDA builds of torch; CPU-only installs run the torch versions
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# decode_attention splits every cache row into this many ranges (a power of two), so that even
# one sequence keeps many programs busy; the ranges follow each row's length at run time.
# (split, block, warps) measured best on an H100 for 1-2 rows of ~800 positions with the combine
# done by the last program of each head (docs/benchmarks.md; 32 splits was best with a separate
# combine launch).
ATTENTION_SPLITS = 16
ATTENTION_BLOCK = 32
ATTENTION_WARPS = 2

# Tile shapes of the Triton matmul (int8 weights, or model-dtype weights for few rows):
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K). Fixed per weight shape rather than
# autotuned, so that the reduction order (and so every answer) is the same in every process.
# With few rows (decode) the kernel is a GEMV bound by weight bytes: it needs a few programs per
# multiprocessor, so narrow matrices split K and add the partial sums in a second, ordered pass.
FEW_ROWS = 16
MANY_ROWS_TILES = (64, 128, 64, 4, 4, 1)  # prefill


def few_rows_tiles(n: int, k: int, weight_bytes: int) -> tuple:
    """Decode tiles for an ``[n, k]`` weight of ``weight_bytes`` per element (:data:`TILES` wins
    when it has the shape)."""
    if (n, k, weight_bytes) in TILES:
        return TILES[(n, k, weight_bytes)]
    if n >= 16384:
        return (16, 64, 256, 4, 4, 1)
    if n >= 8192:
        return (16, 32, 256, 4, 4, 1)
    return (16, 32, 256, 4, 4, 4)


# Measured per-shape choices, (N, K, bytes per weight) -> tiles: the best of the GPU benchmark's
# sweep on an H100 80GB HBM3 (1 and 2 rows) for Qwen-VL-Chat's decoder shapes; an H200 picked
# the same or neighbours within 3% (docs/benchmarks.md). The [w1 | w2] tile is that of the gated
# GEMV (BLOCK_N rows of both halves); int8 c_proj splits K since the sums need no second launch.
TILES: dict[tuple[int, int, int], tuple] = {
    (12288, 4096, 2): (16, 32, 256, 4, 4, 1),  # c_attn, bf16
    (4096, 4096, 2): (16, 32, 256, 4, 4, 1),  # attention c_proj
    (22016, 4096, 2): (16, 64, 256, 4, 4, 1),  # [w1 | w2]
    (4096, 11008, 2): (16, 32, 256, 4, 4, 2),  # MLP c_proj
    (151936, 4096, 2): (16, 64, 256, 4, 4, 1),  # lm_head
    (12288, 4096, 1): (16, 32, 256, 4, 4, 1),  # the same, int8
    (4096, 4096, 1): (16, 32, 256, 4, 4, 2),
    (22016, 4096, 1): (16, 64, 256, 4, 4, 1),
    (4096, 11008, 1): (16, 32, 256, 4, 4, 2),
    (151936, 4096, 1): (16, 32, 256, 4, 4, 1),
}


# How int8 GEMVs of at most FMA_ROWS rows run: "dot" (_matmul_kernel: the int8 tile converted to
# bf16 for the tensor cores, BLOCK_M 16 for 1-2 real rows), "fma" (_gemv_fma_kernel: no tensor
# cores; each program streams BLOCK_N weight rows along K in 16-byte chunks, converts them to
# float32 in registers and multiplies by the 1-2 rows of x), "cuda" (cuda_gemv: the same
# arithmetic in CUDA C++, each warp owning whole output rows, up to cuda_gemv.MAX_ROWS rows of x;
# where it cannot compile, the FMA kernel at one row and the tensor cores above) or "mma"
# (cuda_gemv.int8_gemv_mma, tensor cores in CUDA C++; on the row-major weights the model stores,
# slower than "cuda" on the decoder shapes in runs 34-43, so no shape is set to it; where it
# cannot run, "cuda").
# INT8_GEMV_BY_SHAPE picks per weight shape and row count; INT8_GEMV is the default for the rest.
# They differ only in float32 summation order (int8 answers are checked against their dequantised
# reference, not bf16).
INT8_GEMV = "dot"
FMA_ROWS = 2
# (N, K, rows of x) -> variant. Measured on H100 80GB HBM3s (docs/benchmarks.md, runs 20-32), us per
# call dot / fma / cuda in run 29, one row: c_attn 21.0 / 20.3 / 19.1, attention c_proj 9.9 / 9.3 /
# 8.4, [w1 | w2] 37.4 / 35.9 / 33.1, MLP c_proj 20.2 / 19.4 / 18.2, lm_head 246 / 207 / 203; two
# rows: 21.0 / 23.5 / 20.4, 9.8 / 11.6 / 9.2, 38.9 / 44.4 / 36.0, 20.1 / 25.1 / 19.6, 213 / 226 / 204.
INT8_GEMV_BY_SHAPE: dict[tuple[int, int, int], str] = {
    (12288, 4096, 1): "cuda",
    (4096, 4096, 1): "cuda",
    (22016, 4096, 1): "cuda",
    (4096, 11008, 1): "cuda",
    (151936, 4096, 1): "cuda",
    (12288, 4096, 2): "cuda",
    (4096, 4096, 2): "cuda",
    (22016, 4096, 2): "cuda",
    (4096, 11008, 2): "cuda",
    (151936, 4096, 2): "cuda",
}


def int8_gemv_variant(n: int, k: int, m: int) -> str:
    """``"dot"``, ``"fma"``, ``"cuda"`` or ``"mma"``: how ``m`` rows times an int8 ``[n, k]`` weight
    run (a CUDA graph keeps the kernel chosen when it was captured)."""
    variant = INT8_GEMV_BY_SHAPE.get((n, k, m), INT8_GEMV if m <= FMA_ROWS else "dot")
    if ((variant == "fma" and m > FMA_ROWS) or (variant == "cuda" and m > cuda_gemv.MAX_ROWS)
            or (variant == "mma" and m > cuda_gemv.MMA_MAX_ROWS)):
        return "dot"
    return variant


# CUDA GEMV tiles, (N, K, rows of x) -> cuda_gemv.CudaTile (wrows, unroll, threads, ksplit): per shape the
# tile whose slowest time over the GPU benchmark's runs on H100 80GB HBM3s (runs 24-31, 3-6 runs
# each) was the lowest; every tile within 0.5 bf16 ulp of float64 math. A tile's time moves by up to
# 10% between VMs, so the pick is the steadiest, not the fastest once. Small blocks and few loads per
# lane won: more warps resident beat more bytes in flight per warp. At two rows c_attn and [w1 | w2]
# then moved to the tiles fastest inside the decode graph, where the GEMVs run between the small
# kernels (benchmarks/graph_tiles.py, run 46: 3,355 -> 3,325 us a batch-2 step; alone they were not
# the fastest). At one row the two narrow GEMVs (c_proj, MLP c_proj) moved to two warps a row, each
# over half of K, which fills the card with twice the warps (run 64: 3,046 -> 3,022 us a batch-1
# step; at two rows no split tile beat the one-warp tiles). The rest run CudaTile().
CUDA_TILES: dict[tuple[int, int, int], CudaTile] = {
    (12288, 4096, 1): CudaTile(2, 1, 128),  # c_attn
    (12288, 4096, 2): CudaTile(4, 2, 256),
    (4096, 4096, 1): CudaTile(1, 1, 128, 2),  # attention c_proj
    (4096, 4096, 2): CudaTile(2, 2, 64),
    (22016, 4096, 1): CudaTile(1, 1, 64),  # [w1 | w2] with the gate (one row of each half)
    (22016, 4096, 2): CudaTile(1, 1, 128),
    (4096, 11008, 1): CudaTile(1, 1, 128, 2),  # MLP c_proj
    (4096, 11008, 2): CudaTile(2, 2, 64),
    (151936, 4096, 1): CudaTile(1, 3, 128),  # lm_head
    (151936, 4096, 2): CudaTile(2, 3, 128),
}

# CUDA GEMV tiles where the RMSNorm runs inside the GEMV (NORM_IN_GEMV; the rest run CUDA_TILES). Each
# block first normalises x into its shared memory, and the grid holds only the blocks that fit at
# once, so tiles that read more weights per block win: picked inside the decode graph
# (benchmarks/graph_tiles.py, run 78; `--norm-tiles` tunes this table), where the CUDA_TILES ones
# made a batch-1 step 3,424 us against 2,958 and a batch-2 step 3,558 against 3,251. One-row
# [w1 | w2] at 7 blocks an SM instead of 8 (its 11,008 groups in 2.98 rounds of the grid's warps,
# not 2.61): 25-36 us off a batch-1 step (runs 90-92).
NORM_TILES: dict[tuple[int, int, int], CudaTile] = {
    (12288, 4096, 1): CudaTile(2, 2, 256),  # c_attn
    (12288, 4096, 2): CudaTile(2, 2, 256),
    (22016, 4096, 1): CudaTile(1, 2, 128, blocks_per_sm=7),  # [w1 | w2] with the gate
    (22016, 4096, 2): CudaTile(1, 2, 128),
    (151936, 4096, 1): CudaTile(2, 2, 256),  # lm_head
    (151936, 4096, 2): CudaTile(4, 2, 256),
}

# The tables above were tuned on H100 80GB HBM3s. Other cards replace some entries: the card's name
# as torch gives it -> {table name: {key: tile}}, put in by use_card_tiles. On an H200 (4.8 TB/s, the
# int8 GEMVs held back more by their instruction count) two-row [w1 | w2] reads with 8 warps a block
# and lm_head with 8 output rows a warp: a batch-2 step 2,799 -> 2,743 us inside the decode graph
# (benchmarks/graph_tiles.py --norm-tiles, run 115; the CUDA_TILES shapes kept theirs, run 116).
CARD_TILES: dict[str, dict[str, dict[tuple[int, int, int], CudaTile]]] = {
    "NVIDIA H200": {"NORM_TILES": {(22016, 4096, 2): CudaTile(1, 2, 256), (151936, 4096, 2): CudaTile(8, 1, 128)}},
}
_card_tiles_in: list[str] = []


def use_card_tiles(device: torch.device) -> str | None:
    """Put the tiles tuned for ``device``'s card (:data:`CARD_TILES`) into the tile tables, once per
    process (a worker drives one card); returns the card's name where it has tiles of its own."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(device)
    if name not in CARD_TILES:
        return None
    if not _card_tiles_in:
        for table, tiles in CARD_TILES[name].items():
            globals()[table] = {**globals()[table], **tiles}
        _card_tiles_in.append(name)
    return name


# Tensor-core CUDA GEMV tiles, (N, K, rows of x) -> cuda_gemv.MmaTile (groups, splits, unroll). The
# rest run MmaTile().
MMA_TILES: dict[tuple[int, int, int], MmaTile] = {}


class FmaTile(NamedTuple):
    """Launch shape of the FMA GEMV (:func:`_gemv_fma`).

    A program reads ``block_n`` weight rows (gated: of each half of ``[w1 | w2]``) over its share
    of K (``split_k`` shares) in steps of
    ``block_k`` with ``warps`` warps; a warp streams ``block_k`` bytes of one row at a time (16 per
    thread at 512 for int8, 256 for bf16). ``acc_2d``: keep a ``[block_n, block_k]`` float32
    accumulator per row of x and reduce along K once at the end (else each step reduces into
    ``[block_n]``). ``convert``: int8 -> float32 by the conversion unit (``"i2f"``), by integer
    operations (``"magic"``: the stored byte ``q + 128`` is the mantissa of ``2**23``; taking
    ``2**23 + 128`` off gives ``q`` exactly), or the same as one byte permute and one subtraction
    per weight in PTX (``"prmt"``; CUDA only: the interpreter runs ``"magic"``).
    """

    block_n: int
    block_k: int
    warps: int
    split_k: int = 1
    acc_2d: bool = False
    convert: str = "magic"


# Measured FMA tiles, (N, K, bytes per weight, rows of x) -> FmaTile: the fastest of the GPU
# benchmark's candidates on H100 80GB HBM3s (run 7; at one row [w1 | w2]: the pick of runs 13, 15
# and 16, c_attn: of runs 13 and 16, within 0.5 us of run 15's; all within 0.5 bf16 ulp of float64
# math). Fixed per shape like TILES, so the summation order is the same in every process.
FMA_TILES: dict[tuple[int, int, int, int], FmaTile] = {
    (12288, 4096, 1, 1): FmaTile(32, 512, 8, 1, False, "prmt"),  # c_attn
    (12288, 4096, 1, 2): FmaTile(32, 512, 8, 1, False, "prmt"),
    (4096, 4096, 1, 1): FmaTile(32, 512, 8, 4, False, "prmt"),  # attention c_proj
    (4096, 4096, 1, 2): FmaTile(16, 512, 4, 4, False, "prmt"),
    (22016, 4096, 1, 1): FmaTile(8, 1024, 4, 1, False, "prmt"),  # [w1 | w2] with the gate (8 rows of each half)
    (22016, 4096, 1, 2): FmaTile(16, 512, 4, 1, False, "prmt"),
    (4096, 11008, 1, 1): FmaTile(32, 512, 8, 4, False, "prmt"),  # MLP c_proj
    (4096, 11008, 1, 2): FmaTile(16, 512, 4, 4, False, "prmt"),
    (151936, 4096, 1, 1): FmaTile(32, 512, 8, 1, False, "prmt"),  # lm_head
    (151936, 4096, 1, 2): FmaTile(16, 512, 4, 1, False, "prmt"),
}


def fma_tiles(n: int, k: int, weight_bytes: int, m: int) -> FmaTile:
    """FMA GEMV tiles for ``m`` rows times an ``[n, k]`` weight of ``weight_bytes`` per element
    (:data:`FMA_TILES` wins when it has the shape): 16 bytes per thread and row, split-K when
    the shape is narrow."""
    if (n, k, weight_bytes, m) in FMA_TILES:
        return FMA_TILES[(n, k, weight_bytes, m)]
    return FmaTile(16, 512 if weight_bytes == 1 else 256, 4, 1 if n >= 8192 else 4, False, "prmt")


# Whether few-row GEMVs and decode attention finish their own reductions (the gate in the
# [w1 | w2] GEMV, split-K sums, the attention combine: done by the last program of each tile) or
# leave them to separate launches as before. The GEMVs give the same bits either way; the
# attention kernel compiled with and without its combine may round a float32 partial differently
# (seen on the GPU: one bf16 unit in one element, docs/benchmarks.md). Benchmarks time both.
FUSED_EPILOGUES = True


@contextmanager
def settings(**values):
    """Run the enclosed calls with these module settings (``FUSED_EPILOGUES=False``,
    ``NORM_TILES={...}``, ...; benchmarks and checks compare them); the previous values come back
    after. CUDA graphs keep the kernels they were captured with."""
    unknown = [name for name in values if not name.isupper() or name not in globals()]
    if unknown:
        raise KeyError(f"no such kernels setting: {', '.join(unknown)}")
    saved = {name: globals()[name] for name in values}
    globals().update(values)
    try:
        yield
    finally:
        globals().update(saved)


def fused_epilogues(on: bool):
    """:func:`settings` with :data:`FUSED_EPILOGUES` ``= on``."""
    return settings(FUSED_EPILOGUES=on)


# Whether decoding runs rotary + cache write + attention as one launch (rotary_attention) or as
# rotary_to_cache then decode_attention; the same bits either way (benchmarks time both).
FUSED_ROTARY = True

# Which kernel runs that one launch: "cuda" (cuda_attention: each head's blocks a cluster that
# combines its ranges in distributed shared memory; Hopper and later, else Triton) or "triton"
# (_rotary_attention_kernel). They differ in float32 summation order only.
# Inside the decode graph the CUDA kernel takes about 10-70 us off a step (bf16 and int8, batch 1
# and 2), though alone it is no faster (docs/benchmarks.md, runs 67-72: benchmarks/attention_bench.py).
DECODE_ATTENTION = "cuda"
ATTENTION_TILE = AttentionTile()


def attention_kernel(kind: str, tile: AttentionTile | None = None):
    """:func:`settings`: decode with the ``kind`` attention kernel ("cuda" or "triton"; for CUDA,
    ``tile``)."""
    return settings(DECODE_ATTENTION=kind, ATTENTION_TILE=tile or ATTENTION_TILE)


# Decode of the batch sizes whose int8 GEMVs run on the CUDA GEMV (INT8_GEMV_BY_SHAPE: 1 and 2 rows):
# the decoder's RMSNorms run inside the GEMVs that read their output (c_attn, [w1 | w2], lm_head;
# each block normalises x into its shared memory) and the residual adds inside the GEMVs that feed
# them (both c_proj), so a layer has no RMSNorm launch (docs/benchmarks.md, runs 77-87).
NORM_IN_GEMV = True


def norm_tiles(tiles: dict[tuple[int, int, int], CudaTile]):
    """:func:`settings` with :data:`NORM_TILES` ``= tiles`` (a copy)."""
    return settings(NORM_TILES=dict(tiles))


def norms_in_gemv(on: bool):
    """:func:`settings`: decode with the RMSNorms inside the int8 GEMVs (``on``) or as their own
    launches."""
    return settings(NORM_IN_GEMV=on)


# One int32 ticket per output tile (or attention head), zero between launches.
TICKETS = 1 << 15
_ticket_buffers: dict[torch.device, torch.Tensor] = {}


def _tickets(device: torch.device, needed: int) -> torch.Tensor | None:
    """The device's zeroed ticket buffer, or None when ``needed`` exceeds it or it would be
    created inside a CUDA graph capture (graphs warm up first, so it exists by then)."""
    if needed > TICKETS:
        return None
    buffer = _ticket_buffers.get(device)
    if buffer is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buffer = _ticket_buffers[device] = torch.zeros(TICKETS, dtype=torch.int32, device=device)
    return buffer


def triton_ok(t: torch.Tensor) -> bool:
    """True when ``t``'s kernels run in Triton (CUDA tensors, or any tensor when interpreting)."""
    return triton is not None and (t.is_cuda or INTERPRET)


# -- RMSNorm with the residual add ---------------------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             add: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, C]`` (+ ``add [M, C]``, rounded to x's dtype like the eager residual add) ->
    ``(rms_norm(sum) * weight, sum)``, both ``[M, C]`` in x's dtype."""
    if not triton_ok(x):
        if add is not None:
            x = x + add
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return normed.type_as(x) * weight, x
    m, c = x.shape
    out = torch.empty(m, c, dtype=x.dtype, device=x.device)
    total = torch.empty(m, c, dtype=x.dtype, device=x.device) if add is not None else x
    _rms_norm_kernel[(m,)](
        x, add if add is not None else x, total, weight, out, c, eps,
        x.stride(0), add.stride(0) if add is not None else 0,
        HAS_ADD=add is not None, BLOCK=triton.next_power_of_2(c), num_warps=8 if c >= 2048 else 4)
    return out, total


# -- the MLP's gate ------------------------------------------------------------------------------


def silu_mul(y: torch.Tensor) -> torch.Tensor:
    """``y [M, 2F]`` = ``[w1(x) | w2(x)]`` -> ``w1(x) * silu(w2(x))`` ``[M, F]`` (x's dtype)."""
    f = y.shape[1] // 2
    if not triton_ok(y):
        return y[:, :f] * F.silu(y[:, f:])
    m = y.shape[0]
    out = torch.empty(m, f, dtype=y.dtype, device=y.device)
    block = 1024
    _silu_mul_kernel[(m, triton.cdiv(f, block))](y, out, f, y.stride(0), BLOCK=block, num_warps=4)
    return out


def gated_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, config: tuple | None = None, *,
                 norm: tuple[torch.Tensor, float] | None = None) -> torch.Tensor:
    """``x [M, K]`` through the fused ``[w1 | w2]`` weight ``[2F, K]`` (int8 with float32
    ``scale [2F]``, or x's dtype), then the gate: ``w1(x) * silu(w2(x))`` ``[M, F]``.

    The same bits as :func:`silu_mul` of :func:`int8_linear` / :func:`dense_linear`: each half
    rounded to x's dtype, silu rounded, the product rounded. For few rows on Triton (with
    :data:`FUSED_EPILOGUES`) it is one GEMV whose programs each read rows ``n`` and ``F + n`` of
    the weight and apply the gate before the store; ``config`` is the tile of the ``[2F, K]``
    shape, its ``BLOCK_N`` counting the rows of both halves. ``norm``: ``(weight, eps)``, x goes
    through :func:`rms_norm` first (see :func:`norm_linear`)."""
    if norm is not None:
        return norm_linear(x, weight, scale, bias, norm=norm, gated=True)
    few = triton_ok(x) and x.shape[0] <= FEW_ROWS and FUSED_EPILOGUES
    if not few or (scale is None and DENSE_GEMV != "triton"):
        y = int8_linear(x, weight, scale, bias) if scale is not None else dense_linear(x, weight, bias)
        return silu_mul(y)
    return _matmul(x, weight, scale, bias, config, gated=True)


# -- rotary embedding and the cache write --------------------------------------------------------


def rotary_to_cache(qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                    inv_freq: torch.Tensor, logn: torch.Tensor | None,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int, return_kv: bool = False):
    """Rotate and write one layer's keys and values into the cache; return the queries.

    qkv: ``[M, 3 * heads * D]`` (c_attn's output); token ``m`` sits at ``positions[m]`` of cache
    row ``slots[m]`` (int64 ``[M]``). inv_freq: ``[rows, D/2]`` float32, each row's rotary
    frequencies (its dynamic-NTK alpha); logn: ``[max_seq_len]`` float32 query scales, or None.
    k_cache, v_cache: ``[rows, heads, max_seq_len, D]``. Returns ``q [M, heads, D]``: rotated in
    float32, rounded to the model dtype, then scaled by logn (as the eager model does); with
    ``return_kv`` also the rotated ``k`` and the ``v`` written, each ``[M, heads, D]``.
    """
    m = qkv.shape[0]
    d = k_cache.shape[-1]
    if not triton_ok(qkv):
        from .decoder import apply_rotary, rotary_cos_sin

        q, k, v = qkv.view(m, 3, heads, d).unbind(1)  # each [M, H, D]
        cos, sin = rotary_cos_sin(positions[:, None], inv_freq.index_select(0, slots))  # [M, 1, 1, D]
        q = apply_rotary(q[:, None], cos, sin)[:, 0]  # [M, H, D]
        k = apply_rotary(k[:, None], cos, sin)[:, 0]
        if logn is not None:
            q = q * logn.index_select(0, positions)[:, None, None].type_as(q)
        k_cache[slots, :, positions] = k
        v_cache[slots, :, positions] = v
        return (q, k, v) if return_kv else q
    q_out = torch.empty(m, heads, d, dtype=qkv.dtype, device=qkv.device)
    k_out = torch.empty_like(q_out) if return_kv else q_out
    v_out = torch.empty_like(q_out) if return_kv else q_out
    _rotary_kernel[(m, heads)](
        qkv, positions, slots, inv_freq, logn if logn is not None else inv_freq, k_cache, v_cache,
        q_out, k_out, v_out, qkv.stride(0), heads * d, inv_freq.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HAS_LOGN=logn is not None, RETURN_KV=return_kv, D=d, HALF=d // 2, num_warps=1 if d <= 64 else 2)
    return (q_out, k_out, v_out) if return_kv else q_out


# -- decode attention ----------------------------------------------------------------------------


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     slots: torch.Tensor, lengths: torch.Tensor, kv_len: int | None = None) -> torch.Tensor:
    """One query per sequence over its own cache row.

    q: ``[B, H, D]``; row ``b`` attends to positions ``0 .. lengths[b] - 1`` of cache row
    ``slots[b]`` (both int64 ``[B]`` on the device). Returns ``[B, H * D]`` in q's dtype.
    ``kv_len`` (an upper bound of ``lengths``) only shortens the torch version's span; the
    Triton version reads each row's length from device memory and needs no bound.
    """
    b, h, d = q.shape
    if not triton_ok(q):
        span = k_cache.shape[2] if kv_len is None else kv_len
        k = k_cache[:, :, :span].index_select(0, slots)  # [B, H, span, D]
        v = v_cache[:, :, :span].index_select(0, slots)
        visible = torch.arange(span, device=q.device) < lengths[:, None]  # [B, span]
        out = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=visible[:, None, None, :])
        return out.reshape(b, h * d)  # [B, 1, H, D] order is [B, H, 1, D]: one query, same thing
    splits = ATTENTION_SPLITS
    part_out, part_max, part_sum, out = _attention_buffers(b, h, d, splits, q)
    tickets = _tickets(q.device, b * h) if FUSED_EPILOGUES else None
    _decode_attention_kernel[(b * h, splits)](
        q, k_cache, v_cache, slots, lengths, part_out, part_max, part_sum, out,
        tickets if tickets is not None else part_max,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        d ** -0.5, H=h, D=d, SPLITS=splits, BLOCK=ATTENTION_BLOCK, COMBINE=tickets is not None,
        num_warps=ATTENTION_WARPS)
    if tickets is None:
        _combine_kernel[(b * h,)](part_out, part_max, part_sum, out, D=d, SPLITS=splits, num_warps=1)
    return out


def _attention_buffers(b: int, heads: int, d: int, splits: int, like: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Split attention's float32 partial outputs ``[B*H, splits, D]``, maxima and sums
    ``[B*H, splits]``, and its output ``[B, H*D]`` in ``like``'s dtype."""
    rows, device = b * heads, like.device
    return (torch.empty(rows, splits, d, dtype=torch.float32, device=device),
            torch.empty(rows, splits, dtype=torch.float32, device=device),
            torch.empty(rows, splits, dtype=torch.float32, device=device),
            torch.empty(b, heads * d, dtype=like.dtype, device=device))


def fuses_rotary(t: torch.Tensor) -> bool:
    """Whether :func:`rotary_attention` on ``t``'s device is one launch (else it needs ``lengths``)."""
    return triton_ok(t) and FUSED_EPILOGUES and FUSED_ROTARY


def rotary_attention(qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, inv_freq: torch.Tensor,
                     logn: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int,
                     kv_len: int | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """One decoding token per sequence: :func:`rotary_to_cache` then :func:`decode_attention`.

    qkv: ``[B, 3 * heads * D]``; row ``b``'s new token sits at ``positions[b]`` of cache row
    ``slots[b]`` and attends to positions ``0 .. positions[b]``. Returns ``[B, heads * D]``.
    ``lengths``: ``positions + 1`` if the caller has it (the two-launch path reads it).
    On Triton (with :data:`FUSED_EPILOGUES` and :data:`FUSED_ROTARY`) one launch with the same
    arithmetic, so the same bits, as the two kernels; otherwise the two. With both set and
    :data:`DECODE_ATTENTION` "cuda", the CUDA kernel where it runs (the same cache bits, the output
    summed in another order)."""
    if DECODE_ATTENTION == "cuda" and fuses_rotary(qkv):
        out = _cuda_attention(qkv, positions, slots, inv_freq, logn, k_cache, v_cache, heads)
        if out is not None:
            return out
    b = qkv.shape[0]
    d = k_cache.shape[-1]
    tickets = _tickets(qkv.device, b * heads) if fuses_rotary(qkv) else None
    if tickets is None:
        q = rotary_to_cache(qkv, positions, slots, inv_freq, logn, k_cache, v_cache, heads)
        return decode_attention(q, k_cache, v_cache, slots, positions + 1 if lengths is None else lengths, kv_len)
    splits = ATTENTION_SPLITS
    part_out, part_max, part_sum, out = _attention_buffers(b, heads, d, splits, qkv)
    _rotary_attention_kernel[(b * heads, splits)](
        qkv, positions, slots, inv_freq, logn if logn is not None else inv_freq, k_cache, v_cache,
        part_out, part_max, part_sum, out, tickets, qkv.stride(0), heads * d, inv_freq.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), d ** -0.5,
        H=heads, D=d, HALF=d // 2, SPLITS=splits, BLOCK=ATTENTION_BLOCK, HAS_LOGN=logn is not None,
        num_warps=ATTENTION_WARPS)
    return out


def _cuda_attention(qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, inv_freq: torch.Tensor,
                    logn: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    heads: int) -> torch.Tensor | None:
    """The CUDA decode attention on :data:`ATTENTION_TILE`, or None where it cannot run (this
    card or torch, these layouts, or a compile that failed once: logged, Triton from then on)."""
    if not cuda_attention.available(qkv, positions, slots, inv_freq, logn, k_cache, v_cache, heads, ATTENTION_TILE):
        return None
    try:
        return cuda_attention.rotary_attention(qkv, positions, slots, inv_freq, logn, k_cache, v_cache, heads,
                                               ATTENTION_TILE)
    except Exception as e:  # NVRTC missing or refusing: serve on with the Triton kernel
        cuda_gemv.disable(f"{type(e).__name__}: {e}", "attention")
        return None


# -- int8 weight-only linear ---------------------------------------------------------------------


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None = None, config: tuple | None = None) -> torch.Tensor:
    """``x [M, K]`` times int8 ``qweight [N, K]`` (stored as :func:`quantize_int8` stores it) with
    float32 per-row ``scale [N]`` (+ ``bias``) -> ``[M, N]`` in x's dtype. Products accumulate in
    float32 and are scaled once per output, exactly ``(x @ (qweight * scale).T + bias)`` up to
    float32 rounding. ``config`` overrides the
    tile shape (benchmarks)."""
    _check_stored(qweight)
    if not triton_ok(x):
        y = x.float() @ int8_weights(qweight).T * scale
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)
    return _matmul(x, qweight, scale, bias, config)


def norm_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
                bias: torch.Tensor | None = None, *, norm: tuple[torch.Tensor, float] | None = None,
                residual: torch.Tensor | None = None, gated: bool = False) -> torch.Tensor:
    """:func:`int8_linear` (``scale`` given) or :func:`dense_linear` of ``x`` (:func:`gated_linear`
    when ``gated``), with the decoder's RMSNorm before it and the residual add after it:
    ``residual + linear(rms_norm(x, *norm))``, each part optional, each rounded as the eager
    model rounds it.

    Where the int8 CUDA GEMV serves the shape and row count (:data:`NORM_IN_GEMV`) both happen
    inside its one launch. Its sum of squares is added in another order than :func:`rms_norm`'s,
    which can move a normalised value by one bf16 ulp: none moved in the GEMV checks, and through
    the whole model the logits stayed bit-equal on 5 of 7 inputs (docs/benchmarks.md, runs 78-87).
    Elsewhere they are their own launches."""
    if fuses_in_gemv(x, weight, scale, bias, norm=norm, residual=residual, gated=gated):
        y = _int8_gemv_cuda(x, weight, scale, bias, _fused_tile(x, weight, norm), gated, norm, residual)
        if y is not None:
            return y
    if norm is not None:
        x, _ = rms_norm(x, *norm)
    if gated:
        y = gated_linear(x, weight, scale, bias)
    else:
        y = int8_linear(x, weight, scale, bias) if scale is not None else dense_linear(x, weight, bias)
    return y if residual is None else residual + y


def fuses_in_gemv(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, *, norm: tuple[torch.Tensor, float] | None = None,
                  residual: torch.Tensor | None = None, gated: bool = False) -> bool:
    """Whether :func:`norm_linear` of these operands is one CUDA GEMV launch: :data:`NORM_IN_GEMV`,
    int8 weights on the CUDA GEMV for this shape and row count, operands it can take (unless
    compiling it fails, which :func:`norm_linear` then learns and falls back)."""
    m, k = x.shape
    return (NORM_IN_GEMV and scale is not None and triton_ok(x) and int8_gemv_variant(weight.shape[0], k, m) == "cuda"
            and cuda_gemv.available(x, weight, scale, bias)
            and cuda_gemv.fusions_ok(x, weight, _fused_tile(x, weight, norm), gated, norm[0] if norm else None,
                                     residual))


def _fused_tile(x: torch.Tensor, weight: torch.Tensor, norm) -> CudaTile | None:
    return (NORM_TILES if norm is not None else CUDA_TILES).get((weight.shape[0], x.shape[1], x.shape[0]))


def dense_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 config: tuple | None = None) -> torch.Tensor:
    """``F.linear`` for the fast path: cuBLAS, or for few rows the GEMV-shaped Triton kernel of
    :func:`int8_linear` on the model-dtype weights when :data:`DENSE_GEMV` is ``"triton"``."""
    if DENSE_GEMV != "triton" or x.shape[0] > FEW_ROWS or not triton_ok(x):
        return F.linear(x, weight, bias)
    return _matmul(x, weight, None, bias, config)


# How the fast path multiplies model-dtype weights by few rows: "cublas" (torch) or "triton".
DENSE_GEMV = "triton"


def _matmul(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
            config: tuple | None, gated: bool = False) -> torch.Tensor:
    """``y = x @ weight.T (* scale + bias)``; ``gated``: ``weight`` is ``[w1 | w2]`` and ``y`` the
    gate ``w1(x) * silu(w2(x))``, half as wide (see :func:`gated_linear`)."""
    m, k = x.shape
    rows = weight.shape[0]
    n = rows // 2 if gated else rows  # output width
    if scale is not None:
        _check_stored(weight)
    if x.stride(1) != 1:
        x = x.contiguous()
    if config is None and weight.dtype == INT8_STORAGE:
        variant = int8_gemv_variant(rows, k, m)
        if variant == "mma":
            y = _int8_gemv_mma(x, weight, scale, bias, MMA_TILES.get((rows, k, m)), gated)
            if y is not None:
                return y
            variant = "cuda"  # the next fastest (docs/benchmarks.md)
        if variant == "cuda":
            y = _int8_gemv_cuda(x, weight, scale, bias, CUDA_TILES.get((rows, k, m)), gated)
            if y is not None:
                return y
            variant = "fma" if m == 1 else "dot"  # the next fastest (docs/benchmarks.md)
        if variant == "fma":
            return _gemv_fma(x, weight, scale, bias, None, gated)
    if config is None:
        config = few_rows_tiles(rows, k, weight.element_size()) if m <= FEW_ROWS else MANY_ROWS_TILES
    bm, bn, bk, warps, stages, split = config
    if gated:
        bn //= 2  # each program reads bn // 2 rows of each half
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm), split)
    tickets = _tickets(x.device, grid[0] * grid[1]) if split > 1 and FUSED_EPILOGUES else None
    if gated and split > 1 and tickets is None:
        return silu_mul(_matmul(x, weight, scale, bias, config))
    y, partial = _gemv_outputs(x, n, split, gated)
    blocks_per_split = triton.cdiv(triton.cdiv(k, bk), split)
    _matmul_kernel[grid](
        x, weight, scale if scale is not None else weight, bias if bias is not None else weight,
        y if tickets is not None else partial, partial, tickets if tickets is not None else partial,
        m, n, k, x.stride(0), weight.stride(0), blocks_per_split,
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        SPLIT_K=split, GATED=gated, SUM_HERE=tickets is not None, DOT_FP32=INTERPRET,
        INT8=weight.dtype == INT8_STORAGE, num_warps=warps, num_stages=stages)
    if split > 1 and tickets is None:
        _sum_splits(partial, scale, bias, y, split)
    return y


def _int8_gemv_cuda(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                    tile: CudaTile | None, gated: bool, norm: tuple[torch.Tensor, float] | None = None,
                    residual: torch.Tensor | None = None) -> torch.Tensor | None:
    """The CUDA GEMV (with ``norm`` and ``residual``: :func:`norm_linear`'s fusions), or None where
    it cannot run: this torch cannot compile it, or compiling failed once (logged; every later call
    then takes the Triton kernels)."""
    if not cuda_gemv.available(x, weight, scale, bias):
        return None
    try:
        return cuda_gemv.int8_gemv(x, weight, scale, bias, tile, gated, norm, residual)
    except Exception as e:  # NVRTC missing or refusing: serve on with the Triton GEMVs
        cuda_gemv.disable(f"{type(e).__name__}: {e}")
        return None


def _int8_gemv_mma(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None,
                   tile: MmaTile | None, gated: bool) -> torch.Tensor | None:
    """The tensor-core CUDA GEMV, or None where it cannot run (as :func:`_int8_gemv_cuda`)."""
    if not cuda_gemv.mma_available(x, weight, scale, bias, tile):
        return None
    try:
        return cuda_gemv.int8_gemv_mma(x, weight, scale, bias, tile, gated)
    except Exception as e:  # NVRTC refusing: serve on with the FMA CUDA GEMV or Triton
        cuda_gemv.disable(f"{type(e).__name__}: {e}", "mma")
        return None


def _gemv_fma(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
              config: FmaTile | None, gated: bool = False) -> torch.Tensor:
    """As :func:`_matmul` for ``x`` of 1 or 2 rows, on the FMA GEMV (:data:`INT8_GEMV`): int8 or
    model-dtype ``weight``; ``config`` overrides :func:`fma_tiles`."""
    m, k = x.shape
    if not 1 <= m <= FMA_ROWS:
        raise ValueError(f"the FMA GEMV takes 1 to {FMA_ROWS} rows, not {m}")
    rows = weight.shape[0]
    n = rows // 2 if gated else rows
    if x.stride(1) != 1:
        x = x.contiguous()
    tile = FmaTile(*(config or fma_tiles(rows, k, weight.element_size(), m)))
    split = tile.split_k
    grid = (triton.cdiv(n, tile.block_n), split)
    tickets = _tickets(x.device, grid[0]) if split > 1 and FUSED_EPILOGUES else None
    if gated and split > 1 and tickets is None:
        return silu_mul(_gemv_fma(x, weight, scale, bias, config))
    y, partial = _gemv_outputs(x, n, split, gated)
    blocks_per_split = triton.cdiv(triton.cdiv(k, tile.block_k), split)
    convert = 0 if weight.dtype != INT8_STORAGE else {"i2f": 1, "magic": 2, "prmt": 3}[tile.convert]
    if convert == 3 and INTERPRET:
        convert = 2  # no inline PTX in the interpreter: the same arithmetic in Triton operations
    _gemv_fma_kernel[grid](
        x, weight, scale if scale is not None else weight, bias if bias is not None else weight,
        y if tickets is not None else partial, partial, tickets if tickets is not None else partial,
        n, k, x.stride(0), weight.stride(0), blocks_per_split,
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, ROWS=m, BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k, SPLIT_K=split, GATED=gated, SUM_HERE=tickets is not None, ACC_2D=tile.acc_2d,
        CONVERT=convert, num_warps=tile.warps, num_stages=1)
    if split > 1 and tickets is None:
        _sum_splits(partial, scale, bias, y, split)
    return y


def _gemv_outputs(x: torch.Tensor, n: int, split: int, gated: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A GEMV's output ``y [M, n]`` and, split over K, its float32 partial sums
    ``[halves * split, M, n]`` (``y`` itself when not split)."""
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if split == 1:
        return y, y
    return y, torch.empty((2 if gated else 1) * split, m, n, dtype=torch.float32, device=x.device)


def _sum_splits(partial: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None, y: torch.Tensor,
                split: int) -> None:
    """The separate launch adding ``split`` partial sums in order (scaled, biased) into ``y``."""
    total, n = y.numel(), y.shape[1]
    block = 1024
    _split_k_sum_kernel[(triton.cdiv(total, block),)](
        partial, scale if scale is not None else partial, bias if bias is not None else partial, y, total, n,
        HAS_SCALE=scale is not None, HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK=block, num_warps=4)


# int8 weights are stored as uint8 q + 128 ("offset binary"): the stored byte is then the mantissa
# the GEMVs' conversion to float32 wants as it is, where a signed byte would first need its sign bit
# flipped, one more instruction per four weights (4% of the int8 decode step at batch 2 on an H200,
# docs/benchmarks.md, run 112).
INT8_STORAGE = torch.uint8
INT8_OFFSET = 128


def store_int8(q: torch.Tensor) -> torch.Tensor:
    """Signed int8 weights ``q`` (any integer dtype, values -128..127) as the int8 kernels read them:
    uint8 ``q + 128``."""
    return (q.to(torch.int16) + INT8_OFFSET).to(INT8_STORAGE)


def int8_weights(stored: torch.Tensor) -> torch.Tensor:
    """The signed weights of ``stored`` (:func:`store_int8`) as float32, exactly."""
    return stored.float() - INT8_OFFSET


def _check_stored(q: torch.Tensor) -> None:
    if q.dtype != INT8_STORAGE:  # a signed int8 tensor would read as other weights
        raise TypeError(f"int8 weights are stored as uint8 q + 128 (kernels.quantize_int8 or store_int8), "
                        f"not as {q.dtype}")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: ``weight [N, K]`` -> ``(stored uint8 [N, K], scale float32
    [N])``, ``stored`` holding ``q + 128`` (:func:`store_int8`) with ``weight ~= q * scale[:, None]``
    and ``|q| <= 127``."""
    w = weight.float()
    amax = w.abs().amax(dim=1)  # [N]
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    return store_int8(torch.round(w / scale[:, None]).clamp_(-127, 127)), scale


# -- OpenAI's logprobs ----------------------------------------------------------------------------

LOGPROB_BLOCK = 4096  # logits per program of the first pass (37 programs a row for Qwen's vocabulary)


def token_logprobs(logits: torch.Tensor, next_ids: torch.Tensor, top: int, width: int) -> torch.Tensor:
    """Log-probabilities over ``logits[:, :width]`` (float32 ``[B, V]``) for OpenAI's logprobs.

    Returns float32 ``[B, 1 + 2 * top]``: each row's log-probability of ``next_ids`` (int64 ``[B]``,
    below ``width``), then its ``top`` largest log-probabilities, largest first (ties: the lower
    id first), and their ids (exact in float32 below 2**24). In Triton two launches: the first
    pass takes each ``LOGPROB_BLOCK`` of a row (its max, its sum of exponentials, its ``top``
    largest), the second merges a row's blocks; torch's own ``log_softmax`` and ``topk`` run a few
    programs a row over the whole vocabulary, several times slower for one or two rows.
    """
    if not triton_ok(logits):
        return token_logprobs_torch(logits, next_ids, top, width)
    b = logits.shape[0]
    blocks = triton.cdiv(width, LOGPROB_BLOCK)
    top_p2 = triton.next_power_of_2(max(top, 1))
    part_max = torch.empty(b, blocks, dtype=torch.float32, device=logits.device)
    part_sum = torch.empty_like(part_max)
    part_vals = torch.empty(b, blocks, top_p2, dtype=torch.float32, device=logits.device)
    part_ids = torch.empty(b, blocks, top_p2, dtype=torch.int32, device=logits.device)
    _logprob_blocks_kernel[(b, blocks)](
        logits, part_max, part_sum, part_vals, part_ids, width, logits.stride(0),
        TOP=top, TOP_P2=top_p2, BLOCK=LOGPROB_BLOCK, num_warps=8)
    out = torch.empty(b, 1 + 2 * top, dtype=torch.float32, device=logits.device)
    _logprob_rows_kernel[(b,)](
        logits, next_ids, part_max, part_sum, part_vals, part_ids, out, logits.stride(0), blocks,
        TOP=top, TOP_P2=top_p2, BLOCKS_P2=triton.next_power_of_2(blocks), num_warps=4)
    return out


def token_logprobs_torch(logits: torch.Tensor, next_ids: torch.Tensor, top: int, width: int) -> torch.Tensor:
    """:func:`token_logprobs` in torch ops over the whole row (CPU, and the benchmarks' reference)."""
    logprobs = torch.log_softmax(logits[:, :width].float(), dim=-1)  # [B, V']
    chosen = logprobs.gather(1, next_ids[:, None])  # [B, 1]
    if top == 0:
        return chosen
    values, ids = logprobs.topk(top, dim=-1)  # [B, top]
    return torch.cat([chosen, values, ids.float()], dim=1)


# -- Triton kernels ------------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, add_ptr, total_ptr, w_ptr, out_ptr, C, eps, stride_x, stride_add,
                         HAS_ADD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.arange(0, BLOCK)
        mask = cols < C
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
        if HAS_ADD:
            a = tl.load(add_ptr + row * stride_add + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + a.to(tl.float32)).to(x.dtype)  # the eager residual add's rounding
            tl.store(total_ptr + row * C + cols, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / C
        normed = (xf * tl.math.rsqrt(var + eps)).to(x.dtype)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        out = normed.to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * C + cols, out.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _silu_mul_kernel(y_ptr, out_ptr, width, stride_y, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < width
        a = tl.load(y_ptr + row * stride_y + cols, mask=mask, other=0.0)
        g = tl.load(y_ptr + row * stride_y + width + cols, mask=mask, other=0.0).to(tl.float32)
        gate = (g / (1.0 + tl.exp(-g))).to(a.dtype)  # silu, rounded as torch rounds it
        out = a.to(tl.float32) * gate.to(tl.float32)
        tl.store(out_ptr + row * width + cols, out.to(a.dtype), mask=mask)

    @triton.jit
    def _rotary_kernel(qkv_ptr, pos_ptr, slot_ptr, freq_ptr, logn_ptr, k_ptr, v_ptr, q_ptr, k_out_ptr, v_out_ptr,
                       stride_qkv, C, stride_freq, stride_cs, stride_ch, stride_cl,
                       HAS_LOGN: tl.constexpr, RETURN_KV: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr):
        m = tl.program_id(0)
        h = tl.program_id(1)
        pos = tl.load(pos_ptr + m)
        slot = tl.load(slot_ptr + m)
        i = tl.arange(0, HALF)
        freqs = pos.to(tl.float32) * tl.load(freq_ptr + slot * stride_freq + i)  # [HALF]
        cos = tl.cos(freqs)
        sin = tl.sin(freqs)
        base = qkv_ptr + m * stride_qkv + h * D
        q1 = tl.load(base + i).to(tl.float32)
        q2 = tl.load(base + HALF + i).to(tl.float32)
        k1 = tl.load(base + C + i).to(tl.float32)
        k2 = tl.load(base + C + HALF + i).to(tl.float32)
        v1 = tl.load(base + 2 * C + i)
        v2 = tl.load(base + 2 * C + HALF + i)
        dtype = v1.dtype
        # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), rounded to the model dtype
        qa = (q1 * cos - q2 * sin).to(dtype)
        qb = (q2 * cos + q1 * sin).to(dtype)
        ka = (k1 * cos - k2 * sin).to(dtype)
        kb = (k2 * cos + k1 * sin).to(dtype)
        if HAS_LOGN:
            scale = tl.load(logn_ptr + pos).to(dtype).to(tl.float32)
            qa = (qa.to(tl.float32) * scale).to(dtype)
            qb = (qb.to(tl.float32) * scale).to(dtype)
        row = (m * (C // D) + h) * D
        tl.store(q_ptr + row + i, qa)
        tl.store(q_ptr + row + HALF + i, qb)
        if RETURN_KV:
            tl.store(k_out_ptr + row + i, ka)
            tl.store(k_out_ptr + row + HALF + i, kb)
            tl.store(v_out_ptr + row + i, v1)
            tl.store(v_out_ptr + row + HALF + i, v2)
        cache = slot * stride_cs + h * stride_ch + pos * stride_cl
        tl.store(k_ptr + cache + i, ka)
        tl.store(k_ptr + cache + HALF + i, kb)
        tl.store(v_ptr + cache + i, v1)
        tl.store(v_ptr + cache + HALF + i, v2)

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, slot_ptr, len_ptr, out_ptr, max_ptr, sum_ptr, o_ptr,
                                 ticket_ptr, stride_qb, stride_qh, stride_cs, stride_ch, stride_cl, sm_scale,
                                 H: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                                 BLOCK: tl.constexpr, COMBINE: tl.constexpr):
        """Program (b * H + h, split): one range of row b's positions for head h -> float32
        partial output, max and sum; with COMBINE the head's last program to finish combines
        the SPLITS partials into ``o [B, H * D]``."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // H
        h = bh % H
        slot = tl.load(slot_ptr + b)
        length = tl.load(len_ptr + b).to(tl.int32)
        per_split = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK
        start = split * per_split
        end = tl.minimum(start + per_split, length)
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d).to(tl.float32) * sm_scale  # [D]
        row = slot * stride_cs + h * stride_ch
        acc, m_i, l_i = _attend_range(q, k_ptr, v_ptr, row, start, end, d, stride_cl, -1, q, q, False, BLOCK)
        _finish_range(acc, m_i, l_i, out_ptr, max_ptr, sum_ptr, o_ptr, ticket_ptr, bh, split, d, D, SPLITS, COMBINE)

    @triton.jit
    def _attend_range(q, k_ptr, v_ptr, row, start, end, d, stride_cl, new_pos, k_new, v_new,
                      HAS_NEW: tl.constexpr, BLOCK: tl.constexpr):
        """The scaled float32 query ``q [D]`` over cache positions ``start .. end - 1`` at ``row``
        -> (unnormalised output [D], running max, running sum), BLOCK positions at a time. HAS_NEW:
        position ``new_pos`` takes ``k_new`` / ``v_new`` (model dtype, [D]) instead of the cache."""
        m_i = tl.full([], float("-inf"), tl.float32)
        l_i = tl.full([], 0.0, tl.float32)
        acc = tl.zeros(d.shape, dtype=tl.float32)
        for first in range(start, end, BLOCK):
            offs = first + tl.arange(0, BLOCK)
            mask = offs < end
            addr = row + offs[:, None] * stride_cl + d[None, :]  # [BLOCK, D]
            new = (offs == new_pos)[:, None]  # [BLOCK, 1]: the row the cache does not hold yet (HAS_NEW)
            k = tl.load(k_ptr + addr, mask=mask[:, None], other=0.0)
            if HAS_NEW:
                k = tl.where(new, k_new[None, :], k)
            scores = tl.sum(k.to(tl.float32) * q[None, :], axis=1)  # [BLOCK]
            scores = tl.where(mask, scores, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, axis=0))
            p = tl.exp(scores - m_new)
            alpha = tl.exp(m_i - m_new)
            v = tl.load(v_ptr + addr, mask=mask[:, None], other=0.0)
            if HAS_NEW:
                v = tl.where(new, v_new[None, :], v)
            acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
            l_i = l_i * alpha + tl.sum(p, axis=0)
            m_i = m_new
        return acc, m_i, l_i

    @triton.jit
    def _finish_range(acc, m_i, l_i, out_ptr, max_ptr, sum_ptr, o_ptr, ticket_ptr, bh, split, d,
                      D: tl.constexpr, SPLITS: tl.constexpr, COMBINE: tl.constexpr):
        """Store one range's float32 partials; with COMBINE the head's last program to finish
        (an atomic ticket) combines its SPLITS partials into ``o``."""
        part = bh * SPLITS + split
        tl.store(out_ptr + part * D + d, acc)
        tl.store(max_ptr + part, m_i)
        tl.store(sum_ptr + part, l_i)
        if COMBINE:
            tl.debug_barrier()  # every thread's partial stored before the ticket is taken
            if tl.atomic_add(ticket_ptr + bh, 1, sem="acq_rel") == SPLITS - 1:
                _combine_head(out_ptr, max_ptr, sum_ptr, o_ptr, bh, D, SPLITS)
                tl.store(ticket_ptr + bh, 0)  # ready for the next launch

    @triton.jit
    def _rotary_attention_kernel(qkv_ptr, pos_ptr, slot_ptr, freq_ptr, logn_ptr, k_ptr, v_ptr, out_ptr, max_ptr,
                                 sum_ptr, o_ptr, ticket_ptr, stride_qkv, C, stride_freq, stride_cs, stride_ch,
                                 stride_cl, sm_scale, H: tl.constexpr, D: tl.constexpr, HALF: tl.constexpr,
                                 SPLITS: tl.constexpr, BLOCK: tl.constexpr, HAS_LOGN: tl.constexpr):
        """Program (b * H + h, split): _rotary_kernel's arithmetic for token b's head h (each
        program its own copy), then _decode_attention_kernel's over one range of positions
        ``0 .. pos``; the range holding ``pos`` takes the new key and value from registers and
        writes them into the cache (no other program reads that position)."""
        bh = tl.program_id(0)
        split = tl.program_id(1)
        b = bh // H
        h = bh % H
        pos = tl.load(pos_ptr + b)
        slot = tl.load(slot_ptr + b)
        length = pos.to(tl.int32) + 1
        per_split = tl.cdiv(tl.cdiv(length, SPLITS), BLOCK) * BLOCK
        start = split * per_split
        end = tl.minimum(start + per_split, length)
        # rotary, element d paired with d +- HALF: the same expressions as _rotary_kernel's halves
        d = tl.arange(0, D)
        first_half = d < HALF
        partner = (d + HALF) % D
        freqs = pos.to(tl.float32) * tl.load(freq_ptr + slot * stride_freq + d % HALF)  # [D]
        cos = tl.cos(freqs)
        sin = tl.sin(freqs)
        base = qkv_ptr + b * stride_qkv + h * D
        q_own = tl.load(base + d).to(tl.float32)
        q_other = tl.load(base + partner).to(tl.float32)
        k_own = tl.load(base + C + d).to(tl.float32)
        k_other = tl.load(base + C + partner).to(tl.float32)
        v_new = tl.load(base + 2 * C + d)
        dtype = v_new.dtype
        q = tl.where(first_half, q_own * cos - q_other * sin, q_own * cos + q_other * sin).to(dtype)
        k_new = tl.where(first_half, k_own * cos - k_other * sin, k_own * cos + k_other * sin).to(dtype)
        if HAS_LOGN:
            scale = tl.load(logn_ptr + pos).to(dtype).to(tl.float32)
            q = (q.to(tl.float32) * scale).to(dtype)
        row = slot * stride_cs + h * stride_ch
        mine = (pos >= start) & (pos < end)  # "& (d < D)" below: this scalar as a [D] mask
        tl.store(k_ptr + row + pos * stride_cl + d, k_new, mask=mine & (d < D))
        tl.store(v_ptr + row + pos * stride_cl + d, v_new, mask=mine & (d < D))
        acc, m_i, l_i = _attend_range(q.to(tl.float32) * sm_scale, k_ptr, v_ptr, row, start, end, d, stride_cl, pos,
                                      k_new, v_new, True, BLOCK)
        _finish_range(acc, m_i, l_i, out_ptr, max_ptr, sum_ptr, o_ptr, ticket_ptr, bh, split, d, D, SPLITS, True)

    @triton.jit
    def _combine_head(out_ptr, max_ptr, sum_ptr, o_ptr, bh, D: tl.constexpr, SPLITS: tl.constexpr):
        """The SPLITS float32 partials of head ``bh`` -> its output row, in o's dtype (loads
        through L2: other programs of the same launch may have written them)."""
        s = tl.arange(0, SPLITS)
        d = tl.arange(0, D)
        maxes = tl.load(max_ptr + bh * SPLITS + s, cache_modifier=".cg")  # [SPLITS]; -inf for empty ranges
        sums = tl.load(sum_ptr + bh * SPLITS + s, cache_modifier=".cg")
        top = tl.max(maxes, axis=0)  # finite: the first range is never empty
        weights = tl.where(sums > 0, tl.exp(maxes - top), 0.0)  # [SPLITS]
        parts = tl.load(out_ptr + (bh * SPLITS + s)[:, None] * D + d[None, :], cache_modifier=".cg")  # [SPLITS, D]
        out = tl.sum(parts * weights[:, None], axis=0) / tl.sum(sums * weights, axis=0)
        tl.store(o_ptr + bh * D + d, out.to(o_ptr.dtype.element_ty))

    @triton.jit
    def _combine_kernel(out_ptr, max_ptr, sum_ptr, o_ptr, D: tl.constexpr, SPLITS: tl.constexpr):
        _combine_head(out_ptr, max_ptr, sum_ptr, o_ptr, tl.program_id(0), D, SPLITS)

    @triton.jit
    def _matmul_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, part_ptr, ticket_ptr, M, N, K, stride_xm, stride_wn,
                       blocks_per_split, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GATED: tl.constexpr,
                       SUM_HERE: tl.constexpr, DOT_FP32: tl.constexpr, INT8: tl.constexpr):
        """y [M, N] = x [M, K] @ w[N, K].T (* scale[N] + bias[N]), w int8 (INT8: stored as q + 128
        in uint8) or x's dtype; program (n, m, s) does one [BLOCK_M, BLOCK_N] tile over the s-th
        range of K.

        GATED: w is [w1 | w2] ([2N, K]) and y = w1(x) * silu(w2(x)), each program reading rows
        n and N + n. SPLIT_K > 1: float32 partial sums [SPLIT_K, M, N] (a second [SPLIT_K, M, N]
        block for the w2 half) go to part_ptr and, with SUM_HERE, the tile's last program to
        finish adds them in split order and writes y; without, y_ptr is part_ptr and
        _split_k_sum_kernel does the rest."""
        pid_n = tl.program_id(0)
        pid_m = tl.program_id(1)
        pid_k = tl.program_id(2)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        m_mask = rm < M
        n_mask = rn < N
        x_rows = x_ptr + rm[:, None] * stride_xm  # [BM, 1]
        w_cols = w_ptr + rn[None, :] * stride_wn  # [1, BN]: column n of the [K, N] view is row n
        g_cols = w_cols + N * stride_wn  # the same columns of the w2 half (GATED)
        k_first = pid_k * blocks_per_split * BLOCK_K
        k_last = tl.minimum(K, k_first + blocks_per_split * BLOCK_K)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(k_first, k_last, BLOCK_K):
            k = k0 + rk
            k_mask = k < K
            x = tl.load(x_rows + k[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # [BM, BK]
            w = tl.load(w_cols + k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)  # [BK, BN]
            if INT8:  # the sign bit back: Triton's fast int8 conversion takes signed bytes
                w = (w ^ 0x80).to(tl.int8, bitcast=True)
            if DOT_FP32:  # Triton's interpreter mishandles low-precision dots
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
            else:
                acc += tl.dot(x, w.to(x.dtype))
            if GATED:
                g = tl.load(g_cols + k[:, None], mask=k_mask[:, None] & n_mask[None, :], other=0)  # [BK, BN]
                if INT8:
                    g = (g ^ 0x80).to(tl.int8, bitcast=True)
                if DOT_FP32:
                    acc_g += tl.dot(x.to(tl.float32), g.to(tl.float32))
                else:
                    acc_g += tl.dot(x, g.to(x.dtype))
        out_mask = m_mask[:, None] & n_mask[None, :]
        if SPLIT_K == 1:
            _matmul_epilogue(acc, acc_g, s_ptr, b_ptr, y_ptr, rm, rn, N, n_mask, out_mask, HAS_SCALE, HAS_BIAS,
                             GATED)
        elif not SUM_HERE:
            tl.store(y_ptr + (pid_k * M + rm[:, None]) * N + rn[None, :], acc, mask=out_mask)
        else:
            parts = part_ptr + rm[:, None] * N + rn[None, :]  # [BM, BN] of split 0
            tl.store(parts + pid_k * M * N, acc, mask=out_mask)
            if GATED:
                tl.store(parts + (SPLIT_K + pid_k) * M * N, acc_g, mask=out_mask)
            tl.debug_barrier()  # every thread's partial stored before the ticket is taken
            tile = pid_m * tl.num_programs(0) + pid_n
            if tl.atomic_add(ticket_ptr + tile, 1, sem="acq_rel") == SPLIT_K - 1:
                total = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                total_g = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                for split in tl.static_range(SPLIT_K):  # always the same order: deterministic
                    total += tl.load(parts + split * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
                    if GATED:
                        total_g += tl.load(parts + (SPLIT_K + split) * M * N, mask=out_mask, other=0.0,
                                           cache_modifier=".cg")
                tl.store(ticket_ptr + tile, 0)  # ready for the next launch
                _matmul_epilogue(total, total_g, s_ptr, b_ptr, y_ptr, rm, rn, N, n_mask, out_mask, HAS_SCALE,
                                 HAS_BIAS, GATED)

    @triton.jit
    def _matmul_epilogue(acc, acc_g, s_ptr, b_ptr, y_ptr, rm, rn, N, n_mask, out_mask, HAS_SCALE: tl.constexpr,
                         HAS_BIAS: tl.constexpr, GATED: tl.constexpr):
        """float32 sums [BM, BN] -> scaled, biased, rounded y (GATED: a = w1 half, g = w2 half, each
        rounded to y's dtype, y = a * silu(g) with silu and the product rounded, as silu_mul)."""
        dtype = y_ptr.dtype.element_ty
        y = acc
        if HAS_SCALE:
            y = acc * tl.load(s_ptr + rn, mask=n_mask, other=0.0)[None, :]
        if HAS_BIAS:
            y += tl.load(b_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            g = acc_g
            if HAS_SCALE:
                g = acc_g * tl.load(s_ptr + N + rn, mask=n_mask, other=0.0)[None, :]
            if HAS_BIAS:
                g += tl.load(b_ptr + N + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
            g = g.to(dtype).to(tl.float32)
            gate = (g / (1.0 + tl.exp(-g))).to(dtype)  # silu, rounded as torch rounds it
            y = y.to(dtype).to(tl.float32) * gate.to(tl.float32)
        tl.store(y_ptr + rm[:, None] * N + rn[None, :], y.to(dtype), mask=out_mask)

    @triton.jit
    def _gemv_fma_kernel(x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, part_ptr, ticket_ptr, N, K, stride_xm, stride_wn,
                         blocks_per_split, HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, GATED: tl.constexpr,
                         SUM_HERE: tl.constexpr, ACC_2D: tl.constexpr, CONVERT: tl.constexpr):
        """y [ROWS, N] = x [ROWS, K] @ w[N, K].T (* scale[N] + bias[N]) without tensor cores, ROWS
        1 or 2; program (n, s) reads weight rows n*BLOCK_N.. (and, GATED, the same rows of the w2
        half) over the s-th range of K as [BLOCK_N, BLOCK_K] tiles (K contiguous: 16-byte loads),
        in float32 (CONVERT: 0 model dtype, 1-3 int8 as FmaTile.convert). Outputs, split-K
        partials and tickets as _matmul_kernel (M = ROWS)."""
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = tl.arange(0, BLOCK_K)
        n_mask = rn < N
        w_rows = w_ptr + rn[:, None] * stride_wn  # [BN, 1]
        g_rows = w_rows + N * stride_wn  # the same rows of the w2 half (GATED)
        k_first = pid_k * blocks_per_split * BLOCK_K
        k_last = tl.minimum(K, k_first + blocks_per_split * BLOCK_K)
        if ACC_2D:
            acc0 = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        else:
            acc0 = tl.zeros([BLOCK_N], dtype=tl.float32)
        acc1 = acc0  # row 1 (ROWS == 2)
        acc0_g = acc0  # the w2 half (GATED)
        acc1_g = acc0
        for k0 in range(k_first, k_last, BLOCK_K):
            k = k0 + rk
            k_mask = k < k_last
            w_mask = n_mask[:, None] & k_mask[None, :]
            w = _fma_to_float(tl.load(w_rows + k[None, :], mask=w_mask, other=0), CONVERT)  # [BN, BK] float32
            g = w
            if GATED:
                g = _fma_to_float(tl.load(g_rows + k[None, :], mask=w_mask, other=0), CONVERT)
            x0 = tl.load(x_ptr + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]  # [1, BK]
            acc0 = _fma_accumulate(acc0, w * x0, ACC_2D)
            if GATED:
                acc0_g = _fma_accumulate(acc0_g, g * x0, ACC_2D)
            if ROWS == 2:
                x1 = tl.load(x_ptr + stride_xm + k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
                acc1 = _fma_accumulate(acc1, w * x1, ACC_2D)
                if GATED:
                    acc1_g = _fma_accumulate(acc1_g, g * x1, ACC_2D)
        if ACC_2D:
            acc0 = tl.sum(acc0, axis=1)
            acc1 = tl.sum(acc1, axis=1)
            acc0_g = tl.sum(acc0_g, axis=1)
            acc1_g = tl.sum(acc1_g, axis=1)
        out_mask = n_mask[None, :]  # [1, BN]: one row of y at a time
        if SPLIT_K == 1:
            _matmul_epilogue(acc0[None, :], acc0_g[None, :], s_ptr, b_ptr, y_ptr, tl.full([1], 0, tl.int32), rn, N,
                             n_mask, out_mask, HAS_SCALE, HAS_BIAS, GATED)
            if ROWS == 2:
                _matmul_epilogue(acc1[None, :], acc1_g[None, :], s_ptr, b_ptr, y_ptr, tl.full([1], 1, tl.int32), rn,
                                 N, n_mask, out_mask, HAS_SCALE, HAS_BIAS, GATED)
        elif not SUM_HERE:
            tl.store(y_ptr + (pid_k * ROWS) * N + rn, acc0, mask=n_mask)
            if ROWS == 2:
                tl.store(y_ptr + (pid_k * ROWS + 1) * N + rn, acc1, mask=n_mask)
        else:
            tl.store(part_ptr + (pid_k * ROWS) * N + rn, acc0, mask=n_mask)
            if ROWS == 2:
                tl.store(part_ptr + (pid_k * ROWS + 1) * N + rn, acc1, mask=n_mask)
            if GATED:
                tl.store(part_ptr + ((SPLIT_K + pid_k) * ROWS) * N + rn, acc0_g, mask=n_mask)
                if ROWS == 2:
                    tl.store(part_ptr + ((SPLIT_K + pid_k) * ROWS + 1) * N + rn, acc1_g, mask=n_mask)
            tl.debug_barrier()  # every thread's partial stored before the ticket is taken
            if tl.atomic_add(ticket_ptr + pid_n, 1, sem="acq_rel") == SPLIT_K - 1:
                for row in tl.static_range(ROWS):
                    total = tl.zeros([BLOCK_N], dtype=tl.float32)
                    total_g = tl.zeros([BLOCK_N], dtype=tl.float32)
                    for split in tl.static_range(SPLIT_K):  # always the same order: deterministic
                        total += tl.load(part_ptr + (split * ROWS + row) * N + rn, mask=n_mask, other=0.0,
                                         cache_modifier=".cg")
                        if GATED:
                            total_g += tl.load(part_ptr + ((SPLIT_K + split) * ROWS + row) * N + rn, mask=n_mask,
                                               other=0.0, cache_modifier=".cg")
                    _matmul_epilogue(total[None, :], total_g[None, :], s_ptr, b_ptr, y_ptr,
                                     tl.full([1], row, tl.int32), rn, N, n_mask, out_mask, HAS_SCALE, HAS_BIAS, GATED)
                tl.store(ticket_ptr + pid_n, 0)  # ready for the next launch

    @triton.jit
    def _fma_to_float(w, CONVERT: tl.constexpr):
        """A weight tile as float32 (CONVERT: see _gemv_fma_kernel). For int8 (the stored byte q +
        128) by integer operations: the byte is the mantissa of 2**23; taking 2**23 + 128 off again
        gives q exactly."""
        if CONVERT == 1:
            out = w.to(tl.float32) - 128.0
        elif CONVERT == 2:
            bits = w.to(tl.int32) | 0x4B000000
            out = bits.to(tl.float32, bitcast=True) - 8388736.0
        elif CONVERT == 3:  # the same: one byte permute and a subtraction per weight
            out = tl.inline_asm_elementwise(
                """
                prmt.b32 $0, $4, 0x4B000000, 0x7540;
                prmt.b32 $1, $4, 0x4B000000, 0x7541;
                prmt.b32 $2, $4, 0x4B000000, 0x7542;
                prmt.b32 $3, $4, 0x4B000000, 0x7543;
                sub.f32 $0, $0, 0f4B000080;
                sub.f32 $1, $1, 0f4B000080;
                sub.f32 $2, $2, 0f4B000080;
                sub.f32 $3, $3, 0f4B000080;
                """,
                "=r,=r,=r,=r,r", [w], dtype=tl.float32, is_pure=True, pack=4)
        else:
            out = w.to(tl.float32)
        return out

    @triton.jit
    def _fma_accumulate(acc, products, ACC_2D: tl.constexpr):
        if ACC_2D:
            out = acc + products
        else:
            out = acc + tl.sum(products, axis=1)
        return out

    @triton.jit
    def _split_k_sum_kernel(part_ptr, s_ptr, b_ptr, y_ptr, total, N, HAS_SCALE: tl.constexpr,
                            HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr):
        idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = idx < total
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for split in tl.static_range(SPLIT_K):  # always the same order: deterministic
            acc += tl.load(part_ptr + split * total + idx, mask=mask, other=0.0)
        n = idx % N
        if HAS_SCALE:
            acc = acc * tl.load(s_ptr + n, mask=mask, other=0.0)
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + idx, acc.to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _logprob_blocks_kernel(logits_ptr, max_ptr, sum_ptr, vals_ptr, ids_ptr, width, stride,
                               TOP: tl.constexpr, TOP_P2: tl.constexpr, BLOCK: tl.constexpr):
        row, blk = tl.program_id(0), tl.program_id(1)
        blocks = tl.num_programs(1)
        cols = blk * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(logits_ptr + row * stride + cols, mask=cols < width, other=float("-inf")).to(tl.float32)
        m = tl.max(x, axis=0)
        tl.store(max_ptr + row * blocks + blk, m)
        shift = tl.where(m == float("-inf"), 0.0, m)  # a block of -inf only adds 0, not nan
        tl.store(sum_ptr + row * blocks + blk, tl.sum(tl.exp(x - shift), axis=0))
        base = (row * blocks + blk) * TOP_P2
        for t in tl.static_range(TOP):  # the block's largest, one at a time
            v = tl.max(x, axis=0)
            i = tl.min(tl.where(x == v, cols, 2147483647), axis=0)  # ties: the lower id
            tl.store(vals_ptr + base + t, v)
            tl.store(ids_ptr + base + t, i)
            x = tl.where(cols == i, float("-inf"), x)

    @triton.jit
    def _logprob_rows_kernel(logits_ptr, next_ptr, max_ptr, sum_ptr, vals_ptr, ids_ptr, out_ptr, stride, blocks,
                             TOP: tl.constexpr, TOP_P2: tl.constexpr, BLOCKS_P2: tl.constexpr):
        row = tl.program_id(0)
        b = tl.arange(0, BLOCKS_P2)
        m = tl.load(max_ptr + row * blocks + b, mask=b < blocks, other=float("-inf"))
        s = tl.load(sum_ptr + row * blocks + b, mask=b < blocks, other=0.0)
        top_max = tl.max(m, axis=0)
        lse = top_max + tl.log(tl.sum(s * tl.exp(m - top_max), axis=0))
        width = 1 + 2 * TOP
        chosen = tl.load(logits_ptr + row * stride + tl.load(next_ptr + row)).to(tl.float32)
        tl.store(out_ptr + row * width, chosen - lse)
        if TOP > 0:
            c = tl.arange(0, BLOCKS_P2 * TOP_P2)
            valid = (c // TOP_P2 < blocks) & (c % TOP_P2 < TOP)
            v = tl.load(vals_ptr + row * blocks * TOP_P2 + c, mask=valid, other=float("-inf"))
            ids = tl.load(ids_ptr + row * blocks * TOP_P2 + c, mask=valid, other=2147483647)
            for t in tl.static_range(TOP):
                best = tl.max(v, axis=0)
                i = tl.min(tl.where(v == best, ids, 2147483647), axis=0)
                tl.store(out_ptr + row * width + 1 + t, best - lse)
                tl.store(out_ptr + row * width + 1 + TOP + t, i.to(tl.float32))
                v = tl.where(ids == i, float("-inf"), v)
