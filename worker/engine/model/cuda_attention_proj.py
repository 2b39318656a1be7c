"""The decode attention and the attention's int8 ``c_proj`` (with the residual add) in one CUDA launch.

Inside the int8 decode step the attention (:mod:`.cuda_attention`) is latency-bound and leaves most
of the card's memory bandwidth idle, while the ``c_proj`` GEMV after it is too small to hide its
own start and tail: in a profile of the graph it took about 2x its bytes' time, and not much less
with its weights already in L2 (docs/benchmarks.md, run 89). Here the attention's blocks (each
head's cluster, as in :mod:`.cuda_attention`) first copy their share of ``c_proj``'s weights into
their shared memory (TMA bulk copies, in flight while they attend), then the whole grid meets at a
barrier (every block is resident at once: the launcher checks with the driver's occupancy
calculator), and each warp computes its ``wrows`` outputs from shared memory, reading the
attention's output (written before the barrier) from L2 and L1.

The projection adds its products in the CUDA GEMV's order for the same ``ksplit`` (each lane its
16-byte chunks ``lane, lane + 32, ...`` of its warp's slice of K, two FMA chains a chunk, the
lanes by shuffles, a group's warps in split order), scales and rounds as it does and adds the
residual stream as it does: the new residual stream equals the two launches' bit for bit
(:mod:`benchmarks.proj_bench` checks it on the GPU).

The grid barrier is a counter whose top bit flips once every block has added its share (the
scheme of CUDA's cooperative groups), so it is zero-cost to reset and the same word serves every
launch on the device in stream order.

:func:`attention_proj` launches it on the current stream (CUDA graphs capture it) or returns
None where it cannot run (:func:`available`, or the blocks would not all fit on the card).
"""

from __future__ import annotations

import ctypes
import logging

import torch

from . import cuda_attention, cuda_gemv
from .cuda_attention import AttentionTile

log = logging.getLogger(__name__)

SOURCE = cuda_attention.SOURCE + r"""
constexpr int PCHUNKS = KIN / 16;                  // 16-byte chunks (16 weights) of a weight row
constexpr int PGROUPS = WARPS / PKSPLIT;           // output groups of a block, PW rows each
constexpr int BLOCK_ROWS = PGROUPS * PW;           // weight rows of a block, in its shared memory
constexpr int PER_SPLIT = (PCHUNKS + 32 * PKSPLIT - 1) / (32 * PKSPLIT) * 32;  // chunks of a warp

// This block's weight rows into shared memory by the copy engine (TMA bulk copies of 4 KB, issued by
// one thread; the SM's load units stay free for the attention), counted by the mbarrier `arrived`.
static __device__ __forceinline__ void copy_weights(uint4* shared, const signed char* q, int block,
                                                    unsigned long long* arrived) {
    if (threadIdx.x != 0) return;
    const u32 bar = (u32)__cvta_generic_to_shared(arrived);
    constexpr u32 BYTES = BLOCK_ROWS * KIN, PIECE = 4096;
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(bar) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(BYTES) : "memory");
    const signed char* src = q + (long long)block * BYTES;
    const u32 dst = (u32)__cvta_generic_to_shared(shared);
    for (u32 at = 0; at < BYTES; at += PIECE)
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                     :: "r"(dst + at), "l"(src + at), "r"(PIECE), "r"(bar) : "memory");
}

// Wait until the block's weights have landed (phase 0 of the mbarrier, initialised by this launch).
static __device__ __forceinline__ void wait_weights(unsigned long long* arrived) {
    const u32 bar = (u32)__cvta_generic_to_shared(arrived);
    u32 done = 0;
    while (!done)
        asm volatile("{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], 0;\n\t"
                     "selp.u32 %0, 1, 0, p;\n\t}" : "=r"(done) : "r"(bar) : "memory");
}

// Every block of the grid waits here for all of them (all resident). The blocks of a cluster meet at
// its barrier; then each cluster's first block adds 1 to the counter, cluster 0's adds
// 2^31 - (clusters - 1): the top bit flips when the last cluster arrives and the low bits are back
// where they were, ready for the next launch. One atomic a cluster, not a block.
static __device__ __forceinline__ void grid_barrier(unsigned int* counter) {
    cluster_publish();
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        const unsigned int clusters = gridDim.y;
        const unsigned int add = blockIdx.y == 0 ? 0x80000000u - (clusters - 1) : 1u;
        __threadfence();
        const unsigned int old = atomicAdd(counter, add);
        unsigned int now;
        do {
            asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(now) : "l"(counter) : "memory");
        } while (((old ^ now) & 0x80000000u) == 0);
        __threadfence();
    }
    cluster_publish();
}

// x written by other blocks of this launch, read after the barrier (no line of it was in this SM's
// L1 before: L1 keeps it for the SM's other blocks).
static __device__ __forceinline__ uint4 load_fresh(const void* p) {
    uint4 v;
    asm volatile("ld.global.ca.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// x is staged a K-range ("part") at a time, KIN * 2 bytes of shared memory: all of a thread's loads
// of x go out together, one part waits in registers while the part before is used.
constexpr int XPARTS = ROWS;
constexpr int PART_CHUNKS = PCHUNKS / XPARTS;     // chunks of a row in a part
constexpr int PART_PIECES = 2 * PART_CHUNKS;      // 16-byte pieces (8 values) of a row in a part
constexpr int PART_LOADS = (ROWS * PART_PIECES + THREADS - 1) / THREADS;
static_assert(PART_CHUNKS * XPARTS == PCHUNKS, "the parts split K evenly");

// Where piece i of a part's row m sits in shared memory: chunk c as two halves PART_CHUNKS pieces
// apart, so that lanes reading chunks c0 + lane hit distinct banks.
static __device__ __forceinline__ int x_slot(int m, int i) {
    return m * PART_PIECES + (i & 1) * PART_CHUNKS + (i >> 1);
}

// Every thread's pieces of x [ROWS, KIN], all parts, into registers (loads in flight together).
static __device__ __forceinline__ void load_x(uint4 (&v)[XPARTS][PART_LOADS], const bf16* x) {
#pragma unroll
    for (int t = 0; t < XPARTS; ++t)
#pragma unroll
        for (int j = 0; j < PART_LOADS; ++j) {
            const int p = threadIdx.x + j * THREADS, m = p / PART_PIECES, i = p % PART_PIECES;
            if (p < ROWS * PART_PIECES)
                v[t][j] = load_fresh(reinterpret_cast<const uint4*>(x + (long long)m * KIN) + t * PART_PIECES + i);
        }
}

// Part t of x into shared memory, once every warp is done with the part before.
static __device__ __forceinline__ void stage_part(uint4* xs, const uint4 (&v)[XPARTS][PART_LOADS], int t) {
    if (t > 0) __syncthreads();
#pragma unroll
    for (int j = 0; j < PART_LOADS; ++j) {
        const int p = threadIdx.x + j * THREADS;
        if (p < ROWS * PART_PIECES) xs[x_slot(p / PART_PIECES, p % PART_PIECES)] = v[t][j];
    }
    __syncthreads();
}

// y [ROWS, n_out] = res + x @ (q * s).T for this block's BLOCK_ROWS rows (weights and x in shared
// memory): the CUDA GEMV's sums, in its order, for KSPLIT = PKSPLIT.
static __device__ __forceinline__ void project(const uint4* weights, const bf16* x, const float* s, const bf16* res,
                                               bf16* y, int block, int n_out) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, local = warp / PKSPLIT, split = warp % PKSPLIT;
    const int c_begin = split * PER_SPLIT, c_end = min(c_begin + PER_SPLIT, PCHUNKS);
    const uint4* w = weights + local * PW * PCHUNKS;
    __shared__ uint4 xs[ROWS * PART_PIECES];
    uint4 xv[XPARTS][PART_LOADS];
    load_x(xv, x);
    float acc[ROWS][PW];
#pragma unroll
    for (int m = 0; m < ROWS; ++m)
#pragma unroll
        for (int r = 0; r < PW; ++r) acc[m][r] = 0.0f;
#pragma unroll
    for (int t = 0; t < XPARTS; ++t) {
        stage_part(xs, xv, t);
        // this lane's chunks c_begin + lane + 32 j that lie in part t, in order
        const int lo = max(c_begin, t * PART_CHUNKS), hi = min(c_end, (t + 1) * PART_CHUNKS);
        int c = c_begin + lane;
        if (c < lo) c += (lo - c + 31) / 32 * 32;
        for (; c < hi; c += 32) {
            const int i = 2 * (c - t * PART_CHUNKS);  // the chunk's first piece in the part
            float xf[ROWS][16];
#pragma unroll
            for (int m = 0; m < ROWS; ++m) {
                bf16x8_float(xs[x_slot(m, i)], xf[m]);
                bf16x8_float(xs[x_slot(m, i + 1)], xf[m] + 8);
            }
#pragma unroll
            for (int r = 0; r < PW; ++r) {
                const uint4 v = w[r * PCHUNKS + c];
                float wf[16];
                int8x4_float(v.x, wf);
                int8x4_float(v.y, wf + 4);
                int8x4_float(v.z, wf + 8);
                int8x4_float(v.w, wf + 12);
#pragma unroll
                for (int m = 0; m < ROWS; ++m) {
                    float even = 0.0f, odd = 0.0f;
#pragma unroll
                    for (int k = 0; k < 16; k += 2) {
                        even = fmaf(wf[k], xf[m][k], even);
                        odd = fmaf(wf[k + 1], xf[m][k + 1], odd);
                    }
                    acc[m][r] += even + odd;
                }
            }
        }
    }
#pragma unroll
    for (int m = 0; m < ROWS; ++m)
#pragma unroll
        for (int r = 0; r < PW; ++r)
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) acc[m][r] += __shfl_xor_sync(0xffffffffu, acc[m][r], offset);
#if PKSPLIT > 1
    __shared__ float sums[WARPS][ROWS][PW];
    if (lane == 0)
#pragma unroll
        for (int m = 0; m < ROWS; ++m)
#pragma unroll
            for (int r = 0; r < PW; ++r) sums[warp][m][r] = acc[m][r];
    __syncthreads();
    if (split != 0) return;
#pragma unroll
    for (int m = 0; m < ROWS; ++m)
#pragma unroll
        for (int r = 0; r < PW; ++r) {
            float total = sums[warp][m][r];
#pragma unroll
            for (int i = 1; i < PKSPLIT; ++i) total += sums[warp + i][m][r];
            acc[m][r] = total;
        }
#endif
    if (lane != 0) return;
#pragma unroll
    for (int m = 0; m < ROWS; ++m)
#pragma unroll
        for (int r = 0; r < PW; ++r) {
            const int n = (block * PGROUPS + local) * PW + r;
            const float out = bf16_float(res[(long long)m * n_out + n]) + round_bf16(acc[m][r] * s[n]);
            y[(long long)m * n_out + n] = to_bf16(out);
        }
}

// The attention of vlq_rotary_attention into attn [ROWS, KIN], then y = res + attn @ (q * s).T, the
// grid's blocks BLOCK_ROWS rows of q each (block = blockIdx.y * CLUSTER + blockIdx.x). WEIGHTS_AT: the
// block's weights are put in flight 0 before the attention, 1 once its first keys and values are,
// 2 after it.
extern "C" __global__ void CLUSTER_DIMS __launch_bounds__(THREADS)
vlq_attention_proj(const bf16* __restrict__ qkv, const long long* __restrict__ positions,
                   const long long* __restrict__ slots, const float* __restrict__ inv_freq,
                   const float* __restrict__ logn, bf16* k_cache, bf16* v_cache, bf16* attn,
                   int heads, int stride_qkv, int stride_freq, int stride_s, int stride_h, int stride_l,
                   double sm_scale, const signed char* __restrict__ q, const float* __restrict__ s,
                   const bf16* __restrict__ res, bf16* __restrict__ y, int n_out, unsigned int* counter) {
    extern __shared__ uint4 weights[];  // [BLOCK_ROWS, PCHUNKS]
    __shared__ __align__(8) unsigned long long mbar;
    unsigned long long* arrived = &mbar;  // the weights' mbarrier
    const int block = blockIdx.y * CLUSTER + blockIdx.x;
#ifndef DIAG
#define DIAG 0
#endif
    if (WEIGHTS_AT == 0 && DIAG != 3) copy_weights(weights, q, block, arrived);
    if (DIAG != 4 && DIAG != 5)
    attend(qkv, positions, slots, inv_freq, logn, k_cache, v_cache, attn, heads, stride_qkv, stride_freq, stride_s,
           stride_h, stride_l, sm_scale, [=] { if (WEIGHTS_AT == 1 && DIAG != 3) copy_weights(weights, q, block, arrived); });
    if (WEIGHTS_AT == 2 && DIAG != 3) copy_weights(weights, q, block, arrived);
    __syncthreads();  // the mbarrier's initialisation seen by every thread
    if (DIAG != 3) wait_weights(arrived);
    if (DIAG != 1) grid_barrier(counter);  // also makes every thread's copies visible to its block
    else __syncthreads();
    if (DIAG != 2 && DIAG != 5) project(weights, attn, s, res, y, block, n_out);
}
"""

KERNEL = "vlq_attention_proj"

# Where the blocks put their weights in flight: 0 before the attention, 1 once their first keys and
# values are, 2 after the attention (no overlap: a gauge).
WEIGHTS_AT = 1

MAX_WROWS = 8  # output rows a warp holds (registers)


def wrows_for(blocks: int, warps: int, n_out: int, ksplit: int) -> int:
    """Output rows per warp group so that ``blocks`` blocks of ``warps`` warps (``ksplit`` a group)
    cover ``n_out`` rows exactly; 0 where they cannot (or it would take more than
    :data:`MAX_WROWS`)."""
    if warps % ksplit:
        return 0
    groups = blocks * (warps // ksplit)
    wrows = n_out // groups
    return wrows if wrows * groups == n_out and 1 <= wrows <= MAX_WROWS else 0


def shared_bytes(rows_per_block: int, k: int) -> int:
    """Dynamic shared memory of a block: its weight rows, ``k`` bytes each."""
    return rows_per_block * k


def macros(d: int, tile: AttentionTile, has_logn: bool, rows: int, k: int, wrows: int, ksplit: int,
           weights_at: int) -> dict[str, int]:
    """The compile-time settings: the attention's (:func:`.cuda_attention.macros`), ``rows`` of x,
    ``k`` (the attention's width, c_proj's K), ``wrows`` outputs per warp group of ``ksplit`` warps,
    and where the weights are put in flight (:data:`WEIGHTS_AT`)."""
    return {**cuda_attention.macros(d, tile, has_logn), "ROWS": rows, "KIN": k, "PW": wrows, "PKSPLIT": ksplit,
            "WEIGHTS_AT": weights_at}


def available(qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, inv_freq: torch.Tensor,
              logn: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int,
              q: torch.Tensor, scale: torch.Tensor, residual: torch.Tensor, tile: AttentionTile | None = None,
              ksplit: int = 1) -> bool:
    """True when :func:`attention_proj` can try these operands: the attention's conditions
    (:func:`.cuda_attention.available`) with clusters (compute capability 9.0), int8 ``q [N,
    heads * D]`` contiguous, float32 ``scale [N]``, bf16 ``residual [B, N]`` contiguous, and the
    grid's warps covering ``N`` in whole groups of ``ksplit``. Whether all blocks fit on the card at
    once is known only after compiling: :func:`attention_proj` checks it."""
    tile = AttentionTile(*(tile or AttentionTile()))
    if (cuda_gemv.disabled("proj") or not cuda_attention.available(qkv, positions, slots, inv_freq, logn, k_cache,
                                                                    v_cache, heads, tile)):
        return False
    b, k = qkv.shape[0], heads * k_cache.shape[-1]
    return (tile.cluster > 1 and q.dtype == torch.int8 and q.dim() == 2 and q.shape[1] == k and q.is_contiguous()
            and q.data_ptr() % 16 == 0 and scale.dtype == torch.float32 and scale.is_contiguous()
            and tuple(scale.shape) == (q.shape[0],) and residual.dtype == torch.bfloat16
            and residual.is_contiguous() and tuple(residual.shape) == (b, q.shape[0]) and k % 16 == 0
            and 1 <= b <= cuda_gemv.MAX_ROWS
            and wrows_for(tile.cluster * b * heads, tile.threads // 32, q.shape[0], ksplit) > 0)


_counters: dict[int, torch.Tensor] = {}
_fits: dict[tuple, bool] = {}


def _counter(device: torch.device) -> torch.Tensor | None:
    """The device's barrier counter (one word; made outside CUDA graph captures: graphs warm up first)."""
    index = cuda_gemv.device_index(device)
    if index not in _counters:
        if torch.cuda.is_current_stream_capturing():
            return None
        _counters[index] = torch.zeros(1, dtype=torch.int32, device=device)
    return _counters[index]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig of the CUDA driver API
    _fields_ = [("gridDimX", ctypes.c_uint), ("gridDimY", ctypes.c_uint), ("gridDimZ", ctypes.c_uint),
                ("blockDimX", ctypes.c_uint), ("blockDimY", ctypes.c_uint), ("blockDimZ", ctypes.c_uint),
                ("sharedMemBytes", ctypes.c_uint), ("hStream", ctypes.c_void_p), ("attrs", ctypes.c_void_p),
                ("numAttrs", ctypes.c_uint)]


def resident_clusters(kernel, grid: tuple[int, int], threads: int, shared: int) -> int:
    """How many clusters of ``kernel`` (its cluster shape compiled in) fit on the current device at
    once with this launch shape, by the CUDA driver; 0 where it cannot say."""
    config = _LaunchConfig(grid[0], grid[1], 1, threads, 1, 1, shared, None, None, 0)
    count = ctypes.c_int(0)
    try:
        driver = ctypes.CDLL("libcuda.so.1")
        error = driver.cuOccupancyMaxActiveClusters(ctypes.byref(count), kernel.func, ctypes.byref(config))
    except (AttributeError, OSError):
        return 0
    return count.value if error == 0 else 0


def attention_proj(qkv: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, inv_freq: torch.Tensor,
                   logn: torch.Tensor | None, k_cache: torch.Tensor, v_cache: torch.Tensor, heads: int,
                   q: torch.Tensor, scale: torch.Tensor, residual: torch.Tensor, tile: AttentionTile | None = None,
                   ksplit: int = 1, weights_at: int | None = None) -> torch.Tensor | None:
    """``residual + c_proj(rotary_attention(qkv))`` in one launch -> the new residual stream ``[B, N]``
    (the new keys and values written into the caches), bit for bit the attention kernel followed by
    the CUDA GEMV with ``ksplit`` warps a group and the residual add; None where the grid's blocks
    would not all fit on the card at once (then the caller launches the two). Callers check
    :func:`available` first."""
    tile = AttentionTile(*(tile or AttentionTile()))
    b, d = qkv.shape[0], k_cache.shape[-1]
    k, n = heads * d, q.shape[0]
    grid = (tile.cluster, b * heads)
    warps = tile.threads // 32
    wrows = wrows_for(grid[0] * grid[1], warps, n, ksplit)
    shared = shared_bytes(warps // ksplit * wrows, k)
    settings = macros(d, tile, logn is not None, b, k, wrows, ksplit, WEIGHTS_AT if weights_at is None else weights_at)
    kernel = cuda_gemv.compiled(SOURCE, KERNEL, settings)
    key = (cuda_gemv.device_index(qkv.device), *sorted(settings.items()))
    if key not in _fits:
        if shared >= 48 * 1024:
            kernel.set_shared_memory_config(shared)
        clusters = resident_clusters(kernel, grid, tile.threads, shared)
        _fits[key] = clusters >= grid[1]
        log.info("attention + c_proj in one launch at %d rows: %d clusters of %d blocks needed at once, %d fit "
                 "(%d bytes of shared memory for weights)%s", b, grid[1], tile.cluster, clusters, shared,
                 "" if _fits[key] else "; two launches serve")
    counter = _counter(qkv.device)
    if not _fits[key] or counter is None:
        return None
    attn = torch.empty(b, k, dtype=qkv.dtype, device=qkv.device)
    y = torch.empty_like(residual)
    kernel(grid=(*grid, 1), block=(tile.threads, 1, 1),
           args=[qkv, positions, slots, inv_freq, logn if logn is not None else inv_freq, k_cache, v_cache, attn,
                 heads, qkv.stride(0), inv_freq.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
                 d ** -0.5, q, scale, residual, y, n, counter],
           shared_mem=shared)
    return y
