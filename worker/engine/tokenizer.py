"""Qwen-VL-Chat's tokenizer: tiktoken BPE (``qwen.tiktoken``) or the HF ``tokenizer.json`` form.

Both backends give the same ids. The vocabulary is ``n_ranks`` byte-level BPE tokens (151,643 in
the real file) followed by the special tokens, in the official order and numbered from
``n_ranks``::

    <|endoftext|> <|im_start|> <|im_end|> <|extra_0|> .. <|extra_204|>
    <ref> </ref> <box> </box> <quad> </quad> <img> </img> <imgpad>

so with the real file ``<|endoftext|>`` is 151643, ``<img>`` 151857 and ``<imgpad>`` 151859, and
a smaller vocabulary (the tiny checkpoint's) keeps the same order after its own ranks.

Two rules the rest of vlq relies on:

- :meth:`QwenTokenizer.encode` treats its input as plain text, always: a user who types
  ``<img>`` or ``<|im_end|>`` gets the ids of those characters, never a special id. Special ids
  enter a prompt only through :mod:`worker.engine.prompt`, by id. Text is NFC-normalised first,
  as the official tokenizer does.
- Decoding is streaming-safe: :class:`StreamDecoder` holds back the bytes of a UTF-8 character
  split across tokens until it is complete, so an answer never shows U+FFFD mid-stream.

Usage::

    tok = QwenTokenizer.from_model_dir("models/qwen-vl-chat")
    ids = tok.encode("这是什么")
    dec = tok.stream_decoder()
    text = "".join(dec.feed(i) for i in ids) + dec.flush()
"""

from __future__ import annotations

import base64
import binascii
import codecs
import json
import unicodedata
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable

from producer.errors import CheckpointError

# Qwen's pre-tokenisation pattern, as in the official tokenization_qwen.py.
PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
EXTRA_TOKENS = tuple(f"<|extra_{i}|>" for i in range(205))
GROUNDING_TOKENS = ("<ref>", "</ref>", "<box>", "</box>", "<quad>", "</quad>")
IMAGE_TAGS = ("<img>", "</img>", "<imgpad>")
# The official order: ids n_ranks, n_ranks + 1, ... in this sequence (223 tokens).
SPECIAL_TOKENS: tuple[str, ...] = (
    (ENDOFTEXT, IM_START, IM_END) + EXTRA_TOKENS + GROUNDING_TOKENS + IMAGE_TAGS
)

TIKTOKEN_FILE = "qwen.tiktoken"
HF_TOKENIZER_FILE = "tokenizer.json"


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level map: every byte value to a printable unicode character.

    ``tokenizer.json`` files store byte-level BPE tokens as strings of these characters.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def bytes_to_byte_level(token: bytes) -> str:
    """A token's bytes as its byte-level string (the ``tokenizer.json`` spelling)."""
    table = byte_level_alphabet()
    return "".join(table[b] for b in token)


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    """Read a tiktoken BPE file (``base64-token rank`` per line) into ``{token bytes: rank}``.

    Raises :class:`CheckpointError` naming the line when the file is not in that format, or when
    the ranks are not exactly ``0 .. n-1``.
    """
    path = Path(path)
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise CheckpointError(f"cannot read tokenizer file {path}: {e.strerror or e}") from e
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise CheckpointError(
                f"{path}:{lineno} is not a tiktoken BPE line ('<base64 token> <rank>'): "
                f"{line[:80]!r}; point the model folder at a real qwen.tiktoken"
            ) from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps or repeats")
    if len(ranks) < 256 or any(bytes([b]) not in ranks for b in range(256)):
        raise CheckpointError(f"{path}: a byte-level BPE vocabulary must hold all 256 single bytes")
    return ranks


class QwenTokenizer:
    """Qwen's BPE tokenizer with the special tokens at their official ids.

    Build with :meth:`from_file` or :meth:`from_model_dir`. ``encode`` is plain text only;
    special ids are exposed as properties for the prompt builder and the engines.
    """

    def __init__(
        self,
        token_bytes: list[bytes],
        special_ids: dict[str, int],
        encode_ordinary: Callable[[str], list[int]],
        source: Path,
    ) -> None:
        self._token_bytes = token_bytes  # id -> bytes, for ids below n_ranks
        self._special_ids = dict(special_ids)
        self._special_names = {i: name for name, i in special_ids.items()}
        self._encode_ordinary = encode_ordinary
        self.source = source
        # Special tokens that stay visible in answer text (the grounding markup users parse).
        self._kept_specials = frozenset(self._special_ids[name] for name in GROUNDING_TOKENS)

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def from_file(cls, path: str | Path) -> QwenTokenizer:
        """Load ``qwen.tiktoken`` (tiktoken format) or a HF ``tokenizer.json`` (by extension)."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"tokenizer file {path} not found")
        if path.suffix == ".json":
            return cls._from_hf_json(path)
        return cls._from_tiktoken(path)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> QwenTokenizer:
        """Load the tokenizer of a model folder: ``qwen.tiktoken`` if present, else ``tokenizer.json``."""
        model_dir = Path(model_dir)
        for name in (TIKTOKEN_FILE, HF_TOKENIZER_FILE):
            if (model_dir / name).is_file():
                return cls.from_file(model_dir / name)
        raise CheckpointError(
            f"no tokenizer in {model_dir}: expected {TIKTOKEN_FILE} or {HF_TOKENIZER_FILE}; "
            "copy qwen.tiktoken from the Qwen-VL-Chat repository into the folder"
        )

    @classmethod
    def _from_tiktoken(cls, path: Path) -> QwenTokenizer:
        import tiktoken

        ranks = load_tiktoken_ranks(path)
        n_ranks = len(ranks)
        special_ids = {name: n_ranks + i for i, name in enumerate(SPECIAL_TOKENS)}
        enc = tiktoken.Encoding(
            "qwen", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=special_ids
        )
        token_bytes = [b""] * n_ranks
        for token, rank in ranks.items():
            token_bytes[rank] = token
        return cls(token_bytes, special_ids, enc.encode_ordinary, path)

    @classmethod
    def _from_hf_json(cls, path: Path) -> QwenTokenizer:
        from tokenizers import Tokenizer

        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            vocab: dict[str, int] = data["model"]["vocab"]
            added = {t["content"]: int(t["id"]) for t in data.get("added_tokens", [])}
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path} is not a HF tokenizer.json: {e}") from None
        if data["model"].get("type") != "BPE":
            raise CheckpointError(f"{path}: expected a byte-level BPE model, found {data['model'].get('type')}")

        unbyte = {ch: b for b, ch in byte_level_alphabet().items()}
        plain = {tok: i for tok, i in vocab.items() if tok not in SPECIAL_TOKENS}
        n_ranks = len(plain)
        token_bytes = [b""] * n_ranks
        for tok, i in plain.items():
            if not 0 <= i < n_ranks or any(ch not in unbyte for ch in tok):
                raise CheckpointError(
                    f"{path}: token {tok!r} (id {i}) is not byte-level BPE with ids 0..{n_ranks - 1}"
                )
            token_bytes[i] = bytes(unbyte[ch] for ch in tok)

        special_ids = {}
        for offset, name in enumerate(SPECIAL_TOKENS):
            want = n_ranks + offset
            got = added.get(name, vocab.get(name))
            if got != want:
                raise CheckpointError(
                    f"{path}: special token {name} has id {got}, expected {want} "
                    f"({n_ranks} BPE tokens, then the {len(SPECIAL_TOKENS)} Qwen special tokens "
                    "in order); rebuild it with `python -m engine_build.tiktoken_to_hf`"
                )
            special_ids[name] = want

        # Drop the added tokens before handing the file to `tokenizers`: it would split their
        # surface forms out of raw text and so turn a user's "<img>" into the special id.
        data["added_tokens"] = []
        data["post_processor"] = None
        hf = Tokenizer.from_str(json.dumps(data))

        def encode_ordinary(text: str) -> list[int]:
            return hf.encode(text, add_special_tokens=False).ids

        return cls(token_bytes, special_ids, encode_ordinary, path)

    # -- sizes and special ids ------------------------------------------------------------------

    @property
    def n_ranks(self) -> int:
        """Number of BPE tokens; the first special id."""
        return len(self._token_bytes)

    @property
    def n_vocab(self) -> int:
        """BPE tokens plus special tokens (151,860 with the real file; the model pads to 151,936)."""
        return self.n_ranks + len(self._special_ids)

    def special_id(self, name: str) -> int:
        """The id of a special token by its surface form, e.g. ``"<|extra_0|>"``."""
        try:
            return self._special_ids[name]
        except KeyError:
            raise KeyError(f"{name!r} is not a Qwen special token") from None

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_names

    @property
    def endoftext_id(self) -> int:
        return self._special_ids[ENDOFTEXT]

    @property
    def im_start_id(self) -> int:
        return self._special_ids[IM_START]

    @property
    def im_end_id(self) -> int:
        return self._special_ids[IM_END]

    @property
    def img_start_id(self) -> int:
        return self._special_ids["<img>"]

    @property
    def img_end_id(self) -> int:
        return self._special_ids["</img>"]

    @property
    def imgpad_id(self) -> int:
        return self._special_ids["<imgpad>"]

    @property
    def ref_start_id(self) -> int:
        return self._special_ids["<ref>"]

    @property
    def ref_end_id(self) -> int:
        return self._special_ids["</ref>"]

    @property
    def box_start_id(self) -> int:
        return self._special_ids["<box>"]

    @property
    def box_end_id(self) -> int:
        return self._special_ids["</box>"]

    @property
    def quad_start_id(self) -> int:
        return self._special_ids["<quad>"]

    @property
    def quad_end_id(self) -> int:
        return self._special_ids["</quad>"]

    @property
    def stop_token_ids(self) -> tuple[int, ...]:
        """Ids that end an answer: ``<|im_end|>``, ``<|im_start|>``, ``<|endoftext|>``."""
        return (self.im_end_id, self.im_start_id, self.endoftext_id)

    # -- encoding and decoding ------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as plain text (NFC-normalised); never yields a special id."""
        ids = self._encode_ordinary(unicodedata.normalize("NFC", text))
        if ids and max(ids) >= self.n_ranks:  # a tokenizer.json whose vocab spells a special
            raise CheckpointError(f"{self.source} turned plain text into a special token id")
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of a BPE token, or a special token's surface form in UTF-8."""
        if 0 <= token_id < self.n_ranks:
            return self._token_bytes[token_id]
        if token_id in self._special_names:
            return self._special_names[token_id].encode()
        raise KeyError(f"token id {token_id} is outside the vocabulary (n_vocab {self.n_vocab})")

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. See :class:`StreamDecoder` for how special tokens are rendered."""
        dec = self.stream_decoder(skip_special_tokens=skip_special_tokens)
        return "".join(dec.feed(i) for i in ids) + dec.flush()

    def stream_decoder(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
        """A fresh :class:`StreamDecoder` over this vocabulary."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def _special_text(self, token_id: int, skip_special_tokens: bool) -> str | None:
        """How a special id shows in text: its surface form, or None when skipped."""
        if skip_special_tokens and token_id not in self._kept_specials:
            return None
        return self._special_names[token_id]

    def __repr__(self) -> str:
        return f"QwenTokenizer(source={str(self.source)!r}, n_ranks={self.n_ranks}, n_vocab={self.n_vocab})"


class StreamDecoder:
    """Turns ids, fed one at a time, into text deltas that never split a UTF-8 character.

    With ``skip_special_tokens`` (the default, for answer text) control and image tokens
    (``<|im_end|>``, ``<|extra_N|>``, ``<img>``, ``<imgpad>`` ...) and ids past the vocabulary
    (the model's padding rows) are dropped, while the grounding markup ``<ref> </ref> <box>
    </box> <quad> </quad>`` is kept as text, as the official chat shows it. Without it every
    special token is written as its surface form. Bytes that can never form a character are
    written as U+FFFD when the next special token or :meth:`flush` arrives.
    """

    def __init__(self, tokenizer: QwenTokenizer, *, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._parts: list[str] = []

    def feed(self, token_id: int) -> str:
        """Add one id; returns the text that became complete (often ``""``)."""
        tok = self._tok
        if 0 <= token_id < tok.n_ranks:
            delta = self._utf8.decode(tok._token_bytes[token_id])
        elif tok.is_special(token_id):
            special = tok._special_text(token_id, self._skip)
            if special is None:
                return ""
            delta = self._utf8.decode(b"", final=True) + special
            self._utf8.reset()
        elif self._skip:
            return ""
        else:
            raise KeyError(f"token id {token_id} is outside the vocabulary (n_vocab {tok.n_vocab})")
        if delta:
            self._parts.append(delta)
        return delta

    def flush(self) -> str:
        """End of the answer: returns held-back bytes (as U+FFFD if they are no character)."""
        delta = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        if delta:
            self._parts.append(delta)
        return delta

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._parts)
