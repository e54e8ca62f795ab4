"""The driver of a training run: owns the actor groups and runs the SPEAR step.

`Controller.step` reads like the algorithm (docs/algorithm.md "Step order"), as named, timed
phases:

    rollout -> experience (score + tool bonus, Dr.BoT masks, group filter, advantages)
    -> replay_batch -> logp_old -> update (on-policy) -> update (replay, weighted by w_SIL(t))
    -> buffer (expire, admit, record baseline) -> sync_weights -> metrics

Every constant comes from the recipe (spear_ray/recipe.py), built once from the config. With
`rollout.async_steps: 1` the rollout of step t+1 is started before the update of step t, so it
runs on weights one version old (staleness is measured per trajectory and logged).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from actors.rollout_group import PendingRollout, RolloutGroup, WeightsLostError
from buffers.actor import spawn_replay_buffer
from buffers.replay_buffer import ReplayEntry, replay_batch_stats, replay_train_batch
from learners.learner_group import LearnerGroup
from spear_ray.agent.loop import Task
from spear_ray.config import ConfigError, SpearConfig
from spear_ray.config.schema import train_seed_range
from spear_ray.containers import TrainBatch, Trajectory
from spear_ray.evaluation import evaluate_rollouts
from spear_ray.experience import StepExperience, process_step
from spear_ray.faults import NonFiniteGuard, RunFault
from spear_ray.recipe import Recipe
from spear_ray.run_dir import RunDir


class Phases:
    """Wall-clock seconds per named phase of one step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def tasks_for_step(config: SpearConfig, step: int) -> list[Task]:
    """The step's prompts: a deterministic function of run.seed and the step (so resuming needs
    no state); each run seed has its own stream of env seeds (see train_seed_range)."""
    n = config.rollout.prompts_per_step
    first = train_seed_range(config)[0] + step * n
    return [
        Task(
            f"s{step}-g{g}",
            group_id=g,
            env_seed=first + g,
            num_samples=config.rollout.samples_per_prompt,
        )
        for g in range(n)
    ]


class Controller:
    def __init__(self, config: SpearConfig, run: RunDir, pad_token_id: int, log=print):
        self.config = config
        self.recipe = Recipe.from_config(config)
        self.run = run
        self.pad_token_id = pad_token_id
        self.log = log
        self.weight_version = 0
        # stops the run after learner.max_nonfinite_in_row non-finite updates in a row
        self.guard = NonFiniteGuard(config.learner.max_nonfinite_in_row, run=run)
        self._pending: PendingRollout | None = None
        self._rollout_counts: dict[str, int] = {}
        self._rollout_seconds: float | None = None
        # Rollout workers first: their engines start while the learner ranks set up.
        self.rollouts = RolloutGroup(self.recipe.rollout)
        self.learners: LearnerGroup | None = None
        self.buffer = None
        try:
            self.learners = LearnerGroup(self.recipe.learner, run=run)
            if self.recipe.replay is not None:
                self.buffer = spawn_replay_buffer(
                    self.recipe.replay, run.buffer_dir, seed=config.run.seed
                )
            log("waiting for the rollout workers' engines to start")
            # (so the engines' start-up is not timed as step 0's rollout phase)
            self.rollouts.health()
        except BaseException:
            self.shutdown()
            raise

    # ------------------------------------------------------------------ the step

    def step(self, t: int) -> dict[str, Any]:
        """One training step; its metrics row."""
        try:
            return self._step(t)
        except WeightsLostError as err:  # a learner rank died after publishing its weights
            raise RunFault(str(err), run=self.run) from err

    def _step(self, t: int) -> dict[str, Any]:
        recipe, phase = self.recipe, Phases()
        with phase("rollout"):
            trajectories = self._collect_rollout(t)
            if self.config.rollout.async_steps:
                self._start_next_rollout(t)  # overlaps this step's update
        with phase("experience"):  # rewards + tool bonus, Dr.BoT masks, group filter, advantages
            exp = process_step(
                trajectories,
                t,
                tool_bonus=recipe.tool_bonus,
                filters=recipe.filters,
                advantage=recipe.advantage,
            )
            batch = exp.train_batch(self.pad_token_id)
        with phase("replay_batch"):
            replay_rows = self._replay_rows(t)
        # Nothing to learn from a step without one valid row (every group dropped or failed).
        trainable = any(traj.is_valid for traj in trajectories)
        with phase("logp_old"):
            batch = self._logp_old(batch) if trainable else batch
        with phase("update"):
            on_policy = self._update(batch, t, "on_policy") if trainable else {}
        w_sil = recipe.sil.weight(t)
        with phase("update_replay"):
            replay = self._update_replay(replay_rows, t, w_sil)
        on_policy["nonfinite_in_row"] = self.guard.observe(t, on_policy, replay)  # may stop
        with phase("buffer"):  # expire stale rows, admit positive-advantage rows, baseline
            buffer_stats = self._end_buffer_step(t, exp, batch)
        with phase("sync_weights"):
            self._sync_weights(version=t + 1)
        if not self.config.rollout.async_steps:
            self._start_next_rollout(t)
        return step_metrics(
            StepRecord(
                step=t,
                trajectories=trajectories,
                filter_counts=exp.filter_counts,
                on_policy=on_policy,
                replay=replay,
                buffer=buffer_stats,
                w_sil=w_sil,
                lambda_tc=recipe.tool_bonus.lam(t),
                weight_version=self.weight_version,
                seconds=phase.seconds,
                replay_rows=len(replay_rows or []),
                replayed=replay_batch_stats(replay_rows or []),
                rollout_counts=self._rollout_counts,
                update_skipped=not trainable,
                rollout_seconds=self._rollout_seconds,
            )
        )

    # ------------------------------------------------------------------ the step's parts

    def _replay_rows(self, t: int) -> list[ReplayEntry] | None:
        """SPEAR's replay batch of step t, or None (no trigger, or SIL off)."""
        if self.buffer is None:
            return None
        ranks = self.config.learner.num_ranks
        return ray.get(self.buffer.replay_batch.remote(step=t, min_rows=ranks))

    def _logp_old(self, batch: TrainBatch) -> TrainBatch:
        """logp_old of the on-policy loss (Recipe.logp_old): recomputed by the learners (the
        reference's rule, and the default), left to the update itself where that is provably
        the same (one epoch of one mini-batch), or the engine's behaviour log-probs."""
        if self.recipe.logp_old == "recompute":
            return self.learners.recompute_old_logprobs(batch)
        return batch

    def _update(self, batch: TrainBatch, t: int, phase: str, weight: float = 1.0) -> dict:
        own = phase == "on_policy" and self.recipe.logp_old == "update"
        return self.learners.update(
            batch=batch, step=t, phase=phase, loss_weight=weight, own_logp_old=own
        )

    def _update_replay(self, rows: list[ReplayEntry] | None, t: int, w_sil: float) -> dict:
        """The SIL update on the replay rows, its loss weighted by w_SIL(t)."""
        if not rows:
            return {}
        return self._update(replay_train_batch(rows, self.pad_token_id), t, "replay", w_sil)

    def _end_buffer_step(self, t: int, exp: StepExperience, batch: TrainBatch) -> dict:
        """Expire stale rows, admit this step's rows (as the on-policy update trained them),
        record the kept groups' reward statistics in the baseline history."""
        if self.buffer is None:
            return {}
        entries = [
            ReplayEntry.from_batch_row(traj, batch, row, step=t)
            for row, traj in enumerate(exp.trajectories)
        ]
        return ray.get(
            self.buffer.end_step.remote(
                step=t, entries=entries, group_means=exp.group_means, group_stds=exp.group_stds
            )
        )

    def _sync_weights(self, version: int) -> None:
        """The learners' weights to every rollout worker as `version`, by
        learner.weight_transport (a failed collective sync falls back to the object store)."""
        self.weight_version = version
        self.rollouts.sync_weights(
            self.learners, version, transport=self.config.learner.weight_transport, log=self.log
        )

    # ------------------------------------------------------------------ rollouts

    def _start_rollout(self, t: int) -> PendingRollout:
        return self.rollouts.start(
            tasks_for_step(self.config, t), weight_version=self.weight_version
        )

    def _start_next_rollout(self, t: int) -> None:
        if t + 1 < self.config.run.total_steps:
            self._pending = self._start_rollout(t + 1)

    def _collect_rollout(self, t: int) -> list[Trajectory]:
        pending = self._pending if self._pending is not None else self._start_rollout(t)
        self._pending = None
        # Groups arrive in completion order; batch rows in task order keep the update (and so a
        # resumed run) independent of which worker finished first. The sort is stable: samples
        # stay in their order within a group.
        trajectories = sorted(pending.all(), key=lambda traj: traj.group_id)
        self._rollout_counts = pending.counts  # what worker faults cost (complete after all())
        self._rollout_seconds = pending.wall_seconds
        return trajectories

    def evaluate(self) -> dict[str, float]:
        metrics, _ = evaluate_rollouts(
            self.rollouts, self.config, weight_version=self.weight_version
        )
        return metrics

    # ------------------------------------------------------------------ checkpoints

    def save(self, step: int) -> None:
        """Everything needed to continue after `step` (the next step to run is step + 1). Not
        while non-finite updates run in a row: the last checkpoint stays the one before them."""
        if self.guard.active:
            self.log(f"checkpoint of step {step} not saved: {self.guard.describe()}")
            return
        with self.run.checkpoint(step) as directory:
            self.learners.save_checkpoint(directory=str(directory / "learner"), step=step)
            if self.buffer is not None:
                ray.get(self.buffer.save.remote(str(directory / "buffer.npz")))

    def restore(self, directory) -> int:
        """Load a checkpoint; the returned step is the last one it completed."""
        step = self.learners.load_checkpoint(directory=str(directory / "learner"))
        if self.buffer is not None and (directory / "buffer.npz").exists():
            ray.get(self.buffer.load.remote(str(directory / "buffer.npz")))
        self._sync_weights(version=step + 1)
        return step

    def restore_latest(self, log=None) -> tuple[Path | None, int]:
        """Restore the newest usable checkpoint: partial or damaged ones (files that differ
        from the manifest, checksums included) are skipped, each reported to `log` in one line.
        (checkpoint, its step), or (None, -1) for a run with no checkpoint yet."""
        log = log or self.log
        self.run.remove_unfinished(log)
        checkpoint = self.run.usable_checkpoint(checksums=True, log=log)
        if checkpoint is None:
            if self.run.checkpoints_newest_first():
                raise ConfigError(
                    f"{self.run.path}: none of its checkpoints is usable (see above); move "
                    f"{self.run.checkpoints_dir} away to start the run over"
                )
            return None, -1
        self.log(f"loading {checkpoint}")
        return checkpoint, self.restore(checkpoint)

    def shutdown(self) -> None:
        with suppress(Exception):  # best effort: the processes go next anyway
            self.rollouts.close_weight_group(self.learners)
        self.rollouts.shutdown()
        if self.learners is not None:
            self.learners.shutdown()
        if self.buffer is not None:
            ray.kill(self.buffer)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


@dataclass
class StepRecord:
    """What one step produced, for its metrics row."""

    step: int
    trajectories: list[Trajectory]
    filter_counts: dict[str, int] = field(default_factory=dict)
    on_policy: dict[str, float] = field(default_factory=dict)  # learner metrics, on-policy
    replay: dict[str, float] = field(default_factory=dict)  # learner metrics, replay
    buffer: dict[str, Any] = field(default_factory=dict)  # the buffer's stats
    w_sil: float = 0.0  # what the replay loss was weighted by
    lambda_tc: float = 0.0
    weight_version: int = 0
    seconds: dict[str, float] = field(default_factory=dict)  # per phase
    replay_rows: int = 0
    # what a replay update replayed (buffers.replay_buffer.replay_batch_stats: rows,
    # success_frac, mean_advantage); {} on a step without one
    replayed: dict[str, float] = field(default_factory=dict)
    rollout_counts: dict[str, int] = field(default_factory=dict)  # what worker faults cost
    update_skipped: bool = False
    rollout_seconds: float | None = None


def step_metrics(record: StepRecord) -> dict[str, Any]:
    """The metrics row of one step (NaN becomes None: null in metrics.jsonl)."""
    valid = [tr for tr in record.trajectories if tr.is_valid]
    # samples of groups dropped with a dead rollout worker count as failures too
    dropped = record.rollout_counts.get("samples_dropped", 0)
    staleness = [record.weight_version - 1 - tr.weight_version for tr in valid]
    out: dict[str, Any] = {
        "step": record.step,
        "reward/mean": _mean([tr.rewards.total for tr in valid]),
        "reward/task": _mean([tr.rewards.task for tr in valid]),
        "reward/tool_bonus": _mean([tr.rewards.tool_bonus for tr in valid]),
        "success_rate": _mean([float(tr.success) for tr in valid]),
        "response_length": _mean([float(tr.response_length) for tr in valid]),
        "tool_calls": _mean([float(tr.tool_calls) for tr in valid]),
        "invalid_actions": _mean([float(tr.invalid_actions) for tr in valid]),
        "infra_failures": len(record.trajectories) - len(valid) + dropped,
        "staleness/mean": _mean([float(s) for s in staleness]),
        "staleness/max": max(staleness, default=0),
        "spear/w_sil": record.w_sil,
        "spear/lambda_tc": record.lambda_tc,
        "spear/replay_rows": record.replay_rows,
        "weight_version": record.weight_version,
    }
    out.update({f"filter/{k}": v for k, v in record.filter_counts.items()})
    out.update({f"rollout/{k}": v for k, v in record.rollout_counts.items()})
    out["update/skipped_no_valid_rows"] = int(record.update_skipped)
    if record.rollout_seconds:  # generated (policy) tokens per second of the rollout's wall time
        generated = sum(sum(tr.loss_mask) for tr in record.trajectories)
        out["rollout/seconds"] = record.rollout_seconds
        out["rollout/tokens_per_s"] = generated / record.rollout_seconds
    out.update({f"update/{k}": v for k, v in record.on_policy.items()})
    out.update({f"replay/{k}": v for k, v in record.replay.items()})
    # with the learners' replay/logp_change: the four per-replay keys (docs/algorithm.md §5)
    out.update({f"replay/{k}": v for k, v in record.replayed.items()})
    out.update(
        {
            f"buffer/{k}": v
            for k, v in record.buffer.items()
            if isinstance(v, (int, float)) and v is not None
        }
    )
    out.update({f"time/{k}": v for k, v in record.seconds.items()})
    out["time/step"] = sum(record.seconds.values())
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
