"""The fused kernels' torch versions (what runs on a CPU) against the eager model's pieces.

The Triton versions run on CUDA; where Triton is installed, their arithmetic is also checked on
the CPU through Triton's interpreter (triton_interpret_checks.py, in a subprocess). The GPU
benchmark compares the whole fast path with the eager one on a GPU (benchmarks/engine_bench.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from worker.engine.model import kernels
from worker.engine.model.decoder import MLP, RMSNorm, apply_rotary, rotary_cos_sin, rotary_inv_freq
from worker.engine.model.args import LLMArgs

GEN = torch.Generator().manual_seed(0)


def randn(*shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=GEN)


def test_rms_norm_adds_the_residual_then_normalises_like_the_decoder():
    norm = RMSNorm(64, 1e-6)
    norm.weight.data = 1 + 0.1 * randn(64)
    x, add = randn(5, 64), randn(5, 64)
    out, total = kernels.rms_norm(x, norm.weight, 1e-6, add)
    assert torch.equal(total, x + add)
    assert torch.equal(out, norm(x + add))
    alone, same = kernels.rms_norm(x, norm.weight, 1e-6)
    assert same is x and torch.equal(alone, norm(x))


def test_silu_mul_is_the_mlp_gate_over_the_fused_output():
    args = LLMArgs(hidden_size=32, num_heads=4, kv_channels=8, intermediate_size=48)
    mlp = MLP(args)
    x = randn(3, 32)
    fused = torch.cat([mlp.w1.weight, mlp.w2.weight])  # [2F, C]
    gate = kernels.silu_mul(x @ fused.T)
    assert torch.allclose(mlp.c_proj(gate), mlp(x), atol=1e-6)


def test_rotary_to_cache_rotates_scales_and_writes_each_token_at_its_row_and_position():
    heads, d, rows, length = 2, 8, 3, 16
    qkv = randn(4, 3 * heads * d)
    positions, slots = torch.tensor([0, 5, 15, 5]), torch.tensor([2, 0, 1, 1])
    inv_freq = torch.stack([rotary_inv_freq(d, 10000.0, alpha) for alpha in (1.0, 3.0, 7.0)])  # [rows, d/2]
    logn = torch.linspace(1.0, 1.5, length)
    k_cache, v_cache = torch.zeros(rows, heads, length, d), torch.zeros(rows, heads, length, d)
    q = kernels.rotary_to_cache(qkv, positions, slots, inv_freq, logn, k_cache, v_cache, heads)
    for m in range(4):
        q_m, k_m, v_m = qkv[m].view(3, 1, 1, heads, d)  # each [1, 1, H, D]
        cos, sin = rotary_cos_sin(positions[m:m + 1], inv_freq[slots[m]])  # [1, 1, D]
        assert torch.allclose(q[m], apply_rotary(q_m, cos, sin)[0, 0] * logn[positions[m]], atol=1e-6)
        assert torch.allclose(k_cache[slots[m], :, positions[m]], apply_rotary(k_m, cos, sin)[0, 0], atol=1e-6)
        assert torch.equal(v_cache[slots[m], :, positions[m]], v_m[0, 0])
    assert k_cache[0, :, 0].abs().sum() == 0  # nothing else written


def test_decode_attention_sees_each_row_up_to_its_own_length():
    heads, d, rows, length = 2, 8, 3, 40
    k_cache, v_cache = randn(rows, heads, length, d), randn(rows, heads, length, d)
    q = randn(2, heads, d)
    slots, lengths = torch.tensor([2, 0]), torch.tensor([40, 7])
    out = kernels.decode_attention(q, k_cache, v_cache, slots, lengths)  # [B, H*D]
    for b in range(2):
        n = int(lengths[b])
        k, v = k_cache[slots[b], :, :n], v_cache[slots[b], :, :n]  # [H, n, D]
        expected = F.scaled_dot_product_attention(q[b][:, None], k, v)[:, 0]  # [H, D]
        assert torch.allclose(out[b], expected.reshape(-1), atol=1e-6)
    assert torch.allclose(kernels.decode_attention(q, k_cache, v_cache, slots, lengths, kv_len=40), out)


def test_int8_linear_scales_each_output_channel_once():
    x, weight, bias = randn(3, 20), randn(6, 20), randn(6)
    q, scale = kernels.quantize_int8(weight)
    y = kernels.int8_linear(x, q, scale, bias)
    expected = x.double() @ (kernels.int8_weights(q).double() * scale.double()[:, None]).T + bias.double()
    assert torch.allclose(y.double(), expected, atol=1e-5)


def test_gated_linear_is_the_mlp_gate_of_the_fused_layer():
    args = LLMArgs(hidden_size=32, num_heads=4, kv_channels=8, intermediate_size=48)
    mlp = MLP(args)
    x = randn(3, 32)
    fused = torch.cat([mlp.w1.weight, mlp.w2.weight])  # [2F, C]
    gate = kernels.gated_linear(x, fused)
    assert torch.equal(gate, kernels.silu_mul(x @ fused.T))
    assert torch.allclose(mlp.c_proj(gate), mlp(x), atol=1e-6)
    q, scale = kernels.quantize_int8(fused)
    assert torch.equal(kernels.gated_linear(x, q, scale), kernels.silu_mul(kernels.int8_linear(x, q, scale)))


@pytest.mark.parametrize("gated", [False, True])
def test_norm_linear_is_the_norm_then_the_linear_then_the_residual_add(gated):
    x, weight = randn(2, 32).to(torch.bfloat16), randn(48, 32)
    norm = (1 + 0.1 * randn(32)).to(torch.bfloat16)
    q, scale = kernels.quantize_int8(weight)
    normed, _ = kernels.rms_norm(x, norm, 1e-6)
    expected = kernels.gated_linear(normed, q, scale) if gated else kernels.int8_linear(normed, q, scale)
    got = kernels.norm_linear(x, q, scale, norm=(norm, 1e-6), gated=gated)
    assert torch.equal(got, expected)
    if not gated:
        residual = randn(2, 48).to(torch.bfloat16)
        added = kernels.norm_linear(x, q, scale, norm=(norm, 1e-6), residual=residual)
        assert torch.equal(added, residual + expected)
        total = kernels.rms_norm(residual, torch.ones(48, dtype=torch.bfloat16), 1e-6, expected)[1]
        assert torch.equal(total, added)  # the add that rms_norm fused before
        dense = weight.to(torch.bfloat16)
        assert torch.equal(kernels.norm_linear(x, dense, residual=residual), residual + x @ dense.T)


def test_norms_in_gemv_is_a_setting_that_comes_back():
    before = kernels.NORM_IN_GEMV
    with kernels.norms_in_gemv(not before):
        assert kernels.NORM_IN_GEMV is not before
    assert kernels.NORM_IN_GEMV is before


def test_settings_come_back_after_an_error_and_refuse_names_kernels_does_not_have():
    tiles, rotary = kernels.NORM_TILES, kernels.FUSED_ROTARY
    with pytest.raises(RuntimeError):
        with kernels.settings(NORM_TILES={}, FUSED_ROTARY=not rotary):
            assert kernels.NORM_TILES == {} and kernels.FUSED_ROTARY is not rotary
            raise RuntimeError
    assert kernels.NORM_TILES is tiles and kernels.FUSED_ROTARY is rotary
    with pytest.raises(KeyError, match="NORM_TILE"):
        with kernels.settings(NORM_TILE={}):
            pass
    with pytest.raises(KeyError, match="rms_norm"):
        with kernels.settings(rms_norm=None):
            pass


def test_every_shape_set_to_the_fma_or_cuda_gemv_has_a_measured_tile_and_few_rows():
    for (n, k, m), variant in kernels.INT8_GEMV_BY_SHAPE.items():
        assert variant in ("dot", "fma", "cuda") and 1 <= m <= kernels.FMA_ROWS
        if variant == "fma":
            assert (n, k, 1, m) in kernels.FMA_TILES, (n, k, m)
        if variant == "cuda":
            assert (n, k, m) in kernels.CUDA_TILES, (n, k, m)
    for tile in kernels.FMA_TILES.values():
        assert tile.convert in ("i2f", "magic", "prmt") and tile.block_k * tile.block_n % (32 * tile.warps) == 0
    assert kernels.int8_gemv_variant(4096, 4096, 3) == "dot"  # more rows than the FMA GEMV takes


def test_triton_kernels_give_the_separate_launches_bits_under_the_interpreter():
    pytest.importorskip("triton")
    repo = Path(__file__).resolve().parents[4]
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(Path(__file__).with_name("triton_interpret_checks.py"))],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_norm_linear_runs_as_separate_launches_where_the_cuda_gemv_cannot_take_it():
    x, q = randn(2, 64).to(torch.bfloat16), torch.zeros(48, 64, dtype=kernels.INT8_STORAGE)
    norm = (torch.ones(64, dtype=torch.bfloat16), 1e-6)
    assert not kernels.fuses_in_gemv(x, q, torch.ones(48), norm=norm)  # a CPU tensor: no CUDA GEMV
    with kernels.norms_in_gemv(False):
        assert not kernels.fuses_in_gemv(x, q, torch.ones(48), norm=norm)


def test_a_card_with_tiles_of_its_own_gets_them_once_and_other_entries_stay(monkeypatch):
    assert kernels.use_card_tiles(torch.device("cpu")) is None
    key, other = (64, 32, 2), next(iter(kernels.NORM_TILES))
    monkeypatch.setattr(kernels, "CARD_TILES", {"Fake Card": {"NORM_TILES": {key: kernels.CudaTile(8, 1, 128)}}})
    monkeypatch.setattr(kernels, "NORM_TILES", dict(kernels.NORM_TILES))
    monkeypatch.setattr(kernels, "_card_tiles_in", [])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    names = iter(["Fake Card", "Fake Card", "Another Card"])
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: next(names))
    before, cuda_tiles = dict(kernels.NORM_TILES), kernels.CUDA_TILES
    assert kernels.use_card_tiles(torch.device("cuda")) == "Fake Card"
    assert kernels.NORM_TILES[key] == kernels.CudaTile(8, 1, 128) and kernels.NORM_TILES[other] == before[other]
    assert kernels.use_card_tiles(torch.device("cuda")) == "Fake Card"  # once: the table is not rebuilt
    assert kernels.use_card_tiles(torch.device("cuda")) is None  # a card without tiles of its own
    assert kernels.CUDA_TILES is cuda_tiles  # a table the card does not name stays as it is
