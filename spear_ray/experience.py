"""From a step's trajectories to training data: score -> Dr.BoT masks -> group filter ->
advantages (SPEAR.md §8, the part between rollout and update).

Config objects are unpacked here into the explicit scalars of `spear_ray.algo`, so the math
stays pure and this file is the one place that maps config fields onto it.

Infrastructure failures (`Trajectory.failure`) are excluded from every group statistic and
carry no loss; Dr.BoT-filtered samples carry no loss but stay in the group statistics. A group
left with fewer valid samples than `algo.filters.min_valid_samples` (or than its size, if
smaller) is dropped whole: no loss, not in the group filter, not in the baseline history.
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
    has_repeated_ngram,
    shaped_score,
)
from spear_ray.config.schema import AlgoConfig, FilterConfig, ToolRewardConfig
from spear_ray.containers import TrainBatch, Trajectory, build_train_batch


@dataclass
class StepExperience:
    """What one step's rollouts become before the update."""

    trajectories: list[Trajectory]
    advantages: list[float | list[float]]  # per trajectory, or per turn (GiGPO)
    train_mask: list[bool]  # False: no loss (infra failure, Dr.BoT filter, group filter)
    filter_counts: dict[str, int]
    group_means: torch.Tensor  # per-group reward mean (valid members) for the baseline history
    group_stds: torch.Tensor

    def train_batch(self, pad_token_id: int) -> TrainBatch:
        return build_train_batch(
            self.trajectories, self.advantages, pad_token_id, train_mask=self.train_mask
        )


# ----------------------------------------------------------------------------- score (§6)


def apply_tool_bonus(trajectories: Sequence[Trajectory], step: int, cfg: ToolRewardConfig) -> None:
    """Set each trajectory's `rewards.tool_bonus` = shaped score - task reward at this step."""
    for traj in trajectories:
        if not cfg.enabled:
            traj.rewards.tool_bonus = 0.0
            continue
        score = shaped_score(
            traj.rewards.task,
            traj.tool_calls,
            step,
            total_steps=cfg.decay_steps,
            schedule=cfg.schedule,
            combination=cfg.combine,
            per_call=cfg.per_call,
            cap=cfg.cap,
        )
        traj.rewards.tool_bonus = float(score) - traj.rewards.task


# ----------------------------------------------------------------------------- filters (§2)


def drbot_reasons(traj: Trajectory, cfg: FilterConfig, max_response_tokens: int) -> list[str]:
    """The Dr.BoT filters a trajectory trips (empty = it trains)."""
    reasons = []
    turns = len(traj.turn_spans)
    if cfg.void_turn and turns > 0 and traj.invalid_actions >= turns:
        reasons.append("void_turn")  # not one valid action in the whole episode
    if cfg.overlong and traj.response_length >= max_response_tokens:
        reasons.append("overlong")
    if cfg.repetition:
        generated = [t for t, m in zip(traj.token_ids, traj.loss_mask, strict=True) if m]
        if has_repeated_ngram(
            generated, n=cfg.repetition_ngram, max_repeats=cfg.repetition_max_count
        ):
            reasons.append("repetitive")
    if cfg.unreadable and traj.env_info.get("unreadable", False):
        reasons.append("unreadable")
    return reasons


# ----------------------------------------------------------------------------- advantages (§1)


def _anchor_id(anchor: str | None, traj_index: int, turn: int) -> int:
    # A missing anchor never groups with anything: make it unique.
    text = anchor if anchor is not None else f"\x00no-anchor:{traj_index}:{turn}"
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def compute_step_advantages(
    trajectories: Sequence[Trajectory], valid: torch.Tensor, algo: AlgoConfig
) -> list[float | list[float]]:
    """Per-trajectory advantages (GRPO) or per-turn advantages (GiGPO)."""
    a = algo.advantage
    rewards = torch.tensor([t.rewards.total for t in trajectories], dtype=torch.float64)
    group_ids = torch.tensor([t.group_id for t in trajectories], dtype=torch.long)
    kwargs = dict(norm_by_std=a.norm_by_std, epsilon=a.epsilon)
    if a.estimator == "grpo":
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
        a.estimator, inputs, gamma=a.gigpo_gamma, step_weight=a.gigpo_step_weight, **kwargs
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
    trajectories: list[Trajectory], step: int, algo: AlgoConfig, max_response_tokens: int
) -> StepExperience:
    """score -> Dr.BoT masks -> group filter -> advantages, as SPEAR.md §8 orders them."""
    apply_tool_bonus(trajectories, step, algo.tool_reward)
    valid = torch.tensor([t.is_valid for t in trajectories], dtype=torch.bool)
    counts = {"infra_failure": int((~valid).sum())}
    group_ids = torch.tensor([t.group_id for t in trajectories], dtype=torch.long)
    # From here on a sample of a dropped group counts as invalid: its group has no baseline.
    enough = enough_valid(group_ids, valid, algo.filters.min_valid_samples)
    counts["groups_too_few_valid"] = len(set(group_ids[~enough].tolist()))
    valid &= enough
    train = valid.clone()
    for i, traj in enumerate(trajectories):
        if not valid[i]:
            continue
        for reason in drbot_reasons(traj, algo.filters, max_response_tokens):
            counts[reason] = counts.get(reason, 0) + 1
            train[i] = False
    rewards = torch.tensor([t.rewards.total for t in trajectories], dtype=torch.float64)
    if algo.filters.group_keep_ratio < 1.0:
        # Among the groups that are left: a dropped group takes no place in the kept fraction.
        keep_group = torch.zeros_like(valid)
        keep_group[enough] = group_filter_keep(
            rewards[enough], group_ids[enough], valid[enough], algo.filters.group_keep_ratio
        )
        counts["group_filter"] = int((train & ~keep_group).sum())
        train &= keep_group
    advantages = compute_step_advantages(trajectories, valid, algo)
    means, stds = group_reward_stats(rewards, group_ids, valid)
    return StepExperience(
        trajectories=trajectories,
        advantages=advantages,
        train_mask=train.tolist(),
        filter_counts=counts,
        group_means=means,
        group_stds=stds,
    )
