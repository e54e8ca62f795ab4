"""The replay-buffer actor on a real local Ray: remote calls, and a SIGKILL of its process from
which it comes back (max_restarts) with the rows of its last checkpoint."""

from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import ray

from buffers import ReplayEntry
from buffers.actor import spawn_replay_buffer
from spear_ray.config import load_config
from spear_ray.recipe import Recipe

pytestmark = pytest.mark.ray


def rows(step: int, n: int = 4) -> list[ReplayEntry]:
    """n admissible rows of step `step` (positive stored advantage), rewards 1..n."""
    return [
        ReplayEntry(
            token_ids=np.arange(6) + step,
            loss_mask=[0, 0, 1, 1, 1, 1],
            behaviour_logprobs=[0, 0, -0.1, -0.2, -0.3, -0.4],
            advantages=[0, 0, 0.5, 0.5, 0.5, 0.5],
            reward=float(i + 1),
            tool_calls=1,
            group_id=0,
            step=step,
            weight_version=step,
            prompt_length=2,
            task_id=f"s{step}r{i}",
        )
        for i in range(n)
    ]


def run_step(buf, step: int, min_rows: int = 1):
    replay = ray.get(buf.replay_batch.remote(step=step, min_rows=min_rows))
    stats = ray.get(
        buf.end_step.remote(step=step, entries=rows(step), group_means=[2.5], group_stds=[1.3])
    )
    return replay, stats


def replay_then_kill(buf, tmp_path):
    """Steps 1-5 through remote calls (replay fires at step 5), then steps 6-8 and a SIGKILL.
    Returns (rows admitted per step, the step of the last checkpoint before the kill)."""
    for step in range(1, 5):  # 2 rows a step beat P50 2.5; replay needs more than 6
        replay, stats = run_step(buf, step)
        assert replay is None and stats["above_p50"] == 2 * step
    replay = ray.get(buf.replay_batch.remote(step=5))  # 8 > 6: fires; 8 survivors -> 4 drawn
    assert len(replay) == 4 and all(e.reward >= 2.5 for e in replay)
    for e in replay:
        assert e.replay_advantages.dtype == np.float32
        np.testing.assert_allclose(e.replay_advantages, (e.reward - 2.5) * e.loss_mask)
    again = ray.get(buf.replay_batch.remote(step=5))  # a retried call gets the same rows
    assert [e.task_id for e in again] == [e.task_id for e in replay]
    stats = ray.get(
        buf.end_step.remote(step=5, entries=rows(5), group_means=[2.5], group_stds=[1.3])
    )
    assert stats["triggers_total"] == 1 and stats["replayed_total"] == 4
    assert stats["size"] == 4  # cleared by the replay, then step 5's rows admitted
    admitted = {5: {f"s5r{i}" for i in range(4)}}
    for step in range(6, 9):
        replay, stats = run_step(buf, step)
        assert replay is None
        admitted[step] = {f"s{step}r{i}" for i in range(4)}
    assert (tmp_path / "replay_buffer.npz").exists()

    pid = ray.get(buf.pid.remote())
    os.kill(pid, signal.SIGKILL)
    new_pid = ray.get(buf.pid.remote(), timeout=120)  # retried on the restarted actor
    assert new_pid != pid
    return admitted, stats["checkpoint_step"]


def check_restored(buf, admitted, checkpoint_step):
    """Every row admitted up to the checkpoint is back. Returns (later rows lost, later rows,
    rows back)."""
    stored = {e.task_id for e in ray.get(buf.entries.remote())}
    before = set().union(*(ids for s, ids in admitted.items() if s <= checkpoint_step))
    after = set().union(set(), *(ids for s, ids in admitted.items() if s > checkpoint_step))
    assert before <= stored and stored <= before | after
    lost = after - stored
    restored = ray.get(buf.stats.remote())
    assert restored["step"] == checkpoint_step and restored["size"] == len(before)
    # the controller goes on: a retried end_step of the checkpointed step changes nothing; the
    # next step applies and counts the steps the crash lost
    retry = ray.get(
        buf.end_step.remote(step=checkpoint_step, entries=[], group_means=[], group_stds=[])
    )
    assert retry["size"] == len(before)
    _, stats = run_step(buf, 9)
    assert stats["step"] == 9 and stats["admitted_step"] == 4
    assert stats["missing_steps_total"] == 8 - checkpoint_step
    return len(lost), len(after), len(before)


def _rule(*overrides: str):
    """The recipe's replay rules of a default config with these overrides."""
    return Recipe.from_config(load_config(None, list(overrides))).replay


def test_actor_replays_and_survives_sigkill_with_its_checkpoint(ray_local, tmp_path):
    """Checkpointing every step (the default), a killed buffer loses nothing."""
    rule = _rule("buffer.size=4", "buffer.trigger_factor=1.5", "buffer.tolerate_steps=4")
    buf = spawn_replay_buffer(rule, tmp_path)
    try:
        admitted, checkpoint_step = replay_then_kill(buf, tmp_path)
        assert checkpoint_step == 8
        lost, later, back = check_restored(buf, admitted, checkpoint_step)
        print(f"checkpoint every step: {back} rows back, {lost} of {later} later rows lost")
        assert lost == later == 0
    finally:
        ray.kill(buf, no_restart=True)


@pytest.mark.slow  # a second actor and restart (~10 s here); the same logic is in tests/unit
def test_rows_after_the_last_checkpoint_are_lost_and_counted(ray_local, tmp_path):
    rule = _rule(
        "buffer.size=4",
        "buffer.trigger_factor=1.5",
        "buffer.tolerate_steps=4",
        "buffer.checkpoint_every_steps=3",
    )
    buf = spawn_replay_buffer(rule, tmp_path)
    try:
        admitted, checkpoint_step = replay_then_kill(buf, tmp_path)
        assert checkpoint_step == 6  # steps 3 and 6 checkpointed; 7 and 8 are not
        lost, later, back = check_restored(buf, admitted, checkpoint_step)
        print(f"checkpoint every 3 steps: {back} rows back, {lost} of {later} later rows lost")
        assert lost == later == 8
    finally:
        ray.kill(buf, no_restart=True)
