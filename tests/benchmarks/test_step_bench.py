"""The norm benchmark's float64 reference (the fused kernels themselves need a GPU)."""

import torch

from benchmarks.step_bench import float64_norm
from worker.engine.model import kernels
from worker.engine.model.decoder import RMSNorm


def test_the_float64_norm_rounds_where_the_model_rounds_and_agrees_with_it_on_easy_rows():
    gen = torch.Generator().manual_seed(0)
    norm = RMSNorm(256, 1e-6)
    norm.weight.data = (1 + 0.2 * torch.randn(256, generator=gen)).to(torch.bfloat16)
    x = torch.randn(3, 256, generator=gen).to(torch.bfloat16)
    exact = float64_norm(x, norm.weight)
    assert exact.dtype == torch.bfloat16
    assert torch.equal(exact, norm.to(torch.bfloat16)(x))  # float32 sums agree on these rows
    assert torch.equal(exact, kernels.rms_norm(x, norm.weight, 1e-6)[0])
