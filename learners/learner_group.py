"""LearnerGroup: `learner.num_ranks` LearnerRank actors training one policy with DeepSpeed.

    learners = LearnerGroup(spec)                      # spec: the recipe's LearnerSpec
    batch = learners.recompute_old_logprobs(batch)     # when learner.logp_old == "recompute"
    metrics = learners.update(batch=batch, step=t, phase="on_policy")
    metrics = learners.update(batch=replay, step=t, phase="replay", loss_weight=w_sil)
    weights = learners.publish_weights()               # BucketedWeights for rollout workers
    # or over a collective weight group with the rollout workers (learner.weight_transport:
    # collective): RolloutGroup.sync_weights drives open_weight_group, join_weight_group,
    # broadcast_weights and close_weight_group
    learners.save_checkpoint(directory=d, step=t)
    learners.shutdown()

Every call fans out to all ranks at once (the ranks meet in collectives) and waits for all of
them, failing fast: the first rank that dies or fails ends the wait with a LearnerError naming
it (a rank blocked in a collective with a dead peer is not waited for; the collective itself
fails after `learner.collective_timeout_s`). `update` gives each rank its rows of every
mini-batch (`learners.policy.rank_rows`); the ranks sum the loss divisors of each mini-batch
over the group, so the sharded update equals the single-process one. Metrics are combined by
the one table METRIC_REDUCTIONS.

The ranks live in one placement group of `learner.num_ranks` identical bundles (one per rank,
`resources.cpus_per_learner` / `gpus_per_learner`, `resources.placement_strategy`; see
spear_ray/placement.py), reserved before any rank starts. `ray.remote` is applied here, in
`spawn_learner_rank`, so every actor option is in one place.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import ray
import torch
from torch import Tensor

from learners.learner_rank import METRIC_REDUCTIONS, LearnerRank
from learners.policy import PHASES, num_mini_batches, rank_rows
from learners.weight_sync import (
    DEFAULT_BUCKET_BYTES,
    BucketedWeights,
    WeightGroupError,
    WeightGroupSpec,
)
from spear_ray.containers import TrainBatch
from spear_ray.faults import RunFault
from spear_ray.placement import (
    PLACEMENT_TIMEOUT_S,
    PlacementError,
    bundle_of,
    in_bundle,
    kill_actors,
    remove,
    reserve,
)
from spear_ray.recipe import LearnerSpec

_REDUCERS = {"sum": sum, "max": max, "mean": lambda values: sum(values) / len(values)}
# After a rank's call fails, how long the other ranks' calls get to finish: when one rank dies,
# its peers' collectives fail too, and the dead rank (the cause) is the one to name.
FAULT_GRACE_S = 10.0


class LearnerError(RunFault):
    """A learner rank died or failed a call (the message names the rank), or the ranks could
    not be placed (then also a PlacementError). Given the run (LearnerGroup's `run`), the
    message also names the last checkpoint and the command that resumes the run."""


class LearnerPlacementError(LearnerError, PlacementError):
    """The cluster cannot place the learner ranks' placement group."""


def reduce_metrics(
    per_rank: Sequence[Mapping[str, float]], reductions: Mapping[str, str] = METRIC_REDUCTIONS
) -> dict[str, float]:
    """Combine the ranks' metrics, each by its declared reduction (sum, max or mean)."""
    if not per_rank:
        return {}
    result: dict[str, float] = {}
    for name in per_rank[0]:
        if name not in reductions:
            raise KeyError(f"metric {name!r} has no declared reduction in METRIC_REDUCTIONS")
        result[name] = float(_REDUCERS[reductions[name]]([float(m[name]) for m in per_rank]))
    return result


def _first_line(err: BaseException) -> str:
    """The gist of a rank's error: a failed call's own exception (not Ray's task header)."""
    cause = getattr(err, "cause", None) if isinstance(err, ray.exceptions.RayTaskError) else None
    text = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(err)
    return next((line.strip() for line in text.splitlines() if line.strip()), type(err).__name__)


def _group_result(result: Any) -> Any:
    """A weight-group call's result; the group's failure (returned by rank 0) raised."""
    if isinstance(result, WeightGroupError):
        raise WeightGroupError(f"learner rank 0: {result}")
    return result


def spawn_learner_rank(spec: LearnerSpec, rank: int, world_size: int, group: Any, **options: Any):
    """Start one LearnerRank actor in bundle `rank` of the placement group."""
    res = spec.resources
    actor_cls = ray.remote(LearnerRank).options(
        num_cpus=res.cpus_per_learner,
        num_gpus=res.gpus_per_learner,
        scheduling_strategy=in_bundle(group, rank),
        # A restarted rank could not rejoin its process group: the group is rebuilt instead.
        max_restarts=0,
        **options,
    )
    return actor_cls.remote(spec, rank=rank, world_size=world_size)


class LearnerGroup:
    def __init__(
        self,
        spec: LearnerSpec,
        actor_options: dict[str, Any] | None = None,
        placement_timeout_s: float = PLACEMENT_TIMEOUT_S,
        run: Any = None,
    ):
        self.spec = spec
        self.run = run  # a RunDir: its last checkpoint is named in a LearnerError
        self.num_ranks = spec.learner.num_ranks
        res = spec.resources
        # One bundle per rank, all placed at once; the ranks' own node_info then finds the
        # rendezvous and the local ranks wherever the strategy put them.
        try:
            self._placement = reserve(
                bundle_of(res.cpus_per_learner, res.gpus_per_learner),
                self.num_ranks,
                strategy=res.placement_strategy,
                what="learner ranks",
                fields=(
                    "learner.num_ranks",
                    "resources.cpus_per_learner",
                    "resources.gpus_per_learner",
                ),
                timeout_s=placement_timeout_s,
            )
        except PlacementError as err:
            raise LearnerPlacementError(str(err)) from None
        self.ranks: list[Any] = []
        try:
            for r in range(self.num_ranks):
                self.ranks.append(
                    spawn_learner_rank(
                        spec, r, self.num_ranks, self._placement, **(actor_options or {})
                    )
                )
            self._setup()
        except BaseException:
            self.shutdown()
            raise

    @property
    def placement_group(self) -> Any:
        """The ranks' placement group (bundle r holds rank r); None after shutdown."""
        return self._placement

    def _setup(self) -> None:
        t0 = time.monotonic()
        nodes = self._call_all("node_info", [{}] * self.num_ranks)
        # Rendezvous at rank 0's node, on a port found free there just now.
        master_addr, master_port = nodes[0]["ip"], nodes[0]["free_port"]
        self.rendezvous = (master_addr, master_port)
        local = [
            {
                "local_rank": sum(n["node_id"] == node["node_id"] for n in nodes[:r]),
                "local_world_size": sum(n["node_id"] == node["node_id"] for n in nodes),
            }
            for r, node in enumerate(nodes)
        ]
        self.info = self._call_all(
            "setup",
            [dict(master_addr=master_addr, master_port=master_port, **lo) for lo in local],
        )
        self.setup_s = time.monotonic() - t0

    # ------------------------------------------------------------------ fan-out

    def _get(self, refs: Sequence[Any]) -> list[Any]:
        """The ranks' results in rank order, or a LearnerError as soon as any rank's call fails
        (not only when the ranks before it in order have returned: those may be blocked in a
        collective with the failed one)."""
        rank_of = {ref: rank for rank, ref in enumerate(refs)}
        results: dict[int, Any] = {}
        pending = list(refs)
        while pending:
            [ready], pending = ray.wait(pending, num_returns=1)
            try:
                results[rank_of[ready]] = ray.get(ready)
            except ray.exceptions.RayError as err:
                errors = {rank_of[ready]: err}
                if pending:  # the others' outcome, briefly: a dead rank is the cause to name
                    done, pending = ray.wait(
                        pending, num_returns=len(pending), timeout=FAULT_GRACE_S
                    )
                    for ref in done:
                        try:
                            ray.get(ref)
                        except ray.exceptions.RayError as other:
                            errors[rank_of[ref]] = other
                raise self._error(errors, busy=sorted(rank_of[ref] for ref in pending)) from err
        return [results[rank] for rank in range(len(refs))]

    def _error(self, errors: Mapping[int, BaseException], busy: Sequence[int]) -> LearnerError:
        """One LearnerError for the ranks whose calls failed: the first rank that died, else the
        first that failed; the other failed ranks and those still busy (hung?) are listed."""
        died = [r for r, e in sorted(errors.items()) if isinstance(e, ray.exceptions.RayActorError)]
        rank = died[0] if died else min(errors)
        what = "died" if died else "failed"
        notes = []
        if others := sorted(set(errors) - {rank}):
            notes.append(f"rank {', '.join(map(str, others))} failed too")
        if busy:
            notes.append(f"rank {', '.join(map(str, busy))} did not return (hung?)")
        also = f" ({'; '.join(notes)})" if notes else ""
        return LearnerError(
            f"learner rank {rank} {what}: {_first_line(errors[rank])}{also}", run=self.run
        )

    def _call_all(self, method: str, kwargs_per_rank: Sequence[Mapping[str, Any]]) -> list[Any]:
        refs = [
            getattr(actor, method).remote(**kwargs)
            for actor, kwargs in zip(self.ranks, kwargs_per_rank, strict=True)
        ]
        return self._get(refs)

    def _shards(self, rows: int, mini_batches: int) -> list[tuple[list[int], list[int]]]:
        return [
            rank_rows(rows, num_ranks=self.num_ranks, mini_batches=mini_batches, rank=r)
            for r in range(self.num_ranks)
        ]

    # ------------------------------------------------------------------ training

    def compute_logprobs(self, *, batch: TrainBatch) -> Tensor:
        """Current-policy log-probs of every token, [rows, length] like the batch (0 at
        position 0 and on padding)."""
        shards = self._shards(batch.rows, 1)
        parts = self._call_all(
            "compute_logprobs", [{"batch": batch.select(rows)} for rows, _ in shards]
        )
        return torch.cat(parts, dim=0)  # shards are contiguous and in rank order

    def recompute_old_logprobs(self, batch: TrainBatch) -> TrainBatch:
        """The batch with old_logprobs = the current policy's (learner.logp_old = "recompute"),
        zero outside the loss mask like the behaviour log-probs they replace."""
        logp = self.compute_logprobs(batch=batch)
        return replace(batch, old_logprobs=logp * batch.loss_mask)

    def update(
        self,
        *,
        batch: TrainBatch,
        step: int,
        phase: str,
        loss_weight: float = 1.0,
        own_logp_old: bool = False,
    ) -> dict[str, float]:
        """One phase of training step `step` (see LearnerRank.update); reduced metrics."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if batch.rows == 0:
            raise ValueError(f"update(phase={phase!r}, step={step}) got an empty batch")
        # ceil(rows / M) mini-batches: the on-policy batch gives learner.mini_batches_per_step,
        # a replay batch is cut into mini-batches of the on-policy size M.
        rows_per_mini_batch = self.spec.loss(phase).rows_per_mini_batch
        mini_batches = num_mini_batches(batch.rows, rows_per_mini_batch)  # <= rows
        kwargs = [
            {
                "batch": batch.select(rows),
                "step": step,
                "phase": phase,
                "loss_weight": loss_weight,
                "mini_batch_sizes": sizes,
                "own_logp_old": own_logp_old,
            }
            for rows, sizes in self._shards(batch.rows, mini_batches)
        ]
        return reduce_metrics(self._call_all("update", kwargs))

    # ------------------------------------------------------------------ weights, checkpoints

    def full_state_dict(self) -> dict[str, Tensor]:
        """The full weights, brought to the driver (for tests and exports; rollout workers get
        them through publish_weights instead)."""
        return self._call_all("full_state_dict", [{}] * self.num_ranks)[0]

    def publish_weights(self, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> BucketedWeights:
        """Rank 0 puts the weights into the object store in buckets; pass the result to the
        rollout workers' update_weights(named_tensors=..., version=...)."""
        refs = self._call_all("publish_weights", [{"bucket_bytes": bucket_bytes}] * self.num_ranks)
        return BucketedWeights(refs[0])

    # The collective weight sync (learner.weight_transport = "collective"): only rank 0 is in
    # the weight group, but gathering the weights is collective under ZeRO-3, so open and
    # broadcast go to every rank. A failure of the group (not of a learner rank) is raised as
    # WeightGroupError: RolloutGroup.sync_weights falls back to the object store on it.

    def open_weight_group(
        self,
        *,
        world_size: int,
        generation: int,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> WeightGroupSpec:
        """Rank 0 hosts a new weight group (closing its previous one); its spec, to hand to the
        rollout workers, who join while `join_weight_group` waits for them."""
        kwargs = dict(world_size=world_size, generation=generation, bucket_bytes=bucket_bytes)
        return _group_result(self._call_all("open_weight_group", [kwargs] * self.num_ranks)[0])

    def join_weight_group(self) -> None:
        """Rank 0 connects to the group opened last; returns when every member has."""
        _group_result(self._get([self.ranks[0].join_weight_group.remote()])[0])

    def broadcast_weights(self, *, generation: int) -> int:
        """Rank 0 sends the current weights to the weight group's rollout workers (who must be
        receiving: RolloutGroup.sync_weights sees to it); the bytes sent."""
        kwargs = {"generation": generation}
        return _group_result(self._call_all("broadcast_weights", [kwargs] * self.num_ranks)[0])

    def close_weight_group(self) -> None:
        self._get([self.ranks[0].close_weight_group.remote()])

    def save_checkpoint(self, *, directory: str, step: int) -> str:
        self._call_all("save_checkpoint", [{"directory": directory, "step": step}] * self.num_ranks)
        return directory

    def load_checkpoint(self, *, directory: str) -> int:
        steps = self._call_all("load_checkpoint", [{"directory": directory}] * self.num_ranks)
        return int(steps[0])

    def shutdown(self) -> None:
        """Shut the ranks down (killed after a timeout) and free their placement group."""
        kill_actors(self.ranks)
        self.ranks = []
        remove(self._placement)
        self._placement = None
