"""Run directories: refuse to clobber, atomic checkpoints, keep-last-K, metrics."""

from __future__ import annotations

import math

import pytest

from spear_ray.config import ConfigError, load_config
from spear_ray.run_dir import RunDir


def _config(tmp_path, **run):
    overrides = [f"run.runs_dir={tmp_path}", "run.name=r", "checkpoint.keep_last=2"]
    return load_config("demo", overrides + [f"run.{k}={v}" for k, v in run.items()])


def test_create_writes_the_resolved_config_and_refuses_an_existing_run(tmp_path):
    config = _config(tmp_path)
    run = RunDir.create(config)
    again, loaded = RunDir.open(run.path)
    assert loaded == config and again.path == run.path
    with pytest.raises(ConfigError, match="--resume"):
        RunDir.create(config)


def test_open_rejects_a_directory_that_is_not_a_run(tmp_path):
    with pytest.raises(ConfigError, match="not a spear-ray run directory"):
        RunDir.open(tmp_path)


def test_checkpoints_are_atomic_and_only_the_newest_are_kept(tmp_path):
    run = RunDir.create(_config(tmp_path))
    for step in (9, 19, 29):
        with run.checkpoint(step) as d:
            (d / "payload").write_text(str(step))
    kept = run.complete_checkpoints()
    assert [p.name for p in kept] == ["step_000019", "step_000029"]
    assert run.latest_checkpoint().joinpath("payload").read_text() == "29"
    with pytest.raises(RuntimeError), run.checkpoint(39) as d:
        (d / "payload").write_text("half")
        raise RuntimeError("crash while writing")
    assert run.latest_checkpoint().name == "step_000029"  # the failed one never appears
    assert not list(run.checkpoints_dir.glob(".tmp_*"))


def test_a_checkpoint_without_its_complete_marker_is_ignored(tmp_path):
    run = RunDir.create(_config(tmp_path))
    with run.checkpoint(5) as d:
        (d / "x").write_text("ok")
    partial = run.checkpoints_dir / "step_000007"
    partial.mkdir()
    assert run.latest_checkpoint().name == "step_000005"


def test_metrics_are_appended_as_json_lines_with_nan_as_null(tmp_path):
    run = RunDir.create(_config(tmp_path))
    run.log_metrics({"step": 0, "loss": 1.5})
    run.log_metrics({"step": 1, "loss": math.nan})
    assert run.read_metrics() == [{"step": 0, "loss": 1.5}, {"step": 1, "loss": None}]
