"""A start that fails leaves nothing in the way: `spear-ray train` on its own local Ray, asking
for more than the machine has, fails at once with one line and removes the run directory it
made, so the same command, fixed, starts the run."""

from __future__ import annotations

import subprocess
import sys

from spear_ray.run_dir import RunDir
from tests.tiny_run import tiny_run_overrides


def _train(runs, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "spear_ray.cli",
        "train",
        "--config",
        "demo",
        "--quiet",
        *tiny_run_overrides({"run.total_steps": 1}),
        f"run.runs_dir={runs}",
        "run.name=restart-me",
        *overrides,
    ]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)


def test_a_failed_start_is_one_line_and_does_not_block_its_restart(tmp_path):
    runs = tmp_path / "runs"
    failed = _train(runs, "resources.cpus_per_rollout_worker=4096")
    assert failed.returncode == 1, failed.stderr[-2000:]
    errors = [line for line in failed.stderr.splitlines() if line.startswith("spear-ray: error:")]
    assert len(errors) == 1, failed.stderr[-2000:]
    assert "cannot grow" in errors[0] and "resources.cpus_per_rollout_worker" in errors[0]
    assert "Traceback" not in failed.stderr
    assert not (runs / "restart-me").exists()
    assert "stopped before its first step" in failed.stdout

    fixed = _train(runs)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    run = RunDir(runs / "restart-me")
    assert run.latest_checkpoint() is not None
    assert [r["step"] for r in run.read_metrics() if "reward/mean" in r] == [0]
