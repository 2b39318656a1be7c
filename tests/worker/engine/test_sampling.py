"""Batched sampling: greedy, temperature/top-k/top-p, penalties, and per-request random streams."""

from __future__ import annotations

import math

import pytest
import torch

from worker.engine.sampling import Sampler, split_seed, uniform_noise
from worker.engine.types import SamplingParams

GREEDY = SamplingParams(temperature=0.0)


def sampler_with(params: list[SamplingParams], vocab: int, seeds=None, allowed=None) -> Sampler:
    s = Sampler(len(params), vocab, allowed_vocab=allowed)
    for slot, p in enumerate(params):
        s.set_slot(slot, p, seeds[slot] if seeds else slot, prompt_ids=[])
    return s


def run(s: Sampler, logits: torch.Tensor, steps=None, active=None) -> list[int]:
    b = logits.shape[0]
    steps = torch.tensor(steps if steps is not None else [0] * b)
    active = torch.tensor(active if active is not None else [True] * b)
    return s.sample(logits, steps, active).tolist()


def test_greedy_rows_take_the_argmax_whatever_the_other_rows_do():
    logits = torch.tensor([[0.1, 3.0, 0.2, 0.0], [5.0, 0.0, 0.0, 0.0]])
    s = sampler_with([GREEDY, SamplingParams(temperature=1.0)], vocab=4)
    assert run(s, logits)[0] == 1
    assert run(sampler_with([GREEDY], vocab=4), logits[:1]) == [1]


def test_top_k_one_is_greedy():
    s = sampler_with([SamplingParams(temperature=1.5, top_k=1)], vocab=4)
    assert run(s, torch.tensor([[0.0, 0.1, 2.0, 1.9]])) == [2]


def test_same_seed_and_step_give_the_same_token_in_any_slot_and_batch():
    logits = torch.zeros(1, 1000)  # uniform: only the noise decides
    p = SamplingParams(temperature=1.0)
    alone = sampler_with([p], 1000, seeds=[1234])
    batched = sampler_with([SamplingParams(temperature=0.7), p, GREEDY], 1000, seeds=[9, 1234, 5])
    for step in range(5):
        a = run(alone, logits, steps=[step])[0]
        b = run(batched, logits.expand(3, -1).contiguous(), steps=[7, step, 1])[1]
        assert a == b


def test_different_seeds_and_steps_give_different_draws():
    logits = torch.zeros(8, 1000)
    s = sampler_with([SamplingParams(temperature=1.0)] * 8, 1000, seeds=list(range(8)))
    assert len(set(run(s, logits))) >= 6  # 8 seeds over 1000 equally likely tokens
    steps = [run(s, logits, steps=[k] * 8)[0] for k in range(8)]
    assert len(set(steps)) >= 6


def test_draws_follow_the_softmax_distribution():
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4])
    n = 20000
    s = sampler_with([SamplingParams(temperature=1.0)] * n, 4, seeds=list(range(n)))
    draws = torch.tensor(run(s, probs.log().expand(n, -1).contiguous()))
    freq = torch.bincount(draws, minlength=4).float() / n
    assert torch.allclose(freq, probs, atol=0.015), freq


def test_temperature_sharpens_the_distribution():
    n = 4000
    logits = torch.tensor([0.0, 1.0]).expand(n, -1).contiguous()
    cold = sampler_with([SamplingParams(temperature=0.25)] * n, 2, seeds=list(range(n)))
    share = sum(run(cold, logits)) / n  # P(token 1) = sigmoid(4) = 0.982
    assert share == pytest.approx(1 / (1 + math.exp(-4)), abs=0.02)


def test_top_k_and_top_p_keep_only_the_likely_tokens():
    n = 2000
    logits = torch.tensor([0.4, 0.3, 0.2, 0.1]).log().expand(n, -1).contiguous()
    top_k = sampler_with([SamplingParams(temperature=1.0, top_k=2)] * n, 4, seeds=list(range(n)))
    assert set(run(top_k, logits)) == {0, 1}
    # top_p 0.5: 0.4 alone is short of 0.5, so the second token stays and the rest go
    top_p = sampler_with([SamplingParams(temperature=1.0, top_p=0.5)] * n, 4, seeds=list(range(n)))
    assert set(run(top_p, logits)) == {0, 1}
    top_p_tiny = sampler_with([SamplingParams(temperature=1.0, top_p=0.01)] * 50, 4, seeds=list(range(50)))
    assert set(run(top_p_tiny, logits[:50])) == {0}


def test_repetition_penalty_lowers_tokens_of_the_prompt_and_answer():
    s = Sampler(1, 4)
    s.set_slot(0, SamplingParams(temperature=0.0, repetition_penalty=1.5), 0, prompt_ids=[0])
    logits = torch.tensor([[2.0, 1.9, -1.0, -5.0]])
    assert run(s, logits) == [1]  # 2.0 / 1.5 < 1.9
    assert run(s, logits, steps=[1]) == [0]  # 1 was answered: 1.9 / 1.5 < 2.0 / 1.5
    unpenalised = sampler_with([GREEDY], 4)
    assert run(unpenalised, logits) == [0]


def test_frequency_penalty_counts_only_the_answer_tokens():
    s = Sampler(1, 3)
    s.set_slot(0, SamplingParams(temperature=0.0, frequency_penalty=0.6), 0, prompt_ids=[0, 0, 0])
    logits = torch.tensor([[1.0, 0.5, 0.0]])
    assert run(s, logits) == [0]  # the prompt's zeros do not count
    assert run(s, logits) == [1]  # 1.0 - 0.6 < 0.5


def test_inactive_rows_leave_no_trace_in_the_penalty_state():
    s = sampler_with([SamplingParams(temperature=0.0, presence_penalty=2.0)] * 2, 3)
    logits = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    run(s, logits, active=[True, False])
    assert s.counts[0, 0] == 1 and s.counts[1].sum() == 0
    assert run(s, logits) == [1, 0]


def test_ids_past_the_tokenizer_vocabulary_are_never_chosen():
    logits = torch.tensor([[0.0, 1.0, 2.0, 9.0, 9.0]])
    assert run(sampler_with([GREEDY], 5, allowed=3), logits) == [2]
    hot = sampler_with([SamplingParams(temperature=2.0)] * 100, 5, seeds=list(range(100)), allowed=3)
    assert max(run(hot, logits.expand(100, -1).contiguous())) < 3


def test_a_new_request_in_a_slot_forgets_the_previous_ones_state():
    s = Sampler(1, 3)
    s.set_slot(0, SamplingParams(temperature=0.0, presence_penalty=5.0), 0, prompt_ids=[])
    run(s, torch.tensor([[1.0, 0.0, 0.0]]))
    s.set_slot(0, SamplingParams(temperature=0.0, presence_penalty=5.0), 0, prompt_ids=[])
    assert run(s, torch.tensor([[1.0, 0.0, 0.0]])) == [0]


def test_uniform_noise_is_in_the_open_unit_interval_and_well_spread():
    keys = torch.arange(4096)
    u = uniform_noise(torch.tensor([1, 2]), torch.tensor([0, 0]), torch.tensor([0, 0]), keys)
    assert u.shape == (2, 4096)
    assert (u > 0).all() and (u < 1).all()
    assert u.mean().item() == pytest.approx(0.5, abs=0.02)
    assert not torch.equal(u[0], u[1])


def test_seeds_of_any_size_split_into_two_words():
    assert split_seed(0) == (0, 0)
    assert split_seed(1 << 32) == (0, 1)
    assert split_seed(-1) == (0xFFFFFFFF, 0xFFFFFFFF)
    lo, hi = split_seed(1 << 70)
    assert 0 <= lo < 1 << 32 and 0 <= hi < 1 << 32


def test_a_penalised_request_counts_its_own_answer_tokens_beside_unpenalised_ones():
    s = sampler_with([GREEDY, GREEDY], 3)
    logits = torch.tensor([[1.0, 0.5, 0.0], [1.0, 0.5, 0.0]])
    assert run(s, logits) == [0, 0]  # nobody reads counts yet: none are kept
    s.set_slot(1, SamplingParams(temperature=0.0, frequency_penalty=0.6), 1, prompt_ids=[])
    assert run(s, logits) == [0, 0]
    assert s.counts[1].tolist() == [1.0, 0.0, 0.0]
    assert run(s, logits) == [0, 1]  # its own 0 was answered once: 1.0 - 0.6 < 0.5


def test_logprobs_are_the_models_log_softmax_over_the_allowed_vocabulary_before_any_sampling_setting():
    torch.manual_seed(0)
    logits = torch.randn(2, 10)
    params = [SamplingParams(temperature=0.3, top_k=2, repetition_penalty=1.5), GREEDY]
    s = sampler_with(params, vocab=10, allowed=8)
    next_ids = torch.tensor([3, 5])
    packed = s.logprobs(logits, next_ids, top=3)
    reference = torch.log_softmax(logits[:, :8], dim=-1)
    assert packed.shape == (2, 7)
    assert torch.allclose(packed[:, 0], reference[[0, 1], [3, 5]])
    values, ids = reference.topk(3, dim=-1)
    assert torch.allclose(packed[:, 1:4], values)
    assert torch.equal(packed[:, 4:].long(), ids) and int(packed[:, 4:].max()) < 8
    assert s.logprobs(logits, next_ids, top=0).shape == (2, 1)
