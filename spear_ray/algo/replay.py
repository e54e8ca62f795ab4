"""Replay-buffer math of SPEAR's self-imitation half (docs/algorithm.md §3, §4).

The buffer actor (buffers/) owns the state; these are the pure decisions it makes:
admission -> staleness -> baseline statistics -> trigger -> recalibration -> non-negative
filter -> power-of-two subset.

Percentiles: P50 is numpy's default linear interpolation (np.percentile(x, 50), identical to
torch.quantile(x, 0.5)); it is what the reference computes. The median of an even count is the
mean of the two middle values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from spear_ray.algo.advantages import broadcast_to_tokens, group_mean_std

ArrayLike = Sequence[float] | np.ndarray | Tensor


def _numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().cpu().double().numpy().reshape(-1)
    return np.asarray(values, dtype=np.float64).reshape(-1)


def _row_mean(token_values: Tensor, mask: Tensor) -> Tensor:
    """Mean over each row's masked tokens; rows without tokens get NaN (never pass a test)."""
    mask = mask.bool()
    total = torch.where(mask, token_values, torch.zeros_like(token_values)).sum(dim=-1)
    count = mask.sum(dim=-1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


# ------------------------------------------------------------------------- admission (§3) ---


def admission_keep(
    token_advantages: Tensor,
    mask: Tensor,
    n_tool_calls: Tensor | None = None,
    *,
    require_tool_call: bool = False,
) -> Tensor:
    """A sample enters the buffer when its mean token advantage over the loss mask is > 0
    (docs/algorithm.md §3); with require_tool_call (math recipe) it also needs >= 1 tool call.
    A sample whose mask is empty (filtered) is never admitted. Returns [B] bool.
    """
    keep = _row_mean(token_advantages, mask) > 0  # NaN > 0 is False
    if require_tool_call:
        if n_tool_calls is None:
            raise ValueError("require_tool_call needs n_tool_calls")
        keep = keep & (n_tool_calls >= 1)
    return keep


def stale_keep(
    collected_steps: Tensor | Sequence[int], current_step: int, tolerate_steps: int
) -> Tensor:
    """An entry is kept iff current_step - collected_step <= tolerate_steps (docs/algorithm.md §3).

    The boundary is inclusive: an entry exactly tolerate_steps old survives, matching the
    reference's `abs(step - step_latest) <= tolerate_steps`. The reference measures age from
    the newest stored entry and runs this before admitting the current step, so its window is
    one step wider whenever the previous step admitted samples; pass current_step = the newest
    stored step to reproduce it exactly. (The reference also caps tolerate_steps at 10; that is
    a config check.)
    """
    if tolerate_steps < 0:
        raise ValueError(f"tolerate_steps must be >= 0, got {tolerate_steps}")
    steps = torch.as_tensor(collected_steps)
    return (current_step - steps) <= tolerate_steps


# ------------------------------------------------------------- baseline statistics (§3) ---


def group_reward_stats(
    rewards: Tensor, group_ids: Tensor, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-group reward (mean, population std) for the baseline history, one entry per group
    that has at least one valid member, groups in ascending id order. std is 0 for a single
    member. Population std (np.std) is what the reference's baseline history stores.
    """
    if rewards.numel() == 0:
        return rewards.new_zeros(0), rewards.new_zeros(0)
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    unique_ids, inverse = torch.unique(group_ids, return_inverse=True)
    mean, std, count = group_mean_std(rewards, group_ids, valid, unbiased=False)
    n = unique_ids.numel()
    g_mean, g_std = rewards.new_zeros(n), rewards.new_zeros(n)
    g_count = torch.zeros(n, dtype=count.dtype, device=count.device)
    g_mean[inverse], g_std[inverse], g_count[inverse] = mean, std, count
    has_valid = g_count > 0
    return g_mean[has_valid], g_std[has_valid]


def percentile50(values: ArrayLike) -> float:
    """np.percentile(values, 50) with linear interpolation. Raises on an empty history."""
    arr = _numpy(values)
    if arr.size == 0:
        raise ValueError("P50 of an empty history is undefined")
    return float(np.percentile(arr, 50))


# --------------------------------------------------------------------------- trigger (§3) ---


def num_above_baseline(stored_rewards: ArrayLike, hist_group_means: ArrayLike) -> int:
    """How many stored samples have reward strictly above P50 of the historical group means."""
    rewards = _numpy(stored_rewards)
    if rewards.size == 0:
        return 0
    return int((rewards > percentile50(hist_group_means)).sum())


def replay_triggered(
    stored_rewards: ArrayLike,
    hist_group_means: ArrayLike,
    *,
    buffer_size: int,
    trigger_factor: float = 1.5,
) -> bool:
    """Replay fires when more than trigger_factor * buffer_size stored samples beat P50 of the
    historical group means (docs/algorithm.md §3). With no history there is no baseline: no replay.
    """
    if _numpy(hist_group_means).size == 0:
        return False
    return num_above_baseline(stored_rewards, hist_group_means) > trigger_factor * buffer_size


# ------------------------------------------------------------------- recalibration (§4) ---


def baseline_advantages(
    rewards: Tensor,
    hist_group_means: ArrayLike,
    hist_group_stds: ArrayLike | None = None,
    *,
    norm_by_std: bool = False,
    epsilon: float = 1e-6,
) -> Tensor:
    """The "baseline" mode: A_hat = R_stored - P50(hist means) [/ (P50(hist stds) + eps)]. [B].

    Guard (ours; the reference divides regardless): when P50 of the history's group stds is not
    above epsilon -- at least half of the recent groups had no reward spread, common with sparse
    binary rewards -- there is no scale to normalise by, and dividing by ~epsilon would turn a
    reward gap of 1 into an advantage of ~1e6. The advantage is then left unscaled, as with
    norm_by_std off.
    """
    adv = rewards - percentile50(hist_group_means)
    if norm_by_std:
        if hist_group_stds is None:
            raise ValueError("norm_by_std needs hist_group_stds")
        scale = percentile50(hist_group_stds)
        if scale > epsilon:
            adv = adv / (scale + epsilon)
    return adv


def weighted_advantages(stored_advantages: Tensor, *, weight: float) -> Tensor:
    """The "weight" mode: A_hat = stored advantage * weight, weight in (0, 1]."""
    if not 0.0 < weight <= 1.0:
        raise ValueError(f"recalibration weight must be in (0, 1], got {weight}")
    return stored_advantages * weight


def _baseline_mode(
    *,
    rewards: Tensor,
    mask: Tensor,
    hist_group_means: ArrayLike,
    hist_group_stds: ArrayLike | None,
    norm_by_std: bool,
    epsilon: float,
    **_: object,
) -> Tensor:
    adv = baseline_advantages(
        rewards, hist_group_means, hist_group_stds, norm_by_std=norm_by_std, epsilon=epsilon
    )
    return broadcast_to_tokens(adv, mask)


def _weight_mode(*, stored_advantages: Tensor, mask: Tensor, weight: float, **_: object) -> Tensor:
    adv = weighted_advantages(stored_advantages, weight=weight)
    return torch.where(mask.bool(), adv, torch.zeros_like(adv))


# Keyed by the config's recalibration mode. Uniform keyword-only call returning [B, T] token
# advantages (0 outside mask): fn(*, rewards [B], stored_advantages [B, T], mask [B, T],
#   hist_group_means, hist_group_stds, norm_by_std, epsilon, weight). Each adapter names only
# the arguments its mode uses; `**_` takes the rest (recalibrate_advantages names them all).
RECALIBRATIONS: dict[str, Callable[..., Tensor]] = {
    "baseline": _baseline_mode,
    "weight": _weight_mode,
}


def recalibrate_advantages(
    mode: str,
    *,
    rewards: Tensor,
    stored_advantages: Tensor,
    mask: Tensor,
    hist_group_means: ArrayLike,
    hist_group_stds: ArrayLike | None = None,
    norm_by_std: bool = False,
    epsilon: float = 1e-6,
    weight: float = 1.0,
) -> Tensor:
    """Run RECALIBRATIONS[mode]; returns [B, T] token advantages for the replay batch."""
    try:
        fn = RECALIBRATIONS[mode]
    except KeyError:
        raise ValueError(
            f"unknown recalibration mode {mode!r}; expected one of {sorted(RECALIBRATIONS)}"
        ) from None
    return fn(
        rewards=rewards,
        stored_advantages=stored_advantages,
        mask=mask,
        hist_group_means=hist_group_means,
        hist_group_stds=hist_group_stds,
        norm_by_std=norm_by_std,
        epsilon=epsilon,
        weight=weight,
    )


def nonnegative_keep(token_advantages: Tensor, mask: Tensor, *, strict: bool = False) -> Tensor:
    """Keep replay samples whose recalibrated mean token advantage is >= 0 (> 0 with strict,
    the math recipe). Rows with an empty mask are dropped. Returns [B] bool."""
    mean = _row_mean(token_advantages, mask)
    return mean > 0 if strict else mean >= 0


# ----------------------------------------------------------------------- sampling (§3) ---


def replay_subset_size(n: int, buffer_size: int) -> int:
    """min(largest power of two <= n, buffer_size); 0 when n == 0.

    Powers of two split evenly into micro-batches and ranks. (The reference returns 0 for n == 1
    too; here one sample gives 1, and the caller skips a replay batch smaller than the number
    of learners anyway, docs/algorithm.md §3.)
    """
    if n < 0 or buffer_size < 0:
        raise ValueError(f"n and buffer_size must be >= 0, got {n}, {buffer_size}")
    if n == 0:
        return 0
    return min(1 << (n.bit_length() - 1), buffer_size)


def sample_subset(n: int, size: int, generator: torch.Generator | None = None) -> Tensor:
    """`size` distinct indices drawn uniformly from range(n) (a random permutation's prefix)."""
    if not 0 <= size <= n:
        raise ValueError(f"cannot draw {size} of {n}")
    device = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(n, generator=generator, device=device)[:size]


# ------------------------------------------------------------- what a replay replayed (§5) ---


def mean_row_advantage(token_advantages: Sequence[ArrayLike], masks: Sequence[ArrayLike]) -> float:
    """Mean over replayed rows of each row's advantage, each row counted once: its mean over
    its loss tokens (the recalibrated A_hat is broadcast over them, docs/algorithm.md §4, so
    this is that one value; in `weight` mode with per-turn values, their token mean). Rows
    without loss tokens are left out; NaN when none is left (metric `replay/mean_advantage`)."""
    if len(token_advantages) != len(masks):
        raise ValueError(f"{len(token_advantages)} rows of advantages but {len(masks)} masks")
    per_row = []
    for adv, mask in zip(token_advantages, masks, strict=True):
        on = _numpy(mask) > 0
        if on.any():
            per_row.append(float(_numpy(adv)[on].mean()))
    return float(np.mean(per_row)) if per_row else float("nan")


def success_fraction(successes: Sequence[bool | None]) -> float:
    """Fraction of rows whose trajectory was a task success (the env's flag, not a positive
    reward). Unknown flags (None: rows stored before the buffer kept the flag) are left out;
    NaN when no flag is known (metric `replay/success_frac`)."""
    known = [bool(s) for s in successes if s is not None]
    return sum(known) / len(known) if known else float("nan")


__all__ = [
    "RECALIBRATIONS",
    "admission_keep",
    "baseline_advantages",
    "group_reward_stats",
    "mean_row_advantage",
    "nonnegative_keep",
    "num_above_baseline",
    "percentile50",
    "recalibrate_advantages",
    "replay_subset_size",
    "replay_triggered",
    "sample_subset",
    "stale_keep",
    "success_fraction",
    "weighted_advantages",
]
