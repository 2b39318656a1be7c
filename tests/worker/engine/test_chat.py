"""ChatEngine: model folder -> chat.completion documents, sampling defaults, limits, backends."""

from __future__ import annotations

import json
import math
import sys
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from producer.config import EngineSettings
from producer.errors import (
    ConfigError,
    DeadlineExceeded,
    EngineUnavailable,
    InvalidRequest,
    JobCancelled,
    PromptTooLong,
    TooManyImages,
)
from producer.schema import parse_chat_request
from worker.engine.checkpoint_id import checkpoint_id
from worker.engine.chat import ChatEngine, GenerationDefaults, resolve_device
from worker.engine.engine import TorchEngine
from worker.engine.tokenizer import QwenTokenizer
from worker.images import decode_image


def settings(model_dir: Path, **kw) -> EngineSettings:
    base = dict(model_dir=model_dir, device="cpu", max_seq_len=1024, max_input_len=1000,
                default_max_tokens=6)
    return EngineSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def chat(tiny_model_dir):
    engine = ChatEngine.from_settings(settings(tiny_model_dir))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def demo(sample_images):
    path = sample_images / "demo.jpeg"
    return decode_image(path.read_bytes(), url=path.as_uri())


def one_image(text: str = "这是什么", **fields) -> dict:
    return {"model": "QwenVL", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/demo.jpeg"}},
        {"type": "text", "text": text}]}], **fields}


def text_only(text: str = "hello", **fields) -> dict:
    return {"messages": [{"role": "user", "content": text}], **fields}


# -- loading --------------------------------------------------------------------------------------


def test_a_model_folder_loads_with_its_tokenizer_and_generation_defaults(chat, tiny_model_dir):
    assert chat.model_name == tiny_model_dir.name
    assert chat.checkpoint == checkpoint_id(tiny_model_dir)  # results say which weights wrote them
    assert (chat.device, chat.dtype) == ("cpu", "float32")
    assert chat.defaults.top_p == 0.5 and chat.defaults.top_k == 0
    assert chat.tokenizer.im_end_id in chat.stop_token_ids
    assert isinstance(chat.engine, TorchEngine) and chat.engine.max_batch_size == 2


def test_auto_device_is_cpu_float32_without_a_gpu():
    if torch.cuda.is_available():
        assert resolve_device("auto", "auto") == (torch.device("cuda"), torch.bfloat16)
    else:
        assert resolve_device("auto", "auto") == (torch.device("cpu"), torch.float32)
        with pytest.raises(EngineUnavailable, match="no CUDA"):
            resolve_device("cuda", "auto")
    assert resolve_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ConfigError):
        resolve_device("tpu-please", "auto")


def test_no_model_folder_is_a_config_error():
    with pytest.raises(ConfigError, match="model_dir"):
        ChatEngine.from_settings(EngineSettings())


def test_the_trtllm_backend_refuses_clearly_when_it_cannot_run_here(tiny_model_dir, monkeypatch):
    with pytest.raises(EngineUnavailable) as info:
        ChatEngine.from_settings(settings(tiny_model_dir, backend="trtllm"))
    assert "trtllm" in info.value.message
    monkeypatch.setitem(sys.modules, "worker.engine.trtllm", None)  # the module cannot import
    with pytest.raises(EngineUnavailable, match="cannot be imported"):
        ChatEngine.from_settings(settings(tiny_model_dir, backend="trtllm"))


# -- the completion document ----------------------------------------------------------------------


def test_a_seed_request_gives_an_openai_chat_completion(chat, seed_requests, demo):
    body = json.loads((seed_requests / "single_image.json").read_text())
    request = parse_chat_request({**body, "max_tokens": 4})
    result = chat.submit(request, [demo], request_id="job-1").result(timeout=60)
    assert result["id"] == "chatcmpl-job-1"
    assert result["object"] == "chat.completion" and result["model"] == "QwenVL"
    assert isinstance(result["created"], int) and result["system_fingerprint"].startswith("vlq-")
    assert result["vlq"]["checkpoint"] == chat.checkpoint
    choice = result["choices"][0]
    assert choice["index"] == 0 and choice["logprobs"] is None
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = result["usage"]
    assert usage["prompt_tokens"] == 285
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert result["boxes"] == []
    vlq = result["vlq"]
    assert vlq["request_id"] == "job-1" and isinstance(vlq["seed"], int)
    assert set(vlq["timings"]) == {"preprocess", "queued", "vision", "prefill", "decode", "ttft", "total"}
    assert vlq["timings"]["vision"] > 0
    json.dumps(result)  # JSON-ready


def test_max_tokens_cuts_the_answer_with_finish_reason_length(chat):
    request = parse_chat_request(text_only(max_tokens=3, temperature=0.0))
    result = chat.submit(request, [], request_id="len").result(timeout=60)
    if result["choices"][0]["finish_reason"] == "length":
        assert result["usage"]["completion_tokens"] == 3
    else:  # the random model happened to stop at once
        assert result["usage"]["completion_tokens"] <= 3


def test_the_seed_used_is_reported_and_reproduces_the_answer(chat):
    first = chat.submit(parse_chat_request(text_only("tell me", temperature=1.0, top_p=1.0)), [],
                        request_id="s1").result(timeout=60)
    seed = first["vlq"]["seed"]
    again = chat.submit(parse_chat_request(text_only("tell me", temperature=1.0, top_p=1.0, seed=seed)),
                        [], request_id="s2").result(timeout=60)
    assert again["vlq"]["seed"] == seed
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]


def test_streamed_deltas_add_up_to_the_content(chat):
    deltas: list[str] = []
    request = parse_chat_request(text_only("stream it", max_tokens=8, temperature=0.0))
    result = chat.submit(request, [], request_id="st", on_delta=lambda text, _: deltas.append(text)).result(timeout=60)
    assert "".join(deltas) == result["choices"][0]["message"]["content"]


def test_streamed_logprob_entries_come_with_their_text_and_add_up_to_the_results(chat):
    pieces: list[tuple[str, list]] = []
    request = parse_chat_request(text_only("stream it", max_tokens=8, temperature=0.0, logprobs=True, top_logprobs=2))
    result = chat.submit(request, [], request_id="stl",
                         on_delta=lambda text, entries: pieces.append((text, entries))).result(timeout=60)
    assert "".join(text for text, _ in pieces) == result["choices"][0]["message"]["content"]
    assert [e for _, entries in pieces for e in entries] == result["choices"][0]["logprobs"]["content"]
    assert sum(1 for _, entries in pieces if entries) > 1  # per piece, not all at the end


def test_logprobs_give_each_answer_tokens_text_bytes_and_top_tokens(chat):
    request = parse_chat_request(text_only("tell me", max_tokens=5, temperature=0.0, logprobs=True, top_logprobs=3))
    result = chat.submit(request, [], request_id="lp").result(timeout=60)
    logprobs = result["choices"][0]["logprobs"]
    assert set(logprobs) == {"content", "refusal"} and logprobs["refusal"] is None
    content = logprobs["content"]
    assert 1 <= len(content) <= result["usage"]["completion_tokens"]
    for token in content:
        assert bytes(token["bytes"]).decode(errors="replace") == token["token"]
        assert len(token["top_logprobs"]) == 3 and token["top_logprobs"][0]["token"] == token["token"]  # greedy
        assert token["logprob"] == token["top_logprobs"][0]["logprob"] <= 0
    json.dumps(result)
    plain = parse_chat_request(text_only("tell me", max_tokens=2, logprobs=True))
    assert all(t["top_logprobs"] == [] for t in chat.submit(plain, [], request_id="lp0").result(timeout=60)
               ["choices"][0]["logprobs"]["content"])


def test_images_are_preprocessed_on_the_callers_thread(chat, demo, monkeypatch):
    import worker.engine.model.preprocess as preprocess

    threads = []
    original = preprocess.preprocess_image

    def spy(image, *a, **k):
        threads.append(threading.current_thread())
        return original(image, *a, **k)

    monkeypatch.setattr(preprocess, "preprocess_image", spy)
    future = chat.submit(parse_chat_request(one_image(max_tokens=1)), [demo], request_id="thr")
    assert threads == [threading.current_thread()]
    future.result(timeout=60)


# -- sampling settings ----------------------------------------------------------------------------


def test_request_fields_win_over_the_generation_config(chat):
    params = chat.sampling_params(parse_chat_request(text_only(
        temperature=0.2, top_p=0.9, top_k=5, seed=3, stop=["END"], repetition_penalty=1.1,
        presence_penalty=0.5, frequency_penalty=0.25, max_tokens=7)))
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.2, 0.9, 5, 3)
    assert params.stop == ("END",) and params.repetition_penalty == 1.1
    assert (params.presence_penalty, params.frequency_penalty, params.max_tokens) == (0.5, 0.25, 7)


def test_the_generation_config_fills_what_the_request_leaves_out(chat):
    params = chat.sampling_params(parse_chat_request(text_only()))
    assert params.top_p == 0.5 and params.top_k == 0  # Qwen-VL-Chat's published defaults
    assert params.temperature == 1.0 and params.repetition_penalty == 1.0  # OpenAI's
    assert params.max_tokens == chat.settings.default_max_tokens
    assert set(params.stop_token_ids) >= {chat.tokenizer.im_end_id, chat.tokenizer.im_start_id,
                                          chat.tokenizer.endoftext_id}


def test_do_sample_false_in_the_generation_config_means_greedy(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": False, "temperature": 0.7, "repetition_penalty": 1.05, "eos_token_id": [5, 10**9]}))
    d = GenerationDefaults.from_model_dir(tmp_path, vocab_size=100)
    assert d.temperature == 0.0 and d.repetition_penalty == 1.05 and d.stop_token_ids == (5,)
    assert GenerationDefaults.from_model_dir(tmp_path / "nothing", 100) == GenerationDefaults()
    (tmp_path / "generation_config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError):
        GenerationDefaults.from_model_dir(tmp_path, vocab_size=100)


def test_max_completion_tokens_is_read_as_max_tokens(chat):
    params = chat.sampling_params(parse_chat_request(text_only(max_completion_tokens=9)))
    assert params.max_tokens == 9


# -- refusals -------------------------------------------------------------------------------------


def test_validate_refuses_too_many_images_and_long_prompts(tiny_model_dir):
    tok = QwenTokenizer.from_model_dir(tiny_model_dir)
    chat = ChatEngine(settings(tiny_model_dir, max_images=1, max_input_len=300, max_seq_len=310),
                      tok, engine=None)
    two = one_image()
    two["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {"url": "https://x/2.jpg"}})
    with pytest.raises(TooManyImages):
        chat.validate(parse_chat_request(two))
    with pytest.raises(PromptTooLong):
        chat.validate(parse_chat_request(text_only("word " * 400)))
    with pytest.raises(InvalidRequest, match="top_p"):
        chat.validate(parse_chat_request(text_only(top_p=-0.5)))
    chat.validate(parse_chat_request(one_image()))


def test_submit_refuses_a_wrong_number_of_images_through_the_future(chat, demo):
    future = chat.submit(parse_chat_request(one_image()), [demo, demo], request_id="n")
    with pytest.raises(InvalidRequest, match="2 images"):
        future.result(timeout=1)


def test_deadlines_and_aborts_reach_the_engine(chat):
    import time

    late = chat.submit(parse_chat_request(text_only(max_tokens=50)), [], request_id="late",
                       deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        late.result(timeout=60)
    slow = dict(on_delta=lambda text, logprobs: time.sleep(0.01))  # so the answer cannot finish first
    held = chat.submit(parse_chat_request(text_only(max_tokens=1000, temperature=0.0)), [],
                       request_id="held", **slow)
    chat.abort("held")
    with pytest.raises(JobCancelled):
        held.result(timeout=60)
    dropped = chat.submit(parse_chat_request(text_only(max_tokens=1000, temperature=0.0)), [],
                          request_id="dropped", **slow)
    assert dropped.cancel()  # Future.cancel() aborts it in the engine as well
    deadline = time.monotonic() + 30
    while chat.engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not chat.engine.has_work()


# -- grounding boxes ------------------------------------------------------------------------------


class FixedAnswer:
    """An Engine whose every answer is one text (tests the result document alone)."""

    max_batch_size = 1

    def __init__(self, text: str, logprobs=None, spans=None) -> None:
        self.text = text
        self.logprobs = logprobs  # the TokenLogprob entries of the answer, when asked
        self.spans = spans  # and the characters of text each one's token wrote

    def submit(self, request):
        from worker.engine.types import GenerationResult

        future: Future = Future()
        asked = request.sampling.logprobs is not None
        future.set_result(GenerationResult(request.request_id, self.text, [1, 2, 3], "stop",
                                           len(request.prompt_ids), 3, {"total": 1.0},
                                           logprobs=self.logprobs if asked else None,
                                           logprob_spans=self.spans if asked else None))
        return future

    def abort(self, request_id):
        pass

    def close(self):
        pass


def test_grounding_boxes_come_in_pixels_of_the_referred_picture(tiny_model_dir, demo, sample_images):
    tok = QwenTokenizer.from_model_dir(tiny_model_dir)
    answer = "<ref>女生</ref><box>(441,382),(733,811)</box>"
    chat = ChatEngine(settings(tiny_model_dir), tok, FixedAnswer(answer))
    panda_path = sample_images / "red_panda.jpg"
    panda = decode_image(panda_path.read_bytes(), url=panda_path.as_uri())
    body = one_image("输出女生的检测框。")
    body["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {"url": "https://x/p.jpg"}})
    result = chat.submit(parse_chat_request(body), [panda, demo], request_id="g").result(timeout=5)
    [box] = result["boxes"]
    assert box["phrase"] == "女生" and box["picture"] == 2
    assert box["box"] == [441, 382, 733, 811]
    w, h = demo.size
    assert box["image_size"] == [w, h]
    assert box["box_pixels"] == [int(441 / 1000 * w), int(382 / 1000 * h), int(733 / 1000 * w), int(811 / 1000 * h)]
    assert result["choices"][0]["message"]["content"] == answer


def test_with_logprobs_each_box_scores_how_sure_the_model_was_of_its_tokens(tiny_model_dir, demo):
    from worker.engine.types import TokenLogprob

    tok = QwenTokenizer.from_model_dir(tiny_model_dir)
    ids = [tok.ref_start_id, *tok.encode("女生"), tok.ref_end_id, tok.box_start_id,
           *tok.encode("(441,382),(733,811)"), tok.box_end_id]
    first = ids.index(tok.box_start_id)
    box_tokens = ids[first:]
    unsure = {first + 1, first + 2}  # the box's second and third tokens
    entries = [TokenLogprob(i, -0.7 if k in unsure else -0.01) for k, i in enumerate(ids)]
    decoder, spans, at = tok.stream_decoder(), [], 0
    for i in ids:  # the characters each token wrote, as the engine's sequence counts them
        piece = decoder.feed(i)
        spans.append((at, at + len(piece)))
        at += len(piece)
    answer = "<ref>女生</ref><box>(441,382),(733,811)</box>"
    assert at == len(answer)
    chat = ChatEngine(settings(tiny_model_dir), tok, FixedAnswer(answer, entries, spans))
    result = chat.submit(parse_chat_request(one_image("输出女生的检测框。", logprobs=True)), [demo],
                         request_id="s").result(timeout=5)
    [box] = result["boxes"]
    expected = math.exp((2 * -0.7 + (len(box_tokens) - 2) * -0.01) / len(box_tokens))
    assert box["score"] == pytest.approx(expected, abs=1e-6)
    plain = chat.submit(parse_chat_request(one_image("输出女生的检测框。")), [demo], request_id="p").result(timeout=5)
    assert "score" not in plain["boxes"][0]


def test_int8_quantization_serves_through_the_torch_backend(tiny_model_dir):
    from worker.engine.model.quant import Int8Linear

    chat = ChatEngine.from_settings(settings(tiny_model_dir, quantization="int8"))
    try:
        assert chat.engine.quantization == "int8"
        assert isinstance(chat.engine.runner.model.model.lm_head, Int8Linear)
        result = chat.submit(parse_chat_request(text_only(max_tokens=3)), [], request_id="q").result(timeout=60)
        assert result["usage"]["completion_tokens"] >= 1
    finally:
        chat.close()
