"""Where the one-launch attention + c_proj (cuda_attention_proj) spends its time: runs 97-99.

    python benchmarks/proj_parts.py

At batch 2, each row's new token at position 300 and 700, a CUDA graph of 32 launches (32 distinct
c_proj weights, so they come from DRAM as in the decode step), us a layer, median of 5: the
attention alone, the GEMV alone, the two launches, the one launch with each weight placement, and
the one launch with a part compiled out (kernel macro DIAG: 1 no grid barrier, 2 no projection,
3 no weight copies, 4 no attention, 5 only the copies and the barrier; wrong answers, times only).
First checks the one launch against the two, bit for bit.
"""
import sys, torch, statistics
sys.path.insert(0, '.')
from worker.engine.model import cuda_attention, cuda_attention_proj as P, cuda_gemv, kernels
from worker.engine.model.cuda_attention import AttentionTile
from worker.engine.model.decoder import rotary_inv_freq
dev = torch.device('cuda')
H, D, C, L = 32, 128, 4096, 32
print(torch.cuda.get_device_name())
def run(b, pos_v):
    g = torch.Generator(device=dev).manual_seed(1)
    kc = torch.randn(b + 1, H, 2048, D, device=dev, dtype=torch.bfloat16, generator=g); vc = kc.clone()
    qkv = torch.randn(b, 3 * C, device=dev, dtype=torch.bfloat16, generator=g)
    pos = torch.full((b,), pos_v, device=dev); slots = torch.arange(b, device=dev)
    invf = torch.stack([rotary_inv_freq(D, 10000.0, 1.0, dev) for _ in range(b + 1)])
    logn = torch.ones(2048, device=dev)
    ws = [kernels.quantize_int8(torch.randn(C, C, device=dev, dtype=torch.bfloat16, generator=g)) for _ in range(L)]
    res = torch.randn(b, C, device=dev, dtype=torch.bfloat16, generator=g)
    tile = kernels.CUDA_TILES[(C, C, b)]
    def attn_only(i): cuda_attention.rotary_attention(qkv, pos, slots, invf, logn, kc, vc, H)
    def gemv_only(i):
        cuda_gemv.int8_gemv(res, ws[i][0], ws[i][1], None, tile, residual=res)
    def two(i):
        a = cuda_attention.rotary_attention(qkv, pos, slots, invf, logn, kc, vc, H)
        cuda_gemv.int8_gemv(a, ws[i][0], ws[i][1], None, tile, residual=res)
    def fused(diag, at):
        def f(i):
            orig = P.macros
            P.macros = lambda *a, **k: {**orig(*a, **k), 'DIAG': diag}
            try:
                y = P.attention_proj(qkv, pos, slots, invf, logn, kc, vc, H, ws[i][0], ws[i][1], res, AttentionTile(), tile.ksplit, at)
            finally:
                P.macros = orig
            assert y is not None
        return f
    cases = {'attention alone': attn_only, 'c_proj GEMV alone': gemv_only, 'two launches': two,
             'one launch': fused(0, 1), 'one, weights at 0': fused(0, 0), 'one, weights at 2': fused(0, 2),
             'one, no grid barrier': fused(1, 1), 'one, no projection': fused(2, 1),
             'one, no weight copies': fused(3, 1), 'one, no attention': fused(4, 0),
             'one, copies + barrier only': fused(5, 0)}
    a = cuda_attention.rotary_attention(qkv, pos, slots, invf, logn, kc, vc, H)
    ref = cuda_gemv.int8_gemv(a, ws[0][0], ws[0][1], None, tile, residual=res)
    for at in (0, 1, 2):
        y = P.attention_proj(qkv, pos, slots, invf, logn, kc, vc, H, ws[0][0], ws[0][1], res, AttentionTile(), tile.ksplit, at)
        print(f'b{b} pos {pos_v}: weights at {at}: bit equal two launches {torch.equal(y, ref)}')
    out = {k: [] for k in cases}
    graphs = {}
    for name, fn in cases.items():
        for i in range(L): fn(i)
        torch.cuda.synchronize()
        gr = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gr):
            for i in range(L): fn(i)
        graphs[name] = gr
    for r in range(5):
        for name, gr in graphs.items():
            gr.replay(); torch.cuda.synchronize()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(5): gr.replay()
            e.record(); e.synchronize()
            out[name].append(s.elapsed_time(e) * 1000 / 5 / L)
    for name, t in out.items():
        print(f'b{b} pos {pos_v}: {name:28s} {statistics.median(t):7.2f} us a layer')
run(2, 300)
run(2, 700)
