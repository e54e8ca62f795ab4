"""benchmarks/chaos.py and benchmarks/soak.py on the tiny random model (slow tier).

Chaos: 5 steps with one SIGKILL of the rollout worker and one of the replay-buffer actor (seeded
random steps among 1..3); the run must reach its last step, the killed actors must come back (a
new pid) and the final checkpoint must pass the manifest check and load with transformers.
Soak: 3 steps sampled after every step; every row must hold an RSS for every process kind (no
assertion on growth: 3 steps say nothing about a trend).

Both run in this process on the session's Ray (`ray_local`), through the scripts' own `run`
functions (what their `main` runs before printing)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="module")
def scripts():
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other as top-level modules
    try:
        import chaos
        import soak

        yield chaos, soak
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_chaos_run_survives_a_worker_and_a_buffer_kill(ray_local, tmp_path, scripts, capsys):
    chaos, _ = scripts
    tiny = ["--tiny", "--steps", "5", "--kills-per-kind", "1", "--seed", "0"]
    args = chaos.parse_args([*tiny, "--runs-dir", str(tmp_path)])
    report = chaos.run(args)
    chaos.report(report)
    printed = capsys.readouterr().out
    assert '"checkpoint_loads": true' in printed, printed

    assert report["completed"] and report["steps_completed"] == 5, report
    assert report["kills"] == {"rollout_worker": 1, "buffer": 1}, report["plan"]
    # each killed actor answered again with a new pid; the controller counted the worker's
    assert report["restarts"]["rollout_worker"] == 1 and report["restarts"]["buffer"] == 1, report
    assert report["worker_restarts_counted"] >= 1, report
    assert report["checkpoint"] == "step_000004" and report["checkpoint_loads"], report
    assert report["ok"]


def test_soak_samples_every_process_kind(ray_local, tmp_path, scripts):
    _, soak = scripts
    args = soak.parse_args(["--tiny", "--steps", "3", "--every", "1", "--runs-dir", str(tmp_path)])
    report = soak.run(args)
    assert report["error"] is None, report["error"]
    assert [row["step"] for row in report["rows"]] == [0, 1, 2, 3]
    for row in report["rows"]:
        kinds = {name.rstrip("0123456789").rstrip("_") for name in row["rss_mb"]}
        assert kinds == {"driver", "buffer", "rollout_worker", "learner_rank"}, row
        assert all(mb is not None and mb > 0 for mb in row["rss_mb"].values()), row
    assert set(report["processes"]) == set(report["rows"][0]["rss_mb"])
