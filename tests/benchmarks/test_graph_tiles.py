"""The in-graph tile timing's bookkeeping (the timing itself needs a GPU)."""

from contextlib import contextmanager

from benchmarks import graph_tiles
from worker.engine.model import kernels
from worker.engine.model.cuda_gemv import CudaTile


def test_settings_take_turns_each_round_and_each_is_captured_inside_its_own_context(monkeypatch):
    active, order = [], []

    @contextmanager
    def setting(label):
        active.append(label)
        yield
        active.pop()

    monkeypatch.setattr(graph_tiles, "step_us", lambda fast, batch, replays, position: order.append(
        (tuple(active), batch, position)) or float(len(order)))
    runs = graph_tiles.interleaved(None, 2, {"a": lambda: setting("a"), "b": lambda: setting("b")}, 40, 2, 700)
    assert order == [(("a",), 2, 700), (("b",), 2, 700)] * 2 and not active
    assert runs == {"a": [1.0, 3.0], "b": [2.0, 4.0]}
    assert graph_tiles.medians(runs) == {"a": 2.0, "b": 3.0}


def test_a_tile_setting_changes_only_the_cuda_tiles_and_gives_them_back():
    tiles, choice = dict(kernels.CUDA_TILES), dict(kernels.INT8_GEMV_BY_SHAPE)
    other = {**tiles, (4096, 4096, 2): CudaTile(1, 1, 128, 2)}
    with graph_tiles.with_tiles(other)():
        assert kernels.CUDA_TILES == other and kernels.INT8_GEMV_BY_SHAPE == choice
    assert kernels.CUDA_TILES == tiles and kernels.INT8_GEMV_BY_SHAPE == choice


def test_a_norm_tile_setting_changes_only_the_norm_tiles_and_gives_them_back():
    tiles, norm = dict(kernels.CUDA_TILES), dict(kernels.NORM_TILES)
    other = {**norm, (12288, 4096, 2): CudaTile(4, 2, 128)}
    with graph_tiles.with_tiles(other, "norm")():
        assert kernels.NORM_TILES == other and kernels.CUDA_TILES == tiles
    assert kernels.NORM_TILES == norm and kernels.CUDA_TILES == tiles


def test_a_step_table_times_every_batch_and_position_with_every_setting(monkeypatch):
    seen = []
    monkeypatch.setattr(graph_tiles, "step_us", lambda fast, batch, replays, position: seen.append(
        (batch, position)) or 10.0 * batch + position)
    table = graph_tiles.step_table(None, "int8", {"a": contextmanager(lambda: iter([None]))}, [300, 700], 1, 40)
    assert list(table) == ["int8 batch 1 position 300", "int8 batch 1 position 700", "int8 batch 2 position 300",
                           "int8 batch 2 position 700"]
    assert table["int8 batch 2 position 700"]["median_us"] == {"a": 720.0}
    assert seen == [(1, 300), (1, 700), (2, 300), (2, 700)]


def test_step_options_read_the_positions_as_a_list():
    import argparse

    parser = argparse.ArgumentParser()
    graph_tiles.add_step_options(parser, positions="300")
    assert parser.parse_args([]).positions == [300]
    a = parser.parse_args(["--positions", "300,700", "--rounds", "5"])
    assert (a.positions, a.rounds, a.replays) == ([300, 700], 5, 40)
