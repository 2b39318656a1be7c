"""The GEMV benchmark's pieces that run anywhere: its reference, its error unit, its candidate
tiles and the switch between kernel variants (the timings themselves need a GPU)."""

from __future__ import annotations

import torch

from benchmarks import gemv_bench
from worker.engine.model import kernels

GEN = torch.Generator().manual_seed(0)


def test_reference_is_the_dequantised_product_chunk_by_chunk():
    x, w = torch.randn(2, 24, generator=GEN), torch.randn(10, 24, generator=GEN)
    q, scale = kernels.quantize_int8(w)
    expected = x.double() @ (kernels.int8_weights(q).double() * scale.double()[:, None]).T
    assert torch.allclose(gemv_bench.reference(x, q, scale, chunk=3), expected, rtol=0, atol=1e-12)
    assert torch.allclose(gemv_bench.reference(x, w, None, chunk=4), x.double() @ w.double().T, atol=1e-12)


def test_ulp_error_counts_bf16_units_of_the_reference():
    ref = torch.tensor([[1.0, -3.0, 2.5]], dtype=torch.float64)
    assert gemv_bench.ulp_error(ref.to(torch.bfloat16), ref) == 0
    one_ulp_off = ref + torch.tensor([[2.0**-7, 0.0, 0.0]], dtype=torch.float64)  # bf16 ulp at 1.0
    assert 0.99 < gemv_bench.ulp_error(one_ulp_off, ref) <= 1.0  # (a floor of 1e-5 max|ref| for zeros)
    assert gemv_bench.ulp_error(ref * 1.05, ref) > 5  # 5% is far outside rounding


def test_fma_candidates_split_k_only_for_narrow_shapes():
    wide, narrow = gemv_bench.fma_candidates(12288, 1), gemv_bench.fma_candidates(4096, 1)
    assert {t.split_k for t in wide} == {1}
    assert {t.split_k for t in narrow} == {2, 4}
    assert {t.convert for t in wide} == {"prmt", "magic", "i2f"}
    assert all(t.block_k == 256 for t in gemv_bench.fma_candidates(4096, 2))  # bf16: 16 bytes per thread too


def test_int8_gemv_switches_the_variant_and_restores_the_tables():
    tile = kernels.FmaTile(8, 512, 4, 2)
    before = kernels.INT8_GEMV, dict(kernels.INT8_GEMV_BY_SHAPE), dict(kernels.FMA_TILES)
    with gemv_bench.int8_gemv("fma", {(64, 32, 1): "dot"}, {(64, 32, 1, 2): tile}):
        assert kernels.int8_gemv_variant(64, 32, 1) == "dot"
        assert kernels.int8_gemv_variant(64, 32, 2) == "fma"
        assert kernels.int8_gemv_variant(64, 32, 3) == "dot"  # more rows than the FMA GEMV takes
        assert kernels.fma_tiles(64, 32, 1, 2) == tile
        assert kernels.fma_tiles(64, 32, 1, 1) != tile
    assert (kernels.INT8_GEMV, kernels.INT8_GEMV_BY_SHAPE, kernels.FMA_TILES) == before


def test_dot_candidates_split_k_by_width_and_keep_gate_halves_on_the_tensor_cores():
    wide, narrow = gemv_bench.dot_candidates(12288), gemv_bench.dot_candidates(4096)
    assert {t[5] for t in wide} == {1, 2}
    assert {t[5] for t in narrow} == {2, 4}
    assert len(set(wide)) == len(wide)
    # a gated tile gives each half BLOCK_N // 2 rows: tl.dot needs at least 16
    assert all(t[1] // 2 >= 16 and t[0] == 16 for t in wide + narrow)


def test_a_family_row_picks_the_fastest_tile_within_the_error_limit(monkeypatch):
    x, w = torch.randn(1, 16, generator=GEN), torch.randn(8, 16, generator=GEN)
    q, scale = kernels.quantize_int8(w)
    ref = gemv_bench.reference(x, q, scale)
    timed = []

    def call(x_, q_, s_, tile, gated=False):
        if tile == ("broken",):
            raise RuntimeError("does not compile")
        timed.append(tile)
        y = ref.float()
        return y * 1.05 if tile == ("wrong",) else y

    def graph_s(calls):  # seconds per call by tile: the wrong one is the fastest
        timed.clear()
        calls[0]()
        return {("fast",): 1e-6, ("slow",): 3e-6, ("wrong",): 0.5e-6}[timed[0]]

    monkeypatch.setitem(gemv_bench.FAMILIES, "fake", (call, lambda *a: {"checked": True}, tuple))
    row = gemv_bench._family_row("fake", [("slow",), ("broken",), ("fast",), ("wrong",)], graph_s, [(q, scale)], x, ref,
                                 False, 100, "test", True, 1)
    assert [f["tile"] for f in row["fake"]] == [("slow",), ("fast",), ("wrong",)]
    assert [f["passed"] for f in row["fake"]] == [True, True, False]
    assert row["fake_best"] == ("fast",) and row["fake_us"] == 1.0 and row["fake_checks"] == {"checked": True}


def test_the_gate_check_compares_with_torchs_silu_of_the_halves():
    plain = torch.randn(2, 8, generator=GEN).to(torch.bfloat16)
    gate = plain[:, :4] * torch.nn.functional.silu(plain[:, 4:])
    assert gemv_bench._gate_matches_torch(gate, plain)
    assert not gemv_bench._gate_matches_torch(gate + 1, plain)


def test_the_edge_case_inputs_give_one_to_max_rows_with_their_float64_answers():
    made = list(gemv_bench._edge_inputs(torch.device("cpu"), torch.float32, 3, [(32, 64), (16, 128)], 3))
    assert [(n, k, q.shape, q.dtype) for n, k, q, *_ in made] == [(32, 64, (32, 64), torch.uint8),
                                                                (16, 128, (16, 128), torch.uint8)]
    for n, k, q, scale, bias, cases in made:
        cases = list(cases)
        assert [m for m, _, _ in cases] == [1, 2, 3]
        for m, x, ref in cases:
            assert x.shape == (m, k)
            assert torch.allclose(ref, gemv_bench.reference(x, q, scale) + bias.double())


def test_cuda_candidates_are_distinct_and_split_k_over_whole_groups_of_warps():
    tiles = gemv_bench.cuda_candidates()
    assert len(set(tiles)) == len(tiles)
    assert any(tile.ksplit > 1 for tile in tiles)
    assert all(tile.groups >= 1 and tile.groups * tile.ksplit * 32 == tile.threads for tile in tiles)
