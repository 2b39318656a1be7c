"""Convert ``qwen.tiktoken`` into a Hugging Face ``tokenizer.json`` that gives the same ids.

    python -m engine_build.tiktoken_to_hf --tiktoken models/qwen-vl-chat/qwen.tiktoken --out hf-tokenizer/

Writes into ``--out``:

- ``tokenizer.json``: byte-level BPE. Vocabulary = the tiktoken ranks (id = rank); merges
  reconstructed from the ranks; NFC normaliser (the official tokenizer normalises to NFC);
  Qwen's pre-tokenisation regex, then the byte-level mapping; ``ignore_merges`` so that a
  pre-token that is itself a token maps straight to it, as tiktoken does; the 217 special tokens
  as added tokens at their official ids (151643.. with the real file).
- ``tokenizer_config.json``: for ``transformers.PreTrainedTokenizerFast`` (TensorRT-LLM's
  tokenizer loading).
- ``tokenizer_manifest.json``: the source file and its sha256, tool versions and counts. (Not
  ``config.json``: that name belongs to the model's own config when ``--out`` is a model folder.)

Merges: tiktoken merges, inside a pre-token, the adjacent pair whose concatenation has the lowest
rank. The merge that creates token ``t`` is found by running that same procedure on ``t``'s bytes
with only the ranks below ``t``'s: it stops at two parts, which form the merge, ranked like
``t``. A token it cannot reach in two parts can never appear inside a longer piece either, so it
needs no merge (``ignore_merges`` still yields it for a whole pre-token); the manifest counts them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import platform
import sys
from importlib import metadata
from pathlib import Path

from tqdm import tqdm

from worker.engine.tokenizer import (
    ENDOFTEXT,
    HF_TOKENIZER_FILE,
    PAT_STR,
    SPECIAL_TOKENS,
    bytes_to_byte_level,
    load_tiktoken_ranks,
)

CONFIG_FILE = "tokenizer_config.json"
MANIFEST_FILE = "tokenizer_manifest.json"


def reconstruct_merges(
    ranks: dict[bytes, int], *, progress: bool = False
) -> tuple[list[tuple[bytes, bytes]], int]:
    """The BPE merges behind ``ranks``, in rank order, and the number of tokens no merge reaches."""
    merges: list[tuple[bytes, bytes]] = []
    unreachable = 0
    ordered = sorted(ranks.items(), key=lambda kv: kv[1])
    for token, rank in tqdm(ordered, desc="merges", unit="tok", disable=not progress, mininterval=0.5):
        if len(token) < 2:
            continue
        parts = _bpe_parts(ranks, token, max_rank=rank)
        if len(parts) == 2:
            merges.append((parts[0], parts[1]))
        else:
            unreachable += 1
    return merges, unreachable


def _bpe_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """tiktoken's merge loop on ``token`` using only ranks below ``max_rank``."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best_rank, best_i = max_rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best_rank, best_i = r, i
        if best_i < 0:
            break
        parts[best_i : best_i + 2] = [parts[best_i] + parts[best_i + 1]]
    return parts


def build_tokenizer_json(ranks: dict[bytes, int], *, progress: bool = False) -> tuple[str, dict[str, int]]:
    """``tokenizer.json`` text for ``ranks`` plus the counts for the manifest."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    merges, unreachable = reconstruct_merges(ranks, progress=progress)
    vocab = {bytes_to_byte_level(tok): rank for tok, rank in ranks.items()}
    bpe = models.BPE(
        vocab=vocab,
        merges=[(bytes_to_byte_level(a), bytes_to_byte_level(b)) for a, b in merges],
        ignore_merges=True,
    )
    tok = Tokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in SPECIAL_TOKENS])
    for offset, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != len(ranks) + offset:  # tokenizers numbers them after the vocab
            raise RuntimeError(f"{name} got id {tok.token_to_id(name)}, expected {len(ranks) + offset}")
    counts = {
        "ranks": len(ranks),
        "merges": len(merges),
        "unreachable_tokens": unreachable,
        "special_tokens": len(SPECIAL_TOKENS),
        "vocab": len(ranks) + len(SPECIAL_TOKENS),
    }
    return tok.to_str(pretty=False), counts


def tokenizer_config() -> dict:
    """``tokenizer_config.json`` for ``transformers.PreTrainedTokenizerFast``."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 32768,
        "bos_token": None,
        "eos_token": ENDOFTEXT,
        "pad_token": ENDOFTEXT,
        "unk_token": None,
        "add_bos_token": False,
        "clean_up_tokenization_spaces": False,
    }


def convert(tiktoken_path: str | Path, out_dir: str | Path, *, force: bool = False, progress: bool = False) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and the manifest into ``out_dir``.

    Refuses to replace existing tokenizer files unless ``force``. Returns the tokenizer.json path.
    """
    tiktoken_path, out_dir = Path(tiktoken_path), Path(out_dir)
    targets = [out_dir / HF_TOKENIZER_FILE, out_dir / CONFIG_FILE, out_dir / MANIFEST_FILE]
    existing = [p.name for p in targets if p.exists()]
    if existing and not force:
        raise FileExistsError(f"{out_dir} already has {', '.join(existing)}; pass --force to replace them")
    ranks = load_tiktoken_ranks(tiktoken_path)
    text, counts = build_tokenizer_json(ranks, progress=progress)

    out_dir.mkdir(parents=True, exist_ok=True)
    targets[0].write_text(text, encoding="utf-8")
    targets[1].write_text(json.dumps(tokenizer_config(), indent=2) + "\n", encoding="utf-8")
    manifest = {
        "tool": "engine_build.tiktoken_to_hf",
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(tiktoken_path.resolve()), "sha256": _sha256(tiktoken_path)},
        "outputs": {HF_TOKENIZER_FILE: _sha256(targets[0]), CONFIG_FILE: _sha256(targets[1])},
        "counts": counts,
        "normalizer": "NFC",
        "pre_tokenizer_pattern": PAT_STR,
        "versions": {
            "python": platform.python_version(),
            **{pkg: _version(pkg) for pkg in ("vlq", "tokenizers", "tiktoken")},
        },
    }
    targets[2].write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return targets[0]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m engine_build.tiktoken_to_hf",
        description="Write a HF tokenizer.json (+ tokenizer_config.json, manifest) equivalent to qwen.tiktoken.",
    )
    parser.add_argument("--tiktoken", required=True, type=Path, help="the qwen.tiktoken file to convert")
    parser.add_argument("--out", required=True, type=Path, help="folder to write tokenizer.json into")
    parser.add_argument("--force", action="store_true", help="replace existing tokenizer files in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        path = convert(args.tiktoken, args.out, force=args.force, progress=not args.no_progress)
    except (FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a coded vlq error (bad tiktoken file) or a tokenizers failure
        print(f"error: {getattr(e, 'message', e)}", file=sys.stderr)
        return 1
    manifest = json.loads((path.parent / MANIFEST_FILE).read_text())
    print(f"wrote {path} ({manifest['counts']['vocab']} tokens, {manifest['counts']['merges']} merges)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
