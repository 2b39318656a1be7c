"""The model side of the torch engine: :class:`ModelRunner`.

It owns the model, its static KV cache (one row per slot, ``max_batch_size`` x ``max_seq_len``),
the vision-feature cache and the :class:`worker.engine.sampling.Sampler`. Per step it either
prefills newly admitted sequences one by one, or decodes every slot in one model call, then
samples all slots at once.

Decode always runs the full static batch: ``tokens``, ``positions`` and ``slots`` have
``max_batch_size`` rows whatever is running, free slots carrying token 0 at position 0 of their
own (unused) cache row. The batch dimension never changes, so a request's numbers do not depend
on how many others share its batch (kernels may pick another reduction order for another batch
size), and a later CUDA graph can replay the call. The cache span read (``kv_len``) is the
longest running sequence rounded up to a power of two: a handful of shapes, one graph each.
The one host sync per step is reading the sampled ids.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence as Seq

import torch

from worker.engine.sampling import Sampler
from worker.engine.sequence import Sequence
from worker.engine.types import IMAGE_TOKENS, ImageInput


MIN_KV_BUCKET = 256


class FeatureCache:
    """An LRU of vision features ([256, hidden] per image) keyed by image content."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str | None) -> torch.Tensor | None:
        if key is None or key not in self._items:
            self.misses += 1
            return None
        self.hits += 1
        self._items.move_to_end(key)
        return self._items[key]

    def put(self, key: str | None, features: torch.Tensor) -> None:
        if key is None or self.capacity <= 0:
            return
        self._items[key] = features
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: object) -> bool:
        return key in self._items


class ModelRunner:
    """Runs a :class:`worker.engine.model.qwen_vl.QwenVL`-like model for the engine.

    ``model`` needs ``args.llm.vocab_size`` and the model API of docs/architecture.md
    (``encode_images``, ``setup_cache``, ``prefill``, ``decode``). ``allowed_vocab`` is the
    tokenizer's vocabulary size: ids past it (the embedding's padding rows) are never sampled.
    """

    def __init__(
        self,
        model,
        *,
        max_batch_size: int,
        max_seq_len: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        feature_cache_images: int = 64,
        allowed_vocab: int | None = None,
    ) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_seq_len = max_seq_len
        self.device = torch.device(device)
        self.dtype = dtype
        self.vocab_size = int(model.args.llm.vocab_size)
        model.setup_cache(max_batch_size, max_seq_len)
        self.features = FeatureCache(feature_cache_images)
        self.sampler = Sampler(max_batch_size, self.vocab_size, self.device, allowed_vocab)
        self._slots = torch.arange(max_batch_size, dtype=torch.long, device=self.device)  # [B]
        # Prefill writes each admitted slot's row here; decode's output replaces the pointer.
        self._prefill_logits = torch.zeros(max_batch_size, self.vocab_size, device=self.device)
        self._logits = self._prefill_logits  # [B, V], what sample() reads

    # -- one step's work ------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, seq: Sequence) -> None:
        """Encode ``seq``'s images, fill its cache row with the prompt, keep its last logits."""
        t0 = time.monotonic()
        features = self.encode_images(seq.request.images)
        self._sync()
        t1 = time.monotonic()
        ids = torch.tensor(seq.request.prompt_ids, dtype=torch.long, device=self.device)  # [T]
        logits = self.model.prefill(ids, seq.slot, image_features=features,
                                    image_slots=tuple(seq.request.image_slots))  # [V]
        self._prefill_logits[seq.slot] = logits
        self._logits = self._prefill_logits
        self.sampler.set_slot(seq.slot, seq.request.sampling, seq.seed, seq.request.prompt_ids)
        self._sync()
        seq.vision_s += t1 - t0
        seq.prefill_s += time.monotonic() - t1

    @torch.inference_mode()
    def decode(self, seqs: Seq[Sequence]) -> None:
        """One token for every running sequence, in one model call over all slots."""
        tokens = [0] * self.max_batch_size
        positions = [0] * self.max_batch_size
        for seq in seqs:
            tokens[seq.slot] = seq.last_token
            positions[seq.slot] = seq.num_tokens - 1  # where the last token sits
        tokens_t = torch.tensor(tokens, dtype=torch.long, device=self.device)  # [B]
        positions_t = torch.tensor(positions, dtype=torch.long, device=self.device)  # [B]
        kv_len = self.kv_bucket(max(positions) + 1)
        self._logits = self.model.decode(tokens_t, positions_t, self._slots, kv_len=kv_len)  # [B, V]

    @torch.inference_mode()
    def sample(self, seqs: Seq[Sequence]) -> list[int]:
        """Sample every slot from the last prefill/decode logits; returns ``seqs``' new tokens."""
        steps = [0] * self.max_batch_size
        active = [False] * self.max_batch_size
        for seq in seqs:
            steps[seq.slot] = len(seq.output_ids)
            active[seq.slot] = True
        steps_t = torch.tensor(steps, dtype=torch.long, device=self.device)  # [B]
        active_t = torch.tensor(active, dtype=torch.bool, device=self.device)  # [B]
        next_ids = self.sampler.sample(self._logits, steps_t, active_t).tolist()  # the one sync
        return [next_ids[seq.slot] for seq in seqs]

    def kv_bucket(self, length: int) -> int:
        """The cache span a decode step reads: ``length`` rounded up to a power of two (at least
        256, at most ``max_seq_len``), so few distinct shapes occur and short answers do not read
        a 32k-position cache."""
        return min(self.max_seq_len, max(MIN_KV_BUCKET, 1 << (length - 1).bit_length()))

    def release(self, seq: Sequence) -> None:
        """``seq`` left its slot; its sampling row is now free."""
        if seq.slot is not None:
            self.sampler.release(seq.slot)

    # -- vision ---------------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_images(self, images: Seq[ImageInput]) -> torch.Tensor | None:
        """Vision features of ``images`` ([N, 256, hidden]); cached ones are not recomputed."""
        if not images:
            return None
        found = [self.features.get(img.key) for img in images]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            pixels = torch.stack([torch.as_tensor(images[i].pixels) for i in missing])  # [M,3,448,448]
            pixels = pixels.to(device=self.device, dtype=self.dtype)
            computed = self.model.encode_images(pixels)  # [M, 256, hidden]
            if computed.shape[:2] != (len(missing), IMAGE_TOKENS):
                raise RuntimeError(f"encode_images returned {tuple(computed.shape)} for {len(missing)} images")
            for j, i in enumerate(missing):
                found[i] = computed[j]
                self.features.put(images[i].key, computed[j])
        return torch.stack(found)  # [N, 256, hidden]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
