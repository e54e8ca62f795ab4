"""The multi-turn text environment contract.

An environment is a plain Python object with three methods:

    reset(seed) -> observation text
    step(action_text) -> StepResult(observation, reward, done, info)
    close()

`info` is an `EnvInfo`: it always says whether the episode succeeded and whether the action just
taken was invalid. The agent loop adds the SPEAR invalid-action penalty (a config field), so an
environment reports invalidity and leaves the penalty to the caller.

An exception raised by an environment is *not* a wrong answer: the agent loop catches it and marks
the trajectory as an infrastructure failure, which is excluded from group statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass
class EnvInfo:
    """What an environment says about a step besides the observation and reward."""

    success: bool = False
    invalid_action: bool = False
    # True when the step counts toward the tool-call reward r_tc (docs/algorithm.md §6): a run
    # of the Python interpreter in python_math; every env step in the agent envs.
    tool_call: bool = False
    # Anchor state for GiGPO: identical observations within a group share this key.
    anchor: str | None = None
    # True when the episode ended because the env's turn limit ran out, not by the task.
    truncated: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StepResult:
    observation: str
    reward: float
    done: bool
    info: EnvInfo


@runtime_checkable
class TextEnv(Protocol):
    """A multi-turn text environment. Seeds fully determine the task."""

    def reset(self, seed: int) -> str: ...

    def step(self, action_text: str) -> StepResult: ...

    def close(self) -> None: ...

    # Optional: `stop_strings` (tuple of str), where generation should stop because the turn is
    # complete (e.g. "</action>", "</code>"). The agent loop reads it with getattr(..., ()).


class EnvError(RuntimeError):
    """Raised by an environment when its own machinery fails (not the agent's fault)."""
