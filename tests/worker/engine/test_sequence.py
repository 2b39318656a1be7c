"""A sequence's answer: stop rules, token counts, streaming deltas and timings."""

from __future__ import annotations

from worker.engine.sequence import Sequence, SequenceStatus
from worker.engine.types import GenerationRequest, SamplingParams, TokenLogprob

IM_END = 258  # in the byte tokenizer


def make(tok, max_tokens=50, **sampling) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, stop_token_ids=(IM_END,), **sampling)
    return Sequence(GenerationRequest("r", [1, 2, 3], sampling=params), tok.stream_decoder(),
                    max_tokens=max_tokens, seed=0)


def feed(seq: Sequence, text: str, then: list[int] = ()) -> tuple[bool, list[str]]:
    deltas, done = [], False
    for t in [*text.encode(), *then]:
        assert not done, "fed past the end"
        done = seq.append_token(t)
        deltas.append(seq.take_delta())
    return done, deltas


def test_a_new_sequence_waits_without_a_slot(byte_tokenizer):
    seq = make(byte_tokenizer)
    assert seq.status is SequenceStatus.WAITING and seq.slot is None
    assert seq.prompt_len == 3 and seq.num_tokens == 3


def test_the_stop_token_ends_the_answer_counts_and_stays_out_of_the_text(byte_tokenizer):
    seq = make(byte_tokenizer)
    done, _ = feed(seq, "hi", then=[IM_END])
    assert done and seq.finish_reason == "stop"
    result = seq.result()
    assert result.text == "hi"
    assert result.token_ids[-1] == IM_END
    assert result.completion_tokens == 3 and result.prompt_tokens == 3


def test_max_tokens_ends_the_answer_with_length(byte_tokenizer):
    seq = make(byte_tokenizer, max_tokens=4)
    done, _ = feed(seq, "abcd")
    assert done and seq.finish_reason == "length" and seq.text == "abcd"


def test_a_stop_string_across_tokens_is_cut_from_the_text(byte_tokenizer):
    seq = make(byte_tokenizer, stop=("END",))
    done, deltas = feed(seq, "one ENDtwo"[:7])
    assert done and seq.finish_reason == "stop"
    assert seq.text == "one "
    assert "".join(deltas) == "one "
    assert seq.result().completion_tokens == 7


def test_text_that_may_begin_a_stop_string_is_held_back_until_decided(byte_tokenizer):
    seq = make(byte_tokenizer, stop=("###",))
    _, deltas = feed(seq, "a##b")
    assert deltas == ["a", "", "", "##b"]
    assert seq.text == "a##b"


def test_ignore_stop_runs_to_max_tokens(byte_tokenizer):
    seq = make(byte_tokenizer, max_tokens=3, stop=("x",), ignore_stop=True)
    done, _ = feed(seq, "xx", then=[IM_END])
    assert done and seq.finish_reason == "length"
    assert seq.result().completion_tokens == 3


def test_multibyte_characters_stream_whole(byte_tokenizer):
    seq = make(byte_tokenizer)
    text = "女生 🐕 ok"
    done, deltas = feed(seq, text, then=[IM_END])
    assert done
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == seq.text
    assert "" in deltas  # the decoder really held bytes back


def test_the_stop_string_at_the_very_end_of_max_tokens_still_says_stop(byte_tokenizer):
    seq = make(byte_tokenizer, max_tokens=3, stop=("c",))
    done, _ = feed(seq, "abc")
    assert done and seq.finish_reason == "stop" and seq.text == "ab"


def test_timings_are_milliseconds_of_each_phase(byte_tokenizer):
    seq = make(byte_tokenizer)
    seq.admitted_at = seq.submitted_at + 0.5
    seq.prefill_s, seq.decode_s = 0.25, 1.0
    feed(seq, "a", then=[IM_END])
    seq.finished_at = seq.submitted_at + 2.0
    t = seq.result().timings
    assert set(t) == {"queued", "vision", "prefill", "decode", "ttft", "total"}
    assert t["queued"] == 500.0 and t["prefill"] == 250.0 and t["decode"] == 1000.0
    assert t["total"] == 2000.0 and 0 <= t["ttft"] <= t["total"]


def entries(text: str, then: list[int] = ()) -> list[TokenLogprob]:
    return [TokenLogprob(t, -0.5 * i, top=((t, -0.5 * i),)) for i, t in enumerate([*text.encode(), *then])]


def feed_with_logprobs(seq: Sequence, given: list[TokenLogprob]) -> None:
    for entry in given:
        if seq.append_token(entry.token_id, entry):
            return


def test_logprobs_cover_the_answer_text_without_the_stop_token(byte_tokenizer):
    seq = make(byte_tokenizer, logprobs=1)
    given = entries("hi", then=[IM_END])
    feed_with_logprobs(seq, given)
    result = seq.result()
    assert result.text == "hi" and result.completion_tokens == 3
    assert result.logprobs == given[:2] and result.logprob_spans == [(0, 1), (1, 2)]


def test_each_logprob_entry_names_the_characters_its_token_wrote(byte_tokenizer):
    seq = make(byte_tokenizer, stop=("END",), logprobs=0)
    feed_with_logprobs(seq, entries("é!ENDx"))
    result = seq.result()
    assert result.text == "é!"  # the first byte of é writes nothing; the second writes the character
    assert result.logprob_spans == [(0, 0), (0, 1), (1, 2)]


def test_logprobs_end_where_a_stop_string_cut_the_text(byte_tokenizer):
    seq = make(byte_tokenizer, stop=("END",), logprobs=0)
    given = entries("one ENDtwo")
    feed_with_logprobs(seq, given)
    assert seq.result().text == "one "
    assert [e.token_id for e in seq.result().logprobs] == list(b"one ")


def test_no_logprobs_unless_asked(byte_tokenizer):
    seq = make(byte_tokenizer)
    feed_with_logprobs(seq, entries("ab", then=[IM_END]))
    assert seq.result().logprobs is None and seq.wants_logprobs is None


def stream_with_logprobs(seq: Sequence, given: list[TokenLogprob]) -> list[tuple[str, list[int]]]:
    """After each token, as the engine streams: the text delta and the token ids of the entries
    handed over with it."""
    out = []
    for entry in given:
        done = seq.append_token(entry.token_id, entry)
        if done:
            seq.status = SequenceStatus.FINISHED  # as the scheduler marks it
        out.append((seq.take_delta(), [e.token_id for e in seq.take_logprobs()]))
        if done:
            break
    return out


def test_streamed_logprobs_come_with_the_text_they_complete_and_never_past_a_stop_string(byte_tokenizer):
    seq = make(byte_tokenizer, stop=("###",), logprobs=0)
    out = stream_with_logprobs(seq, entries("a##b###c"))
    assert out == [("a", [97]), ("", []), ("", []), ("##b", [35, 35, 98]), ("", []), ("", []), ("", [])]
    assert [e.token_id for e in seq.result().logprobs] == list(b"a##b")


def test_a_token_holding_part_of_a_character_streams_with_the_character(byte_tokenizer):
    seq = make(byte_tokenizer, logprobs=0)
    out = stream_with_logprobs(seq, entries("é!", then=[IM_END]))
    assert out == [("", []), ("é", list("é".encode())), ("!", [33]), ("", [])]
