"""scripts/gpu_check.sh, the prepared GPU check, in every part that runs without a GPU: it parses,
its training commands' configs are valid, it fails with one clear line where no GPU is found, and
its Python checks give their verdicts (vLLM vs transformers greedy tokens runs here on the CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
CHECKS = ("gpus", "vllm-greedy", "zero2", "zero3", "weight-sync", "train-5", "benchmarks")


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHON": sys.executable, **(env or {})},
        timeout=600,
        check=False,
    )


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False).returncode == 0


def test_the_dry_run_lists_every_check_and_validates_the_training_configs():
    result = _run("--dry-run")
    assert result.returncode == 0, result.stderr
    listed = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("check ")]
    assert listed == list(CHECKS)
    assert [line for line in result.stdout.splitlines() if line.startswith("config ok")] == [
        "config ok: zero2",
        "config ok: zero3",
        "config ok: train-5",
    ]


def test_without_a_gpu_it_fails_with_one_clear_line(tmp_path):
    # an nvidia-smi that lists no GPU (as on a machine whose driver sees none)
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nexit 9\n")
    fake.chmod(0o755)
    result = _run(env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpu_check: FAIL: no NVIDIA GPU found")


def test_an_unknown_argument_is_refused():
    result = _run("--fast")
    assert result.returncode == 2 and "unknown argument '--fast'" in result.stderr


def _check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_checks.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def test_the_greedy_check_passes_on_the_cpu_engine():
    result = _check("vllm-greedy", "--model", "builtin:tiny-random", "--device", "cpu")
    lines = [line for line in result.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    assert lines and lines[-1].startswith("PASS vllm-greedy: 4/4 prompts"), result.stdout[-2000:]
    assert result.returncode == 0


def test_the_gpu_count_check_fails_where_torch_sees_no_gpu():
    result = _check("gpus")
    assert result.returncode == 1
    assert result.stdout.strip() == "FAIL gpus: 0 CUDA device(s): none"
