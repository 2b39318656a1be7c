"""engine_build.build_vit: the vision tower + resampler as ONNX (and a TensorRT engine where it installs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from engine_build import build_vit
from engine_build.manifest import read_manifest
from worker.engine.model import load_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vision")
    assert build_vit.main(["--model-dir", str(tiny_model_dir), "--out", str(out), "--onnx-only"]) == 0
    return out


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path):
    return load_model(tiny_model_dir, dtype=torch.float32)


def test_the_onnx_graph_has_the_seeds_interface(exported: Path, tiny_model):
    graph = onnx.load(str(exported / build_vit.ONNX_FILE), load_external_data=False)
    assert max(op.version for op in graph.opset_import if op.domain in ("", "ai.onnx")) == 17
    (inp,) = graph.graph.input
    (out,) = graph.graph.output
    assert inp.name == "input" and out.name == "output"
    assert inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT

    def dims(value):
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    assert dims(inp) == ["batch", 3, 448, 448]
    assert dims(out)[0] == "batch" and dims(out)[1:] == [256, tiny_model.args.llm.hidden_size]
    assert (exported / "vision.onnx.data").is_file()  # weights beside the graph, one file


@pytest.mark.parametrize("batch", [1, 3])
def test_onnxruntime_matches_the_pytorch_vision_tower_within_1e_4(exported: Path, tiny_model, batch: int):
    pixels = torch.randn(batch, 3, 448, 448, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = tiny_model.encode_images(pixels).numpy()  # [batch, 256, hidden]
    session = ort.InferenceSession(str(exported / build_vit.ONNX_FILE), providers=["CPUExecutionProvider"])
    (got,) = session.run(["output"], {"input": pixels.numpy()})
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 1e-4


def test_images_stay_independent_inside_a_batch(exported: Path):
    session = ort.InferenceSession(str(exported / build_vit.ONNX_FILE), providers=["CPUExecutionProvider"])
    pixels = np.random.default_rng(0).standard_normal((2, 3, 448, 448)).astype(np.float32)
    (both,) = session.run(["output"], {"input": pixels})
    (second,) = session.run(["output"], {"input": pixels[1:]})
    assert np.abs(both[1] - second[0]).max() < 1e-5


def test_the_manifest_records_profile_opset_and_source(exported: Path, tiny_model_dir: Path):
    manifest = read_manifest(exported)
    assert manifest.step == "build_vit"
    assert manifest.source["path"] == str(tiny_model_dir.resolve())
    assert manifest.build["profile"] == {"min": 1, "opt": 13, "max": 26}
    assert manifest.build["opset"] == 17
    assert manifest.build["input"] == {"name": "input", "shape": ["batch", 3, 448, 448], "dtype": "float32"}
    assert manifest.build["output"]["name"] == "output"
    assert manifest.build["engine"] is None  # --onnx-only
    assert manifest.tools["onnx"] == onnx.__version__
    assert manifest.command[:3] == ["python", "-m", "engine_build.build_vit"]


def test_the_check_flag_reports_the_onnxruntime_difference(tiny_model_dir: Path, tmp_path: Path):
    build = build_vit.run(tiny_model_dir, tmp_path, dtype="bfloat16", profile=build_vit.BatchProfile(),
                          onnx_only=True, check=True)
    assert build["onnxruntime_max_abs_diff"] < 1e-4


@pytest.mark.skipif(build_vit.tensorrt_version() is not None, reason="TensorRT is installed here")
def test_building_the_engine_without_tensorrt_says_what_to_install(tiny_model_dir: Path, tmp_path: Path, capsys):
    code = build_vit.main(["--model-dir", str(tiny_model_dir), "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "tensorrt" in err and "--onnx-only" in err
    assert not (tmp_path / build_vit.ONNX_FILE).exists()  # refused before minutes of export


def test_a_bad_batch_profile_is_refused(tiny_model_dir: Path, tmp_path: Path, capsys):
    code = build_vit.main(["--model-dir", str(tiny_model_dir), "--out", str(tmp_path), "--onnx-only",
                           "--min-batch", "4", "--opt-batch", "2"])
    assert code == 2
    assert "min <= opt <= max" in capsys.readouterr().err


def test_help_lists_every_flag_with_the_seeds_profile():
    out = subprocess.run([sys.executable, "-m", "engine_build.build_vit", "--help"], capture_output=True,
                         text=True, cwd=REPO, check=True).stdout
    for flag in ("--model-dir", "--out", "--dtype", "--min-batch", "--opt-batch", "--max-batch", "--onnx-only",
                 "--opset", "--check"):
        assert flag in out
    assert "default: 13" in out and "default: 26" in out and "default: bfloat16" in out


def test_a_checkpoint_whose_vision_weights_do_not_match_its_config_is_refused(tiny_model_dir: Path, tmp_path: Path,
                                                                             capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    weights = load_file(str(bad / "model.safetensors"))
    del weights["transformer.visual.proj"]
    save_file(weights, str(bad / "model.safetensors"))
    assert build_vit.main(["--model-dir", str(bad), "--out", str(tmp_path / "out"), "--onnx-only"]) == 1
    assert "vision weights do not match" in capsys.readouterr().err
