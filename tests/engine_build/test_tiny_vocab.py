"""The tiny checkpoint's own vocabulary: deterministic, tiktoken format, specials after its ranks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from engine_build.tiny_vocab import N_MERGES, train_merges, write_tiny_vocab
from worker.engine.tokenizer import QwenTokenizer, load_tiktoken_ranks

REPO = Path(__file__).resolve().parents[2]


def test_the_vocabulary_is_the_same_on_every_run(tmp_path: Path) -> None:
    a = write_tiny_vocab(tmp_path / "a.tiktoken")
    b = write_tiny_vocab(tmp_path / "b.tiktoken")
    assert a.read_bytes() == b.read_bytes()


def test_it_holds_every_byte_then_the_learned_merges(tmp_path: Path) -> None:
    ranks = load_tiktoken_ranks(write_tiny_vocab(tmp_path / "v.tiktoken"))
    assert len(ranks) == 256 + N_MERGES
    assert all(ranks[bytes([b])] == b for b in range(256))
    merges = train_merges()
    assert [ranks[t] for t in merges] == list(range(256, 256 + N_MERGES))
    assert {"你好".encode(), b" the", b"ass"} & set(merges)  # it learned words of its corpus


def test_a_folder_gets_qwen_tiktoken(tmp_path: Path) -> None:
    assert write_tiny_vocab(tmp_path) == tmp_path / "qwen.tiktoken"
    assert QwenTokenizer.from_model_dir(tmp_path).n_ranks == 256 + N_MERGES


def test_qwen_tokenizer_numbers_the_specials_after_its_ranks(tmp_path: Path) -> None:
    tok = QwenTokenizer.from_file(write_tiny_vocab(tmp_path / "v.tiktoken"))
    n = 256 + N_MERGES
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id) == (n, n + 1, n + 2)
    assert tok.img_start_id == n + 214 and tok.imgpad_id == n + 216 and tok.n_vocab == n + 217


def test_it_encodes_english_chinese_and_unseen_text_losslessly(tmp_path: Path) -> None:
    tok = QwenTokenizer.from_file(write_tiny_vocab(tmp_path / "v.tiktoken"))
    for text in ["You are a helpful assistant.", "这是什么", "(441,382),(733,811)", "unseen ñ 🫠 <img>"]:
        ids = tok.encode(text)
        assert max(ids) < tok.n_ranks
        assert tok.decode(ids) == text
    assert len(tok.encode("You are a helpful assistant.")) < 10  # merges compress, not bytes only


def test_the_command_writes_the_file(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "engine_build.tiny_vocab", "--out", str(tmp_path / "t.tiktoken")],
        cwd=REPO, capture_output=True, text=True,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "t.tiktoken").is_file()
