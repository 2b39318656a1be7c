"""A probe, not a serving kernel: is a two-row int8 GEMV faster when its weights arrive by TMA?

    python -m benchmarks.tma_gemv_probe [--configs RS,S,CW,B;...] [--shapes c_attn,gate_up,c_proj]

The CUDA GEMV (:mod:`worker.engine.model.cuda_gemv`) reads each weight with the warps that use it:
at two rows of x it reaches about 82% of the copy bandwidth inside the decode step, against 91% at
one row (docs/benchmarks.md). Each warp there also reloads and converts its slice of x for every
16 weights. This probe times another arrangement of the same arithmetic on the layer shapes:

- one producer thread per block copies whole groups of ``RS`` weight rows into shared memory with
  TMA bulk copies, ``S`` stages deep (mbarriers), so the bytes in flight do not cost registers or
  the consumers' issue slots;
- ``CW`` consumer warps hold x in registers for the whole launch (each lane owns 16 columns of K
  per ``32 * CW`` and never reloads them), read their 16 weights of each staged row from shared
  memory, and add the lanes' sums of the group's ``2 * RS`` outputs with one reduce-scatter
  (each shuffle halves the values a lane holds) and the warps' sums in shared memory;
- ``B`` blocks an SM, each walking groups ``g, g + grid, ...``.

Both kernels run plain two-row products (no norm, gate or residual) over 8 copies of each weight
(more bytes than L2 holds) in one CUDA graph, interleaved, and both are checked against float64
math rounded to bf16. It prints microseconds a call and the copy bandwidth each reaches.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.engine_bench import show_environment  # noqa: E402
from worker.engine.model import cuda_gemv, kernels  # noqa: E402

SOURCE = cuda_gemv.BF16_HELPERS + r"""
constexpr int CHUNKS = K / 16;                 // 16-byte chunks of a weight row
constexpr int LANES = CW * 32;                 // consumer threads
constexpr int CPL = CHUNKS / LANES;            // chunks of K a consumer lane owns
constexpr int V = RS * 2;                      // outputs of a group: RS rows x 2 rows of x
constexpr int STAGE = RS * K;                  // bytes of a stage
static_assert(CHUNKS % LANES == 0, "K must split evenly over the consumer lanes");
static_assert(V <= 32 && (V & (V - 1)) == 0, "2 * RS must be a power of two up to 32");

static __device__ __forceinline__ void int8x4(u32 w, float* out) {  // exact: (q + 128) under 2^23
    const u32 t = w ^ 0x80808080u;
    out[0] = __uint_as_float(__byte_perm(t, 0x4B000000u, 0x7540)) - 8388736.0f;
    out[1] = __uint_as_float(__byte_perm(t, 0x4B000000u, 0x7541)) - 8388736.0f;
    out[2] = __uint_as_float(__byte_perm(t, 0x4B000000u, 0x7542)) - 8388736.0f;
    out[3] = __uint_as_float(__byte_perm(t, 0x4B000000u, 0x7543)) - 8388736.0f;
}

// Reduce-scatter of N values over the lanes, from shuffle distance OFFSET down: each step keeps half
// of a lane's values (the upper lanes the upper half) and adds the partner's; once one value is
// left, plain sums over the distances that remain. `index` gathers which value a lane holds.
template <int N, int OFFSET>
struct Scatter {
    static __device__ __forceinline__ void run(float* v, int lane, int& index) {
        constexpr int HALF = N / 2;
        const bool upper = lane & OFFSET;
#pragma unroll
        for (int j = 0; j < HALF; ++j) {
            const float send = upper ? v[j] : v[j + HALF];
            const float keep = upper ? v[j + HALF] : v[j];
            v[j] = keep + __shfl_xor_sync(0xffffffffu, send, OFFSET);
        }
        if (upper) index += HALF;
        Scatter<HALF, OFFSET / 2>::run(v, lane, index);
    }
};

template <int OFFSET>
struct Scatter<1, OFFSET> {
    static __device__ __forceinline__ void run(float* v, int lane, int& index) {
        v[0] += __shfl_xor_sync(0xffffffffu, v[0], OFFSET);
        Scatter<1, OFFSET / 2>::run(v, lane, index);
    }
};

template <>
struct Scatter<1, 0> {
    static __device__ __forceinline__ void run(float*, int, int&) {}
};

static __device__ __forceinline__ u32 smem(const void* p) { return (u32)__cvta_generic_to_shared(p); }

static __device__ __forceinline__ void wait(unsigned long long* bar, u32 parity) {
    u32 done = 0;
    while (!done)
        asm volatile("{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
                     "selp.u32 %0, 1, 0, p;\n\t}" : "=r"(done) : "r"(smem(bar)), "r"(parity) : "memory");
}

extern "C" __global__ void __launch_bounds__((CW + 1) * 32, B)
probe_gemv(const bf16* __restrict__ x, const signed char* __restrict__ q, const float* __restrict__ scale,
           bf16* __restrict__ y, int n_out, int groups) {
    extern __shared__ __align__(128) unsigned char shared[];
    unsigned char* stages = shared;                                        // [S][RS * K] weights
    unsigned long long* full = (unsigned long long*)(shared + S * STAGE);  // [S] landed
    unsigned long long* empty = full + S;                                  // [S] read by every consumer
    float* red = (float*)(empty + S);                                      // [2][CW][V] warps' sums
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (threadIdx.x == 0) {
        for (int s = 0; s < S; ++s) {
            asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(smem(&full[s])) : "memory");
            asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(smem(&empty[s])), "r"(LANES) : "memory");
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    }
    __syncthreads();
    const int mine = (groups - (int)blockIdx.x + (int)gridDim.x - 1) / (int)gridDim.x;  // g = blockIdx.x + i * grid

    if (warp == CW) {  // the producer: one thread issues every copy
        if (lane != 0) return;
        for (int i = 0; i < mine; ++i) {
            const int s = i % S;
            wait(&empty[s], ((i / S) & 1) ^ 1);  // a fresh barrier's previous phase counts as complete
            const long long g = blockIdx.x + (long long)i * gridDim.x;
            const signed char* src = q + g * STAGE;
            asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;"
                         :: "r"(smem(&full[s])), "r"(STAGE) : "memory");
            for (int r = 0; r < RS; ++r)
                asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                             :: "r"(smem(stages + s * STAGE + r * K)), "l"(src + r * K), "r"(K), "r"(smem(&full[s]))
                             : "memory");
        }
        return;
    }

    // x for good: this lane's chunks c * LANES + id of both rows, as float32
    const int id = warp * 32 + lane;
    float xf[2][CPL][16];
#pragma unroll
    for (int m = 0; m < 2; ++m)
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
            const uint4* p = reinterpret_cast<const uint4*>(x + (long long)m * K) + 2 * (c * LANES + id);
            bf16x8_float(p[0], xf[m][c]);
            bf16x8_float(p[1], xf[m][c] + 8);
        }

    for (int i = 0; i < mine; ++i) {
        const int s = i % S;
        wait(&full[s], (i / S) & 1);
        uint4 w[RS][CPL];
        const unsigned char* st = stages + s * STAGE;
#pragma unroll
        for (int r = 0; r < RS; ++r)
#pragma unroll
            for (int c = 0; c < CPL; ++c)
                w[r][c] = *reinterpret_cast<const uint4*>(st + r * K + 16 * (c * LANES + id));
        asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(smem(&empty[s])) : "memory");

        float v[V];  // v[2 r + m]: this lane's part of output row r for row m of x
#pragma unroll
        for (int r = 0; r < RS; ++r) {
            float even[2] = {0.0f, 0.0f}, odd[2] = {0.0f, 0.0f};
#pragma unroll
            for (int c = 0; c < CPL; ++c) {
                float wf[16];
                int8x4(w[r][c].x, wf); int8x4(w[r][c].y, wf + 4); int8x4(w[r][c].z, wf + 8); int8x4(w[r][c].w, wf + 12);
#pragma unroll
                for (int m = 0; m < 2; ++m)
#pragma unroll
                    for (int j = 0; j < 16; j += 2) {
                        even[m] = fmaf(wf[j], xf[m][c][j], even[m]);
                        odd[m] = fmaf(wf[j + 1], xf[m][c][j + 1], odd[m]);
                    }
            }
            v[2 * r] = even[0] + odd[0];
            v[2 * r + 1] = even[1] + odd[1];
        }
        // the warp's sums: lane l ends with output `index` added over all 32 lanes
        int index = 0;
        Scatter<V, 16>::run(v, lane, index);
        float* sums = red + (i & 1) * CW * V;
        if ((lane & (32 / V - 1)) == 0) sums[warp * V + index] = v[0];
        asm volatile("bar.sync 1, %0;" :: "r"(LANES) : "memory");
        if (warp == 0 && lane < V) {
            float total = sums[lane];
#pragma unroll
            for (int k = 1; k < CW; ++k) total += sums[k * V + lane];
            const int row = (blockIdx.x + i * gridDim.x) * RS + lane / 2, m = lane & 1;
            y[(long long)m * n_out + row] = to_bf16(total * scale[row]);
        }
    }
}
"""

SHAPES = {"c_attn": (12288, 4096), "gate_up": (22016, 4096), "c_proj": (4096, 4096)}


_configured: dict[int, int] = {}


def probe(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, config: tuple[int, int, int, int]) -> torch.Tensor:
    """``x [2, K] @ (q [N, K] * scale).T`` on the probe kernel with ``(RS, S, CW, B)``."""
    rs, stages, cw, per_sm = config
    n, k = q.shape
    kernel = cuda_gemv.compiled(SOURCE, "probe_gemv", {"K": k, "RS": rs, "S": stages, "CW": cw, "B": per_sm})
    shared = stages * rs * k + 2 * stages * 8 + 2 * cw * 2 * rs * 4
    if _configured.get(id(kernel), 0) < shared:
        if hasattr(kernel, "set_shared_memory_config"):
            kernel.set_shared_memory_config(shared)
        else:  # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
            assert ctypes.CDLL("libcuda.so.1").cuFuncSetAttribute(kernel.func, 8, shared) == 0
        _configured[id(kernel)] = shared
    y = torch.empty(2, n, dtype=x.dtype, device=x.device)
    groups = n // rs
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    kernel(grid=(min(groups, per_sm * sms), 1, 1), block=((cw + 1) * 32, 1, 1),
           args=[x, q, scale, y, n, groups], shared_mem=shared)
    return y


def reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.double() @ (q.double() * scale.double()[:, None]).T).to(torch.bfloat16)


def ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between two bf16 tensors in units in the last place (same sign)."""
    ia, ib = a.view(torch.int16).int(), b.view(torch.int16).int()
    return int((ia - ib).abs().max())


def timed_graph(call, copies: int, replays: int) -> float:
    """Microseconds a call, replaying a graph of ``copies`` calls (each on other weights)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            call(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            call(i)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * copies)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="8,3,8,2;4,6,8,2;4,4,8,3;8,6,8,1;16,3,8,1;8,6,4,1")
    parser.add_argument("--shapes", default="c_attn,gate_up,c_proj")
    parser.add_argument("--copies", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    a = parser.parse_args(argv)
    device = torch.device("cuda")
    show_environment(device)
    configs = [tuple(int(v) for v in c.split(",")) for c in a.configs.split(";")]
    gen = torch.Generator(device=device).manual_seed(0)
    for name in a.shapes.split(","):
        n, k = SHAPES[name]
        x = torch.randn(2, k, device=device, generator=gen).to(torch.bfloat16)
        qs = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device=device, generator=gen) for _ in range(a.copies)]
        scale = (torch.rand(n, device=device, generator=gen) + 0.5) / 127
        want = reference(x, qs[0], scale)
        tile = kernels.CUDA_TILES.get((n, k, 2))
        calls = {"cuda_gemv " + str(tuple(tile)): lambda i: cuda_gemv.int8_gemv(x, qs[i], scale, tile=tile)}
        for config in configs:
            calls[f"tma probe RS,S,CW,B={config}"] = (lambda c: lambda i: probe(x, qs[i], scale, c))(config)
        print(f"\n== {name}: [{n} x {k}] int8, two rows of x, {a.copies} weight copies of {n * k / 1e6:.1f} MB")
        times: dict[str, list[float]] = {label: [] for label in calls}
        for label, call in calls.items():
            got = call(0)
            torch.cuda.synchronize()
            wrong = int((got != want).sum())
            print(f"  {label}: outputs not equal to float64 rounded {wrong} of {got.numel()}, "
                  f"worst {ulps(got, want)} ulp; repeat bit-equal {bool(torch.equal(got, call(0)))}")
        for _ in range(a.rounds):
            for label, call in calls.items():
                times[label].append(timed_graph(call, a.copies, 20))
        for label, ts in times.items():
            us = statistics.median(ts)
            print(f"  {us:8.2f} us a call ({min(ts):.2f}-{max(ts):.2f})  {n * k / us / 1e6:5.2f} TB/s  {label}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
