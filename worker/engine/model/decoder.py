"""The QWen decoder (Qwen-VL-Chat's LLM) with a static, slotted KV cache.

Numerics follow the official ``modeling_qwen.py``:

- RMSNorm in float32, cast back, then scaled by the weight.
- ``c_attn`` is one fused q|k|v projection with bias; ``c_proj`` and the MLP have none. The MLP is
  ``c_proj(w1(x) * silu(w2(x)))`` (``w2`` is the gate).
- Rotary embeddings over the first ``rotary_dim`` channels (all of them for Qwen-VL), halves
  rotated, applied in float32.
- Dynamic NTK: a sequence whose first forward (the prefill) has ``L > seq_length`` tokens gets
  ``alpha = 2 ** ceil(log2(L / seq_length) + 1) - 1`` and rotary base ``base * alpha ** (d / (d - 2))``
  for its whole life, decode steps included. Here alpha is kept per cache slot, so two sequences of
  different lengths decode together, each with its own alpha.
- logn attention: the query at 1-based position ``i > seq_length`` is multiplied by
  ``log(i) / log(seq_length)`` after the rotary embedding.

Cache layout: per layer ``k, v: [max_batch_size, heads, max_seq_len, head_dim]``; a sequence owns
one row (its slot) for its whole life. Decode takes one token per slot, writes its k/v at its
position and attends over its row up to that position: static shapes, no host syncs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .args import LLMArgs


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def ntk_alpha(length: int, seq_length: int) -> float:
    """The dynamic-NTK alpha the official model picks for a sequence prefilled with ``length`` tokens:
    1 up to ``seq_length``, then 3, 7, 15... as the length doubles."""
    context_value = math.log(length / seq_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def rotary_inv_freq(dim: int, base: float, alpha: float = 1.0, device: torch.device | None = None) -> torch.Tensor:
    """Rotary frequencies ``[dim // 2]`` (float32) for NTK factor ``alpha``."""
    base = base * alpha ** (dim / (dim - 2))
    return 1.0 / (base ** (torch.arange(0, dim, 2, device=device).float() / dim))


def rotary_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``positions [..., T]`` and ``inv_freq [..., dim/2]`` (broadcastable leading dims) ->
    ``cos, sin [..., T, 1, dim]`` in float32, ready to multiply ``[..., T, heads, dim]``."""
    freqs = positions.float().unsqueeze(-1) * inv_freq.unsqueeze(-2)  # [..., T, dim/2]
    emb = torch.cat((freqs, freqs), dim=-1).unsqueeze(-2)  # [..., T, 1, dim]
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``cos.shape[-1]`` channels of ``x [B, T, H, D]`` (in float32)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot].float(), x[..., rot:].float()
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    x_rot = (x_rot * cos) + (rotated * sin)
    return torch.cat((x_rot, x_pass), dim=-1).type_as(x)


def logn_scales(length: int, seq_length: int, device: torch.device | None = None) -> torch.Tensor:
    """Query scale per 0-based position ``[length]`` (float32): 1 up to ``seq_length``, then
    ``log(i) / log(seq_length)`` at 1-based position ``i``."""
    values = [math.log(i, seq_length) if i > seq_length else 1.0 for i in range(1, length + 1)]
    return torch.tensor(values, dtype=torch.float32, device=device)


class KVCache(nn.Module):
    """Keys and values of every slot for one layer (non-persistent: never in ``state_dict``)."""

    def __init__(self, max_batch_size: int, heads: int, max_seq_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        shape = (max_batch_size, heads, max_seq_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def fill(self, slot: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Write a prefill's ``k, v [1, H, T, D]`` at positions ``0..T-1`` of row ``slot``."""
        length = k.shape[2]
        self.k[slot, :, :length] = k[0]
        self.v[slot, :, :length] = v[0]

    def update(self, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               kv_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one step's ``k, v [B, H, 1, D]`` at ``(slots[i], positions[i])``; return those rows'
        first ``kv_len`` positions ``[B, H, kv_len, D]``."""
        self.k[slots, :, positions] = k[:, :, 0]
        self.v[slots, :, positions] = v[:, :, 0]
        return self.k[:, :, :kv_len].index_select(0, slots), self.v[:, :, :kv_len].index_select(0, slots)


class Attention(nn.Module):
    def __init__(self, args: LLMArgs) -> None:
        super().__init__()
        self.heads = args.num_heads
        self.head_dim = args.head_dim
        self.hidden = args.hidden_size
        self.c_attn = nn.Linear(args.hidden_size, 3 * args.hidden_size)
        self.c_proj = nn.Linear(args.hidden_size, args.hidden_size, bias=not args.no_bias)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_scale: torch.Tensor | None,
                slot: int | None = None, slots: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, kv_len: int = 0) -> torch.Tensor:
        """``x [B, T, C]`` -> ``[B, T, C]``.

        Without ``slots`` the tokens are a whole sequence from position 0 (causal attention among
        them), written into cache row ``slot`` when one is given. With ``slots`` and ``positions``
        (``[B]``, T == 1) it is a decode step over the cache.
        """
        b, t, _ = x.shape
        q, k, v = self.c_attn(x).split(self.hidden, dim=-1)  # each [B, T, C]
        q = apply_rotary(q.view(b, t, self.heads, self.head_dim), cos, sin)  # [B, T, H, D]
        k = apply_rotary(k.view(b, t, self.heads, self.head_dim), cos, sin)  # [B, T, H, D]
        if q_scale is not None:
            q = q * q_scale.type_as(q)
        q, k = q.transpose(1, 2), k.transpose(1, 2)  # [B, H, T, D]
        v = v.view(b, t, self.heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]
        if slots is None:
            if slot is not None:
                assert self.kv_cache is not None, "setup_cache() first"
                self.kv_cache.fill(slot, k, v)
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, D]
        else:
            assert self.kv_cache is not None, "setup_cache() first"
            k, v = self.kv_cache.update(slots, positions, k, v, kv_len)  # [B, H, kv_len, D]
            visible = torch.arange(kv_len, device=x.device) <= positions[:, None]  # [B, kv_len]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None, None, :])  # [B, H, 1, D]
        return self.c_proj(out.transpose(1, 2).reshape(b, t, self.hidden))


class MLP(nn.Module):
    def __init__(self, args: LLMArgs) -> None:
        super().__init__()
        self.w1 = nn.Linear(args.hidden_size, args.mlp_dim, bias=not args.no_bias)
        self.w2 = nn.Linear(args.hidden_size, args.mlp_dim, bias=not args.no_bias)
        self.c_proj = nn.Linear(args.mlp_dim, args.hidden_size, bias=not args.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.w1(x) * F.silu(self.w2(x)))


class Block(nn.Module):
    def __init__(self, args: LLMArgs) -> None:
        super().__init__()
        self.ln_1 = RMSNorm(args.hidden_size, args.layer_norm_eps)
        self.attn = Attention(args)
        self.ln_2 = RMSNorm(args.hidden_size, args.layer_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, q_scale: torch.Tensor | None,
                **cache: object) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cos, sin, q_scale, **cache)
        return x + self.mlp(self.ln_2(x))


class QwenDecoder(nn.Module):
    """Token embedding, the blocks and the final norm (HF names ``wte``, ``h.N``, ``ln_f``).

    Entry points return final hidden states; the LM head lives with the caller.
    """

    slot_inv_freq: torch.Tensor  # [max_batch_size, rotary_dim/2] rotary frequencies fixed at prefill
    logn: torch.Tensor  # [max_seq_len] query scale per position

    def __init__(self, args: LLMArgs) -> None:
        super().__init__()
        self.llm_args = args
        self.wte = nn.Embedding(args.vocab_size, args.hidden_size)
        self.h = nn.ModuleList(Block(args) for _ in range(args.num_layers))
        self.ln_f = RMSNorm(args.hidden_size, args.layer_norm_eps)
        self.max_batch_size = 0
        self.max_seq_len = 0

    # -- setup -----------------------------------------------------------------------------------

    def setup_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate the KV cache and per-slot rotary state in the weights' dtype and device."""
        args = self.llm_args
        weight = self.wte.weight
        for block in self.h:
            block.attn.kv_cache = KVCache(max_batch_size, args.num_heads, max_seq_len, args.head_dim,
                                          weight.dtype, weight.device)
        inv_freq = rotary_inv_freq(args.rotary_dim, args.rotary_emb_base, device=weight.device)
        self.register_buffer("slot_inv_freq", inv_freq.repeat(max_batch_size, 1), persistent=False)
        self.register_buffer("logn", logn_scales(max_seq_len, args.seq_length, weight.device), persistent=False)
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len

    # -- embeddings ------------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None,
              image_slots: Sequence[int] = (), image_tokens: int = 256) -> torch.Tensor:
        """``input_ids [B, T]`` -> ``[B, T, C]``; image ``k``'s features ``[image_tokens, C]`` replace
        positions ``image_slots[k] ..+ image_tokens`` (only for B == 1)."""
        x = self.wte(input_ids)  # [B, T, C]
        count = 0 if image_features is None else image_features.shape[0]
        if count != len(image_slots):
            raise ValueError(f"{count} image feature sets for {len(image_slots)} image slots")
        if count == 0:
            return x
        if input_ids.shape[0] != 1:
            raise ValueError("image features can only be placed into a single sequence")
        length = input_ids.shape[1]
        for start in image_slots:
            if not 0 <= start <= length - image_tokens:
                raise ValueError(f"image slot {start} does not fit {image_tokens} features into {length} tokens")
        # slice copies, not an index tensor: building one on a GPU would wait for queued work
        for start, feats in zip(image_slots, image_features):
            x[0, start:start + image_tokens] = feats.to(x.dtype)  # [256, C]
        return x

    # -- forward paths ---------------------------------------------------------------------------

    def _rope_for_length(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        args = self.llm_args
        alpha = ntk_alpha(length, args.seq_length) if args.use_dynamic_ntk else 1.0
        inv_freq = rotary_inv_freq(args.rotary_dim, args.rotary_emb_base, alpha, device)  # [rot/2]
        cos, sin = rotary_cos_sin(torch.arange(length, device=device), inv_freq)  # [T, 1, rot]
        return inv_freq, cos, sin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cache-free: whole sequences from position 0, ``x [B, T, C]`` -> hidden ``[B, T, C]``."""
        length = x.shape[1]
        _, cos, sin = self._rope_for_length(length, x.device)
        q_scale = None
        if self.llm_args.use_logn_attn:
            q_scale = logn_scales(length, self.llm_args.seq_length, x.device)[:, None, None]  # [T, 1, 1]
        for block in self.h:
            x = block(x, cos, sin, q_scale)
        return self.ln_f(x)

    def prefill(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """One sequence ``x [1, T, C]`` at positions ``0..T-1`` of cache row ``slot`` -> ``[1, T, C]``.
        Fixes the slot's NTK alpha from ``T``."""
        length = x.shape[1]
        if not 0 <= slot < self.max_batch_size:
            raise ValueError(f"slot {slot} outside the cache's {self.max_batch_size} rows (setup_cache first)")
        if length > self.max_seq_len:
            raise ValueError(f"{length} tokens do not fit the cache's {self.max_seq_len} positions")
        inv_freq, cos, sin = self._rope_for_length(length, x.device)
        self.slot_inv_freq[slot] = inv_freq
        q_scale = self.logn[:length, None, None] if self.llm_args.use_logn_attn else None  # [T, 1, 1]
        for block in self.h:
            x = block(x, cos, sin, q_scale, slot=slot)
        return self.ln_f(x)

    def decode(self, x: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, kv_len: int) -> torch.Tensor:
        """One token per sequence: ``x [B, 1, C]`` at ``positions [B]`` of rows ``slots [B]``,
        attending over the first ``kv_len`` cache positions -> ``[B, 1, C]``."""
        inv_freq = self.slot_inv_freq.index_select(0, slots)  # [B, rot/2]
        cos, sin = rotary_cos_sin(positions[:, None], inv_freq)  # [B, 1, 1, rot]
        q_scale = None
        if self.llm_args.use_logn_attn:
            q_scale = self.logn.index_select(0, positions)[:, None, None, None]  # [B, 1, 1, 1]
        for block in self.h:
            x = block(x, cos, sin, q_scale, slots=slots, positions=positions, kv_len=kv_len)
        return self.ln_f(x)
