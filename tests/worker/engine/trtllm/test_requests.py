"""worker.engine.trtllm.requests: what a GenerationRequest becomes for TensorRT-LLM's executor."""

from __future__ import annotations

import hashlib
import json
from enum import Enum
from pathlib import Path

import pytest
import torch

from producer.errors import InvalidRequest, PromptTooLong, TooManyImages
from producer.schema import parse_chat_request
from worker.engine.prompt import build_prompt
from worker.engine.tokenizer import QwenTokenizer
from worker.engine.trtllm.requests import (
    EngineLimits,
    build_spec,
    finish_reason,
    image_content_id,
    image_token_ids,
    input_token_extra_ids,
    prompt_table,
    sampling_kwargs,
    stop_words,
)
from worker.engine.types import GenerationRequest, ImageInput, SamplingParams

VOCAB = 151936
LIMITS = EngineLimits(vocab_size=VOCAB, max_batch_size=2, max_input_len=30720, max_seq_len=32768,
                      max_prompt_rows=13312, max_images=26)


def _image(data: bytes) -> ImageInput:
    return ImageInput(pixels=torch.zeros(3, 4, 4), key=hashlib.sha256(data).hexdigest())


def _request(n_tokens: int = 600, slots: tuple[int, ...] = (5, 300), **sampling) -> GenerationRequest:
    images = [_image(f"image {k}".encode()) for k in range(len(slots))]
    return GenerationRequest(request_id="r1", prompt_ids=list(range(100, 100 + n_tokens)),
                             image_slots=list(slots), images=images, sampling=SamplingParams(**sampling))


# -- fake image ids -------------------------------------------------------------------------------


def test_fake_ids_start_at_vocab_size_and_count_across_images():
    ids = list(range(600))
    out = image_token_ids(ids, [5, 300], VOCAB)
    assert out[5:261] == list(range(VOCAB, VOCAB + 256))
    assert out[300:556] == list(range(VOCAB + 256, VOCAB + 512))
    assert out[:5] == ids[:5] and out[261:300] == ids[261:300] and out[556:] == ids[556:]


def test_the_seed_two_image_prompt_gets_ids_151936_to_152447(seed_requests: Path, qwen_tiktoken: Path):
    tok = QwenTokenizer.from_file(qwen_tiktoken)
    prompt = build_prompt(parse_chat_request(json.loads((seed_requests / "two_images.json").read_text())), tok)
    ids = image_token_ids(prompt.ids, prompt.image_slots, VOCAB)
    assert len(ids) == 553
    fake = [i for i in ids if i >= VOCAB]
    assert fake == list(range(151936, 152448))
    for start in prompt.image_slots:
        assert ids[start - 1] == tok.img_start_id and ids[start + 256] == tok.img_end_id
    assert tok.imgpad_id not in ids


def test_a_prompt_without_images_keeps_its_ids():
    assert image_token_ids([1, 2, 3], [], VOCAB) == [1, 2, 3]


@pytest.mark.parametrize("slots", [[-1], [400], [5, 100]])
def test_image_slots_outside_the_prompt_or_overlapping_are_refused(slots):
    with pytest.raises(InvalidRequest, match="slots"):
        image_token_ids(list(range(600)), slots, VOCAB)


# -- prompt tables ----------------------------------------------------------------------------------


def test_prompt_table_rows_follow_image_order():
    features = torch.stack([torch.full((256, 8), float(k)) for k in range(3)])  # [3, 256, 8]
    table = prompt_table(features)
    assert table.shape == (768, 8) and table.is_contiguous()
    for k in range(3):
        assert torch.equal(table[256 * k:256 * (k + 1)], features[k])
    assert torch.equal(prompt_table([features[0], features[1]]), table[:512])


def test_fake_id_k_reads_table_row_k():
    """TensorRT-LLM's lookup (row = id - vocab_size) gives each slot its own image's feature."""
    features = torch.randn(2, 256, 8)
    ids = image_token_ids(list(range(600)), [5, 300], VOCAB)
    table = prompt_table(features)
    assert torch.equal(table[ids[5 + 17] - VOCAB], features[0, 17])
    assert torch.equal(table[ids[300 + 255] - VOCAB], features[1, 255])


# -- extra ids for KV-cache reuse -----------------------------------------------------------------


def test_the_same_image_bytes_give_the_same_extra_id_and_different_bytes_differ(sample_images: Path):
    panda = (sample_images / "giant_panda.jpg").read_bytes()
    red = (sample_images / "red_panda.jpg").read_bytes()
    assert image_content_id(_image(panda)) == image_content_id(_image(panda))
    assert image_content_id(_image(panda)) != image_content_id(_image(red))
    assert 0 < image_content_id(_image(panda)) < 2**63


def test_images_without_a_key_are_identified_by_their_pixels():
    a = torch.randn(3, 8, 8, generator=torch.Generator().manual_seed(1))
    b = a.clone()
    b[0, 0, 0] += 1
    assert image_content_id(ImageInput(a)) == image_content_id(ImageInput(a.clone()))
    assert image_content_id(ImageInput(a)) != image_content_id(ImageInput(b))


def test_extra_ids_are_zero_for_text_and_the_images_id_on_its_slots():
    extra = input_token_extra_ids(600, [5, 300], [11, 22])
    assert len(extra) == 600
    assert set(extra[:5]) == {0} and set(extra[261:300]) == {0} and set(extra[556:]) == {0}
    assert set(extra[5:261]) == {11} and set(extra[300:556]) == {22}


def test_two_requests_with_the_same_image_share_extra_ids_and_a_different_image_does_not():
    same = [_image(b"photo")]
    other = [_image(b"another photo")]
    a = build_spec(GenerationRequest("a", list(range(300)), [10], same), LIMITS, pad_id=0)
    b = build_spec(GenerationRequest("b", list(range(300)), [10], list(same)), LIMITS, pad_id=0)
    c = build_spec(GenerationRequest("c", list(range(300)), [10], other), LIMITS, pad_id=0)
    assert a.input_ids == b.input_ids == c.input_ids  # the same fake ids...
    assert a.extra_ids == b.extra_ids  # ...reuse the KV blocks for the same image
    assert a.extra_ids[10:266] != c.extra_ids[10:266]  # ...and never for another image
    assert a.extra_ids[:10] == c.extra_ids[:10] == [0] * 10  # the text prefix is shared


# -- sampling and stops ---------------------------------------------------------------------------


def test_greedy_becomes_top_k_1():
    assert sampling_kwargs(SamplingParams(temperature=0.0, top_p=0.3), seed=5) == {
        "beam_width": 1, "seed": 5, "top_k": 1}
    assert sampling_kwargs(SamplingParams(temperature=0.7, top_k=1), seed=5)["top_k"] == 1


def test_sampling_maps_temperature_top_p_top_k_and_penalties():
    kwargs = sampling_kwargs(SamplingParams(temperature=0.7, top_p=0.3, top_k=20, repetition_penalty=1.05,
                                            presence_penalty=0.5, frequency_penalty=0.25), seed=123)
    assert kwargs == {"beam_width": 1, "seed": 123, "temperature": 0.7, "top_p": 0.3, "top_k": 20,
                      "repetition_penalty": 1.05, "presence_penalty": 0.5, "frequency_penalty": 0.25}


def test_no_top_k_filter_leaves_top_k_unset_and_always_gives_top_p():
    kwargs = sampling_kwargs(SamplingParams(temperature=1.0), seed=0)
    assert "top_k" not in kwargs and kwargs["top_p"] == 1.0


def test_seeds_are_masked_to_the_executors_uint64():
    assert sampling_kwargs(SamplingParams(), seed=-1)["seed"] == 2**64 - 1


def test_a_request_without_a_seed_gets_a_random_one_and_a_given_seed_is_kept():
    seeds = {build_spec(_request(), LIMITS, pad_id=0).seed for _ in range(5)}
    assert len(seeds) == 5
    spec = build_spec(_request(seed=42), LIMITS, pad_id=0)
    assert spec.seed == 42 and spec.sampling["seed"] == 42


def test_stop_ids_become_single_token_stop_words():
    params = SamplingParams(stop_token_ids=(151645, 151644, 151643, 151645))
    assert stop_words(params) == [[151645], [151644], [151643]]
    assert stop_words(SamplingParams(stop_token_ids=(151645,), ignore_stop=True)) == []


def test_the_spec_carries_stops_without_an_end_id_so_the_stop_token_stays_in_the_output():
    spec = build_spec(_request(stop_token_ids=(151645, 151643)), LIMITS, pad_id=151643)
    assert spec.stop_words == [[151645], [151643]]
    assert spec.stop_token_ids == (151645, 151643)
    assert spec.end_id is None and spec.pad_id == 151643
    assert spec.image_rows == 512 and spec.streaming


# -- limits ---------------------------------------------------------------------------------------


def test_max_tokens_is_clipped_to_the_engines_sequence_length():
    limits = EngineLimits(vocab_size=VOCAB, max_batch_size=2, max_input_len=700, max_seq_len=1000,
                          max_prompt_rows=13312)
    assert build_spec(_request(max_tokens=2048), limits, pad_id=0).max_tokens == 400
    assert build_spec(_request(max_tokens=16), limits, pad_id=0).max_tokens == 16


def test_a_prompt_over_max_input_len_is_prompt_too_long():
    limits = EngineLimits(vocab_size=VOCAB, max_batch_size=2, max_input_len=500, max_seq_len=1000,
                          max_prompt_rows=13312)
    with pytest.raises(PromptTooLong, match="at most 500"):
        build_spec(_request(n_tokens=600), limits, pad_id=0)


def test_more_images_than_the_prompt_table_holds_per_request_is_too_many_images():
    limits = EngineLimits(vocab_size=VOCAB, max_batch_size=2, max_input_len=30720, max_seq_len=32768,
                          max_prompt_rows=512)  # 256 rows per request with 2 in flight
    with pytest.raises(TooManyImages, match="at most 1 per request"):
        build_spec(_request(), limits, pad_id=0)


def test_logprobs_are_refused_with_what_to_do_instead():
    with pytest.raises(InvalidRequest, match="engine.backend torch") as caught:
        build_spec(_request(logprobs=0), LIMITS, pad_id=0)
    assert caught.value.context["param"] == "logprobs"


def test_ids_outside_the_vocabulary_are_refused():
    bad = GenerationRequest("r", [1, 2, VOCAB], sampling=SamplingParams())
    with pytest.raises(InvalidRequest, match="prompt ids"):
        build_spec(bad, LIMITS, pad_id=0)


# -- finish reasons -------------------------------------------------------------------------------


class FinishReason(Enum):  # the shape of tensorrt_llm.bindings.executor.FinishReason
    NOT_FINISHED = 0
    END_ID = 1
    STOP_WORDS = 2
    LENGTH = 3
    CANCELLED = 5


@pytest.mark.parametrize("value, word", [
    (FinishReason.END_ID, "stop"), (FinishReason.STOP_WORDS, "stop"), (FinishReason.LENGTH, "length"),
    (FinishReason.CANCELLED, "cancelled"), (FinishReason.NOT_FINISHED, None), ("FinishReason.LENGTH", "length"),
    (None, None),
])
def test_executor_finish_reasons_map_to_vlqs_words(value, word):
    assert finish_reason(value) == word
