"""The whole loop on a real local Ray: 2 rollout workers (vLLM), 2 DeepSpeed learner ranks, the
replay-buffer actor, checkpoints.

This run is asynchronous (`rollout.async_steps: 1`): the rollout of step t+1 overlaps the update
of step t. A random model's trajectories within a group are alike (same map, every action
invalid), so replay cannot trigger here: test_replay_and_resume.py covers replay, on-policy
versions and resuming with the warm-started demo model."""

from __future__ import annotations

import math

import pytest
import ray
import torch

from spear_ray.config import load_config
from spear_ray.run_dir import RunDir
from spear_ray.train import run_training
from tests.tiny_run import tiny_run_overrides

OVERRIDES = tiny_run_overrides(
    {
        "rollout.num_workers": 2,
        "rollout.prompts_per_step": 4,
        "rollout.samples_per_prompt": 4,
        "rollout.async_steps": 1,
        "learner.num_ranks": 2,
        "algo.sil.ramp_steps": 4,
        "run.total_steps": 3,
    }
)


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    config = load_config("demo", [*OVERRIDES, f"run.runs_dir={tmp_path_factory.mktemp('runs')}"])
    run = RunDir.create(config)
    lines: list[str] = []
    run_training(config, run=run, log=lines.append)
    return config, run, lines


def test_every_step_ran_with_finite_losses(trained):
    _, run, lines = trained
    rows = [r for r in run.read_metrics() if "reward/mean" in r]
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows:
        assert row["infra_failures"] == 0
        assert math.isfinite(row["update/loss"]) and row["update/optimizer_steps"] >= 1
    assert any(line.startswith("step 3/3") for line in lines)


def test_async_rollouts_run_one_weight_version_behind(trained):
    _, run, _ = trained
    rows = [r for r in run.read_metrics() if "reward/mean" in r]
    assert [r["weight_version"] for r in rows] == [1, 2, 3]
    assert rows[0]["staleness/max"] == 0  # step 0's rollout had nothing to overlap
    # step t+1's rollout started on version t, before step t's update made version t+1
    assert all(r["staleness/max"] <= 1 for r in rows[1:])
    assert any(r["staleness/max"] == 1 and r["staleness/mean"] > 0 for r in rows[1:])


def test_checkpoints_hold_an_hf_model_that_differs_from_the_start(trained):
    from safetensors.torch import load_file

    from spear_ray.models import resolve_model_path

    config, run, _ = trained
    latest = run.latest_checkpoint()
    assert latest.name == "step_000002" and (latest / "buffer.npz").exists()
    trained_weights = load_file(str(next((latest / "learner" / "policy").glob("*.safetensors"))))
    initial = load_file(str(resolve_model_path(config.model.path) / "model.safetensors"))
    changed = [n for n, t in trained_weights.items() if not torch.equal(t, initial[n])]
    assert changed, "training did not change any parameter"
    assert ray.is_initialized()
