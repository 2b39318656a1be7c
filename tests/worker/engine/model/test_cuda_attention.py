"""The CUDA decode attention's pieces that can be checked without a GPU: the source compiling for
Hopper without spilling (where nvcc is installed), when it runs and what happens when it cannot.
Its answers on the GPU are checked against float64 math and against the Triton kernel by
benchmarks/attention_bench.py (docs/benchmarks.md)."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from worker.engine.model import cuda_attention, cuda_gemv, kernels
from worker.engine.model.cuda_attention import AttentionTile

from .test_cuda_gemv import assert_compiles_for_hopper_without_spilling

HEADS, D = 4, 128


def decode_inputs(device: str = "cpu", dtype: torch.dtype = torch.bfloat16) -> tuple:
    qkv = torch.randn(2, 3 * HEADS * D, dtype=dtype, device=device)
    positions = torch.tensor([5, 9], device=device)
    slots = torch.tensor([1, 0], device=device)
    inv_freq = torch.rand(2, D // 2, device=device)
    k_cache = torch.randn(2, HEADS, 16, D, dtype=dtype, device=device)
    return qkv, positions, slots, inv_freq, None, k_cache, k_cache.clone(), HEADS


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed here")
@pytest.mark.parametrize("tile", [AttentionTile(), AttentionTile(8, 128, 32, 3), AttentionTile(1, 64, 16, 2)])
@pytest.mark.parametrize("has_logn", [False, True])
def test_the_source_compiles_for_hopper_without_spilling(tmp_path, tile, has_logn):
    # the default (16-byte loads), 8-byte loads (32 threads a position) and a cluster of one block
    assert_compiles_for_hopper_without_spilling(cuda_attention.SOURCE, cuda_attention.macros(D, tile, has_logn),
                                                tmp_path)


def test_it_does_not_run_on_cpu_tensors_and_decoding_keeps_the_torch_arithmetic_there():
    inputs = decode_inputs()
    assert not cuda_attention.available(*inputs)
    assert kernels._cuda_attention(*inputs) is None
    assert kernels.DECODE_ATTENTION == "cuda"  # the default, where it can run
    qkv, positions, slots, inv_freq, logn, k_cache, v_cache, heads = decode_inputs(dtype=torch.float32)
    out = kernels.rotary_attention(qkv, positions, slots, inv_freq, logn, k_cache, v_cache, heads)
    assert out.shape == (2, HEADS * D) and torch.isfinite(out).all()


def test_decoding_can_be_switched_to_the_triton_kernel_for_a_block_and_back():
    before = kernels.DECODE_ATTENTION, kernels.ATTENTION_TILE
    with kernels.attention_kernel("triton"):
        assert kernels.DECODE_ATTENTION == "triton" and kernels.ATTENTION_TILE == before[1]
        with kernels.attention_kernel("cuda", AttentionTile(4, 64, 16, 2)):
            assert kernels.ATTENTION_TILE == AttentionTile(4, 64, 16, 2)
        assert kernels.ATTENTION_TILE == before[1]
    assert (kernels.DECODE_ATTENTION, kernels.ATTENTION_TILE) == before


def test_disabling_it_logs_once_and_keeps_it_off(monkeypatch, caplog):
    monkeypatch.setattr(cuda_gemv, "_disabled", {})
    with caplog.at_level(logging.WARNING, logger=cuda_gemv.__name__):
        cuda_gemv.disable("RuntimeError: nvrtc missing", "attention")
        cuda_gemv.disable("RuntimeError: again", "attention")
    assert [r.message for r in caplog.records] == [
        "the CUDA decode attention is off in this process (RuntimeError: nvrtc missing); the Triton kernel serves "
        "instead"]
    assert cuda_gemv.disabled("attention") == "RuntimeError: nvrtc missing"
    assert cuda_gemv.disabled("gemv") is None  # each kernel is judged on its own


def test_tiles_split_each_position_over_whole_loads_within_a_warp():
    for tile in (AttentionTile(), kernels.ATTENTION_TILE):
        assert tile.threads % 32 == 0 and 32 % tile.tpp == 0 and 1 <= tile.cluster <= 8
        assert (D // tile.tpp) % 4 == 0  # 4 or 8 channels a load
    assert AttentionTile() == AttentionTile(8, 128, 16, 3)
