"""RolloutGroup: N RolloutWorker actors; spreads a step's tasks over them and streams groups back.

    group = RolloutGroup(spec)                  # spawns spec.rollout.num_workers actors
    pending = group.start(tasks, weight_version=v)   # returns at once
    for trajectories in pending.stream():
        ...                                       # one finished group (G trajectories) at a time
    group.sync_weights(learners, version=v + 1, transport="object_store")  # or "collective"
    group.shutdown()                              # kills the workers, frees their placement group

The workers live in one placement group of `rollout.num_workers` identical bundles (see
`rollout_bundle`), separate from the learners' group: with whole GPUs per actor, rollout and
learning run on separate GPUs.
`ray.remote` is applied here, in `spawn_rollout_worker`, so every actor option (CPUs, GPUs,
placement, restarts, concurrency) is visible in one place.

A worker that dies (a SIGKILL, the OOM killer, a crash, or its own exit past
rollout.max_hung_env_threads) is restarted by Ray, up to `rollout.max_restarts` times. The groups
it had in flight fail with a RayActorError; each is re-issued to the least-loaded live worker
(`rollout.group_retries` times per group), past that dropped and counted. Meanwhile the dead
worker is "recovering" (one restart counted): it gets no work; its `health()` is probed until
it answers and, since a restarted engine is back at the weights it was built with, it gets the
last weights `update_weights` sent before it takes groups again. A worker restarted unseen
(killed while idle) is found by its refusal of a rollout for weights it lacks, or by a new pid
in `health()`, and recovered the same way. A worker that Ray
will not restart again (or that does not come back within rollout.restart_timeout_s) is a
RolloutWorkerError naming it. `PendingRollout.counts` holds what a rollout lost
(ROLLOUT_COUNTS); the controller logs them as rollout/*.

Weights (`sync_weights`, `learner.weight_transport`): through the object store (learner rank 0
publishes buckets, every worker fetches them: `update_weights`), or over a collective weight
group (learners.weight_sync.WeightGroup): learner rank 0 is rank 0 and the live workers are
ranks 1..N in worker order. The group is formed at the first collective sync, re-formed when its
members change (a worker restarted or is recovering) or after it failed, and closed on shutdown.
A restarted worker is back at its initial weights and out of the group: it gets the current ones
through the object store (published then, only for it) and rejoins at the next sync. A failed
collective (a member died, or did not answer within learner.collective_timeout_s) is one line
in the log; that sync goes through the object store, and after MAX_COLLECTIVE_FAILURES in a row
the run stays there.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup

from actors.rollout_worker import RolloutWorker, StaleWeightsError
from learners.weight_sync import WeightGroupError
from spear_ray.agent.loop import Task
from spear_ray.containers import Trajectory
from spear_ray.placement import (
    PLACEMENT_TIMEOUT_S,
    bundle_of,
    in_bundle,
    kill_actors,
    remove,
    reserve,
)
from spear_ray.recipe import RolloutSpec


class WeightsLostError(RuntimeError):
    """The published weights a worker was to load are gone: the learner rank that owned them
    died (Ray's OwnerDiedError / ObjectLostError). A learner fault, not a rollout one."""

    def __init__(self, version: int, err: BaseException):
        super().__init__(
            f"the weights of version {version} were lost before every rollout worker loaded "
            f"them (the learner rank that published them died): {_first_line(err)}"
        )


def weights_lost(err: BaseException) -> bool:
    """Whether `err` (from ray.get on a worker's weight load) means the weights' owner died."""
    cause = getattr(err, "cause", None)
    lost = ray.exceptions.ObjectLostError  # OwnerDiedError is one
    return isinstance(err, lost) or isinstance(cause, lost)


class RolloutWorkerError(RuntimeError):
    """A rollout worker actor died for good or failed a call; the message names the worker."""


WEIGHT_TRANSPORTS = ("object_store", "collective")  # learner.weight_transport
MAX_COLLECTIVE_FAILURES = 3  # collective syncs failed in a row before the run stays off them
CLOSE_TIMEOUT_S = 10.0  # how long closing a weight group waits for its members (best effort)

# What a rollout lost to worker faults (PendingRollout.counts).
ROLLOUT_COUNTS = ("worker_restarts", "groups_reissued", "groups_dropped", "samples_dropped")
PROBE_INTERVAL_S = 1.0  # between health probes of a restarting worker


def rollout_bundle(spec: RolloutSpec) -> dict[str, float]:
    """The bundle of one rollout worker: {CPU: cpus_per_rollout_worker, GPU:
    gpus_per_rollout_worker (if > 0)}.

    With tensor parallelism the one bundle holds all the worker's GPUs (the spec requires
    gpus_per_rollout_worker >= rollout.tensor_parallel_size): a bundle always lies on one node,
    the worker actor takes the whole bundle, and vLLM starts its TP processes itself on the GPUs
    Ray gave the actor (vLLM's multiprocessing executor). vLLM's own Ray executor would instead
    need one 1-GPU bundle per TP rank (it refuses bundles of more than one GPU and takes the GPU
    bundles of the actor's current placement group), as OpenRLHF arranges with
    VLLM_RAY_BUNDLE_INDICES. Note that inside a placement group vLLM picks its Ray executor by
    default when TP > 1, so on GPU the engine must ask for distributed_executor_backend="mp"."""
    res = spec.resources
    return bundle_of(res.cpus_per_rollout_worker, res.gpus_per_rollout_worker)


def spawn_rollout_worker(
    spec: RolloutSpec,
    worker_index: int,
    placement_group: PlacementGroup | None = None,
    **options: Any,
):
    """Start one RolloutWorker actor with the resources of `spec.resources`, in bundle
    `worker_index` of `placement_group` when one is given. `options` override the defaults."""
    actor_options = rollout_actor_options(spec, worker_index, placement_group)
    actor_options.update(options)
    return (
        ray.remote(RolloutWorker)
        .options(**actor_options)
        .remote(spec, worker_index, exit_when_hung=True)
    )


def rollout_actor_options(
    spec: RolloutSpec, worker_index: int, placement_group: PlacementGroup | None = None
) -> dict[str, Any]:
    """The Ray actor options of rollout worker `worker_index`."""
    res = spec.resources
    actor_options: dict[str, Any] = {
        "num_cpus": res.cpus_per_rollout_worker,
        "num_gpus": res.gpus_per_rollout_worker,
        # async actor: concurrent rollout_group calls share the event loop and the engine
        "max_concurrency": 1000,
        # Ray restarts a dead worker; its calls are not retried by Ray (a restarted worker must
        # first get the current weights): RolloutGroup re-issues the lost groups itself.
        "max_restarts": spec.rollout.max_restarts,
        "max_task_retries": 0,
    }
    if res.threads_per_rollout_worker > 0 and res.gpus_per_rollout_worker == 0:
        # vLLM's CPU kernels take their thread count from OpenMP at process start (Ray would set
        # OMP_NUM_THREADS to the CPU reservation); torch.set_num_threads later is refused.
        actor_options["runtime_env"] = {
            "env_vars": {"OMP_NUM_THREADS": str(res.threads_per_rollout_worker)}
        }
    if placement_group is not None:
        actor_options["scheduling_strategy"] = in_bundle(placement_group, worker_index)
    return actor_options


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:300]


def _cause_line(err: BaseException) -> str:
    """The first line of a failed actor call's own exception (not Ray's task header)."""
    cause = getattr(err, "cause", None)
    return _first_line(cause if isinstance(cause, BaseException) else err)


@dataclass
class _WeightGroup:
    """The collective weight group as the driver formed it."""

    generation: int
    members: list[int]  # worker indices; members[k] is rank k + 1 (learner rank 0 is rank 0)
    restarts: int  # RolloutGroup.worker_restarts when it was formed: a restart since re-forms it


@dataclass
class _Group:
    """One task's group while it is in flight."""

    task: Task
    worker: int = -1
    lost: int = 0  # times lost with its worker (re-issued while lost <= rollout.group_retries)
    refused: int = 0  # times refused for stale weights by a worker restarted between calls


class PendingRollout:
    """Groups in flight; `stream()` yields each group as soon as it is complete.

    Groups lost with a dead worker are re-issued or dropped (see the module docstring); `counts`
    says how many (ROLLOUT_COUNTS), complete once the stream is exhausted."""

    def __init__(self, group: RolloutGroup, tasks: list[Task], **call_kwargs: Any):
        self._group = group
        self._call_kwargs = call_kwargs  # weight_version, evaluation
        self._pending: dict[ray.ObjectRef, _Group] = {}
        self._parked: list[_Group] = []  # lost groups waiting for a live worker
        self.counts: dict[str, int] = dict.fromkeys(ROLLOUT_COUNTS, 0)
        # start -> last group back: the rollout's own wall time, also when it overlapped the
        # previous step's update (async_steps=1), where the step's rollout phase is only a wait
        self.started = time.monotonic()
        self.finished: float | None = None
        group.poll_recoveries()  # a worker back since the last rollout takes groups again
        live = group.live_workers()
        for k, task in enumerate(tasks):  # round-robin over the live workers
            item = _Group(task)
            if live:
                self._submit(item, live[k % len(live)])
            else:
                self._parked.append(item)

    def _submit(self, item: _Group, index: int) -> None:
        item.worker = index
        ref = self._group.workers[index].rollout_group.remote(task=item.task, **self._call_kwargs)
        self._pending[ref] = item

    def _dispatch_parked(self) -> None:
        live = self._group.live_workers()
        while self._parked and live:
            load = {i: 0 for i in live}
            for item in self._pending.values():
                if item.worker in load:
                    load[item.worker] += 1
            self._submit(self._parked.pop(0), min(live, key=lambda i: (load[i], i)))

    def _result(self, ref: ray.ObjectRef, item: _Group) -> list[Trajectory] | None:
        """The group's trajectories, or None if it was lost (then re-issued or dropped)."""
        try:
            return ray.get(ref)
        except ray.exceptions.RayActorError as err:
            self._group.lost(item.worker, err)
            item.lost += 1
            if item.lost > self._group.spec.rollout.group_retries:
                self.counts["groups_dropped"] += 1
                self.counts["samples_dropped"] += item.task.num_samples
            else:
                self.counts["groups_reissued"] += 1
                self._parked.append(item)
            return None
        except StaleWeightsError as err:
            # A worker restarted while idle (nobody saw it die) is back at its initial weights.
            # Not the group's fault: re-issue without using a retry, once the worker has the
            # weights again (twice for one group would be a bug, not a fault: raise).
            if item.refused >= 2 or not self._group.can_refresh(
                self._call_kwargs.get("weight_version")
            ):
                raise
            item.refused += 1
            self._group.lost(item.worker, err)
            self.counts["groups_reissued"] += 1
            self._parked.append(item)
            return None

    def stream(self) -> Iterator[list[Trajectory]]:
        group = self._group
        while self._pending or self._parked:
            group.poll_recoveries()
            self.counts["worker_restarts"] += group.take_restarts()
            self._dispatch_parked()
            if self._parked and not self._pending and not group.recovering():
                raise RolloutWorkerError("no rollout worker is left to run the lost groups")
            refs = list(self._pending) + group.recovery_refs()
            if not refs:  # only recoveries waiting for their next probe
                time.sleep(PROBE_INTERVAL_S / 4)
                continue
            done, _ = ray.wait(refs, num_returns=1, timeout=PROBE_INTERVAL_S)
            for ref in done:
                item = self._pending.pop(ref, None)
                if item is None:  # a recovery's probe or weight push: polled at the loop's top
                    continue
                trajectories = self._result(ref, item)
                if trajectories is not None:
                    yield trajectories
        self.counts["worker_restarts"] += group.take_restarts()
        self.finished = time.monotonic()

    @property
    def wall_seconds(self) -> float | None:
        """Seconds from start to the last group back (None while groups are in flight)."""
        return None if self.finished is None else self.finished - self.started

    def all(self) -> list[Trajectory]:
        return [traj for group in self.stream() for traj in group]


@dataclass
class _Recovery:
    """A worker that died (or was restarted) and is not yet back with the current weights."""

    cause: str
    deadline: float
    probe: ray.ObjectRef | None = None  # health() in flight
    push: ray.ObjectRef | None = None  # update_weights() in flight
    next_probe: float = 0.0


class RolloutGroup:
    def __init__(
        self,
        spec: RolloutSpec,
        actor_options: dict[str, Any] | None = None,
        placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
    ):
        """Reserve one bundle per worker (a PlacementError after `placement_timeout_s` if the
        cluster cannot hold them) and start the workers in them."""
        self.spec = spec
        res, rollout = spec.resources, spec.rollout
        fields = [
            "rollout.num_workers",
            "resources.cpus_per_rollout_worker",
            "resources.gpus_per_rollout_worker",
        ]
        if rollout.tensor_parallel_size > 1:
            fields.append("rollout.tensor_parallel_size")
        self._placement: PlacementGroup | None = reserve(
            rollout_bundle(spec),
            rollout.num_workers,
            strategy=res.placement_strategy,
            what="rollout workers",
            fields=fields,
            timeout_s=placement_timeout_s,
        )
        self.workers: list[Any] = []
        # the last weights sent: (tensors, version); after a collective sync, tensors is the
        # learners' publish_weights, called only if a restarted worker needs them
        self._weights: tuple[Any, int] | None = None
        self._weight_group: _WeightGroup | None = None  # learner.weight_transport: collective
        self._weight_generations = 0
        self.collective_failures = 0  # collective syncs failed in a row
        self._pids: dict[int, int] = {}  # worker -> pid last seen (a new one: a restart)
        self._recovering: dict[int, _Recovery] = {}
        self._restarts_not_taken = 0
        self.worker_restarts = 0  # deaths (and unseen restarts) seen over this group's life
        try:
            for i in range(rollout.num_workers):
                self.workers.append(
                    spawn_rollout_worker(spec, i, self._placement, **(actor_options or {}))
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
        """Submit every task's group (round-robin over the live workers) and return at once."""
        return PendingRollout(self, tasks, weight_version=weight_version, evaluation=evaluation)

    def rollout(
        self, tasks: list[Task], *, weight_version: int | None = None, evaluation: bool = False
    ) -> list[Trajectory]:
        return self.start(tasks, weight_version=weight_version, evaluation=evaluation).all()

    def update_weights(self, named_tensors: Any, version: int) -> list[int | None]:
        """Load weights (a list of (name, tensor) or an ObjectRef to one) into every worker.

        They are kept (the previous ones released) for a worker that restarts later. Returns
        each worker's weight version; None for a worker that is recovering (it gets them when
        it is back)."""
        self._weights = (named_tensors, version)
        refs = {
            i: self.workers[i].update_weights.remote(named_tensors=named_tensors, version=version)
            for i in self.live_workers()
        }
        versions: list[int | None] = [None] * len(self.workers)
        for i, ref in refs.items():
            try:
                versions[i] = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                self.lost(i, err)
            except Exception as err:
                if weights_lost(err):
                    raise WeightsLostError(version, err) from err
                raise
        return versions

    # ------------------------------------------------------------------ weight sync

    def sync_weights(
        self, learners: Any, version: int, *, transport: str = "object_store", log=print
    ) -> str:
        """Send the learners' (a LearnerGroup's) current weights to every worker as `version`
        by `transport` (learner.weight_transport); the transport that delivered them. A failed
        collective sync is one line to `log` and the object store delivers instead."""
        if transport not in WEIGHT_TRANSPORTS:
            raise ValueError(f"transport must be one of {WEIGHT_TRANSPORTS}, got {transport!r}")
        if transport == "collective" and self.collective_failures < MAX_COLLECTIVE_FAILURES:
            try:
                self.broadcast_weights(learners, version)
            except WeightGroupError as err:
                self.collective_failures += 1
                self.close_weight_group(learners)
                then = (
                    "the group is re-formed at the next sync"
                    if self.collective_failures < MAX_COLLECTIVE_FAILURES
                    else f"{self.collective_failures} failures in a row: the object store from "
                    "now on"
                )
                log(
                    f"collective weight sync of v{version} failed, sent through the object "
                    f"store instead ({then}): {err}"
                )
            else:
                self.collective_failures = 0
                return "collective"
        self.update_weights(learners.publish_weights(), version)
        return "object_store"

    def broadcast_weights(self, learners: Any, version: int) -> list[int | None]:
        """The collective sync: learner rank 0 broadcasts its weights to the live workers over
        the weight group (formed, or re-formed, first), each worker receiving on a thread and
        loading them as `version`. Each worker's weight version; None for one that is
        recovering (it gets the weights through the object store when it is back). A
        WeightGroupError names every member that failed (a dead worker is also marked lost)."""
        members = self.live_workers()
        versions: list[int | None] = [None] * len(self.workers)
        if members:
            group = self._weight_group
            if group is None or group.members != members or group.restarts != self.worker_restarts:
                group = self._form_weight_group(learners, members)
            refs = {
                i: self.workers[i].receive_weights.remote(
                    generation=group.generation, version=version
                )
                for i in members
            }
            # if rank 0 fails, it closed its end: the receivers fail at once
            results = self._together(
                refs, lambda: learners.broadcast_weights(generation=group.generation)
            )
            for i, have in results.items():
                versions[i] = have
        # Kept for a worker that restarts later; published (object store) only if one does. The
        # learners' weights stay these until the next sync: the driver syncs after each update.
        self._weights = (learners.publish_weights, version)
        return versions

    def _form_weight_group(self, learners: Any, members: list[int]) -> _WeightGroup:
        """A new weight group of learner rank 0 and `members` (the previous one closed)."""
        self.close_weight_group(learners)
        self._weight_generations += 1
        spec = learners.open_weight_group(
            world_size=len(members) + 1, generation=self._weight_generations
        )
        # set now, so that a failed formation is closed like a failed sync
        self._weight_group = _WeightGroup(spec.generation, list(members), self.worker_restarts)
        refs = {
            i: self.workers[i].join_weight_group.remote(spec=spec, rank=k + 1)
            for k, i in enumerate(members)
        }
        # join_weight_group returns when every member has joined, or fails
        self._together(refs, learners.join_weight_group)
        return self._weight_group

    def _together(self, refs: dict[int, ray.ObjectRef], learner_call) -> dict[int, Any]:
        """Learner rank 0's side of a weight-group call (`learner_call`) while the workers'
        (`refs`) run; the workers' answers, or one WeightGroupError naming every side that
        failed (the learner's failure does not stop the workers' answers being collected)."""
        problems = []
        try:
            learner_call()
        except WeightGroupError as err:
            problems.append(str(err))
        results, failed = self._member_results(refs)
        if problems or failed:
            raise WeightGroupError("; ".join(problems + failed))
        return results

    def _member_results(self, refs: dict[int, ray.ObjectRef]) -> tuple[dict[int, Any], list[str]]:
        """The workers' answers to a weight-group call, and one line per worker that failed (a
        dead one is marked lost, so it is recovered like any other)."""
        results: dict[int, Any] = {}
        failed: list[str] = []
        for i, ref in refs.items():
            try:
                results[i] = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                self.lost(i, err)
                failed.append(f"rollout worker {i} died: {_cause_line(err)}")
            except WeightGroupError as err:
                failed.append(_cause_line(err))
        return results, failed

    def close_weight_group(self, learners: Any = None) -> None:
        """Tell the weight group's members to leave it (best effort: a dead or restarted worker
        has left already), and learner rank 0 too when `learners` is given."""
        group, self._weight_group = self._weight_group, None
        if group is None:
            return
        refs = [self.workers[i].close_weight_group.remote() for i in group.members]
        if learners is not None:
            learners.close_weight_group()
        if refs:
            ray.wait(refs, num_returns=len(refs), timeout=CLOSE_TIMEOUT_S)

    def _kept_weights(self) -> Any:
        """The last weights sent, for a worker that lacks them; after a collective sync they
        are published now (through the object store), once for every worker that needs them."""
        tensors, version = self._weights
        if callable(tensors):
            tensors = tensors()
            self._weights = (tensors, version)
        return tensors

    def health(self) -> list[dict[str, Any]]:
        """Every worker's health; waits for recovering workers to be back first."""
        while True:
            self._await_recoveries()
            refs = [w.health.remote() for w in self.workers]
            out = []
            for i, ref in enumerate(refs):
                try:
                    answer = ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    self.lost(i, err)
                    continue
                out.append(answer)
                self._pids.setdefault(i, answer["pid"])
                if answer["pid"] != self._pids[i] or answer["weight_version"] < self.kept_version:
                    # restarted since it was last seen: count it, send the weights again
                    self.lost(i, RuntimeError(f"restarted (pid {answer['pid']})"))
            if not self._recovering:
                return out

    # ------------------------------------------------------------------ worker recovery

    def live_workers(self) -> list[int]:
        """Workers that take groups now (not recovering)."""
        return [i for i in range(len(self.workers)) if i not in self._recovering]

    def recovering(self) -> list[int]:
        return sorted(self._recovering)

    def lost(self, index: int, err: BaseException) -> None:
        """Worker `index` failed a call with `err`: it died (Ray restarts it) or was restarted
        unseen. Count one restart and give it no work until it is back with the current
        weights (the other calls that fail with the same death add nothing)."""
        if index not in self._recovering:
            deadline = time.monotonic() + self.spec.rollout.restart_timeout_s
            self._recovering[index] = _Recovery(_first_line(err), deadline)
            self.worker_restarts += 1
            self._restarts_not_taken += 1

    @property
    def kept_version(self) -> int:
        """The version of the last weights sent (0: none sent, the initial model)."""
        return self._weights[1] if self._weights is not None else 0

    def can_refresh(self, weight_version: int | None) -> bool:
        """Whether re-sending the kept weights gives a worker `weight_version`."""
        return weight_version is None or weight_version <= self.kept_version

    def take_restarts(self) -> int:
        """Restarts seen since the last call."""
        n, self._restarts_not_taken = self._restarts_not_taken, 0
        return n

    def recovery_refs(self) -> list[ray.ObjectRef]:
        """The probes and weight pushes in flight (to wait on with the groups)."""
        return [ref for rec in self._recovering.values() for ref in (rec.probe, rec.push) if ref]

    def poll_recoveries(self) -> None:
        """Move every recovering worker on without blocking: probe its health until it
        answers, re-send the kept weights if it lacks them, and make it live again once they
        are loaded. Raises RolloutWorkerError for a worker
        Ray will not restart again, or one not back within rollout.restart_timeout_s."""
        now = time.monotonic()
        for i, rec in list(self._recovering.items()):
            ref = rec.push or rec.probe
            if ref is None:
                if now >= rec.next_probe:
                    rec.probe = self.workers[i].health.remote()
                elif now > rec.deadline:
                    raise self._not_back(i, rec)
                continue
            if not ray.wait([ref], timeout=0)[0]:
                if now > rec.deadline:
                    raise self._not_back(i, rec)
                continue
            was_probe = rec.push is None
            rec.probe = rec.push = None
            try:
                answer = ray.get(ref)
            except ray.exceptions.ActorUnavailableError:  # restarting (again): probe later
                rec.next_probe = now + PROBE_INTERVAL_S
                continue
            except Exception as err:
                if not was_probe and weights_lost(err):  # the kept weights' owner died
                    raise WeightsLostError(self.kept_version, err) from err
                if isinstance(err, ray.exceptions.RayActorError):
                    raise self._dead_for_good(i, rec, err) from err
                raise
            if was_probe:  # a health() answer
                self._pids[i] = answer["pid"]
                if answer["weight_version"] < self.kept_version:
                    rec.push = self.workers[i].update_weights.remote(
                        named_tensors=self._kept_weights(), version=self.kept_version
                    )
                    continue
            del self._recovering[i]  # back, with the current weights

    def _await_recoveries(self) -> None:
        while self._recovering:
            self.poll_recoveries()
            refs = self.recovery_refs()
            if refs:
                ray.wait(refs, num_returns=1, timeout=PROBE_INTERVAL_S)
            elif self._recovering:
                time.sleep(PROBE_INTERVAL_S / 4)

    def _dead_for_good(self, i: int, rec: _Recovery, err: BaseException) -> RolloutWorkerError:
        return RolloutWorkerError(
            f"rollout worker {i} died and Ray will not restart it "
            f"(rollout.max_restarts={self.spec.rollout.max_restarts}; restarts seen: "
            f"{self.worker_restarts}); it first failed with: {rec.cause}; "
            f"then: {_first_line(err)}"
        )

    def _not_back(self, index: int, rec: _Recovery) -> RolloutWorkerError:
        return RolloutWorkerError(
            f"rollout worker {index} died and was not back within "
            f"rollout.restart_timeout_s={self.spec.rollout.restart_timeout_s:g}; it failed "
            f"with: {rec.cause}"
        )

    def shutdown(self) -> None:
        """Shut the workers down (killed after a timeout) and free their placement group."""
        kill_actors(self.workers)  # their ends of a weight group go with them
        self.workers = []
        self._weight_group = None
        remove(self._placement)
        self._placement = None
