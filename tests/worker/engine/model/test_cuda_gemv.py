"""The CUDA int8 GEMV's pieces that can be checked without a GPU: its int8 -> float32 trick, the
source compiling for Hopper without spilling (where nvcc is installed), when it runs and what
happens when it cannot. Its answers on the GPU are checked against float64 math by
benchmarks/gemv_bench.py (docs/benchmarks.md)."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch

from worker.engine.model import cuda_gemv, kernels
from worker.engine.model.cuda_gemv import CudaTile, MmaTile


def byte_perm(a: np.ndarray, b: int, selector: int) -> np.ndarray:
    """CUDA's ``__byte_perm(a, b, s)``: result byte i is byte ``(s >> 4i) & 7`` of ``b:a``."""
    pool = [(a >> (8 * i)) & 0xFF for i in range(4)] + [np.full_like(a, (b >> (8 * i)) & 0xFF) for i in range(4)]
    out = np.zeros_like(a)
    for i in range(4):
        out |= pool[(selector >> (4 * i)) & 7] << (8 * i)
    return out


def stored_words(q: np.ndarray, per_word: int) -> np.ndarray:
    """int8 weights as the model stores them (kernels.store_int8: the byte q + 128), ``per_word``
    bytes of each uint32 word."""
    stored = kernels.store_int8(torch.from_numpy(q)).numpy()
    return stored.view(np.uint8 if per_word == 1 else np.uint16).astype(np.uint32).ravel()


def test_the_byte_permute_conversion_gives_every_int8_value_exactly():
    q = np.arange(-128, 128, dtype=np.int8)
    bits = byte_perm(stored_words(q, 1), 0x4B000000, 0x7540)  # one weight in byte 0 of each word
    values = bits.astype(np.uint32).view(np.float32) - np.float32(8388736.0)
    assert np.array_equal(values, q.astype(np.float32))
    # the other three selectors pick bytes 1-3 of the same word
    packed = np.array([0x84_03_FF_00], dtype=np.uint32)  # stored bytes (low first) of -128, 127, -125, 4
    got = [byte_perm(packed, 0x4B000000, 0x7540 + i).view(np.float32)[0] - 8388736.0 for i in range(4)]
    assert got == [-128.0, 127.0, -125.0, 4.0]


def test_the_cuda_gemv_does_not_run_on_cpu_tensors_or_other_dtypes():
    x = torch.zeros(1, 64, dtype=torch.bfloat16)
    q = torch.zeros(32, 64, dtype=torch.uint8)
    assert not cuda_gemv.available(x, q)
    assert kernels._int8_gemv_cuda(x, q, torch.ones(32), None, None, False) is None


def test_the_tensor_core_gemv_does_not_run_on_cpu_tensors_and_falls_back_beyond_its_rows():
    x = torch.zeros(2, 64, dtype=torch.bfloat16)
    q = torch.zeros(32, 64, dtype=torch.uint8)
    assert not cuda_gemv.mma_available(x, q)
    assert kernels._int8_gemv_mma(x, q, torch.ones(32), None, None, False) is None
    with_mma = {**kernels.INT8_GEMV_BY_SHAPE, (4096, 4096, 2): "mma", (4096, 4096, 9): "mma"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(kernels, "INT8_GEMV_BY_SHAPE", with_mma)
        assert kernels.int8_gemv_variant(4096, 4096, 2) == "mma"
        assert kernels.int8_gemv_variant(4096, 4096, cuda_gemv.MMA_MAX_ROWS + 1) == "dot"


def test_each_warp_of_the_tensor_core_gemv_stages_its_share_of_x_and_then_keeps_its_sums_there():
    # 4096 = 64 chunks of 64: 8 per warp at 8 splits, 128 bytes of f16 a chunk, 16 of padding a row
    assert cuda_gemv.mma_shared_bytes(2, 4096, MmaTile(1, 8, 2)) == 8 * 2 * (8 * 128 + 16)
    assert cuda_gemv.mma_shared_bytes(1, 4096, MmaTile(4, 1, 2)) == 4 * (64 * 128 + 16)
    assert cuda_gemv.mma_shared_bytes(1, 704, MmaTile(1, 8, 2)) == 8 * 512  # 32 float4 of sums a warp
    # 172 chunks over 8 warps: 22 each at most; two rows of the MLP's K fit on the default tile
    assert cuda_gemv.mma_shared_bytes(2, 11008, MmaTile()) == 8 * 2 * (22 * 128 + 16) <= cuda_gemv.MMA_SHARED_LIMIT
    assert cuda_gemv.mma_shared_bytes(8, 11008, MmaTile()) > cuda_gemv.MMA_SHARED_LIMIT


def test_disabling_the_cuda_gemv_logs_once_and_keeps_it_off(monkeypatch, caplog):
    monkeypatch.setattr(cuda_gemv, "_disabled", {})
    with caplog.at_level(logging.WARNING, logger=cuda_gemv.__name__):
        cuda_gemv.disable("RuntimeError: nvrtc missing")
        cuda_gemv.disable("RuntimeError: again")
    assert [r.message for r in caplog.records if "CUDA int8 GEMV is off" in r.message] == [
        "the CUDA int8 GEMV is off in this process (RuntimeError: nvrtc missing); the next fastest GEMV serves "
        "instead"]
    assert not cuda_gemv._compiler_ok(torch.zeros(1, dtype=torch.bfloat16))
    assert cuda_gemv.disabled() == "RuntimeError: nvrtc missing"
    assert cuda_gemv.disabled("mma") is None  # the tensor-core kernel is judged on its own


def test_the_f16_byte_permute_conversion_gives_every_int8_value_exactly():
    q = np.arange(-128, 128, dtype=np.int8).reshape(-1, 2)  # two weights in bytes 0-1 of each word
    halves = byte_perm(stored_words(q, 2), 0x64646464, 0x4140).astype(np.uint32).view(np.uint16).view(np.float16)
    values = halves.astype(np.float32) - np.float32(1152.0)  # the kernel's sub.f16x2 by 0x6480 (1152)
    assert np.array_equal(values.reshape(-1, 2), q.astype(np.float32))


def test_a_shape_on_the_cuda_gemv_falls_back_to_triton_beyond_its_rows():
    assert kernels.int8_gemv_variant(12288, 4096, 1) == "cuda"
    assert kernels.int8_gemv_variant(12288, 4096, cuda_gemv.MAX_ROWS + 1) == "dot"


def assert_compiles_for_hopper_without_spilling(source: str, macros: dict[str, int], tmp_path) -> None:
    path = tmp_path / "kernel.cu"
    path.write_text(source)
    done = subprocess.run(["nvcc", "-arch=sm_90", "-cubin", "-o", str(tmp_path / "kernel.cubin"), "-Xptxas", "-v",
                           *[f"-D{k}={v}" for k, v in macros.items()], str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", done.stderr)]
    assert spills and max(spills) == 0, (macros, done.stderr)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed here")
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_the_source_compiles_for_hopper_without_spilling_for_every_tile_in_use(tmp_path, rows):
    settings = {(tile, n == 22016, n == 12288) for (n, _, m), tile in kernels.CUDA_TILES.items() if m == min(rows, 2)}
    settings |= {(CudaTile(), True, False), (CudaTile(), False, True)}  # the default, gated and with a bias
    for tile, gated, bias in sorted(settings):
        assert_compiles_for_hopper_without_spilling(cuda_gemv.SOURCE, cuda_gemv.macros(rows, tile, gated, bias),
                                                    tmp_path)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed here")
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_the_source_with_the_norm_or_the_residual_inside_compiles_for_hopper_without_spilling(tmp_path, rows):
    for (n, k, m), tile in sorted(kernels.NORM_TILES.items()):  # c_attn, [w1 | w2], lm_head after a norm
        if m == min(rows, 2):
            assert_compiles_for_hopper_without_spilling(
                cuda_gemv.SOURCE, cuda_gemv.macros(rows, tile, n == 22016, n == 12288, k), tmp_path)
    for key in ((4096, 4096, min(rows, 2)), (4096, 11008, min(rows, 2))):  # both c_proj, before a residual add
        assert_compiles_for_hopper_without_spilling(
            cuda_gemv.SOURCE, cuda_gemv.macros(rows, kernels.CUDA_TILES[key], False, False, residual=True), tmp_path)


def test_the_norm_and_the_residual_fuse_only_where_the_kernel_can_hold_them():
    x, q = torch.zeros(2, 4096, dtype=torch.bfloat16), torch.zeros(12288, 4096, dtype=torch.uint8)
    weight = torch.ones(4096, dtype=torch.bfloat16)
    residual = torch.zeros(2, 12288, dtype=torch.bfloat16)
    assert cuda_gemv.fusions_ok(x, q, CudaTile(2, 2, 256), norm_weight=weight, residual=residual)
    assert not cuda_gemv.fusions_ok(x, q, CudaTile(2, 2, 256), norm_weight=weight.float())
    assert not cuda_gemv.fusions_ok(x, q, CudaTile(2, 2, 256), norm_weight=weight[:2048])
    assert not cuda_gemv.fusions_ok(x[:, :2048], q[:, :2048], CudaTile(2, 2, 512), norm_weight=weight[:2048])  # K % 8T
    big = torch.zeros(4, 8192, dtype=torch.bfloat16)  # 4 rows of 8192: 64 KB of shared memory
    assert not cuda_gemv.fusions_ok(big, torch.zeros(16, 8192, dtype=torch.uint8), norm_weight=torch.ones(8192))
    assert not cuda_gemv.fusions_ok(x, q, residual=residual[:, :4096])
    assert cuda_gemv.fusions_ok(x, torch.zeros(2 * 11008, 4096, dtype=torch.uint8), gated=True,
                                residual=torch.zeros(2, 11008, dtype=torch.bfloat16))
    macros = cuda_gemv.macros(2, CudaTile(), False, False, 4096, True)
    assert (macros["NORM"], macros["NORM_K"], macros["RESIDUAL"]) == (1, 4096, 1)
    assert cuda_gemv.macros(2, CudaTile(), False, False)["NORM"] == 0


def test_a_tile_with_blocks_per_sm_caps_the_registers_and_the_grid_of_a_norm_gemv():
    capped = CudaTile(1, 2, 128, blocks_per_sm=7)
    assert cuda_gemv.macros(1, capped, True, False, 4096)["MIN_BLOCKS"] == 7
    assert cuda_gemv.macros(1, CudaTile(), True, False, 4096)["MIN_BLOCKS"] == 0  # the compiler's own choice
    # 11,008 groups of one warp each on 132 SMs: 8 blocks an SM fit, 7 are asked for
    assert cuda_gemv.norm_grid(2752, 8 * 132, capped, 132) == 7 * 132
    assert cuda_gemv.norm_grid(2752, 8 * 132, CudaTile(1, 2, 128), 132) == 8 * 132
    assert cuda_gemv.norm_grid(2752, 6 * 132, capped, 132) == 6 * 132  # no more than fit
    assert cuda_gemv.norm_grid(100, 8 * 132, capped, 132) == 100  # nor than there is work for


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed here")
@pytest.mark.parametrize("rows", [1, 2, 4])
def test_the_tensor_core_source_compiles_for_hopper_without_spilling(tmp_path, rows):
    tiles = [(MmaTile(), False, True), (MmaTile(1, 8, 2), True, False), (MmaTile(4, 2, 2), False, False)]
    for tile, gated, bias in tiles:
        assert_compiles_for_hopper_without_spilling(
            cuda_gemv.MMA_SOURCE, cuda_gemv.mma_macros(rows, tile, gated, bias), tmp_path)


def test_tiles_launch_whole_warps():
    assert all(tile.threads % 32 == 0 and tile.wrows >= 1 and tile.unroll >= 1
               for tile in [*kernels.CUDA_TILES.values(), CudaTile()])


def test_tiles_split_k_over_whole_groups_of_warps():
    assert CudaTile().ksplit == 1 and CudaTile().groups == 4
    assert CudaTile(1, 1, 128, 2).groups == 2
    assert all(tile.ksplit >= 1 and tile.groups >= 1 and tile.groups * tile.ksplit * 32 == tile.threads
               for tile in [*kernels.CUDA_TILES.values(), CudaTile(2, 2, 256, 4)])


def test_a_kernel_is_compiled_once_per_source_and_setting(monkeypatch):
    calls = []

    def fake_compile(source, name, nvcc_options):
        calls.append((source, name, tuple(nvcc_options)))
        return object()

    monkeypatch.setattr(cuda_gemv, "_compiled", {})
    monkeypatch.setattr(torch.cuda, "_compile_kernel", fake_compile, raising=False)
    first = cuda_gemv.compiled("source one", "vlq_kernel", {"ROWS": 2})
    assert cuda_gemv.compiled("source one", "vlq_kernel", {"ROWS": 2}) is first
    other_source = cuda_gemv.compiled("source two", "vlq_kernel", {"ROWS": 2})  # same name, another kernel
    other_setting = cuda_gemv.compiled("source one", "vlq_kernel", {"ROWS": 1})
    assert len({id(first), id(other_source), id(other_setting)}) == 3
    assert [(source, options) for source, _, options in calls] == [
        ("source one", ("-DROWS=2",)), ("source two", ("-DROWS=2",)), ("source one", ("-DROWS=1",))]
