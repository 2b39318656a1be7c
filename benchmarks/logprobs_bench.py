"""What ``logprobs`` cost and whether they hold on the GPU path: CUDA-graph decode, lookahead.

On the real Qwen-VL-Chat architecture with random bf16 weights (as ``engine_bench``), one
image-and-question prompt per slot, forced answers (``ignore_stop``):

- checks: with ``top_logprobs`` asked for by one of two requests, each answer token's entry
  names that token, greedy tokens are their position's best entry, the other request gets none,
  and the answers and entries are the same with and without lookahead;
- decode tokens/s at batch ``--batch`` with logprobs asked for by every request (``--top``
  entries) and by none, interleaved ``--repeats`` times, in bf16 and then int8;
- the logprobs kernels alone (:func:`kernels.token_logprobs`, two Triton launches) against
  torch's ``log_softmax``, ``gather`` and ``topk`` over the whole vocabulary, each replayed in a
  CUDA graph, for top 0, 5 and 20, with their outputs compared.

    python -m benchmarks.logprobs_bench [--tokens 128] [--batch 2] [--top 5] [--repeats 3]

``--tiny`` runs the tiny checkpoint's architecture instead, on the CPU when there is no GPU (a
smoke test of the script; its figures say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.engine_bench import (  # noqa: E402
    DEVICE_DIR,
    SHARED,
    environment,
    first_existing,
    random_model,
    seed_prompt,
)
from worker.engine.engine import TorchEngine  # noqa: E402
from worker.engine.model.args import QwenVLArgs  # noqa: E402
from worker.engine.model.preprocess import preprocess_image  # noqa: E402
from worker.engine.tokenizer import QwenTokenizer  # noqa: E402
from worker.engine.types import GenerationRequest, GenerationResult, ImageInput, SamplingParams  # noqa: E402


def requests(ids: list[int], slot: int, pixels: torch.Tensor, batch: int, tokens: int,
             tops: list[int | None]) -> list[GenerationRequest]:
    return [GenerationRequest(f"r{i}", ids, image_slots=[slot], images=[ImageInput(pixels + 0.001 * i)],
                              sampling=SamplingParams(max_tokens=tokens, temperature=0.0, ignore_stop=True,
                                                      logprobs=tops[i]))
            for i in range(batch)]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_engine(model, tok, batch: int, **kw) -> TorchEngine:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return TorchEngine(model, tok, max_batch_size=batch, max_seq_len=2048, device=device, dtype=dtype,
                       feature_cache_images=0, start=False, **kw)


def run(engine: TorchEngine, reqs: list[GenerationRequest]) -> tuple[list[GenerationResult], float]:
    """Answers and decode tokens/s (after the first step: vision, prefill, first tokens)."""
    futures = [engine.submit(r) for r in reqs]
    engine.step()
    sync()
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
    sync()
    elapsed = time.perf_counter() - t0
    results = [f.result() for f in futures]
    return results, sum(r.completion_tokens - 1 for r in results) / elapsed


def graph_us(fn, calls: int = 20, replays: int = 50) -> float:
    """Microseconds a call of ``fn()``, ``calls`` of them captured in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / (calls * replays) * 1e6


def kernel_times(vocab: int, width: int, batch: int) -> None:
    from worker.engine.model import kernels

    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = 3 * torch.randn(batch, vocab, device="cuda", generator=gen)
    next_ids = logits[:, :width].argmax(dim=-1)
    for top in (0, 5, 20):
        ours = kernels.token_logprobs(logits, next_ids, top, width)
        reference = kernels.token_logprobs_torch(logits, next_ids, top, width)
        diff = (ours[:, :1 + top] - reference[:, :1 + top]).abs().max().item()
        same_ids = torch.equal(ours[:, 1 + top:], reference[:, 1 + top:])
        fast = graph_us(lambda: kernels.token_logprobs(logits, next_ids, top, width))
        slow = graph_us(lambda: kernels.token_logprobs_torch(logits, next_ids, top, width))
        print(f"  top {top:2d}: {fast:6.1f} us (two Triton launches) against {slow:6.1f} us (torch), "
              f"[{batch}, {vocab}] float32 logits; max |difference| {diff:.1e}, ids equal: {same_ids}")


def check(model, tok, ids, slot, pixels, batch: int, tokens: int, top: int, quantization: str) -> None:
    answers = []
    for lookahead in (True, False):
        engine = make_engine(model, tok, batch, lookahead=lookahead)
        try:
            results, _ = run(engine, requests(ids, slot, pixels, batch, tokens, [top] + [None] * (batch - 1)))
        finally:
            engine.close()
        asked, others = results[0], results[1:]
        entries = asked.logprobs
        assert [e.token_id for e in entries] == asked.token_ids, "an entry names another token"
        assert all(len(e.top) == top for e in entries) and all(r.logprobs is None for r in others)
        best = sum(e.top[0][0] == e.token_id and e.top[0][1] == e.logprob for e in entries) if top else None
        print(f"  {quantization}, lookahead {'on ' if lookahead else 'off'}: {len(entries)} entries, "
              + (f"greedy token is the best entry at {best}/{len(entries)} positions, " if top else "")
              + f"mean logprob {statistics.mean(e.logprob for e in entries):.3f}")
        answers.append((asked.token_ids, [(e.logprob, e.top) for e in entries], [r.token_ids for r in others]))
    assert answers[0] == answers[1], "lookahead changed the answers or their logprobs"
    print(f"  {quantization}: the same answers and entries with and without lookahead")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint's architecture (a smoke test)")
    a = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not a.tiny:
        print("logprobs_bench needs a CUDA GPU (or --tiny for a smoke test on the CPU)")
        return 2
    env = environment(device)
    print("card:", env["card"], "| torch", torch.__version__, "| date", env["date"])
    if a.tiny:
        from engine_build.tiny_model import TINY_CONFIG

        config: object = TINY_CONFIG
    else:
        config = first_existing(DEVICE_DIR / "config.json", SHARED / "qwen-vl" / "config.json")
    args = QwenVLArgs.from_hf_config(config)
    tok = QwenTokenizer.from_file(first_existing(DEVICE_DIR / "qwen.tiktoken", SHARED / "qwen-vl" / "qwen.tiktoken"))
    image = first_existing(DEVICE_DIR / "demo.jpeg", SHARED / "images" / "demo.jpeg")
    pixels = preprocess_image(Image.open(io.BytesIO(image.read_bytes())))
    ids, slot = seed_prompt(tok)
    if device.type == "cuda":
        print(f"logprobs kernels alone (batch {a.batch}, vocabulary {args.llm.vocab_size}, {tok.n_vocab} allowed):")
        kernel_times(args.llm.vocab_size, tok.n_vocab, a.batch)
    model = random_model(args, device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    for quantization in ("bf16", "int8"):
        # int8: the model is quantized in place here, and stays so for the engines below
        make_engine(model, tok, a.batch, quantization="int8" if quantization == "int8" else "none").close()
        print(f"checks ({quantization}, batch {a.batch}, 24 tokens, top {a.top}):")
        check(model, tok, ids, slot, pixels, a.batch, 24, a.top, quantization)
        rates: dict[str, list[float]] = {"without": [], "with": []}
        for _ in range(a.repeats):
            for name, top in (("without", None), ("with", a.top)):
                engine = make_engine(model, tok, a.batch)
                try:
                    _, rate = run(engine, requests(ids, slot, pixels, a.batch, a.tokens, [top] * a.batch))
                finally:
                    engine.close()
                rates[name].append(rate)
        without, with_ = statistics.median(rates["without"]), statistics.median(rates["with"])
        print(f"decode {quantization}, batch {a.batch}, {a.tokens} tokens, median of {a.repeats}: "
              f"{without:.1f} tok/s without logprobs, {with_:.1f} with top {a.top} "
              f"({(with_ / without - 1) * 100:+.1f}%); runs {rates}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
