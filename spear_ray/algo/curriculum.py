"""SPEAR's curriculum (docs/algorithm.md §5, §6): an intrinsic tool-call reward that fades out while
the SIL loss weight fades in. Early on the agent is paid to explore tools; later it imitates its own
best trajectories.

Every function takes plain numbers or tensors (vectorised elementwise). Step arguments are the
global training step t >= 0 and the schedule length T >= 0. T = 0 means "no ramp": the schedule
sits at its end value from step 0 (lambda = 0, w_SIL = coef), the limit of a ramp of length -> 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor

Num = TypeVar("Num", float, Tensor)


def _check_steps(step: float, total_steps: float) -> None:
    if step < 0 or total_steps < 0:
        raise ValueError(f"step and total_steps must be >= 0, got {step}, {total_steps}")


def _progress(step: float, total_steps: float) -> float | None:
    """t/T in [0, 1) while the ramp runs; None once it is over (t >= T, or T == 0)."""
    _check_steps(step, total_steps)
    if total_steps == 0 or step >= total_steps:
        return None
    return step / total_steps


# ---------------------------------------------------------------- tool-call reward (§6) ----


def tool_call_reward(n_tool_calls: Num, *, per_call: float = 0.1, cap: float = 1.0) -> Num:
    """r_tc = min(cap, per_call * n_tool_calls). Agent envs count every env step as a call."""
    if isinstance(n_tool_calls, Tensor):
        calls = n_tool_calls if n_tool_calls.is_floating_point() else n_tool_calls.float()
        return torch.clamp(per_call * calls, max=cap)
    return min(cap, per_call * n_tool_calls)


def cosine_decay(step: float, total_steps: float) -> float:
    """lambda(t) = (cos(pi t / T) + 1) / 2 for t <= T, then 0: 1 at t=0, exactly 0 at t=T."""
    progress = _progress(step, total_steps)
    if progress is None:
        return 0.0
    return (math.cos(math.pi * progress) + 1.0) / 2.0


def constant_one(step: float, total_steps: float) -> float:
    """lambda(t) = 1: the bonus never fades ("constant" mode)."""
    _check_steps(step, total_steps)
    return 1.0


# Keyed by the config's tool-reward schedule: fn(step, total_steps) -> lambda(t).
TOOL_REWARD_SCHEDULES: dict[str, Callable[[float, float], float]] = {
    "cosine": cosine_decay,
    "constant": constant_one,
}


def additive_combination(task_reward: Num, r_tc: Num, lam: float) -> Num:
    """Qwen2.5 recipe: score = task + r_tc * lambda."""
    return task_reward + r_tc * lam


def qwen3_combination(task_reward: Num, r_tc: Num, lam: float) -> Num:
    """Qwen3 recipe: a failed or zero task score (<= 0) gets the graded bonus r_tc * lambda; a
    solved one only gets a flat 1[r_tc > 0] * lambda, so a correct answer is not paid more for
    making more calls."""
    if isinstance(task_reward, Tensor) or isinstance(r_tc, Tensor):
        task, tc = torch.as_tensor(task_reward), torch.as_tensor(r_tc)
        flat = (tc > 0).to(tc.dtype)
        return torch.where(task <= 0, task + tc * lam, task + flat * lam)
    if task_reward <= 0:
        return task_reward + r_tc * lam
    return task_reward + (1.0 if r_tc > 0 else 0.0) * lam


# Keyed by the config's combination mode: fn(task_reward, r_tc, lam) -> score.
TOOL_REWARD_COMBINATIONS: dict[str, Callable[..., Num]] = {
    "additive": additive_combination,
    "qwen3": qwen3_combination,
}


def shaped_score(
    task_reward: Num,
    n_tool_calls: Num,
    step: float,
    *,
    total_steps: float = 200,
    schedule: str = "cosine",
    combination: str = "additive",
    per_call: float = 0.1,
    cap: float = 1.0,
) -> Num:
    """The trained score: task reward plus the scheduled tool-call bonus (docs/algorithm.md §6)."""
    lam = _lookup(TOOL_REWARD_SCHEDULES, schedule, "tool-reward schedule")(step, total_steps)
    r_tc = tool_call_reward(n_tool_calls, per_call=per_call, cap=cap)
    combine = _lookup(TOOL_REWARD_COMBINATIONS, combination, "tool-reward combination")
    return combine(task_reward, r_tc, lam)


# ----------------------------------------------------------------------- SIL weight (§5) ----


def cosine_ramp(step: float, total_steps: float, coef: float = 1.0) -> float:
    """w_SIL(t) = coef * (1 - cos(pi t / T)) / 2 for t <= T, then coef: 0 at t=0, coef at t=T."""
    progress = _progress(step, total_steps)
    if progress is None:
        return float(coef)
    return coef * (1.0 - math.cos(math.pi * progress)) / 2.0


def constant_weight(step: float, total_steps: float, coef: float = 1.0) -> float:
    """w_SIL(t) = coef from the first step ("constant" mode)."""
    _check_steps(step, total_steps)
    return float(coef)


# Keyed by the config's SIL weight schedule: fn(step, total_steps, coef) -> w_SIL(t).
SIL_WEIGHT_SCHEDULES: dict[str, Callable[[float, float, float], float]] = {
    "cosine": cosine_ramp,
    "constant": constant_weight,
}


def sil_weight(
    step: float, *, total_steps: float = 200, coef: float = 1.0, schedule: str = "cosine"
) -> float:
    """The weight of the replay (SIL) loss at this step (docs/algorithm.md §5)."""
    return _lookup(SIL_WEIGHT_SCHEDULES, schedule, "SIL weight schedule")(step, total_steps, coef)


def _lookup(registry: dict, key: str, what: str):
    try:
        return registry[key]
    except KeyError:
        raise ValueError(f"unknown {what} {key!r}; expected one of {sorted(registry)}") from None
