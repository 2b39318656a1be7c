"""QwenTokenizer with the real qwen.tiktoken: official ids, plain-text encoding, streaming decode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from producer.errors import CheckpointError
from worker.engine.tokenizer import SPECIAL_TOKENS, QwenTokenizer


@pytest.fixture(scope="module")
def tok(qwen_tiktoken: Path) -> QwenTokenizer:
    return QwenTokenizer.from_file(qwen_tiktoken)


def test_special_tokens_have_the_official_ids(tok: QwenTokenizer) -> None:
    assert tok.n_ranks == 151643
    assert tok.n_vocab == 151860
    assert (tok.endoftext_id, tok.im_start_id, tok.im_end_id) == (151643, 151644, 151645)
    assert tok.special_id("<|extra_0|>") == 151646
    assert tok.special_id("<|extra_204|>") == 151850
    assert (tok.ref_start_id, tok.ref_end_id) == (151851, 151852)
    assert (tok.box_start_id, tok.box_end_id) == (151853, 151854)
    assert (tok.quad_start_id, tok.quad_end_id) == (151855, 151856)
    assert (tok.img_start_id, tok.img_end_id, tok.imgpad_id) == (151857, 151858, 151859)
    assert tok.stop_token_ids == (151645, 151644, 151643)
    assert len(SPECIAL_TOKENS) == 3 + 205 + 9


def test_system_preamble_text_encodes_to_the_reference_ids(tok: QwenTokenizer) -> None:
    assert tok.encode("system\nYou are a helpful assistant.") == [8948, 198, 2610, 525, 264, 10950, 17847, 13]
    assert tok.encode("assistant\n") == [77091, 198]


def test_digits_are_single_tokens_as_grounding_needs(tok: QwenTokenizer) -> None:
    ids = tok.encode("(441,382),(733,811)")
    assert len(ids) == 17  # ( 4 4 1 , 3 8 2 ),( 7 3 3 , 8 1 1 )
    assert tok.decode(ids) == "(441,382),(733,811)"


@pytest.mark.parametrize(
    "text",
    ["<img>", "<|im_end|>", "<imgpad>", "<|endoftext|>", "</img><|im_start|>system\n", "<ref>x</ref><box>(1,2),(3,4)</box>"],
)
def test_user_text_never_becomes_special_tokens(tok: QwenTokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids and max(ids) < tok.n_ranks
    assert tok.decode(ids) == text


@pytest.fixture(scope="module")
def tiny_both_backends(tmp_path_factory: pytest.TempPathFactory) -> tuple[QwenTokenizer, QwenTokenizer]:
    from engine_build.tiktoken_to_hf import convert
    from engine_build.tiny_vocab import write_tiny_vocab

    folder = tmp_path_factory.mktemp("tiny-tok")
    vocab = write_tiny_vocab(folder / "qwen.tiktoken")
    convert(vocab, folder / "hf")
    return QwenTokenizer.from_file(vocab), QwenTokenizer.from_file(folder / "hf" / "tokenizer.json")


@pytest.mark.parametrize("text", ["<img>", "<|im_end|>", "<imgpad>", "<|endoftext|>", "a<ref>b</ref><box>(1,2),(3,4)</box>"])
def test_user_text_never_becomes_special_tokens_with_either_backend(
    tiny_both_backends: tuple[QwenTokenizer, QwenTokenizer], text: str
) -> None:
    from_tiktoken, from_json = tiny_both_backends
    assert from_json.source.name == "tokenizer.json"  # whose added tokens `tokenizers` would split out
    for tok in (from_tiktoken, from_json):
        ids = tok.encode(text)
        assert max(ids) < tok.n_ranks
        assert tok.decode(ids) == text
    assert from_json.encode(text) == from_tiktoken.encode(text)


def test_a_tokenizer_json_with_specials_at_other_ids_is_refused(
    tiny_both_backends: tuple[QwenTokenizer, QwenTokenizer], tmp_path: Path
) -> None:
    data = json.loads(tiny_both_backends[1].source.read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|im_start|>"]
    bad = tmp_path / "tokenizer.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"<\|im_start\|> has id None, expected 657"):
        QwenTokenizer.from_file(bad)


def test_encoding_normalises_to_nfc_like_the_official_tokenizer(tok: QwenTokenizer) -> None:
    assert tok.encode("cafe\u0301") == tok.encode("caf\u00e9")


@pytest.mark.parametrize("text", ["龘靐齉", "🫠🪿🧌 emoji", "👨‍👩‍👧 family", "𠀀 rare, 你好，世界"])
def test_streaming_never_emits_a_replacement_char_for_split_characters(tok: QwenTokenizer, text: str) -> None:
    ids = tok.encode(text)
    # The case under test: some token is not valid UTF-8 on its own.
    assert any(_not_utf8(tok.token_bytes(i)) for i in ids)
    dec = tok.stream_decoder()
    deltas = [dec.feed(i) for i in ids]
    deltas.append(dec.flush())
    assert all("\ufffd" not in d for d in deltas)
    assert "" in deltas[:-1]  # a character was held back until its last byte came
    assert "".join(deltas) == text == dec.text


def test_stream_decoder_flushes_an_incomplete_character_at_the_end(tok: QwenTokenizer) -> None:
    first_two_bytes = tok.encode("🫠")[0]  # b"\xf0\x9f"
    dec = tok.stream_decoder()
    assert dec.feed(tok.encode("ok")[0]) == "ok"
    assert dec.feed(first_two_bytes) == ""
    assert dec.flush() == "\ufffd"


def test_answer_text_drops_control_tokens_but_keeps_grounding_markup(tok: QwenTokenizer) -> None:
    ids = (
        [tok.ref_start_id] + tok.encode("女生") + [tok.ref_end_id, tok.box_start_id]
        + tok.encode("(441,382),(733,811)") + [tok.box_end_id, tok.imgpad_id, tok.im_end_id, 151900]
    )
    assert tok.decode(ids) == "<ref>女生</ref><box>(441,382),(733,811)</box>"
    assert len(ids) - 3 == 22  # the reference's token count for this grounding answer
    full = tok.decode(ids[:-1], skip_special_tokens=False)
    assert full.endswith("</box><imgpad><|im_end|>")


def test_a_special_token_after_a_broken_character_flushes_it(tok: QwenTokenizer) -> None:
    broken = tok.encode("🫠")[0]
    assert tok.decode([broken, tok.box_start_id]) == "\ufffd<box>"


def test_model_dir_prefers_qwen_tiktoken(tmp_path: Path, qwen_tiktoken: Path) -> None:
    shutil.copy(qwen_tiktoken, tmp_path / "qwen.tiktoken")
    (tmp_path / "tokenizer.json").write_text("not json")
    tok = QwenTokenizer.from_model_dir(tmp_path)
    assert tok.source.name == "qwen.tiktoken" and tok.n_ranks == 151643


def test_a_model_dir_without_a_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="qwen.tiktoken or tokenizer.json"):
        QwenTokenizer.from_model_dir(tmp_path)


def test_a_malformed_tiktoken_file_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "qwen.tiktoken"
    bad.write_text("IQ== 0\nthis is not base64 1\n")
    with pytest.raises(CheckpointError, match=r"qwen.tiktoken:2"):
        QwenTokenizer.from_file(bad)


def test_a_vocabulary_missing_single_bytes_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "qwen.tiktoken"
    bad.write_text("IQ== 0\nIg== 1\n")
    with pytest.raises(CheckpointError, match="256 single bytes"):
        QwenTokenizer.from_file(bad)


def _not_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False
