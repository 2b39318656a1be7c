"""The GPU engine benchmark runs end to end on a CPU with the tiny config (its figures mean
nothing there; the point is that the script, its prompt and its checks do not rot)."""

from __future__ import annotations

import json

import pytest

from benchmarks import engine_bench
from worker.engine.model.cuda_gemv import CudaTile


def test_the_seed_prompt_has_the_seed_token_count(qwen_tiktoken):
    from worker.engine.tokenizer import QwenTokenizer

    ids, slot = engine_bench.seed_prompt(QwenTokenizer.from_file(qwen_tiktoken))
    assert len(ids) == engine_bench.SEED_PROMPT_TOKENS == 285
    assert ids[slot - 1] != ids[slot] == ids[slot + 255] != ids[slot + 256]  # <img> 256 x <imgpad> </img>


def test_vision_flops_are_counted_from_the_architecture():
    from worker.engine.model.args import VisionArgs

    flops = engine_bench.vision_flops(VisionArgs())
    assert 4.1e12 < flops < 4.3e12  # the issue's ~4.15 TFLOP per image, counted exactly


def test_the_benchmark_runs_on_a_cpu_with_the_tiny_config(qwen_tiktoken, sample_images, tmp_path):
    out = tmp_path / "bench.json"
    code = engine_bench.main(["--tiny", "--device", "cpu", "--quick", "--tokenizer", str(qwen_tiktoken),
                              "--image", str(sample_images / "demo.jpeg"), "--max-seq-len", "512",
                              "--decode-tokens", "3", "--skip", "eager,jobs", "--json", str(out),
                              "--cuda-tiles", "4096,4096,1=1,1,128,2", "--triton-attention", "--separate-norms",
                              "--norm-tiles", "22016,4096,1=1,3,128"])
    assert code == 0
    report = json.loads(out.read_text())
    names = [row["name"] for row in report["rows"]]
    assert "TTFT from preprocessed pixels" in names and "decode tok/s, batch 2, 3 new tokens" in names
    assert any(name.startswith("int8 decode") for name in names)
    assert "int8 decode tok/s, batch 2, 3 new tokens, GEMV with --cuda-tiles" in names
    assert "decode tok/s, batch 2, 3 new tokens, Triton attention" in names
    assert "int8 decode tok/s, batch 2, 3 new tokens, GEMV chosen, Triton attention" in names
    assert "int8 decode tok/s, batch 2, 3 new tokens, GEMV chosen, RMSNorms apart" in names
    assert "int8 decode tok/s, batch 1, graph replay only (no engine), RMSNorms apart" in names
    assert "int8 decode tok/s, batch 2, 3 new tokens, GEMV chosen, --norm-tiles" in names
    assert report["info"]["correctness"]["greedy steps fast == eager"] == "17/17"


def test_bits_report_tells_equal_bits_and_runs_that_moved():
    import torch

    from benchmarks.engine_bench import bits_report

    base = torch.tensor([1.0, 2.0, 3.0])
    assert bits_report(lambda: base.clone(), base, 3) == \
        "equal to separate: True (rel diff 0.0e+00), runs that differ: 0/3"
    calls = iter(range(1, 10))  # every call answers differently, the first unlike the reference
    moving = bits_report(lambda: base + next(calls), base, 2, "the reference")
    assert moving.startswith("equal to the reference: False") and moving.endswith("runs that differ: 2/2")


def test_a_cuda_tile_flag_names_the_shape_and_the_tile():
    assert engine_bench.parse_cuda_tile("12288,4096,2=4,1,128") == ((12288, 4096, 2), CudaTile(4, 1, 128))
    assert engine_bench.parse_cuda_tile("4096,4096,1=2") == ((4096, 4096, 1), CudaTile(2))
    assert engine_bench.parse_cuda_tile("4096,4096,1=1,1,128,2") == ((4096, 4096, 1), CudaTile(1, 1, 128, 2))
    assert engine_bench.parse_cuda_tile("22016,4096,1=1,2,128,1,7") == \
        ((22016, 4096, 1), CudaTile(1, 2, 128, 1, blocks_per_sm=7))
    with pytest.raises(SystemExit, match="N,K,M=WROWS,UNROLL,THREADS"):
        engine_bench.parse_cuda_tile("4096,4096=2,2")
    with pytest.raises(SystemExit):
        engine_bench.parse_cuda_tile("4096,4096,1=1,1,128,2,7,9")
