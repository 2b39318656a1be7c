"""GPU engine benchmark: the torch engine's fast path against its plain eager path, in one run.

    python -m benchmarks.engine_bench [--config PATH/config.json | --tiny] [--tokenizer PATH]
                                      [--image PATH] [--device cuda|cpu] [--json FILE]

Builds the real Qwen-VL-Chat architecture from ``config.json`` with random bf16 weights made
directly on the device (speed does not depend on their values; no checkpoint is read), then
prints the card, the software versions, the card's measured copy bandwidth and bf16 matmul rate,
and every figure of the GPU-speed issue, each beside its limit and their ratio:

- vision tower images/s at batch 1, 2 and 26, and the share of the matmul rate they reach (the
  FLOPs per image are counted from the architecture);
- time to first token of the 1-image 285-token prompt (the seed's ``single_image.json``), from
  preprocessed pixels and from the encoded JPEG, through :class:`TorchEngine`;
- decode tokens/s at batch 1 and 2 for 128 and 512 forced new tokens through the engine's
  ``step()`` (and the graph replay alone), against the roofline: weight bytes + KV bytes read per
  step over the measured copy bandwidth;
- jobs/s for a stream of 1-image 128-token jobs at ``max_batch_size`` 2, 4 and 8;
- peak GPU memory; int8 weight-only decode and its ratio to bf16, with the int8 decode GEMVs
  (1-2 rows) on the tensor-core kernel ("dot"), the Triton FMA GEMV or the CUDA C++ GEMV, per
  shape: each shape's output against float64 math, us and GB/s of each kernel and of the FMA and
  CUDA GEMVs' candidate tiles (:mod:`benchmarks.gemv_bench`); then engine decode with the fastest
  kernel per shape ("chosen", the main int8 rows, also used for int8 TTFT and jobs), with the
  built-in choice, and with "dot", "fma" and "cuda" everywhere (``--skip gemv``: the built-in
  choice only; ``--cuda-tiles``: also with other CUDA GEMV tiles, ``--norm-tiles``: with other
  tiles for the GEMVs with the RMSNorm inside), and the int8 graph replay alone
  against bf16's; ``--triton-attention``: bf16 and int8 decode also with the Triton decode
  attention in place of the CUDA one (:mod:`benchmarks.attention_bench`), interleaved;
  ``--separate-norms``: int8 decode also with the RMSNorms as their own launches instead of inside
  the CUDA GEMVs (:mod:`benchmarks.step_bench`), interleaved;
- prefill and first-decode-step logits of the fast and the eager path against a float32 copy of
  the model (relative errors, greedy agreement);
- a sweep of the Triton GEMV tiles per decoder-layer weight shape (``[w1 | w2]`` with the gate in
  its epilogue; ``lm_head`` keeps its built-in tile) and of the Triton decode attention's split
  (the fallback where the CUDA attention cannot run) against cuBLAS, whose winners are used for
  the run (``--keep-tiles``: reported only; ``--skip sweep``: not run; the built-in table is
  ``worker.engine.model.kernels.TILES``);
- the fused epilogues (gate, split-K sums and the attention combine done by the last program of
  each tile): bit-for-bit equality with the separate launches on the GPU, repeated (a race would
  show as a moving answer), each kernel's time both ways, and decode before/after: the engine and
  the graph replay with the separate launches and the built-in tiles (``--skip fusions``: not run).

``--skip`` takes any of eager, sweep, fusions, vision, ttft, variants (decode without lookahead
and with cuBLAS), jobs, int8, gemv. Each section's header shows the seconds since the start, and
``--json`` is rewritten before every section, so a run cut short keeps what it measured.

Eager is the engine with ``fast_path=False`` (the model's own prefill/decode: per-step cache
gather, no graphs); fast is the default engine. ``--tiny`` (or ``--device cpu``) runs the same
flow on the tiny config for debugging; its figures mean nothing. Files default to ``.device/``
(copies made for the GPU machine, never committed), else ``../shared/data``.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.gemv_bench import gemv_variants, int8_gemv, repeat_check  # noqa: E402
from benchmarks.gemv_bench import summary_lines as gemv_summary_lines  # noqa: E402
from worker.engine.engine import TorchEngine  # noqa: E402
from worker.engine.model import cuda_gemv, kernels  # noqa: E402
from worker.engine.model.args import QwenVLArgs, VisionArgs  # noqa: E402
from worker.engine.model.decoder import rotary_inv_freq  # noqa: E402
from worker.engine.model.fast import FastQwenVL  # noqa: E402
from worker.engine.model.preprocess import preprocess_image  # noqa: E402
from worker.engine.model.quant import Int8Linear, quantize_llm  # noqa: E402
from worker.engine.model.qwen_vl import QwenVL  # noqa: E402
from worker.engine.model.vision import sincos_2d  # noqa: E402
from worker.engine.tokenizer import QwenTokenizer  # noqa: E402
from worker.engine.types import GenerationRequest, ImageInput, SamplingParams  # noqa: E402

SEED_PROMPT_TOKENS = 285  # single_image.json through the seed's prompt format
QUESTION = "这是什么"

# Targets of the issue.
DECODE_ROOFLINE_SHARE = 0.85
INT8_SPEEDUP = 1.7
VISION_MATMUL_SHARE = 0.60
TTFT_LIMIT_MS = 20.0
JOBS_PER_S_TARGET = 6 * 0.38


def first_existing(*paths: Path) -> Path:
    for path in paths:
        if path.exists():
            return path
    return paths[-1]


DEVICE_DIR = REPO / ".device"
SHARED = REPO.parent / "shared" / "data"


# -- reporting -----------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    eager: float | None
    fast: float | None
    unit: str
    limit: float | None = None
    limit_name: str = ""
    note: str = ""


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"  {row.name}: eager {fmt(row.eager)}  fast {fmt(row.fast)} {row.unit}"
              + (f"  | {row.limit_name} {fmt(row.limit)} -> fast/limit {ratio(row.fast, row.limit)}"
                 if row.limit is not None else "") + (f"  [{row.note}]" if row.note else ""), flush=True)

    def table(self) -> str:
        lines = ["| figure | eager | fast | unit | limit | fast / limit | note |",
                 "|---|---|---|---|---|---|---|"]
        for r in self.rows:
            lim = f"{r.limit_name} {fmt(r.limit)}" if r.limit is not None else ""
            lines.append(f"| {r.name} | {fmt(r.eager)} | {fmt(r.fast)} | {r.unit} | {lim} | "
                         f"{ratio(r.fast, r.limit) if r.limit is not None else ''} | {r.note} |")
        return "\n".join(lines)


def fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def ratio(a: float | None, b: float | None) -> str:
    if a is None or not b:
        return "-"
    return f"{a / b:.2f}"


_START = time.perf_counter()
_on_section: list = []  # called before each section (main saves the figures so far)


def section(title: str) -> None:
    for hook in _on_section:
        hook()
    print(f"\n== {title} [{time.perf_counter() - _START:.0f} s]", flush=True)


class guarded:
    """``with guarded("name"):`` prints a failing section's traceback and goes on with the next."""

    failures: list[str] = []

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, tb) -> bool:
        if error is None:
            return False
        import traceback

        traceback.print_exception(kind, error, tb)
        print(f"  !! section {self.name} failed: {kind.__name__}: {error}", flush=True)
        guarded.failures.append(f"{self.name}: {kind.__name__}: {error}")
        return not isinstance(error, KeyboardInterrupt)


# -- timing --------------------------------------------------------------------------------------


class Clock:
    """Device-aware timing: CUDA events on a GPU, the host clock elsewhere."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def median_s(self, fn, iters: int, warmup: int = 2) -> float:
        """Median seconds of ``fn()`` over ``iters`` calls (GPU time on CUDA)."""
        for _ in range(warmup):
            fn()
        self.sync()
        times = []
        for _ in range(iters):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    def graph_s(self, calls: list, replays: int = 10) -> float:
        """Seconds per call of ``calls`` captured in one CUDA graph (launch gaps removed)."""
        if not self.cuda:
            return self.median_s(lambda: [c() for c in calls], 3, 1) / len(calls)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for c in calls:
                c()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        total = self.median_s(graph.replay, replays, 2)
        del graph
        return total / len(calls)


# -- environment and ceilings --------------------------------------------------------------------


def show_environment(device: torch.device) -> dict:
    """:func:`environment`, printed a line a value."""
    env = environment(device)
    for key, value in env.items():
        print(f"  {key}: {value}")
    return env


def environment(device: torch.device) -> dict:
    env = {"python": platform.python_version(), "torch": torch.__version__,
           "triton": getattr(kernels.triton, "__version__", None), "cuda_runtime": torch.version.cuda,
           "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(card=props.name, sm_count=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), capability=f"{props.major}.{props.minor}")
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            env["nvidia_smi"] = out.stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = f"unavailable: {e}"
        env["gemv_tiles"] = f"tuned for {kernels.use_card_tiles(device) or 'H100 80GB HBM3 (built-in)'}"
    else:
        env["card"] = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return env


def copy_bandwidth(clock: Clock, device: torch.device) -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    n = (1 << 30 if clock.cuda else 1 << 26) // 2
    src = torch.randn(n, device=device, dtype=torch.float32).to(torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = clock.median_s(lambda: dst.copy_(src), 20 if clock.cuda else 5)
    return 2 * src.numel() * src.element_size() / seconds


def matmul_rate(clock: Clock, device: torch.device) -> float:
    """bf16 FLOP/s of a large square matrix product on random data."""
    n = 8192 if clock.cuda else 1024
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    seconds = clock.median_s(lambda: a @ b, 20 if clock.cuda else 3)
    return 2 * n**3 / seconds


# -- the model -----------------------------------------------------------------------------------


def random_model(args: QwenVLArgs, device: torch.device, dtype: torch.dtype, seed: int = 0) -> QwenVL:
    """The architecture of ``args`` with random weights made on ``device`` (the tiny checkpoint's
    scaling: fan-in normal, half gain into the residual streams, unit-ish norms)."""
    with torch.device("meta"):
        model = QwenVL(args)
    model = model.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            shape = tuple(p.shape)
            if name.endswith("attn_pool.pos_embed"):
                p.copy_(sincos_2d(args.vision.output_dim, args.vision.query_grid))
            elif name.endswith("wte.weight") or name.endswith("attn_pool.query"):
                p.normal_(0.0, 1.0, generator=gen)
            elif name == "lm_head.weight":
                p.normal_(0.0, 2.0 / math.sqrt(shape[1]), generator=gen)
            elif name.endswith("positional_embedding"):
                p.normal_(0.0, 0.5, generator=gen)
            elif len(shape) == 1 and ("ln_" in name):
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1 if name.endswith("weight") else 0.05,
                          generator=gen)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05, generator=gen)
            elif name.endswith("visual.proj"):
                p.normal_(0.0, 1.0 / math.sqrt(shape[0]), generator=gen)
            else:
                gain = 0.5 if name.endswith("c_proj.weight") or name.endswith("out_proj.weight") else 1.0
                p.normal_(0.0, gain / math.sqrt(math.prod(shape[1:])), generator=gen)
    model.transformer.visual.refresh_fixed_tensors()
    return model.eval().requires_grad_(False)


def vision_flops(v: VisionArgs) -> float:
    """Multiply-add FLOPs (x2) of one image through the vision tower and resampler."""
    p, w, f, d, q = v.num_patches, v.width, v.mlp_width, v.output_dim, v.n_queries
    conv = 2 * p * 3 * v.patch_size**2 * w
    block = 2 * p * w * 3 * w + 2 * p * w * w + 2 * 2 * p * w * f + 2 * 2 * p * p * w
    kv_proj = 2 * p * w * d if w != d else 0
    pool = 2 * q * d * d + 2 * 2 * p * d * d + 2 * 2 * q * p * d + 2 * q * d * d
    return conv + v.layers * block + kv_proj + pool + 2 * q * d * d


def llm_weight_bytes(model: QwenVL) -> int:
    """Bytes a decode step reads from the LLM's weights: every block, ln_f and lm_head (the
    embedding only gives one row per token, counted with the activations)."""
    total = 0
    for module in [*model.transformer.h, model.transformer.ln_f, model.lm_head]:
        buffers = [t for name, t in module.named_buffers() if "kv_cache" not in name]
        for t in [*module.parameters(), *buffers]:
            total += t.numel() * t.element_size()
    return total


def kv_bytes_per_token(args: QwenVLArgs, dtype: torch.dtype) -> int:
    llm = args.llm
    return 2 * llm.num_layers * llm.hidden_size * torch.tensor([], dtype=dtype).element_size()


# -- requests ------------------------------------------------------------------------------------


def seed_prompt(tok: QwenTokenizer) -> tuple[list[int], int]:
    """single_image.json as the seed's server builds it: ids and the first image slot."""
    nl = tok.encode("\n")
    ids = [tok.im_start_id, *tok.encode("system\nYou are a helpful assistant."), tok.im_end_id, *nl,
           tok.im_start_id, *tok.encode("user\nPicture 1: "), tok.img_start_id]
    slot = len(ids)
    ids += [tok.imgpad_id] * 256 + [tok.img_end_id, *tok.encode("\n" + QUESTION), tok.im_end_id, *nl,
                                    tok.im_start_id, *tok.encode("assistant\n")]
    return ids, slot


def job(rid: str, ids: list[int], slot: int, pixels: torch.Tensor, max_tokens: int) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_stop=True)
    return GenerationRequest(rid, ids, image_slots=[slot], images=[ImageInput(pixels, key=None)], sampling=params)


def text_job(rid: str, ids: list[int], max_tokens: int) -> GenerationRequest:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_stop=True)
    return GenerationRequest(rid, ids, sampling=params)


# -- the measurements ----------------------------------------------------------------------------


@dataclass
class Setup:
    args: QwenVLArgs
    model: QwenVL
    tok: QwenTokenizer
    device: torch.device
    dtype: torch.dtype
    clock: Clock
    bandwidth: float
    matmul: float
    ids: list[int]
    slot: int
    pixels: torch.Tensor  # [3, 448, 448] float32, CPU
    jpeg: bytes
    max_seq_len: int
    quick: bool


def make_engine(s: Setup, fast: bool, batch: int, start: bool, lookahead: bool | None = None) -> TorchEngine:
    return TorchEngine(s.model, s.tok, max_batch_size=batch, max_seq_len=s.max_seq_len, device=s.device,
                       dtype=s.dtype, feature_cache_images=0, fast_path=fast, cuda_graphs=fast,
                       lookahead=lookahead, start=start)


def reset_peak(s: Setup) -> None:
    if s.clock.cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(s: Setup) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if s.clock.cuda else None


def measure_vision(s: Setup, encode, batches: list[int]) -> dict[int, float]:
    """images/s of ``encode`` (pixels on the device -> features) per batch size (GPU time)."""
    out = {}
    for n in batches:
        px = s.pixels[None].expand(n, -1, -1, -1).to(s.device, s.dtype)
        px = px + 0.01 * torch.randn_like(px)
        iters = 3 if s.quick else (5 if n > 8 else 10)
        seconds = s.clock.median_s(lambda: encode(px), iters, 2)
        out[n] = n / seconds
    return out


def ttft_parts(s: Setup) -> dict[str, float]:
    """The fast path's first-token work for the 1-image prompt, piece by piece: GPU time (events)
    and wall time (host clock, synchronised) in ms."""
    fast = FastQwenVL(s.model)
    fast.setup_cache(2, s.max_seq_len)
    px = s.pixels[None].to(s.device, s.dtype)
    feats = fast.encode_images(px)
    ids = torch.tensor(s.ids, device=s.device)
    parts = {"vision (1 image)": lambda: fast.encode_images(px),
             "prefill (285 tokens)": lambda: fast.prefill(ids, 0, feats, [s.slot]),
             "pixels to device": lambda: s.pixels[None].to(s.device, s.dtype)}
    out = {}
    for name, fn in parts.items():
        out[f"{name} GPU ms"] = 1000 * s.clock.median_s(fn, 3 if s.quick else 10, 2)

        def wall() -> None:
            fn()
            s.clock.sync()

        out[f"{name} wall ms"] = 1000 * Clock(torch.device("cpu")).median_s(wall, 3 if s.quick else 10, 1)
    return out


def measure_ttft(s: Setup, fast: bool) -> tuple[float, float, dict]:
    """Median ms: pixels -> first token, JPEG bytes -> first token (engine thread, batch 2)."""
    from PIL import Image

    engine = make_engine(s, fast, 2, start=True)
    try:
        def from_pixels(pixels: torch.Tensor) -> tuple[float, dict]:
            t0 = time.perf_counter()
            result = engine.submit(job("t", s.ids, s.slot, pixels, 1)).result(timeout=600)
            return (time.perf_counter() - t0) * 1000, result.timings

        def from_jpeg() -> float:
            t0 = time.perf_counter()
            image = Image.open(io.BytesIO(s.jpeg))
            image.load()
            pixels = preprocess_image(image)
            engine.submit(job("j", s.ids, s.slot, pixels, 1)).result(timeout=600)
            return (time.perf_counter() - t0) * 1000

        n = 3 if s.quick else 7
        for _ in range(2):
            from_pixels(s.pixels)
        runs = [from_pixels(s.pixels + 0.001 * k) for k in range(n)]
        pixel_ms = statistics.median(r[0] for r in runs)
        timings = {key: statistics.median(r[1][key] for r in runs) for key in ("vision", "prefill", "ttft")}
        jpeg_ms = statistics.median(from_jpeg() for _ in range(n))
        return pixel_ms, jpeg_ms, timings
    finally:
        engine.close()


def measure_decode(s: Setup, fast: bool, batch: int, new_tokens: int, lookahead: bool | None = None) -> float:
    """Total decode tokens/s of ``batch`` forced ``new_tokens`` answers through engine.step()."""
    engine = make_engine(s, fast, batch, start=False, lookahead=lookahead)
    try:
        reqs = [job(f"d{i}", s.ids, s.slot, s.pixels + 0.001 * i, new_tokens) for i in range(batch)]
        futures = [engine.submit(r) for r in reqs]
        engine.step()  # vision + prefill of all, first tokens
        s.clock.sync()
        t0 = time.perf_counter()
        steps = 0
        while engine.has_work():
            engine.step()
            steps += 1
        s.clock.sync()
        elapsed = time.perf_counter() - t0
        tokens = sum(f.result().completion_tokens - 1 for f in futures)
        assert steps == new_tokens - 1, (steps, new_tokens)
        return tokens / elapsed
    finally:
        engine.close()


def spread(runs: list[float]) -> str:
    """``"; median of 3: 301-305"`` for a note, or nothing for one run."""
    return f"; median of {len(runs)}: {min(runs):.0f}-{max(runs):.0f}" if len(runs) > 1 else ""


def measure_graph_decode(s: Setup, batch: int, steps: int) -> float:
    """Tokens/s of the fast path's decode alone: graph replays feeding argmax on the device."""
    fast = FastQwenVL(s.model)
    fast.setup_cache(batch, s.max_seq_len)
    for slot in range(batch):
        fast.prefill(torch.tensor(s.ids[:-1], device=s.device), slot)
    tokens = torch.full((batch,), s.ids[-1], device=s.device)
    positions = torch.full((batch,), len(s.ids) - 1, device=s.device)
    slots = torch.arange(batch, device=s.device)

    def run() -> None:
        tok, pos = tokens, positions.clone()
        for _ in range(steps):
            tok = fast.decode(tok, pos, slots).argmax(-1)
            pos += 1

    seconds = s.clock.median_s(run, 1 if s.quick else 3, 1)
    return batch * steps / seconds


def measure_jobs(s: Setup, fast: bool, batch: int, jobs: int, new_tokens: int = 128) -> float:
    """jobs/s for ``jobs`` 1-image forced-``new_tokens`` jobs submitted at once (engine thread)."""
    engine = make_engine(s, fast, batch, start=True)
    try:
        for f in [engine.submit(job(f"w{i}", s.ids, s.slot, s.pixels - 0.001 * i, 4)) for i in range(batch)]:
            f.result(timeout=600)
        pixels = [s.pixels + 0.001 * (i + 1) for i in range(jobs)]
        s.clock.sync()
        t0 = time.perf_counter()
        futures = [engine.submit(job(f"j{i}", s.ids, s.slot, pixels[i], new_tokens)) for i in range(jobs)]
        for f in futures:
            f.result(timeout=600)
        return jobs / (time.perf_counter() - t0)
    finally:
        engine.close()


def forced_logits(m, s: Setup, feats: torch.Tensor, tokens: list[int] | None, steps: int = 16):
    """Prefill the 1-image prompt into slot 1 of ``m`` (a model or FastQwenVL, cache set up),
    then decode ``steps`` tokens: ``tokens`` if given (teacher forcing), else its own greedy ones.
    Returns (float32 logits of each step ``[steps + 1, V]``, the tokens fed)."""
    ids = torch.tensor(s.ids, device=s.device)
    rows, fed = [], []
    with torch.inference_mode():
        logits = m.prefill(ids, 1, feats, [s.slot]).float().clone()
        for i in range(steps + 1):
            rows.append(logits)
            if i == steps:
                break
            token = tokens[i] if tokens is not None else int(logits.argmax())
            fed.append(token)
            logits = m.decode(torch.tensor([0, token], device=s.device),
                              torch.tensor([0, len(s.ids) + i], device=s.device),
                              torch.arange(2, device=s.device), kv_len=s.max_seq_len)[1].float().clone()
    return torch.stack(rows), fed


def compare_logits(s: Setup) -> dict:
    """Logits of the fast and the eager bf16 paths against a float32 copy of the model, on the
    1-image prompt and 16 decode steps fed the float32 model's greedy tokens."""
    model = s.model
    feats = model.encode_images(s.pixels[None].to(s.device, s.dtype))
    out = {}
    with torch.device("meta"):
        ref = QwenVL(s.args)
    ref = ref.to_empty(device=s.device)  # float32
    ref.load_state_dict(model.state_dict())
    ref.eval().requires_grad_(False)
    ref.setup_cache(2, s.max_seq_len)
    ref_logits, tokens = forced_logits(ref, s, feats.float(), None)
    del ref
    if s.clock.cuda:
        torch.cuda.empty_cache()
    model.setup_cache(2, s.max_seq_len)
    eager_logits, _ = forced_logits(model, s, feats, tokens)
    fast = FastQwenVL(model)
    fast.setup_cache(2, s.max_seq_len)
    fast_logits, _ = forced_logits(fast, s, feats, tokens)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    for step, name in ((0, "prefill"), (1, "decode step 1")):
        out[f"{name}: rel err eager bf16 vs fp32"] = rel(eager_logits[step], ref_logits[step])
        out[f"{name}: rel err fast bf16 vs fp32"] = rel(fast_logits[step], ref_logits[step])
        out[f"{name}: rel err fast vs eager"] = rel(fast_logits[step], eager_logits[step])
        out[f"{name}: max abs fast vs eager"] = (fast_logits[step] - eager_logits[step]).abs().max().item()
    def agree(a: torch.Tensor, b: torch.Tensor) -> str:
        return f"{int((a.argmax(-1) == b.argmax(-1)).sum())}/{len(a)}"

    out["greedy steps agreeing with fp32 (eager)"] = agree(eager_logits, ref_logits)
    out["greedy steps agreeing with fp32 (fast)"] = agree(fast_logits, ref_logits)
    out["greedy steps fast == eager"] = agree(fast_logits, eager_logits)
    return out


# With the split-K sums done by the last program of each tile (no second launch), split-K and
# longer K blocks (int8: the same bytes per stage as bf16 at 256) are worth another look.
TILE_CANDIDATES = [(16, 32, 256, 4, 4, 1), (16, 64, 256, 4, 4, 1), (16, 32, 256, 4, 4, 2), (16, 32, 256, 4, 4, 4),
                   (16, 32, 512, 4, 3, 2)]
SWEEP_LAYERS = ("c_attn", "c_proj", "gate_up", "down")  # lm_head keeps its built-in tile
ATTENTION_CANDIDATES = [(16, 64, 4), (32, 32, 4), (32, 64, 4), (8, 64, 4), (16, 32, 2), (32, 32, 2), (64, 16, 2),
                        (8, 32, 2), (16, 16, 2), (16, 32, 4), (32, 16, 2), (16, 16, 1)]


def llm_shapes(args: QwenVLArgs) -> dict[str, tuple[int, int]]:
    llm = args.llm
    return {"c_attn": (3 * llm.hidden_size, llm.hidden_size), "c_proj": (llm.hidden_size, llm.hidden_size),
            "gate_up": (2 * llm.mlp_dim, llm.hidden_size), "down": (llm.hidden_size, llm.mlp_dim),
            "lm_head": (llm.vocab_size, llm.hidden_size)}


def sweep_tiles(s: Setup, candidates: list[tuple]) -> list[dict]:
    """For each LLM weight shape, bf16 and int8: GB/s (weight bytes / time, CUDA graph of calls
    over rotating copies bigger than L2) of cuBLAS and of the Triton GEMV with each candidate
    tile shape, at 1 and 2 rows. The best tiles go into ``kernels.TILES`` for this run."""
    rows = []
    for name, (n, k) in llm_shapes(s.args).items():
        if name not in SWEEP_LAYERS:
            continue
        gated = name == "gate_up"  # decode runs it with the gate in the epilogue
        copies = max(1, math.ceil(256e6 / (n * k * 2))) if s.clock.cuda else 1  # past L2
        weights = [torch.randn(n, k, device=s.device, dtype=s.dtype) for _ in range(copies)]
        quant = [kernels.quantize_int8(w) for w in weights]
        xs = {m: torch.randn(m, k, device=s.device, dtype=s.dtype) for m in (1, 2)}
        cublas = [n * k * 2 / s.clock.graph_s([lambda w=w, m=m: torch.nn.functional.linear(xs[m], w) for w in weights])
                  / 1e9 for m in (1, 2)]
        for kind, nbytes, calls in (
                ("bf16", n * k * 2, lambda cfg, m: [lambda w=w: kernels._matmul(xs[m], w, None, None, cfg, gated)
                                                    for w in weights]),
                ("int8", n * k + n * 4, lambda cfg, m: [lambda q=q, sc=sc: kernels._matmul(xs[m], q, sc, None, cfg,
                                                                                           gated)
                                                        for q, sc in quant])):
            results = {}
            for cfg in candidates if kernels.triton_ok(xs[1]) else []:
                try:
                    results[cfg] = [nbytes / s.clock.graph_s(calls(cfg, m)) / 1e9 for m in (1, 2)]
                except Exception as e:  # e.g. out of shared memory: not a candidate here
                    print(f"   {name} {kind} {cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
            if not results:
                continue
            best = max(results, key=lambda c: sum(results[c]))
            kernels.TILES[(n, k, 2 if kind == "bf16" else 1)] = best
            top = sorted(results.items(), key=lambda kv: -sum(kv[1]))[:3]
            row = {"layer": name, "N": n, "K": k, "weights": kind, "best": best, "GBps_M1_M2": results[best],
                   "cublas_bf16_GBps_M1_M2": cublas, "all": {str(c): v for c, v in results.items()}}
            rows.append(row)
            print(f"   {name} [{n}x{k}] {kind}: best {best} -> {results[best][0]:.0f}/{results[best][1]:.0f} GB/s "
                  f"(M=1/2); cuBLAS bf16 {cublas[0]:.0f}/{cublas[1]:.0f}; next: "
                  + "; ".join(f"{c} {v[0]:.0f}/{v[1]:.0f}" for c, v in top[1:]), flush=True)
    return rows


def attention_alone(clock: Clock, device: torch.device, dtype: torch.dtype, heads: int, d: int, rotary_base: float,
                    check=None) -> list[dict]:
    """The decode attention as set now (``kernels.rotary_attention``: rotary, cache write and
    attention in one launch) timed alone, at 1 and 2 rows of 350 and 800 positions: us per call in
    a CUDA graph of 20 calls, and GB/s of keys and values read. ``check`` is first called with each
    case's arguments."""
    k_cache = torch.randn(2, heads, 4096, d, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    inv_freq = torch.stack([rotary_inv_freq(d, rotary_base, 1.0, device)] * 2)
    logn = torch.ones(4096, device=device)
    rows = []
    for batch in (1, 2):
        qkv = torch.randn(batch, 3 * heads * d, device=device, dtype=dtype)
        slots = torch.arange(batch, device=device)
        for length in (350, 800):
            inputs = (qkv, torch.full((batch,), length - 1, device=device), slots, inv_freq, logn, k_cache, v_cache,
                      heads)
            if check is not None:
                check(*inputs)
            t = clock.graph_s([lambda: kernels.rotary_attention(*inputs)] * 20)
            kv = 2 * batch * heads * length * d * 2
            rows.append({"B": batch, "length": length, "us": t * 1e6, "GBps": kv / t / 1e9})
    return rows


def sweep_attention(s: Setup, candidates: list[tuple]) -> list[dict]:
    """The Triton decode attention (:func:`attention_alone`; it runs where the CUDA kernel does
    not) per (split, block, warps); the best by the sum of the four times is kept."""
    llm = s.args.llm
    rows, totals = [], {}
    for cfg in candidates:
        kernels.ATTENTION_SPLITS, kernels.ATTENTION_BLOCK, kernels.ATTENTION_WARPS = cfg
        with kernels.attention_kernel("triton"):
            times = attention_alone(s.clock, s.device, s.dtype, llm.num_heads, llm.head_dim, llm.rotary_emb_base)
        rows += [{"config": cfg, **r} for r in times]
        totals[cfg] = sum(r["us"] for r in times)
        print(f"   attention {cfg}: " + ", ".join(f"B={r['B']} L={r['length']} {r['us']:.1f} us" for r in times),
              flush=True)
    best = min(totals, key=totals.get)
    kernels.ATTENTION_SPLITS, kernels.ATTENTION_BLOCK, kernels.ATTENTION_WARPS = best
    print(f"   attention: keeping {best}")
    return rows


def separate_launches(tiles: dict, attention: tuple):
    """The kernels as before the fused epilogues: separate gate, split-K sum and combine
    launches, with ``tiles`` and ``attention`` (split, block, warps)."""
    split, block, warps = attention
    return kernels.settings(FUSED_EPILOGUES=False, TILES=dict(tiles), ATTENTION_SPLITS=split, ATTENTION_BLOCK=block,
                            ATTENTION_WARPS=warps)


def bits_report(fused, separate: torch.Tensor, repeats: int, against: str = "separate") -> str:
    """``fused()`` against ``separate`` bit for bit, and ``repeats`` more calls against its first
    answer (a race between a tile's programs would move bits)."""
    first, runs = repeat_check(fused, repeats)
    rel = ((first.float() - separate.float()).norm() / separate.float().norm()).item()
    return (f"equal to {against}: {torch.equal(first, separate)} (rel diff {rel:.1e}), "
            f"runs that differ: {runs['runs that differ']}")


def fused_epilogue_checks(s: Setup, repeats: int = 20) -> dict:
    """On the device: each fused epilogue against the separate launches, bit for bit, and the
    fused version ``repeats`` times over (a race between a tile's programs would move bits).
    Uses the tiles of this run, the layer shapes, 1 and 2 rows, bf16 and int8 weights."""
    out = {}
    shapes = llm_shapes(s.args)
    for name in SWEEP_LAYERS:
        n, k = shapes[name]
        w = torch.randn(n, k, device=s.device, dtype=s.dtype) / math.sqrt(k)
        q, sc = kernels.quantize_int8(w)
        for kind, weight, scale in (("bf16", w, None), ("int8", q, sc)):
            for m in (1, 2):
                x = torch.randn(m, k, device=s.device, dtype=s.dtype)
                gated = name == "gate_up"

                def fused():
                    return kernels._matmul(x, weight, scale, None, None, gated)

                with kernels.fused_epilogues(False):
                    separate = kernels._matmul(x, weight, scale, None, None)
                    separate = kernels.silu_mul(separate) if gated else separate
                out[f"{name} {kind} M={m} {kernels.few_rows_tiles(n, k, weight.element_size())}"] = bits_report(
                    fused, separate, repeats)
    llm = s.args.llm
    k_cache = torch.randn(2, llm.num_heads, 1024, llm.head_dim, device=s.device, dtype=s.dtype)
    v_cache = torch.randn_like(k_cache)
    for lengths in ([800], [800, 37], [1, 1000]):
        b = len(lengths)
        q = torch.randn(b, llm.num_heads, llm.head_dim, device=s.device, dtype=s.dtype)
        slots, lens = torch.arange(b, device=s.device), torch.tensor(lengths, device=s.device)
        with kernels.fused_epilogues(False):
            separate = kernels.decode_attention(q, k_cache, v_cache, slots, lens)
        out[f"attention lengths {lengths}"] = bits_report(
            lambda: kernels.decode_attention(q, k_cache, v_cache, slots, lens), separate, repeats)
    heads, d = llm.num_heads, llm.head_dim
    inv_freq = torch.stack([rotary_inv_freq(d, llm.rotary_emb_base, alpha, s.device) for alpha in (1.0, 1.7)])
    logn = 1 + 0.05 * torch.rand(k_cache.shape[2], device=s.device)  # query scales, as the model's logn
    for positions in ([799], [799, 36], [0, 999]):
        b = len(positions)
        qkv = torch.randn(b, 3 * heads * d, device=s.device, dtype=s.dtype)
        slots, pos = torch.arange(b, device=s.device), torch.tensor(positions, device=s.device)
        sep_k, sep_v = k_cache.clone(), v_cache.clone()
        q = kernels.rotary_to_cache(qkv, pos, slots, inv_freq, logn, sep_k, sep_v, heads)
        separate = kernels.decode_attention(q, sep_k, sep_v, slots, pos + 1)
        fused_k, fused_v = k_cache.clone(), v_cache.clone()
        with kernels.attention_kernel("triton"):  # the Triton kernel's epilogue (the CUDA one: attention_bench)
            report = bits_report(lambda: kernels.rotary_attention(qkv, pos, slots, inv_freq, logn, fused_k, fused_v,
                                                                  heads), separate, repeats,
                                 "rotary_to_cache + decode_attention")
        same_cache = torch.equal(fused_k, sep_k) and torch.equal(fused_v, sep_v)  # every run writes the same
        out[f"rotary + attention, positions {positions}"] = f"{report}, same cache: {same_cache}"
    s.clock.sync()
    return out


def separate_then_fused_us(clock: Clock, calls: list) -> tuple[float, float]:
    """us per call of ``calls`` (one CUDA graph) with the separate launches, then fused."""
    with kernels.fused_epilogues(False):
        before = clock.graph_s(calls)
    with kernels.fused_epilogues(True):
        after = clock.graph_s(calls)
    return before * 1e6, after * 1e6


def fused_epilogue_times(s: Setup, tiles: dict, attention: tuple) -> dict:
    """us per call, separate launches vs fused, with the built-in tiles for both: the gate of
    [w1 | w2], MLP c_proj (split-K), decode attention (800 positions); 1 and 2 rows, bf16/int8."""
    out = {}
    shapes = llm_shapes(s.args)
    llm = s.args.llm
    with separate_launches(tiles, attention):  # same tiles both ways, only the epilogues differ
        for name in ("gate_up", "down"):
            n, k = shapes[name]
            copies = max(1, math.ceil(256e6 / (n * k * 2))) if s.clock.cuda else 1  # past L2
            weights = [torch.randn(n, k, device=s.device, dtype=s.dtype) for _ in range(copies)]
            for kind, layers in (("bf16", [(w, None) for w in weights]),
                                 ("int8", [kernels.quantize_int8(w) for w in weights])):
                for m in (1, 2):
                    x = torch.randn(m, k, device=s.device, dtype=s.dtype)
                    if name == "gate_up":
                        calls = [lambda w=w, sc=sc: kernels.gated_linear(x, w, sc) if sc is not None
                                 else kernels.gated_linear(x, w) for w, sc in layers]
                    else:
                        calls = [lambda w=w, sc=sc: kernels._matmul(x, w, sc, None, None) for w, sc in layers]
                    out[f"{name} {kind} M={m}"] = separate_then_fused_us(s.clock, calls)
            del weights
        k_cache = torch.randn(2, llm.num_heads, 4096, llm.head_dim, device=s.device, dtype=s.dtype)
        v_cache = torch.randn_like(k_cache)
        for b in (1, 2):
            q = torch.randn(b, llm.num_heads, llm.head_dim, device=s.device, dtype=s.dtype)
            slots, lens = torch.arange(b, device=s.device), torch.full((b,), 800, device=s.device)
            calls = [lambda: kernels.decode_attention(q, k_cache, v_cache, slots, lens)] * 20
            out[f"attention B={b} 800 positions"] = separate_then_fused_us(s.clock, calls)
    return out


def int8_kernel_check(s: Setup) -> float:
    """Worst relative error of the int8 kernel against float32 math on each LLM shape."""
    worst = 0.0
    shapes = llm_shapes(s.args)
    for n, k in (shapes["c_attn"], shapes["down"], shapes["gate_up"]):
        w = torch.randn(n, k, device=s.device, dtype=s.dtype)
        q, sc = kernels.quantize_int8(w)
        for m in (1, 3, 40):
            x = torch.randn(m, k, device=s.device, dtype=s.dtype)
            y = kernels.int8_linear(x, q, sc).float()
            ref = x.float() @ (kernels.int8_weights(q) * sc[:, None]).T
            worst = max(worst, ((y - ref).norm() / ref.norm()).item())
    return worst


def parse_cuda_tile(text: str) -> tuple[tuple[int, int, int], cuda_gemv.CudaTile]:
    """``"N,K,M=WROWS,UNROLL,THREADS[,KSPLIT[,BLOCKS_PER_SM]]"`` -> ``((N, K, M), CudaTile(WROWS,
    UNROLL, THREADS, KSPLIT, BLOCKS_PER_SM))``."""
    shape, _, tile = text.partition("=")
    key = tuple(int(v) for v in shape.split(","))
    values = tuple(int(v) for v in tile.split(","))
    if len(key) != 3 or not 1 <= len(values) <= 5:
        raise SystemExit(f"a CUDA tile is N,K,M=WROWS,UNROLL,THREADS[,KSPLIT[,BLOCKS_PER_SM]], not {text!r}")
    return key, cuda_gemv.CudaTile(*values)


# -- main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=None, help="config.json of the architecture")
    parser.add_argument("--tiny", action="store_true", help="the tiny checkpoint's config (debugging)")
    parser.add_argument("--tokenizer", type=Path, default=None)
    parser.add_argument("--image", type=Path, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--decode-tokens", default="128,512")
    parser.add_argument("--job-batches", default="2,4,8")
    parser.add_argument("--jobs-per-slot", type=int, default=6)
    parser.add_argument("--skip", default="",
                        help="comma list of sections to skip: eager,sweep,fusions,vision,ttft,variants,jobs,int8,gemv")
    parser.add_argument("--keep-tiles", action="store_true",
                        help="sweep for information only: keep the built-in tiles for the measurements")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (debugging)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="measure fast bf16 decode and each int8 decode variant this many times (interleaved) "
                             "and report the median")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--cuda-tiles", action="append", default=[], metavar="N,K,M=WROWS,UNROLL,THREADS[,KSPLIT]",
                        help="also measure int8 decode with this CUDA GEMV tile in place of the built-in one for "
                             "that shape (repeatable; all given tiles make one variant)")
    parser.add_argument("--norm-tiles", action="append", default=[],
                        metavar="N,K,M=WROWS,UNROLL,THREADS[,KSPLIT[,BLOCKS_PER_SM]]",
                        help="also measure int8 decode (engine and graph replay) with this tile in place of the "
                             "built-in one for that shape's GEMV with the RMSNorm inside (kernels.NORM_TILES; "
                             "repeatable; all given tiles make one setting), interleaved, for a before / after")
    parser.add_argument("--separate-norms", action="store_true",
                        help="also measure int8 decode (engine and graph replay) with the RMSNorms as their own "
                             "launches instead of inside the CUDA GEMVs, interleaved, for a before / after")
    parser.add_argument("--triton-attention", action="store_true",
                        help="also measure decode (bf16 and int8, engine and graph replay) with the Triton decode "
                             "attention in place of the CUDA one, interleaved, for a before / after")
    a = parser.parse_args(argv)
    skip = set(filter(None, a.skip.split(",")))

    device = torch.device(a.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if a.tiny:
        from engine_build.tiny_model import TINY_CONFIG

        config: object = TINY_CONFIG
    else:
        config = a.config or first_existing(DEVICE_DIR / "config.json", SHARED / "qwen-vl" / "config.json")
    tok_path = a.tokenizer or first_existing(DEVICE_DIR / "qwen.tiktoken", SHARED / "qwen-vl" / "qwen.tiktoken")
    image_path = a.image or first_existing(DEVICE_DIR / "demo.jpeg", SHARED / "images" / "demo.jpeg")
    args = QwenVLArgs.from_hf_config(config)
    clock = Clock(device)
    report = Report()

    def save() -> None:  # every figure so far: a run cut short still leaves them
        if a.json:
            a.json.parent.mkdir(parents=True, exist_ok=True)
            a.json.write_text(json.dumps({"info": report.info, "rows": [r.__dict__ for r in report.rows],
                                          "failures": guarded.failures}, indent=1, default=str))

    _on_section[:] = [save]

    section("environment")
    env = show_environment(device)
    print(f"  command: python -m benchmarks.engine_bench {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(f"  config: {config if not a.tiny else 'tiny'}; dtype {dtype}; max_seq_len {a.max_seq_len}")
    print(f"  decode GEMV: {kernels.DENSE_GEMV} (bf16), int8 {kernels.INT8_GEMV} "
          f"({len(kernels.INT8_GEMV_BY_SHAPE)} shapes set apart); attention (split, block, warps) "
          f"{(kernels.ATTENTION_SPLITS, kernels.ATTENTION_BLOCK, kernels.ATTENTION_WARPS)}")
    report.info["environment"] = env

    section("ceilings")
    bandwidth, matmul = copy_bandwidth(clock, device), matmul_rate(clock, device)
    print(f"  copy bandwidth (read + write): {bandwidth / 1e12:.3f} TB/s")
    print(f"  bf16 matmul ({'8192' if clock.cuda else '1024'}^3, random): {matmul / 1e12:.1f} TFLOP/s")
    report.info.update(bandwidth_TBps=bandwidth / 1e12, matmul_TFLOPs=matmul / 1e12)

    section("model")
    t0 = time.perf_counter()
    model = random_model(args, device, dtype)
    clock.sync()
    tok = QwenTokenizer.from_file(tok_path)
    ids, slot = seed_prompt(tok)
    from PIL import Image

    jpeg = image_path.read_bytes()
    pixels = preprocess_image(Image.open(io.BytesIO(jpeg)))
    weights = llm_weight_bytes(model)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"  built in {time.perf_counter() - t0:.1f} s: {n_params / 1e9:.3f} B parameters, LLM weights read "
          f"per decode step {weights / 1e9:.3f} GB; prompt {len(ids)} tokens (seed: {SEED_PROMPT_TOKENS})")
    if not a.tiny and len(ids) != SEED_PROMPT_TOKENS:
        print(f"  WARNING: the prompt has {len(ids)} tokens, not {SEED_PROMPT_TOKENS}")
    if clock.cuda:
        print(f"  GPU memory after build: {torch.cuda.memory_allocated() / 2**30:.1f} GiB")
    s = Setup(args, model, tok, device, dtype, clock, bandwidth, matmul, ids, slot, pixels, jpeg,
              a.max_seq_len, a.quick)
    report.info.update(params=n_params, llm_weight_bytes=weights, prompt_tokens=len(ids))
    kv_token = kv_bytes_per_token(args, dtype)
    decode_rates: dict[tuple, float] = {}  # bf16 tok/s per (batch, new tokens[, "triton" attention])
    graph_rates: dict[object, float] = {}  # bf16 tok/s replaying the graph alone, per batch (or (batch, "triton"))

    builtin = (dict(kernels.TILES), kernels.ATTENTION_SPLITS, kernels.ATTENTION_BLOCK, kernels.ATTENTION_WARPS)
    fusions = "fusions" not in skip and kernels.triton_ok(torch.empty(1, device=device))
    if "sweep" not in skip and kernels.triton_ok(torch.empty(1, device=device)):
        with guarded("tile sweep"):
            section("tile sweep: Triton GEMV tiles per weight shape (GB/s = weight bytes / time)")
            report.info["tiles"] = sweep_tiles(s, TILE_CANDIDATES[:3] if a.quick else TILE_CANDIDATES)
            report.info["attention"] = sweep_attention(s, ATTENTION_CANDIDATES[:2] if a.quick else ATTENTION_CANDIDATES)
            if a.keep_tiles:
                print("  sweep best (not applied): TILES = {"
                      + ", ".join(f"{k}: {v}" for k, v in sorted(kernels.TILES.items())) + "}")
                kernels.TILES.clear()
                kernels.TILES.update(builtin[0])
                kernels.ATTENTION_SPLITS, kernels.ATTENTION_BLOCK, kernels.ATTENTION_WARPS = builtin[1:]
            print("  chosen: TILES = {" + ", ".join(f"{k}: {v}" for k, v in sorted(kernels.TILES.items())) + "}")
            attention = (kernels.ATTENTION_SPLITS, kernels.ATTENTION_BLOCK, kernels.ATTENTION_WARPS)
            print(f"  chosen: ATTENTION = {attention}")

    if fusions:
        with guarded("fusions"), int8_gemv("dot"):  # the tensor-core kernel's epilogues
            section("fused epilogues on the device: bits against the separate launches, repeated")
            checks = fused_epilogue_checks(s)
            for key, value in checks.items():
                print(f"  {key}: {value}")
            report.info["fused_checks"] = checks
            section("fused epilogues: us per call, separate launches -> fused (built-in tiles both ways)")
            times = fused_epilogue_times(s, builtin[0], builtin[1:])
            for key, (before, after) in times.items():
                print(f"  {key}: {before:.1f} -> {after:.1f} us")
            report.info["fused_times_us"] = times

    with guarded("correctness"):
        section("correctness: logits against a float32 copy (bf16 noise: rel err ~1e-2)")
        for key, value in compare_logits(s).items():
            print(f"  {key}: {value}")
            report.info.setdefault("correctness", {})[key] = value

    if "vision" not in skip:
        with guarded("vision"):
            section("vision tower (eager module; fast = graphs up to 4 images)")
            flops = vision_flops(args.vision)
            print(f"  {flops / 1e12:.3f} TFLOP per image")
            batches = [1, 2, 26]
            fast_encoder = FastQwenVL(model)
            fast_encoder.setup_cache(1, 64)
            eager_vision = measure_vision(s, model.encode_images, batches) if "eager" not in skip else {}
            fast_vision = measure_vision(s, fast_encoder.encode_images, batches)
            del fast_encoder
            for n in batches:
                report.add(Row(f"vision images/s, batch {n}", eager_vision.get(n), fast_vision[n], "img/s",
                               VISION_MATMUL_SHARE * matmul / flops if n == 26 else None, "60% of matmul rate",
                               f"{fast_vision[n] * flops / matmul:.0%} of the matmul rate"))

    if "ttft" not in skip:
        with guarded("ttft"):
            section("time to first token, 1 image, %d tokens (engine thread, max_batch_size 2)" % len(ids))
            for key, value in ttft_parts(s).items():
                print(f"  fast path part: {key}: {value:.2f}")
                report.info.setdefault("ttft_parts", {})[key] = value
            reset_peak(s)
            eager_ttft = measure_ttft(s, False) if "eager" not in skip else (None, None, {})
            fast_ttft = measure_ttft(s, True)
            report.add(Row("TTFT from preprocessed pixels", eager_ttft[0], fast_ttft[0], "ms", TTFT_LIMIT_MS, "limit",
                           "engine timings (fast): " + ", ".join(f"{k} {v:.1f}" for k, v in fast_ttft[2].items())))
            report.add(Row("TTFT from the JPEG (decode + preprocess on the caller)", eager_ttft[1], fast_ttft[1], "ms"))

    with guarded("decode"):
        section("decode, forced new tokens (engine.step(), max_batch_size = batch)")
        for new_tokens in [int(v) for v in a.decode_tokens.split(",")]:
            for batch in (1, 2):
                avg_len = len(ids) + new_tokens / 2
                roofline = batch * bandwidth / (weights + batch * kv_token * avg_len)
                eager = measure_decode(s, False, batch, new_tokens) if "eager" not in skip else None
                runs, before = [], []
                for _ in range(a.repeats):  # interleaved with the Triton attention's runs, if asked
                    runs.append(measure_decode(s, True, batch, new_tokens))
                    if a.triton_attention:
                        with kernels.attention_kernel("triton"):
                            before.append(measure_decode(s, True, batch, new_tokens))
                fast = decode_rates[(batch, new_tokens)] = statistics.median(runs)
                report.add(Row(f"decode tok/s, batch {batch}, {new_tokens} new tokens", eager, fast, "tok/s",
                               roofline, "roofline", f"fast = {fast / roofline:.0%} of roofline, target 85%"
                               + spread(runs)))
                if before:
                    rate = decode_rates[(batch, new_tokens, "triton")] = statistics.median(before)
                    report.add(Row(f"decode tok/s, batch {batch}, {new_tokens} new tokens, Triton attention", None,
                                   rate, "tok/s", roofline, "roofline", f"{rate / roofline:.0%} of roofline"
                                   + spread(before)))
        for batch in (1, 2):
            roofline = batch * bandwidth / (weights + batch * kv_token * (len(ids) + 64))
            rate = graph_rates[batch] = measure_graph_decode(s, batch, 128)
            report.add(Row(f"decode tok/s, batch {batch}, graph replay only (no engine)", None, rate, "tok/s",
                           roofline, "roofline", f"{rate / roofline:.0%} of roofline"))
            if a.triton_attention:
                with kernels.attention_kernel("triton"):
                    rate = graph_rates[(batch, "triton")] = measure_graph_decode(s, batch, 128)
                report.add(Row(f"decode tok/s, batch {batch}, graph replay only, Triton attention", None, rate,
                               "tok/s", roofline, "roofline", f"{rate / roofline:.0%} of roofline"))
        if fusions:
            with separate_launches(builtin[0], builtin[1:]):
                for batch in (1, 2):
                    roofline = batch * bandwidth / (weights + batch * kv_token * (len(ids) + 64))
                    rate = measure_decode(s, True, batch, 128)
                    report.add(Row(f"decode tok/s, batch {batch}, 128 new tokens, BEFORE (separate launches, "
                                   "built-in tiles)", None, rate, "tok/s", roofline, "roofline",
                                   f"{rate / roofline:.0%} of roofline"))
                    rate = measure_graph_decode(s, batch, 128)
                    report.add(Row(f"decode tok/s, batch {batch}, graph replay only, BEFORE", None, rate, "tok/s",
                                   roofline, "roofline", f"{rate / roofline:.0%} of roofline"))
        if clock.cuda and "variants" not in skip:
            for batch in (1, 2):
                rate = measure_decode(s, True, batch, 128, lookahead=False)
                roofline = batch * bandwidth / (weights + batch * kv_token * (len(ids) + 64))
                report.add(Row(f"decode tok/s, batch {batch}, 128 new tokens, without lookahead", None, rate,
                               "tok/s", roofline, "roofline", f"{rate / roofline:.0%} of roofline"))
            with kernels.settings(DENSE_GEMV="cublas"):
                for batch in (1, 2):
                    rate = measure_decode(s, True, batch, 128)
                    roofline = batch * bandwidth / (weights + batch * kv_token * (len(ids) + 64))
                    report.add(Row(f"decode tok/s, batch {batch}, 128 new tokens, cuBLAS GEMV instead", None, rate,
                                   "tok/s", roofline, "roofline", f"{rate / roofline:.0%} of roofline"))
        report.info["peak_gib_ttft_decode"] = peak_gib(s)

    if "jobs" not in skip:
        with guarded("jobs"):
            section("jobs/s: stream of 1-image 128-token jobs (engine thread)")
            for batch in [int(v) for v in a.job_batches.split(",")]:
                jobs = (2 if a.quick else a.jobs_per_slot) * batch
                reset_peak(s)
                eager = measure_jobs(s, False, batch, jobs) if ("eager" not in skip and batch == 2) else None
                fast = measure_jobs(s, True, batch, jobs)
                report.add(Row(f"jobs/s, max_batch_size {batch} ({jobs} jobs)", eager, fast, "jobs/s",
                               JOBS_PER_S_TARGET if batch == 2 else None, "target 6 x 0.38",
                               f"peak GPU memory {fmt(peak_gib(s))} GiB"))

    if "int8" not in skip:
        with guarded("int8"):
            section("int8 weight-only LLM (the fast path)")
            quantize_llm(model)
            assert isinstance(model.lm_head, Int8Linear)
            if clock.cuda:
                torch.cuda.empty_cache()
            print(f"  int8 kernel vs float32 math, worst relative error: {int8_kernel_check(s):.2e}")
            int8_weights = llm_weight_bytes(model)
            print(f"  LLM weights read per decode step: {int8_weights / 1e9:.3f} GB")
            # GEMV variants: "chosen" (per shape, from the timings below), the built-in choice, all "dot",
            # all "fma", all "cuda"
            built_in = (kernels.INT8_GEMV, dict(kernels.INT8_GEMV_BY_SHAPE), dict(kernels.FMA_TILES),
                        dict(kernels.CUDA_TILES), dict(kernels.MMA_TILES))
            variants = {"chosen": built_in}
            if "gemv" not in skip and kernels.triton_ok(torch.empty(1, device=device)):
                with guarded("int8 GEMV variants"):
                    section("int8 decode GEMVs, tensor cores ('dot') vs FMA (Triton) vs CUDA C++, per shape: us per "
                            "call in a CUDA graph, GB/s of weight bytes, max error in bf16 ulps of float64 math")
                    result = gemv_variants(llm_shapes(args), device, dtype, clock.graph_s, quick=a.quick)
                    report.info["gemv_variants"] = {
                        **result, "choice": {str(k): v for k, v in result["choice"].items()},
                        "fma_tiles": {str(k): list(v) for k, v in result["fma_tiles"].items()},
                        "cuda_tiles": {str(k): list(v) for k, v in result["cuda_tiles"].items()},
                        "mma_tiles": {str(k): list(v) for k, v in result["mma_tiles"].items()}}
                    print("\n".join(gemv_summary_lines(result)))
                    print("  worst error, int8, bf16 ulps of float64 math (picked tiles): "
                          + ", ".join(f"{k} {v:.2f}" for k, v in result["worst_ulp"].items()))
                    print(f"  chosen: INT8_GEMV_BY_SHAPE = {result['choice']}")
                    print(f"  chosen: FMA_TILES = {result['fma_tiles']}")
                    print(f"  chosen: CUDA_TILES = {result['cuda_tiles']}")
                    print(f"  chosen: MMA_TILES = {result['mma_tiles']}")
                    tiles = {**kernels.FMA_TILES, **result["fma_tiles"]}
                    cuda_tiles = {**kernels.CUDA_TILES, **result["cuda_tiles"]}
                    mma_tiles = {**kernels.MMA_TILES, **result["mma_tiles"]}
                    variants = {"chosen": ("dot", result["choice"], tiles, cuda_tiles, mma_tiles),
                                "built-in choice": built_in,
                                "all dot": ("dot", {}, tiles, cuda_tiles), "all fma": ("fma", {}, tiles, cuda_tiles)}
                    if result["cuda_tiles"]:
                        variants["all cuda"] = ("cuda", {}, tiles, cuda_tiles)
            if a.cuda_tiles:  # the built-in choice with the given CUDA tiles, for a before / after
                given = dict(parse_cuda_tile(t) for t in a.cuda_tiles)
                variants["with --cuda-tiles"] = (*built_in[:3], {**built_in[3], **given}, built_in[4])
            # The decode settings beside the built-in one (the "chosen" GEMVs with another attention kernel,
            # the RMSNorms apart or other tiles for the GEMVs with the norm inside), as (attention kernel,
            # norms inside the GEMVs, NORM_TILES), by label suffix.
            norm_tiles = dict(kernels.NORM_TILES)
            settings = {"": (kernels.DECODE_ATTENTION, kernels.NORM_IN_GEMV, norm_tiles)}
            if a.triton_attention:
                settings[", Triton attention"] = ("triton", kernels.NORM_IN_GEMV, norm_tiles)
            if a.separate_norms:
                settings[", RMSNorms apart"] = (kernels.DECODE_ATTENTION, False, norm_tiles)
            if a.norm_tiles:
                given = dict(parse_cuda_tile(t) for t in a.norm_tiles)
                settings[", --norm-tiles"] = (kernels.DECODE_ATTENTION, kernels.NORM_IN_GEMV, {**norm_tiles, **given})
            setting_of = {label: settings[""] for label in variants}
            for suffix, setting in list(settings.items())[1:]:
                variants[f"chosen{suffix}"] = variants["chosen"]
                setting_of[f"chosen{suffix}"] = setting
            section("int8 decode (engine; each engine's CUDA graphs hold the GEMV variant it was built with)")
            reset_peak(s)
            for new_tokens in [int(v) for v in a.decode_tokens.split(",")]:
                for batch in (1, 2):
                    avg_len = len(ids) + new_tokens / 2
                    roofline = batch * bandwidth / (int8_weights + batch * kv_token * avg_len)
                    bf16 = decode_rates.get((batch, new_tokens))
                    runs = {label: [] for label in variants}
                    for _ in range(a.repeats):  # interleaved, so that a drift of the card hits every variant
                        for label, variant in variants.items():
                            attention, norms, tiles = setting_of[label]
                            with int8_gemv(*variant), kernels.attention_kernel(attention), \
                                    kernels.norms_in_gemv(norms), kernels.norm_tiles(tiles):
                                runs[label].append(measure_decode(s, True, batch, new_tokens))
                    for label in variants:
                        rate = statistics.median(runs[label])
                        name = f"int8 decode tok/s, batch {batch}, {new_tokens} new tokens"
                        chosen_above = "gemv_variants" in report.info and label == "chosen"
                        base = (decode_rates.get((batch, new_tokens, "triton"), bf16)  # bf16 with the same attention
                                if setting_of[label][0] == "triton" else bf16)
                        report.add(Row(name if label == "chosen" else f"{name}, GEMV {label}", None, rate, "tok/s",
                                       INT8_SPEEDUP * base if base else None, "1.7 x bf16",
                                       (f"{rate / base:.2f} x bf16 fast; " if base else "")
                                       + f"{rate / roofline:.0%} of int8 roofline"
                                       + ("; GEMV per shape as chosen above" if chosen_above else "")
                                       + spread(runs[label])))
            if fusions:
                with separate_launches(builtin[0], builtin[1:]), int8_gemv("dot"):
                    for batch in (1, 2):
                        roofline = batch * bandwidth / (int8_weights + batch * kv_token * (len(ids) + 64))
                        rate = measure_decode(s, True, batch, 128)
                        bf16 = decode_rates.get((batch, 128))
                        report.add(Row(f"int8 decode tok/s, batch {batch}, 128 new tokens, BEFORE (separate "
                                       "launches, built-in tiles)", None, rate, "tok/s", None, "",
                                       (f"{rate / bf16:.2f} x bf16 fast (after); " if bf16 else "")
                                       + f"{rate / roofline:.0%} of int8 roofline"))
            with int8_gemv(*variants["chosen"]):
                for batch in (1, 2):  # the engine's share of the int8 / bf16 ratio: the same without it
                    for suffix, (attention, norms, tiles) in settings.items():
                        with kernels.attention_kernel(attention), kernels.norms_in_gemv(norms), \
                                kernels.norm_tiles(tiles):
                            rate = measure_graph_decode(s, batch, 128)
                        bf16 = graph_rates.get(batch if attention == kernels.DECODE_ATTENTION else (batch, attention))
                        report.add(Row(f"int8 decode tok/s, batch {batch}, graph replay only (no engine){suffix}", None,
                                       rate, "tok/s", INT8_SPEEDUP * bf16 if bf16 else None, "1.7 x bf16 graph",
                                       f"{rate / bf16:.2f} x bf16 graph replay" if bf16 else ""))
                if "ttft" not in skip:
                    ttft = measure_ttft(s, True)
                    report.add(Row("int8 TTFT from preprocessed pixels", None, ttft[0], "ms", TTFT_LIMIT_MS, "limit",
                                   ", ".join(f"{k} {v:.1f}" for k, v in ttft[2].items())))
                if "jobs" not in skip:
                    rate = measure_jobs(s, True, 2, (2 if a.quick else a.jobs_per_slot) * 2)
                    report.add(Row("int8 jobs/s, max_batch_size 2", None, rate, "jobs/s", JOBS_PER_S_TARGET,
                                   "target"))
            report.info["peak_gib_int8"] = peak_gib(s)

    section("summary")
    _on_section.clear()
    print(f"card: {env.get('card')} | torch {env['torch']} | triton {env['triton']} | "
          f"copy {bandwidth / 1e12:.2f} TB/s | bf16 matmul {matmul / 1e12:.0f} TFLOP/s")
    print(report.table())
    if "gemv_variants" in report.info:
        print("\nint8 / bf16 decode GEMVs (weights past L2):")
        print("\n".join(gemv_summary_lines(report.info["gemv_variants"])))
    for failure in guarded.failures:
        print(f"FAILED SECTION {failure}")
    save()
    return 1 if guarded.failures else 0


if __name__ == "__main__":
    sys.exit(main())
