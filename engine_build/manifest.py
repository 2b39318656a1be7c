"""The manifest written beside every engine_build output: where it came from and how it was made.

Each build step (``convert_checkpoint``, ``build_llm``, ``build_vit``) writes
``vlq-manifest.json`` into its output folder. TensorRT-LLM already owns ``config.json`` in those
folders, so the manifest has its own name. It records:

- ``step``: which command wrote it, and ``command``: its argument list;
- ``source``: the input folder and sha256 hashes of the files that identify it (the checkpoint's
  ``config.json`` and weight index, or a previous step's manifest), so an engine can be traced
  back to the exact checkpoint it was built from without hashing 19 GB of weights;
- ``dtype``, ``quantization`` and ``build`` (shape profile and build flags);
- ``tools``: versions of Python, torch, TensorRT, TensorRT-LLM, ONNX... as found at build time;
- ``vlq_version`` and ``created`` (UTC, ISO 8601).

Usage::

    write_manifest(out, step="build_vit", source=model_dir, dtype="bfloat16",
                   quantization="none", build={"profile": [1, 13, 26]})
    manifest = read_manifest(out)
    manifest.build["profile"]
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from producer.errors import CheckpointError

MANIFEST_FILE = "vlq-manifest.json"
MANIFEST_VERSION = 1

# Files that identify a source folder, hashed whole. Weight shards themselves are identified by
# their index (names, shapes, shard layout) or, for a single shard, by its safetensors header.
_IDENTITY_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
    MANIFEST_FILE,
)
_SINGLE_SHARDS = ("model.safetensors", "rank0.safetensors")
_TOOL_DISTRIBUTIONS = ("torch", "tensorrt", "tensorrt_llm", "onnx", "onnxruntime", "onnxscript",
                       "safetensors", "transformers")


@dataclass
class Manifest:
    """One output's provenance. ``build`` holds the step's own settings (flags, profile...)."""

    step: str
    source: dict[str, Any]
    dtype: str
    quantization: str
    build: dict[str, Any] = field(default_factory=dict)
    tools: dict[str, str] = field(default_factory=dict)
    command: list[str] = field(default_factory=list)
    vlq_version: str = ""
    created: str = ""
    manifest_version: int = MANIFEST_VERSION

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def safetensors_header_sha256(path: Path) -> str:
    """Hash of a safetensors file's header (tensor names, dtypes, shapes, offsets), not its data."""
    with path.open("rb") as f:
        size_bytes = f.read(8)
        if len(size_bytes) != 8:
            raise CheckpointError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        size = int.from_bytes(size_bytes, "little")
        if size > 100 * 1024 * 1024:
            raise CheckpointError(f"{path} has a {size}-byte header; not a safetensors file")
        header = f.read(size)
    return hashlib.sha256(size_bytes + header).hexdigest()


def source_identity(folder: str | Path) -> dict[str, Any]:
    """``{"path", "files": {name: sha256}}`` for the identifying files of ``folder``.

    Raises :class:`CheckpointError` when the folder does not exist or holds none of them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"source folder {folder} does not exist")
    files: dict[str, str] = {}
    for name in _IDENTITY_FILES:
        if (folder / name).is_file():
            files[name] = sha256_file(folder / name)
    has_index = any(name.endswith(".index.json") for name in files)
    if not has_index:
        for name in _SINGLE_SHARDS:
            if (folder / name).is_file():
                files[f"{name}#header"] = safetensors_header_sha256(folder / name)
    if not files:
        raise CheckpointError(
            f"{folder} holds none of {', '.join(_IDENTITY_FILES)}: not a checkpoint or build output"
        )
    return {"path": str(folder.resolve()), "files": files}


def tool_versions(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Versions of Python and the build-relevant packages that are installed here."""
    versions = {"python": platform.python_version()}
    for dist in _TOOL_DISTRIBUTIONS:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    versions.update(extra or {})
    return versions


def vlq_version() -> str:
    try:
        return metadata.version("vlq")
    except metadata.PackageNotFoundError:
        from producer import __version__

        return __version__


def write_manifest(
    out_dir: str | Path,
    *,
    step: str,
    source: str | Path,
    dtype: str,
    quantization: str,
    build: dict[str, Any] | None = None,
    tools: dict[str, str] | None = None,
    command: list[str] | None = None,
) -> Path:
    """Write ``out_dir/vlq-manifest.json`` and return its path.

    ``source`` is the input folder (hashed with :func:`source_identity`); ``tools`` adds to the
    detected versions (e.g. the ``trtllm-build`` version line).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(
        step=step,
        source=source_identity(source),
        dtype=dtype,
        quantization=quantization,
        build=dict(build or {}),
        tools=tool_versions(tools),
        command=list(sys.argv if command is None else command),
        vlq_version=vlq_version(),
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )
    path = out_dir / MANIFEST_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def read_manifest(out_dir: str | Path) -> Manifest:
    """Read the manifest of a build output folder.

    Raises :class:`CheckpointError` saying which step to run when it is missing or malformed.
    """
    path = Path(out_dir) / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} not found: {out_dir} was not written by engine_build "
            "(run python -m engine_build.convert_checkpoint / build_llm / build_vit)"
        )
    try:
        data = json.loads(path.read_text())
        version = data.pop("manifest_version", None)
        if version != MANIFEST_VERSION:
            raise ValueError(f"manifest_version {version!r}, expected {MANIFEST_VERSION}")
        return Manifest(**data, manifest_version=version)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is not a vlq manifest: {e}; rebuild this output") from None


def same_source(manifest: Manifest, folder: str | Path) -> bool:
    """Whether ``folder``'s identifying files hash to what ``manifest`` recorded."""
    try:
        current = source_identity(folder)["files"]
    except CheckpointError:
        return False
    return current == manifest.source.get("files")


def readable_by_all(path: Path) -> None:
    """Give ``path`` the umask's usual mode: safetensors writes 0600, which a worker running as
    another user (or in a container) cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)
