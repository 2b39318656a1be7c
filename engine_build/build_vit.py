"""Export the vision tower + resampler to ONNX and build its TensorRT engine.

    python -m engine_build.build_vit --model-dir HF_DIR --out ENGINES/vision \\
        [--dtype bfloat16] [--min-batch 1 --opt-batch 13 --max-batch 26] [--onnx-only]

Writes into ``--out``:

- ``vision.onnx`` (+ ``vision.onnx.data``, the weights, when the exporter stores them apart):
  input ``input`` float32 ``[batch, 3, 448, 448]`` (CLIP-normalised pixels), output ``output``
  ``[batch, 256, hidden]``, batch dynamic, opset 17. The graph is vlq's own PyTorch vision
  tower (``worker.engine.model``), the same code the torch backend runs;
- ``vision.plan``: the TensorRT engine, one optimisation profile over the batch (the seed's
  1 / 13 / 26 images), in ``--dtype`` (bf16 kernels allowed by the builder flag; the input stays
  float32 and is cast inside the graph);
- ``vlq-manifest.json``: source checkpoint, dtypes, profile, opset, tool versions.

``--onnx-only`` stops after the ONNX file and works on any machine; the engine needs the
``tensorrt`` Python package and a GPU. ``--check`` runs the exported graph with onnxruntime
against the PyTorch tower on random pixels and prints the largest difference.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from engine_build.manifest import write_manifest
from producer.errors import CheckpointError, ConfigError, EngineUnavailable, VlqError

ONNX_FILE = "vision.onnx"
PLAN_FILE = "vision.plan"
INPUT_NAME = "input"
OUTPUT_NAME = "output"
OPSET = 17
DTYPES = ("bfloat16", "float16", "float32")
INSTALL_HINT = ("install TensorRT's Python package on a CUDA host (pip install tensorrt, or use "
                "NVIDIA's TensorRT-LLM container), or pass --onnx-only")


@dataclass(frozen=True)
class BatchProfile:
    """The engine's one optimisation profile over the number of images."""

    min: int = 1
    opt: int = 13
    max: int = 26

    def validate(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ConfigError(
                f"batch profile needs 1 <= min <= opt <= max, got {self.min} / {self.opt} / {self.max}"
            )


def load_vision_tower(model_dir: Path, dtype: str = "float32", device: str = "cpu"):
    """The checkpoint's vision tower (vlq's ``VisionTransformer``, the module the torch backend
    runs as ``QwenVL.transformer.visual``) in eval mode, loading only the ``transformer.visual.*``
    tensors: 7.7 GB in float32 for the real model instead of 38 GB for the whole of it."""
    import torch
    from safetensors import safe_open

    from engine_build.convert_checkpoint import weight_files
    from worker.engine.model.args import QwenVLArgs
    from worker.engine.model.vision import VisionTransformer

    prefix = "transformer.visual."
    try:
        args = QwenVLArgs.from_hf_config(model_dir)
    except VlqError as e:
        raise CheckpointError(f"{model_dir}: {e.message}") from e
    torch_dtype = getattr(torch, dtype)
    state: dict[str, torch.Tensor] = {}
    for path in weight_files(model_dir):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for name in f.keys():
                    if name.startswith(prefix):
                        state[name[len(prefix):]] = f.get_tensor(name).to(torch_dtype)
        else:
            for name, tensor in torch.load(path, map_location="cpu", mmap=True, weights_only=True).items():
                if name.startswith(prefix):
                    state[name[len(prefix):]] = tensor.to(torch_dtype)
    with torch.device("meta"):
        visual = VisionTransformer(args.vision)
    try:
        visual.load_state_dict(state, strict=True, assign=True)  # its post-hook fills the position tables
    except RuntimeError as e:
        raise CheckpointError(f"{model_dir}: the vision weights do not match config.json: {e}") from None
    return visual.to(device).eval().requires_grad_(False)


def export_onnx(visual, path: Path, *, image_size: int, opset: int = OPSET, example_batch: int = 2) -> Path:
    """Export ``visual`` (pixels -> features) to ``path`` with a dynamic batch axis.

    The weights go to ``<path>.data`` beside the graph (one file; the real tower's 1.9B
    parameters exceed protobuf's 2 GB limit). The TorchScript exporter is used: torch's newer
    exporter emits opset-18 ``Split`` nodes under an opset-17 header that onnxruntime rejects.
    """
    import tempfile
    import warnings

    import onnx
    import torch

    param = next(visual.parameters())
    example = torch.randn(example_batch, 3, image_size, image_size, dtype=torch.float32, device=param.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    data_name = path.name + ".data"
    for stale in (path, path.with_name(data_name)):
        stale.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        raw = Path(tmp) / path.name  # big models scatter one file per tensor here
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                visual,
                (example,),
                str(raw),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                dynamo=False,
            )
        graph = onnx.load(str(raw))  # pulls any scattered external tensors in
        # Tracing leaves the 256 queries as a symbolic dim; declare the fixed output shape.
        out_dims = graph.graph.output[0].type.tensor_type.shape.dim
        for dim, size in zip(out_dims[1:], (visual.args.n_queries, visual.args.output_dim)):
            dim.ClearField("dim_param")
            dim.dim_value = size
        onnx.save_model(graph, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    onnx.checker.check_model(str(path))  # by path: the real tower is over protobuf's 2 GB
    return path


def onnx_parity(visual, onnx_path: Path, *, batch: int = 2, seed: int = 0) -> float:
    """Largest |onnxruntime - PyTorch| over a random float32 batch (CPU)."""
    import numpy as np
    import onnxruntime as ort
    import torch

    size = visual.args.image_size
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = visual(pixels).float().cpu().numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run([OUTPUT_NAME], {INPUT_NAME: pixels.numpy()})
    return float(np.abs(got.astype(np.float32) - expected).max())


def build_engine(onnx_path: Path, plan_path: Path, *, dtype: str, profile: BatchProfile,
                 image_size: int, workspace_gib: float = 8.0) -> Path:
    """Build a TensorRT engine from ``onnx_path`` (TensorRT 10 Python API)."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineUnavailable(f"the tensorrt package is not importable ({e}): {INSTALL_HINT}") from None

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if int(trt.__version__.split(".")[0]) < 10:  # explicit batch is implicit from TensorRT 10 on
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves vision.onnx.data beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise VlqError(f"TensorRT could not parse {onnx_path}: {errors}", code="build_failed")

    config = builder.create_builder_config()
    if dtype == "bfloat16":
        config.set_flag(trt.BuilderFlag.BF16)
    elif dtype == "float16":
        config.set_flag(trt.BuilderFlag.FP16)
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    shape = (3, image_size, image_size)
    opt_profile = builder.create_optimization_profile()
    opt_profile.set_shape(INPUT_NAME, (profile.min, *shape), (profile.opt, *shape), (profile.max, *shape))
    config.add_optimization_profile(opt_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise VlqError(f"TensorRT failed to build an engine from {onnx_path}; see its log above",
                       code="build_failed")
    plan_path.write_bytes(bytes(serialized))
    return plan_path


def tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except ImportError:
        return None
    return trt.__version__


def run(model_dir: Path, out_dir: Path, *, dtype: str, profile: BatchProfile, onnx_only: bool,
        onnx_dtype: str = "float32", device: str = "cpu", opset: int = OPSET, check: bool = False,
        workspace_gib: float = 8.0, command: list[str] | None = None) -> dict:
    """Export (and build unless ``onnx_only``), write the manifest; returns its ``build`` section."""
    profile.validate()
    if dtype not in DTYPES or onnx_dtype not in DTYPES:
        raise ConfigError(f"dtypes must be one of {', '.join(DTYPES)}")
    if not onnx_only and tensorrt_version() is None:  # fail before minutes of export
        raise EngineUnavailable(f"building vision.plan needs the tensorrt package: {INSTALL_HINT}")

    started = time.monotonic()
    log(f"loading the vision tower from {model_dir} ({onnx_dtype}, {device})")
    visual = load_vision_tower(model_dir, dtype=onnx_dtype, device=device)
    vargs = visual.args
    onnx_path = out_dir / ONNX_FILE
    log(f"exporting {onnx_path} (opset {opset}, dynamic batch)")
    export_onnx(visual, onnx_path, image_size=vargs.image_size, opset=opset)
    build: dict = {
        "onnx": ONNX_FILE,
        "onnx_dtype": onnx_dtype,
        "opset": opset,
        "input": {"name": INPUT_NAME, "shape": ["batch", 3, vargs.image_size, vargs.image_size],
                  "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", vargs.n_queries, vargs.output_dim]},
        "profile": asdict(profile),
        "engine": None,
    }
    if check:
        diff = onnx_parity(visual, onnx_path)
        build["onnxruntime_max_abs_diff"] = diff
        log(f"onnxruntime vs PyTorch: max |diff| {diff:.3g}")
    del visual
    if not onnx_only:
        plan_path = out_dir / PLAN_FILE
        log(f"building {plan_path} ({dtype}, batch {profile.min}/{profile.opt}/{profile.max}); "
            "this takes minutes")
        build_engine(onnx_path, plan_path, dtype=dtype, profile=profile,
                     image_size=vargs.image_size, workspace_gib=workspace_gib)
        build["engine"] = PLAN_FILE
    build["seconds"] = round(time.monotonic() - started, 1)
    trt_version = tensorrt_version()
    write_manifest(out_dir, step="build_vit", source=model_dir,
                   dtype=onnx_dtype if onnx_only else dtype, quantization="none", build=build,
                   tools={"tensorrt": trt_version} if trt_version else None, command=command)
    return build


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    d = BatchProfile()
    parser = argparse.ArgumentParser(
        prog="python -m engine_build.build_vit",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--model-dir", type=Path, required=True, help="Hugging Face Qwen-VL-Chat folder")
    parser.add_argument("--out", type=Path, required=True, help="output folder, e.g. ENGINES/vision")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="TensorRT engine precision")
    parser.add_argument("--onnx-dtype", choices=DTYPES, default="float32",
                        help="weights in the ONNX graph (the input is float32 either way)")
    parser.add_argument("--min-batch", type=int, default=d.min, help="fewest images per call")
    parser.add_argument("--opt-batch", type=int, default=d.opt, help="images per call TensorRT tunes for")
    parser.add_argument("--max-batch", type=int, default=d.max, help="most images per call")
    parser.add_argument("--opset", type=int, default=OPSET)
    parser.add_argument("--device", default="cpu", help="where to run the export (cpu, cuda)")
    parser.add_argument("--workspace-gib", type=float, default=8.0, help="TensorRT builder workspace")
    parser.add_argument("--onnx-only", action="store_true", help="export ONNX only (no TensorRT needed)")
    parser.add_argument("--check", action="store_true", help="compare onnxruntime with PyTorch after export")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    profile = BatchProfile(args.min_batch, args.opt_batch, args.max_batch)
    try:
        run(args.model_dir, args.out, dtype=args.dtype, profile=profile, onnx_only=args.onnx_only,
            onnx_dtype=args.onnx_dtype, device=args.device, opset=args.opset, check=args.check,
            workspace_gib=args.workspace_gib, command=["python", "-m", "engine_build.build_vit", *argv])
    except VlqError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2 if isinstance(e, (EngineUnavailable, ConfigError)) else 1
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
