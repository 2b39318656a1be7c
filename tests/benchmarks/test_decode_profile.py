"""The decode profile's trace reading and per-step arithmetic (the profile itself needs a GPU)."""

from benchmarks import decode_profile


def trace(*kernels):
    events = [{"cat": "kernel", "name": name, "ts": ts, "dur": dur, "args": {"grid": list(grid)}}
              for name, grid, ts, dur in kernels]
    return {"traceEvents": events + [{"cat": "cpu_op", "name": "aten::mm", "ts": 0, "dur": 50}]}


def test_kernel_events_keep_gpu_kernels_in_start_order_with_their_grids():
    events = decode_profile.kernel_events(trace(("b", (4, 1, 1), 10.0, 2.0), ("a", (1, 1, 1), 0.0, 3.0)))
    assert [(e["name"], e["grid"]) for e in events] == [("a", (1, 1, 1)), ("b", (4, 1, 1))]


def test_summarize_splits_a_step_into_kernel_time_and_idle_time_per_kernel_and_grid():
    # two steps of: gemv (grid 8) 10 us, norm 2 us, gemv (grid 4) 5 us, with 1 us gaps
    kernels, t = [], 0.0
    for _ in range(2):
        for name, grid, dur in (("gemv", (8,), 10.0), ("norm", (1,), 2.0), ("gemv", (4,), 5.0)):
            kernels.append({"name": name, "grid": grid, "ts": t, "dur": dur})
            t += dur + 1.0
    result = decode_profile.summarize(kernels, steps=2)
    assert result["busy_us"] == 17.0
    assert result["span_us"] == (t - 1.0) / 2  # first start to last end
    assert result["idle_us"] == result["span_us"] - 17.0
    assert result["launches_per_step"] == 3
    assert [(r["name"], r["grid"], r["us_per_step"]) for r in result["kernels"]] == [
        ("gemv", [8], 10.0), ("gemv", [4], 5.0), ("norm", [1], 2.0)]


def test_summarize_tells_the_idle_time_before_each_kernel_by_the_kernel_it_follows():
    kernels = [{"name": "void gemv<8>(int)", "grid": (8,), "ts": 0.0, "dur": 10.0},
               {"name": "norm", "grid": (1,), "ts": 10.5, "dur": 2.0},
               {"name": "void gemv<4>(int)", "grid": (4,), "ts": 13.0, "dur": 5.0},
               {"name": "norm", "grid": (1,), "ts": 18.25, "dur": 2.0}]
    pairs = {(r["after"], r["before"]): (r["per_step"], r["us_per_gap"])
             for r in decode_profile.summarize(kernels, steps=1)["idle_by_transition"]}
    assert pairs == {("gemv", "norm"): (2.0, 0.375), ("norm", "gemv"): (1.0, 0.5)}
