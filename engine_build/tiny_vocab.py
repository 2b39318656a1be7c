"""A small byte-level BPE vocabulary in ``qwen.tiktoken`` format, for the tiny checkpoint.

The tiny random model needs a tokenizer that works with no outside files. This module trains
one: all 256 single bytes (ranks 0..255, in byte order) followed by :data:`N_MERGES` merges
learned from a small built-in corpus (English, Chinese, digits, punctuation, the chat and
grounding vocabulary) with Qwen's own pre-tokenisation pattern. Training is deterministic (ties
go to the smallest byte pair), so every run writes the same file. :class:`QwenTokenizer` loads it
like the real one and numbers the special tokens from its rank count (256 + N_MERGES).

    python -m engine_build.tiny_vocab --out /tmp/tiny.tiktoken
"""

from __future__ import annotations

import argparse
import base64
from collections import Counter
from pathlib import Path

import regex

from worker.engine.tokenizer import PAT_STR, TIKTOKEN_FILE

N_MERGES = 400

CORPUS = """\
system
You are a helpful assistant.
user
assistant
Picture 1: Picture 2: Picture 3:
What is in this picture? Describe the image in detail. What is the difference between the two images?
The woman is playing with her dog on the beach. The dog is a Labrador retriever, sitting on the sand.
A red panda climbs a tree; a giant panda eats bamboo. There are two people giving a high five.
The menu lists coffee, tea, juice and cake, with prices from 3.50 to 12.99 dollars.
Output the bounding box of the girl. The box is (441,382),(733,811) on a 1000 by 1000 grid.
It's a sunny day and they're happy; we've seen it, I'm sure you'll like it, he'd agree.
The quick brown fox jumps over the lazy dog. Hello, world! Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 2024.
def main():
    print("hello")  # code, too
    return [x * 2 for x in range(10)]
这是什么
图中是一名女子在沙滩上和狗玩耍，旁边的狗是一只拉布拉多犬，它们处于沙滩上。
输出女生的检测框。
描述一下两张图片的不同。
简述一下这张图片的内容。
第一张图片是一只小熊猫在树上，第二张图片是一只大熊猫在吃竹子。
这张图片里有两个人在击掌，他们看起来很开心。
菜单上有咖啡、茶、果汁和蛋糕，价格从三块五到十二块九。
你好，世界！今天天气很好，我们去海边玩吧。请问这是哪里？
"""


def train_merges(text: str = CORPUS, n_merges: int = N_MERGES) -> list[bytes]:
    """Learn up to ``n_merges`` BPE tokens from ``text``; returns them in rank order."""
    words = Counter(
        tuple(bytes([b]) for b in piece.encode("utf-8")) for piece in regex.findall(PAT_STR, text)
    )
    vocab = {bytes([b]) for b in range(256)}
    merged: list[bytes] = []
    while len(merged) < n_merges:
        pairs: Counter[tuple[bytes, bytes]] = Counter()
        for word, freq in words.items():
            for a, b in zip(word, word[1:]):
                if a + b not in vocab:
                    pairs[(a, b)] += freq
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        token = a + b
        vocab.add(token)
        merged.append(token)
        words = Counter({_merge(word, a, b): freq for word, freq in words.items()})
    return merged


def _merge(word: tuple[bytes, ...], a: bytes, b: bytes) -> tuple[bytes, ...]:
    out: list[bytes] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def write_tiny_vocab(path: str | Path) -> Path:
    """Write the tiny vocabulary to ``path`` (a file, or a folder to hold ``qwen.tiktoken``).

    Returns the file written. Its rank count is 256 + :data:`N_MERGES`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / TIKTOKEN_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = [bytes([b]) for b in range(256)] + train_merges()
    lines = (f"{base64.b64encode(tok).decode()} {rank}\n" for rank, tok in enumerate(tokens))
    path.write_text("".join(lines), encoding="ascii")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m engine_build.tiny_vocab",
        description="Write the tiny checkpoint's BPE vocabulary in qwen.tiktoken format.",
    )
    parser.add_argument("--out", required=True, type=Path, help="file to write, or a folder for qwen.tiktoken")
    args = parser.parse_args(argv)
    written = write_tiny_vocab(args.out)
    print(f"wrote {written} ({256 + N_MERGES} ranks)")


if __name__ == "__main__":
    main()
