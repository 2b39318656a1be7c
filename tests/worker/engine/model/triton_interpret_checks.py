"""Run by test_kernels.py in a subprocess with ``TRITON_INTERPRET=1``: the Triton kernels on a
CPU through Triton's interpreter, each fused epilogue against the separate launches it replaces
(bit for bit) and against plain float math, and the FMA GEMV against float64 math. Exits
non-zero on the first mismatch."""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1", "run with TRITON_INTERPRET=1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

# Triton 3.x's interpreter turns a program-id-derived scalar (a 1-element array) into a Python
# int with int(array), which numpy 2 refuses; read its one element instead.
_patch_tensor = interpreter._patch_lang_tensor


def _patch_lang_tensor(tensor, scope) -> None:
    _patch_tensor(tensor, scope)
    scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))


interpreter._patch_lang_tensor = _patch_lang_tensor

from worker.engine.model import kernels  # noqa: E402

GEN = torch.Generator().manual_seed(0)
BF16 = torch.bfloat16


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


def separate_then_fused(fn):
    """``fn()`` with the reductions in separate launches, then fused."""
    with kernels.fused_epilogues(False):
        before = fn()
    return before, fn()


def gemv_cases(shapes, rows_of_x):
    """For each ``(rows, K, tiles)`` and row count: bf16 x, then bf16 and int8 weights (the int8
    ones with the ends of the int8 range in row 0), without and with a bias ->
    ``(rows, k, tiles, m, x, weight, scale, bias)``."""
    for rows, k, config in shapes:
        for m in rows_of_x:
            x = randn(m, k).to(BF16)
            w = (randn(rows, k) / k**0.5).to(BF16)
            q, scale = kernels.quantize_int8(w.float())
            q[0, :3] = kernels.store_int8(torch.tensor([-128, 127, -127]))
            for bias in (None, (0.1 * randn(rows)).to(BF16)):
                for weight, sc in ((w, None), (q, scale)):
                    yield rows, k, config, m, x, weight, sc, bias


def check_gemv() -> None:
    # (rows of [w1 | w2], K, tiles): one split, three splits (one of them past K's end), two
    shapes = ((96, 64, (16, 32, 32, 4, 1, 1)), (96, 70, (16, 32, 32, 4, 1, 3)), (64, 128, (16, 16, 32, 4, 1, 2)))
    for rows, k, config, m, x, weight, sc, bias in gemv_cases(shapes, (1, 3)):
        before, after = separate_then_fused(lambda: kernels._matmul(x, weight, sc, bias, config))
        assert torch.equal(before, after), f"split-K sum {rows}x{k} {config} m={m}"
        gate = kernels._matmul(x, weight, sc, bias, config, gated=True)
        assert torch.equal(gate, kernels.silu_mul(after)), f"gate {rows}x{k} {config} m={m}"
        dense = kernels.int8_weights(weight) * sc[:, None] if sc is not None else weight.float()
        y = x.float() @ dense.T + (bias.float() if bias is not None else 0)  # [M, rows]
        f = rows // 2
        expected = y[:, :f] * F.silu(y[:, f:])
        err = (gate.float() - expected).norm() / expected.norm()
        assert err < 2e-2, f"gate vs float math {err:.3g}"


def check_fma_gemv() -> None:
    """The FMA GEMV (1-2 rows, no tensor cores): each tile kind against float64 math within one
    bf16 unit in the last place, its fused split-K sum and gate against the separate launches,
    and int8_linear / gated_linear dispatching to it per shape and row count."""
    shapes = ((96, 64, kernels.FmaTile(16, 32, 4, 1)), (96, 70, kernels.FmaTile(16, 32, 4, 3, True, "prmt")),
              (64, 130, kernels.FmaTile(8, 64, 4, 2, False, "i2f")))
    for rows, k, tile, m, x, weight, sc, bias in gemv_cases(shapes, (1, 2)):
        before, after = separate_then_fused(lambda: kernels._gemv_fma(x, weight, sc, bias, tile))
        assert torch.equal(before, after), f"fma split-K sum {rows}x{k} {tile} m={m}"
        gate = kernels._gemv_fma(x, weight, sc, bias, tile, gated=True)
        assert torch.equal(gate, kernels.silu_mul(after)), f"fma gate {tile} m={m}"
        dense = kernels.int8_weights(weight).double() * sc.double()[:, None] if sc is not None else weight.double()
        y = x.double() @ dense.T + (bias.double() if bias is not None else 0)  # [M, rows]
        ulp = torch.exp2(torch.floor(torch.log2(y.abs().clamp_min(1e-30))) - 7)
        assert ((after.double() - y).abs() <= ulp + 1e-6).all(), f"fma vs float64 {tile} m={m}"
    x, w = randn(2, 64).to(BF16), randn(96, 64).to(BF16)
    q, scale = kernels.quantize_int8(w.float())
    tile = kernels.FmaTile(16, 32, 4, 2)
    with kernels.settings(FMA_TILES={**kernels.FMA_TILES, (96, 64, 1, 2): tile},
                          INT8_GEMV_BY_SHAPE={**kernels.INT8_GEMV_BY_SHAPE, (96, 64, 2): "fma"}):
        assert torch.equal(kernels.int8_linear(x, q, scale), kernels._gemv_fma(x, q, scale, None, tile))
        assert torch.equal(kernels.gated_linear(x, q, scale), kernels._gemv_fma(x, q, scale, None, tile, True))
        three = randn(3, 64).to(BF16)  # more rows than the FMA GEMV takes: the tensor-core kernel
        assert torch.equal(kernels.int8_linear(three, q, scale),
                           kernels._matmul(three, q, scale, None, kernels.few_rows_tiles(96, 64, 1)))


def check_attention() -> None:
    heads, d, rows, length = 2, 16, 3, 100
    k_cache, v_cache = randn(rows, heads, length, d).to(BF16), randn(rows, heads, length, d).to(BF16)
    q = randn(2, heads, d).to(BF16)
    slots, lengths = torch.tensor([2, 0]), torch.tensor([100, 7])
    # one block a range (row 1: most ranges empty), then up to four blocks a range
    for splits in (8, 2):
        kernels.ATTENTION_SPLITS, kernels.ATTENTION_BLOCK = splits, 16
        before, after = separate_then_fused(lambda: kernels.decode_attention(q, k_cache, v_cache, slots, lengths))
        assert torch.equal(before, after), "attention combine"
        for b in range(2):
            n = int(lengths[b])
            expected = F.scaled_dot_product_attention(q[b][:, None].float(), k_cache[slots[b], :, :n].float(),
                                                      v_cache[slots[b], :, :n].float())[:, 0].reshape(-1)
            err = (after[b].float() - expected).norm() / expected.norm()
            assert err < 2e-2, f"attention vs float math {err:.3g}, {splits} splits"


def check_rotary_attention() -> None:
    """The one-launch rotary + cache write + attention against rotary_to_cache then
    decode_attention: the same output bits and the same cache afterwards."""
    heads, d, rows, length = 2, 16, 3, 100
    inv_freq = torch.stack([1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)) * a for a in (1.0, 0.7, 1.3)])
    logn = 1 + 0.05 * torch.rand(length, generator=GEN)
    cases = [(8, positions, slots) for positions, slots in (([99, 6], [2, 0]), ([0], [1]), ([47, 15], [0, 1]))]
    for splits, positions, slots in cases + [(2, [99, 40], [2, 0])]:  # 2 splits: several blocks a range
        kernels.ATTENTION_SPLITS, kernels.ATTENTION_BLOCK = splits, 16
        positions, slots = torch.tensor(positions), torch.tensor(slots)
        qkv = randn(len(positions), 3 * heads * d).to(BF16)
        for scales in (logn, None):
            k_cache, v_cache = randn(rows, heads, length, d).to(BF16), randn(rows, heads, length, d).to(BF16)
            separate_k, separate_v = k_cache.clone(), v_cache.clone()
            q = kernels.rotary_to_cache(qkv, positions, slots, inv_freq, scales, separate_k, separate_v, heads)
            separate = kernels.decode_attention(q, separate_k, separate_v, slots, positions + 1)
            fused = kernels.rotary_attention(qkv, positions, slots, inv_freq, scales, k_cache, v_cache, heads)
            where = f"positions {positions.tolist()} logn {scales is not None}, {splits} splits"
            assert torch.equal(fused, separate), f"rotary attention output, {where}"
            assert torch.equal(k_cache, separate_k) and torch.equal(v_cache, separate_v), f"cache, {where}"


def check_token_logprobs() -> None:
    """OpenAI's logprobs in two passes against log_softmax and topk over the whole row: the same
    ids, log-probabilities within float32 rounding; a block of -inf only adds nothing."""
    logits = 4 * randn(3, 9000)
    logits[2, 4096:8192] = float("-inf")  # the second block of row 2
    next_ids = torch.tensor([5, 8999, 17])
    kernels.LOGPROB_BLOCK = 1024  # several blocks, the last one partial
    reference = torch.log_softmax(logits[:, :8500], dim=-1)
    for top in (0, 1, 3, 20):
        out = kernels.token_logprobs(logits, next_ids.clamp(max=8499), top, 8500)
        assert out.shape == (3, 1 + 2 * top), f"top {top}: shape {tuple(out.shape)}"
        chosen = reference.gather(1, next_ids.clamp(max=8499)[:, None])[:, 0]
        assert torch.allclose(out[:, 0], chosen, atol=1e-5), f"top {top}: chosen {out[:, 0]} vs {chosen}"
        values, ids = reference.topk(top, dim=-1)
        assert torch.equal(out[:, 1 + top:].long(), ids), f"top {top}: ids"
        assert torch.allclose(out[:, 1:1 + top], values, atol=1e-5), f"top {top}: values"


if __name__ == "__main__":
    check_token_logprobs()
    check_gemv()
    check_fma_gemv()
    check_attention()
    check_rotary_attention()
    tickets = kernels._ticket_buffers[torch.device("cpu")]
    assert int(tickets.abs().sum()) == 0, "every ticket back at zero"
    print("triton interpreter checks passed")
    sys.exit(0)
