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

import ctypes
from typing import NamedTuple

import torch

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
    uint4 v;  // x written before this launch: read by every warp, kept in L1
    asm("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

static __device__ __forceinline__ uint4 load_fresh(const uint4* p) {
    uint4 v;  // written by other blocks of this launch: read through L2
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p) : "memory");
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

enum { X_BEFORE = 0, X_FRESH = 1, X_SHARED = 2 };  // where a GEMV's x lives (see the loads above)

// The R weight rows of output group g (WR outputs, of both halves when gated: rows n and n_out + n).
template <int WR, int R>
static __device__ __forceinline__ void group_rows(const uint4* (&rows)[R], const signed char* q, int g, int n_out,
                                                  long long stride_q) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
        const int n = min(g * WR + r % WR, n_out - 1);  // past the end: a valid row, never stored
        rows[r] = reinterpret_cast<const uint4*>(q + (long long)(n + (r / WR) * n_out) * stride_q);
    }
}

// One step of a warp's walk along K: UNROLL chunks of 16 weights per lane and row, all in flight.
template <int R>
static __device__ __forceinline__ void load_step(uint4 (&w)[UNROLL][R], const uint4* const (&rows)[R], int c0,
                                                 int chunks) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
#pragma unroll
        for (int r = 0; r < R; ++r)
            w[u][r] = c0 + 32 * u < chunks ? load_stream(rows[r] + c0 + 32 * u) : make_uint4(0, 0, 0, 0);
}

template <int R, int XMODE>
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
            if (XMODE == X_SHARED) {
                bf16x8_float(xp[0], xf[m]);
                bf16x8_float(xp[1], xf[m] + 8);
            } else if (XMODE == X_FRESH) {
                bf16x8_float(load_fresh(xp), xf[m]);
                bf16x8_float(load_fresh(xp + 1), xf[m] + 8);
            } else {
                bf16x8_float(load_cached(xp), xf[m]);
                bf16x8_float(load_cached(xp + 1), xf[m] + 8);
            }
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

template <int R>
static __device__ __forceinline__ void warp_sum(float (&acc)[ROWS][R]) {
#pragma unroll
    for (int m = 0; m < ROWS; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1)
                acc[m][r] += __shfl_xor_sync(0xffffffffu, acc[m][r], offset);
}

// scale, bias, round: the Triton epilogue's order (y = acc * s; y += b; bf16).
static __device__ __forceinline__ float scaled(float acc, const float* s, const bf16* b, int n, bool has_bias) {
    float y = acc * s[n];
    if (has_bias) y += bf16_float(b[n]);
    return y;
}

// The outputs of one group (lane 0): plain, or the gate as silu_mul (each half rounded, silu rounded,
// the product rounded).
template <int WR, int R>
static __device__ __forceinline__ void store_group(const float (&acc)[ROWS][R], const float* s, const bf16* b,
                                                   bool has_bias, bf16* y, int stride_y, int g, int n_out) {
#pragma unroll
    for (int m = 0; m < ROWS; ++m)
#pragma unroll
        for (int r = 0; r < WR; ++r) {
            const int n = g * WR + r;
            if (n >= n_out) break;
            float out = scaled(acc[m][r], s, b, n, has_bias);
            if (R > WR) {
                const float gate = round_bf16(scaled(acc[m][WR + r], s, b, n_out + n, has_bias));
                out = round_bf16(out) * round_bf16(gate / (1.0f + expf(-gate)));
            }
            y[(long long)m * stride_y + n] = to_bf16(out);
        }
}

// A warp's share of one GEMV: groups g, g + groups_stride, ...; the first step of the first group
// may have been loaded already (first_loaded), e.g. before a grid barrier.
template <int WR, int R, int XMODE>
static __device__ __forceinline__ void gemv_groups(uint4 (&w)[UNROLL][R], bool first_loaded, const bf16* x,
                                                   int stride_x, const signed char* q, const float* s,
                                                   const bf16* b, bool has_bias, bf16* y, int stride_y, int n_out,
                                                   int k, long long stride_q, int g, int groups_stride) {
    const int lane = threadIdx.x & 31;
    const int chunks = k >> 4;
    const int groups = (n_out + WR - 1) / WR;
    for (; g < groups; g += groups_stride, first_loaded = false) {
        const uint4* rows[R];
        group_rows<WR, R>(rows, q, g, n_out, stride_q);
        float acc[ROWS][R];
#pragma unroll
        for (int m = 0; m < ROWS; ++m)
#pragma unroll
            for (int r = 0; r < R; ++r) acc[m][r] = 0.0f;
        for (int c0 = lane; c0 < chunks; c0 += 32 * UNROLL) {
            if (!(first_loaded && c0 == lane)) load_step<R>(w, rows, c0, chunks);
            fma_step<R, XMODE>(acc, w, x, stride_x, c0, chunks);
        }
        warp_sum<R>(acc);
        if (lane == 0) store_group<WR, R>(acc, s, b, has_bias, y, stride_y, g, n_out);
    }
}

template <int WR, int R>
static __device__ __forceinline__ void load_first(uint4 (&w)[UNROLL][R], const signed char* q, int n_out, int k,
                                                  long long stride_q, int g) {
    if (g * WR >= n_out) return;
    const uint4* rows[R];
    group_rows<WR, R>(rows, q, g, n_out, stride_q);
    load_step<R>(w, rows, threadIdx.x & 31, k >> 4);
}

#ifndef MLP_BLOCK
// y [ROWS, n_out] = x @ (q * s).T (+ b); GATED: q is [w1 | w2] and y the gate. One group of WROWS
// outputs per warp.
extern "C" __global__ void __launch_bounds__(THREADS)
vlq_int8_gemv(const bf16* __restrict__ x, const signed char* __restrict__ q, const float* __restrict__ s,
              const bf16* __restrict__ b, bf16* __restrict__ y, int n_out, int k, int stride_x, int stride_q) {
    constexpr int R = WROWS * (GATED ? 2 : 1);
    uint4 w[UNROLL][R];
    const int warp = blockIdx.x * (THREADS / 32) + (threadIdx.x >> 5);
    gemv_groups<WROWS, R, X_BEFORE>(w, false, x, stride_x, q, s, b, HAS_BIAS, y, n_out, n_out, k, stride_q, warp,
                                    1 << 30);
}
#else
// Every block arrives, then waits for all: the grid is sized to be resident at once.
static __device__ __forceinline__ void grid_barrier(u32* counter, u32 target) {
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        atomicAdd(counter, 1u);
        u32 seen;
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(seen) : "l"(counter) : "memory");
        } while (seen < target);
    }
    __syncthreads();
}

// A decoder block after attention, for ROWS tokens, in one persistent launch:
//   t = c_proj(attn); residual_out = residual + t; h = rms_norm(residual_out) * ln;
//   g = w1(h) * silu(w2(h)); y = down(g).
// Grid barriers separate the three GEMVs; before each, every warp already loads its first weights of
// the next GEMV, so the wait overlaps the weight stream. h lives in shared memory, t and g in global
// scratch. counter: two zeroed words, zero again when the launch ends.
extern "C" __global__ void __launch_bounds__(THREADS, MIN_BLOCKS)
vlq_int8_mlp_block(const bf16* __restrict__ attn, const bf16* __restrict__ residual,
                   const signed char* __restrict__ q_proj, const float* __restrict__ s_proj,
                   const bf16* __restrict__ ln, double eps,
                   const signed char* __restrict__ q_up, const float* __restrict__ s_up,
                   const signed char* __restrict__ q_down, const float* __restrict__ s_down,
                   bf16* t, bf16* residual_out, bf16* g, bf16* __restrict__ y, u32* counter, int c, int f) {
    __shared__ __align__(16) bf16 h[ROWS * HIDDEN];
    __shared__ float partial[THREADS / 32][ROWS];
    const int warps = THREADS / 32;
    const int warp = blockIdx.x * warps + (threadIdx.x >> 5);
    const int all_warps = gridDim.x * warps;
    uint4 w1[UNROLL][1];
    uint4 w2[UNROLL][2];

    gemv_groups<1, 1, X_BEFORE>(w1, false, attn, c, q_proj, s_proj, nullptr, false, t, c, c, c, c, warp, all_warps);
    load_first<1, 2>(w2, q_up, f, c, c, warp);
    grid_barrier(counter, gridDim.x);

    // residual add and RMSNorm, every block for itself (as the Triton kernel: the sum rounded to bf16)
    float sq[ROWS];
#pragma unroll
    for (int m = 0; m < ROWS; ++m) sq[m] = 0.0f;
    for (int i = threadIdx.x * 8; i < c; i += THREADS * 8) {
#pragma unroll
        for (int m = 0; m < ROWS; ++m) {
            float a[8], d[8];
            bf16x8_float(load_cached(reinterpret_cast<const uint4*>(residual + m * c + i)), a);
            bf16x8_float(load_fresh(reinterpret_cast<const uint4*>(t + m * c + i)), d);
            u32 packed[4];
#pragma unroll
            for (int e = 0; e < 8; e += 2) {
                const bf16 lo = to_bf16(a[e] + d[e]), hi = to_bf16(a[e + 1] + d[e + 1]);
                const float flo = bf16_float(lo), fhi = bf16_float(hi);
                sq[m] = fmaf(flo, flo, sq[m]);
                sq[m] = fmaf(fhi, fhi, sq[m]);
                packed[e / 2] = (u32)lo | ((u32)hi << 16);
            }
            const uint4 sum = make_uint4(packed[0], packed[1], packed[2], packed[3]);
            *reinterpret_cast<uint4*>(h + m * c + i) = sum;
            if (blockIdx.x == 0) *reinterpret_cast<uint4*>(residual_out + m * c + i) = sum;
        }
    }
#pragma unroll
    for (int m = 0; m < ROWS; ++m) {
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) sq[m] += __shfl_xor_sync(0xffffffffu, sq[m], offset);
        if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5][m] = sq[m];
    }
    __syncthreads();
    for (int i = threadIdx.x * 8; i < c; i += THREADS * 8) {
#pragma unroll
        for (int m = 0; m < ROWS; ++m) {
            float total = 0.0f;
#pragma unroll
            for (int v = 0; v < warps; ++v) total += partial[v][m];
            const float inv = rsqrtf(total / c + (float)eps);
            float r[8], lw[8];
            bf16x8_float(*reinterpret_cast<const uint4*>(h + m * c + i), r);
            bf16x8_float(load_cached(reinterpret_cast<const uint4*>(ln + i)), lw);
            u32 packed[4];
#pragma unroll
            for (int e = 0; e < 8; e += 2) {
                const bf16 lo = to_bf16(round_bf16(r[e] * inv) * lw[e]);
                const bf16 hi = to_bf16(round_bf16(r[e + 1] * inv) * lw[e + 1]);
                packed[e / 2] = (u32)lo | ((u32)hi << 16);
            }
            *reinterpret_cast<uint4*>(h + m * c + i) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
        }
    }
    __syncthreads();

    gemv_groups<1, 2, X_SHARED>(w2, true, h, c, q_up, s_up, nullptr, false, g, f, f, c, c, warp, all_warps);
    load_first<1, 1>(w1, q_down, c, f, f, warp);
    grid_barrier(counter, 2 * gridDim.x);

    gemv_groups<1, 1, X_FRESH>(w1, true, g, f, q_down, s_down, nullptr, false, y, c, c, f, f, warp, all_warps);

    // the last block out sets the counter back to zero for the next launch
    __syncthreads();
    if (threadIdx.x == 0) {
        __threadfence();
        if (atomicAdd(counter + 1, 1u) == gridDim.x - 1) {
            counter[0] = 0;
            counter[1] = 0;
            __threadfence();
        }
    }
}
#endif
"""


class CudaTile(NamedTuple):
    """Launch shape of the CUDA GEMV: ``wrows`` output rows per warp (of each half, gated),
    ``unroll`` 16-byte loads per weight row and thread in flight per step, ``threads`` per block."""

    wrows: int = 2
    unroll: int = 8
    threads: int = 128


class MlpTile(NamedTuple):
    """Launch shape of :func:`int8_mlp_block`: ``unroll`` as :class:`CudaTile`'s (one output row
    per warp), at least ``min_blocks`` blocks of ``threads`` resident per multiprocessor (the
    compiler keeps registers under that bound), and the grid is as many blocks as are resident."""

    unroll: int = 4
    min_blocks: int = 4
    threads: int = 128


_compiled: dict[tuple, object] = {}
_counters: dict[torch.device, torch.Tensor] = {}


def _compiler_ok(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and hasattr(torch.cuda, "_compile_kernel")


def _weight_ok(q: torch.Tensor) -> bool:
    return (q.dtype == torch.int8 and q.dim() == 2 and q.shape[1] % 16 == 0 and q.stride(1) == 1
            and q.stride(0) % 16 == 0 and q.data_ptr() % 16 == 0)


def available(x: torch.Tensor, q: torch.Tensor) -> bool:
    """True when :func:`int8_gemv` runs ``x`` times ``q`` here: CUDA, NVRTC through torch, bf16
    ``x`` of 1-4 rows, ``K`` a multiple of 16, rows 16-byte aligned."""
    return (_compiler_ok(x) and _weight_ok(q) and 1 <= x.shape[0] <= MAX_ROWS and x.stride(1) == 1
            and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0)


def _kernel(name: str, macros: dict[str, int]):
    key = (name, tuple(sorted(macros.items())))
    kernel = _compiled.get(key)
    if kernel is None:
        options = [f"-D{k}={v}" for k, v in macros.items()]
        kernel = _compiled[key] = torch.cuda._compile_kernel(SOURCE, name, nvcc_options=options)
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
    kernel = _kernel("vlq_int8_gemv", {"ROWS": m, "WROWS": tile.wrows, "UNROLL": tile.unroll,
                                       "THREADS": tile.threads, "GATED": int(gated), "HAS_BIAS": int(bias is not None)})
    blocks = -(-n // (tile.wrows * (tile.threads // 32)))
    kernel(grid=(blocks, 1, 1), block=(tile.threads, 1, 1),
           args=[x, q, scale, bias if bias is not None else scale, y, n, k, x.stride(0), q.stride(0)])
    return y


def _resident_blocks(kernel, threads: int, device: torch.device) -> int:
    """Blocks of ``kernel`` resident at once on the whole device (the driver's occupancy count)."""
    libcuda = ctypes.CDLL("libcuda.so.1")
    per_sm = ctypes.c_int()
    err = libcuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(ctypes.byref(per_sm), kernel.func, ctypes.c_int(threads),
                                                              ctypes.c_size_t(0))
    if err != 0 or per_sm.value < 1:
        raise RuntimeError(f"cuOccupancyMaxActiveBlocksPerMultiprocessor failed ({err}, {per_sm.value})")
    return per_sm.value * torch.cuda.get_device_properties(device).multi_processor_count


def mlp_block_available(attn: torch.Tensor, residual: torch.Tensor, *weights: torch.Tensor) -> bool:
    """True when :func:`int8_mlp_block` runs here: contiguous bf16 ``attn`` and ``residual`` of the
    same 1-4 rows on CUDA (their rows fit the block's shared memory), every weight as
    :func:`available` wants it, and outside a graph capture unless the barrier counter exists."""
    m, c = attn.shape
    if not (_compiler_ok(attn) and attn.shape == residual.shape and attn.is_contiguous() and residual.is_contiguous()
            and residual.dtype == attn.dtype and c % 16 == 0 and m * c * 2 <= 40960):
        return False
    if attn.device not in _counters and torch.cuda.is_current_stream_capturing():
        return False
    return (1 <= m <= MAX_ROWS and attn.data_ptr() % 16 == 0 and residual.data_ptr() % 16 == 0
            and all(_weight_ok(w) and w.is_contiguous() for w in weights))


def int8_mlp_block(attn: torch.Tensor, residual: torch.Tensor, proj_q: torch.Tensor, proj_s: torch.Tensor,
                   ln: torch.Tensor, eps: float, up_q: torch.Tensor, up_s: torch.Tensor, down_q: torch.Tensor,
                   down_s: torch.Tensor, tile: MlpTile | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A decoder block after attention, in one launch, for 1-4 tokens (``attn``, ``residual``:
    ``[M, C]`` bf16): ``residual + c_proj(attn)`` -> RMSNorm (``ln``, ``eps``) -> the gate of
    ``[w1 | w2]`` (``up_q [2F, C]``) -> ``down`` (``down_q [C, F]``). Returns ``(down output,
    residual + c_proj(attn))``, each ``[M, C]``: what ``rms_norm(residual, ln, eps, c_proj(attn))``
    then ``linear(gated_linear(h))`` give, up to the order of the RMSNorm's float32 sum. Callers
    check :func:`mlp_block_available` first."""
    m, c = attn.shape
    f = down_q.shape[1]
    tile = MlpTile(*(tile or MlpTile()))
    kernel = _kernel("vlq_int8_mlp_block", {"MLP_BLOCK": 1, "ROWS": m, "UNROLL": tile.unroll, "THREADS": tile.threads,
                                            "MIN_BLOCKS": tile.min_blocks, "HIDDEN": c})
    key = ("blocks", kernel.func.value, tile.threads)
    blocks = _compiled.get(key)
    if blocks is None:
        blocks = _compiled[key] = _resident_blocks(kernel, tile.threads, attn.device)
    counter = _counters.get(attn.device)
    if counter is None:
        counter = _counters[attn.device] = torch.zeros(2, dtype=torch.int32, device=attn.device)
    t, out = torch.empty_like(attn), torch.empty_like(attn)
    g = torch.empty(m, f, dtype=attn.dtype, device=attn.device)
    y = torch.empty_like(attn)
    kernel(grid=(blocks, 1, 1), block=(tile.threads, 1, 1),
           args=[attn, residual, proj_q, proj_s, ln, float(eps), up_q, up_s, down_q, down_s, t, out, g, y, counter, c, f])
    return y, out
