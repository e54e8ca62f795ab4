"""Rollout-worker faults on a real local Ray: a worker SIGKILLed mid-rollout is restarted by Ray,
gets the current weights again, and its groups are re-issued (or, past rollout.group_retries,
dropped and counted); the rollout completes with the other worker's results.

Every pid killed here is the pid of a rollout-worker actor the test itself created."""

from __future__ import annotations

import os
import signal

import pytest
import ray
import torch

from actors.rollout_group import RolloutGroup
from spear_ray.agent.loop import Task
from spear_ray.controller import StepRecord, step_metrics
from spear_ray.recipe import rollout_spec
from tests.ray.test_rollout_group import _config, _tasks

pytestmark = pytest.mark.ray


def _perturbed_weights(seed: int = 1) -> list[tuple[str, torch.Tensor]]:
    """The tiny-random policy with noise added: weights that sample visibly differently."""
    from transformers import AutoModelForCausalLM

    from spear_ray.models import resolve_model_path

    model = AutoModelForCausalLM.from_pretrained(
        str(resolve_model_path("builtin:tiny-random")), dtype=torch.float32
    )
    generator = torch.Generator().manual_seed(seed)
    return [
        (name, t + 0.5 * torch.randn(t.shape, generator=generator))
        for name, t in model.state_dict().items()
    ]


def _tokens_of(rollouts: RolloutGroup, worker: int) -> list[int]:
    """Worker `worker`'s tokens for one fixed, seeded evaluation task (alone on its engine)."""
    task = Task("probe", group_id=0, env_seed=7, num_samples=1)
    (traj,) = ray.get(rollouts.workers[worker].rollout_group.remote(task=task, evaluation=True))
    assert traj.failure is None
    return traj.token_ids


def _kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


@pytest.mark.slow  # two engines, two kills, two engine restarts: 2-3 min on a busy 2-CPU box
def test_a_worker_killed_mid_rollout_comes_back_with_the_current_weights(ray_local, tmp_path):
    config = _config(
        tmp_path,
        **{
            "rollout.max_restarts": 2,
            "rollout.group_retries": 1,
            "rollout.trajectory_timeout_s": 120,
        },
    )
    rollouts = RolloutGroup(rollout_spec(config))
    try:
        first_pid = rollouts.health()[1]["pid"]
        initial = _tokens_of(rollouts, 0)
        assert rollouts.update_weights(ray.put(_perturbed_weights()), version=1) == [1, 1]
        current = _tokens_of(rollouts, 0)
        assert current != initial  # the comparison below can tell the two weights apart

        # 1. SIGKILL worker 1 right after its 4 groups (of 8) were submitted: all are lost
        pending = rollouts.start(_tasks(8), weight_version=1)
        _kill(first_pid)
        trajectories = pending.all()
        assert sorted({t.group_id for t in trajectories}) == list(range(8))
        assert len(trajectories) == 16 and all(t.failure is None for t in trajectories)
        assert {t.weight_version for t in trajectories} == {1}
        assert pending.counts == {
            "worker_restarts": 1,
            "groups_reissued": 4,
            "groups_dropped": 0,
            "samples_dropped": 0,
        }

        # the restarted worker: a new process, given the current weights before it took work
        health = rollouts.health()
        assert health[1]["pid"] != first_pid and health[1]["weight_version"] == 1
        assert _tokens_of(rollouts, 1) == current
        pending = rollouts.start(_tasks(4), weight_version=1)
        again = pending.all()
        assert {t.weight_version for t in again} == {1} and len(again) == 8
        assert pending.counts["worker_restarts"] == 0
        assert rollouts.health()[1]["trajectories_done"] > 0  # it took groups again

        # 2. killed while idle: Ray restarts it unseen; the next rollout finds it back at v0
        #    (or still restarting), sends it the weights again and re-issues what it refused
        second_pid = health[1]["pid"]
        _kill(second_pid)
        pending = rollouts.start(_tasks(4), weight_version=1)
        after_idle_kill = pending.all()
        assert sorted({t.group_id for t in after_idle_kill}) == list(range(4))
        assert {t.weight_version for t in after_idle_kill} == {1}
        assert pending.counts["worker_restarts"] == 1 and pending.counts["groups_dropped"] == 0
        health = rollouts.health()
        assert health[1]["pid"] not in (first_pid, second_pid)
        assert health[1]["weight_version"] == 1
        assert rollouts.worker_restarts == 2
    finally:
        rollouts.shutdown()


def test_groups_past_their_retries_are_dropped_and_counted(ray_local, tmp_path):
    config = _config(tmp_path, **{"rollout.max_restarts": 1, "rollout.group_retries": 0})
    rollouts = RolloutGroup(rollout_spec(config))
    try:
        pid = rollouts.health()[1]["pid"]
        pending = rollouts.start(_tasks(8), weight_version=0)
        _kill(pid)
        trajectories = sorted(pending.all(), key=lambda t: t.group_id)
        # worker 0's groups (round-robin: the even ones) complete; worker 1's are dropped
        assert sorted({t.group_id for t in trajectories}) == [0, 2, 4, 6]
        assert pending.counts == {
            "worker_restarts": 1,
            "groups_reissued": 0,
            "groups_dropped": 4,
            "samples_dropped": 8,
        }
        metrics = step_metrics(
            StepRecord(
                step=0,
                trajectories=trajectories,
                weight_version=1,
                seconds={"rollout": 1.0},
                rollout_counts=pending.counts,
            )
        )
        assert metrics["rollout/groups_dropped"] == 4
        assert metrics["rollout/worker_restarts"] == 1
        assert metrics["infra_failures"] == 8  # the dropped samples, counted as failures
        assert rollouts.health()[1]["pid"] != pid  # and the worker is back for the next step
    finally:
        rollouts.shutdown()
