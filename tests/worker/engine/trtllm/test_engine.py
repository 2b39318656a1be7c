"""The TensorRT-LLM engine: refusal without TensorRT-LLM, and its scheduling against a scripted executor.

TensorRT-LLM cannot run here, so :class:`ScriptedExecutor` stands in for its executor with the
behaviour the engine relies on (streaming one token per request per step, stop words kept in the
output, ``max_tokens`` -> LENGTH, cancel -> a final CANCELLED response, errors per request). The
vision side is real: :class:`VisionFeatures` over the tiny checkpoint's PyTorch vision tower. The
same scripts drive the torch engine, so both backends must give identical results. The last
test runs the real engine pair where ``tensorrt_llm`` imports (``-m trtllm``).
"""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path

import pytest
import torch

from producer.config import EngineSettings
from producer.errors import DeadlineExceeded, EngineError, EngineUnavailable, JobCancelled, PromptTooLong
from worker.engine.engine import TorchEngine
from worker.engine.trtllm import TrtllmEngine
from worker.engine.trtllm.engine import LlmOutput, missing_requirements, read_engine_limits
from worker.engine.trtllm.requests import EngineLimits, LlmRequestSpec
from worker.engine.trtllm.vision import VisionFeatures
from worker.engine.types import GenerationRequest, ImageInput, SamplingParams

IM_END = 258  # byte tokenizer: <|endoftext|> 256, <|im_start|> 257, <|im_end|> 258
STOPS = (IM_END, 257, 256)
VOCAB = 512


def spell(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def answer(text: str, end: int = IM_END):
    """A script that spells ``text`` byte by byte, then ``end``."""
    ids = spell(text)

    def script(prompt: list[int], out: list[int]) -> int:
        return ids[len(out)] if len(out) < len(ids) else end

    return script


def x_times_first_prompt_id(prompt: list[int], out: list[int]) -> int:
    return ord("x") if len(out) < prompt[0] else IM_END


def greedy(max_tokens: int = 50, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=STOPS, **kw)


class ScriptedExecutor:
    """TensorRT-LLM's executor as the engine sees it (see the module docstring)."""

    def __init__(self, script, *, drop_stop_token: bool = False, fail=None) -> None:
        self.script = script
        self.drop_stop_token = drop_stop_token
        self.fail = fail or (lambda spec: False)
        self.ids = itertools.count(1)
        self.live: dict[int, dict] = {}
        self.enqueued: list[tuple[LlmRequestSpec, torch.Tensor | None]] = []
        self.cancelled: list[int] = []
        self.max_live = 0
        self.closed = False

    def enqueue(self, spec: LlmRequestSpec, table) -> int:
        llm_id = next(self.ids)
        self.live[llm_id] = {"spec": spec, "out": [], "cancel": False}
        self.enqueued.append((spec, table))
        self.max_live = max(self.max_live, len(self.live))
        return llm_id

    def poll(self, timeout_s: float) -> list[LlmOutput]:
        outputs = []
        for llm_id, state in list(self.live.items()):
            spec = state["spec"]
            if state["cancel"]:
                outputs.append(LlmOutput(llm_id, [], True, "cancelled"))
            elif self.fail(spec):
                outputs.append(LlmOutput(llm_id, [], True, error="CUDA error: an illegal memory access"))
            else:
                token = self.script(spec.input_ids, state["out"])
                state["out"].append(token)
                if [token] in spec.stop_words:
                    outputs.append(LlmOutput(llm_id, [] if self.drop_stop_token else [token], True, "stop"))
                elif len(state["out"]) >= spec.max_tokens:
                    outputs.append(LlmOutput(llm_id, [token], True, "length"))
                else:
                    outputs.append(LlmOutput(llm_id, [token], False))
                    continue
            del self.live[llm_id]
        return outputs

    def cancel(self, llm_id: int) -> None:
        self.cancelled.append(llm_id)
        if llm_id in self.live:
            self.live[llm_id]["cancel"] = True

    def close(self) -> None:
        self.closed = True


def drain(engine, limit: int = 2000) -> None:
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < limit, "engine does not finish"


@pytest.fixture
def make_engine(byte_tokenizer):
    engines = []

    def make(script_or_executor, *, max_batch_size=2, max_seq_len=64, vision=None, start=False):
        llm = (script_or_executor if isinstance(script_or_executor, ScriptedExecutor)
               else ScriptedExecutor(script_or_executor))
        limits = EngineLimits(vocab_size=VOCAB, max_batch_size=max_batch_size, max_input_len=max_seq_len - 1,
                              max_seq_len=max_seq_len, max_prompt_rows=max_batch_size * 4 * 256, max_images=4)
        engine = TrtllmEngine(vision, llm, byte_tokenizer, limits, start=start)
        engines.append(engine)
        return engine, llm

    yield make
    for engine in engines:
        engine.close()


# -- the worker refuses to start without TensorRT-LLM or the engine files -------------------------


def _engine_config(max_prompt_rows: int = 13312) -> dict:
    """What trtllm-build writes into ENGINE_DIR/llm/config.json (the parts vlq reads)."""
    return {
        "version": "0.16.0",
        "pretrained_config": {"architecture": "QWenForCausalLM", "dtype": "bfloat16", "vocab_size": 151936},
        "build_config": {"max_batch_size": 2, "max_input_len": 30720, "max_seq_len": 32768,
                         "max_num_tokens": 32768, "max_prompt_embedding_table_size": max_prompt_rows},
    }


def _engine_dir(root: Path, max_prompt_rows: int = 13312) -> Path:
    (root / "llm").mkdir(parents=True)
    (root / "llm" / "config.json").write_text(json.dumps(_engine_config(max_prompt_rows)))
    (root / "llm" / "rank0.engine").write_bytes(b"\0")
    (root / "vision").mkdir()
    (root / "vision" / "vision.plan").write_bytes(b"\0")
    return root


needs_no_trtllm = pytest.mark.skipif(missing_requirements(None)[0].startswith("engine.engine_dir"),
                                     reason="TensorRT-LLM and TensorRT are installed here")


@needs_no_trtllm
def test_without_tensorrt_llm_or_engines_the_backend_refuses_naming_every_missing_piece(byte_tokenizer,
                                                                                       tmp_path: Path):
    settings = EngineSettings(backend="trtllm", engine_dir=tmp_path / "engines", model_dir=tmp_path / "hf")
    with pytest.raises(EngineUnavailable) as info:
        TrtllmEngine.from_settings(settings, byte_tokenizer)
    message = info.value.message
    assert info.value.code == "engine_unavailable"
    assert "TensorRT-LLM is not importable" in message and "pip install tensorrt_llm==0.16.0" in message
    assert f"no LLM engine in {tmp_path / 'engines' / 'llm'}" in message
    assert f"python -m engine_build.convert_checkpoint --model-dir {tmp_path / 'hf'}" in message
    assert "python -m engine_build.build_llm" in message and "python -m engine_build.build_vit" in message
    assert "engine.backend: torch" in message
    assert len(info.value.context["problems"]) == 4  # tensorrt_llm, tensorrt, llm engine, vision engine


@needs_no_trtllm
def test_with_the_engine_files_built_only_the_missing_packages_are_named(byte_tokenizer, tmp_path: Path):
    settings = EngineSettings(backend="trtllm", engine_dir=_engine_dir(tmp_path / "engines"))
    with pytest.raises(EngineUnavailable) as info:
        TrtllmEngine.from_settings(settings, byte_tokenizer)
    problems = info.value.context["problems"]
    assert [p.split(" is not importable")[0] for p in problems] == ["TensorRT-LLM", "TensorRT"]


def test_an_unset_engine_dir_or_a_cpu_device_is_named(byte_tokenizer):
    with pytest.raises(EngineUnavailable) as info:
        TrtllmEngine.from_settings(EngineSettings(backend="trtllm", device="cpu"), byte_tokenizer)
    assert "engine.engine_dir is not set" in info.value.message
    assert "engine.device is cpu" in info.value.message


def test_the_engines_limits_come_from_trtllm_builds_config(tmp_path: Path):
    limits, dtype = read_engine_limits(_engine_dir(tmp_path) / "llm", max_images=26)
    assert limits == EngineLimits(vocab_size=151936, max_batch_size=2, max_input_len=30720, max_seq_len=32768,
                                  max_prompt_rows=13312, max_images=26)
    assert limits.rows_per_request == 26 * 256 and dtype == "bfloat16"


def test_an_engine_built_without_a_prompt_table_is_refused(tmp_path: Path):
    with pytest.raises(EngineUnavailable, match="without a prompt table"):
        read_engine_limits(_engine_dir(tmp_path, max_prompt_rows=0) / "llm", max_images=26)


class _FakeVit:
    def __init__(self, plan_path, device):
        self.plan_path, self.device, self.max_batch = plan_path, device, 26


class _FakeExecutor(ScriptedExecutor):
    def __init__(self, llm_dir, *, max_batch_size, device_id):
        super().__init__(answer("x"))
        self.llm_dir, self.max_batch_size, self.device_id = llm_dir, max_batch_size, device_id


@pytest.fixture
def wired(monkeypatch: pytest.MonkeyPatch):
    """from_settings with TensorRT's two adapters replaced: checks the wiring around them."""
    import worker.engine.trtllm.engine as engine_module
    import worker.engine.trtllm.vision as vision_module

    monkeypatch.setattr(engine_module, "missing_requirements", lambda *args: [])
    monkeypatch.setattr(engine_module, "TrtllmExecutor", _FakeExecutor)
    monkeypatch.setattr(vision_module, "TrtVisionEngine", _FakeVit)


def test_from_settings_wires_the_engine_pair_within_the_workers_limits(wired, qwen_tiktoken, tmp_path: Path):
    from worker.engine.tokenizer import QwenTokenizer

    engines = _engine_dir(tmp_path / "engines")
    settings = EngineSettings(backend="trtllm", engine_dir=engines, device="cuda:1", max_batch_size=4,
                              max_input_len=8000, max_seq_len=10000, feature_cache_images=5)
    engine = TrtllmEngine.from_settings(settings, QwenTokenizer.from_file(qwen_tiktoken))
    try:
        assert engine.max_batch_size == 2  # the LLM engine was built for 2
        assert engine.limits.max_input_len == 8000 and engine.limits.max_seq_len == 10000
        assert engine.limits.vocab_size == 151936 and engine.pad_id == 151643
        assert engine.llm.llm_dir == engines / "llm" and engine.llm.device_id == 1
        assert engine.llm.max_batch_size == 2
        assert engine.vision.encoder.plan_path == engines / "vision" / "vision.plan"
        assert engine.vision.max_batch == 26 and engine.vision.dtype == torch.bfloat16
        assert str(engine.vision.device) == "cuda:1" and engine.vision.cache.capacity == 5
    finally:
        engine.close()


def test_an_engine_built_from_another_model_is_refused(wired, byte_tokenizer, tmp_path: Path):
    engines = _engine_dir(tmp_path / "engines")
    config = json.loads((engines / "llm" / "config.json").read_text())
    config["pretrained_config"]["vocab_size"] = 128  # fewer rows than the tokenizer has tokens
    (engines / "llm" / "config.json").write_text(json.dumps(config))
    with pytest.raises(EngineUnavailable, match="built from another model"):
        TrtllmEngine.from_settings(EngineSettings(backend="trtllm", engine_dir=engines), byte_tokenizer)


# -- same results as the torch engine ------------------------------------------------------------


@pytest.mark.parametrize("script, sampling", [
    (answer("hello"), greedy()),  # stop token: counted, not in the text
    (answer("hello world, longer"), greedy(max_tokens=7)),  # max_tokens: finish_reason length
    (answer("say STOP now"), greedy(stop=("STOP",))),  # stop string: cut from the text
    (answer("é漢字🙂"), greedy()),  # multi-byte characters split across tokens
    (answer("ab", end=ord("c")), greedy(max_tokens=60)),  # clipped by max_seq_len
    (answer("abc"), greedy(max_tokens=5, ignore_stop=True)),  # stops ignored
])
def test_results_match_the_torch_engine_for_the_same_model_answers(make_engine, byte_tokenizer, scripted_model,
                                                                   script, sampling):
    prompt = [3, 10, 20, 30]
    trt, _ = make_engine(script)
    ft = trt.submit(GenerationRequest("a", prompt, sampling=sampling))
    drain(trt)
    torch_engine = TorchEngine(scripted_model(script), byte_tokenizer, max_batch_size=2, max_seq_len=64, start=False)
    try:
        fr = torch_engine.submit(GenerationRequest("a", prompt, sampling=sampling))
        drain(torch_engine)
        got, want = ft.result(0), fr.result(0)
    finally:
        torch_engine.close()
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
    assert (got.prompt_tokens, got.completion_tokens) == (want.prompt_tokens, want.completion_tokens)


def test_a_stop_token_is_counted_and_kept_out_of_the_text(make_engine):
    engine, _ = make_engine(answer("hi"))
    future = engine.submit(GenerationRequest("a", [1, 2, 3], sampling=greedy()))
    drain(engine)
    result = future.result(0)
    assert result.text == "hi" and result.token_ids == [*spell("hi"), IM_END]
    assert result.finish_reason == "stop" and result.completion_tokens == 3 and result.prompt_tokens == 3
    assert set(result.timings) == {"queued", "vision", "prefill", "decode", "ttft", "total"}


def test_an_executor_that_drops_the_stop_token_still_has_it_counted(make_engine):
    engine, _ = make_engine(ScriptedExecutor(answer("hi"), drop_stop_token=True))
    future = engine.submit(GenerationRequest("a", [1, 2, 3], sampling=greedy()))
    drain(engine)
    assert future.result(0).token_ids == [*spell("hi"), IM_END]
    assert future.result(0).finish_reason == "stop"


def test_a_stop_string_cancels_the_request_in_the_executor(make_engine):
    engine, llm = make_engine(answer("one, two, three"))
    future = engine.submit(GenerationRequest("a", [1], sampling=greedy(stop=(", t",))))
    drain(engine)
    assert future.result(0).text == "one" and future.result(0).finish_reason == "stop"
    assert llm.cancelled == [1] and not llm.live


def test_the_executor_gets_the_requests_stop_words_sampling_and_clipped_max_tokens(make_engine):
    engine, llm = make_engine(answer("x"), max_seq_len=40)
    engine.submit(GenerationRequest("a", [5] * 10, sampling=SamplingParams(
        max_tokens=100, temperature=0.8, top_p=0.5, seed=7, stop_token_ids=STOPS)))
    drain(engine)
    spec, table = llm.enqueued[0]
    assert spec.max_tokens == 30 and spec.stop_words == [[IM_END], [257], [256]]
    assert spec.sampling == {"beam_width": 1, "seed": 7, "temperature": 0.8, "top_p": 0.5}
    assert spec.pad_id == 256 and table is None and spec.extra_ids is None


# -- in-flight batching ---------------------------------------------------------------------------


def test_at_most_max_batch_size_requests_are_in_flight_and_a_freed_slot_is_reused(make_engine):
    engine, llm = make_engine(x_times_first_prompt_id, max_batch_size=2)
    futures = [engine.submit(GenerationRequest(f"r{i}", [n], sampling=greedy())) for i, n in enumerate([1, 6, 2, 3, 1])]
    engine.step()
    assert engine.in_flight == 2 and len(llm.enqueued) == 2
    drain(engine)
    assert llm.max_live == 2
    assert [f.result(0).text for f in futures] == ["x", "xxxxxx", "xx", "xxx", "x"]
    # r2 was admitted as soon as r0 (one token) finished, long before r1 (six) did
    order = [spec.request_id for spec, _ in llm.enqueued]
    assert order == ["r0", "r1", "r2", "r3", "r4"]


def test_requests_run_concurrently_on_the_engine_thread(make_engine):
    engine, llm = make_engine(x_times_first_prompt_id, max_batch_size=2, start=True)
    futures = [engine.submit(GenerationRequest(f"r{i}", [i + 1], sampling=greedy())) for i in range(6)]
    assert [f.result(timeout=10).text for f in futures] == ["x" * (i + 1) for i in range(6)]
    assert llm.max_live <= 2


# -- images ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_vision(tiny_model_dir: Path):
    from worker.engine.model import load_model

    model = load_model(tiny_model_dir, dtype=torch.float32)
    calls = []

    def encoder(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(pixels.shape[0])
        return model.encode_images(pixels)

    return model, encoder, calls


def _pixels(seed: int) -> torch.Tensor:
    return torch.randn(3, 448, 448, generator=torch.Generator().manual_seed(seed))


def test_images_become_the_prompt_table_in_order_with_fake_ids_and_content_extra_ids(make_engine, tiny_vision):
    model, encoder, _ = tiny_vision
    vision = VisionFeatures(encoder, max_batch=26, device="cpu", dtype=torch.float32, cache_images=0)
    engine, llm = make_engine(answer("ok"), max_seq_len=1024, vision=vision)
    images = [ImageInput(_pixels(1), key="a"), ImageInput(_pixels(2), key="b")]
    prompt = [1] * 5 + [7] * 256 + [2] * 3 + [7] * 256 + [3] * 4
    future = engine.submit(GenerationRequest("img", prompt, image_slots=[5, 264], images=images, sampling=greedy()))
    drain(engine)
    assert future.result(0).text == "ok" and future.result(0).prompt_tokens == len(prompt)
    spec, table = llm.enqueued[0]
    assert spec.input_ids[5:261] == list(range(VOCAB, VOCAB + 256))
    assert spec.input_ids[264:520] == list(range(VOCAB + 256, VOCAB + 512))
    assert spec.input_ids[:5] == [1] * 5 and spec.input_ids[261:264] == [2] * 3
    with torch.no_grad():
        expected = model.encode_images(torch.stack([images[0].pixels, images[1].pixels]))  # [2, 256, hidden]
    assert table.shape == (512, model.args.llm.hidden_size)
    assert torch.allclose(table, expected.reshape(512, -1), atol=1e-5)
    assert spec.extra_ids[5] == spec.extra_ids[260] != spec.extra_ids[264] != 0
    assert spec.extra_ids[:5] == [0] * 5 and spec.image_rows == 512


def test_vision_features_are_cached_by_image_content_and_encoded_in_chunks(make_engine, tiny_vision):
    _, encoder, calls = tiny_vision
    vision = VisionFeatures(encoder, max_batch=2, device="cpu", dtype=torch.float32, cache_images=8)
    engine, llm = make_engine(answer("ok"), max_seq_len=2048, vision=vision)
    calls.clear()
    three = [ImageInput(_pixels(k), key=f"k{k}") for k in range(3)]
    prompt = [1] * (3 * 256 + 4)
    engine.submit(GenerationRequest("a", prompt, image_slots=[1, 257, 513], images=three, sampling=greedy()))
    drain(engine)
    assert calls == [2, 1]  # three new images, at most two per vision call
    engine.submit(GenerationRequest("b", prompt, image_slots=[1, 257, 513], images=list(three), sampling=greedy()))
    drain(engine)
    assert calls == [2, 1]  # all three came from the cache
    assert torch.equal(llm.enqueued[0][1], llm.enqueued[1][1])


# -- aborts, deadlines, faults --------------------------------------------------------------------


def test_aborting_a_waiting_and_a_running_request_raises_job_cancelled(make_engine):
    engine, llm = make_engine(x_times_first_prompt_id, max_batch_size=1)
    running = engine.submit(GenerationRequest("run", [50], sampling=greedy(max_tokens=60)))
    waiting = engine.submit(GenerationRequest("wait", [1], sampling=greedy()))
    engine.step()
    engine.abort("wait")
    engine.abort("run")
    drain(engine)
    for future in (running, waiting):
        with pytest.raises(JobCancelled):
            future.result(0)
    assert llm.cancelled == [1] and len(llm.enqueued) == 1


def test_a_request_id_already_in_the_engine_is_an_engine_error_not_bad_input(make_engine):
    engine, _ = make_engine(x_times_first_prompt_id)
    first = engine.submit(GenerationRequest("same", [2], sampling=greedy()))
    second = engine.submit(GenerationRequest("same", [2], sampling=greedy()))
    drain(engine)
    assert first.result(0).text == "xx"
    with pytest.raises(EngineError, match="already in the engine") as caught:
        second.result(0)
    assert caught.value.code == "engine_error"  # a redelivered job may run again later


def test_a_request_past_its_deadline_fails_with_deadline_exceeded_and_frees_its_slot(make_engine):
    import time

    engine, llm = make_engine(x_times_first_prompt_id, max_batch_size=1)
    late = engine.submit(GenerationRequest("late", [50], sampling=greedy(max_tokens=60),
                                           deadline=time.monotonic() + 0.05))
    after = engine.submit(GenerationRequest("after", [2], sampling=greedy()))
    engine.step()
    time.sleep(0.06)
    drain(engine)
    with pytest.raises(DeadlineExceeded, match="passed its deadline"):
        late.result(0)
    assert after.result(0).text == "xx"


def test_an_executor_error_fails_only_its_request(make_engine):
    llm = ScriptedExecutor(x_times_first_prompt_id, fail=lambda spec: spec.request_id == "bad")
    engine, _ = make_engine(llm)
    bad = engine.submit(GenerationRequest("bad", [2], sampling=greedy()))
    good = engine.submit(GenerationRequest("good", [2], sampling=greedy()))
    drain(engine)
    with pytest.raises(EngineError, match="illegal memory access"):
        bad.result(0)
    assert good.result(0).text == "xx"


def test_a_prompt_too_long_for_the_engine_fails_at_submit(make_engine):
    engine, llm = make_engine(answer("x"), max_seq_len=16)
    with pytest.raises(PromptTooLong):
        engine.submit(GenerationRequest("long", [1] * 20, sampling=greedy())).result(0)
    assert not llm.enqueued


def test_closing_the_engine_fails_unfinished_requests_and_closes_the_executor(make_engine):
    engine, llm = make_engine(x_times_first_prompt_id)
    future = engine.submit(GenerationRequest("a", [40], sampling=greedy()))
    engine.step()
    engine.close()
    with pytest.raises(EngineUnavailable):
        future.result(0)
    assert llm.closed


# -- streaming ------------------------------------------------------------------------------------


def test_on_delta_streams_the_answer_in_order_and_never_the_stop_string(make_engine):
    deltas: list[str] = []
    engine, _ = make_engine(answer("streamed text END more"))
    future = engine.submit(GenerationRequest("s", [1], sampling=greedy(stop=("END",)),
                                             on_delta=lambda text, _: deltas.append(text)))
    drain(engine)
    assert "".join(deltas) == future.result(0).text == "streamed text "
    assert len(deltas) > 3


# -- the real engine pair -------------------------------------------------------------------------


@pytest.mark.trtllm
@pytest.mark.gpu
@pytest.mark.parametrize("weight_only", ["none", "int8"])
def test_the_engine_pair_built_from_the_tiny_checkpoint_answers_like_the_torch_model(tiny_model_dir: Path,
                                                                                      tmp_path: Path,
                                                                                      weight_only: str):
    """Convert, trtllm-build (bf16, the seed's flags with small limits), build the vision engine, then
    run a request with an image through TrtllmEngine and compare the greedy answer with the PyTorch
    model's (on this prompt the tiny model's greedy tokens are the same in bf16 and fp32). With
    int8 the checkpoint holds bf16 weights marked W8A16 and trtllm-build quantises them; the int8
    answer is checked for shape, not for equality."""
    pytest.importorskip("tensorrt_llm", reason="TensorRT-LLM is not installed (pip install tensorrt_llm)")
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    import subprocess
    import sys

    from engine_build import build_vit, convert_checkpoint
    from worker.engine.model import load_model, preprocess_image
    from worker.engine.tokenizer import QwenTokenizer

    repo = Path(__file__).resolve().parents[4]
    engines = tmp_path / "engines"
    convert_checkpoint.run(tiny_model_dir, tmp_path / "ckpt", dtype="bfloat16", weight_only=weight_only,
                           converter="vlq", progress=False)
    subprocess.run([sys.executable, "-m", "engine_build.build_llm", "--checkpoint-dir", str(tmp_path / "ckpt"),
                    "--output-dir", str(engines / "llm"), "--max-input-len", "1024", "--max-seq-len", "1100",
                    "--max-num-tokens", "2048", "--max-images", "2"],
                   cwd=repo, check=True)
    build_vit.run(tiny_model_dir, engines / "vision", dtype="bfloat16", onnx_only=False,
                  profile=build_vit.BatchProfile(1, 1, 2))

    tok = QwenTokenizer.from_model_dir(tiny_model_dir)
    settings = EngineSettings(backend="trtllm", engine_dir=engines, model_dir=tiny_model_dir, max_images=2,
                              max_input_len=1024, max_seq_len=1100)
    engine = TrtllmEngine.from_settings(settings, tok)
    try:
        from PIL import Image

        pixels = preprocess_image(Image.new("RGB", (300, 200), (200, 30, 30)))
        text = tok.encode("Picture 1: ")
        prompt = [tok.im_start_id, *tok.encode("user\n"), *text, tok.img_start_id]
        slot = len(prompt)
        prompt += [tok.imgpad_id] * 256 + [tok.img_end_id, *tok.encode("\nwhat is it?"), tok.im_end_id,
                                           *tok.encode("\n"), tok.im_start_id, *tok.encode("assistant\n")]
        sampling = SamplingParams(max_tokens=4, temperature=0.0, stop_token_ids=tok.stop_token_ids)
        request = GenerationRequest("gpu", prompt, [slot], [ImageInput(pixels, key="red")], sampling)
        result = engine.submit(request).result(timeout=120)

        assert result.prompt_tokens == len(prompt) and 1 <= result.completion_tokens <= 4
        assert all(0 <= t < tok.n_vocab for t in result.token_ids)
        engine_config = json.loads((engines / "llm" / "config.json").read_text())
        quant_algo = engine_config["pretrained_config"]["quantization"]["quant_algo"]
        assert quant_algo == ({"none": None, "int8": "W8A16"}[weight_only])
        if weight_only == "none":
            model = load_model(tiny_model_dir, dtype=torch.float32)
            ids, reference = list(prompt), []
            with torch.no_grad():
                for _ in range(len(result.token_ids)):
                    logits = model(torch.tensor([ids]), pixels[None], [slot])[0, -1]
                    reference.append(int(logits.argmax()))
                    ids.append(reference[-1])
            assert result.token_ids == reference
        # The same image again: KV blocks are reused and the answer is the same.
        again = engine.submit(GenerationRequest("gpu2", prompt, [slot], [ImageInput(pixels, key="red")], sampling))
        assert again.result(timeout=120).token_ids == result.token_ids
    finally:
        engine.close()


def test_concurrent_submits_from_many_threads_all_resolve(make_engine):
    engine, llm = make_engine(x_times_first_prompt_id, max_batch_size=2, start=True)
    results = {}

    def client(i: int) -> None:
        results[i] = engine.submit(GenerationRequest(f"t{i}", [1 + i % 3], sampling=greedy())).result(timeout=10)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {i: r.text for i, r in results.items()} == {i: "x" * (1 + i % 3) for i in range(8)}
