"""Held-out evaluation: the tasks, the rollouts and the metrics (used by training and by
`spear-ray eval`). No import of the controller or the CLI: both import this."""

from __future__ import annotations

from collections.abc import Callable

from spear_ray.agent.loop import Task
from spear_ray.config import SpearConfig
from spear_ray.containers import Trajectory


def eval_tasks(config: SpearConfig) -> list[Task]:
    """The held-out tasks: env seeds env.eval_seed_start, +1, ..., one sample each."""
    start = config.env.eval_seed_start
    return [
        Task(f"eval-{k}", group_id=k, env_seed=start + k, num_samples=1)
        for k in range(config.env.eval_tasks)
    ]


def evaluation_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    """Success rate and mean task reward over the valid trajectories, and the infra failures
    (excluded from both, never scored zero): the keys `Controller.evaluate` logs."""
    valid = [t for t in trajectories if t.is_valid]
    if not valid:  # nothing was measured: NaN (logged as null), never a success rate of 0
        nan = float("nan")
        return {
            "eval/success_rate": nan,
            "eval/task_reward": nan,
            "eval/infra_failures": len(trajectories),
        }
    return {
        "eval/success_rate": sum(t.success for t in valid) / len(valid),
        "eval/task_reward": sum(t.rewards.task for t in valid) / len(valid),
        "eval/infra_failures": len(trajectories) - len(valid),
    }


def evaluate_rollouts(
    rollouts,
    config: SpearConfig,
    *,
    weight_version: int | None = None,
    on_result: Callable[[Trajectory], None] | None = None,
) -> tuple[dict[str, float], list[Trajectory]]:
    """Play `config`'s held-out tasks on `rollouts` (a RolloutGroup) with evaluation sampling;
    `on_result` sees each trajectory as its task finishes. Returns (metrics, trajectories in
    task order)."""
    pending = rollouts.start(eval_tasks(config), weight_version=weight_version, evaluation=True)
    trajectories: list[Trajectory] = []
    for group in pending.stream():
        for trajectory in group:
            trajectories.append(trajectory)
            if on_result is not None:
                on_result(trajectory)
    trajectories.sort(key=lambda t: t.group_id)
    return evaluation_metrics(trajectories), trajectories
