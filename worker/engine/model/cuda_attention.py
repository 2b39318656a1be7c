"""Decode attention in CUDA C++ for Hopper: rotary, cache write and attention in one launch, whose
blocks combine their ranges through distributed shared memory instead of global memory.

One query per sequence (row ``b`` of ``qkv``, its new token at ``positions[b]`` of cache row
``slots[b]``) over positions ``0 .. positions[b]``: :func:`.kernels.rotary_attention`'s arithmetic,
laid out for latency. Each head gets a cluster of ``cluster`` blocks, each over one range of the
row's positions. A block first puts its first keys and values in flight (8- or 16-byte loads
that skip L1: each byte is read once), then rotates the new query and key while they land (every
block its own copy, with the rotary kernel's roundings, so the cache gets its bits). ``tpp``
threads share each position, each over ``D / tpp`` of its channels: they add their parts of the
score with shuffles, and each keeps a running max, sum and output of its own positions (online
softmax, float32), ``unroll`` positions per step loaded together; the new position takes the new
key and value from shared memory. The block merges its threads' states (shuffles, then its warps
through shared memory); at the cluster's barrier the first block reads the others' states from
their shared memory and merges them into the output row, while the block whose range holds the
new position writes the new key and value into the cache. No partials go through global memory
and there are no atomics (the Triton kernel's "last program combines" costs a store, a fence, an
atomic and a reload per head).

Every merge runs in a fixed order, so the bits do not depend on timing. They are not the Triton
kernel's (another summation order); :mod:`benchmarks.attention_bench` checks both against float64
math on the GPU, and times them.

:func:`rotary_attention` launches it on the current stream (CUDA graphs capture it);
:func:`available` says whether it runs here (a CUDA build of torch with NVRTC, compute capability
9.0 for clusters, bf16, the layouts below). Where it cannot, :mod:`.kernels` keeps the Triton kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .cuda_gemv import BF16_HELPERS, compiled, device_index, disabled

SOURCE = BF16_HELPERS + r"""
constexpr int HALF = D / 2;
constexpr int DPT = D / TPP;         // channels of a position per thread
#if D / TPP >= 8
typedef uint4 chunk;  // 8 channels: one 16-byte load
#else
typedef uint2 chunk;  // 4 channels: one 8-byte load
#endif
constexpr int CW = sizeof(chunk) / 2;  // channels a chunk
constexpr int VEC = DPT / CW;          // loads per thread, position and tensor
constexpr int STEP = THREADS / TPP;  // positions per step
constexpr int WARPS = THREADS / 32;
constexpr unsigned FULL = 0xffffffffu;
#define NEG_INF __int_as_float(0xff800000)  // -inf (NVRTC has no math.h)

// the cache: each byte read once per launch, kept out of L1
static __device__ __forceinline__ void load_once(const bf16* p, uint4& v) {
    asm volatile("ld.global.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
}

static __device__ __forceinline__ void load_once(const bf16* p, uint2& v) {
    asm volatile("ld.global.L1::no_allocate.v2.u32 {%0, %1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
}

static __device__ __forceinline__ void to_float(uint4 v, float* out) { bf16x8_float(v, out); }

static __device__ __forceinline__ void to_float(uint2 v, float* out) {
    out[0] = __uint_as_float(v.x << 16); out[1] = __uint_as_float(v.x & 0xffff0000u);
    out[2] = __uint_as_float(v.y << 16); out[3] = __uint_as_float(v.y & 0xffff0000u);
}

// x1 cos -/+ x2 sin, rounded to bf16, with the one fused multiply-add that Triton's compiler makes of
// the same expression (so the cache gets the rotary kernel's bits).
static __device__ __forceinline__ bf16 rotate(float own, float other, float c, float s, bool first_half) {
    const float b = __fmul_rn(other, s);
    return to_bf16(__fmaf_rn(own, c, first_half ? -b : b));
}

// One step of a thread's positions: UNROLL positions STEP apart from `first`, its channels of each key
// and value (zeros past `end`).
static __device__ __forceinline__ void load_step(chunk (&kv)[UNROLL][2][VEC], const bf16* k_row, const bf16* v_row,
                                                 int first, int end, long long stride_l, int channel) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int p = first + STEP * u;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            const long long at = (long long)p * stride_l + channel + CW * i;
            kv[u][0][i] = kv[u][1][i] = chunk{};
            if (p < end) {
                load_once(k_row + at, kv[u][0][i]);
                load_once(v_row + at, kv[u][1][i]);
            }
        }
    }
}

// Online softmax state (running max m, sum l, unnormalised output acc) merged with another's;
// an empty state has m = -inf and weighs nothing.
static __device__ __forceinline__ void merge(float& m, float& l, float* acc, int n, float m_o, float l_o,
                                             const float* acc_o) {
    const float top = fmaxf(m, m_o);
    const float w = m == NEG_INF ? 0.0f : expf(m - top), w_o = m_o == NEG_INF ? 0.0f : expf(m_o - top);
    l = l * w + l_o * w_o;
    for (int i = 0; i < n; ++i) acc[i] = acc[i] * w + acc_o[i] * w_o;
    m = top;
}

// Every block's shared-memory state visible to the cluster's first block.
static __device__ __forceinline__ void cluster_publish() {
#if CLUSTER > 1
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
    __syncthreads();
#endif
}

// No block leaves before the first one has read the others' shared memory (no ordering needed: its
// loads have returned by the time it arrives).
static __device__ __forceinline__ void cluster_hold() {
#if CLUSTER > 1
    asm volatile("barrier.cluster.arrive.relaxed.aligned;\n\tbarrier.cluster.wait.aligned;" ::: "memory");
#endif
}

// The float at `p` in the shared memory of the cluster's block `rank` (not volatile: the loads of a
// combine go out together; the cluster barrier before them orders them after the stores).
static __device__ __forceinline__ float cluster_load(const float* p, int rank) {
#if CLUSTER > 1
    u32 remote;
    float v;
    asm("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"((u32)__cvta_generic_to_shared(p)), "r"(rank));
    asm("ld.shared::cluster.f32 %0, [%1];" : "=f"(v) : "r"(remote));
    return v;
#else
    return *p;
#endif
}

// Block (split, b * heads + h) of a cluster of CLUSTER: head h of sequence b over its split's range of
// positions 0 .. positions[b]; the cluster's first block writes out[b, h * D : (h + 1) * D].
extern "C" __global__ void
#if CLUSTER > 1
__cluster_dims__(CLUSTER, 1, 1)
#endif
__launch_bounds__(THREADS)
vlq_rotary_attention(const bf16* __restrict__ qkv, const long long* __restrict__ positions,
                     const long long* __restrict__ slots, const float* __restrict__ inv_freq,
                     const float* __restrict__ logn, bf16* k_cache, bf16* v_cache, bf16* __restrict__ out,
                     int heads, int stride_qkv, int stride_freq, int stride_s, int stride_h, int stride_l,
                     double sm_scale) {
    const int split = blockIdx.x, bh = blockIdx.y, b = bh / heads, h = bh % heads;
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const int channel = (t % TPP) * DPT;  // this thread's channels of each position: channel .. channel + DPT - 1
    const long long pos = positions[b], slot = slots[b];
    const int length = (int)pos + 1, per_split = (length + CLUSTER - 1) / CLUSTER;
    const int start = split * per_split, end = min(start + per_split, length);
    const long long row = slot * stride_s + (long long)h * stride_h;
    const bf16* k_row = k_cache + row;
    const bf16* v_row = v_cache + row;

    chunk kv[UNROLL][2][VEC];  // in flight while the new token is rotated
    load_step(kv, k_row, v_row, start + t / TPP, end, stride_l, channel);

    // rotary (and logn) on this head's query and key: channel d pairs with d +- HALF
    __shared__ float q_scaled[D];
    __shared__ __align__(16) bf16 k_new[D], v_new[D];
    const int C = heads * D;
    const bf16* base = qkv + (long long)b * stride_qkv + h * D;
    for (int d = t; d < D; d += THREADS) {
        const int other = (d + HALF) % D;
        const float f = (float)pos * inv_freq[slot * stride_freq + d % HALF];
        const float c = cosf(f), s = sinf(f);
        bf16 q = rotate(bf16_float(base[d]), bf16_float(base[other]), c, s, d < HALF);
        const bf16 k = rotate(bf16_float(base[C + d]), bf16_float(base[C + other]), c, s, d < HALF);
        if (HAS_LOGN) q = to_bf16(__fmul_rn(bf16_float(q), bf16_float(to_bf16(logn[pos]))));
        q_scaled[d] = __fmul_rn(bf16_float(q), (float)sm_scale);
        k_new[d] = k;
        v_new[d] = base[2 * C + d];
    }
    __syncthreads();
    float q[DPT];
#pragma unroll
    for (int i = 0; i < DPT; ++i) q[i] = q_scaled[channel + i];

    float m = NEG_INF, l = 0.0f, acc[DPT];
#pragma unroll
    for (int i = 0; i < DPT; ++i) acc[i] = 0.0f;
    for (int first = start; first < end; first += STEP * UNROLL) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int p = first + STEP * u + t / TPP;
            if (p == pos) {  // the cache does not hold it yet
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    kv[u][0][i] = reinterpret_cast<const chunk*>(k_new + channel)[i];
                    kv[u][1][i] = reinterpret_cast<const chunk*>(v_new + channel)[i];
                }
            }
            float even = 0.0f, odd = 0.0f;
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                float k[CW];
                to_float(kv[u][0][i], k);
#pragma unroll
                for (int j = 0; j < CW; j += 2) {
                    even = fmaf(q[CW * i + j], k[j], even);
                    odd = fmaf(q[CW * i + j + 1], k[j + 1], odd);
                }
            }
            float score = even + odd;
#pragma unroll
            for (int offset = 1; offset < TPP; offset <<= 1) score += __shfl_xor_sync(FULL, score, offset);
            if (p < end) {
                const float top = fmaxf(m, score);
                const float w = expf(m - top), e = expf(score - top);  // m = -inf: w = 0
                l = l * w + e;
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    float v[CW];
                    to_float(kv[u][1][i], v);
#pragma unroll
                    for (int j = 0; j < CW; ++j) acc[CW * i + j] = fmaf(e, v[j], acc[CW * i + j] * w);
                }
                m = top;
            }
        }
        if (first + STEP * UNROLL < end)
            load_step(kv, k_row, v_row, first + STEP * UNROLL + t / TPP, end, stride_l, channel);
    }

    // the warp's positions: lanes with the same channels, in a fixed order
#pragma unroll
    for (int offset = TPP; offset < 32; offset <<= 1) {
        float acc_o[DPT];
#pragma unroll
        for (int i = 0; i < DPT; ++i) acc_o[i] = __shfl_xor_sync(FULL, acc[i], offset);
        merge(m, l, acc, DPT, __shfl_xor_sync(FULL, m, offset), __shfl_xor_sync(FULL, l, offset), acc_o);
    }
    // the block's warps, then the cluster's blocks
    __shared__ float warp_m[WARPS], warp_l[WARPS], warp_acc[WARPS][D];
    if (lane < TPP) {
#pragma unroll
        for (int i = 0; i < DPT; ++i) warp_acc[warp][channel + i] = acc[i];
        if (lane == 0) { warp_m[warp] = m; warp_l[warp] = l; }
    }
    __syncthreads();
    __shared__ float block_m, block_l, block_acc[D];
    for (int d = t; d < D; d += THREADS) {
        float bm = warp_m[0], bl = warp_l[0], ba = warp_acc[0][d];
        for (int w = 1; w < WARPS; ++w) merge(bm, bl, &ba, 1, warp_m[w], warp_l[w], &warp_acc[w][d]);
        block_acc[d] = ba;
        if (d == 0) { block_m = bm; block_l = bl; }
    }
    cluster_publish();
    // The new key and value into the cache (no block of this launch reads that position): after the
    // barrier, whose release would otherwise wait for these stores.
    if (pos >= start && pos < end)
        for (int d = t; d < D; d += THREADS) {
            k_cache[row + pos * stride_l + d] = k_new[d];
            v_cache[row + pos * stride_l + d] = v_new[d];
        }
    if (split == 0) {
        for (int d = t; d < D; d += THREADS) {
            float ms[CLUSTER], ls[CLUSTER], as[CLUSTER];
#pragma unroll
            for (int r = 0; r < CLUSTER; ++r) {
                ms[r] = cluster_load(&block_m, r);
                ls[r] = cluster_load(&block_l, r);
                as[r] = cluster_load(&block_acc[d], r);
            }
#pragma unroll
            for (int r = 1; r < CLUSTER; ++r) merge(ms[0], ls[0], as, 1, ms[r], ls[r], &as[r]);
            out[(long long)b * C + h * D + d] = to_bf16(as[0] / ls[0]);
        }
    }
    cluster_hold();
}
"""

KERNEL = "vlq_rotary_attention"


class AttentionTile(NamedTuple):
    """Launch shape: ``cluster`` blocks per head (each over one range of positions; 1-8, 1 on
    cards without clusters), ``threads`` per block, ``tpp`` threads per position (each over
    ``D / tpp`` channels), ``unroll`` positions per thread and step (loaded together). The default
    was the fastest of 16 tiles inside the decode graph on H100s (docs/benchmarks.md, runs 67-72)."""

    cluster: int = 8
    threads: int = 128
    tpp: int = 16
    unroll: int = 3


def macros(d: int, tile: AttentionTile, has_logn: bool) -> dict[str, int]:
    """The compile-time settings for head dimension ``d``, ``tile`` and whether logn scales q."""
    return {"D": d, "CLUSTER": tile.cluster, "THREADS": tile.threads, "TPP": tile.tpp, "UNROLL": tile.unroll,
            "HAS_LOGN": int(has_logn)}


_capabilities: dict[int, tuple[int, int]] = {}


def _capability(device: torch.device) -> tuple[int, int]:
    index = device_index(device)
    if index not in _capabilities:
        _capabilities[index] = torch.cuda.get_device_capability(index)
    return _capabilities[index]


def _fits_int(*values: int) -> bool:
    return all(0 <= v < 2 ** 31 for v in values)


def available(qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, inv_freq: torch.Tensor,
              logn: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int,
              tile: AttentionTile | None = None) -> bool:
    """True when :func:`rotary_attention` runs here: a CUDA tensor of bf16, NVRTC through torch,
    compute capability 9.0 or later for clusters of more than one block; ``k_cache`` / ``v_cache``
    ``[slots, heads, L, D]`` with the same strides and contiguous channels, ``D`` a multiple of
    ``4 * tpp`` with rotary over all of it (float32 ``inv_freq [slots, D / 2]``), float32
    ``logn``, int64 ``positions`` and ``slots``."""
    tile = AttentionTile(*(tile or AttentionTile()))
    if (disabled("attention") or not qkv.is_cuda or not hasattr(torch.cuda, "_compile_kernel")
            or qkv.dtype != torch.bfloat16 or k_cache.dtype != qkv.dtype or v_cache.dtype != qkv.dtype
            or k_cache.dim() != 4):
        return False
    if tile.cluster > 1 and _capability(qkv.device) < (9, 0):
        return False
    d = k_cache.shape[-1]
    return (k_cache.stride() == v_cache.stride() and k_cache.stride(-1) == 1 and k_cache.shape[1] == heads
            and d % (4 * tile.tpp) == 0 and tile.threads % 32 == 0 and 32 % tile.tpp == 0
            and 1 <= tile.cluster <= 8 and qkv.stride(-1) == 1 and qkv.shape[-1] == 3 * heads * d
            and inv_freq.dtype == torch.float32 and inv_freq.stride(-1) == 1 and 2 * inv_freq.shape[-1] == d
            and (logn is None or (logn.dtype == torch.float32 and logn.is_contiguous()))
            and positions.dtype == torch.long and slots.dtype == torch.long
            and positions.is_contiguous() and slots.is_contiguous()
            and _fits_int(*k_cache.stride(), qkv.stride(0), inv_freq.stride(0)))


def rotary_attention(qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, inv_freq: torch.Tensor,
                     logn: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int,
                     tile: AttentionTile | None = None) -> torch.Tensor:
    """:func:`.kernels.rotary_attention` in one CUDA launch: ``qkv [B, 3 * heads * D]`` -> ``[B,
    heads * D]``, the new keys and values written into the caches. Callers check
    :func:`available` first."""
    tile = AttentionTile(*(tile or AttentionTile()))
    b = qkv.shape[0]
    d = k_cache.shape[-1]
    out = torch.empty(b, heads * d, dtype=qkv.dtype, device=qkv.device)
    kernel = compiled(SOURCE, KERNEL, macros(d, tile, logn is not None))
    kernel(grid=(tile.cluster, b * heads, 1), block=(tile.threads, 1, 1),
           args=[qkv, positions, slots, inv_freq, logn if logn is not None else inv_freq, k_cache, v_cache, out,
                 heads, qkv.stride(0), inv_freq.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                 d ** -0.5])
    return out
