"""The driver of a training run: owns the actor groups and runs the SPEAR step.

`Controller.step` reads like SPEAR.md §8, as named, timed phases:

    rollout -> experience (score + tool bonus, Dr.BoT masks, group filter, advantages)
    -> replay_batch -> logp_old -> update (on-policy) -> update (replay, weighted by w_SIL(t))
    -> buffer (expire, admit, record baseline) -> sync_weights -> metrics

With `rollout.async_steps: 1` the rollout of step t+1 is started before the update of step t,
so it runs on weights one version old (staleness is measured per trajectory and logged).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray

from actors.rollout_group import PendingRollout, RolloutGroup, WeightsLostError
from buffers.actor import spawn_replay_buffer
from buffers.replay_buffer import ReplayEntry, replay_train_batch
from learners.learner_group import LearnerGroup
from spear_ray.agent.loop import Task
from spear_ray.algo import sil_weight
from spear_ray.algo.curriculum import TOOL_REWARD_SCHEDULES
from spear_ray.config import ConfigError, SpearConfig
from spear_ray.config.schema import train_seed_range
from spear_ray.containers import Trajectory
from spear_ray.evaluate import evaluate_rollouts
from spear_ray.experience import process_step
from spear_ray.faults import NonFiniteGuard, RunFault
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
        self.run = run
        self.pad_token_id = pad_token_id
        self.log = log
        self.weight_version = 0
        # stops the run after learner.max_nonfinite_in_row non-finite updates in a row
        self.guard = NonFiniteGuard(config.learner.max_nonfinite_in_row, run=run)
        # Rollout workers first: their engines start while the learner ranks set up.
        self.rollouts = RolloutGroup(config)
        self.learners: LearnerGroup | None = None
        self.buffer = None
        try:
            self.learners = LearnerGroup(config, run=run)
            if config.algo.sil.enabled:
                self.buffer = spawn_replay_buffer(config, run.buffer_dir)
            log("waiting for the rollout workers' engines to start")
            # (so the engines' start-up is not timed as step 0's rollout phase)
            self.rollouts.health()
        except BaseException:
            self.shutdown()
            raise
        self._pending: PendingRollout | None = None

    # ------------------------------------------------------------------ the step

    def step(self, t: int) -> dict[str, Any]:
        """One training step (SPEAR.md §8); its metrics row."""
        try:
            return self._step(t)
        except WeightsLostError as err:  # a learner rank died after publishing its weights
            raise RunFault(str(err), run=self.run) from err

    def _step(self, t: int) -> dict[str, Any]:
        cfg, phase = self.config, Phases()
        ranks = cfg.learner.num_ranks
        with phase("rollout"):
            trajectories = self._collect_rollout(t)
            if cfg.rollout.async_steps and t + 1 < cfg.run.total_steps:
                self._pending = self._start_rollout(t + 1)  # overlaps this step's update
        with phase("experience"):  # rewards + tool bonus, Dr.BoT masks, group filter, advantages
            exp = process_step(trajectories, t, cfg.algo, cfg.rollout.max_response_tokens)
            batch = exp.train_batch(self.pad_token_id)
        with phase("replay_batch"):
            replay_rows = None
            if self.buffer is not None:
                replay_rows = ray.get(self.buffer.replay_batch.remote(step=t, min_rows=ranks))
        # Nothing to learn from a step without one valid row (every group dropped or failed).
        skip_update = not any(traj.is_valid for traj in trajectories)
        with phase("logp_old"):
            if cfg.learner.logp_old == "recompute" and not skip_update:
                batch = self.learners.recompute_old_logprobs(batch)
        with phase("update"):
            on_policy = {}
            if not skip_update:
                on_policy = self.learners.update(batch=batch, step=t, phase="on_policy")
        w_sil = sil_weight(
            t,
            total_steps=cfg.algo.sil.ramp_steps,
            coef=cfg.algo.sil.coef,
            schedule=cfg.algo.sil.schedule,
        )
        replay: dict[str, float] = {}
        with phase("update_replay"):
            if replay_rows:
                replay_batch = replay_train_batch(replay_rows, self.pad_token_id)
                replay = self.learners.update(
                    batch=replay_batch, step=t, phase="replay", loss_weight=w_sil
                )
        on_policy["nonfinite_in_row"] = self.guard.observe(t, on_policy, replay)  # may stop
        with phase("buffer"):  # expire stale rows, admit positive-advantage rows, baseline
            buffer_stats = {}
            if self.buffer is not None:
                entries = [
                    ReplayEntry.from_trajectory(
                        traj,
                        batch.advantages[i, : len(traj.token_ids)],
                        step=t,
                        trainable=exp.train_mask[i],
                    )
                    for i, traj in enumerate(trajectories)
                ]
                buffer_stats = ray.get(
                    self.buffer.end_step.remote(
                        step=t,
                        entries=entries,
                        group_means=exp.group_means,
                        group_stds=exp.group_stds,
                    )
                )
        with phase("sync_weights"):
            self.weight_version = t + 1
            self.rollouts.update_weights(self.learners.publish_weights(), self.weight_version)
        if not cfg.rollout.async_steps and t + 1 < cfg.run.total_steps:
            self._pending = self._start_rollout(t + 1)
        return step_metrics(
            t,
            trajectories,
            exp.filter_counts,
            on_policy,
            replay,
            buffer_stats,
            w_sil if cfg.algo.sil.enabled else 0.0,  # what the replay loss is weighted by
            self._tool_lambda(t),
            self.weight_version,
            phase.seconds,
            num_replay_rows=len(replay_rows or []),
            rollout_counts=self._rollout_counts,
            update_skipped=skip_update,
            rollout_seconds=self._rollout_seconds,
        )

    # ------------------------------------------------------------------ rollouts

    def _start_rollout(self, t: int) -> PendingRollout:
        return self.rollouts.start(
            tasks_for_step(self.config, t), weight_version=self.weight_version
        )

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

    def _tool_lambda(self, t: int) -> float:
        tr = self.config.algo.tool_reward
        return TOOL_REWARD_SCHEDULES[tr.schedule](t, tr.decay_steps) if tr.enabled else 0.0

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
        self.weight_version = step + 1
        self.rollouts.update_weights(self.learners.publish_weights(), self.weight_version)
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
        self.rollouts.shutdown()
        if self.learners is not None:
            self.learners.shutdown()
        if self.buffer is not None:
            ray.kill(self.buffer)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def step_metrics(
    t,
    trajectories,
    filter_counts,
    on_policy,
    replay,
    buffer_stats,
    w_sil,
    lam,
    version,
    seconds,
    num_replay_rows,
    rollout_counts=None,
    update_skipped=False,
    rollout_seconds=None,
) -> dict[str, Any]:
    valid = [tr for tr in trajectories if tr.is_valid]
    rollout_counts = rollout_counts or {}
    # samples of groups dropped with a dead rollout worker count as failures too
    dropped = rollout_counts.get("samples_dropped", 0)
    staleness = [version - 1 - tr.weight_version for tr in valid]
    out: dict[str, Any] = {
        "step": t,
        "reward/mean": _mean([tr.rewards.total for tr in valid]),
        "reward/task": _mean([tr.rewards.task for tr in valid]),
        "reward/tool_bonus": _mean([tr.rewards.tool_bonus for tr in valid]),
        "success_rate": _mean([float(tr.success) for tr in valid]),
        "response_length": _mean([float(tr.response_length) for tr in valid]),
        "tool_calls": _mean([float(tr.tool_calls) for tr in valid]),
        "invalid_actions": _mean([float(tr.invalid_actions) for tr in valid]),
        "infra_failures": len(trajectories) - len(valid) + dropped,
        "staleness/mean": _mean([float(s) for s in staleness]),
        "staleness/max": max(staleness, default=0),
        "spear/w_sil": w_sil,
        "spear/lambda_tc": lam,
        "spear/replay_rows": num_replay_rows,
        "weight_version": version,
    }
    out.update({f"filter/{k}": v for k, v in filter_counts.items()})
    out.update({f"rollout/{k}": v for k, v in rollout_counts.items()})
    out["update/skipped_no_valid_rows"] = int(update_skipped)
    if rollout_seconds:  # generated (policy) tokens per second of the rollout's own wall time
        generated = sum(sum(tr.loss_mask) for tr in trajectories)
        out["rollout/seconds"] = rollout_seconds
        out["rollout/tokens_per_s"] = generated / rollout_seconds
    out.update({f"update/{k}": v for k, v in on_policy.items()})
    out.update({f"replay/{k}": v for k, v in replay.items()})
    out.update(
        {
            f"buffer/{k}": v
            for k, v in buffer_stats.items()
            if isinstance(v, (int, float)) and v is not None
        }
    )
    out.update({f"time/{k}": v for k, v in seconds.items()})
    out["time/step"] = sum(seconds.values())
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}
