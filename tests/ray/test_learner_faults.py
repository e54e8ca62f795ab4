"""Learner faults on a real local Ray: 2 DeepSpeed ranks (CPU, gloo) of a tiny random Llama, as in
test_learner_group.py, with the run directory the group names in its errors.

- NaN updates in a row: every step's update is skipped by all ranks and the NonFiniteGuard
  stops the run at `learner.max_nonfinite_in_row`, naming the checkpoint from before them.
- A rank killed (SIGKILL) during an update, while the other rank waits for it in a
  collective: the update fails fast with a LearnerError naming the dead rank, the last
  checkpoint and `spear-ray train --resume RUN`; it does not hang. The bound is the test's own
  (a hang fails at FAULT_BOUND_S), not a timed assertion.
- (slow) A rank that hangs alive inside an update: the other rank's collective fails after
  `learner.collective_timeout_s` and the error names the hung rank as not returning.

One group serves the first two tests (~30 s to start); the kill test comes second, as it breaks
the group (and shuts it down, so the slow test can place its own).
"""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import ray

from learners.learner_group import LearnerError, LearnerGroup
from learners.policy import rank_rows
from spear_ray.config.schema import SpearConfig
from spear_ray.faults import NonFiniteGuard, NonFiniteUpdates
from spear_ray.recipe import learner_spec
from spear_ray.run_dir import RunDir
from tests.ray.test_learner_group import (
    MINI_BATCHES,
    PPO_EPOCHS,
    RANKS,
    assert_same_state,
    build_tiny_model_dir,
    make_batch,
    make_config,
    with_behaviour_logprobs,
)

pytestmark = pytest.mark.ray

FAULT_BOUND_S = 180  # far above the ~seconds it takes; only a hang gets near it
COLLECTIVE_TIMEOUT_S = 60  # rank 0's collective fails by then even if gloo missed the reset


@pytest.fixture(scope="module")
def group(ray_local, tmp_path_factory):
    model_dir = build_tiny_model_dir(tmp_path_factory.mktemp("model"))
    raw = make_config(model_dir, zero_stage=1).model_dump()
    raw["learner"]["collective_timeout_s"] = COLLECTIVE_TIMEOUT_S
    config = SpearConfig.model_validate(raw)
    run = RunDir(tmp_path_factory.mktemp("run"))
    with run.checkpoint(3) as directory:  # "the last checkpoint" the errors name
        (directory / "learner").mkdir()
    learners = LearnerGroup(learner_spec(config), run=run)
    yield learners, run
    learners.shutdown()


def nan_batch(group: LearnerGroup, seed: int):
    """A batch with one NaN advantage in every mini-batch, in rows only rank 0 trains on."""
    batch = with_behaviour_logprobs(group, make_batch(seed=seed), seed=100 + seed)
    rows0, sizes = rank_rows(batch.rows, num_ranks=RANKS, mini_batches=MINI_BATCHES, rank=0)
    for row in (rows0[0], rows0[sizes[0]]):
        col = int(batch.loss_mask[row].nonzero()[0])
        batch.advantages[row, col] = float("nan")
    return batch


def _stall_in_update(rank, marker):
    """Runs inside a rank: it signals that it is inside update, then stays there (until it is
    killed, or FAULT_BOUND_S x 2)."""

    def stalled(*args, **kwargs):
        Path(marker).write_text(str(os.getpid()))
        time.sleep(FAULT_BOUND_S * 2)

    rank._train_mini_batch = stalled


def _stall_rank1_in_update(learners, tmp_path) -> Path:
    """Make rank 1's next update stall; the file it writes when it gets there."""
    marker = tmp_path / "rank1_in_update"
    ray.get(learners.ranks[1].__ray_call__.remote(_stall_in_update, str(marker)))
    return marker


def test_nan_updates_in_a_row_stop_the_run_naming_the_checkpoint_before_them(group):
    learners, run = group
    guard = NonFiniteGuard(limit=3, run=run)
    before = learners.full_state_dict()
    steps = []
    with pytest.raises(NonFiniteUpdates) as info:
        for step in range(10, 20):
            metrics = learners.update(
                batch=nan_batch(learners, seed=step), step=step, phase="on_policy"
            )
            assert metrics["skipped"] == PPO_EPOCHS * MINI_BATCHES  # every step skipped
            steps.append(step)
            guard.observe(step, metrics)
    assert steps == [10, 11, 12]  # the third one in a row stops the run
    message = str(info.value)
    checkpoint = run.checkpoints_dir / "step_000003"
    assert message == (
        "3 updates in a row were not finite (NaN/inf loss or gradients at steps 10-12, "
        "learner.max_nonfinite_in_row=3; each was skipped); the last checkpoint before the first "
        f"one is step_000003 (a lower learner.lr may help); last checkpoint: {checkpoint}; "
        f"continue with: spear-ray train --resume {run.path}"
    )
    assert_same_state(learners.full_state_dict(), before)  # nothing was applied


def test_a_rank_killed_during_an_update_is_named_and_the_update_does_not_hang(group, tmp_path):
    learners, run = group
    pid = learners.info[1]["pid"]
    marker = _stall_rank1_in_update(learners, tmp_path)
    batch = with_behaviour_logprobs(learners, make_batch(seed=30), seed=130)
    pool = ThreadPoolExecutor(max_workers=1)
    try:
        future = pool.submit(learners.update, batch=batch, step=30, phase="on_policy")
        deadline = time.monotonic() + FAULT_BOUND_S
        while not marker.exists() and time.monotonic() < deadline and not future.done():
            time.sleep(0.2)
        assert marker.exists(), "rank 1 never entered its update"
        assert int(marker.read_text()) == pid  # the rank process this test's group started
        # rank 0 is now in the update's first all-reduce, waiting for rank 1
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(LearnerError) as info:
            future.result(timeout=FAULT_BOUND_S)
    finally:
        pool.shutdown(wait=False)
    message = str(info.value)
    assert message.startswith("learner rank 1 died: "), message
    assert "\n" not in message
    assert message.endswith(
        f"last checkpoint: {run.checkpoints_dir / 'step_000003'}; continue with: "
        f"spear-ray train --resume {run.path}"
    )
    learners.shutdown()  # bounded: rank 0 is free again; frees the CPUs for the next test


@pytest.mark.slow
def test_a_hung_rank_fails_the_collective_after_the_collective_timeout(ray_local, tmp_path):
    """Rank 1 hangs inside update (alive, never reaching the all-reduce): rank 0's collective
    fails after learner.collective_timeout_s, and the error names rank 1 as not returning."""
    model_dir = build_tiny_model_dir(tmp_path / "model")
    raw = make_config(model_dir, zero_stage=1).model_dump()
    raw["learner"]["collective_timeout_s"] = 15
    learners = LearnerGroup(learner_spec(SpearConfig.model_validate(raw)))
    try:
        _stall_rank1_in_update(learners, tmp_path)
        batch = with_behaviour_logprobs(learners, make_batch(seed=40), seed=140)
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            future = pool.submit(learners.update, batch=batch, step=40, phase="on_policy")
            with pytest.raises(LearnerError) as info:
                future.result(timeout=FAULT_BOUND_S)
        finally:
            pool.shutdown(wait=False)
        message = str(info.value)
        assert message.startswith("learner rank 0 failed: "), message
        assert "timed out" in message.lower(), message
        assert message.endswith("(rank 1 did not return (hung?))"), message
    finally:
        learners.shutdown()  # rank 1 is killed after the shutdown timeout
