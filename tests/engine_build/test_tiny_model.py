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
