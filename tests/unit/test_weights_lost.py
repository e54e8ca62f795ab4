"""A learner rank that dies after publishing its weights takes them with it: a rollout worker's
weight load then fails with Ray's OwnerDiedError (seen in benchmarks/chaos.py --kill-learner).
That is a learner fault: the controller stops with a RunFault naming the last checkpoint, never
a raw Ray traceback or a rollout fault."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import ray

from actors.rollout_group import WeightsLostError, weights_lost
from spear_ray.controller import Controller
from spear_ray.faults import RunFault


def _owner_died() -> ray.exceptions.OwnerDiedError:
    return ray.exceptions.OwnerDiedError("ab" * 28, None, "")


def test_owner_died_errors_are_weights_lost_and_others_are_not():
    died = _owner_died()
    assert weights_lost(died)
    # what ray.get raises when the worker's update_weights task failed on the lost object
    task_error = ray.exceptions.RayTaskError("update_weights", "tb", died)
    assert weights_lost(task_error) and weights_lost(task_error.as_instanceof_cause())
    assert not weights_lost(RuntimeError("engine blew up"))
    assert not weights_lost(ray.exceptions.RayTaskError("f", "tb", ValueError("bad")))
    assert "version 7" in str(WeightsLostError(7, died))


def test_the_controller_stops_with_a_run_fault_naming_the_checkpoint(tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step_000003"
    run = SimpleNamespace(path=tmp_path, latest_checkpoint=lambda: checkpoint)

    def lose_weights(t):
        raise WeightsLostError(4, _owner_died())

    ctl = SimpleNamespace(run=run, _step=lose_weights)
    with pytest.raises(RunFault) as caught:
        Controller.step(ctl, 4)
    line = str(caught.value)
    assert "version 4 were lost" in line and "\n" not in line
    assert str(checkpoint) in line and f"spear-ray train --resume {Path(tmp_path)}" in line
