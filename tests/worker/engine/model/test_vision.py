from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from worker.engine.model.vision import PoolAttention, VisualAttention, interpolate_grid, sincos_2d


def test_sincos_table_encodes_column_then_row():
    dim, grid = 16, 4
    table = sincos_2d(dim, grid)
    assert table.shape == (grid * grid, dim)
    quarter = dim // 4
    omega = [10000 ** (-i / quarter) for i in range(quarter)]
    h, w = 2, 3
    row = table[h * grid + w]
    expected = ([math.sin(w * o) for o in omega] + [math.cos(w * o) for o in omega]
                + [math.sin(h * o) for o in omega] + [math.cos(h * o) for o in omega])
    assert row.tolist() == pytest.approx(expected, abs=1e-6)


def test_grid_interpolation_is_bicubic_in_float32_and_keeps_dtype():
    table = torch.randn(16, 8).to(torch.bfloat16)
    out = interpolate_grid(table, 64)
    grid = table.float().reshape(1, 4, 4, 8).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, expected.permute(0, 2, 3, 1).reshape(64, 8).bfloat16())
    assert interpolate_grid(table, 16) is table


def test_visual_attention_reads_qkv_grouped_per_head():
    torch.manual_seed(0)
    width, heads = 12, 3
    attn = VisualAttention(width, heads)
    x = torch.randn(2, 5, width)
    d = width // heads
    qkv = attn.in_proj(x)  # rows of head h: q, k, v of that head, one after the other
    outs = []
    for h in range(heads):
        block = qkv[..., 3 * d * h: 3 * d * (h + 1)]
        q, k, v = block[..., :d], block[..., d:2 * d], block[..., 2 * d:]
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
        outs.append(weights @ v)
    expected = attn.out_proj(torch.cat(outs, dim=-1))
    torch.testing.assert_close(attn(x), expected, atol=1e-6, rtol=1e-5)


def test_pool_attention_equals_torch_multihead_attention_with_the_same_weights():
    torch.manual_seed(0)
    dim, heads = 32, 4
    ours = PoolAttention(dim, heads)
    nn.init.normal_(ours.in_proj_weight, std=0.2)
    nn.init.normal_(ours.in_proj_bias, std=0.2)
    reference = nn.MultiheadAttention(dim, heads)  # what the official resampler uses (sequence-first)
    reference.load_state_dict(ours.state_dict())
    q, k, v = torch.randn(2, 7, dim), torch.randn(2, 11, dim), torch.randn(2, 11, dim)
    expected = reference(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1))[0].transpose(0, 1)
    torch.testing.assert_close(ours(q, k, v), expected, atol=1e-5, rtol=1e-5)


def test_vision_tower_maps_pixels_to_256_features_per_image(small_model, pixels):
    with torch.no_grad():
        features = small_model.encode_images(pixels)
        alone = small_model.encode_images(pixels[1:])
    assert features.shape == (2, 256, small_model.args.llm.hidden_size)
    torch.testing.assert_close(features[1:], alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(features[0], features[1])


def test_position_tables_follow_loaded_weights(model_factory):
    model = model_factory(seed=0)
    visual = model.transformer.visual
    other = model_factory(seed=1).transformer.visual.state_dict()
    visual.load_state_dict(other)
    assert torch.equal(visual.patch_pos, interpolate_grid(other["positional_embedding"], 1024))
    assert torch.equal(visual.pool_key_pos, interpolate_grid(other["attn_pool.pos_embed"], 1024))
    assert "patch_pos" not in visual.state_dict() and "pool_key_pos" not in visual.state_dict()
