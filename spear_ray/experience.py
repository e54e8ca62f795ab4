"""From a step's trajectories to training data (docs/algorithm.md "Step order", the part between
rollout and update): score (+ tool bonus) -> Dr.BoT masks -> group filter -> advantages.

The constants come from the recipe (`spear_ray.recipe`); the math is `spear_ray.algo`. This file
applies them to `Trajectory` objects.

Infrastructure failures (`Trajectory.failure`) are excluded from every group statistic and
carry no loss; Dr.BoT-filtered turns or trajectories carry no loss but stay in the group
statistics. A group left with fewer valid samples than `min_valid_samples` (or than its size,
if smaller) is dropped whole: no loss, not in the group filter, not in the baseline history.
Groups the group filter drops carry no loss and leave the baseline history too, as the
reference removes them from the batch before it records the history.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from spear_ray.algo import (
    AdvantageInputs,
    compute_advantages,
    group_filter_keep,
    group_reward_stats,
)
from spear_ray.algo.filters import drbot_reasons
from spear_ray.containers import TrainBatch, Trajectory, build_train_batch
from spear_ray.recipe import AdvantageRule, Filters, ToolBonus


@dataclass
class StepExperience:
    """What one step's rollouts become before the update."""

    trajectories: list[Trajectory]
    advantages: list[float | list[float]]  # per trajectory, or per turn (GiGPO)
    train_mask: list[bool]  # False: no loss (infra failure, Dr.BoT filter, group filter)
    masked_turns: list[list[int]]  # per trajectory: turns a turn-scope Dr.BoT filter masked
    filter_counts: dict[str, int]
    group_means: torch.Tensor  # per-group reward mean of the groups kept, for the history
    group_stds: torch.Tensor  # (population std)

    def train_batch(self, pad_token_id: int) -> TrainBatch:
        return build_train_batch(
            self.trajectories,
            self.advantages,
            pad_token_id,
            train_mask=self.train_mask,
            masked_turns=self.masked_turns,
        )


# ----------------------------------------------------------------------------- score (§6)


def apply_tool_bonus(trajectories: Sequence[Trajectory], step: int, bonus: ToolBonus) -> None:
    """Set each trajectory's `rewards.tool_bonus` (r_tc * lambda(t), combined as configured)."""
    for traj in trajectories:
        traj.rewards.tool_bonus = bonus.bonus(traj.rewards.task, traj.tool_calls, step)


# ----------------------------------------------------------------------------- filters (§2)


def turn_filter_reasons(traj: Trajectory, filters: Filters) -> list[list[str]]:
    """Turn scope: the Dr.BoT reasons of each turn, judged on that turn's own response."""
    reasons = []
    for k, (start, end) in enumerate(traj.turn_spans):
        reasons.append(
            drbot_reasons(
                traj.token_ids[start:end],
                traj.turn_texts[k] if k < len(traj.turn_texts) else "",
                void=k < len(traj.turn_invalid) and traj.turn_invalid[k],
                overlong=end - start >= filters.max_tokens_per_turn,
                checks=filters.checks,
            )
        )
    return reasons


def trajectory_filter_reasons(traj: Trajectory, filters: Filters) -> list[str]:
    """Trajectory scope: the Dr.BoT reasons of the whole episode."""
    ended_by = traj.env_info.get("ended_by")
    generated = [t for t, m in zip(traj.token_ids, traj.loss_mask, strict=True) if m]
    return drbot_reasons(
        generated,
        "".join(traj.turn_texts),
        # no final answer: the env never ended the episode itself
        void=ended_by != "done",
        overlong=ended_by == "response_token_budget"
        or traj.response_length >= filters.max_response_tokens,
        checks=filters.checks,
    )


def apply_drbot_filters(
    trajectories: Sequence[Trajectory], valid: torch.Tensor, filters: Filters
) -> tuple[torch.Tensor, list[list[int]], dict[str, int]]:
    """(trains [N] bool, masked turns per trajectory, counts per reason).

    Turn scope masks the flagged turns (counted in turns) and a trajectory only when all its
    turns are flagged; trajectory scope masks whole trajectories (counted in trajectories).
    """
    trains = valid.clone()
    masked: list[list[int]] = [[] for _ in trajectories]
    counts: dict[str, int] = {}
    for i, traj in enumerate(trajectories):
        if not valid[i]:
            continue
        if filters.scope == "turn":
            per_turn = turn_filter_reasons(traj, filters)
            masked[i] = [k for k, reasons in enumerate(per_turn) if reasons]
            found = [reason for reasons in per_turn for reason in reasons]
            if traj.turn_spans and len(masked[i]) == len(traj.turn_spans):
                trains[i] = False
        else:
            found = trajectory_filter_reasons(traj, filters)
            trains[i] = not found
        for reason in found:
            counts[reason] = counts.get(reason, 0) + 1
    return trains, masked, counts


# ----------------------------------------------------------------------------- advantages (§1)


def _anchor_id(anchor: str | None, traj_index: int, turn: int) -> int:
    # A missing anchor never groups with anything: make it unique.
    text = anchor if anchor is not None else f"\x00no-anchor:{traj_index}:{turn}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def compute_step_advantages(
    trajectories: Sequence[Trajectory], valid: torch.Tensor, rule: AdvantageRule
) -> list[float | list[float]]:
    """Per-trajectory advantages (GRPO) or per-turn advantages (GiGPO)."""
    rewards = torch.tensor([t.rewards.total for t in trajectories], dtype=torch.float64)
    group_ids = torch.tensor([t.group_id for t in trajectories], dtype=torch.long)
    kwargs = dict(norm_by_std=rule.divides_by_std, epsilon=rule.epsilon)
    if rule.estimator == "grpo":
        adv = compute_advantages("grpo", AdvantageInputs(rewards, group_ids, valid), **kwargs)
        return [float(x) for x in adv]
    step_traj, step_rewards, step_anchor = [], [], []
    for i, traj in enumerate(trajectories):
        for k, reward in enumerate(traj.turn_rewards):
            step_traj.append(i)
            step_rewards.append(reward)
            step_anchor.append(_anchor_id(traj.turn_anchors[k], i, k))
    inputs = AdvantageInputs(
        rewards,
        group_ids,
        valid,
        step_traj_index=torch.tensor(step_traj, dtype=torch.long),
        step_rewards=torch.tensor(step_rewards, dtype=torch.float64),
        step_anchor=torch.tensor(step_anchor, dtype=torch.long),
    )
    per_step = compute_advantages(
        rule.estimator, inputs, gamma=rule.gamma, step_weight=rule.step_weight, **kwargs
    )
    out: list[list[float]] = [[] for _ in trajectories]
    for i, value in zip(step_traj, per_step.tolist(), strict=True):
        out[i].append(value)
    return out


def enough_valid(group_ids: torch.Tensor, valid: torch.Tensor, min_valid: int) -> torch.Tensor:
    """[N] bool: the sample's group has at least min(min_valid, group size) valid samples."""
    if group_ids.numel() == 0:
        return torch.zeros(0, dtype=torch.bool)
    _, inverse, sizes = torch.unique(group_ids, return_inverse=True, return_counts=True)
    valid_per_group = torch.zeros_like(sizes).index_add_(0, inverse, valid.long())
    return (valid_per_group >= torch.clamp(sizes, max=min_valid))[inverse]


# ----------------------------------------------------------------------------- the whole part


def process_step(
    trajectories: list[Trajectory],
    step: int,
    *,
    tool_bonus: ToolBonus,
    filters: Filters,
    advantage: AdvantageRule,
) -> StepExperience:
    """score -> Dr.BoT masks -> group filter -> advantages, in the reference's order."""
    apply_tool_bonus(trajectories, step, tool_bonus)
    valid = torch.tensor([t.is_valid for t in trajectories], dtype=torch.bool)
    counts = {"infra_failure": int((~valid).sum())}
    group_ids = torch.tensor([t.group_id for t in trajectories], dtype=torch.long)
    # From here on a sample of a dropped group counts as invalid: its group has no baseline.
    enough = enough_valid(group_ids, valid, filters.min_valid_samples)
    counts["groups_too_few_valid"] = len(set(group_ids[~enough].tolist()))
    valid &= enough
    train, masked_turns, reasons = apply_drbot_filters(trajectories, valid, filters)
    counts.update(reasons)
    rewards = torch.tensor([t.rewards.total for t in trajectories], dtype=torch.float64)
    kept_group = valid.clone()
    if filters.group_keep_ratio < 1.0:
        # Among the groups that are left: a dropped group takes no place in the kept fraction.
        kept_group = torch.zeros_like(valid)
        kept_group[enough] = group_filter_keep(
            rewards[enough], group_ids[enough], valid[enough], filters.group_keep_ratio
        )
        counts["group_filter"] = int((train & ~kept_group).sum())
        train &= kept_group
    advantages = compute_step_advantages(trajectories, valid, advantage)
    means, stds = group_reward_stats(rewards, group_ids, valid & kept_group)
    return StepExperience(
        trajectories=trajectories,
        advantages=advantages,
        train_mask=train.tolist(),
        masked_turns=masked_turns,
        filter_counts=counts,
        group_means=means,
        group_stds=stds,
    )
