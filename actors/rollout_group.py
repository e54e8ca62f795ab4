"""RolloutGroup: N RolloutWorker actors; spreads a step's tasks over them and streams groups back.

    group = RolloutGroup(config)                  # spawns config.rollout.num_workers actors
    pending = group.start(tasks, weight_version=v)   # returns at once
    for trajectories in pending.stream():
        ...                                       # one finished group (G trajectories) at a time
    group.update_weights(weights_ref, version=v + 1)

`ray.remote` is applied here, in `spawn_rollout_worker`, so every actor option (CPUs, GPUs,
restarts, concurrency) is visible in one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import ray

from actors.rollout_worker import RolloutWorker
from spear_ray.agent.loop import Task
from spear_ray.config import SpearConfig
from spear_ray.containers import Trajectory


class RolloutWorkerError(RuntimeError):
    """A rollout worker actor died or failed a call; the message names the worker."""


def spawn_rollout_worker(config: SpearConfig, worker_index: int, **options: Any):
    """Start one RolloutWorker actor with the resources of `config.resources`."""
    res = config.resources
    actor_cls = ray.remote(RolloutWorker).options(
        num_cpus=res.cpus_per_rollout_worker,
        num_gpus=res.gpus_per_rollout_worker,
        # async actor: concurrent rollout_group calls share the event loop and the engine
        max_concurrency=1000,
        **options,
    )
    return actor_cls.remote(config, worker_index)


def _get(index: int, ref: ray.ObjectRef) -> Any:
    try:
        return ray.get(ref)
    except ray.exceptions.RayActorError as err:
        raise RolloutWorkerError(
            f"rollout worker {index} died: {str(err).splitlines()[0]}"
        ) from err


class PendingRollout:
    """Groups in flight; `stream()` yields each group as soon as it is complete."""

    def __init__(self, pending: dict[ray.ObjectRef, int]):
        self._pending = dict(pending)

    def stream(self) -> Iterator[list[Trajectory]]:
        while self._pending:
            done, _ = ray.wait(list(self._pending), num_returns=1)
            for ref in done:
                yield _get(self._pending.pop(ref), ref)

    def all(self) -> list[Trajectory]:
        return [traj for group in self.stream() for traj in group]


class RolloutGroup:
    def __init__(self, config: SpearConfig, actor_options: dict[str, Any] | None = None):
        self.config = config
        self.workers = [
            spawn_rollout_worker(config, i, **(actor_options or {}))
            for i in range(config.rollout.num_workers)
        ]

    def start(
        self, tasks: list[Task], *, weight_version: int | None = None, evaluation: bool = False
    ) -> PendingRollout:
        """Submit every task's group (round-robin over the workers) and return at once."""
        pending: dict[ray.ObjectRef, int] = {}
        for k, task in enumerate(tasks):
            index = k % len(self.workers)
            ref = self.workers[index].rollout_group.remote(
                task=task, weight_version=weight_version, evaluation=evaluation
            )
            pending[ref] = index
        return PendingRollout(pending)

    def rollout(
        self, tasks: list[Task], *, weight_version: int | None = None, evaluation: bool = False
    ) -> list[Trajectory]:
        return self.start(tasks, weight_version=weight_version, evaluation=evaluation).all()

    def update_weights(self, named_tensors: Any, version: int) -> list[int]:
        """Load weights (a list of (name, tensor) or an ObjectRef to one) into every worker."""
        refs = [
            w.update_weights.remote(named_tensors=named_tensors, version=version)
            for w in self.workers
        ]
        return [_get(i, ref) for i, ref in enumerate(refs)]

    def health(self) -> list[dict[str, Any]]:
        return [_get(i, w.health.remote()) for i, w in enumerate(self.workers)]

    def shutdown(self) -> None:
        for worker in self.workers:
            try:
                ray.get(worker.shutdown.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass  # already gone, or hung: kill below either way
            finally:
                ray.kill(worker)
        self.workers = []
