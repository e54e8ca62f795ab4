"""RolloutGroup: N RolloutWorker actors; spreads a step's tasks over them and streams groups back.

    group = RolloutGroup(config)                  # spawns config.rollout.num_workers actors
    pending = group.start(tasks, weight_version=v)   # returns at once
    for trajectories in pending.stream():
        ...                                       # one finished group (G trajectories) at a time
    group.update_weights(weights_ref, version=v + 1)
    group.shutdown()                              # kills the workers, frees their placement group

The workers live in one placement group of `rollout.num_workers` identical bundles (see
`rollout_bundle`), separate from the learners' group: with whole GPUs per actor, rollout and
learning run on separate GPUs.
`ray.remote` is applied here, in `spawn_rollout_worker`, so every actor option (CPUs, GPUs,
placement, restarts, concurrency) is visible in one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup

from actors.rollout_worker import RolloutWorker
from spear_ray.agent.loop import Task
from spear_ray.config import SpearConfig
from spear_ray.containers import Trajectory
from spear_ray.placement import (
    PLACEMENT_TIMEOUT_S,
    bundle_of,
    in_bundle,
    kill_actors,
    remove,
    reserve,
)


class RolloutWorkerError(RuntimeError):
    """A rollout worker actor died or failed a call; the message names the worker."""


def rollout_bundle(config: SpearConfig) -> dict[str, float]:
    """The bundle of one rollout worker: {CPU: cpus_per_rollout_worker, GPU:
    gpus_per_rollout_worker (if > 0)}.

    With tensor parallelism the one bundle holds all the worker's GPUs (the config requires
    gpus_per_rollout_worker >= rollout.tensor_parallel_size): a bundle always lies on one node,
    the worker actor takes the whole bundle, and vLLM starts its TP processes itself on the GPUs
    Ray gave the actor (vLLM's multiprocessing executor). vLLM's own Ray executor would instead
    need one 1-GPU bundle per TP rank (it refuses bundles of more than one GPU and takes the GPU
    bundles of the actor's current placement group), as OpenRLHF arranges with
    VLLM_RAY_BUNDLE_INDICES. Note that inside a placement group vLLM picks its Ray executor by
    default when TP > 1, so on GPU the engine must ask for distributed_executor_backend="mp"."""
    res = config.resources
    return bundle_of(res.cpus_per_rollout_worker, res.gpus_per_rollout_worker)


def spawn_rollout_worker(
    config: SpearConfig,
    worker_index: int,
    placement_group: PlacementGroup | None = None,
    **options: Any,
):
    """Start one RolloutWorker actor with the resources of `config.resources`, in bundle
    `worker_index` of `placement_group` when one is given. `options` override the defaults."""
    res = config.resources
    actor_options: dict[str, Any] = {
        "num_cpus": res.cpus_per_rollout_worker,
        "num_gpus": res.gpus_per_rollout_worker,
        # async actor: concurrent rollout_group calls share the event loop and the engine
        "max_concurrency": 1000,
    }
    if placement_group is not None:
        actor_options["scheduling_strategy"] = in_bundle(placement_group, worker_index)
    actor_options.update(options)
    return ray.remote(RolloutWorker).options(**actor_options).remote(config, worker_index)


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
    def __init__(
        self,
        config: SpearConfig,
        actor_options: dict[str, Any] | None = None,
        placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
    ):
        """Reserve one bundle per worker (a PlacementError after `placement_timeout_s` if the
        cluster cannot hold them) and start the workers in them."""
        self.config = config
        res, rollout = config.resources, config.rollout
        fields = [
            "rollout.num_workers",
            "resources.cpus_per_rollout_worker",
            "resources.gpus_per_rollout_worker",
        ]
        if rollout.tensor_parallel_size > 1:
            fields.append("rollout.tensor_parallel_size")
        self._placement: PlacementGroup | None = reserve(
            rollout_bundle(config),
            rollout.num_workers,
            strategy=res.placement_strategy,
            what="rollout workers",
            fields=fields,
            timeout_s=placement_timeout_s,
        )
        self.workers: list[Any] = []
        try:
            for i in range(rollout.num_workers):
                self.workers.append(
                    spawn_rollout_worker(config, i, self._placement, **(actor_options or {}))
                )
        except BaseException:
            self.shutdown()
            raise

    @property
    def placement_group(self) -> PlacementGroup | None:
        """The workers' placement group (bundle i holds worker i); None after shutdown."""
        return self._placement

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
        """Shut the workers down (killed after a timeout) and free their placement group."""
        kill_actors(self.workers)
        self.workers = []
        remove(self._placement)
        self._placement = None
