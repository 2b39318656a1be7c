"""Engine test helpers: a byte-level tokenizer and a scripted model that speaks the model API.

- ``byte_tokenizer``: a real :class:`QwenTokenizer` over a 256-token byte vocabulary (id = byte
  value), so the special ids are 256 (``<|endoftext|>``), 257 (``<|im_start|>``), 258
  (``<|im_end|>``)... and answers are easy to script as UTF-8 bytes.
- ``ScriptedModel`` (via the ``scripted_model`` fixture): implements ``encode_images``,
  ``setup_cache``, ``prefill`` and ``decode`` of docs/architecture.md. Its "KV cache" keeps the
  token at every (slot, position); the next token is ``script(prompt_ids, answer_ids)``, so an
  engine that passes a wrong slot or position gets a visibly wrong answer.
"""

from __future__ import annotations

import base64
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import pytest
import torch

from worker.engine.tokenizer import QwenTokenizer

Script = Callable[[list[int], list[int]], "int | torch.Tensor"]


class ScriptedModel:
    """A stand-in for QwenVL whose logits come from ``script(prompt, answer_so_far)``.

    ``script`` returns a token id (one-hot logits) or a float tensor of logits [vocab]. It may
    raise to simulate a model fault (during prefill for the first token, decode after).
    """

    def __init__(self, script: Script, vocab_size: int = 512, hidden_size: int = 8) -> None:
        self.script = script
        self.args = SimpleNamespace(llm=SimpleNamespace(vocab_size=vocab_size, hidden_size=hidden_size))
        self.calls: list[tuple] = []
        self.image_features: dict[int, torch.Tensor | None] = {}  # slot -> features at prefill

    def setup_cache(self, max_batch_size: int, max_seq_len: int) -> None:
        self.cache = torch.full((max_batch_size, max_seq_len), -1, dtype=torch.long)
        self.prompt_len = [0] * max_batch_size
        self.calls.append(("setup_cache", max_batch_size, max_seq_len))

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        self.calls.append(("encode_images", pixels.shape[0]))
        n = pixels.shape[0]
        per_image = pixels.reshape(n, -1).mean(dim=1)  # [N]
        return per_image[:, None, None].expand(n, 256, self.args.llm.hidden_size).clone()

    def prefill(self, input_ids, slot, image_features=None, image_slots=()):
        t = input_ids.shape[0]
        self.calls.append(("prefill", slot, t))
        self.image_features[slot] = image_features
        self.cache[slot].fill_(-1)
        self.cache[slot, :t] = input_ids
        self.prompt_len[slot] = t
        return self._logits(slot, t)

    def decode(self, tokens, positions, slots, kv_len=None):
        assert kv_len is None or kv_len > max(positions.tolist())
        self.calls.append(("decode", tokens.tolist(), positions.tolist(), slots.tolist()))
        rows = []
        for tok, pos, slot in zip(tokens.tolist(), positions.tolist(), slots.tolist()):
            if pos == 0:  # a free slot's padding row
                self.cache[slot, 0] = tok
                rows.append(torch.zeros(self.args.llm.vocab_size))
                continue
            assert (self.cache[slot, :pos] >= 0).all(), f"slot {slot} has holes before {pos}"
            self.cache[slot, pos] = tok
            self.cache[slot, pos + 1:] = -1
            rows.append(self._logits(slot, pos + 1))
        return torch.stack(rows)

    def _logits(self, slot: int, length: int) -> torch.Tensor:
        history = self.cache[slot, :length].tolist()
        n = self.prompt_len[slot]
        out = self.script(history[:n], history[n:])
        if isinstance(out, torch.Tensor):
            return out.float()
        logits = torch.full((self.args.llm.vocab_size,), -10.0)
        logits[int(out)] = 10.0
        return logits

    @property
    def decode_calls(self) -> list[tuple]:
        return [c for c in self.calls if c[0] == "decode"]

    @classmethod
    def spelling(cls, answer: str, end: int | None = None, **kwargs) -> ScriptedModel:
        """A model whose every answer is ``answer`` then ``end`` (or '.' forever)."""
        return cls(answer_script(answer, end), **kwargs)

    spell = staticmethod(lambda text: spell(text))


def spell(text: str) -> list[int]:
    """Ids of ``text`` in the byte tokenizer (one id per UTF-8 byte)."""
    return list(text.encode("utf-8"))


def answer_script(answer: str, end: int | None = None) -> Script:
    """A script that spells ``answer`` byte by byte, then emits ``end`` (or keeps repeating '.')."""
    ids = spell(answer)

    def script(prompt: list[int], out: list[int]) -> int:
        if len(out) < len(ids):
            return ids[len(out)]
        return end if end is not None else ord(".")

    return script


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> QwenTokenizer:
    path: Path = tmp_path_factory.mktemp("bytevocab") / "qwen.tiktoken"
    path.write_text("".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256)))
    return QwenTokenizer.from_file(path)


@pytest.fixture
def scripted_model() -> Callable[..., ScriptedModel]:
    """Factory: ``scripted_model(script, vocab_size=512)``."""
    return ScriptedModel
