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
longest running sequence rounded up to a power of two (the fast path's attention reads each
row's own length instead, and ignores it). The one host sync per step is reading the sampled ids
(and, when a running request asked for ``logprobs``, their log-probabilities, copied with them).

A :class:`worker.engine.model.qwen_vl.QwenVL` is served through
:class:`worker.engine.model.fast.FastQwenVL` (fused kernels, CUDA-graph decode) unless
``fast_path`` is off. :meth:`ModelRunner.encode_ahead` encodes a waiting request's images before
its admission, on CUDA on a side stream so that the vision tower runs while decode steps do.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence as Seq

import torch

from worker.engine.sampling import Sampler
from worker.engine.sequence import Sequence
from worker.engine.types import IMAGE_TOKENS, ImageInput, TokenLogprob


MIN_KV_BUCKET = 256
MAX_TOP_LOGPROBS = 20  # OpenAI's limit on top_logprobs


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
        fast_path: bool = True,
        cuda_graphs: bool = True,
        lookahead: bool | None = None,
    ) -> None:
        from worker.engine.model.fast import FastQwenVL
        from worker.engine.model.qwen_vl import QwenVL

        if fast_path and isinstance(model, QwenVL):
            model = FastQwenVL(model, cuda_graphs=cuda_graphs)
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
        self._side_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        # Host staging for each step's small inputs (pinned on CUDA: an asynchronous copy). It is
        # rewritten only after the previous step's sampled ids were read, i.e. its copy finished.
        self._host_rows = torch.zeros(4, max_batch_size, dtype=torch.long)
        self._host_ids = torch.zeros(max_batch_size, dtype=torch.long)
        self._host_logprobs = torch.zeros(max_batch_size * (1 + 2 * MAX_TOP_LOGPROBS))  # Sampler.logprobs, flat
        if self.device.type == "cuda":
            self._host_rows = self._host_rows.pin_memory()
            self._host_ids = self._host_ids.pin_memory()
            self._host_logprobs = self._host_logprobs.pin_memory()
        # The logprob entries of the last sample() (one per sequence, None where not asked).
        self.last_logprobs: list[TokenLogprob | None] = []
        self._host_rows_np = self._host_rows.numpy()  # element writes through numpy are cheap
        # A prompt's ids go to the device from here without a stream sync (a plain torch.tensor(...,
        # device=...) would wait for the vision work just queued); prefill ends in a sync, so the
        # buffer is free again by the next one.
        self._host_prompt = torch.zeros(max_seq_len, dtype=torch.long)
        if self.device.type == "cuda":
            self._host_prompt = self._host_prompt.pin_memory()
        self._sampler_rows: tuple | None = None
        # Lookahead: launch the next decode step from the sampled ids still on the device, before
        # the host reads them (default: when decode replays CUDA graphs, i.e. is launch-cheap).
        self.lookahead = bool(getattr(model, "graphs_enabled", False)) if lookahead is None else lookahead
        self._decode_rows: torch.Tensor | None = None  # this step's device rows, for the lookahead
        self._ahead: tuple | None = None  # (seqs, their num_tokens then, rows [4, B], logits)

    # -- one step's work ------------------------------------------------------------------------

    @torch.inference_mode()
    def prefill(self, seq: Sequence) -> None:
        """Encode ``seq``'s images, fill its cache row with the prompt, keep its last logits.

        On CUDA the vision and prefill work is queued back to back (its split into ``vision_s``
        and ``prefill_s`` comes from events), with one wait at the end."""
        t0 = time.monotonic()
        cuda = self.device.type == "cuda"
        if cuda:
            stream = torch.cuda.current_stream(self.device)
            if self._side_stream is not None:  # images encoded ahead share the vision graphs' buffers
                stream.wait_stream(self._side_stream)
            marks = [torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)]
            marks[0].record(stream)
        features = self._take_encoded(seq)
        if features is None:
            features = self.encode_images(seq.request.images)
        if cuda:
            marks[1].record(stream)
        vision_host = time.monotonic() - t0
        ids = self._prompt_on_device(seq.request.prompt_ids)  # [T]
        logits = self.model.prefill(ids, seq.slot, image_features=features,
                                    image_slots=tuple(seq.request.image_slots))  # [V]
        self._prefill_logits[seq.slot] = logits
        self._logits = self._prefill_logits
        self.sampler.set_slot(seq.slot, seq.request.sampling, seq.seed, seq.request.prompt_ids)
        self._sync()
        total = time.monotonic() - t0
        vision = marks[0].elapsed_time(marks[1]) / 1000 if cuda else vision_host
        seq.vision_s += vision
        seq.prefill_s += max(0.0, total - vision)

    def _prompt_on_device(self, prompt_ids: Seq[int]) -> torch.Tensor:
        """``prompt_ids`` as an int64 device tensor ``[T]``, copied asynchronously on CUDA."""
        length = len(prompt_ids)
        if length > self._host_prompt.shape[0]:
            return torch.tensor(prompt_ids, dtype=torch.long, device=self.device)  # the model refuses it
        host = self._host_prompt[:length]
        host.numpy()[:] = prompt_ids
        return host.to(self.device, non_blocking=True) if self.device.type == "cuda" else host.clone()

    @torch.inference_mode()
    def decode(self, seqs: Seq[Sequence]) -> None:
        """One token for every running sequence, in one model call over all slots.

        The step's inputs and the sampler's (answer lengths, active rows) go to the device in one
        copy before the model is called, so nothing waits on a transfer after the launch. If the
        previous step launched this one ahead (:meth:`sample` with ``lookahead``) for the same
        sequences, each one token longer, that launch is used as it is."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == list(seqs) and ahead[1] == [seq.num_tokens for seq in seqs]:
            rows, self._logits = ahead[2], ahead[3]
        else:
            rows = self._step_rows(seqs, with_inputs=True)  # [4, B] int64 on the device
            kv_len = self.kv_bucket(max(seq.num_tokens for seq in seqs) if seqs else 1)
            self._logits = self.model.decode(rows[0], rows[1], self._slots, kv_len=kv_len)  # [B, V]
        self._decode_rows = rows
        self._sampler_rows = (list(seqs), rows[2], rows[3].bool())

    @torch.inference_mode()
    def sample(self, seqs: Seq[Sequence], lookahead: bool = False) -> list[int]:
        """Sample every slot from the last prefill/decode logits; returns ``seqs``' new tokens.

        With ``lookahead`` (after a decode step, when :attr:`lookahead` is on) the next decode
        step for the same sequences is launched from the sampled ids on the device before they
        are read back, so the GPU works while the host handles this step's tokens. Its inputs
        are exactly what :meth:`decode` would build next; if the batch changes meanwhile (an
        answer ends, a request is admitted) it is dropped: it wrote nothing but each row's next
        cache position, which the real step writes again."""
        ready, self._sampler_rows = self._sampler_rows, None
        rows, self._decode_rows = self._decode_rows, None
        if ready is not None and ready[0] == list(seqs):
            steps_t, active_t = ready[1], ready[2]
        else:
            rows = None
            fresh = self._step_rows(seqs, with_inputs=False)
            steps_t, active_t = fresh[2], fresh[3].bool()
        next_ids = self.sampler.sample(self._logits, steps_t, active_t)  # [B] on the device
        top = max((seq.wants_logprobs for seq in seqs if seq.wants_logprobs is not None), default=None)
        # Read from the logits before a step launched ahead overwrites them (stream order).
        logprobs = None if top is None else self.sampler.logprobs(self._logits, next_ids, top)
        host_logprobs = None
        if not (lookahead and self.lookahead and rows is not None):
            ids = next_ids.tolist()  # the one sync
        elif self.device.type == "cuda":
            self._host_ids.copy_(next_ids, non_blocking=True)
            if logprobs is not None:
                host_logprobs = self._host_logprobs[:logprobs.numel()].view(logprobs.shape)
                host_logprobs.copy_(logprobs, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(self.device))
            self._launch_ahead(seqs, rows, next_ids)
            copied.synchronize()  # waits for the sampled ids, not for the step launched after them
            ids = self._host_ids.tolist()
        else:
            ids = next_ids.tolist()
            self._launch_ahead(seqs, rows, next_ids)
        if logprobs is not None:
            host_rows = (host_logprobs if host_logprobs is not None else logprobs).tolist()
            self.last_logprobs = [_entry(ids[seq.slot], host_rows[seq.slot], seq.wants_logprobs, top)
                                  for seq in seqs]
        else:
            self.last_logprobs = [None] * len(seqs)
        return [ids[seq.slot] for seq in seqs]

    def _launch_ahead(self, seqs: Seq[Sequence], rows: torch.Tensor, next_ids: torch.Tensor) -> None:
        active = rows[3]  # [B] int64, 1 for the slots of this step
        ahead = torch.stack([next_ids * active, rows[1] + active, rows[2] + active, active])  # [4, B]
        kv_len = self.kv_bucket(max(seq.num_tokens for seq in seqs) + 1)
        logits = self.model.decode(ahead[0], ahead[1], self._slots, kv_len=kv_len)  # [B, V]
        self._ahead = (list(seqs), [seq.num_tokens + 1 for seq in seqs], ahead, logits)

    def _step_rows(self, seqs: Seq[Sequence], with_inputs: bool) -> torch.Tensor:
        """``[4, B]`` int64 on the device: tokens, positions (where each last token sits), answer
        lengths and active flags per slot; free slots carry token 0 at position 0."""
        rows = self._host_rows_np
        rows.fill(0)
        for seq in seqs:
            if with_inputs:
                rows[0, seq.slot] = seq.last_token
                rows[1, seq.slot] = seq.num_tokens - 1
            rows[2, seq.slot] = len(seq.output_ids)
            rows[3, seq.slot] = 1
        host = self._host_rows
        return host.to(self.device, non_blocking=True) if self.device.type == "cuda" else host.clone()

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
    def encode_ahead(self, seq: Sequence) -> bool:
        """Encode waiting ``seq``'s images now, before its admission; its prefill then only waits
        for them. On CUDA the work goes to a side stream and this returns once it is queued, so
        it overlaps the decode step in flight. False when there was nothing to do."""
        if seq.encoded_images is not None or not seq.request.images:
            return False
        t0 = time.monotonic()
        if self._side_stream is None:
            seq.encoded_images = (self.encode_images(seq.request.images, remember=False), None)
        else:
            # No wait on the main stream: weights never change and cached features were
            # finished before their prefill returned.
            with torch.cuda.stream(self._side_stream):
                features = self.encode_images(seq.request.images, remember=False)
                done = torch.cuda.Event()
                done.record(self._side_stream)
            seq.encoded_images = (features, done)
        seq.vision_s += time.monotonic() - t0
        return True

    def _take_encoded(self, seq: Sequence) -> torch.Tensor | None:
        """Features :meth:`encode_ahead` made for ``seq``, ready for the main stream (then cached)."""
        if seq.encoded_images is None:
            return None
        features, done = seq.encoded_images
        seq.encoded_images = None
        if done is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(done)
            features.record_stream(stream)
        for image, row in zip(seq.request.images, features):
            if image.key not in self.features:
                self.features.put(image.key, row)
        return features

    @torch.inference_mode()
    def encode_images(self, images: Seq[ImageInput], remember: bool = True) -> torch.Tensor | None:
        """Vision features of ``images`` ([N, 256, hidden]); cached ones are not recomputed, new
        ones are cached unless ``remember`` is off."""
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
                if remember:
                    self.features.put(images[i].key, computed[j])
        return torch.stack(found)  # [N, 256, hidden]

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


def _entry(token_id: int, row: list[float], wanted: int | None, top: int) -> TokenLogprob | None:
    """A sequence's :class:`TokenLogprob` from its row of :meth:`Sampler.logprobs` (``top`` wide),
    with the first ``wanted`` top entries; log-probabilities below -9999 (or -inf) read -9999,
    as OpenAI reports them."""
    if wanted is None:
        return None
    return TokenLogprob(
        token_id=token_id,
        logprob=max(row[0], -9999.0),
        top=tuple((int(row[1 + top + i]), max(row[1 + i], -9999.0)) for i in range(wanted)),
    )
