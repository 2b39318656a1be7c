"""The int8 decode GEMV in CUDA C++, compiled at run time with NVRTC (no compiler on the worker).

``y [M, N] = x [M, K] @ (q [N, K] * scale [N]).T (+ bias [N])`` for 1-4 rows of bf16 ``x``, int8
``q`` (stored as uint8 ``q + 128``, :func:`.kernels.quantize_int8`) and float32 ``scale``;
``gated``: ``q`` is ``[w1 | w2]`` (``[2N, K]``) and ``y`` is ``w1(x) * silu(w2(x))``, rounded as
:func:`.kernels.silu_mul` rounds it. This is the kernel the Triton GEMVs of :mod:`.kernels` could
not be made into: ``ksplit`` warps of one block own ``wrows`` output rows whole, each over its
slice of K (one warp by default; no second launch), and every thread first issues all of its
``unroll`` 16-byte weight loads per row (``ld.global.nc`` without L1 allocation: each weight byte
is read once), then converts them to float32 with one byte permute and a subtraction per weight
(the stored byte is the mantissa it needs, no sign bit to flip) and does one FMA per weight and
row of ``x``. Each warp adds its lanes' sums with shuffles at the end, and a group's warps add
theirs in the block, in a fixed order: answers do not depend on timing.

Two fusions spare the decode step its RMSNorm launches (:func:`.kernels.norm_linear`): with
``norm`` the kernel first puts x through the decoder's RMSNorm, each block into its shared
memory, and its grid holds only the blocks that fit on the card at once (:func:`resident_blocks`),
each walking many output groups, so that x is normalised once per resident block; with
``residual`` it adds the residual stream to its output. Both round as the separate launches do;
the norm adds its squares in its own fixed order (docs/benchmarks.md, runs 78-87).

:func:`int8_gemv` launches it on the current stream (so CUDA graphs capture it);
:func:`available` says whether this torch can compile it (``torch.cuda._compile_kernel``, a CUDA
build, bf16 activations, ``K`` a multiple of 16 and 16-byte aligned rows). Where it cannot,
:mod:`.kernels` keeps its Triton GEMVs.

:func:`int8_gemv_mma` is the same product on the tensor cores (1-8 rows of x): each warp converts
its weights to f16 in registers (one byte permute and one packed subtraction per two weights) and
feeds them to ``mma.m16n8k16`` with the rows of x, staged as f16 in shared memory by each warp
for its share of K, as the other operand. On the decoder shapes it is slower than
:func:`int8_gemv` (docs/benchmarks.md, runs 34-45: also with the weights stored in a blocked
layout that makes each warp's loads contiguous, which won alone but lost inside the decode graph
and was removed after run 57), so no shape runs it by default (:data:`.kernels.INT8_GEMV_BY_SHAPE`);
the benchmarks time it beside the others.
"""

from __future__ import annotations

import ctypes
import logging
import struct
from typing import NamedTuple

import torch

log = logging.getLogger(__name__)

MAX_ROWS = 4

# bf16 <-> float32 in CUDA C++, shared by the CUDA kernels of this package (NVRTC: no headers).
BF16_HELPERS = r"""
typedef unsigned short bf16;
typedef unsigned int u32;

static __device__ __forceinline__ bf16 to_bf16(float f) {
    bf16 h;  // round to nearest even, as torch rounds
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}

static __device__ __forceinline__ float bf16_float(bf16 h) { return __uint_as_float((u32)h << 16); }

static __device__ __forceinline__ float round_bf16(float f) { return bf16_float(to_bf16(f)); }

static __device__ __forceinline__ void bf16x8_float(uint4 v, float* out) {  // the 8 bf16 of 16 bytes
    out[0] = __uint_as_float(v.x << 16); out[1] = __uint_as_float(v.x & 0xffff0000u);
    out[2] = __uint_as_float(v.y << 16); out[3] = __uint_as_float(v.y & 0xffff0000u);
    out[4] = __uint_as_float(v.z << 16); out[5] = __uint_as_float(v.z & 0xffff0000u);
    out[6] = __uint_as_float(v.w << 16); out[7] = __uint_as_float(v.w & 0xffff0000u);
}

"""

_HELPERS = BF16_HELPERS + r"""
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

// scale, bias, round: the Triton epilogue's order (y = acc * s; y += b; bf16).
static __device__ __forceinline__ float scaled(float acc, const float* s, const bf16* b, int n) {
    float y = acc * s[n];
    if (HAS_BIAS) y += bf16_float(b[n]);
    return y;
}

"""

_FMA_KERNEL = r"""
#if NORM
constexpr int NORM_LOADS = NORM_K / 8 / THREADS;  // 16-byte pieces of each row of x per thread

// Where piece i (8 values) of a row of x sits in shared memory: a row's chunk c (16 values) as two
// halves NORM_K / 16 uint4 apart, so that a warp's lanes, reading chunks c0 + lane, hit distinct banks.
static __device__ __forceinline__ int norm_slot(int m, int i) {
    return m * (NORM_K / 8) + (i & 1) * (NORM_K / 16) + (i >> 1);
}
#endif

// Four int8 weights of one word -> float32, exactly: each stored byte (q + 128) becomes the mantissa
// of 2^23, and 2^23 + 128 comes off again.
static __device__ __forceinline__ void int8x4_float(u32 w, float* out) {
    out[0] = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7540)) - 8388736.0f;
    out[1] = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7541)) - 8388736.0f;
    out[2] = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7542)) - 8388736.0f;
    out[3] = __uint_as_float(__byte_perm(w, 0x4B000000u, 0x7543)) - 8388736.0f;
}

// The R weight rows of output group g (WROWS outputs, of both halves when gated: rows n and n_out + n).
template <int R>
static __device__ __forceinline__ void group_rows(const uint4* (&rows)[R], const unsigned char* q, int g, int n_out,
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
#if NORM
            const uint4* xp = reinterpret_cast<const uint4*>(x) + norm_slot(m, 2 * c);  // shared memory
            bf16x8_float(xp[0], xf[m]);
            bf16x8_float(xp[NORM_K / 16], xf[m] + 8);
#else
            const uint4* xp = reinterpret_cast<const uint4*>(x + (long long)m * stride_x) + 2 * c;
            bf16x8_float(load_cached(xp), xf[m]);
            bf16x8_float(load_cached(xp + 1), xf[m] + 8);
#endif
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

// Add up the lanes' sums of group g (with KSPLIT, then the group's warps' sums, in split order) and
// store its outputs (lane 0 of the group's first warp): plain, or the gate as silu_mul does it (each
// half rounded, silu rounded, the product rounded); RESIDUAL: plus the residual stream's value.
// Every warp of the block calls it (KSPLIT > 1: it holds a barrier); those of groups past the end
// store nothing.
template <int R>
static __device__ __forceinline__ void finish_group(float (&acc)[ROWS][R], const float* s, const bf16* b,
                                                    const bf16* res, bf16* y, int g, int n_out) {
#pragma unroll
    for (int m = 0; m < ROWS; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1)
                acc[m][r] += __shfl_xor_sync(0xffffffffu, acc[m][r], offset);
#if KSPLIT > 1
    __shared__ float sums[THREADS / 32][ROWS][R];
    const int warp = threadIdx.x >> 5;
    if ((threadIdx.x & 31) == 0)
#pragma unroll
        for (int m = 0; m < ROWS; ++m)
#pragma unroll
            for (int r = 0; r < R; ++r) sums[warp][m][r] = acc[m][r];
    __syncthreads();
    if (warp % KSPLIT != 0) return;
#pragma unroll
    for (int m = 0; m < ROWS; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float total = sums[warp][m][r];
#pragma unroll
            for (int split = 1; split < KSPLIT; ++split) total += sums[warp + split][m][r];
            acc[m][r] = total;
        }
#endif
    if ((threadIdx.x & 31) != 0 || g * WROWS >= n_out) return;
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
            if (RESIDUAL)  // the residual stream plus this output, rounded as the eager residual add
                out = bf16_float(res[(long long)m * n_out + n]) + round_bf16(out);
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

#if NORM
// The rows of x through the decoder's RMSNorm, rounded as kernels.rms_norm rounds them (x times
// rsqrt(mean(x^2) + eps), rounded; times the norm's weight, rounded), into the block's shared memory
// (norm_slot). Every thread of the block takes part: it copies its pieces of x there while adding
// their squares, then normalises the same pieces in place. The squares are added in a fixed order
// (each thread's, the warp's shuffles, the warps in order), so every block gets the same bits.
static __device__ __forceinline__ void normalize(uint4* xs, const bf16* x, int stride_x, const bf16* weight,
                                                 float eps) {
    __shared__ float parts[THREADS / 32][ROWS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    float sq[ROWS];
#pragma unroll
    for (int m = 0; m < ROWS; ++m) {
        uint4 v[NORM_LOADS];
#pragma unroll
        for (int j = 0; j < NORM_LOADS; ++j)
            v[j] = load_cached(reinterpret_cast<const uint4*>(x + (long long)m * stride_x) + threadIdx.x + j * THREADS);
        sq[m] = 0.0f;
#pragma unroll
        for (int j = 0; j < NORM_LOADS; ++j) {
            float f[8];
            bf16x8_float(v[j], f);
#pragma unroll
            for (int i = 0; i < 8; ++i) sq[m] = fmaf(f[i], f[i], sq[m]);
            xs[norm_slot(m, threadIdx.x + j * THREADS)] = v[j];
        }
    }
#pragma unroll
    for (int m = 0; m < ROWS; ++m) {
#pragma unroll
        for (int offset = 16; offset > 0; offset >>= 1) sq[m] += __shfl_xor_sync(0xffffffffu, sq[m], offset);
        if (lane == 0) parts[warp][m] = sq[m];
    }
    __syncthreads();
#pragma unroll
    for (int j = 0; j < NORM_LOADS; ++j) {
        float g[8];
        bf16x8_float(load_cached(reinterpret_cast<const uint4*>(weight) + threadIdx.x + j * THREADS), g);
#pragma unroll
        for (int m = 0; m < ROWS; ++m) {
            float total = 0.0f;
#pragma unroll
            for (int w = 0; w < THREADS / 32; ++w) total += parts[w][m];
            const float rstd = rsqrtf(total / (float)NORM_K + eps);
            uint4* slot = xs + norm_slot(m, threadIdx.x + j * THREADS);
            float f[8];
            bf16x8_float(*slot, f);
            u32 h[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) h[i] = to_bf16(round_bf16(f[i] * rstd) * g[i]);
            *slot = make_uint4(h[0] | h[1] << 16, h[2] | h[3] << 16, h[4] | h[5] << 16, h[6] | h[7] << 16);
        }
    }
    __syncthreads();
}
#endif

// y [ROWS, n_out] = x @ (q * s).T (+ b); GATED: q is [w1 | w2] ([2 n_out, k]) and y the gate. Each
// group of WROWS outputs is owned whole by KSPLIT warps of one block, each walking its own slice of
// K (whole multiples of 32 chunks); their sums are added in the block in slice order (KSPLIT 1: one
// warp, no barrier). No second launch, the same order of sums every time.
// NORM: x is first put through the RMSNorm with weight norm_w (each block normalises the rows of x
// into its shared memory, while its first weights are in flight), so the norm takes no launch of
// its own. RESIDUAL: y is res [ROWS, n_out] plus the product (the residual add, fused likewise).
#if MIN_BLOCKS > 0
#define GEMV_BOUNDS __launch_bounds__(THREADS, MIN_BLOCKS)  // registers capped so that MIN_BLOCKS fit an SM
#else
#define GEMV_BOUNDS __launch_bounds__(THREADS)
#endif
extern "C" __global__ void GEMV_BOUNDS
vlq_int8_gemv(const bf16* __restrict__ x, const unsigned char* __restrict__ q, const float* __restrict__ s,
              const bf16* __restrict__ b, bf16* __restrict__ y, int n_out, int k, int stride_x, int stride_q,
              const bf16* __restrict__ norm_w, int eps_bits, const bf16* __restrict__ res) {
    constexpr int R = WROWS * (GATED ? 2 : 1);  // weight rows per warp
    constexpr int GROUPS = THREADS / 32 / KSPLIT;  // output groups per block at a time
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int g = blockIdx.x * GROUPS + warp / KSPLIT;  // this warp's output group
    if (!NORM && KSPLIT == 1 && g * WROWS >= n_out) return;
    const int chunks = k >> 4;  // 16 weights (bytes) a chunk
    const int per_split = (chunks + 32 * KSPLIT - 1) / (32 * KSPLIT) * 32;
    const int c_begin = (warp % KSPLIT) * per_split;
    int c_end = g * WROWS < n_out ? min(c_begin + per_split, chunks) : 0;
    const uint4* rows[R];
    group_rows<R>(rows, q, g, n_out, stride_q);
    uint4 w[UNROLL][R];
#if NORM
    // The grid holds only the blocks that fit on the card at once: each normalises x once (its first
    // weights in flight meanwhile), then takes groups g, g + gridDim.x * GROUPS, ..., loading each
    // group's first weights before it finishes the one before.
    __shared__ uint4 xs[ROWS * NORM_K / 8];
    if (c_begin + lane < c_end) load_step<R>(w, rows, c_begin + lane, c_end);
    normalize(xs, x, stride_x, norm_w, __int_as_float(eps_bits));
    for (;;) {
        float acc[ROWS][R];
        zero<R>(acc);
        for (int c0 = c_begin + lane; c0 < c_end; c0 += 32 * UNROLL) {
            if (c0 != c_begin + lane) load_step<R>(w, rows, c0, c_end);
            fma_step<R>(acc, w, reinterpret_cast<const bf16*>(xs), stride_x, c0, c_end);
        }
        const int next = g + gridDim.x * GROUPS;
        const bool more = (next - warp / KSPLIT) * WROWS < n_out;  // the same for the whole block
        int next_end = 0;
        if (more) {
            group_rows<R>(rows, q, next, n_out, stride_q);
            next_end = next * WROWS < n_out ? min(c_begin + per_split, chunks) : 0;
            if (c_begin + lane < next_end) load_step<R>(w, rows, c_begin + lane, next_end);
        }
        finish_group<R>(acc, s, b, res, y, g, n_out);
        if (!more) break;
        if (KSPLIT > 1) __syncthreads();  // finish_group's shared sums are read before they are rewritten
        g = next;
        c_end = next_end;
    }
#else
    float acc[ROWS][R];
    zero<R>(acc);
    for (int c0 = c_begin + lane; c0 < c_end; c0 += 32 * UNROLL) {
        load_step<R>(w, rows, c0, c_end);
        fma_step<R>(acc, w, x, stride_x, c0, c_end);
    }
    finish_group<R>(acc, s, b, res, y, g, n_out);
#endif
}
"""

SOURCE = _HELPERS + _FMA_KERNEL

_MMA_KERNEL = r"""
// Two int8 weights (bytes 0-1 of t: selector 0x4140, bytes 2-3: 0x4342; each stored as q + 128)
// -> f16x2, exactly: each byte becomes the low mantissa of 1024 (0x64xx = 1024 +
// byte), and 1024 + 128 comes off again.
static __device__ __forceinline__ u32 int8x2_half2(u32 t, u32 selector) {
    const u32 h = __byte_perm(t, 0x64646464u, selector);
    u32 out;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(out) : "r"(h), "r"(0x64806480u));
    return out;
}

// Two bf16 of x times scale (a power of two) -> f16x2 (exact from 2^-14 to 65504).
static __device__ __forceinline__ u32 bf16x2_half2(u32 v, float scale) {
    const float lo = __uint_as_float(v << 16) * scale, hi = __uint_as_float(v & 0xffff0000u) * scale;
    u32 out;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(out) : "f"(hi), "f"(lo));
    return out;
}

static __device__ __forceinline__ u32 abs_max_bits(uint4 v, u32 m) {  // float bits of the largest |bf16|
    m = max(m, max((v.x << 16) & 0x7fffffffu, v.x & 0x7fff0000u));  // non-negative floats order as ints
    m = max(m, max((v.y << 16) & 0x7fffffffu, v.y & 0x7fff0000u));
    m = max(m, max((v.z << 16) & 0x7fffffffu, v.z & 0x7fff0000u));
    return max(m, max((v.w << 16) & 0x7fffffffu, v.w & 0x7fff0000u));
}

// c [16 x 8] += a [16 x 16] . b [16 x 8]: f16 in, f32 accumulated, on the tensor cores.
static __device__ __forceinline__ void mma(float (&c)[4], u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

constexpr int WARPS = GROUPS * SPLITS;

// The power of two (its exponent) a share of a row of x is scaled by on its way to f16, from the
// float bits of its largest |x|: 0 while that lies in [2^-6, 65504], where every bf16 of it that
// matters is an f16 too; else the one that puts it in [2^14, 2^15). inf and nan stay as they are.
static __device__ __forceinline__ int shift_for(u32 bits) {
    const float top = __uint_as_float(bits);
    if (bits >= 0x7f800000u || bits == 0u || (top >= 0.015625f && top <= 65504.0f)) return 0;
    int e;
    frexpf(top, &e);  // top < 2^e
    return min(126, 15 - e);
}

static __device__ __forceinline__ uint4 bf16x8_half8(uint4 v, float scale) {
    return make_uint4(bf16x2_half2(v.x, scale), bf16x2_half2(v.y, scale), bf16x2_half2(v.z, scale),
                      bf16x2_half2(v.w, scale));
}

constexpr int STAGE_UNROLL = ROWS >= 8 ? 1 : 8 / ROWS;  // uint4 of x per thread and row in flight

// This warp's chunks [c_begin, c_end) of x [ROWS, k] (bf16) -> xs (f16x2 words, rows xrow words
// apart, chunk c_begin at word 0), each row scaled by 2^shift[m] (shift_for the largest |x| of the
// warp's share; its sums are scaled back before the shares are added). Only the warp waits for
// it: every thread's loads in flight together, one pass unless a row is out of range.
static __device__ __forceinline__ void stage_x(u32* xs, int xrow, const bf16* x, int stride_x, int c_begin,
                                                    int c_end, int (&shift)[ROWS]) {
    const int lane = threadIdx.x & 31;
    const int n = (c_end - c_begin) * 8;  // uint4 of 8 bf16 per row of the share
    u32 top[ROWS];
#pragma unroll
    for (int m = 0; m < ROWS; ++m) top[m] = 0u;
    for (int i0 = lane; i0 < n; i0 += 32 * STAGE_UNROLL) {
        uint4 v[ROWS][STAGE_UNROLL];
#pragma unroll
        for (int m = 0; m < ROWS; ++m)
#pragma unroll
            for (int j = 0; j < STAGE_UNROLL; ++j) {
                const int i = i0 + 32 * j;
                const uint4* row = reinterpret_cast<const uint4*>(x + (long long)m * stride_x) + 8 * c_begin;
                v[m][j] = i < n ? load_cached(row + i) : make_uint4(0, 0, 0, 0);
            }
#pragma unroll
        for (int m = 0; m < ROWS; ++m)
#pragma unroll
            for (int j = 0; j < STAGE_UNROLL; ++j) {
                const int i = i0 + 32 * j;
                if (i >= n) break;
                top[m] = abs_max_bits(v[m][j], top[m]);
                *reinterpret_cast<uint4*>(xs + m * xrow + 4 * i) = bf16x8_half8(v[m][j], 1.0f);
            }
    }
#pragma unroll
    for (int m = 0; m < ROWS; ++m) {
        shift[m] = shift_for(__reduce_max_sync(0xffffffffu, top[m]));
        if (shift[m] == 0) continue;  // rare: convert this row again, scaled
        const uint4* row = reinterpret_cast<const uint4*>(x + (long long)m * stride_x) + 8 * c_begin;
        for (int i = lane; i < n; i += 32)
            *reinterpret_cast<uint4*>(xs + m * xrow + 4 * i) =
                bf16x8_half8(load_cached(row + i), ldexpf(1.0f, shift[m]));
    }
    __syncwarp();
}

// UNROLL chunks (64 weights of a row) from c0 on: this lane's 16 bytes of its two rows in each.
static __device__ __forceinline__ void load_chunks(uint4 (&wl)[UNROLL], uint4 (&wh)[UNROLL], const uint4* lo,
                                                   const uint4* hi, int c0, int c_end) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const bool in = c0 + u < c_end;
        wl[u] = in ? load_stream(lo + 4 * (c0 + u)) : make_uint4(0, 0, 0, 0);  // 64 bytes a chunk
        wh[u] = in ? load_stream(hi + 4 * (c0 + u)) : make_uint4(0, 0, 0, 0);
    }
}

// acc += the chunks' 16 x 8 products, four m16n8k16 steps a chunk. The mma's k order is free as
// long as both operands follow it: lane (row8, quad) holds k 2quad, 2quad + 1, 2quad + 8, 2quad + 9
// of each step in both, which here are this lane's 4 contiguous bytes (and x values) of the step,
// so a lane's weights are 16 contiguous bytes per row and chunk, read straight from row-major q.
static __device__ __forceinline__ void mma_chunks(float (&acc)[4], const uint4 (&wl)[UNROLL], const uint4 (&wh)[UNROLL],
                                                  const u32* xs, int xrow, int c0, int c_end, int c_base, int row8,
                                                  int quad) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        if (c0 + u >= c_end) break;
        uint4 x0 = make_uint4(0, 0, 0, 0), x1 = x0;  // columns past the rows of x: zero
        if (row8 < ROWS) {
            const uint4* xp = reinterpret_cast<const uint4*>(xs + row8 * xrow + 32 * (c0 + u - c_base) + 8 * quad);
            x0 = xp[0];
            x1 = xp[1];
        }
        const u32 lo[4] = {wl[u].x, wl[u].y, wl[u].z, wl[u].w};
        const u32 hi[4] = {wh[u].x, wh[u].y, wh[u].z, wh[u].w};
        const u32 b[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
        for (int t = 0; t < 4; ++t)
            mma(acc, int8x2_half2(lo[t], 0x4140), int8x2_half2(hi[t], 0x4140), int8x2_half2(lo[t], 0x4342),
                int8x2_half2(hi[t], 0x4342), b[2 * t], b[2 * t + 1]);
    }
}

// y [ROWS, n_out] = x @ (q * s).T (+ b); GATED: q is [w1 | w2] ([2 n_out, k]) and y the gate. A
// warp owns a group of 16 weight rows (gated: 8 rows of each half, so that one lane holds both
// halves of an output) over its SPLITS-th of K, on the tensor cores: weights as the 16 x 16
// operand, converted to f16 exactly in registers, the rows of x (f16, each warp staging its own
// share in shared memory) as the 16 x 8 one, float32 sums. The block's SPLITS warps of a group add
// their sums in shared memory in a fixed order: answers do not depend on timing.
extern "C" __global__ void __launch_bounds__(WARPS * 32)
vlq_int8_gemv_mma(const bf16* __restrict__ x, const unsigned char* __restrict__ q, const float* __restrict__ s,
                  const bf16* __restrict__ b, bf16* __restrict__ y, int n_out, int k, int stride_x, int stride_q) {
    extern __shared__ uint4 smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, row8 = lane >> 2, quad = lane & 3;
    const int group = blockIdx.x * GROUPS + warp / SPLITS, split = warp % SPLITS;
    const bool active = group < (GATED ? n_out / 8 : n_out / 16);
    const int chunks = k >> 6;  // 64 weights a chunk
    const int c_begin = active ? split * chunks / SPLITS : 0, c_end = active ? (split + 1) * chunks / SPLITS : 0;
    const int lo_row = active ? (GATED ? group * 8 : group * 16) + row8 : 0;
    const int hi_row = GATED ? n_out + lo_row : lo_row + 8;
    const uint4* lo = reinterpret_cast<const uint4*>(q + (long long)lo_row * stride_q) + quad;
    const uint4* hi = reinterpret_cast<const uint4*>(q + (long long)hi_row * stride_q) + quad;

    uint4 wl[UNROLL], wh[UNROLL];
    load_chunks(wl, wh, lo, hi, c_begin, c_end);  // in flight while x is staged
    // f16x2 words per staged row of a share, 16 bytes more than the share: rows on other banks.
    // Each warp's region of shared memory holds its share of x, then its 32 float4 of sums.
    const int xrow = (chunks + SPLITS - 1) / SPLITS * 32 + 4;
    u32* region = reinterpret_cast<u32*>(smem) + warp * max(ROWS * xrow, 128);
    u32* xs = region;
    int shift[ROWS];
    stage_x(xs, xrow, x, stride_x, c_begin, c_end, shift);
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};  // rows row8, row8 + 8 x columns 2quad, 2quad + 1
    for (int c = c_begin; c < c_end;) {
        mma_chunks(acc, wl, wh, xs, xrow, c, c_end, c_begin, row8, quad);
        c += UNROLL;
        if (c < c_end) load_chunks(wl, wh, lo, hi, c, c_end);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {  // this share's sums back from its scale
        int s_m = 0;
#pragma unroll
        for (int m = 0; m < ROWS; ++m)
            if (m == 2 * quad + j) s_m = shift[m];
        acc[j] *= ldexpf(1.0f, -s_m);
        acc[2 + j] *= ldexpf(1.0f, -s_m);
    }
    if (SPLITS > 1) {
        __syncwarp();  // the warp's reads of its share are done before its sums overwrite it
        reinterpret_cast<float4*>(region)[lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
        __syncthreads();
        if (split != 0) return;
#pragma unroll
        for (int i = 1; i < SPLITS; ++i) {
            const float4 p = reinterpret_cast<const float4*>(
                reinterpret_cast<u32*>(smem) + (warp + i) * max(ROWS * xrow, 128))[lane];
            acc[0] += p.x; acc[1] += p.y; acc[2] += p.z; acc[3] += p.w;
        }
    }
    if (!active) return;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
        const int m = 2 * quad + j;
        if (m >= ROWS) break;
        if (GATED) {
            const int n = lo_row;
            float out = scaled(acc[j], s, b, n);
            const float gate = round_bf16(scaled(acc[2 + j], s, b, n_out + n));
            out = round_bf16(out) * round_bf16(gate / (1.0f + expf(-gate)));
            y[(long long)m * n_out + n] = to_bf16(out);
        } else {
            y[(long long)m * n_out + lo_row] = to_bf16(scaled(acc[j], s, b, lo_row));
            y[(long long)m * n_out + hi_row] = to_bf16(scaled(acc[2 + j], s, b, hi_row));
        }
    }
}
"""

MMA_SOURCE = _HELPERS + _MMA_KERNEL


class CudaTile(NamedTuple):
    """Launch shape of the CUDA GEMV: ``wrows`` output rows per warp (of each half, gated),
    ``unroll`` 16-byte loads per weight row and thread in flight per step, ``threads`` per block,
    ``ksplit`` warps of the block per group of rows, each over its slice of K (more warps for
    narrow matrices; their sums added in the block); ``blocks_per_sm`` (0: as many as fit), for
    the GEMVs with the RMSNorm inside, whose grid holds only blocks that fit at once: at most that
    many blocks an SM, the registers capped so that they fit (each warp walks ``groups / warps``
    output groups: fewer warps can leave a shorter last round).
    The default was within 5% of the best tile on every Qwen-VL decoder shape at one row
    (docs/benchmarks.md, runs 27-31)."""

    wrows: int = 1
    unroll: int = 2
    threads: int = 128
    ksplit: int = 1
    blocks_per_sm: int = 0

    @property
    def groups(self) -> int:
        """Output groups (``wrows`` rows each) per block: its warps over ``ksplit``."""
        return self.threads // 32 // self.ksplit


class MmaTile(NamedTuple):
    """Launch shape of the tensor-core GEMV: ``groups`` groups of 16 weight rows per block, each
    read by ``splits`` warps (one share of K each, added in shared memory), ``unroll`` chunks of
    64 weights per row in flight per warp (32 bytes a lane)."""

    groups: int = 1
    splits: int = 8
    unroll: int = 4

    @property
    def threads(self) -> int:
        return 32 * self.groups * self.splits


KERNELS = {"gemv": "vlq_int8_gemv", "mma": "vlq_int8_gemv_mma"}
MMA_MAX_ROWS = 8  # the columns of one m16n8k16 step
MMA_SHARED_LIMIT = 48 * 1024  # a block's shared memory without opting in

_compiled: dict[tuple, object] = {}
_disabled: dict[str, str] = {}  # kernel -> why it does not run in this process, once it failed

# The NVRTC kernels of this package, as the log names them, and what serves when one is off.
KERNEL_ROLES = {"gemv": ("CUDA int8 GEMV", "the next fastest GEMV"),
                "mma": ("tensor-core CUDA int8 GEMV", "the next fastest GEMV"),
                "attention": ("CUDA decode attention", "the Triton kernel")}


def disable(reason: str, kernel: str = "gemv") -> None:
    """Stop using the NVRTC ``kernel`` ("gemv", "mma" or "attention", :data:`KERNEL_ROLES`) in this
    process (a compile or launch failed): logged once, the first reason kept."""
    if kernel not in _disabled:
        name, fallback = KERNEL_ROLES[kernel]
        log.warning("the %s is off in this process (%s); %s serves instead", name, reason, fallback)
        _disabled[kernel] = reason


def disabled(kernel: str = "gemv") -> str | None:
    """Why ``kernel`` is off in this process (:func:`disable`), or None while it runs."""
    return _disabled.get(kernel)


def _compiler_ok(x: torch.Tensor, kernel: str = "gemv") -> bool:
    return (kernel not in _disabled and x.is_cuda and x.dtype == torch.bfloat16
            and hasattr(torch.cuda, "_compile_kernel"))


def _weight_ok(q: torch.Tensor) -> bool:
    return (q.dtype == torch.uint8 and q.dim() == 2 and q.shape[1] % 16 == 0 and q.stride(1) == 1
            and q.stride(0) % 16 == 0 and q.data_ptr() % 16 == 0)


def _operands_ok(x: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None) -> bool:
    return (x.stride(1) == 1 and x.stride(0) % 8 == 0 and x.data_ptr() % 16 == 0
            and (scale is None or (scale.dtype == torch.float32 and scale.is_contiguous()))
            and (bias is None or (bias.dtype == torch.bfloat16 and bias.is_contiguous())))


def available(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> bool:
    """True when :func:`int8_gemv` runs ``x`` times ``q`` here: CUDA, NVRTC through torch, bf16
    ``x`` of 1-4 rows, ``K`` a multiple of 16, rows 16-byte aligned (float32 ``scale``, bf16
    ``bias``)."""
    return (_compiler_ok(x) and _weight_ok(q) and 1 <= x.shape[0] <= MAX_ROWS and _operands_ok(x, scale, bias))


NORM_SHARED_LIMIT = 48 * 1024  # the normalised rows of x live in static shared memory


def fusions_ok(x: torch.Tensor, q: torch.Tensor, tile: CudaTile | None = None, gated: bool = False,
               norm_weight: torch.Tensor | None = None, residual: torch.Tensor | None = None) -> bool:
    """True when :func:`int8_gemv` can also run the RMSNorm of ``x`` with ``norm_weight`` (bf16
    ``[K]``; ``K`` a multiple of 8 x the tile's threads, the rows of x within 48 KB) and add
    ``residual`` (bf16 ``[M, N]``, contiguous) to its output (callers check :func:`available` too)."""
    m, k = x.shape
    tile = CudaTile(*(tile or CudaTile()))
    n = q.shape[0] // 2 if gated else q.shape[0]
    norm = norm_weight is None or (
        norm_weight.dtype == torch.bfloat16 and norm_weight.is_contiguous() and norm_weight.numel() == k
        and norm_weight.data_ptr() % 16 == 0 and k % (8 * tile.threads) == 0 and m * k * 2 <= NORM_SHARED_LIMIT)
    add = residual is None or (
        residual.dtype == torch.bfloat16 and residual.is_contiguous() and tuple(residual.shape) == (m, n))
    return norm and add


def mma_shared_bytes(rows: int, k: int, tile: MmaTile) -> int:
    """Dynamic shared memory of the tensor-core GEMV: per warp, its share of K of the ``rows`` of
    x as f16 (16 bytes of padding a row), which its 32 float4 of sums reuse (at least 512 bytes)."""
    share = -(-(k // 64) // tile.splits) * 128  # bytes of one row's share
    return tile.threads // 32 * max(rows * (share + 16), 512)


def mma_available(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None, tile: MmaTile | None = None) -> bool:
    """True when :func:`int8_gemv_mma` runs ``x`` times ``q`` here: as :func:`available`, with 1-8
    rows of x, ``K`` a multiple of 64, whole groups of 16 weight rows (gated: 8 of each half) and
    the staged rows of x within 48 KB of shared memory."""
    m, k = x.shape
    return (_compiler_ok(x, "mma") and _weight_ok(q) and 1 <= m <= MMA_MAX_ROWS and k % 64 == 0
            and q.shape[0] % 16 == 0 and _operands_ok(x, scale, bias)
            and mma_shared_bytes(m, k, MmaTile(*(tile or MmaTile()))) <= MMA_SHARED_LIMIT)


def macros(rows: int, tile: CudaTile, gated: bool, has_bias: bool, norm_k: int = 0,
           residual: bool = False) -> dict[str, int]:
    """The compile-time settings of the FMA kernel for ``rows`` rows of x and ``tile``; ``norm_k``:
    the RMSNorm of x's ``norm_k`` columns runs inside it (0: none); ``residual``: it adds the
    residual stream to its output."""
    return {"ROWS": rows, "WROWS": tile.wrows, "UNROLL": tile.unroll, "THREADS": tile.threads, "GATED": int(gated),
            "HAS_BIAS": int(has_bias), "KSPLIT": tile.ksplit, "NORM": int(norm_k > 0), "NORM_K": norm_k,
            "RESIDUAL": int(residual), "MIN_BLOCKS": tile.blocks_per_sm}


def mma_macros(rows: int, tile: MmaTile, gated: bool, has_bias: bool) -> dict[str, int]:
    """The compile-time settings of the tensor-core kernel for ``rows`` rows of x and ``tile``."""
    return {"ROWS": rows, "GROUPS": tile.groups, "SPLITS": tile.splits, "UNROLL": tile.unroll, "GATED": int(gated),
            "HAS_BIAS": int(has_bias)}


def compiled(source: str, name: str, settings: dict[str, int]):
    """Kernel ``name`` of ``source`` compiled by NVRTC with ``settings`` as macros, once per process,
    source and setting (the CUDA kernels of this package share the cache)."""
    key = (name, hash(source), *sorted(settings.items()))  # a str caches its hash: no rehash a call
    kernel = _compiled.get(key)
    if kernel is None:
        options = [f"-D{k}={v}" for k, v in settings.items()]
        kernel = _compiled[key] = torch.cuda._compile_kernel(source, name, nvcc_options=options)
    return kernel


def _kernel(settings: dict[str, int], kernel: str = "gemv"):
    """``kernel`` ("gemv" or "mma") compiled with ``settings``."""
    return compiled(SOURCE if kernel == "gemv" else MMA_SOURCE, KERNELS[kernel], settings)


_resident: dict[tuple[int, int, int], int] = {}
_driver: list = []


def device_index(device: torch.device) -> int:
    """The CUDA device number of ``device`` (``cuda`` alone: the current one)."""
    return device.index if device.index is not None else torch.cuda.current_device()


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device_index(device)).multi_processor_count


def resident_blocks(kernel, threads: int, device: torch.device) -> int:
    """How many blocks of ``threads`` threads of ``kernel`` (compiled by :func:`compiled`) fit on
    ``device`` at once, by the CUDA driver's occupancy calculator (asked once per kernel); a very
    large number where the driver cannot say."""
    key = (id(kernel), threads, device_index(device))
    if key not in _resident:
        count = ctypes.c_int(0)
        try:
            if not _driver:
                _driver.append(ctypes.CDLL("libcuda.so.1"))
            error = _driver[0].cuOccupancyMaxActiveBlocksPerMultiprocessor(
                ctypes.byref(count), kernel.func, threads, ctypes.c_size_t(0))
        except (AttributeError, OSError) as e:
            log.warning("no occupancy from the CUDA driver (%s): the fused-norm GEMV launches every block", e)
            error = -1
        _resident[key] = count.value * _sm_count(device) if error == 0 and count.value > 0 else 1 << 30
    return _resident[key]


def norm_grid(blocks: int, resident: int, tile: CudaTile, sms: int) -> int:
    """The grid of a GEMV with the RMSNorm inside, whose ``blocks`` blocks would each own
    ``tile.groups`` output groups: no more than the ``resident`` blocks that fit on the card at
    once, nor than ``tile.blocks_per_sm`` on each of its ``sms`` SMs where the tile sets it."""
    grid = min(blocks, resident)
    return min(grid, tile.blocks_per_sm * sms) if tile.blocks_per_sm else grid


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
              tile: CudaTile | None = None, gated: bool = False, norm: tuple[torch.Tensor, float] | None = None,
              residual: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K]`` (bf16, M <= 4) times int8 ``q [N, K]`` with float32 ``scale [N]`` (+ bf16
    ``bias``) -> bf16 ``[M, N]``; ``gated``: ``q`` is ``[w1 | w2]`` and the result the gate,
    ``[M, N / 2]``. ``norm``: ``(weight, eps)``, x goes through the decoder's RMSNorm first;
    ``residual``: ``[M, N]`` added to the result (both rounded as :func:`.kernels.rms_norm` and
    the eager residual add round them). Callers check :func:`available` (and :func:`fusions_ok`)
    first."""
    m, k = x.shape
    rows = q.shape[0]
    n = rows // 2 if gated else rows
    tile = CudaTile(*(tile or CudaTile()))
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    kernel = _kernel(macros(m, tile, gated, bias is not None, k if norm is not None else 0, residual is not None))
    blocks = -(-n // (tile.wrows * tile.groups))
    if norm is not None:  # only the blocks that fit at once: each normalises x once, then loops over groups
        blocks = norm_grid(blocks, resident_blocks(kernel, tile.threads, x.device), tile, _sm_count(x.device))
    norm_weight, eps = norm if norm is not None else (x, 0.0)  # unused placeholders without a norm
    eps_bits = struct.unpack("<i", struct.pack("<f", eps))[0]  # torch's launcher passes floats as doubles
    kernel(grid=(blocks, 1, 1), block=(tile.threads, 1, 1),
           args=[x, q, scale, bias if bias is not None else scale, y, n, k, x.stride(0), q.stride(0),
                 norm_weight, eps_bits, residual if residual is not None else x])
    return y


def int8_gemv_mma(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None,
                  tile: MmaTile | None = None, gated: bool = False) -> torch.Tensor:
    """As :func:`int8_gemv` on the tensor cores, for 1-8 rows of x (callers check
    :func:`mma_available`). The rows of x go to the tensor cores as f16, which holds every bf16 from 2**-14 to
    65504 exactly; each warp stages its own share of K, and a row whose largest ``|x|`` in that
    share lies outside [2**-6, 65504] is scaled by a power of two first (and its sums back), so
    answers match float32 math up to summation order."""
    m, k = x.shape
    rows = q.shape[0]
    n = rows // 2 if gated else rows
    tile = MmaTile(*(tile or MmaTile()))
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    kernel = _kernel(mma_macros(m, tile, gated, bias is not None), "mma")
    groups = rows // 16  # gated: 8 rows of each half a group
    kernel(grid=(-(-groups // tile.groups), 1, 1), block=(tile.threads, 1, 1),
           args=[x, q, scale, bias if bias is not None else scale, y, n, k, x.stride(0), q.stride(0)],
           shared_mem=mma_shared_bytes(m, k, tile))
    return y
