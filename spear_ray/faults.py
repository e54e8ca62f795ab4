"""Faults that stop a training run, and the guard that stops a run whose updates keep failing.

A `RunFault` is a fault the run cannot continue through (a learner rank died, updates keep
coming out NaN) but that a resumed run can: its text is one line naming what happened, the last
checkpoint and the command that continues the run. `spear-ray train` prints it as
`spear-ray: error: ...` and exits with status 1 (no traceback).

`NonFiniteGuard` counts the training steps in a row whose update was not finite. The learner
skips such an optimizer step on every rank (update/skipped); a few in a row mean the run has
diverged, and at `learner.max_nonfinite_in_row` it stops. While a streak runs the controller
saves no checkpoint, so the last one, the one `--resume` takes, is from before the first bad
step and keep-last rotation cannot remove it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any


class RunFault(RuntimeError):
    """A fault that stops the run; str() is one line: the reason, the last checkpoint and the
    command that continues the run (when the run directory is known)."""

    def __init__(
        self, reason: str, *, run: Any = None, last_checkpoint: Path | None = None
    ) -> None:
        self.reason = " ".join(str(reason).split())  # one line
        self.run_path = Path(run.path) if run is not None else None
        if last_checkpoint is None and run is not None:
            last_checkpoint = run.latest_checkpoint()
        self.last_checkpoint = last_checkpoint
        super().__init__(self._line())

    def _line(self) -> str:
        if self.run_path is None:
            return self.reason
        if self.last_checkpoint is None:
            # --resume refuses a run without a complete checkpoint: nothing to continue
            return (
                f"{self.reason}; no checkpoint yet, so nothing to resume: run the same command "
                f"again (remove {self.run_path} first if it is still there)"
            )
        return (
            f"{self.reason}; last checkpoint: {self.last_checkpoint}; continue with: "
            f"spear-ray train --resume {self.run_path}"
        )


class NonFiniteUpdates(RunFault):
    """`learner.max_nonfinite_in_row` training steps in a row had a NaN/inf loss or gradient."""


def update_was_finite(metrics: Mapping[str, float]) -> bool:
    """Whether one reduced update (LearnerGroup.update's metrics; {} for no update) was finite:
    no optimizer step skipped for a NaN/inf gradient, and the loss and gradient norm of the
    steps applied are finite (a NaN loss can come with finite gradients, e.g. on masked
    tokens)."""
    if not metrics:
        return True
    if float(metrics.get("skipped", 0.0)) > 0:
        return False
    if float(metrics.get("optimizer_steps", 0.0)) > 0:
        return all(math.isfinite(float(metrics.get(k, 0.0))) for k in ("loss", "grad_norm"))
    return True


class NonFiniteGuard:
    """Counts training steps in a row with a non-finite update; raises NonFiniteUpdates when
    the count reaches `limit` (0: never). `run` (a RunDir, optional) names the checkpoint from
    before the streak and the resume command in the message."""

    def __init__(self, limit: int, run: Any = None) -> None:
        self.limit = limit
        self.run = run
        self.in_row = 0
        self.first_step: int | None = None
        self.checkpoint_before: Path | None = None

    @property
    def active(self) -> bool:
        """A streak is running: the last step's update was not finite."""
        return self.in_row > 0

    def observe(self, step: int, *updates: Mapping[str, float]) -> int:
        """Record step `step`'s updates (on-policy, replay, ...); returns the count in a row."""
        if all(update_was_finite(m) for m in updates):
            self.in_row, self.first_step, self.checkpoint_before = 0, None, None
            return 0
        if self.in_row == 0:
            self.first_step = step
            self.checkpoint_before = self.run.latest_checkpoint() if self.run else None
        self.in_row += 1
        if self.limit and self.in_row >= self.limit:
            before = (
                f"the last checkpoint before the first one is {self.checkpoint_before.name}"
                if self.checkpoint_before is not None
                else "there is no checkpoint from before the first one"
            )
            raise NonFiniteUpdates(
                f"{self.in_row} updates in a row were not finite (NaN/inf loss or gradients at "
                f"steps {self.first_step}-{step}, learner.max_nonfinite_in_row={self.limit}; "
                f"each was skipped); {before} (a lower learner.lr may help)",
                run=self.run,
                last_checkpoint=self.checkpoint_before,
            )
        return self.in_row

    def describe(self) -> str:
        return f"{self.in_row} non-finite update(s) in a row since step {self.first_step}"
