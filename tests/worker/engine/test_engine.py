"""The torch engine: continuous batching, stops, deadlines, aborts, streaming, faults, seeds.

Most tests drive a scripted model (tests/worker/engine/conftest.py) with ``start=False`` and call
``step()`` themselves, so they assert on the scheduler's state rather than on timing. The last
ones run the tiny random Qwen-VL checkpoint for batch invariance and seeded sampling.
"""

from __future__ import annotations

import math
import time

import pytest
import torch

from producer.errors import (
    ConfigError,
    DeadlineExceeded,
    EngineError,
    EngineUnavailable,
    InvalidRequest,
    JobCancelled,
    PromptTooLong,
)
from worker.engine.engine import TorchEngine
from worker.engine.sequence import SequenceStatus
from worker.engine.types import GenerationRequest, ImageInput, SamplingParams

IM_END = 258  # byte tokenizer: <|endoftext|> 256, <|im_start|> 257, <|im_end|> 258
STOPS = (IM_END, 257, 256)


def greedy(max_tokens: int = 50, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=STOPS, **kw)


def request(rid: str, prompt: list[int], sampling: SamplingParams | None = None, **kw) -> GenerationRequest:
    return GenerationRequest(rid, prompt, sampling=sampling or greedy(), **kw)


def x_times_first_prompt_id(prompt: list[int], out: list[int]) -> int:
    """Answers prompt[0] 'x's then <|im_end|>."""
    return ord("x") if len(out) < prompt[0] else IM_END


def drain(engine: TorchEngine, limit: int = 1000) -> int:
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < limit, "engine does not finish"
    return steps


@pytest.fixture
def make_engine(byte_tokenizer, scripted_model):
    engines = []

    def make(script, *, max_batch_size=2, max_seq_len=64, start=False, **kw):
        model = scripted_model(script) if callable(script) else script
        engine = TorchEngine(model, byte_tokenizer, max_batch_size=max_batch_size,
                             max_seq_len=max_seq_len, start=start, **kw)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close()


# -- continuous batching ---------------------------------------------------------------------------


def test_a_third_request_waits_and_joins_the_step_after_a_slot_frees(make_engine):
    engine = make_engine(x_times_first_prompt_id, max_batch_size=2)
    fa = engine.submit(request("a", [2]))
    fb = engine.submit(request("b", [6]))
    fc = engine.submit(request("c", [1]))
    engine.step()  # prefill a and b
    sched = engine.scheduler
    a, b = sched.running[0], sched.running[1]
    assert (a.request_id, b.request_id) == ("a", "b")
    assert [s.request_id for s in sched.waiting] == ["c"]

    while not fa.done():  # decode a and b together
        engine.step()
        assert [s.request_id for s in sched.waiting] == ["c"]
    assert a.status is SequenceStatus.FINISHED and 0 not in sched.running
    assert fa.result().completion_tokens == 3  # "xx" + <|im_end|>

    engine.step()  # c takes the freed slot at once, while b is still running
    c = sched.running[0]
    assert c.request_id == "c" and not sched.waiting and 1 in sched.running
    assert c.admitted_at >= a.finished_at
    assert not fb.done()

    drain(engine)
    assert fb.result().text == "x" * 6 and fc.result().text == "x"
    # c's queue time spans a's whole answer (compared on the recorded clocks, not across
    # requests, so a pause between the submits cannot flip it)
    assert fc.result().timings["queued"] >= (a.finished_at - c.submitted_at) * 1000 - 0.01


def test_a_request_id_already_in_the_engine_is_an_engine_error_not_bad_input(make_engine):
    engine = make_engine(x_times_first_prompt_id)
    first = engine.submit(request("same", [2]))
    second = engine.submit(request("same", [2]))
    drain(engine)
    assert first.result(0).text == "xx"
    with pytest.raises(EngineError, match="already in the engine") as caught:
        second.result(0)
    assert caught.value.code == "engine_error"  # a redelivered job may run again later


def test_decode_runs_every_slot_with_static_shapes(make_engine):
    engine = make_engine(x_times_first_prompt_id, max_batch_size=3)
    engine.submit(request("a", [3, 9]))
    drain(engine)
    decodes = engine.runner.model.decode_calls
    assert decodes and all(len(tokens) == 3 for _, tokens, _, _ in decodes)
    _, tokens, positions, slots = decodes[0]
    assert slots == [0, 1, 2]
    assert tokens == [ord("x"), 0, 0] and positions == [2, 0, 0]  # first answer token sits at 2


def test_at_most_max_batch_size_requests_are_in_flight_under_load(make_engine):
    engine = make_engine(x_times_first_prompt_id, max_batch_size=2, start=True)
    seen = []
    original = engine.scheduler.schedule

    def spy():
        out = original()
        seen.append(len(engine.scheduler.running))
        return out

    engine.scheduler.schedule = spy
    futures = [engine.submit(request(f"r{i}", [1 + i % 4])) for i in range(8)]
    results = [f.result(timeout=30) for f in futures]
    assert [r.text for r in results] == ["x" * (1 + i % 4) for i in range(8)]
    assert max(seen) == 2


# -- answers: stops, lengths, streaming ------------------------------------------------------------


def test_the_stop_token_says_stop_and_max_tokens_says_length(make_engine, scripted_model):
    engine = make_engine(scripted_model.spelling("hello", end=IM_END))
    stopped = engine.submit(request("s", [1], greedy(max_tokens=20)))
    cut = engine.submit(request("l", [1], greedy(max_tokens=3)))
    drain(engine)
    s, c = stopped.result(), cut.result()
    assert (s.text, s.finish_reason, s.completion_tokens) == ("hello", "stop", 6)
    assert (c.text, c.finish_reason, c.completion_tokens) == ("hel", "length", 3)
    assert s.token_ids[-1] == IM_END and s.prompt_tokens == 1


def test_stop_strings_end_the_answer_and_are_cut_from_it(make_engine, scripted_model):
    engine = make_engine(scripted_model.spelling("hello STOP world"))
    future = engine.submit(request("r", [1], greedy(stop=("STOP", "never"))))
    drain(engine)
    result = future.result()
    assert result.text == "hello " and result.finish_reason == "stop"
    assert result.completion_tokens == len("hello STOP")


def test_streamed_deltas_concatenate_to_the_final_text(make_engine, scripted_model):
    answer = "女生在沙滩上 <ref>dog</ref> ok!"
    engine = make_engine(scripted_model.spelling(answer + "##tail", end=IM_END), start=True)
    deltas: list[str] = []
    future = engine.submit(request("r", [1], greedy(stop=("##",)), on_delta=lambda text, _: deltas.append(text)))
    result = future.result(timeout=30)
    assert result.text == answer
    assert "".join(deltas) == answer
    assert len(deltas) > 5 and all("\ufffd" not in d and d for d in deltas)


def test_a_failing_on_delta_does_not_stop_the_answer(make_engine, scripted_model):
    engine = make_engine(scripted_model.spelling("abc", end=IM_END))

    def broken(delta: str, logprobs: list) -> None:
        raise RuntimeError("subscriber gone")

    future = engine.submit(request("r", [1], on_delta=broken))
    drain(engine)
    assert future.result().text == "abc"


def test_a_prompt_that_fills_the_cache_is_refused_and_long_answers_are_clipped(make_engine):
    engine = make_engine(lambda prompt, out: ord("y"), max_seq_len=16)
    refused = engine.submit(request("big", list(range(16))))
    with pytest.raises(PromptTooLong):
        refused.result(timeout=1)
    clipped = engine.submit(request("clip", list(range(10)), greedy(max_tokens=100)))
    drain(engine)
    result = clipped.result()
    assert result.finish_reason == "length"
    assert result.prompt_tokens + result.completion_tokens == 16


def test_malformed_requests_fail_their_future(make_engine):
    engine = make_engine(x_times_first_prompt_id)
    with pytest.raises(InvalidRequest):
        engine.submit(request("empty", [])).result(timeout=1)
    pixels = torch.zeros(3, 448, 448)
    bad_slots = request("slots", [1] * 40, images=[ImageInput(pixels)], image_slots=[0])
    with pytest.raises(InvalidRequest, match="outside"):
        engine.submit(bad_slots).result(timeout=1)


def test_a_request_id_already_in_flight_is_refused(make_engine):
    engine = make_engine(x_times_first_prompt_id)
    first = engine.submit(request("same", [3]))
    second = engine.submit(request("same", [3]))
    drain(engine)
    assert first.result().text == "xxx"
    with pytest.raises(EngineError, match="unique"):
        second.result()


# -- deadlines and aborts --------------------------------------------------------------------------


def test_a_request_past_its_deadline_fails_and_frees_its_slot(make_engine):
    engine = make_engine(x_times_first_prompt_id, max_batch_size=1)
    slow = request("slow", [40], deadline=time.monotonic() + 3600)
    f_slow = engine.submit(slow)
    f_next = engine.submit(request("next", [2]))
    for _ in range(3):
        engine.step()
    assert engine.scheduler.running[0].request_id == "slow"
    slow.deadline = time.monotonic() - 1  # its time is up
    engine.step()
    with pytest.raises(DeadlineExceeded) as info:
        f_slow.result(timeout=1)
    assert info.value.code == "deadline_exceeded"
    assert engine.scheduler.running[0].request_id == "next"
    drain(engine)
    assert f_next.result().text == "xx"


def test_deadlines_are_enforced_by_the_engine_thread(make_engine):
    engine = make_engine(lambda prompt, out: ord("z"), max_seq_len=100000, start=True)
    future = engine.submit(request("r", [1], greedy(max_tokens=90000),
                                   deadline=time.monotonic() + 0.3))
    waiting = engine.submit(request("w", [1], deadline=time.monotonic() - 1))
    with pytest.raises(DeadlineExceeded):
        future.result(timeout=30)
    with pytest.raises(DeadlineExceeded):
        waiting.result(timeout=30)


def test_abort_stops_running_and_waiting_requests(make_engine):
    engine = make_engine(x_times_first_prompt_id, max_batch_size=1)
    running = engine.submit(request("run", [30]))
    waiting = engine.submit(request("wait", [30]))
    after = engine.submit(request("after", [1]))
    engine.step()
    engine.step()
    engine.abort("run")
    engine.abort("wait")
    engine.abort("unknown")  # nothing to do
    engine.step()
    for future in (running, waiting):
        with pytest.raises(JobCancelled):
            future.result(timeout=1)
    assert engine.scheduler.running[0].request_id == "after"
    drain(engine)
    assert after.result().text == "x"


def test_close_fails_what_is_unfinished_and_refuses_new_work(make_engine):
    engine = make_engine(x_times_first_prompt_id)
    pending = engine.submit(request("p", [5]))
    engine.step()
    engine.close()
    with pytest.raises(EngineUnavailable):
        pending.result(timeout=1)
    with pytest.raises(EngineUnavailable):
        engine.submit(request("late", [1])).result(timeout=1)


# -- faults ----------------------------------------------------------------------------------------

POISON = 99


def faulty(prompt: list[int], out: list[int]) -> int:
    """Raises when a poisoned prompt reaches answer token prompt[1] (0: prefill; later: decode)."""
    if prompt[0] == POISON and len(out) == prompt[1]:
        raise RuntimeError("CUDA error: an illegal memory access (simulated)")
    return ord("x") if len(out) < 4 else IM_END


def test_a_prefill_fault_fails_only_that_request(make_engine):
    engine = make_engine(faulty, start=True)
    bad = engine.submit(request("bad", [POISON, 0]))
    good = engine.submit(request("good", [1, 0]))
    with pytest.raises(EngineError) as info:
        bad.result(timeout=30)
    assert info.value.code == "engine_error" and "illegal memory access" in info.value.message
    assert good.result(timeout=30).text == "xxxx"


def test_a_decode_fault_fails_the_batch_and_the_engine_keeps_serving(make_engine):
    engine = make_engine(faulty, max_batch_size=2)
    bad = engine.submit(request("bad", [POISON, 2]))
    neighbour = engine.submit(request("neighbour", [1, 0]))
    later = engine.submit(request("later", [1, 0]))
    engine.step()  # prefill bad and neighbour; later waits
    engine.step()  # decode: answer token 1
    engine.step()  # decode: answer token 2 raises
    for future in (bad, neighbour):
        with pytest.raises(EngineError, match="during decode"):
            future.result(timeout=1)
    assert not engine.scheduler.running
    drain(engine)
    assert later.result().text == "xxxx"


# -- seeds with a scripted distribution ------------------------------------------------------------


def flat(prompt: list[int], out: list[int]) -> torch.Tensor:
    """Equal logits over 'a'..'z': only the sampler's noise picks the letter."""
    logits = torch.full((512,), -1e9)
    logits[ord("a"):ord("z") + 1] = 0.0
    return logits


def test_the_same_seed_gives_the_same_answer_alone_or_batched(make_engine):
    def sampled(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=12, temperature=1.0, seed=seed, stop_token_ids=STOPS)

    alone = make_engine(flat, max_batch_size=2)
    f = alone.submit(request("a", [1], sampled(7)))
    drain(alone)

    busy = make_engine(flat, max_batch_size=2)
    other = busy.submit(request("o", [5, 5], sampled(123)))
    busy.step()  # the neighbour takes slot 0 first
    g = busy.submit(request("a", [1], sampled(7)))
    h = busy.submit(request("b", [1], sampled(8)))
    drain(busy)
    assert g.result().text == f.result().text and len(f.result().text) == 12
    assert h.result().text != f.result().text
    assert other.result().text != f.result().text


def x_or_y(prompt: list[int], out: list[int]) -> torch.Tensor:
    """'x' (logit 2) over 'y' (logit 1) for three tokens, then <|im_end|>."""
    logits = torch.full((512,), -1e9)
    if len(out) >= 3:
        logits[IM_END] = 0.0
    else:
        logits[ord("x")], logits[ord("y")] = 2.0, 1.0
    return logits


@pytest.mark.parametrize("lookahead", [False, True])
def test_logprobs_come_back_per_answer_token_for_the_requests_that_ask(make_engine, lookahead):
    engine = make_engine(x_or_y, max_batch_size=2, lookahead=lookahead)
    asked = engine.submit(request("a", [1], greedy(logprobs=2)))
    plain = engine.submit(request("b", [1]))
    drain(engine)
    result = asked.result()
    assert result.text == "xxx" and result.completion_tokens == 4  # the stop token has no entry
    x, y = 2.0 - math.log(math.e ** 2 + math.e), 1.0 - math.log(math.e ** 2 + math.e)
    assert len(result.logprobs) == 3
    for entry in result.logprobs:
        assert entry.token_id == ord("x") and entry.logprob == pytest.approx(x, abs=1e-6)
        assert [i for i, _ in entry.top] == [ord("x"), ord("y")]
        assert [lp for _, lp in entry.top] == pytest.approx([x, y], abs=1e-6)
    assert plain.result().logprobs is None and plain.result().text == "xxx"


# -- the tiny checkpoint ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from worker.engine.model.checkpoint import load_model
    from worker.engine.tokenizer import QwenTokenizer

    return load_model(tiny_model_dir), QwenTokenizer.from_model_dir(tiny_model_dir)


def tiny_prompt(tokenizer, text: str) -> list[int]:
    return [tokenizer.im_start_id, *tokenizer.encode("user\n" + text), tokenizer.im_end_id,
            *tokenizer.encode("\n"), tokenizer.im_start_id, *tokenizer.encode("assistant\n")]


def run_tiny(model, tokenizer, requests, max_batch_size=2):
    engine = TorchEngine(model, tokenizer, max_batch_size=max_batch_size, max_seq_len=1024, start=True)
    try:
        futures = [engine.submit(r) for r in requests]
        return [f.result(timeout=120) for f in futures]
    finally:
        engine.close()


def test_greedy_answers_on_the_tiny_checkpoint_do_not_depend_on_the_batch(tiny):
    model, tok = tiny
    params = SamplingParams(max_tokens=8, temperature=0.0, stop_token_ids=tok.stop_token_ids)
    # the long one makes the batch read a longer cache span (kv_len) than the short ones alone
    texts = ["What is in this picture?", "Describe the image in detail. " * 3, "hello",
             " ".join(str(i) for i in range(200))]
    alone = [run_tiny(model, tok, [GenerationRequest(f"a{i}", tiny_prompt(tok, t), sampling=params)],
                      max_batch_size=2)[0] for i, t in enumerate(texts)]
    together = run_tiny(model, tok, [GenerationRequest(f"t{i}", tiny_prompt(tok, t), sampling=params)
                                     for i, t in enumerate(texts)])
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert len({tuple(r.token_ids) for r in alone}) > 1  # the prompts do lead somewhere different


def test_seeded_sampling_on_the_tiny_checkpoint_is_reproducible(tiny):
    model, tok = tiny
    prompt = tiny_prompt(tok, "Describe the image in detail.")

    def req(rid: str, seed: int) -> GenerationRequest:
        params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=seed,
                                stop_token_ids=tok.stop_token_ids)
        return GenerationRequest(rid, prompt, sampling=params)

    alone = run_tiny(model, tok, [req("a", 11)])[0]
    batched = run_tiny(model, tok, [req("x", 5), req("b", 11), req("c", 12)])
    assert batched[1].token_ids == alone.token_ids
    assert batched[2].token_ids != alone.token_ids
    assert batched[0].token_ids != alone.token_ids


# -- speed options ---------------------------------------------------------------------------------


def test_a_waiting_requests_images_are_encoded_while_the_batch_decodes(make_engine, scripted_model):
    model = scripted_model(x_times_first_prompt_id)
    engine = make_engine(model, max_batch_size=1, max_seq_len=600)
    first = engine.submit(request("a", [3]))
    pixels = torch.full((3, 448, 448), 2.0)
    second = engine.submit(request("b", [1] * 300, images=[ImageInput(pixels, key="img")], image_slots=[5]))
    engine.step()  # prefill a; b waits for the slot
    engine.step()  # a decodes, b's image is encoded meanwhile
    kinds = [c[0] for c in model.calls]
    assert kinds[-2:] == ["decode", "encode_images"] and [s.request_id for s in engine.scheduler.waiting] == ["b"]
    drain(engine)
    assert first.result().text == "xxx" and second.result().text == "x"
    assert [c[0] for c in model.calls].count("encode_images") == 1
    assert model.image_features[0][0, 0, 0] == 2.0  # b's prefill got them


def test_an_unknown_quantization_or_int8_without_a_qwen_model_is_refused(byte_tokenizer, scripted_model):
    with pytest.raises(ConfigError, match="int4"):
        TorchEngine(scripted_model(x_times_first_prompt_id), byte_tokenizer, quantization="int4", start=False)
    with pytest.raises(ConfigError, match="QwenVL"):
        TorchEngine(scripted_model(x_times_first_prompt_id), byte_tokenizer, quantization="int8", start=False)


def test_looking_ahead_gives_the_same_answers_and_admissions(make_engine, scripted_model):
    def run(lookahead: bool) -> tuple[list[str], int]:
        engine = make_engine(x_times_first_prompt_id, max_batch_size=2, lookahead=lookahead)
        futures = [engine.submit(request(f"r{i}", [1 + (3 * i) % 7])) for i in range(5)]
        steps = drain(engine)
        return [f.result().text for f in futures], steps

    plain, plain_steps = run(False)
    ahead, ahead_steps = run(True)
    assert ahead == plain == ["x" * (1 + (3 * i) % 7) for i in range(5)]
    assert ahead_steps == plain_steps  # the same schedule: only the launch order differs


def test_the_step_launched_ahead_is_used_when_the_batch_is_unchanged(make_engine):
    engine = make_engine(x_times_first_prompt_id, max_batch_size=2, lookahead=True)
    engine.submit(request("a", [5]))
    engine.submit(request("b", [5]))
    drain(engine)
    decodes = engine.runner.model.decode_calls
    # prefill gives token 1; five decode steps give "xxxx" and <|im_end|>, each launched once (the
    # first normally, the others ahead), plus one launched ahead of the stop and dropped
    positions = [tuple(p) for _, _, p, _ in decodes]
    assert positions == [(i, i) for i in range(1, 7)]


def test_greedy_and_seeded_answers_on_the_tiny_checkpoint_do_not_depend_on_looking_ahead(tiny):
    model, tok = tiny
    prompts = [tiny_prompt(tok, t) for t in ("What is in this picture?", "hello", "1 2 3 4 5")]

    def requests() -> list[GenerationRequest]:
        greedy_params = SamplingParams(max_tokens=9, temperature=0.0, stop_token_ids=tok.stop_token_ids)
        seeded = SamplingParams(max_tokens=9, temperature=1.0, top_p=0.9, seed=3, stop_token_ids=tok.stop_token_ids)
        return [GenerationRequest(f"g{i}", p, sampling=greedy_params) for i, p in enumerate(prompts)] + [
            GenerationRequest("s", prompts[0], sampling=seeded)]

    answers = []
    for lookahead in (False, True):
        engine = TorchEngine(model, tok, max_batch_size=2, max_seq_len=1024, lookahead=lookahead, start=True)
        try:
            answers.append([f.result(timeout=120).token_ids for f in [engine.submit(r) for r in requests()]])
        finally:
            engine.close()
    assert answers[0] == answers[1]


def test_logprobs_on_the_tiny_checkpoint_are_the_cache_free_forwards(tiny):
    model, tok = tiny
    prompt = tiny_prompt(tok, "Describe the image in detail.")
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_stop=True, logprobs=3)
    result = run_tiny(model, tok, [GenerationRequest("lp", prompt, sampling=params)])[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + result.token_ids[:-1]]))[0, len(prompt) - 1:]  # [6, V]
    reference = torch.log_softmax(logits[:, :tok.n_vocab], dim=-1)
    assert [e.token_id for e in result.logprobs] == result.token_ids
    for k, entry in enumerate(result.logprobs):
        assert entry.logprob == pytest.approx(reference[k, entry.token_id].item(), abs=1e-4)
        assert entry.top[0][1] == pytest.approx(reference[k].max().item(), abs=1e-4)  # greedy took the best
        assert [lp for _, lp in entry.top] == pytest.approx(reference[k].topk(3).values.tolist(), abs=1e-4)
        assert [lp for _, lp in entry.top] == pytest.approx([reference[k, i].item() for i, _ in entry.top], abs=1e-4)
