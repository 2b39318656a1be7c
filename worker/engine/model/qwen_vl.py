"""Qwen-VL-Chat: the vision tower wired into the QWen decoder.

The module tree mirrors the official ``QWenLMHeadModel`` so that ``state_dict()`` keys are the
checkpoint's names: ``transformer.wte``, ``transformer.h.N...``, ``transformer.ln_f``,
``transformer.visual...`` and ``lm_head``.

Serving uses :meth:`QwenVL.prefill` once per sequence and :meth:`QwenVL.decode` for batched steps
over a static KV cache; :meth:`QwenVL.forward` is the cache-free reference (parity tests,
fine-tuning the tiny checkpoint).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .args import QwenVLArgs
from .decoder import QwenDecoder
from .vision import VisionTransformer


class QwenTransformer(QwenDecoder):
    """The checkpoint's ``transformer`` module: the decoder, with the vision tower as ``visual``."""

    def __init__(self, args: QwenVLArgs) -> None:
        super().__init__(args.llm)
        self.visual = VisionTransformer(args.vision)


class QwenVL(nn.Module):
    """Qwen-VL-Chat. Build it with :func:`worker.engine.model.checkpoint.load_model`."""

    def __init__(self, args: QwenVLArgs) -> None:
        super().__init__()
        self.args = args
        self.transformer = QwenTransformer(args)
        self.lm_head = nn.Linear(args.llm.hidden_size, args.llm.vocab_size, bias=False)

    @property
    def image_tokens(self) -> int:
        """Feature vectors (and prompt slots) per image: 256."""
        return self.args.vision.n_queries

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised pixels ``[N, 3, 448, 448]`` (any float dtype, any device) ->
        image features ``[N, 256, hidden]`` in the model's dtype and device."""
        return self.transformer.visual(pixels)

    def setup_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        """Allocate the static KV cache: ``max_batch_size`` rows (slots) of ``max_seq_len`` positions,
        in the model's dtype and device. Replaces any previous cache."""
        self.transformer.setup_cache(max_batch_size, max_seq_len)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, slot: int, image_features: torch.Tensor | None = None,
                image_slots: Sequence[int] = ()) -> torch.Tensor:
        """Run one prompt ``input_ids [T]`` into cache row ``slot`` (positions ``0..T-1``) ->
        float32 logits ``[vocab]`` of its last position.

        ``image_features [N, 256, hidden]`` replace the embeddings at ``image_slots[k] ..+ 256``.
        The slot's dynamic-NTK alpha is fixed here from ``T``, as the official model does.
        """
        x = self.transformer.embed(input_ids[None], image_features, image_slots, self.image_tokens)  # [1, T, C]
        hidden = self.transformer.prefill(x, slot)  # [1, T, C]
        return self.lm_head(hidden[0, -1]).float()  # [V]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
               kv_len: int | None = None) -> torch.Tensor:
        """One step for ``B`` sequences -> float32 logits ``[B, vocab]``.

        ``tokens[i]`` sits at ``positions[i]`` of cache row ``slots[i]`` and attends to positions
        ``0..positions[i]`` of that row (all ``[B]`` int64 on the model's device; slots distinct).
        ``kv_len`` (optional, ``> max(positions)``) bounds the cache span read, so a caller that
        knows its sequence lengths can skip the empty tail; default the whole cache. Nothing here
        reads a value back to the host.
        """
        kv_len = self.transformer.max_seq_len if kv_len is None else kv_len
        x = self.transformer.wte(tokens)[:, None]  # [B, 1, C]
        hidden = self.transformer.decode(x, positions, slots, kv_len)  # [B, 1, C]
        return self.lm_head(hidden[:, 0]).float()  # [B, V]

    def forward(self, input_ids: torch.Tensor, pixels: torch.Tensor | None = None,
                image_slots: Sequence[int] = ()) -> torch.Tensor:
        """Cache-free reference: ``input_ids [1, T]`` (+ pixels ``[N, 3, 448, 448]`` for the
        ``image_slots``) -> float32 logits ``[1, T, vocab]``. Differentiable."""
        features = self.encode_images(pixels) if pixels is not None else None
        x = self.transformer.embed(input_ids, features, image_slots, self.image_tokens)  # [1, T, C]
        return self.lm_head(self.transformer(x)).float()  # [1, T, V]
