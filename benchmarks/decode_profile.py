"""Where a decode step's GPU time goes, kernel by kernel: a profile of the fast path's graph replays.

    python -m benchmarks.decode_profile [--steps 10] [--batches 1,2] [--separate-rotary]
                                        [--int8-gemvs built-in,triton] [--json FILE]

Builds the real Qwen-VL-Chat architecture (``config.json`` as :mod:`benchmarks.engine_bench`
finds it) with random bf16 weights, prefills the seed's 1-image prompt into each cache row and
profiles ``--steps`` decode graph replays per batch size, bf16 then int8 (``torch.profiler``,
CUDA activity). Per kernel (name and launch grid, so the GEMVs of different shapes stay apart) it
prints launches and microseconds per step; per step the time from the first kernel's start to the
last one's end, the sum of kernel durations and the idle time between kernels, also per pair of
kernels (which kernel follows which). Kernel durations under the profiler are the GPU's own; the
span includes the profiler's small per-kernel overhead. ``--separate-rotary`` profiles each case
a second time with rotary and attention as two launches
(``kernels.FUSED_ROTARY = False``), for a before/after in the same run; ``--int8-gemvs
built-in,triton`` profiles int8 with the built-in GEMV choice and again with the CUDA GEMVs on
their Triton stand-ins.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.engine_bench import (  # noqa: E402
    DEVICE_DIR, SHARED, first_existing, random_model, seed_prompt, show_environment)
from benchmarks.gemv_bench import int8_gemv, triton_only  # noqa: E402
from worker.engine.model import kernels  # noqa: E402
from worker.engine.model.args import QwenVLArgs  # noqa: E402
from worker.engine.model.fast import FastQwenVL  # noqa: E402
from worker.engine.model.quant import quantize_llm  # noqa: E402
from worker.engine.tokenizer import QwenTokenizer  # noqa: E402


def kernel_events(trace: dict) -> list[dict]:
    """The GPU kernels of a Chrome trace, in start order: name, grid, start and duration (us)."""
    events = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel" and "dur" in e]
    events.sort(key=lambda e: e["ts"])
    return [{"name": e["name"], "grid": tuple(e.get("args", {}).get("grid", ())), "ts": float(e["ts"]),
             "dur": float(e["dur"])} for e in events]


def summarize(kernels: list[dict], steps: int) -> dict:
    """Per (name, grid): launches and us per step, mean us per launch; the step's span, busy and
    idle time (us per step)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for k in kernels:
        groups[(k["name"], k["grid"])].append(k["dur"])
    span = kernels[-1]["ts"] + kernels[-1]["dur"] - kernels[0]["ts"]
    busy = sum(k["dur"] for k in kernels)
    rows = sorted(({"name": name, "grid": list(grid), "per_step": len(d) / steps, "us_per_launch": sum(d) / len(d),
                    "us_per_step": sum(d) / steps} for (name, grid), d in groups.items()),
                  key=lambda r: -r["us_per_step"])
    gaps: dict[tuple[str, str], list[float]] = defaultdict(list)  # idle before a kernel, by the kernel before it
    for before, k in zip(kernels, kernels[1:]):
        gaps[(short_name(before["name"]), short_name(k["name"]))].append(k["ts"] - before["ts"] - before["dur"])
    transitions = sorted(({"after": a, "before": b, "per_step": len(g) / steps, "us_per_gap": sum(g) / len(g),
                           "us_per_step": sum(g) / steps} for (a, b), g in gaps.items()),
                         key=lambda r: -r["us_per_step"])
    return {"span_us": span / steps, "busy_us": busy / steps, "idle_us": (span - busy) / steps,
            "launches_per_step": len(kernels) / steps, "kernels": rows, "idle_by_transition": transitions}


def short_name(name: str) -> str:
    """A kernel's name without its template arguments and parameter list."""
    return name.split("<")[0].split("(")[0].removeprefix("void ").strip()


def profile_decode(fast: FastQwenVL, ids: list[int], batch: int, steps: int, device: torch.device) -> dict:
    """Profile ``steps`` decode replays of ``batch`` rows after prefilling ``ids[:-1]`` into each."""
    fast.setup_cache(batch, 2048)
    for slot in range(batch):
        fast.prefill(torch.tensor(ids[:-1], device=device), slot)
    tokens = torch.full((batch,), ids[-1], device=device)
    positions = torch.full((batch,), len(ids) - 1, device=device)
    slots = torch.arange(batch, device=device)
    for _ in range(3):  # warm: the graphs exist since setup_cache
        fast.decode(tokens, positions, slots)
        positions += 1
    torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):  # the same position each time: the same work, nothing else launched
            fast.decode(tokens, positions, slots)
        torch.cuda.synchronize(device)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        trace = json.loads(path.read_text())
    return summarize(kernel_events(trace), steps)


def print_summary(label: str, result: dict) -> None:
    print(f"\n== {label}: span {result['span_us']:.0f} us per step, kernels {result['busy_us']:.0f} us, "
          f"idle between kernels {result['idle_us']:.0f} us, {result['launches_per_step']:.0f} launches")
    for r in result["kernels"]:
        print(f"  {r['us_per_step']:8.1f} us/step  {r['per_step']:5.1f} x {r['us_per_launch']:7.2f} us  "
              f"{r['name'][:60]} grid {tuple(r['grid'])}")
    print("  idle between kernels, by the pair (the steps' first kernels follow the previous step's last):")
    for r in result["idle_by_transition"][:8]:
        print(f"  {r['us_per_step']:8.1f} us/step  {r['per_step']:5.1f} x {r['us_per_gap']:7.2f} us  "
              f"{r['after'][:40]} -> {r['before'][:40]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batches", default="1,2")
    parser.add_argument("--separate-rotary", action="store_true",
                        help="also profile with rotary and attention as two launches")
    parser.add_argument("--int8-gemvs", default="built-in",
                        help="comma list: 'built-in' (kernels.INT8_GEMV_BY_SHAPE) and/or 'triton' (every CUDA "
                             "GEMV on the Triton kernel measured next fastest: FMA at one row, tensor cores at "
                             "two), each profiled")
    parser.add_argument("--json", type=Path, default=None)
    a = parser.parse_args(argv)
    device = torch.device("cuda")
    show_environment(device)
    args = QwenVLArgs.from_hf_config(first_existing(DEVICE_DIR / "config.json", SHARED / "qwen-vl" / "config.json"))
    tok = QwenTokenizer.from_file(first_existing(DEVICE_DIR / "qwen.tiktoken", SHARED / "qwen-vl" / "qwen.tiktoken"))
    ids, _ = seed_prompt(tok)
    model = random_model(args, device, torch.bfloat16)
    out = {}
    for kind in ("bf16", "int8"):
        if kind == "int8":
            quantize_llm(model)
            torch.cuda.empty_cache()
        for batch in [int(b) for b in a.batches.split(",")]:
            for gemvs in a.int8_gemvs.split(",") if kind == "int8" else ["built-in"]:
                for fused in (True, False) if a.separate_rotary else (True,):
                    with kernels.settings(FUSED_ROTARY=fused), \
                            int8_gemv(kernels.INT8_GEMV, triton_only(kernels.INT8_GEMV_BY_SHAPE) if gemvs == "triton"
                                      else dict(kernels.INT8_GEMV_BY_SHAPE)):
                        fast = FastQwenVL(model)  # its graphs hold the kernels chosen now
                        result = profile_decode(fast, ids, batch, a.steps, device)
                    label = (f"{kind} decode, batch {batch}" + ("" if fused else ", rotary and attention apart")
                             + (f", {gemvs} GEMVs" if kind == "int8" else ""))
                    out[label] = result
                    print_summary(label, result)
                    del fast
                    torch.cuda.empty_cache()
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
