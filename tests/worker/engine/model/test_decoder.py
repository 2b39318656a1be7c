from __future__ import annotations

import math

import pytest
import torch

from worker.engine.model.args import LLMArgs
from worker.engine.model.decoder import (
    MLP,
    RMSNorm,
    apply_rotary,
    logn_scales,
    ntk_alpha,
    rotary_cos_sin,
    rotary_inv_freq,
)

SEQ = 32  # a short seq_length so that NTK and logn start early


@pytest.mark.parametrize(
    ("length", "alpha"),
    [(1, 1), (1024, 1), (2048, 1), (2049, 3), (4096, 3), (4097, 7), (8192, 7), (8193, 15)],
)
def test_ntk_alpha_steps_up_as_the_prefill_doubles_past_seq_length(length, alpha):
    assert ntk_alpha(length, 2048) == alpha


def test_logn_scale_is_one_up_to_seq_length_then_log_base_seq_length():
    scales = logn_scales(4100, 2048)
    assert torch.all(scales[:2048] == 1)
    assert scales[2048].item() == pytest.approx(math.log(2049) / math.log(2048), rel=1e-7)
    assert scales[4095].item() == pytest.approx(math.log(4096, 2048), rel=1e-7)


def test_rotary_base_grows_with_alpha_as_the_official_formula_says():
    dim = 128
    plain = rotary_inv_freq(dim, 10000.0)
    scaled = rotary_inv_freq(dim, 10000.0, alpha=3)
    base = 10000.0 * 3 ** (dim / (dim - 2))
    assert plain[1].item() == pytest.approx(10000.0 ** (-2 / dim), rel=1e-6)
    assert scaled[1].item() == pytest.approx(base ** (-2 / dim), rel=1e-6)
    assert scaled[0].item() == 1.0


def test_rotary_scores_depend_only_on_the_distance_between_positions():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    inv = rotary_inv_freq(16, 10000.0)

    def score(pq: int, pk: int) -> float:
        cq, sq = rotary_cos_sin(torch.tensor([pq]), inv)
        ck, sk = rotary_cos_sin(torch.tensor([pk]), inv)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum().item()

    assert score(7, 3) == pytest.approx(score(104, 100), rel=1e-4)
    by_distance = [score(10, 10 - d) for d in range(6)]
    assert max(by_distance) - min(by_distance) > 0.1
    c0, s0 = rotary_cos_sin(torch.tensor([0]), inv)
    assert torch.equal(apply_rotary(q, c0, s0), q)


def test_rotary_leaves_channels_past_rotary_dim_alone():
    x = torch.randn(1, 3, 2, 16)
    cos, sin = rotary_cos_sin(torch.arange(3), rotary_inv_freq(8, 10000.0))
    out = apply_rotary(x, cos, sin)
    assert torch.equal(out[..., 8:], x[..., 8:])
    assert not torch.allclose(out[:, 1:, :, :8], x[:, 1:, :, :8])


def test_rms_norm_normalises_in_float32_then_scales():
    norm = RMSNorm(8, eps=1e-6)
    norm.weight.data = torch.arange(1.0, 9.0)
    x = torch.randn(3, 8)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)


def test_mlp_gates_w1_with_silu_of_w2():
    torch.manual_seed(0)
    args = LLMArgs(hidden_size=16, num_heads=2, kv_channels=8, intermediate_size=64, vocab_size=32)
    mlp = MLP(args)
    x = torch.randn(4, 16)
    expected = mlp.c_proj(mlp.w1(x) * torch.nn.functional.silu(mlp.w2(x)))
    swapped = mlp.c_proj(mlp.w2(x) * torch.nn.functional.silu(mlp.w1(x)))
    torch.testing.assert_close(mlp(x), expected)
    assert not torch.allclose(mlp(x), swapped)


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids]))[0]


@pytest.fixture(scope="module")
def long_context_models(model_factory):
    """The same weights with dynamic NTK and logn on, off, and each alone."""
    return {
        "both": model_factory(seq_length=SEQ),
        "none": model_factory(seq_length=SEQ, use_dynamic_ntk=False, use_logn_attn=False),
        "ntk": model_factory(seq_length=SEQ, use_logn_attn=False),
        "logn": model_factory(seq_length=SEQ, use_dynamic_ntk=False),
    }


def test_ntk_and_logn_change_nothing_up_to_seq_length(long_context_models):
    ids = torch.randint(0, 600, (SEQ,), generator=torch.Generator().manual_seed(0)).tolist()
    reference = _logits(long_context_models["both"], ids)
    for name in ("none", "ntk", "logn"):
        assert torch.equal(_logits(long_context_models[name], ids), reference), name


def test_ntk_and_logn_each_change_results_past_seq_length(long_context_models):
    ids = torch.randint(0, 600, (SEQ + 1,), generator=torch.Generator().manual_seed(0)).tolist()
    logits = {name: _logits(model, ids) for name, model in long_context_models.items()}
    for name in ("ntk", "logn", "both"):
        assert (logits[name] - logits["none"]).abs().max() > 1e-3, name
    # NTK changes every position of a long prefill; logn only the queries past seq_length.
    assert (logits["ntk"][:SEQ] - logits["none"][:SEQ]).abs().max() > 1e-3
    assert torch.equal(logits["logn"][:SEQ], logits["none"][:SEQ])
