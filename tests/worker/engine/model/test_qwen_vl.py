from __future__ import annotations

import re

import pytest
import torch

from worker.engine.model.args import QwenVLArgs
from worker.engine.model.qwen_vl import QwenVL

from_ids = torch.tensor
ATOL = 1e-5  # fp32 on CPU: cached and cache-free paths agree to rounding


def prompt(model: QwenVL, n_images: int, text: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Random text ids with ``n_images`` image blocks (<img> + 256 pads + </img>) spread through."""
    vision = model.args.vision
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = [1, 2, 3]
    slots = []
    for _ in range(n_images):
        ids += torch.randint(0, 600, (5,), generator=gen).tolist() + [vision.image_start_id]
        slots.append(len(ids))
        ids += [vision.image_pad_id] * 256 + [vision.image_end_id]
    ids += torch.randint(0, 600, (text,), generator=gen).tolist()
    return ids, slots


def run_cached(model: QwenVL, ids: list[int], slot: int, answer: list[int], features=None, image_slots=()):
    """Prefill ``ids`` into ``slot`` then teacher-force ``answer``; logits of every step [len(answer)+1, V]."""
    out = [model.prefill(from_ids(ids), slot, features, image_slots)]
    for i, token in enumerate(answer):
        pos = len(ids) + i
        out.append(model.decode(from_ids([token]), from_ids([pos]), from_ids([slot]))[0])
    return torch.stack(out)


def normalise(name: str) -> str:
    return re.sub(r"\.(h|resblocks)\.\d+\.", r".\1.N.", name)


def test_state_dict_names_are_the_official_checkpoint_names(small_model, shared_data):
    real = QwenVLArgs.from_hf_config(shared_data / "qwen-vl" / "config.json")
    with torch.device("meta"):
        full = QwenVL(real)
    assert {normalise(k) for k in small_model.state_dict()} == {normalise(k) for k in full.state_dict()}
    names = set(full.state_dict())
    for name in ("transformer.wte.weight", "transformer.h.31.attn.c_attn.bias", "transformer.h.0.mlp.w2.weight",
                 "transformer.ln_f.weight", "lm_head.weight", "transformer.visual.conv1.weight",
                 "transformer.visual.positional_embedding", "transformer.visual.transformer.resblocks.47.attn.in_proj.weight",
                 "transformer.visual.transformer.resblocks.0.mlp.c_fc.bias", "transformer.visual.attn_pool.pos_embed",
                 "transformer.visual.attn_pool.attn.in_proj_weight", "transformer.visual.attn_pool.kv_proj.weight",
                 "transformer.visual.proj"):
        assert name in names
    assert not any("kv_cache" in k or k.endswith(("patch_pos", "pool_key_pos")) for k in names)


def test_cached_prefill_and_decode_equal_the_cache_free_forward(small_model, pixels):
    ids, slots = prompt(small_model, n_images=2, text=20)
    answer = [7, 300, 12, 599, 41]
    with torch.no_grad():
        full = small_model(from_ids([ids + answer]), pixels, slots)[0]  # [T + 5, V]
        small_model.setup_cache(max_batch_size=3, max_seq_len=len(ids) + 16)
        features = small_model.encode_images(pixels)
    cached = run_cached(small_model, ids, 2, answer, features, slots)
    torch.testing.assert_close(cached, full[len(ids) - 1:], atol=ATOL, rtol=0)


def test_image_features_replace_the_slot_embeddings(small_model, pixels):
    ids, slots = prompt(small_model, n_images=1, text=8)
    other_ids = list(ids)
    other_ids[slots[0]:slots[0] + 256] = range(256)  # e.g. the official path writes the URL's bytes here
    with torch.no_grad():
        a = small_model(from_ids([ids]), pixels[:1], slots)
        b = small_model(from_ids([other_ids]), pixels[:1], slots)
        c = small_model(from_ids([ids]), pixels[1:], slots)
    assert torch.equal(a, b)
    assert (a[0, -1] - c[0, -1]).abs().max() > 1e-3


def test_two_slots_decoding_together_equal_each_alone(model_factory):
    model = model_factory(seq_length=32)  # one prompt past seq_length: its own NTK alpha and logn
    short, _ = prompt(model, n_images=0, text=12, seed=1)
    long, _ = prompt(model, n_images=0, text=45, seed=2)
    answers = ([5, 6, 7, 8], [9, 10, 11, 12])
    model.setup_cache(max_batch_size=2, max_seq_len=64)
    alone = [run_cached(model, short, 0, answers[0]), run_cached(model, long, 1, answers[1])]

    model.setup_cache(max_batch_size=2, max_seq_len=64)
    first = [model.prefill(from_ids(long), 0), model.prefill(from_ids(short), 1)]  # slots swapped
    together = [[first[1]], [first[0]]]
    for step in range(4):
        logits = model.decode(from_ids([answers[1][step], answers[0][step]]),
                              from_ids([len(long) + step, len(short) + step]), from_ids([0, 1]))
        together[1].append(logits[0])
        together[0].append(logits[1])
    for i in range(2):
        torch.testing.assert_close(torch.stack(together[i]), alone[i], atol=ATOL, rtol=0)
    with torch.no_grad():
        full = model(from_ids([long + answers[1]]))[0]
    torch.testing.assert_close(alone[1], full[len(long) - 1:], atol=ATOL, rtol=0)


def test_decode_may_read_only_the_filled_part_of_the_cache(small_model):
    ids, _ = prompt(small_model, n_images=0, text=10)
    small_model.setup_cache(max_batch_size=1, max_seq_len=128)
    small_model.prefill(from_ids(ids), 0)
    step = (from_ids([4]), from_ids([len(ids)]), from_ids([0]))
    whole = small_model.decode(*step)
    bounded = small_model.decode(*step, kv_len=len(ids) + 1)
    torch.testing.assert_close(bounded, whole, atol=ATOL, rtol=0)


def test_logits_are_float32_even_for_a_bfloat16_model(model_factory):
    model = model_factory().to(torch.bfloat16)
    model.transformer.visual.refresh_fixed_tensors()
    ids, _ = prompt(model, n_images=0, text=4)
    model.setup_cache(1, 32)
    assert model.prefill(from_ids(ids), 0).dtype == torch.float32
    assert model.decode(from_ids([1]), from_ids([len(ids)]), from_ids([0])).dtype == torch.float32
    assert model.transformer.h[0].attn.kv_cache.k.dtype == torch.bfloat16


def test_bad_image_placement_and_slots_are_refused(small_model):
    ids, slots = prompt(small_model, n_images=1, text=4)
    small_model.setup_cache(max_batch_size=1, max_seq_len=len(ids) + 4)
    features = torch.zeros(1, 256, small_model.args.llm.hidden_size)
    with pytest.raises(ValueError, match="1 image feature sets for 2 image slots"):
        small_model.prefill(from_ids(ids), 0, features, [slots[0], slots[0]])
    with pytest.raises(ValueError, match="does not fit"):
        small_model.prefill(from_ids(ids), 0, features, [len(ids) - 10])
    with pytest.raises(ValueError, match="slot 1 outside"):
        small_model.prefill(from_ids(ids), 1, features, slots)
    with pytest.raises(ValueError, match="do not fit the cache"):
        small_model.prefill(from_ids(ids + [1] * 10), 0)
