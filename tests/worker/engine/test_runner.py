"""ModelRunner: the static cache, prefill/decode wiring, the vision-feature cache, sampling rows."""

from __future__ import annotations

import pytest
import torch

from worker.engine.runner import FeatureCache, ModelRunner
from worker.engine.sequence import Sequence
from worker.engine.types import GenerationRequest, ImageInput, SamplingParams

IM_END = 258


def admitted(tok, rid: str, prompt: list[int], slot: int, images=(), image_slots=(), **sampling) -> Sequence:
    params = SamplingParams(temperature=0.0, stop_token_ids=(IM_END,), **sampling)
    request = GenerationRequest(rid, prompt, image_slots=list(image_slots), images=list(images),
                                sampling=params)
    seq = Sequence(request, tok.stream_decoder(), max_tokens=params.max_tokens, seed=1)
    seq.slot = slot
    return seq


def image(value: float, key: str | None) -> ImageInput:
    return ImageInput(pixels=torch.full((3, 448, 448), value), key=key)


def test_the_runner_sets_up_the_static_cache_once(scripted_model):
    model = scripted_model(lambda p, o: 1)
    ModelRunner(model, max_batch_size=3, max_seq_len=40)
    assert model.calls == [("setup_cache", 3, 40)]


def test_prefill_then_decode_feed_each_slot_its_own_tokens_and_positions(byte_tokenizer, scripted_model):
    # the answer echoes the prompt's ids one by one: wrong slots or positions would show
    model = scripted_model(lambda prompt, out: prompt[len(out) % len(prompt)])
    runner = ModelRunner(model, max_batch_size=2, max_seq_len=32)
    a = admitted(byte_tokenizer, "a", [10, 11, 12], slot=1)
    b = admitted(byte_tokenizer, "b", [20, 21], slot=0)
    for seq in (a, b):
        runner.prefill(seq)
    for seq, token in zip((a, b), runner.sample([a, b])):
        seq.output_ids.append(token)
    for _ in range(3):
        runner.decode([b, a])
        for seq, token in zip((b, a), runner.sample([b, a])):
            seq.output_ids.append(token)
    assert a.output_ids == [10, 11, 12, 10]
    assert b.output_ids == [20, 21, 20, 21]
    _, tokens, positions, slots = model.decode_calls[-1]
    assert slots == [0, 1] and positions == [4, 5] and tokens == [20, 12]


def test_prefill_records_vision_and_prefill_time(byte_tokenizer, scripted_model):
    runner = ModelRunner(scripted_model(lambda p, o: 1), max_batch_size=1, max_seq_len=600)
    seq = admitted(byte_tokenizer, "a", [1] * 300, slot=0, images=[image(0.5, "k")], image_slots=[10])
    runner.prefill(seq)
    assert seq.vision_s > 0 and seq.prefill_s > 0


def test_image_features_reach_prefill_in_conversation_order(byte_tokenizer, scripted_model):
    model = scripted_model(lambda p, o: 1)
    runner = ModelRunner(model, max_batch_size=1, max_seq_len=600)
    seq = admitted(byte_tokenizer, "a", [1] * 530, slot=0,
                   images=[image(1.0, "one"), image(2.0, "two")], image_slots=[3, 270])
    runner.prefill(seq)
    features = model.image_features[0]
    assert features.shape == (2, 256, 8)
    assert features[0, 0, 0] == 1.0 and features[1, 0, 0] == 2.0


def test_the_feature_cache_encodes_each_image_content_once(scripted_model):
    model = scripted_model(lambda p, o: 1)
    runner = ModelRunner(model, max_batch_size=1, max_seq_len=16, feature_cache_images=2)
    first = runner.encode_images([image(1.0, "a"), image(2.0, "b")])
    again = runner.encode_images([image(2.0, "b"), image(1.0, "a"), image(3.0, "c")])
    encodes = [c for c in model.calls if c[0] == "encode_images"]
    assert encodes == [("encode_images", 2), ("encode_images", 1)]  # only "c" was new
    assert torch.equal(again[1], first[0]) and torch.equal(again[0], first[1])
    # LRU: "b" then "a" were used, so the new "c" pushed out "b", the least recently used
    assert "b" not in runner.features and "a" in runner.features and "c" in runner.features


def test_images_without_a_key_are_never_cached(scripted_model):
    model = scripted_model(lambda p, o: 1)
    runner = ModelRunner(model, max_batch_size=1, max_seq_len=16)
    runner.encode_images([image(1.0, None)])
    runner.encode_images([image(1.0, None)])
    assert len([c for c in model.calls if c[0] == "encode_images"]) == 2
    assert len(runner.features) == 0


def test_a_zero_size_feature_cache_keeps_nothing():
    cache = FeatureCache(0)
    cache.put("k", torch.zeros(1))
    assert cache.get("k") is None and len(cache) == 0


def test_the_kv_span_is_a_power_of_two_bucket_within_the_cache(scripted_model):
    runner = ModelRunner(scripted_model(lambda p, o: 1), max_batch_size=1, max_seq_len=3000)
    assert runner.kv_bucket(1) == 256
    assert runner.kv_bucket(256) == 256
    assert runner.kv_bucket(257) == 512
    assert runner.kv_bucket(2049) == 3000


def test_sampling_only_counts_the_rows_of_the_step(byte_tokenizer, scripted_model):
    runner = ModelRunner(scripted_model(lambda p, o: 5), max_batch_size=2, max_seq_len=16)
    a = admitted(byte_tokenizer, "a", [1], slot=0, presence_penalty=1.0)
    b = admitted(byte_tokenizer, "b", [1], slot=1, presence_penalty=1.0)
    runner.prefill(a)
    runner.sample([a])
    runner.prefill(b)
    runner.sample([b])
    assert runner.sampler.counts[:, 5].tolist() == [1.0, 1.0]


def test_the_tiny_checkpoint_answers_as_a_cache_free_greedy_loop(tiny_model_dir):
    from worker.engine.model.checkpoint import load_model
    from worker.engine.tokenizer import QwenTokenizer

    model = load_model(tiny_model_dir)
    tok = QwenTokenizer.from_model_dir(tiny_model_dir)
    torch.manual_seed(0)
    prompt = torch.randint(0, 600, (20,)).tolist()
    runner = ModelRunner(model, max_batch_size=2, max_seq_len=64, allowed_vocab=tok.n_vocab)
    seq = admitted(tok, "a", prompt, slot=1)
    runner.prefill(seq)
    seq.output_ids += runner.sample([seq])
    for _ in range(5):
        runner.decode([seq])
        seq.output_ids += runner.sample([seq])

    ids = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            logits = model(torch.tensor([ids]))[0, -1]
            ids.append(int(logits[:tok.n_vocab].argmax()))
    assert seq.output_ids == ids[len(prompt):]


@pytest.mark.parametrize("bad", ["encode", "prefill"])
def test_model_errors_propagate_to_the_caller(byte_tokenizer, scripted_model, bad):
    model = scripted_model(lambda p, o: 1)
    if bad == "encode":
        model.encode_images = lambda pixels: torch.zeros(1, 3, 8)  # wrong shape
    else:
        model.prefill = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))
    runner = ModelRunner(model, max_batch_size=1, max_seq_len=600)
    seq = admitted(byte_tokenizer, "a", [1] * 300, slot=0, images=[image(0.5, "k")], image_slots=[10])
    with pytest.raises(RuntimeError):
        runner.prefill(seq)


def test_images_encoded_ahead_reach_prefill_without_a_second_encode(byte_tokenizer, scripted_model):
    model = scripted_model(lambda p, o: 1)
    runner = ModelRunner(model, max_batch_size=1, max_seq_len=600)
    seq = admitted(byte_tokenizer, "a", [1] * 300, slot=0, images=[image(3.0, "k")], image_slots=[10])
    assert runner.encode_ahead(seq) and not runner.encode_ahead(seq)  # once
    assert "k" not in runner.features  # cached only when its prefill takes it
    runner.prefill(seq)
    assert [c for c in model.calls if c[0] == "encode_images"] == [("encode_images", 1)]
    assert model.image_features[0][0, 0, 0] == 3.0
    assert "k" in runner.features and seq.encoded_images is None


def test_nothing_is_encoded_ahead_for_a_text_only_request(byte_tokenizer, scripted_model):
    runner = ModelRunner(scripted_model(lambda p, o: 1), max_batch_size=1, max_seq_len=16)
    assert not runner.encode_ahead(admitted(byte_tokenizer, "a", [1, 2], slot=0))
