"""Run faults (no Ray): the non-finite streak guard, the one-line RunFault, the controller's
checkpoint rules around a streak and on resume, and the CLI's exit status 1."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest

from spear_ray.config import ConfigError, load_config
from spear_ray.faults import NonFiniteGuard, NonFiniteUpdates, RunFault, update_was_finite
from spear_ray.run_dir import RunDir

GOOD = {"skipped": 0.0, "optimizer_steps": 2.0, "loss": 0.1, "grad_norm": 0.5}
SKIPPED = {"skipped": 1.0, "optimizer_steps": 1.0, "loss": 0.1, "grad_norm": 0.5}
NAN_LOSS = {"skipped": 0.0, "optimizer_steps": 2.0, "loss": math.nan, "grad_norm": 0.5}
NOTHING = {"skipped": 0.0, "optimizer_steps": 0.0, "loss": math.nan, "grad_norm": math.nan}


def _run(tmp_path, keep_last=3) -> RunDir:
    config = load_config(
        "demo", [f"run.runs_dir={tmp_path}", "run.name=r", f"checkpoint.keep_last={keep_last}"]
    )
    return RunDir.create(config)


def test_which_updates_are_not_finite():
    assert update_was_finite(GOOD) and update_was_finite({})
    assert update_was_finite(NOTHING)  # an empty batch or a zero loss weight: no step, no NaN
    assert not update_was_finite(SKIPPED)
    assert not update_was_finite(NAN_LOSS)  # NaN loss with finite gradients


def test_the_guard_counts_steps_in_a_row_and_resets_on_a_finite_one():
    guard = NonFiniteGuard(limit=3)
    assert guard.observe(0, GOOD, {}) == 0
    assert guard.observe(1, SKIPPED, {}) == 1 and guard.active
    assert guard.observe(2, GOOD, NAN_LOSS) == 2  # the replay update counts too
    assert guard.observe(3, GOOD, GOOD) == 0 and not guard.active
    assert guard.observe(4, SKIPPED) == 1
    assert guard.observe(5, SKIPPED) == 2
    with pytest.raises(NonFiniteUpdates, match=r"^3 updates in a row were not finite") as info:
        guard.observe(6, SKIPPED)
    assert "steps 4-6" in str(info.value) and "\n" not in str(info.value)
    never = NonFiniteGuard(limit=0)
    assert [never.observe(t, SKIPPED) for t in range(10)] == list(range(1, 11))


def test_a_run_fault_is_one_line_with_the_last_checkpoint_and_the_resume_command(tmp_path):
    run = _run(tmp_path)
    fault = RunFault("learner rank 1 died: The actor died\nunexpectedly", run=run)
    assert str(fault) == (
        f"learner rank 1 died: The actor died unexpectedly; no checkpoint yet, so nothing to "
        f"resume: run the same command again (remove {run.path} first if it is still there)"
    )
    with run.checkpoint(4) as d:
        (d / "x").write_text("x")
    assert str(RunFault("boom", run=run)) == (
        f"boom; last checkpoint: {run.checkpoints_dir / 'step_000004'}; continue with: "
        f"spear-ray train --resume {run.path}"
    )
    assert str(RunFault("boom")) == "boom"


class FakeLearners:
    def save_checkpoint(self, *, directory, step):
        from pathlib import Path

        Path(directory).mkdir()
        (Path(directory) / "state").write_text(str(step))

    def load_checkpoint(self, *, directory):
        return 0


def _controller(run: RunDir, limit: int, lines: list[str]):
    """What Controller.save / restore_latest use of the controller, without Ray."""
    return SimpleNamespace(
        run=run,
        guard=NonFiniteGuard(limit, run=run),
        learners=FakeLearners(),
        buffer=None,
        log=lines.append,
        restored=[],
    )


def test_no_checkpoint_is_saved_during_a_streak_so_the_one_before_it_survives(tmp_path):
    from spear_ray.controller import Controller

    run = _run(tmp_path, keep_last=1)  # one more save would rotate step_000000 out
    lines: list[str] = []
    ctl = _controller(run, limit=3, lines=lines)
    ctl.guard.observe(0, GOOD)
    Controller.save(ctl, 0)
    for t in (1, 2):
        ctl.guard.observe(t, SKIPPED)
        Controller.save(ctl, t)
    assert [p.name for p in run.complete_checkpoints()] == ["step_000000"]
    assert (
        lines[-1] == "checkpoint of step 2 not saved: 2 non-finite update(s) in a row since step 1"
    )
    with pytest.raises(NonFiniteUpdates) as info:
        ctl.guard.observe(3, SKIPPED)
    message = str(info.value)
    assert message.startswith("3 updates in a row were not finite")
    assert "the last checkpoint before the first one is step_000000" in message
    assert message.endswith(
        f"last checkpoint: {run.checkpoints_dir / 'step_000000'}; continue with: "
        f"spear-ray train --resume {run.path}"
    )
    assert [p.name for p in run.complete_checkpoints()] == ["step_000000"]


def test_restore_latest_skips_a_damaged_checkpoint_and_refuses_when_none_is_usable(tmp_path):
    from spear_ray.controller import Controller

    run = _run(tmp_path)
    lines: list[str] = []
    ctl = _controller(run, limit=3, lines=lines)
    ctl.restore = lambda directory: ctl.restored.append(directory.name) or 7
    assert Controller.restore_latest(ctl) == (None, -1)  # nothing saved yet: start at step 0
    for step in (6, 7):
        Controller.save(ctl, step)
    (run.checkpoints_dir / "step_000007" / "learner" / "state").write_text("")
    (run.checkpoints_dir / ".tmp_step_000008").mkdir()
    checkpoint, step = Controller.restore_latest(ctl)
    assert checkpoint.name == "step_000006" and ctl.restored == ["step_000006"]
    assert lines == [
        "removed .tmp_step_000008, a checkpoint left unfinished when the run stopped",
        "checkpoint step_000007 is damaged (file learner/state: 0 bytes, expected 1): "
        "using step_000006",
        f"loading {checkpoint}",
    ]
    (run.checkpoints_dir / "step_000006" / "COMPLETE").unlink()
    with pytest.raises(ConfigError, match="none of its checkpoints is usable"):
        Controller.restore_latest(ctl)


def test_cli_prints_a_run_fault_as_one_line_and_exits_1(tmp_path, monkeypatch, capsys):
    import spear_ray.cli as cli
    from learners.learner_group import LearnerError

    run = _run(tmp_path)

    def train(args):
        raise LearnerError("learner rank 1 died: The actor died unexpectedly", run=run)

    monkeypatch.setattr(cli, "_train_command", train)
    assert cli.main(["train"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"spear-ray: error: learner rank 1 died: The actor died unexpectedly; no checkpoint "
        f"yet, so nothing to resume: run the same command again (remove {run.path} first if "
        "it is still there)"
    ]
