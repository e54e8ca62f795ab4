"""Rollout workers on a real local Ray: real vLLM engines, real envs, groups streamed back."""

from __future__ import annotations

import os
import signal
import time

import pytest
import ray

from actors.rollout_group import RolloutGroup, RolloutWorkerError
from spear_ray.agent.loop import Task
from spear_ray.config import load_config
from spear_ray.recipe import rollout_spec


def _config(tmp_path, **extra):
    overrides = {
        "model.path": "builtin:tiny-random",
        "model.dtype": "float32",
        "rollout.num_workers": 2,
        "rollout.samples_per_prompt": 2,
        "rollout.prompts_per_step": 4,
        "rollout.max_tokens_per_turn": 8,
        "rollout.cpu_kv_cache_gib": 0.25,
        "resources.cpus_per_rollout_worker": 0.5,
        "env.options": "{max_turns: 3}",
        **extra,
    }
    return load_config("demo", [f"{k}={v}" for k, v in overrides.items()])


@pytest.fixture(scope="module")
def group(ray_local, tmp_path_factory):
    rollouts = RolloutGroup(rollout_spec(_config(tmp_path_factory.mktemp("rollout"))))
    yield rollouts
    rollouts.shutdown()


def _tasks(n, samples=2):
    return [Task(f"t{g}", group_id=g, env_seed=100 + g, num_samples=samples) for g in range(n)]


def test_two_workers_return_every_group_streamed(group):
    seen = []
    for trajectories in group.start(_tasks(6), weight_version=0).stream():
        assert len(trajectories) == 2 and len({t.group_id for t in trajectories}) == 1
        seen.append(trajectories[0].group_id)
    assert sorted(seen) == list(range(6))
    health = group.health()
    assert [h["worker_index"] for h in health] == [0, 1]
    assert all(h["trajectories_done"] > 0 for h in health)  # both workers took groups


def test_trajectories_are_token_consistent(group):
    trajectories = group.rollout(_tasks(2), weight_version=0)
    for traj in trajectories:
        assert traj.failure is None
        assert traj.prompt_length > 0 and len(traj.turn_spans) >= 1
        generated = [i for i, m in enumerate(traj.loss_mask) if m]
        assert generated == [i for s, e in traj.turn_spans for i in range(s, e)]
        assert all(lp <= 0.0 for lp in traj.behaviour_logprobs)
        assert traj.weight_version == 0


def test_asking_for_weights_a_worker_lacks_is_a_clear_error(group):
    with pytest.raises(Exception, match="has weights v0 but the rollout asked for v5"):
        group.rollout(_tasks(1), weight_version=5)


def test_killed_worker_past_its_restarts_is_named_in_a_clear_error(ray_local, tmp_path):
    # (a worker that Ray restarts is tested in test_rollout_faults.py)
    config = _config(tmp_path, **{"rollout.trajectory_timeout_s": 120, "rollout.max_restarts": 0})
    rollouts = RolloutGroup(rollout_spec(config))
    try:
        pid = rollouts.health()[1]["pid"]
        pending = rollouts.start(_tasks(8, samples=2), weight_version=0)
        os.kill(pid, signal.SIGKILL)  # its groups were just submitted: they are lost
        t0 = time.monotonic()
        with pytest.raises(
            RolloutWorkerError,
            match=r"rollout worker 1 died and Ray will not restart it \(rollout.max_restarts=0",
        ):
            pending.all()
        assert time.monotonic() - t0 < 120
    finally:
        rollouts.shutdown()
    assert ray.is_initialized()
