"""Batched token sampling with per-request settings and per-request random streams.

The :class:`Sampler` keeps one row of sampling state per KV-cache slot (temperature, top-k,
top-p, penalties, seed, the tokens seen so far) as device tensors, and samples every slot's next
token in one batched pass: penalties, then greedy ``argmax`` for greedy rows, else temperature,
top-k, top-p and an exponential race (``argmax(p / E)``, ``E ~ Exp(1)``), which draws from ``p``.

Randomness is stateless and per request: the noise ``E`` for vocabulary entry ``v`` of a
request's ``n``-th answer token is a hash of ``(seed, n, v)``. So the same seed gives the same
answer whatever else is in the batch, in whichever slot, on CPU or GPU, and nothing needs a
``torch.Generator`` per row (one batched kernel, CUDA-graph friendly). The only host sync is
the caller reading the sampled ids once per step.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from worker.engine.model.kernels import token_logprobs
from worker.engine.types import SamplingParams

_M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in [0, 2**32), without int64 overflow."""
    lo = (x & 0xFFFF) * c
    hi = (((x >> 16) * c) & 0xFFFF) << 16
    return (lo + hi) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A bijective 32-bit integer mixer (Wellons' "lowbias32") on int64 tensors in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def split_seed(seed: int) -> tuple[int, int]:
    """A non-negative seed as two 32-bit words (high bits beyond 64 are folded in)."""
    seed = int(seed)
    if seed < 0:
        seed &= (1 << 64) - 1
    while seed >> 64:
        seed = (seed & ((1 << 64) - 1)) ^ (seed >> 64)
    return seed & _M32, (seed >> 32) & _M32


def uniform_noise(seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor,
                  vocab_keys: torch.Tensor) -> torch.Tensor:
    """Uniform numbers in (0, 1), one per (row, vocabulary entry).

    seed_lo, seed_hi, step: int64 [B]; vocab_keys: int64 [V] (``_mix32`` of the entry index).
    Returns float32 [B, V]; row ``b`` depends only on ``(seed_b, step_b)``.
    """
    row_a = _mix32(seed_lo ^ _mix32(seed_hi ^ _mix32(step & _M32)))  # [B]
    row_b = _mix32(row_a ^ 0x9E3779B9)  # [B]
    h = _mix32(row_a[:, None] ^ vocab_keys[None, :])  # [B, V]
    h = _mix32((h + row_b[:, None]) & _M32)  # [B, V]
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


class Sampler:
    """Per-slot sampling state and the batched sampling step.

    ``batch_size`` is the number of KV-cache slots; ``vocab_size`` the logits' width;
    ``allowed_vocab`` how many leading ids may be sampled at all (the tokenizer's vocabulary:
    the model's embedding is padded past it and those rows must never be chosen).
    """

    def __init__(self, batch_size: int, vocab_size: int, device: torch.device | str = "cpu",
                 allowed_vocab: int | None = None) -> None:
        self.batch_size = batch_size
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.allowed_vocab = min(allowed_vocab or vocab_size, vocab_size)
        d = self.device
        self.temperature = torch.ones(batch_size, device=d)
        self.top_k = torch.zeros(batch_size, dtype=torch.long, device=d)
        self.top_p = torch.ones(batch_size, device=d)
        self.repetition_penalty = torch.ones(batch_size, device=d)
        self.presence_penalty = torch.zeros(batch_size, device=d)
        self.frequency_penalty = torch.zeros(batch_size, device=d)
        self.greedy = torch.ones(batch_size, dtype=torch.bool, device=d)
        self.seed_lo = torch.zeros(batch_size, dtype=torch.long, device=d)
        self.seed_hi = torch.zeros(batch_size, dtype=torch.long, device=d)
        # Prompt tokens (for the repetition penalty) and answer token counts (all penalties): [B, V].
        self.prompt_seen = torch.zeros(batch_size, vocab_size, dtype=torch.bool, device=d)
        self.counts = torch.zeros(batch_size, vocab_size, dtype=torch.float32, device=d)
        self._vocab_keys = _mix32(torch.arange(vocab_size, dtype=torch.long, device=d) + 0x2545F491)
        # Host copies: which optional stages any slot needs, decided without a device sync.
        self._params: list[SamplingParams | None] = [None] * batch_size

    def set_slot(self, slot: int, params: SamplingParams, seed: int, prompt_ids: Seq[int]) -> None:
        """Load a newly admitted request's settings into ``slot`` and forget the previous one."""
        self._params[slot] = params
        greedy = params.greedy
        self.temperature[slot] = 1.0 if greedy else float(params.temperature)
        self.top_k[slot] = int(params.top_k)
        self.top_p[slot] = float(params.top_p)
        self.repetition_penalty[slot] = float(params.repetition_penalty)
        self.presence_penalty[slot] = float(params.presence_penalty)
        self.frequency_penalty[slot] = float(params.frequency_penalty)
        self.greedy[slot] = greedy
        lo, hi = split_seed(seed)
        self.seed_lo[slot] = lo
        self.seed_hi[slot] = hi
        self.prompt_seen[slot].zero_()
        self.counts[slot].zero_()
        if params.repetition_penalty != 1.0:
            ids = [i for i in prompt_ids if 0 <= i < self.vocab_size]
            self.prompt_seen[slot, torch.tensor(ids, dtype=torch.long, device=self.device)] = True

    def release(self, slot: int) -> None:
        """Mark ``slot`` unused (its row is still computed, and ignored)."""
        self._params[slot] = None

    def sample(self, logits: torch.Tensor, steps: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Next token of every slot.

        logits: float32 [B, V] (row ``b`` belongs to slot ``b``); steps: int64 [B], how many
        answer tokens each slot has produced so far; active: bool [B], the slots whose token this
        step is for. Returns int64 [B] on the device, and counts the active rows' tokens for the
        penalties (other rows are computed and ignored) while a request in use has any.
        """
        in_use = [p for p in self._params if p is not None]
        greedy = all(p.greedy for p in in_use)
        logits = logits.float()
        width = self.vocab_size
        if self.allowed_vocab < self.vocab_size:
            if greedy:  # argmax of the allowed columns: a view, no copy
                width = self.allowed_vocab
                logits = logits[:, :width]
            else:  # the softmax's sums run over the full row, as they always have
                logits = logits.clone()
                logits[:, self.allowed_vocab:] = float("-inf")
        counts = self.counts[:, :width]
        repetition = any(p.repetition_penalty != 1.0 for p in in_use)
        additive = any(p.presence_penalty or p.frequency_penalty for p in in_use)
        if repetition:
            penalised = torch.where(logits > 0, logits / self.repetition_penalty[:, None],
                                    logits * self.repetition_penalty[:, None])
            seen = self.prompt_seen[:, :width] | (counts > 0)
            logits = torch.where(seen, penalised, logits)
        if additive:
            logits = (logits - self.frequency_penalty[:, None] * counts
                      - self.presence_penalty[:, None] * (counts > 0).float())
        next_ids = logits.argmax(dim=-1)  # [B]
        if not greedy:
            sampled = self._sample_random(logits, steps, in_use)
            next_ids = torch.where(self.greedy, next_ids, sampled)
        if repetition or additive:  # only penalties read the counts, each slot's its own request's
            self._record(next_ids, active)
        return next_ids

    def logprobs(self, logits: torch.Tensor, next_ids: torch.Tensor, top: int) -> torch.Tensor:
        """Log-probabilities for OpenAI's ``logprobs``, packed for one copy to the host.

        logits: [B, V] (the model's, before any penalty); next_ids: int64 [B]. Returns float32
        ``[B, 1 + 2 * top]``: each row's log-probability of its next id, then its ``top`` largest
        log-probabilities and their ids (exact in float32: ids < 2**24). They are the model's own
        distribution over the allowed vocabulary, before temperature, penalties, top-k and top-p,
        as vLLM reports them by default.
        """
        return token_logprobs(logits.float(), next_ids.clamp(0, self.allowed_vocab - 1), top, self.allowed_vocab)

    def _sample_random(self, logits: torch.Tensor, steps: torch.Tensor,
                       in_use: list[SamplingParams]) -> torch.Tensor:
        logits = logits / self.temperature[:, None]
        if any(p.top_k > 0 or p.top_p < 1.0 for p in in_use):
            logits = self._top_k_top_p(logits)
        probs = logits.softmax(dim=-1)  # [B, V]
        noise = uniform_noise(self.seed_lo, self.seed_hi, steps, self._vocab_keys)
        race = probs / -torch.log(noise)  # argmax of p / Exp(1) is a draw from p
        return race.argmax(dim=-1)

    def _top_k_top_p(self, logits: torch.Tensor) -> torch.Tensor:
        """Filter each row as Hugging Face's TopK then TopP warpers do (top-p on the top-k set)."""
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # [B, V]
        ranks = torch.arange(logits.shape[-1], device=logits.device)
        k = torch.where(self.top_k > 0, self.top_k, logits.shape[-1])
        sorted_logits = sorted_logits.masked_fill(ranks[None, :] >= k[:, None], float("-inf"))
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the better tokens
        drop = (mass_before >= self.top_p[:, None]) & (self.top_p[:, None] < 1.0)
        drop[:, 0] = False  # the most likely token always stays
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)

    def _record(self, next_ids: torch.Tensor, active: torch.Tensor) -> None:
        rows = next_ids.clamp(0, self.vocab_size - 1)[:, None]  # [B, 1]
        self.counts.scatter_add_(1, rows, active.to(self.counts.dtype)[:, None])
