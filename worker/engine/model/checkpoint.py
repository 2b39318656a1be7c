"""Load a Hugging Face Qwen-VL-Chat folder into :class:`QwenVL`.

Weights may be safetensors or PyTorch ``.bin`` files, one file or shards listed by a
``*.index.json``. The model is built on the meta device and the tensors are assigned in place
(``load_state_dict(assign=True)``), so nothing is allocated twice. Every tensor is checked by name
and shape; a folder that does not match its config.json fails with a
:class:`producer.errors.CheckpointError` naming the tensor and the file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from producer.errors import CheckpointError, ConfigError

from .args import QwenVLArgs
from .qwen_vl import QwenVL

# Buffers some checkpoints carry that the official model never loads (non-persistent state).
IGNORED_TENSORS = (
    re.compile(r"^transformer\.h\.\d+\.attn\.masked_bias$"),
    re.compile(r"^transformer\.h\.\d+\.attn\.bias$"),
    re.compile(r"(^|\.)rotary_emb\.inv_freq$"),
    re.compile(r"^transformer\.registered_causal_mask$"),
)

# In order of preference: (index file, single file).
WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)


def load_model(model_dir: str | Path, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> QwenVL:
    """Build :class:`QwenVL` from ``model_dir`` (config.json + weights) on ``device`` in ``dtype``,
    in eval mode with gradients off."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model folder {model_dir} does not exist", path=str(model_dir))
    try:
        args = QwenVLArgs.from_hf_config(model_dir)
    except ConfigError as e:
        raise CheckpointError(f"{model_dir}: {e.message}", path=str(model_dir)) from e
    with torch.device("meta"):
        model = QwenVL(args)
    load_weights(model, model_dir, device=device, dtype=dtype)
    return model.eval().requires_grad_(False)


def weight_files(model_dir: Path) -> dict[str, Path]:
    """Map each tensor name the folder declares to the file that holds it.

    With an index, names come from its ``weight_map``; a single file is opened to list its names.
    """
    for index_name, single_name in WEIGHT_LAYOUTS:
        index = model_dir / index_name
        if index.is_file():
            return _read_index(index)
        single = model_dir / single_name
        if single.is_file():
            return {name: single for name in _tensor_names(single)}
    expected = ", ".join(name for layout in WEIGHT_LAYOUTS for name in layout)
    raise CheckpointError(f"no weights in {model_dir}: expected one of {expected}", path=str(model_dir))


def load_weights(model: QwenVL, model_dir: Path, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
    """Read every checkpoint tensor into ``model`` (built on meta or real tensors), checking names
    and shapes against the model first."""
    files = {name: path for name, path in weight_files(model_dir).items() if not _ignored(name)}
    expected = model.state_dict()
    missing = [name for name in expected if name not in files]
    if missing:
        raise CheckpointError(
            f"{model_dir}: tensor {missing[0]!r} (shape {list(expected[missing[0]].shape)}) is missing from the "
            f"checkpoint ({len(missing)} missing in all); the weights do not match config.json",
            path=str(model_dir), missing=missing[:20])
    unexpected = [name for name in files if name not in expected]
    if unexpected:
        raise CheckpointError(
            f"{model_dir}: tensor {unexpected[0]!r} in {files[unexpected[0]].name} is not part of the model "
            f"config.json describes ({len(unexpected)} unexpected in all)",
            path=str(model_dir), unexpected=unexpected[:20])
    state: dict[str, torch.Tensor] = {}
    for path in sorted(set(files.values())):
        wanted = {name for name, file in files.items() if file == path}
        for name, tensor in _read_tensors(path, wanted):
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise CheckpointError(
                    f"{model_dir}: tensor {name!r} in {path.name} has shape {list(tensor.shape)}, the model "
                    f"expects {list(expected[name].shape)}; the weights do not match config.json",
                    path=str(path), tensor=name)
            state[name] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
            wanted.discard(name)
        if wanted:
            name = sorted(wanted)[0]
            raise CheckpointError(f"{model_dir}: the index places tensor {name!r} in {path.name}, which lacks it",
                                  path=str(path), tensor=name)
    # The vision tower's post-load hook re-derives its fixed tables from the loaded weights.
    model.load_state_dict(state, strict=True, assign=True)
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor.is_meta:
            raise CheckpointError(f"{model_dir}: {name} was not loaded", path=str(model_dir), tensor=name)


def _ignored(name: str) -> bool:
    return any(pattern.search(name) for pattern in IGNORED_TENSORS)


def _read_index(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"cannot read weight index {index}: {e}", path=str(index)) from e
    files = {}
    for name, file_name in weight_map.items():
        path = index.parent / file_name
        if not path.is_file():
            raise CheckpointError(f"{index.name} places tensor {name!r} in {file_name}, which is not in "
                                  f"{index.parent}", path=str(path), tensor=name)
        files[name] = path
    return files


def _tensor_names(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"cannot read {path}: {e}", path=str(path)) from e
    return list(_load_bin(path).keys())


def _read_tensors(path: Path, names: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for ``names`` found in one file, on the CPU."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                for name in sorted(names & set(f.keys())):
                    yield name, f.get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read {path}: {e}", path=str(path)) from e
        return
    state = _load_bin(path)
    for name in sorted(names & set(state)):
        yield name, state[name]


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # pickle and zip errors come in many types
        raise CheckpointError(f"cannot read {path}: {e}", path=str(path)) from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict", path=str(path))
    return state
