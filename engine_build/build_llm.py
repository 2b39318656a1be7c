"""Build the TensorRT-LLM engine of the LLM half with ``trtllm-build``, the seed's settings as defaults.

    python -m engine_build.build_llm --checkpoint-dir CKPT --output-dir ENGINES/llm [--dry-run]

The defaults are the seed's deployment (TensorRT-LLM 0.16): bf16 GEMM plugin, at most 2 requests
in flight, paged KV cache with paged context FMHA (needed for KV-cache reuse), 30720 prompt
tokens, 32768 tokens per sequence and per step, and a prompt table of
``max_batch_size x max_images x 256`` rows (13312) for the image features. Every one is a flag;
anything else ``trtllm-build`` accepts goes after ``--``::

    python -m engine_build.build_llm --checkpoint-dir c --output-dir e -- --workers 2

``--dry-run`` prints the exact command and builds nothing. On success the engine folder gets a
``vlq-manifest.json`` naming the checkpoint (and through its manifest the Hugging Face folder),
the flags and the tool versions.

Newer TensorRT-LLM releases renamed ``--paged_kv_cache enable`` to ``--kv_cache_type paged``
(the old flag is a deprecated alias for a while) and call the engine workflow "legacy"; pass
``--kv-cache-type paged`` to emit the new spelling.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from engine_build.manifest import read_manifest, write_manifest
from producer.errors import CheckpointError, ConfigError, EngineUnavailable, VlqError
from worker.engine.types import IMAGE_TOKENS

INSTALL_HINT = (
    "install TensorRT-LLM on a CUDA host: pip install tensorrt_llm==0.16.0 "
    "--extra-index-url https://pypi.nvidia.com (or use NVIDIA's TensorRT-LLM container), "
    "see docs/tensorrt.md"
)


@dataclass(frozen=True)
class LlmBuildSettings:
    """The ``trtllm-build`` flags vlq sets; defaults are the seed's."""

    gemm_plugin: str = "bfloat16"
    max_batch_size: int = 2
    paged_kv_cache: str = "enable"
    use_paged_context_fmha: str = "enable"
    max_input_len: int = 30720
    max_seq_len: int = 32768
    max_num_tokens: int = 32768
    max_images: int = 26
    max_multimodal_len: int | None = None  # None: max_batch_size x max_images x 256
    kv_cache_type: str | None = None  # newer releases: "paged" instead of --paged_kv_cache

    @property
    def multimodal_len(self) -> int:
        if self.max_multimodal_len is not None:
            return self.max_multimodal_len
        return self.max_batch_size * self.max_images * IMAGE_TOKENS

    def validate(self) -> None:
        if self.max_batch_size < 1:
            raise ConfigError("--max-batch-size must be at least 1")
        if self.max_input_len >= self.max_seq_len:
            raise ConfigError(
                f"--max-input-len {self.max_input_len} must be below --max-seq-len {self.max_seq_len}"
            )
        if self.max_num_tokens < 1:
            raise ConfigError("--max-num-tokens must be at least 1")
        per_request = self.max_images * IMAGE_TOKENS
        if self.multimodal_len < per_request:
            raise ConfigError(
                f"--max-multimodal-len {self.multimodal_len} holds fewer rows than one request with "
                f"{self.max_images} images needs ({per_request})"
            )

    def flags(self) -> list[str]:
        """The flags in the seed's order."""
        kv = (["--kv_cache_type", self.kv_cache_type] if self.kv_cache_type
              else ["--paged_kv_cache", self.paged_kv_cache])
        return [
            "--gemm_plugin", self.gemm_plugin,
            "--max_batch_size", str(self.max_batch_size),
            *kv,
            "--use_paged_context_fmha", self.use_paged_context_fmha,
            "--max_input_len", str(self.max_input_len),
            "--max_seq_len", str(self.max_seq_len),
            "--max_num_tokens", str(self.max_num_tokens),
            "--max_multimodal_len", str(self.multimodal_len),
        ]


def build_command(checkpoint_dir: Path, output_dir: Path, settings: LlmBuildSettings,
                  extra: list[str] | None = None, executable: str = "trtllm-build") -> list[str]:
    """The full ``trtllm-build`` argument list."""
    settings.validate()
    return [executable, "--checkpoint_dir", str(checkpoint_dir), "--output_dir", str(output_dir),
            *settings.flags(), *(extra or [])]


def find_trtllm_build(explicit: str | None = None) -> str:
    """Path of ``trtllm-build``; raises :class:`EngineUnavailable` with the install hint."""
    path = shutil.which(explicit or "trtllm-build")
    if path is None:
        raise EngineUnavailable(f"{explicit or 'trtllm-build'} not found on PATH: {INSTALL_HINT}")
    return path


def check_checkpoint(checkpoint_dir: Path) -> dict:
    """The checkpoint's TensorRT-LLM config; refuses folders trtllm-build would choke on."""
    config_path = checkpoint_dir / "config.json"
    if not config_path.is_file():
        raise CheckpointError(
            f"{config_path} not found: run python -m engine_build.convert_checkpoint first"
        )
    try:
        config = json.loads(config_path.read_text())
    except ValueError as e:
        raise CheckpointError(f"{config_path} is not valid JSON ({e}); convert the checkpoint again") from None
    if config.get("architecture") != "QWenForCausalLM":
        raise CheckpointError(
            f"{config_path}: architecture {config.get('architecture')!r}, expected QWenForCausalLM"
        )
    if not (checkpoint_dir / "rank0.safetensors").is_file():
        raise CheckpointError(f"{checkpoint_dir}/rank0.safetensors not found: the conversion did not finish")
    return config


def run_build(command: list[str]) -> None:
    """Run ``trtllm-build``, streaming its log; raises :class:`VlqError` when it fails."""
    print("+ " + shlex.join(command), file=sys.stderr, flush=True)
    result = subprocess.run(command)
    if result.returncode != 0:
        raise VlqError(f"trtllm-build exited with {result.returncode}; see its log above",
                       code="build_failed")


def trtllm_build_version(executable: str) -> str | None:
    try:
        out = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = (out.stdout or out.stderr).strip().splitlines()
    return lines[-1] if lines else None


def build_parser() -> argparse.ArgumentParser:
    d = LlmBuildSettings()
    parser = argparse.ArgumentParser(
        prog="python -m engine_build.build_llm",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Flags after -- go to trtllm-build as they are. See docs/tensorrt.md.",
    )
    parser.add_argument("--checkpoint-dir", type=Path, required=True, help="TensorRT-LLM checkpoint (convert_checkpoint's --out)")
    parser.add_argument("--output-dir", type=Path, required=True, help="engine folder, e.g. ENGINES/llm")
    parser.add_argument("--gemm-plugin", default=d.gemm_plugin, help="GEMM plugin dtype (auto, bfloat16, float16, float32, disable)")
    parser.add_argument("--max-batch-size", type=int, default=d.max_batch_size, help="requests in flight")
    parser.add_argument("--paged-kv-cache", choices=("enable", "disable"), default=d.paged_kv_cache)
    parser.add_argument("--kv-cache-type", choices=("paged", "continuous", "disabled"), default=None,
                        help="newer releases' spelling; replaces --paged-kv-cache when given")
    parser.add_argument("--use-paged-context-fmha", choices=("enable", "disable"), default=d.use_paged_context_fmha,
                        help="needed for KV-cache reuse")
    parser.add_argument("--max-input-len", type=int, default=d.max_input_len, help="prompt tokens")
    parser.add_argument("--max-seq-len", type=int, default=d.max_seq_len, help="prompt + answer tokens")
    parser.add_argument("--max-num-tokens", type=int, default=d.max_num_tokens, help="tokens per engine step")
    parser.add_argument("--max-images", type=int, default=d.max_images, help="images per request (sizes the prompt table)")
    parser.add_argument("--max-multimodal-len", type=int, default=None,
                        help="prompt-table rows; default max_batch_size x max_images x 256")
    parser.add_argument("--trtllm-build", default=None, help="trtllm-build executable (default: from PATH)")
    parser.add_argument("--dry-run", action="store_true", help="print the command and exit")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def settings_from_args(args: argparse.Namespace) -> LlmBuildSettings:
    return LlmBuildSettings(
        gemm_plugin=args.gemm_plugin,
        max_batch_size=args.max_batch_size,
        paged_kv_cache=args.paged_kv_cache,
        use_paged_context_fmha=args.use_paged_context_fmha,
        max_input_len=args.max_input_len,
        max_seq_len=args.max_seq_len,
        max_num_tokens=args.max_num_tokens,
        max_images=args.max_images,
        max_multimodal_len=args.max_multimodal_len,
        kv_cache_type=args.kv_cache_type,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    settings = settings_from_args(args)
    try:
        if args.dry_run:
            command = build_command(args.checkpoint_dir, args.output_dir, settings, extra,
                                    executable=args.trtllm_build or "trtllm-build")
            print(shlex.join(command))
            return 0
        config = check_checkpoint(args.checkpoint_dir)
        executable = find_trtllm_build(args.trtllm_build)
        command = build_command(args.checkpoint_dir, args.output_dir, settings, extra, executable)
        started = time.monotonic()
        run_build(command)
        try:
            checkpoint_manifest = read_manifest(args.checkpoint_dir)
            dtype, quantization = checkpoint_manifest.dtype, checkpoint_manifest.quantization
        except CheckpointError:  # converted by other means: fall back to TensorRT-LLM's config
            dtype = config.get("dtype", "unknown")
            quantization = (config.get("quantization") or {}).get("quant_algo") or "none"
        version = trtllm_build_version(executable)
        write_manifest(
            args.output_dir,
            step="build_llm",
            source=args.checkpoint_dir,
            dtype=dtype,
            quantization=quantization,
            build={
                "flags": settings.flags() + extra,
                "max_batch_size": settings.max_batch_size,
                "max_input_len": settings.max_input_len,
                "max_seq_len": settings.max_seq_len,
                "max_num_tokens": settings.max_num_tokens,
                "max_images": settings.max_images,
                "max_multimodal_len": settings.multimodal_len,
                "seconds": round(time.monotonic() - started, 1),
            },
            tools={"trtllm-build": version} if version else None,
            command=["python", "-m", "engine_build.build_llm", *argv],
        )
    except VlqError as e:
        print(f"error: {e.message}", file=sys.stderr)
        return 2 if isinstance(e, (EngineUnavailable, ConfigError)) else 1
    print(f"wrote {args.output_dir}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
