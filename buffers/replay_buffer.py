"""The SPEAR replay buffer (docs/algorithm.md §3-§4, step order §8): a plain class, wrapped in a Ray
actor by `buffers.actor.spawn_replay_buffer`.

One training step talks to it twice, each call carrying the step number:

    replay = buffer.replay_batch(step=t, min_rows=num_ranks)   # after advantages, before updates
    ... on-policy update, replay update on `replay_train_batch(replay, pad_token_id)` ...
    buffer.end_step(step=t, entries=rows_of_step_t, group_means=..., group_stds=...)

`replay_batch`: trigger check -> recalibrate -> keep A_hat >= 0 (> 0 if strict) -> power-of-two
uniform subset -> clear the buffer. `end_step`: drop stale rows -> admit rows with mean token
advantage > 0 (and >= 1 tool call if required) -> append the step's group reward means/stds to
the FIFO baseline history -> checkpoint every `checkpoint_every_steps` steps.

Idempotency: a call for a step that was already applied is a no-op returning the same result
(a Ray task retry cannot apply twice); a call for an older step raises `StepOrderError`.

Staleness ("older than tolerate_steps"): at `end_step(step=t)` a stored row collected at step s
is dropped iff t - s > tolerate_steps, before step t's rows are admitted. So after end_step(t)
the buffer holds rows of steps t - tolerate_steps .. t (tolerate_steps + 1 steps of data), and
the replay at step t + 1 draws from exactly those. The reference measures the age from the
newest stored row instead of the current step, which is one step more lenient whenever the
previous step admitted rows (see `spear_ray.algo.replay.stale_keep`); measuring from the current
step makes the window independent of what happened to be admitted.

Durability (with `checkpoint_dir`): one atomic checkpoint file, written at the end of every
`checkpoint_every_steps`-th end_step and also whenever a replay fires (it clears the buffer and
draws from the generator; the drawn rows are saved with it, so a retried replay_batch after a
crash returns the same rows and never replays them twice). A new buffer on the same directory
(a Ray restart) restores it. Rows admitted after the last checkpoint are lost with the process.

The math is `spear_ray.algo.replay`; this module owns state, order, and durability.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from spear_ray.algo.replay import (
    admission_keep,
    mean_row_advantage,
    nonnegative_keep,
    num_above_baseline,
    percentile50,
    recalibrate_advantages,
    replay_subset_size,
    replay_triggered,
    sample_subset,
    stale_keep,
    success_fraction,
)
from spear_ray.containers import RewardParts, TrainBatch, Trajectory, build_train_batch
from spear_ray.recipe import ReplayRule

log = logging.getLogger(__name__)

CHECKPOINT_NAME = "replay_buffer.npz"
FORMAT = "spear-ray/replay-buffer/1"
_CHUNK_ROWS = 256  # rows padded together for the vectorised admission/recalibration math


class StepOrderError(RuntimeError):
    """A buffer call for a step older than one already applied (not a retry of the last one)."""


class BufferCheckpointError(RuntimeError):
    """A replay-buffer checkpoint file that cannot be read back."""


# ----------------------------------------------------------------------------------- entry


@dataclass(eq=False)
class ReplayEntry:
    """One buffer row, stored compactly. Arrays are aligned with `token_ids` (length n)."""

    token_ids: np.ndarray  # int32 [n]: prompt + response ids, exactly as sampled
    loss_mask: np.ndarray  # uint8 [n]: 1 on model-generated tokens that carry loss
    # float32 [n]: the logp_old the on-policy update used (recomputed by the learners by
    # default, the engine's with learner.logp_old: behaviour); the replay loss's logp_old
    behaviour_logprobs: np.ndarray
    advantages: np.ndarray  # float32 [n]: per-token advantage at admission (0 off mask)
    reward: float  # the row's total score, incl. that step's tool-call bonus
    tool_calls: int
    group_id: int  # group index within its collection step
    step: int  # training step that collected it
    weight_version: int  # version of the weights that sampled it
    prompt_length: int
    task_id: str = ""
    # The env's task-success flag of the trajectory; None: unknown (a row restored from a
    # checkpoint written before the buffer kept it). Only reported (replay/success_frac).
    success: bool | None = None
    # Set only on the rows `replay_batch` returns: recalibrated per-token advantages (0 off mask).
    replay_advantages: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.token_ids = np.ascontiguousarray(self.token_ids, dtype=np.int32).reshape(-1)
        self.loss_mask = np.ascontiguousarray(self.loss_mask, dtype=np.uint8).reshape(-1)
        self.behaviour_logprobs = np.ascontiguousarray(
            self.behaviour_logprobs, dtype=np.float32
        ).reshape(-1)
        self.advantages = np.ascontiguousarray(self.advantages, dtype=np.float32).reshape(-1)
        if self.replay_advantages is not None:
            self.replay_advantages = np.ascontiguousarray(
                self.replay_advantages, dtype=np.float32
            ).reshape(-1)
        n = self.token_ids.size
        arrays = [self.loss_mask, self.behaviour_logprobs, self.advantages]
        if self.replay_advantages is not None:
            arrays.append(self.replay_advantages)
        if any(a.size != n for a in arrays):
            raise ValueError(
                f"replay entry {self.task_id!r}: per-token arrays must have length {n}"
            )
        if not 0 <= self.prompt_length <= n:
            raise ValueError(f"replay entry {self.task_id!r}: prompt_length outside [0, {n}]")
        self.reward = float(self.reward)
        self.tool_calls, self.group_id = int(self.tool_calls), int(self.group_id)
        self.step, self.weight_version = int(self.step), int(self.weight_version)
        self.prompt_length = int(self.prompt_length)
        self.success = None if self.success is None else bool(self.success)

    @classmethod
    def from_batch_row(
        cls, traj: Trajectory, batch: TrainBatch, row: int, *, step: int
    ) -> ReplayEntry:
        """Row `row` of the step's `TrainBatch` (built from `traj`) as a buffer row.

        The row keeps exactly what the on-policy update trained on: its loss mask (Dr.BoT and
        group filters applied, so a masked row has an empty mask and is never admitted), its
        per-token advantages, and its logp_old (the learner's recomputed log-probs by default),
        which the replay update uses as the behaviour log-probs, as the reference stores its
        `old_log_probs`.
        """
        n = len(traj.token_ids)
        mask = batch.loss_mask[row, :n].numpy().astype(np.uint8)
        if not traj.is_valid:
            mask = np.zeros(n, dtype=np.uint8)
        return cls(
            token_ids=np.asarray(traj.token_ids, dtype=np.int32),
            loss_mask=mask,
            behaviour_logprobs=batch.old_logprobs[row, :n].numpy() * mask,
            advantages=batch.advantages[row, :n].numpy() * mask,
            reward=traj.rewards.total,
            tool_calls=traj.tool_calls,
            group_id=traj.group_id,
            step=step,
            weight_version=traj.weight_version,
            prompt_length=traj.prompt_length,
            task_id=traj.task_id,
            success=traj.success,
        )

    @property
    def num_tokens(self) -> int:
        return int(self.token_ids.size)


def replay_batch_stats(entries: Sequence[ReplayEntry]) -> dict[str, float]:
    """What a replay batch replayed, for the step's metrics row (as `replay/<key>`): `rows`,
    `success_frac` (of the rows whose success flag is known) and `mean_advantage` (the mean
    recalibrated advantage A_hat, each row once). {} for no replay."""
    if not entries:
        return {}
    if any(e.replay_advantages is None for e in entries):
        raise ValueError("replay_batch_stats needs rows returned by ReplayBuffer.replay_batch")
    return {
        "rows": len(entries),
        "success_frac": success_fraction([e.success for e in entries]),
        "mean_advantage": mean_row_advantage(
            [e.replay_advantages for e in entries], [e.loss_mask for e in entries]
        ),
    }


def replay_train_batch(entries: Sequence[ReplayEntry], pad_token_id: int) -> TrainBatch:
    """Pad a replay batch (the rows `replay_batch` returned) into a `TrainBatch`.

    Padding, masks and behaviour log-probs go through `build_train_batch`; the advantages are
    the recalibrated per-token ones. Rows come from different steps, whose group indices collide,
    so `group_ids` are renumbered densely by (collection step, group id).
    """
    if any(e.replay_advantages is None for e in entries):
        raise ValueError("replay_train_batch needs rows returned by ReplayBuffer.replay_batch")
    trajectories = [
        Trajectory(
            task_id=e.task_id,
            group_id=e.group_id,
            env_seed=0,
            prompt_length=e.prompt_length,
            token_ids=e.token_ids.tolist(),
            loss_mask=e.loss_mask.tolist(),
            behaviour_logprobs=e.behaviour_logprobs.tolist(),
            rewards=RewardParts(task=e.reward),
            tool_calls=e.tool_calls,
            weight_version=e.weight_version,
        )
        for e in entries
    ]
    # build_train_batch broadcasts one number or per-turn values; per-token ones are set below.
    batch = build_train_batch(trajectories, [0.0] * len(entries), pad_token_id)
    for row, e in enumerate(entries):
        adv = torch.tensor(e.replay_advantages)  # a copy: arrays from Ray are read-only
        batch.advantages[row, : e.num_tokens] = adv * batch.loss_mask[row, : e.num_tokens]
    dense: dict[tuple[int, int], int] = {}
    batch.group_ids = torch.tensor(
        [dense.setdefault((e.step, e.group_id), len(dense)) for e in entries], dtype=torch.long
    )
    return batch


# ---------------------------------------------------------------------------------- buffer


class ReplayBuffer:
    """SPEAR's replay buffer. Not thread-safe (a Ray actor serialises its calls)."""

    def __init__(
        self,
        rule: ReplayRule,
        *,
        seed: int = 0,
        checkpoint_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.rule = rule
        self.seed = seed
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self._reset_state()
        path = self.checkpoint_path
        if path is not None:  # temp files of a write the previous process did not finish
            for leftover in path.parent.glob(f".{path.name}.*.tmp"):
                leftover.unlink(missing_ok=True)
        if path is not None and path.exists():
            self.load(path)
            log.info("replay buffer restored from %s at step %s", path, self._applied_step)

    def _reset_state(self) -> None:
        self._entries: list[ReplayEntry] = []
        self._hist_means: deque[float] = deque(maxlen=self.rule.history_length)
        self._hist_stds: deque[float] = deque(maxlen=self.rule.history_length)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._applied_step: int | None = None  # last step whose end_step was applied
        self._last_end: dict[str, Any] | None = None  # what that end_step returned
        self._replay_step: int | None = None  # last step replay_batch ran for (not persisted)
        self._replay_result: list[ReplayEntry] | None = None
        self._since_checkpoint = 0
        self._counters: dict[str, Any] = {
            "triggers_total": 0,
            "replay_skipped_total": 0,  # triggered, but fewer rows than min_rows survived
            "replayed_last": 0,  # rows returned by the latest replay_batch call
            "replayed_total": 0,
            "replay_mean_advantage_last": float("nan"),  # of the latest replay that fired
            "evicted_stale_step": 0,
            "evicted_stale_total": 0,
            "admitted_step": 0,
            "admitted_total": 0,
            "missing_steps_total": 0,  # steps never applied (lost with a restart)
            "checkpoint_step": None,  # step of the last checkpoint written or restored
        }

    # ------------------------------------------------------------------------- queries

    @property
    def checkpoint_path(self) -> Path | None:
        return None if self.checkpoint_dir is None else self.checkpoint_dir / CHECKPOINT_NAME

    @property
    def last_step(self) -> int | None:
        """The last step whose end_step was applied (None before the first)."""
        return self._applied_step

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[ReplayEntry]:
        """The stored rows, oldest first (a shallow copy of the list)."""
        return list(self._entries)

    def history(self) -> tuple[list[float], list[float]]:
        """The baseline history: (group reward means, group reward stds), oldest first."""
        return list(self._hist_means), list(self._hist_stds)

    def pid(self) -> int:
        """The OS process id (for fault-injection tests of the actor)."""
        return os.getpid()

    def stats(self) -> dict[str, Any]:
        """Per-step metrics. `above_p50` and `baseline_p50` are for the current contents."""
        rewards = [e.reward for e in self._entries]
        has_history = len(self._hist_means) > 0
        return {
            "step": self._applied_step,
            "size": len(self._entries),
            "above_p50": num_above_baseline(rewards, list(self._hist_means)) if has_history else 0,
            "trigger_threshold": self.rule.trigger_rows,
            "baseline_p50": percentile50(list(self._hist_means)) if has_history else float("nan"),
            "history_length": len(self._hist_means),
            **self._counters,
        }

    # ---------------------------------------------------------------- replay (before updates)

    def replay_batch(self, *, step: int, min_rows: int = 1) -> list[ReplayEntry] | None:
        """The replay batch of step `step`, or None when replay does not fire.

        Fires when more than trigger_factor * size stored rows beat P50 of the historical group
        means. Then: recalibrate every stored row, keep A_hat >= 0 (> 0 with strict_positive),
        draw a uniform subset of replay_subset_size(survivors, size) rows with the buffer's
        seeded generator, and clear the buffer. Returns None (buffer still cleared) when fewer
        than `min_rows` (the number of learner ranks) rows are drawn. The returned rows carry
        `replay_advantages`; they are in draw order.
        """
        if self._applied_step is not None and step <= self._applied_step:
            raise StepOrderError(
                f"replay_batch(step={step}) after end_step(step={self._applied_step}) was "
                "applied; replay_batch for a step must come before its end_step"
            )
        if step == self._replay_step:
            return self._replay_result
        if self._replay_step is not None and step < self._replay_step:
            raise StepOrderError(
                f"replay_batch(step={step}) after replay_batch(step={self._replay_step})"
            )
        triggers = self._counters["triggers_total"]
        result = self._replay(min_rows)
        self._replay_step, self._replay_result = step, result
        if self.checkpoint_dir is not None and self._counters["triggers_total"] > triggers:
            # Replay cleared the buffer and drew from the generator: make that durable now, so a
            # crash before end_step can neither replay these rows again nor draw different ones.
            self.save(self.checkpoint_path)
        return result

    def _replay(self, min_rows: int) -> list[ReplayEntry] | None:
        cfg = self.rule
        self._counters["replayed_last"] = 0
        rewards = [e.reward for e in self._entries]
        means = list(self._hist_means)
        if not replay_triggered(
            rewards, means, buffer_size=cfg.size, trigger_factor=cfg.trigger_factor
        ):
            return None
        self._counters["triggers_total"] += 1
        survivors: list[ReplayEntry] = []
        for chunk in _chunks(self._entries):
            mask = _padded(chunk, "loss_mask", np.bool_)
            adv = recalibrate_advantages(
                cfg.recalibration,
                rewards=torch.tensor([e.reward for e in chunk], dtype=torch.float64),
                stored_advantages=_padded(chunk, "advantages", np.float32),
                mask=mask,
                hist_group_means=means,
                hist_group_stds=list(self._hist_stds),
                norm_by_std=cfg.norm_by_std,
                epsilon=cfg.epsilon,
                weight=cfg.recalibration_weight,
            )
            keep = nonnegative_keep(adv, mask, strict=cfg.strict_positive)
            adv32 = adv.to(torch.float32).numpy()
            for row in torch.nonzero(keep).flatten().tolist():
                e = chunk[row]
                survivors.append(
                    dataclasses.replace(e, replay_advantages=adv32[row, : e.num_tokens].copy())
                )
        size = replay_subset_size(len(survivors), cfg.size)
        index = sample_subset(len(survivors), size, self._generator).tolist()
        self._entries = []  # SPEAR clears the buffer whenever replay fires
        if size < max(min_rows, 1):
            self._counters["replay_skipped_total"] += 1
            return None
        chosen = [survivors[i] for i in index]
        self._counters["replayed_last"] = len(chosen)
        self._counters["replayed_total"] += len(chosen)
        self._counters["replay_mean_advantage_last"] = mean_row_advantage(
            [e.replay_advantages for e in chosen], [e.loss_mask for e in chosen]
        )
        return chosen

    # ---------------------------------------------------------------- end of step (after updates)

    def end_step(
        self,
        *,
        step: int,
        entries: Sequence[ReplayEntry],
        group_means: Sequence[float] | np.ndarray | torch.Tensor,
        group_stds: Sequence[float] | np.ndarray | torch.Tensor,
    ) -> dict[str, Any]:
        """Drop stale rows -> admit `entries` (all rows of the step; the buffer applies the
        admission rule) -> append the step's per-group reward means/stds to the history ->
        checkpoint every `checkpoint_every_steps` applied steps. Returns `stats()`.
        """
        if self._applied_step is not None:
            if step == self._applied_step:
                return dict(self._last_end or self.stats())
            if step < self._applied_step:
                raise StepOrderError(
                    f"end_step(step={step}) after end_step(step={self._applied_step})"
                )
        if self._replay_step is not None and step < self._replay_step:
            raise StepOrderError(
                f"end_step(step={step}) after replay_batch(step={self._replay_step})"
            )
        means, stds = _floats(group_means), _floats(group_stds)
        if len(means) != len(stds):
            raise ValueError(f"{len(means)} group means but {len(stds)} group stds")
        late = [e.step for e in entries if e.step > step]
        if late:
            raise ValueError(f"end_step(step={step}) got rows collected at later steps {late[:3]}")
        cfg = self.rule

        # 1. staleness: drop rows more than tolerate_steps steps old
        if self._entries:
            keep = stale_keep([e.step for e in self._entries], step, cfg.tolerate_steps).tolist()
            kept = [e for e, k in zip(self._entries, keep, strict=True) if k]
        else:
            kept = []
        evicted = len(self._entries) - len(kept)
        # 2. admission: mean token advantage > 0 (and >= 1 tool call if required)
        admitted = [e for e, k in zip(entries, self._admission(entries), strict=True) if k]
        self._entries = kept + admitted
        # 3. baseline history
        self._hist_means.extend(means)
        self._hist_stds.extend(stds)

        if self._applied_step is not None:
            self._counters["missing_steps_total"] += max(step - self._applied_step - 1, 0)
        self._counters["evicted_stale_step"] = evicted
        self._counters["evicted_stale_total"] += evicted
        self._counters["admitted_step"] = len(admitted)
        self._counters["admitted_total"] += len(admitted)
        self._applied_step = step
        self._replay_result = None  # the replay rows are the learner's now; free them
        self._since_checkpoint += 1
        checkpoint = (
            self.checkpoint_dir is not None and self._since_checkpoint >= cfg.checkpoint_every_steps
        )
        if checkpoint:
            self._counters["checkpoint_step"] = step
        self._last_end = self.stats()
        if checkpoint:
            self.save(self.checkpoint_path)
            self._since_checkpoint = 0
        return dict(self._last_end)

    def _admission(self, entries: Sequence[ReplayEntry]) -> list[bool]:
        keep: list[bool] = []
        for chunk in _chunks(entries):
            keep += admission_keep(
                _padded(chunk, "advantages", np.float32),
                _padded(chunk, "loss_mask", np.bool_),
                torch.tensor([e.tool_calls for e in chunk]),
                require_tool_call=self.rule.require_tool_call,
            ).tolist()
        return keep

    # ------------------------------------------------------------------------- durability

    def save(self, path: str | os.PathLike[str] | None = None) -> Path:
        """Write an atomic checkpoint (temp file in the same directory, fsync, os.replace):
        rows, history, counters, generator state, the last applied step, and a replay batch
        drawn for a step whose end_step has not come yet (so its retry returns the same rows)."""
        target = Path(path) if path is not None else self.checkpoint_path
        if target is None:
            raise ValueError("save() needs a path when the buffer has no checkpoint_dir")
        pending = self._replay_step is not None and (
            self._applied_step is None or self._replay_step > self._applied_step
        )
        meta = {
            "format": FORMAT,
            "applied_step": self._applied_step,
            "last_end": self._last_end,
            "counters": self._counters,
            "seed": self.seed,
            "config": dataclasses.asdict(self.rule),
            "replay_step": self._replay_step if pending else None,
            "replay_returned": pending and self._replay_result is not None,
        }
        arrays = {
            "meta": np.array(json.dumps(meta)),
            "hist_means": np.array(self._hist_means, dtype=np.float64),
            "hist_stds": np.array(self._hist_stds, dtype=np.float64),
            "rng_state": self._generator.get_state().numpy(),
            **_pack(self._entries, "rows."),
        }
        if meta["replay_returned"]:
            arrays.update(_pack(self._replay_result or [], "replay."))
        _atomic_write(target, lambda f: _write_payload(f, arrays))
        self._counters["checkpoint_step"] = self._applied_step
        return target

    def load(self, path: str | os.PathLike[str]) -> None:
        """Replace this buffer's state with a checkpoint written by `save`."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no replay-buffer checkpoint at {path}")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {key: data[key] for key in data.files}
            meta = json.loads(str(arrays["meta"]))
            if meta.get("format") != FORMAT:
                raise ValueError(f"format {meta.get('format')!r}, expected {FORMAT!r}")
            rows = _unpack(arrays, "rows.")
            replay = _unpack(arrays, "replay.") if meta["replay_returned"] else None
            generator = torch.Generator()
            generator.set_state(torch.from_numpy(arrays["rng_state"].astype(np.uint8)))
            hist_means = arrays["hist_means"].astype(float).tolist()
            hist_stds = arrays["hist_stds"].astype(float).tolist()
        except Exception as exc:  # any damage: truncated zip, bad CRC, missing key, bad JSON
            detail = " ".join(f"{type(exc).__name__}: {exc}".split())
            raise BufferCheckpointError(
                f"replay-buffer checkpoint {path} is corrupt or incomplete ({detail})"
            ) from exc
        if meta.get("config") != dataclasses.asdict(self.rule):
            log.warning("replay buffer %s was saved with different replay rules", path)
        self._reset_state()
        self._entries = rows
        self._hist_means.extend(hist_means)
        self._hist_stds.extend(hist_stds)
        self._generator = generator
        self._applied_step = meta["applied_step"]
        self._last_end = meta["last_end"]
        self._replay_step, self._replay_result = meta["replay_step"], replay
        self._counters.update(meta["counters"])
        self._counters["checkpoint_step"] = self._applied_step


# ----------------------------------------------------------------------------------- helpers


def _floats(values: Sequence[float] | np.ndarray | torch.Tensor) -> list[float]:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().double().numpy()
    return np.asarray(values, dtype=np.float64).reshape(-1).tolist()


def _chunks(entries: Sequence[ReplayEntry]) -> Iterator[Sequence[ReplayEntry]]:
    for start in range(0, len(entries), _CHUNK_ROWS):
        yield entries[start : start + _CHUNK_ROWS]


def _padded(entries: Sequence[ReplayEntry], name: str, dtype: type) -> torch.Tensor:
    """[rows, longest] tensor of one per-token field, right-padded with zeros."""
    length = max(e.num_tokens for e in entries)
    out = np.zeros((len(entries), length), dtype=dtype)
    for row, e in enumerate(entries):
        out[row, : e.num_tokens] = getattr(e, name)
    return torch.from_numpy(out)


_ROW_SCALARS = {
    "reward": np.float64,
    "tool_calls": np.int64,
    "group_id": np.int64,
    "step": np.int64,
    "weight_version": np.int64,
    "prompt_length": np.int64,
}
# ReplayEntry.success in a checkpoint: int8, -1 unknown
_SUCCESS_CODES: dict[bool | None, int] = {None: -1, False: 0, True: 1}
_SUCCESS_FLAGS = {code: flag for flag, code in _SUCCESS_CODES.items()}
_ROW_ARRAYS = {
    "token_ids": np.int32,
    "loss_mask": np.uint8,
    "behaviour_logprobs": np.float32,
    "advantages": np.float32,
}


def _pack(rows: Sequence[ReplayEntry], prefix: str) -> dict[str, np.ndarray]:
    """Rows as flat arrays: per-token fields concatenated (split by `offsets`), one value per
    row for the rest. `replay_advantages` is kept when every row has it."""
    fields = dict(_ROW_ARRAYS)
    if rows and all(e.replay_advantages is not None for e in rows):
        fields["replay_advantages"] = np.float32
    lengths = np.array([e.num_tokens for e in rows], dtype=np.int64)
    out = {prefix + "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)}
    for name, dtype in fields.items():
        parts = [getattr(e, name) for e in rows]
        out[prefix + name] = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
    for name, dtype in _ROW_SCALARS.items():
        out[prefix + name] = np.array([getattr(e, name) for e in rows], dtype=dtype)
    out[prefix + "task_id"] = np.array([e.task_id for e in rows], dtype=np.str_)
    out[prefix + "success"] = np.array([_SUCCESS_CODES[e.success] for e in rows], dtype=np.int8)
    return out


def _unpack(arrays: dict[str, np.ndarray], prefix: str) -> list[ReplayEntry]:
    offsets = arrays[prefix + "offsets"]
    per_token = [name for name in (*_ROW_ARRAYS, "replay_advantages") if prefix + name in arrays]
    # checkpoints written before the success flag was kept have no such array: unknown
    success = arrays.get(prefix + "success")
    rows = []
    for i in range(offsets.size - 1):
        lo, hi = int(offsets[i]), int(offsets[i + 1])
        rows.append(
            ReplayEntry(
                **{name: arrays[prefix + name][lo:hi] for name in per_token},
                **{name: arrays[prefix + name][i] for name in _ROW_SCALARS},
                task_id=str(arrays[prefix + "task_id"][i]),
                success=None if success is None else _SUCCESS_FLAGS[int(success[i])],
            )
        )
    return rows


def _write_payload(f: IO[bytes], arrays: dict[str, np.ndarray]) -> None:
    np.savez(f, **arrays)


def _atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """Write via a temp file in the same directory, fsync it, os.replace it over `path`, and
    fsync the directory: `path` is always either the old complete file or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


__all__ = [
    "CHECKPOINT_NAME",
    "BufferCheckpointError",
    "ReplayBuffer",
    "ReplayEntry",
    "StepOrderError",
    "replay_batch_stats",
    "replay_train_batch",
]
