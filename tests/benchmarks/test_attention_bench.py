"""The attention benchmark's reference and error measure (the benchmark itself needs a GPU)."""

import torch

from benchmarks import attention_bench


def test_the_reference_attends_each_row_over_its_own_cache_row_up_to_its_position():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 8)
    k_cache, v_cache = torch.randn(4, 3, 10, 8), torch.randn(4, 3, 10, 8)
    positions, slots = torch.tensor([4, 9]), torch.tensor([3, 1])
    out = attention_bench.reference(q, k_cache, v_cache, positions, slots)  # [B, H * D]
    for b in range(2):
        k = k_cache[slots[b], :, :positions[b] + 1].double()
        v = v_cache[slots[b], :, :positions[b] + 1].double()
        want = torch.nn.functional.scaled_dot_product_attention(q[b, :, None].double(), k, v)  # [H, 1, D]
        assert torch.allclose(out[b], want.reshape(-1), atol=1e-12)


def test_errors_are_counted_in_bf16_units_of_the_reference():
    ref = torch.tensor([1.0, 1.0, -3.0, 0.0], dtype=torch.float64)
    out = torch.tensor([1.0, 1.0 + 2.0 ** -7, -3.0 - 2.0 ** -6, 0.0])  # exact, one unit, one unit (in [2, 4))
    assert attention_bench.ulps(out, ref).tolist() == [0.0, 1.0, 1.0, 0.0]
