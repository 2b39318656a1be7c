"""The int8 decode GEMV in CUDA C++, compiled at run time with NVRTC (no compiler on the worker).

``y [M, N] = x [M, K] @ (q [N, K] * scale [N]).T (+ bias [N])`` for 1-4 rows of bf16 ``x``, int8
``q`` and float32 ``scale``; ``gated``: ``q`` is ``[w1 | w2]`` (``[2N, K]``) and ``y`` is
``w1(x) * silu(w2(x))``, rounded as :func:`.kernels.silu_mul` rounds it. This is the kernel the
Triton GEMVs of :mod:`.kernels` could not be made into: every warp owns ``wrows`` output rows
whole (no split-K, no second pass), and every thread first issues all of its ``unroll`` 16-byte
weight loads per row (``ld.global.nc`` without L1 allocation: each weight byte is read once),
then converts them to float32 with one byte permute and a subtraction per weight and does one
FMA per weight and row of ``x``. Each warp adds its lanes' sums with shuffles at the end, in a
fixed order: answers do not depend on timing.

:func:`int8_gemv` launches it on the current stream (so CUDA graphs capture it);
:func:`available` says whether this torch can compile it (``torch.cuda._compile_kernel``, a CUDA
build, bf16 activations, ``K`` a multiple of 16 and 16-byte aligned rows). Where it cannot,
:mod:`.kernels` keeps its Triton GEMVs.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 4

SOURCE = r"""
typedef unsigned short bf16;
typedef unsigned int u32;

static __device__ __forceinline__ uint4 load_stream(const uint4* p) {
    uint4 v;  // weights: read once, kept out of L1
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

static __device__ __forceinline__ uint4 load_cached(const uint4* p) {
    uint4 v;  // x: read by every warp, kept in L1
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

static __device__ __forceinline__ bf16 to_bf16(float f) {
    bf16 h;  // round to nearest even, as torch rounds
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

static __device__ __forceinline__ float bf16_float(bf16 h) { return __uint_as_float((u32)h << 16); }

static __device__ __forceinline__ float round_bf16(float f) { return bf16_float(to_bf16(f)); }

// Four int8 weights of one word -> float32, exactly: the byte with its sign bit flipped (q + 128)
// becomes the mantissa of 2^23, and 2^23 + 128 comes off again.
static __device__ __forceinline__ void int8x4_float(u32 w, float* out) {
    const u32 t = w ^ 0x80808080u;
    out[0] = __uint_as_float(__byte_perm(t, 0x4B000000u, 0x7540)) - 8388736.0f;
    out[1] = __uint_as_float(__byte_perm(t, 0x4B000000u, 0x7541)) - 8388736.0f;
    out[2] = __uint_as_float(__byte_perm(t, 0x4B000000u, 0x7542)) - 8388736.0f;
    out[3] = __uint_as_float(__byte_perm(t, 0x4B000000u, 0x7543)) - 8388736.0f;
}

static __device__ __forceinline__ void bf16x8_float(uint4 v, float* out) {
    out[0] = __uint_as_float(v.x << 16); out[1] = __uint_as_float(v.x & 0xffff0000u);
    out[2] = __uint_as_float(v.y << 16); out[3] = __uint_as_float(v.y & 0xffff0000u);
    out[4] = __uint_as_float(v.z << 16); out[5] = __uint_as_float(v.z & 0xffff0000u);
    out[6] = __uint_as_float(v.w << 16); out[7] = __uint_as_float(v.w & 0xffff0000u);
}

// The R weight rows of output group g (WROWS outputs, of both halves when gated: rows n and n_out + n).
template <int R>
static __device__ __forceinline__ void group_rows(const uint4* (&rows)[R], const signed char* q, int g, int n_out,
                                                  long long stride_q) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int n = min(g * WROWS + r % WROWS, n_out - 1);  // past the end: a valid row, never stored
        rows[r] = reinterpret_cast<const uint4*>(q + (long long)(n + (r / WROWS) * n_out) * stride_q);
    }
}

// One step of a warp's walk along K: UNROLL chunks of 16 weights per lane and row, all in flight
// before the first is used.
template <int R>
static __device__ __forceinline__ void load_step(uint4 (&w)[UNROLL][R], const uint4* const (&rows)[R], int c0,
                                                 int chunks) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
#pragma unroll
        for (int r = 0; r < R; ++r)
            w[u][r] = c0 + 32 * u < chunks ? load_stream(rows[r] + c0 + 32 * u) : make_uint4(0, 0, 0, 0);
}

// acc[m][r] += x[m, chunk] . w[r, chunk] for the step's chunks, in float32.
template <int R>
static __device__ __forceinline__ void fma_step(float (&acc)[ROWS][R], const uint4 (&w)[UNROLL][R], const bf16* x,
                                                int stride_x, int c0, int chunks) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int c = c0 + 32 * u;
        if (c >= chunks) break;
        float xf[ROWS][16];
#pragma unroll
        for (int m = 0; m < ROWS; ++m) {
            const uint4* xp = reinterpret_cast<const uint4*>(x + (long long)m * stride_x) + 2 * c;
            bf16x8_float(load_cached(xp), xf[m]);
            bf16x8_float(load_cached(xp + 1), xf[m] + 8);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float wf[16];
            int8x4_float(w[u][r].x, wf);
            int8x4_float(w[u][r].y, wf + 4);
            int8x4_float(w[u][r].z, wf + 8);
            int8x4_float(w[u][r].w, wf + 12);
#pragma unroll
            for (int m = 0; m < ROWS; ++m) {
                float even = 0.0f, odd = 0.0f;  // two chains: half the FMA latency
#pragma unroll
                for (int i = 0; i < 16; i += 2) {
                    even = fmaf(wf[i], xf[m][i], even);
                    odd = fmaf(wf[i + 1], xf[m][i + 1], odd);
                }
                acc[m][r] += even + odd;
            }
        }
    }
}

// scale, bias, round: the Triton epilogue's order (y = acc * s; y += b; bf16).
static __device__ __forceinline__ float scaled(float acc, const float* s, const bf16* b, int n) {
    float y = acc * s[n];
    if (HAS_BIAS) y += bf16_float(b[n]);
    return y;
}

// Add up the lanes' sums of group g and store its outputs (lane 0): plain, or the gate as silu_mul
// does it (each half rounded, silu rounded, the product rounded).
template <int R>
static __device__ __forceinline__ void finish_group(float (&acc)[ROWS][R], const float* s, const bf16* b, bf16* y,
                                                    int g, int n_out) {
#pragma unroll
    for (int m = 0; m < ROWS; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1)
                acc[m][r] += __shfl_xor_sync(0xffffffffu, acc[m][r], offset);
    if ((threadIdx.x & 31) != 0) return;
#pragma unroll
    for (int m = 0; m < ROWS; ++m)
#pragma unroll
        for (int r = 0; r < WROWS; ++r) {
            const int n = g * WROWS + r;
            if (n >= n_out) break;
            float out = scaled(acc[m][r], s, b, n);
            if (GATED) {
                const float gate = round_bf16(scaled(acc[m][WROWS + r], s, b, n_out + n));
                out = round_bf16(out) * round_bf16(gate / (1.0f + expf(-gate)));
            }
            y[(long long)m * n_out + n] = to_bf16(out);
        }
}

template <int R>
static __device__ __forceinline__ void zero(float (&acc)[ROWS][R]) {
#pragma unroll
    for (int m = 0; m < ROWS; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[m][r] = 0.0f;
}

// y [ROWS, n_out] = x @ (q * s).T (+ b); GATED: q is [w1 | w2] ([2 n_out, k]) and y the gate. Each
// warp owns WROWS outputs whole: no split-K, no second pass, the same order of sums every time.
extern "C" __global__ void __launch_bounds__(THREADS)
vlq_int8_gemv(const bf16* __restrict__ x, const signed char* __restrict__ q, const float* __restrict__ s,
              const bf16* __restrict__ b, bf16* __restrict__ y, int n_out, int k, int stride_x, int stride_q) {
    constexpr int R = WROWS * (GATED ? 2 : 1);  // weight rows per warp
    const int lane = threadIdx.x & 31;
    const int g = blockIdx.x * (THREADS / 32) + (threadIdx.x >> 5);  // this warp's output group
    if (g * WROWS >= n_out) return;
    const int chunks = k >> 4;  // 16 weights (bytes) a chunk
    const uint4* rows[R];
    group_rows<R>(rows, q, g, n_out, stride_q);
    float acc[ROWS][R];
    zero<R>(acc);
    uint4 w[UNROLL][R];
    for (int c0 = lane; c0 < chunks; c0 += 32 * UNROLL) {
        load_step<R>(w, rows, c0, chunks);
        fma_step<R>(acc, w, x, stride_x, c0, chunks);
    }
    finish_group<R>(acc, s, b, y, g, n_out);
}
"""


class CudaTile(NamedTuple):
    """Launch shape of the CUDA GEMV: ``wrows`` output rows per warp (of each half, gated),
    ``unroll`` 16-byte loads per weight row and thread in flight per step, ``threads`` per block.
    The default was within 5% of the best tile on every Qwen-VL decoder shape at one row
    (docs/benchmarks.md, runs 27-31)."""

    wrows: int = 1
    unroll: int = 2
    threads: int = 128


_compiled: dict[tuple, object] = {}
_disabled: str | None = None  # why the kernel does not run in this process, once it failed


def disable(reason: str) -> None:
    """Stop using the CUDA GEMV in this process (a compile or launch failed): logged once."""
    global _disabled
    if _disabled is None:
        log.warning("the CUDA int8 GEMV is off in this process (%s); the Triton GEMVs serve instead", reason)
    _disabled = reason


def _compiler_ok(x: torch.Tensor) -> bool:
    return _disabled is None and x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch.cuda, "_compile_kernel")


def _weight_ok(q: torch.Tensor) -> bool:
    return (q.dtype == torch.int8 and q.dim() == 2 and q.shape[1] % 16 == 0 and q.stride(1) == 1
            and q.stride(0) % 16 == 0 and q.data_ptr() % 16 == 0)


def available(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> bool:
    """True when :func:`int8_gemv` runs ``x`` times ``q`` here: CUDA, NVRTC through torch, bf16
    ``x`` of 1-4 rows, ``K`` a multiple of 16, rows 16-byte aligned (float32 ``scale``, bf16
    ``bias``)."""
    return (_compiler_ok(x) and _weight_ok(q) and 1 <= x.shape[0] <= MAX_ROWS and x.stride(1) == 1
            and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0
            and (scale is None or (scale.dtype == torch.float32 and scale.is_contiguous()))
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous())))


def macros(rows: int, tile: CudaTile, gated: bool, has_bias: bool) -> dict[str, int]:
    """The compile-time settings of the kernel for ``rows`` rows of x and ``tile``."""
    return {"ROWS": rows, "WROWS": tile.wrows, "UNROLL": tile.unroll, "THREADS": tile.threads, "GATED": int(gated),
            "HAS_BIAS": int(has_bias)}


def _kernel(settings: dict[str, int]):
    """The kernel compiled with ``settings`` (:func:`macros`; once per process and setting)."""
    key = tuple(sorted(settings.items()))
    kernel = _compiled.get(key)
    if kernel is None:
        options = [f"-D{k}={v}" for k, v in settings.items()]
        kernel = _compiled[key] = torch.cuda._compile_kernel(SOURCE, "vlq_int8_gemv", nvcc_options=options)
    return kernel


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
              tile: CudaTile | None = None, gated: bool = False) -> torch.Tensor:
    """``x [M, K]`` (bf16, M <= 4) times int8 ``q [N, K]`` with float32 ``scale [N]`` (+ bf16
    ``bias``) -> bf16 ``[M, N]``; ``gated``: ``q`` is ``[w1 | w2]`` and the result the gate,
    ``[M, N / 2]``. Callers check :func:`available` first."""
    m, k = x.shape
    rows = q.shape[0]
    n = rows // 2 if gated else rows
    tile = CudaTile(*(tile or CudaTile()))
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    kernel = _kernel(macros(m, tile, gated, bias is not None))
    blocks = -(-n // (tile.wrows * (tile.threads // 32)))
    kernel(grid=(blocks, 1, 1), block=(tile.threads, 1, 1),
           args=[x, q, scale, bias if bias is not None else scale, y, n, k, x.stride(0), q.stride(0)])
    return y
