"""int8 weight-only quantisation: per-channel symmetric weights, which layers, the reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from worker.engine.model.kernels import int8_linear, int8_weights, quantize_int8, store_int8
from worker.engine.model.quant import Int8Linear, dequantize_llm, is_quantized, llm_linear_names, quantize_llm


def test_int8_weights_are_stored_as_their_value_plus_128_and_read_back_exactly():
    q = torch.arange(-128, 128, dtype=torch.int8)
    stored = store_int8(q)
    assert stored.dtype == torch.uint8 and stored.tolist() == list(range(256))
    assert torch.equal(int8_weights(stored), q.float())


def test_signed_int8_weights_are_refused_rather_than_misread():
    x = torch.randn(2, 64)
    stored, scale = quantize_int8(torch.randn(8, 64))
    with pytest.raises(TypeError, match="uint8 q \\+ 128"):
        int8_linear(x, int8_weights(stored).to(torch.int8), scale)
    assert int8_linear(x, stored, scale).shape == (2, 8)


def test_each_output_channel_gets_its_own_symmetric_scale():
    weight = torch.randn(5, 64, generator=torch.Generator().manual_seed(0))
    weight[1] *= 100
    weight[3] = 0
    stored, scale = quantize_int8(weight)
    q = int8_weights(stored)
    assert stored.dtype == torch.uint8 and scale.shape == (5,) and q.abs().max() == 127
    assert torch.equal(q[3], torch.zeros(64)) and scale[3] > 0
    error = (q * scale[:, None] - weight).abs()
    assert (error <= scale[:, None] / 2 + 1e-6).all()


def test_an_int8_linear_matches_its_dequantised_weights():
    linear = nn.Linear(16, 8)
    int8 = Int8Linear.from_linear(linear)
    x = torch.randn(2, 3, 16)
    dense = x @ int8.dequantized_weight().T + linear.bias
    assert int8(x).shape == (2, 3, 8)
    assert torch.allclose(int8(x), dense, atol=1e-5)
    assert set(int8.state_dict()) == {"qweight", "scale", "bias"}


def test_the_llm_linears_and_the_lm_head_are_quantised_not_the_vision_tower(small_model):
    import copy

    model = copy.deepcopy(small_model)
    names = llm_linear_names(model)
    layers = model.args.llm.num_layers
    assert len(names) == 5 * layers + 1 and "lm_head" in names  # c_attn, c_proj, w1, w2, mlp.c_proj
    assert quantize_llm(model) == len(names)
    assert is_quantized(model) and quantize_llm(model) == 0
    assert isinstance(model.transformer.h[0].attn.c_attn, Int8Linear)
    assert isinstance(model.transformer.visual.transformer.resblocks[0].attn.in_proj, nn.Linear)
    dequantize_llm(model, torch.float32)
    assert not is_quantized(model)
    ids = torch.tensor([[1, 2, 3]])
    assert torch.allclose(model(ids), small_model(ids), atol=0.5)  # int8 is close, not equal
