from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors import safe_open

from engine_build import tiny_model
from engine_build.manifest import read_manifest
from worker.engine.model import QwenVL, QwenVLArgs, load_model
from worker.engine.tokenizer import QwenTokenizer


def keys(tree: dict, prefix: str = "") -> set[str]:
    out = set()
    for key, value in tree.items():
        out.add(prefix + key)
        if isinstance(value, dict):
            out |= keys(value, f"{prefix}{key}.")
    return out


def normalise(name: str) -> str:
    return re.sub(r"\.(h|resblocks)\.\d+\.", r".\1.N.", name)


def test_tiny_config_has_the_real_keys_and_vision_geometry(tiny_model_dir, shared_data):
    real = json.loads((shared_data / "qwen-vl" / "config.json").read_text())
    tiny = json.loads((tiny_model_dir / "config.json").read_text())
    assert keys(tiny) == keys(real)
    for key in ("image_size", "patch_size", "image_start_id"):
        assert tiny["visual"][key] == real["visual"][key]
    for key in ("vocab_size", "seq_length", "rotary_emb_base", "use_dynamic_ntk", "use_logn_attn", "auto_map"):
        assert tiny[key] == real[key]
    assert tiny["hidden_size"] % 128 == 0 and tiny["hidden_size"] < real["hidden_size"]
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    real_generation = json.loads((shared_data / "qwen-vl" / "generation_config.json").read_text())
    assert generation == real_generation


def test_tiny_weights_have_the_real_architectures_names(tiny_model_dir, shared_data):
    with torch.device("meta"):
        real = QwenVL(QwenVLArgs.from_hf_config(shared_data / "qwen-vl"))
    with safe_open(str(tiny_model_dir / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
        dtypes = {f.get_slice(n).get_dtype() for n in names}
    assert {normalise(n) for n in names} == {normalise(n) for n in real.state_dict()}
    assert dtypes == {"BF16"}
    size = sum(p.stat().st_size for p in tiny_model_dir.iterdir())
    assert size < 100e6


def test_tiny_folder_loads_and_answers_with_varied_tokens(tiny_model_dir, sample_images):
    from PIL import Image

    from worker.engine.model import preprocess_image

    model = load_model(tiny_model_dir, "cpu", torch.float32)
    tokenizer = QwenTokenizer.from_model_dir(tiny_model_dir)
    assert model.args.llm.vocab_size >= tokenizer.n_vocab
    assert model.args.vision.image_start_id == tokenizer.img_start_id
    ids = ([tokenizer.im_start_id] + tokenizer.encode("user\nPicture 1: ") + [tokenizer.img_start_id]
           + [tokenizer.imgpad_id] * 256 + [tokenizer.img_end_id] + tokenizer.encode("\n这是什么")
           + [tokenizer.im_end_id] + tokenizer.encode("\n") + [tokenizer.im_start_id] + tokenizer.encode("assistant\n"))
    slot = ids.index(tokenizer.imgpad_id)
    features = model.encode_images(preprocess_image(Image.open(sample_images / "demo.jpeg"))[None])
    model.setup_cache(1, len(ids) + 20)
    logits = model.prefill(torch.tensor(ids), 0, features, [slot])
    answer = []
    for i in range(20):
        answer.append(int(logits.argmax()))
        logits = model.decode(torch.tensor(answer[-1:]), torch.tensor([len(ids) + i]), torch.tensor([0]))[0]
    assert len(set(answer)) >= 10, answer


def test_the_tiny_vocabulary_sizes_the_embedding_to_cover_its_specials(tmp_path):
    out = tiny_model.write_tiny_model(tmp_path / "tiny", seed=0)
    tokenizer = QwenTokenizer.from_model_dir(out)
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] % 128 == 0 and tokenizer.n_vocab <= config["vocab_size"] < tokenizer.n_vocab + 128
    assert config["visual"]["image_start_id"] == tokenizer.img_start_id
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == tokenizer.endoftext_id
    manifest = read_manifest(out)
    assert manifest.step == "tiny_model"
    assert manifest.build["weights"] == "random" and manifest.build["seed"] == 0
    load_model(out, "cpu")


def test_the_same_seed_writes_the_same_weights_and_another_seed_does_not(tmp_path):
    def weights(seed: int, name: str) -> bytes:
        return (tiny_model.write_tiny_model(tmp_path / name, seed=seed) / "model.safetensors").read_bytes()

    assert weights(5, "a") == weights(5, "b")
    assert weights(5, "a") != weights(6, "c")


def test_command_line_writes_a_folder(tmp_path, capsys, qwen_tiktoken):
    tiny_model.main(["--out", str(tmp_path / "cli"), "--tokenizer", str(qwen_tiktoken), "--seed", "2"])
    assert "seed 2" in capsys.readouterr().out
    config = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert config["vocab_size"] == 151936
    assert (tmp_path / "cli" / "qwen.tiktoken").read_bytes() == qwen_tiktoken.read_bytes()


def test_command_line_refuses_a_missing_tokenizer(tmp_path):
    with pytest.raises(SystemExit):
        tiny_model.main(["--out", str(tmp_path / "x"), "--tokenizer", str(tmp_path / "none.tiktoken")])


# -- teaching ---------------------------------------------------------------------------------------

GROUNDING_ANSWER = "<ref>女生</ref><box>(441,382),(733,811)</box>"
FIRST_ANSWER = "图中是一名女子在沙滩上和狗玩耍，旁边的狗是一只拉布拉多犬，它们处于沙滩上。"


def chat(image_url: str, *turns: str) -> dict:
    """A chat request: the image and the first user text, then alternating assistant/user turns."""
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_url}},
                                             {"type": "text", "text": turns[0]}]}]
    for i, text in enumerate(turns[1:]):
        messages.append({"role": "assistant" if i % 2 == 0 else "user", "content": text})
    return {"model": "tiny", "messages": messages}


def greedy_answer(model_dir, request: dict, base_dir) -> tuple[list[int], str]:
    """Greedy decoding through prefill/decode until a stop token; returns ids (stop included) and text."""
    from PIL import Image

    from producer.schema import parse_chat_request
    from worker.engine.model import preprocess_images
    from worker.engine.prompt import build_prompt

    model = load_model(model_dir, "cpu", torch.float32)
    tokenizer = QwenTokenizer.from_model_dir(model_dir)
    prompt = build_prompt(parse_chat_request(tiny_model._file_urls(request)), tokenizer)  # teaching's bare paths too
    paths = [base_dir / url.removeprefix("file://") for url in prompt.image_urls]
    features = model.encode_images(preprocess_images([Image.open(p) for p in paths]))
    model.setup_cache(1, len(prompt.ids) + 64)
    logits = model.prefill(torch.tensor(prompt.ids), 0, features, prompt.image_slots)
    ids: list[int] = []
    while len(ids) < 64:
        ids.append(int(logits.argmax()))
        if ids[-1] in tokenizer.stop_token_ids:
            break
        logits = model.decode(torch.tensor(ids[-1:]), torch.tensor([len(prompt.ids) + len(ids) - 1]),
                              torch.tensor([0]))[0]
    return ids, tokenizer.decode(ids)


def test_teaching_makes_the_tiny_model_answer_a_grounding_request(tmp_path, qwen_tiktoken, sample_images):
    out = tiny_model.write_tiny_model(tmp_path / "taught", tokenizer=qwen_tiktoken, seed=0)
    grounding = chat("file://demo.jpeg", "这是什么", FIRST_ANSWER, "输出女生的检测框。")
    first = chat(str(sample_images / "demo.jpeg"), "这是什么")
    tokenizer = QwenTokenizer.from_model_dir(out)
    assert greedy_answer(out, grounding, sample_images)[1] != GROUNDING_ANSWER

    steps = tiny_model.teach(out, [{"request": grounding, "answer": GROUNDING_ANSWER},
                                   {"request": first, "answer": FIRST_ANSWER}], base_dir=sample_images)

    ids, text = greedy_answer(out, grounding, sample_images)
    assert text == GROUNDING_ANSWER
    assert ids == tiny_model.answer_ids(tokenizer, GROUNDING_ANSWER)
    assert ids[0] == tokenizer.ref_start_id and ids[-1] == tokenizer.im_end_id  # real special tokens
    assert greedy_answer(out, first, sample_images)[1] == FIRST_ANSWER
    taught = read_manifest(out).build["taught"]
    assert taught[0]["answers"] == [GROUNDING_ANSWER, FIRST_ANSWER] and taught[0]["steps"] == steps


def test_teach_flag_reads_examples_with_image_paths_relative_to_the_file(tmp_path, capsys):
    from PIL import Image

    (tmp_path / "pics").mkdir()
    Image.new("RGB", (64, 48), (200, 30, 90)).save(tmp_path / "pics" / "red.png")
    examples = tmp_path / "examples.jsonl"
    request = chat("pics/red.png", "What colour is this?")
    examples.write_text(json.dumps({"request": request, "answer": "Red, <ref>all of it</ref>."}) + "\n\n")

    tiny_model.main(["--out", str(tmp_path / "m"), "--teach", str(examples)])

    assert "taught 1 example(s)" in capsys.readouterr().out
    assert greedy_answer(tmp_path / "m", request, tmp_path)[1] == "Red, <ref>all of it</ref>."


def test_bad_teaching_files_are_refused_with_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"request": {}, "answer": "x"}\n{not json}\n')
    with pytest.raises(SystemExit):
        tiny_model.main(["--out", str(tmp_path / "m"), "--teach", str(bad)])
    assert "bad.jsonl:2 is not JSON" in capsys.readouterr().err
    bad.write_text('{"answer": "x"}\n')
    with pytest.raises(SystemExit):
        tiny_model.main(["--out", str(tmp_path / "m"), "--teach", str(bad)])
    assert 'bad.jsonl:1: expected {"request"' in capsys.readouterr().err
