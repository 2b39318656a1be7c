"""tiktoken_to_hf: the written tokenizer.json gives tiktoken's ids, through `tokenizers` and QwenTokenizer."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import tiktoken
from tokenizers import Tokenizer

from engine_build.tiktoken_to_hf import MANIFEST_FILE, convert, main, reconstruct_merges
from engine_build.tiny_vocab import write_tiny_vocab
from worker.engine.tokenizer import PAT_STR, SPECIAL_TOKENS, QwenTokenizer, load_tiktoken_ranks

REPO = Path(__file__).resolve().parents[2]

CORPUS = [
    "这是什么",
    "图中是一名女子在沙滩上和狗玩耍，旁边的狗是一只拉布拉多犬，它们处于沙滩上。",
    "<ref>女生</ref><box>(441,382),(733,811)</box>",
    "The quick brown fox jumps over the lazy dog. It's, they'RE, we've, I'M, you'll, he'd.",
    "def main(argv):\n    for i in range(10):\n        print(f\"{i:>4}\")  # 注释\n\treturn {'a': [1, 2.5e-3]}\n",
    "    leading spaces, trailing spaces    \n\n\n\t\t mixed \r\n\r\n   \u3000全角空格\u00a0nbsp",
    "Numbers: 0 7 42 1234567890 3.14159 -2e10 ١٢٣ ١٢٣٤ 一二三 ①②③ ＡＢＣ１２３",
    "emoji 🫠🪿🧌🥹 👨‍👩‍👧 🇨🇳 ✅❤️‍🔥 a🦙b",
    "rare 𠀀𪚥龘靐齉 and combining e\u0301 a\u0308 (NFC folds them)",
    "mixed中英文混排English和中文、标点「引号」（括号）……——",
    "<|im_start|>user\nPicture 1: <img>https://x/y.jpg</img>\n<|im_end|><|endoftext|><|extra_7|>",
    "",
    " ",
    "\n",
    "a" * 300 + " " * 50 + "!" * 40,
]


def _fuzz(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabet = list("abcXYZ 019 \n\t\r.,;:'\"!?()[]{}<>|_-+=*/\\&^%$#@~`") + list("你好世界中文的一是了我不人在") + [
        "🫠", "🦙", "👨‍👩‍👧", "é", "e\u0301", "\u3000", "\u00a0", "ﬁ", "𠀀", "１２", "'s", "'LL",
    ]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def real_hf_dir(qwen_tiktoken: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hf-tokenizer")
    convert(qwen_tiktoken, out)
    return out


@pytest.fixture(scope="module")
def real_tiktoken(qwen_tiktoken: Path) -> tiktoken.Encoding:
    ranks = load_tiktoken_ranks(qwen_tiktoken)
    return tiktoken.Encoding("qwen-reference", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens={})


def test_hf_tokenizer_gives_tiktokens_ids_on_a_varied_corpus(real_hf_dir: Path, real_tiktoken: tiktoken.Encoding) -> None:
    hf = Tokenizer.from_file(str(real_hf_dir / "tokenizer.json"))
    plain = [t for t in CORPUS if not any(name in t for name in SPECIAL_TOKENS)]  # `tokenizers` splits those
    for text in plain + _fuzz(1500):
        expected = real_tiktoken.encode_ordinary(unicodedata.normalize("NFC", text))
        assert hf.encode(text, add_special_tokens=False).ids == expected, text


def test_hf_tokenizer_maps_special_token_text_to_the_official_ids(real_hf_dir: Path) -> None:
    # What a TensorRT-LLM deployment that tokenises a whole prompt string relies on.
    hf = Tokenizer.from_file(str(real_hf_dir / "tokenizer.json"))
    ids = hf.encode("<|im_start|>user\n<img></img><imgpad><|im_end|>", add_special_tokens=False).ids
    assert ids == [151644, 872, 198, 151857, 151858, 151859, 151645]
    assert hf.decode([151851, 151853], skip_special_tokens=False) == "<ref><box>"


def test_qwen_tokenizer_reads_the_written_json_with_identical_ids(real_hf_dir: Path, qwen_tiktoken: Path) -> None:
    from_json = QwenTokenizer.from_model_dir(real_hf_dir)
    from_tiktoken = QwenTokenizer.from_file(qwen_tiktoken)
    assert from_json.source.name == "tokenizer.json"
    assert (from_json.n_ranks, from_json.n_vocab) == (151643, 151860)
    assert from_json.stop_token_ids == from_tiktoken.stop_token_ids
    assert from_json.img_start_id == 151857
    for text in CORPUS + _fuzz(300, seed=1):
        ids = from_json.encode(text)
        assert ids == from_tiktoken.encode(text), text
        assert from_json.decode(ids) == from_tiktoken.decode(ids)


def test_manifest_names_source_counts_and_versions(real_hf_dir: Path, qwen_tiktoken: Path) -> None:
    import hashlib

    manifest = json.loads((real_hf_dir / MANIFEST_FILE).read_text())
    assert manifest["source"]["sha256"] == hashlib.sha256(qwen_tiktoken.read_bytes()).hexdigest()
    assert manifest["counts"] == {
        "ranks": 151643, "merges": 151387, "unreachable_tokens": 0, "special_tokens": 217, "vocab": 151860,
    }
    assert manifest["versions"]["tokenizers"] and manifest["versions"]["tiktoken"]
    config = json.loads((real_hf_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["eos_token"] == "<|endoftext|>"


def test_tiny_vocabulary_converts_with_identical_ids(tmp_path: Path) -> None:
    vocab = write_tiny_vocab(tmp_path / "tiny.tiktoken")
    convert(vocab, tmp_path / "hf")
    from_json = QwenTokenizer.from_file(tmp_path / "hf" / "tokenizer.json")
    from_tiktoken = QwenTokenizer.from_file(vocab)
    assert from_json.n_vocab == from_tiktoken.n_vocab == 256 + 400 + 217
    for text in CORPUS + _fuzz(300, seed=2):
        assert from_json.encode(text) == from_tiktoken.encode(text), text


def test_merges_follow_tiktokens_merge_order() -> None:
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"ab", b"bc", b"abc", b"abcd"):
        ranks[token] = len(ranks)
    merges, unreachable = reconstruct_merges(ranks)
    # "abc": tiktoken merges a+b first ("ab" ranks below "bc"), so the merge is ab + c
    assert merges == [(b"a", b"b"), (b"b", b"c"), (b"ab", b"c"), (b"abc", b"d")]
    assert unreachable == 0


def test_a_token_no_merge_reaches_is_counted_not_merged() -> None:
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"xyz"] = 256  # no "xy" or "yz": tiktoken only yields it for a whole "xyz" piece
    assert reconstruct_merges(ranks) == ([], 1)


def test_existing_files_are_kept_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    vocab = write_tiny_vocab(tmp_path / "tiny.tiktoken")
    assert main(["--tiktoken", str(vocab), "--out", str(tmp_path / "hf"), "--no-progress"]) == 0
    assert "merges" in capsys.readouterr().out
    assert main(["--tiktoken", str(vocab), "--out", str(tmp_path / "hf"), "--no-progress"]) == 1
    assert "--force" in capsys.readouterr().err
    assert main(["--tiktoken", str(vocab), "--out", str(tmp_path / "hf"), "--force", "--no-progress"]) == 0


def test_a_bad_source_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.tiktoken"
    bad.write_text("not a vocabulary\n")
    assert main(["--tiktoken", str(bad), "--out", str(tmp_path / "hf")]) == 1
    assert "tiktoken BPE line" in capsys.readouterr().err


def test_help_describes_the_command() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "engine_build.tiktoken_to_hf", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "--tiktoken" in out.stdout and "--out" in out.stdout and "tokenizer.json" in out.stdout
