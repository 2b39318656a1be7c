"""FastQwenVL (the serving path) against the eager model: same logits, same greedy answers."""

from __future__ import annotations

import pytest
import torch

from tests.worker.engine.model.test_qwen_vl import prompt
from tests.worker.engine.test_engine import tiny_prompt
from worker.engine.engine import TorchEngine
from worker.engine.model.checkpoint import load_model
from worker.engine.model import kernels
from worker.engine.model.fast import FastQwenVL, fused_gate_up
from worker.engine.model.quant import Int8Linear, dequantize_llm, quantize_llm
from worker.engine.tokenizer import QwenTokenizer
from worker.engine.types import GenerationRequest, ImageInput, SamplingParams

ATOL = 2e-5  # fp32 on CPU: the fused path reorders nothing that matters beyond rounding


def run_engine(model, tokenizer, requests, **engine_kw) -> list:
    engine = TorchEngine(model, tokenizer, max_batch_size=2, max_seq_len=1024, start=True, **engine_kw)
    try:
        futures = [engine.submit(r) for r in requests]
        return [f.result(timeout=120) for f in futures]
    finally:
        engine.close()


def teacher_forced(model, ids: list[int], slot: int, answer: list[int], features=None, image_slots=(),
                   kv_len: int | None = None) -> torch.Tensor:
    """Prefill then decode ``answer`` one token at a time; logits of every step [len(answer)+1, V]."""
    out = [model.prefill(torch.tensor(ids), slot, features, image_slots)]
    for i, token in enumerate(answer):
        pos = torch.tensor([len(ids) + i])
        out.append(model.decode(torch.tensor([token]), pos, torch.tensor([slot]), kv_len=kv_len)[0])
    return torch.stack(out)


@pytest.mark.parametrize("n_images, text", [(0, 9), (1, 20), (2, 3)])
def test_fast_prefill_and_decode_give_the_eager_logits(model_factory, pixels, n_images, text):
    model = model_factory()
    ids, slots = prompt(model, n_images, text, seed=n_images)
    features = model.encode_images(pixels[:n_images]) if n_images else None
    answer = [5, 77, 300, 12, 9]
    model.setup_cache(2, 1024)
    eager = teacher_forced(model, ids, 1, answer, features, slots)
    fast = FastQwenVL(model)
    fast.setup_cache(2, 1024)
    assert torch.allclose(teacher_forced(fast, ids, 1, answer, features, slots), eager, atol=ATOL)


def test_fast_decode_reads_each_row_to_its_own_length(model_factory):
    model = model_factory()
    fast = FastQwenVL(model)
    fast.setup_cache(3, 256)
    long_ids, short_ids = list(range(1, 120)), [7, 8, 9]
    fast.prefill(torch.tensor(long_ids), 0)
    fast.prefill(torch.tensor(short_ids), 2)
    both = fast.decode(torch.tensor([4, 4]), torch.tensor([len(long_ids), len(short_ids)]), torch.tensor([0, 2]))
    model.setup_cache(1, 256)
    for row, ids in zip(both, (long_ids, short_ids)):
        alone = teacher_forced(model, ids, 0, [4])[1]
        assert torch.allclose(row, alone, atol=ATOL)


def test_int8_decode_takes_the_norms_into_the_gemvs_and_gives_the_same_logits(model_factory, monkeypatch):
    monkeypatch.setattr(kernels, "INT8_GEMV", "cuda")  # the tiny shapes on the CUDA GEMV (its torch version here)
    model = model_factory()
    quantize_llm(model)
    ids = list(range(3, 40))
    logits = {}
    for inside in (True, False):
        with kernels.norms_in_gemv(inside):
            fast = FastQwenVL(model)
            fast.setup_cache(2, 128)
            assert fast._norms_in_gemvs(torch.zeros(2, 1)) is inside
            assert not fast._norms_in_gemvs(torch.zeros(3, 1))  # past the CUDA GEMV's rows
            logits[inside] = teacher_forced(fast, ids, 1, [5, 6, 7])
    assert torch.equal(logits[True], logits[False])


def test_a_model_dtype_model_keeps_its_rms_norm_launches(model_factory):
    fast = FastQwenVL(model_factory())
    fast.setup_cache(1, 64)
    assert not fast._norms_in_gemvs(torch.zeros(1, 1))


def test_past_seq_length_the_fast_path_keeps_ntk_and_logn(model_factory):
    model = model_factory(seq_length=64)  # dynamic NTK and logn attention from 65 tokens on
    ids = torch.randint(0, 600, (150,), generator=torch.Generator().manual_seed(3)).tolist()
    model.setup_cache(1, 256)
    eager = teacher_forced(model, ids, 0, [1, 2, 3])
    fast = FastQwenVL(model)
    fast.setup_cache(1, 256)
    assert torch.allclose(teacher_forced(fast, ids, 0, [1, 2, 3]), eager, atol=ATOL)


def test_fusing_w1_and_w2_keeps_names_memory_and_the_eager_forward(model_factory):
    model = model_factory()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    before = model(ids)
    names = list(model.state_dict())
    FastQwenVL(model).setup_cache(1, 64)
    mlp = model.transformer.h[0].mlp
    fused = fused_gate_up(mlp)
    assert fused is fused_gate_up(mlp)  # made once
    assert mlp.w1.weight.data_ptr() == fused.weight.data_ptr()
    assert mlp.w2.weight.data_ptr() == fused.weight[mlp.w1.out_features:].data_ptr()
    assert list(model.state_dict()) == names
    assert torch.equal(model(ids), before)


def test_greedy_answers_of_the_fast_path_equal_the_eager_path(tiny_model_dir):
    tok = QwenTokenizer.from_model_dir(tiny_model_dir)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_stop=True)
    pixels = torch.randn(3, 448, 448, generator=torch.Generator().manual_seed(5))

    def requests():
        texts = ["What is in this picture?", "hello", " ".join(str(i) for i in range(120))]
        out = [GenerationRequest(f"t{i}", tiny_prompt(tok, t), sampling=params) for i, t in enumerate(texts)]
        ids = tiny_prompt(tok, "x")
        image_ids = [*ids[:3], tok.img_start_id, *[tok.imgpad_id] * 256, tok.img_end_id, *ids[3:]]
        out.append(GenerationRequest("img", image_ids, image_slots=[4], images=[ImageInput(pixels, key="p")],
                                     sampling=params))
        return out

    answers = {}
    for fast in (False, True):
        model = load_model(tiny_model_dir)
        answers[fast] = [r.token_ids for r in run_engine(model, tok, requests(), fast_path=fast)]
    assert answers[True] == answers[False]
    assert len({tuple(a) for a in answers[True]}) > 1


@pytest.mark.parametrize("gemv", ["dot", "cuda"])  # "cuda": decode with the RMSNorms inside the GEMVs
def test_int8_greedy_answers_equal_the_dequantised_reference(tiny_model_dir, monkeypatch, gemv):
    monkeypatch.setattr(kernels, "INT8_GEMV", gemv)
    tok = QwenTokenizer.from_model_dir(tiny_model_dir)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_stop=True)
    texts = ["Describe the image in detail.", "hello", "1 2 3 4 5 6 7 8"]

    def requests():
        return [GenerationRequest(f"q{i}", tiny_prompt(tok, t), sampling=params) for i, t in enumerate(texts)]

    quantized = load_model(tiny_model_dir)
    int8 = [r.token_ids for r in run_engine(quantized, tok, requests(), quantization="int8")]
    assert isinstance(quantized.lm_head, Int8Linear)

    reference = load_model(tiny_model_dir)
    quantize_llm(reference)
    dequantize_llm(reference, torch.float32)
    assert not any(isinstance(m, Int8Linear) for m in reference.modules())
    expected = [r.token_ids for r in run_engine(reference, tok, requests(), fast_path=False)]
    assert int8 == expected
