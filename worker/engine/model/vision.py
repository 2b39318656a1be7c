"""The vision tower: a ViT-bigG-like encoder and the attention-pool resampler.

``VisionTransformer`` maps CLIP-normalised pixels ``[N, 3, 448, 448]`` to 256 features per image
in the decoder's hidden size ``[N, 256, hidden]``. Module and parameter names follow the official
checkpoint (``transformer.visual.conv1.weight``, ``...transformer.resblocks.N.attn.in_proj.weight``,
``...attn_pool.attn.in_proj_weight``...).

Two position tables are bicubically interpolated from the checkpoint's 16x16 grids to the 32x32
patch grid. They depend only on weights, so they are computed once, whenever weights are loaded
(a load_state_dict post-hook) or :meth:`VisionTransformer.refresh_fixed_tensors` is called, never
per forward.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .args import VisionArgs


def interpolate_grid(table: torch.Tensor, num_positions: int) -> torch.Tensor:
    """Resize a square grid of position embeddings ``[L, C]`` to ``[num_positions, C]``.

    Bicubic, ``align_corners=False``, computed in float32 and cast back to the table's dtype, as
    the official ``get_abs_pos`` does.
    """
    src = math.isqrt(table.shape[0])
    dst = math.isqrt(num_positions)
    if src == dst:
        return table
    grid = table.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)  # [1, C, src, src]
    grid = F.interpolate(grid, size=(dst, dst), mode="bicubic", align_corners=False)  # [1, C, dst, dst]
    return grid.permute(0, 2, 3, 1).reshape(dst * dst, -1).to(table.dtype)  # [dst*dst, C]


def sincos_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """The resampler's fixed 2D sin-cos table ``[grid_size**2, embed_dim]`` (float32).

    Row ``h * grid_size + w``: the first half of the channels encodes the column ``w``, the second
    the row ``h``;
    each half is ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_i = 10000 ** (-i / (D/4))``.
    Computed in float32 numpy, as the checkpoints were made. Used to write tiny checkpoints; real
    models load the table from their weights.
    """
    assert embed_dim % 4 == 0

    def encode(dim: int, pos: np.ndarray) -> np.ndarray:  # [M] -> [M, dim]
        omega = np.arange(dim // 2, dtype=np.float32)
        omega /= dim / 2.0
        omega = 1.0 / 10000**omega
        angles = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    coords = np.arange(grid_size, dtype=np.float32)
    grid_w, grid_h = np.meshgrid(coords, coords)  # each [grid, grid]; w varies along a row
    table = np.concatenate([encode(embed_dim // 2, grid_w), encode(embed_dim // 2, grid_h)], axis=1)
    return torch.from_numpy(table).float()


class VisualAttention(nn.Module):
    """Self-attention with the official fused ``in_proj`` whose rows are grouped per head:
    head ``h`` owns rows ``[3*h*d, 3*(h+1)*d)`` laid out as its q, k, v."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_dim = width // heads
        self.in_proj = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape  # [N, L, W]
        qkv = self.in_proj(x).view(n, length, self.heads, 3 * self.head_dim)  # [N, L, H, 3d]
        q, k, v = qkv.transpose(1, 2).split(self.head_dim, dim=-1)  # each [N, H, L, d]
        out = F.scaled_dot_product_attention(q, k, v)  # [N, H, L, d]
        return self.out_proj(out.transpose(1, 2).reshape(n, length, width))  # [N, L, W]


class VisualMLP(nn.Module):
    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))


class VisualBlock(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(args.width, eps=args.layer_norm_eps)
        self.attn = VisualAttention(args.width, args.heads)
        self.ln_2 = nn.LayerNorm(args.width, eps=args.layer_norm_eps)
        self.mlp = VisualMLP(args.width, args.mlp_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class VisualStack(nn.Module):
    """Holds ``resblocks`` so that names read ``visual.transformer.resblocks.N``."""

    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.resblocks = nn.ModuleList(VisualBlock(args) for _ in range(args.layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = block(x)
        return x


class PoolAttention(nn.Module):
    """Multi-head cross-attention with ``nn.MultiheadAttention``'s parameter names and layout
    (``in_proj_weight`` = [Wq; Wk; Wv], ``in_proj_bias``, ``out_proj``)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        q = self._heads(F.linear(query, wq, bq))  # [N, H, Q, d]
        k = self._heads(F.linear(key, wk, bk))  # [N, H, L, d]
        v = self._heads(F.linear(value, wv, bv))  # [N, H, L, d]
        out = F.scaled_dot_product_attention(q, k, v)  # [N, H, Q, d]
        n, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(n, length, -1))  # [N, Q, D]

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        return x.view(n, length, self.heads, dim // self.heads).transpose(1, 2)


class Resampler(nn.Module):
    """Attention pool: 256 learned queries attend over the patch features.

    Queries get the 16x16 sin-cos table ``pos_embed`` (a frozen checkpoint tensor), keys the same
    table interpolated to the 32x32 patch grid, values none.
    """

    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        dim = args.output_dim
        self.pos_embed = nn.Parameter(torch.empty(args.n_queries, dim), requires_grad=False)
        self.query = nn.Parameter(torch.empty(args.n_queries, dim))
        # The official module projects only when the widths differ (an Identity has no weight).
        self.kv_proj = nn.Linear(args.width, dim, bias=False) if args.width != dim else nn.Identity()
        self.attn = PoolAttention(dim, args.pool_heads)
        self.ln_q = nn.LayerNorm(dim, eps=args.layer_norm_eps)
        self.ln_kv = nn.LayerNorm(dim, eps=args.layer_norm_eps)

    def forward(self, x: torch.Tensor, key_pos: torch.Tensor) -> torch.Tensor:
        # x [N, P, W] patch features; key_pos [P, D] pos_embed interpolated to the patch grid
        x = self.ln_kv(self.kv_proj(x))  # [N, P, D]
        q = self.ln_q(self.query) + self.pos_embed  # [Q, D]
        q = q.unsqueeze(0).expand(x.shape[0], -1, -1)  # [N, Q, D]
        return self.attn(q, x + key_pos, x)  # [N, Q, D]


class VisionTransformer(nn.Module):
    """Pixels ``[N, 3, S, S]`` -> image features ``[N, n_queries, output_dim]`` (model dtype)."""

    patch_pos: torch.Tensor  # [P, W] positional_embedding interpolated to the patch grid
    pool_key_pos: torch.Tensor  # [P, D] attn_pool.pos_embed interpolated to the patch grid

    def __init__(self, args: VisionArgs) -> None:
        super().__init__()
        self.args = args
        width = args.width
        self.conv1 = nn.Conv2d(3, width, kernel_size=args.patch_size, stride=args.patch_size, bias=False)
        self.positional_embedding = nn.Parameter(torch.empty(args.n_queries, width))
        self.ln_pre = nn.LayerNorm(width, eps=args.layer_norm_eps)
        self.transformer = VisualStack(args)
        self.attn_pool = Resampler(args)
        self.ln_post = nn.LayerNorm(args.output_dim, eps=args.layer_norm_eps)
        self.proj = nn.Parameter(torch.empty(args.output_dim, args.output_dim))
        self.register_buffer("patch_pos", torch.empty(args.num_patches, width), persistent=False)
        self.register_buffer("pool_key_pos", torch.empty(args.num_patches, args.output_dim), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _keys: module.refresh_fixed_tensors())

    @torch.no_grad()
    def refresh_fixed_tensors(self) -> None:
        """Recompute the interpolated position tables from the current weights."""
        if self.positional_embedding.is_meta:
            return
        self.patch_pos = interpolate_grid(self.positional_embedding.detach(), self.args.num_patches)
        self.pool_key_pos = interpolate_grid(self.attn_pool.pos_embed.detach(), self.args.num_patches)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.to(dtype=self.conv1.weight.dtype, device=self.conv1.weight.device)  # [N, 3, S, S]
        x = self.conv1(x)  # [N, W, G, G]
        x = x.flatten(2).transpose(1, 2)  # [N, G*G, W]
        x = self.ln_pre(x + self.patch_pos)
        x = self.transformer(x)  # [N, P, W]
        x = self.attn_pool(x, self.pool_key_pos)  # [N, Q, D]
        return self.ln_post(x) @ self.proj  # [N, Q, D]
