"""The result of one sandboxed execution, shared by the sandbox and the tools that use it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExecResult:
    """What one call to the sandbox returns.

    `infra_error` is set when the sandbox itself failed (server died, protocol broke): the agent
    loop then marks the trajectory as an infrastructure failure instead of scoring the answer.
    A program that crashes, times out or exceeds a limit is *not* an infra error: that is the
    model's code misbehaving, reported through `exit_code`, `timed_out` and `stderr`.
    """

    stdout: str
    stderr: str
    exit_code: int | None
    timed_out: bool
    wall_s: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    infra_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.infra_error is None and not self.timed_out and self.exit_code == 0
