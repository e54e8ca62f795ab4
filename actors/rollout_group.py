"""RolloutGroup: N RolloutWorker actors; spreads a step's tasks over them and streams groups back.

    group = RolloutGroup(config)                  # spawns config.rollout.num_workers actors
    for trajectories in group.rollout_stream(tasks, weight_version=v):
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


class RolloutGroup:
    def __init__(self, config: SpearConfig, actor_options: dict[str, Any] | None = None):
        self.config = config
        self.workers = [
            spawn_rollout_worker(config, i, **(actor_options or {}))
            for i in range(config.rollout.num_workers)
        ]

    def _call(self, index: int, ref: ray.ObjectRef) -> Any:
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as err:
            raise RolloutWorkerError(
                f"rollout worker {index} died: {str(err).splitlines()[0]}"
            ) from err

    def rollout_stream(
        self, tasks: list[Task], *, weight_version: int | None = None, evaluation: bool = False
    ) -> Iterator[list[Trajectory]]:
        """Yield each task's group of trajectories as soon as it is complete."""
        pending: dict[ray.ObjectRef, int] = {}
        for k, task in enumerate(tasks):
            index = k % len(self.workers)
            ref = self.workers[index].rollout_group.remote(
                task=task, weight_version=weight_version, evaluation=evaluation
            )
            pending[ref] = index
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                yield self._call(pending.pop(ref), ref)

    def rollout(
        self, tasks: list[Task], *, weight_version: int | None = None, evaluation: bool = False
    ) -> list[Trajectory]:
        return [
            traj
            for group in self.rollout_stream(
                tasks, weight_version=weight_version, evaluation=evaluation
            )
            for traj in group
        ]

    def update_weights(self, named_tensors: Any, version: int) -> list[int]:
        """Load weights (a list of (name, tensor) or an ObjectRef to one) into every worker."""
        refs = [
            w.update_weights.remote(named_tensors=named_tensors, version=version)
            for w in self.workers
        ]
        return [self._call(i, ref) for i, ref in enumerate(refs)]

    def health(self) -> list[dict[str, Any]]:
        return [self._call(i, w.health.remote()) for i, w in enumerate(self.workers)]

    def shutdown(self) -> None:
        for worker in self.workers:
            try:
                ray.get(worker.shutdown.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass  # already gone, or hung: kill below either way
            finally:
                ray.kill(worker)
        self.workers = []
