"""engine_build.build_llm: trtllm-build with the seed's settings as defaults."""

from __future__ import annotations

import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from engine_build import build_llm
from engine_build.convert_checkpoint import run as convert
from engine_build.manifest import read_manifest

REPO = Path(__file__).resolve().parents[2]

# The seed's command (docs/qwenvl.md of the grps deployment), flag for flag.
SEED_FLAGS = ("--gemm_plugin bfloat16 --max_batch_size 2 --paged_kv_cache enable "
              "--use_paged_context_fmha enable --max_input_len 30720 --max_seq_len 32768 "
              "--max_num_tokens 32768 --max_multimodal_len 13312")


def test_the_dry_run_prints_the_seeds_trtllm_build_command(capsys):
    assert build_llm.main(["--checkpoint-dir", "ck", "--output-dir", "eng", "--dry-run"]) == 0
    printed = capsys.readouterr().out.strip()
    assert printed == f"trtllm-build --checkpoint_dir ck --output_dir eng {SEED_FLAGS}"


def test_the_prompt_table_follows_the_batch_size_and_image_count(capsys):
    build_llm.main(["--checkpoint-dir", "c", "--output-dir", "e", "--max-batch-size", "4",
                    "--max-images", "8", "--dry-run"])
    args = shlex.split(capsys.readouterr().out)
    assert args[args.index("--max_multimodal_len") + 1] == str(4 * 8 * 256)
    assert args[args.index("--max_batch_size") + 1] == "4"


def test_every_setting_is_a_flag_and_extra_flags_pass_through(capsys):
    build_llm.main(["--checkpoint-dir", "c", "--output-dir", "e", "--gemm-plugin", "float16",
                    "--max-input-len", "2048", "--max-seq-len", "4096", "--max-num-tokens", "8192",
                    "--max-multimodal-len", "1024", "--max-images", "2", "--use-paged-context-fmha", "disable",
                    "--kv-cache-type", "paged", "--dry-run", "--", "--workers", "2"])
    args = shlex.split(capsys.readouterr().out)
    pairs = dict(zip(args[1::2], args[2::2]))
    assert pairs["--gemm_plugin"] == "float16"
    assert pairs["--max_input_len"] == "2048" and pairs["--max_seq_len"] == "4096"
    assert pairs["--max_num_tokens"] == "8192" and pairs["--max_multimodal_len"] == "1024"
    assert pairs["--use_paged_context_fmha"] == "disable"
    assert pairs["--kv_cache_type"] == "paged" and "--paged_kv_cache" not in args
    assert args[-2:] == ["--workers", "2"]


@pytest.mark.parametrize("flags, message", [
    (["--max-input-len", "32768"], "must be below --max-seq-len"),
    (["--max-multimodal-len", "100"], "fewer rows than one request"),
])
def test_inconsistent_limits_are_refused_before_building(flags, message, capsys):
    code = build_llm.main(["--checkpoint-dir", "c", "--output-dir", "e", "--dry-run", *flags])
    assert code == 2
    assert message in capsys.readouterr().err


def test_a_missing_trtllm_build_says_how_to_install_it(tiny_model_dir: Path, tmp_path: Path, capsys,
                                                        monkeypatch: pytest.MonkeyPatch):
    ckpt = convert(tiny_model_dir, tmp_path / "ckpt", dtype="bfloat16", weight_only="none", converter="vlq",
                   progress=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    code = build_llm.main(["--checkpoint-dir", str(ckpt), "--output-dir", str(tmp_path / "eng")])
    assert code == 2
    err = capsys.readouterr().err
    assert "trtllm-build not found" in err and "pip install tensorrt_llm" in err


def test_a_folder_that_is_not_a_converted_checkpoint_is_refused(tmp_path: Path, capsys):
    code = build_llm.main(["--checkpoint-dir", str(tmp_path), "--output-dir", str(tmp_path / "e")])
    assert code == 1
    assert "engine_build.convert_checkpoint" in capsys.readouterr().err


def test_a_build_runs_trtllm_build_and_writes_the_manifest(tiny_model_dir: Path, tmp_path: Path):
    """A stand-in ``trtllm-build`` (a script on PATH) records its arguments and writes what the
    real one writes, so the command line, the subprocess and the manifest are checked end to end."""
    ckpt = convert(tiny_model_dir, tmp_path / "ckpt", dtype="bfloat16", weight_only="int8", converter="vlq",
                   progress=False)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "argv.json"
    fake = bin_dir / "trtllm-build"
    fake.write_text(
        f"#!{sys.executable}\n"
        "import json, sys, pathlib\n"
        "if sys.argv[1:] == ['--version']:\n"
        "    print('[TensorRT-LLM] TensorRT-LLM version: 0.16.0'); sys.exit(0)\n"
        f"pathlib.Path({str(log)!r}).write_text(json.dumps(sys.argv[1:]))\n"
        "out = pathlib.Path(sys.argv[sys.argv.index('--output_dir') + 1]); out.mkdir(parents=True)\n"
        "(out / 'config.json').write_text('{}'); (out / 'rank0.engine').write_bytes(b'x')\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    engine = tmp_path / "engines" / "llm"
    subprocess.run([sys.executable, "-m", "engine_build.build_llm", "--checkpoint-dir", str(ckpt),
                    "--output-dir", str(engine)], cwd=REPO, env=env, check=True, capture_output=True)
    argv = json.loads(log.read_text())
    assert " ".join(argv) == f"--checkpoint_dir {ckpt} --output_dir {engine} {SEED_FLAGS}"
    manifest = read_manifest(engine)
    assert manifest.step == "build_llm"
    assert manifest.source["path"] == str(ckpt.resolve())
    assert "vlq-manifest.json" in manifest.source["files"]  # chained to the checkpoint's manifest
    assert manifest.quantization == "weight_only_int8" and manifest.dtype == "bfloat16"
    assert manifest.build["max_multimodal_len"] == 13312 and manifest.build["max_batch_size"] == 2
    assert manifest.build["flags"] == SEED_FLAGS.split()
    assert manifest.tools["trtllm-build"].endswith("0.16.0")


def test_help_lists_every_flag_with_its_default():
    out = subprocess.run([sys.executable, "-m", "engine_build.build_llm", "--help"], capture_output=True,
                         text=True, cwd=REPO, check=True).stdout
    for flag in ("--checkpoint-dir", "--output-dir", "--gemm-plugin", "--max-batch-size", "--paged-kv-cache",
                 "--use-paged-context-fmha", "--max-input-len", "--max-seq-len", "--max-num-tokens",
                 "--max-multimodal-len", "--max-images", "--dry-run"):
        assert flag in out
    assert "30720" in out and "32768" in out
