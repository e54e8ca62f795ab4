"""Typed containers: `Trajectory` (one episode) and `TrainBatch` (padded tensors for learners).

Token-in-token-out: `Trajectory.token_ids` are exactly the ids the engine sampled and the env
observations appended to them, in order; nothing is re-tokenized. The only conversion from
trajectories to tensors is `build_train_batch` below, so padding, loss masks and per-token
advantages are decided in one place.

Layout of one trajectory's ids:  [prompt ids | turn 1 generated | obs 1 | turn 2 generated | ...]
  - `loss_mask[i]` is 1 exactly on model-generated tokens (never on prompt or observation ids);
  - `behaviour_logprobs[i]` is the sampler's log-prob of token i (0.0 where loss_mask is 0);
  - `turn_spans[k] = (start, end)`: the half-open range of ids the model generated in turn k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class RewardParts:
    """The parts a trajectory's score is made of (docs/algorithm.md §6; §2 for the penalty)."""

    task: float = 0.0  # the environment's own reward (e.g. +1 solved / -1 wrong)
    invalid_penalty: float = 0.0  # sum of per-invalid-action penalties (<= 0)
    tool_bonus: float = 0.0  # r_tc * lambda(t), set by the controller at scoring time

    @property
    def total(self) -> float:
        return self.task + self.invalid_penalty + self.tool_bonus


@dataclass
class Trajectory:
    """One episode of one task, as sampled."""

    task_id: str  # identifies the task; the G samples of a group share it
    group_id: int  # index of the group within the step
    env_seed: int
    prompt_length: int  # number of leading ids that are the prompt
    token_ids: list[int]
    loss_mask: list[int]
    behaviour_logprobs: list[float]
    turn_spans: list[tuple[int, int]] = field(default_factory=list)
    rewards: RewardParts = field(default_factory=RewardParts)
    tool_calls: int = 0
    invalid_actions: int = 0
    success: bool = False
    finished: bool = False  # the env said done (vs. max turns / token budget reached)
    turn_anchors: list[str | None] = field(default_factory=list)  # GiGPO anchor state per turn
    turn_rewards: list[float] = field(default_factory=list)  # per-turn env reward (GiGPO returns)
    turn_texts: list[str] = field(default_factory=list)  # decoded text of each turn (Dr.BoT)
    turn_invalid: list[bool] = field(default_factory=list)  # the env judged the action invalid
    weight_version: int = 0  # version of the weights that sampled every token
    failure: str | None = None  # set => infrastructure failure: excluded from group statistics
    timings: dict[str, float] = field(default_factory=dict)
    env_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.token_ids)
        if len(self.loss_mask) != n or len(self.behaviour_logprobs) != n:
            raise ValueError(
                f"trajectory {self.task_id}: token_ids ({n}), loss_mask ({len(self.loss_mask)}) "
                f"and behaviour_logprobs ({len(self.behaviour_logprobs)}) must have the same length"
            )
        if not 0 <= self.prompt_length <= n or any(self.loss_mask[: self.prompt_length]):
            raise ValueError(f"trajectory {self.task_id}: the loss mask must be 0 on the prompt")

    @property
    def is_valid(self) -> bool:
        return self.failure is None

    @property
    def response_length(self) -> int:
        return len(self.token_ids) - self.prompt_length

    @property
    def generated_tokens(self) -> int:
        return sum(self.loss_mask)

    def token_turn_index(self) -> list[int]:
        """For each id: the turn that generated it, or -1 (prompt, observations)."""
        index = [-1] * len(self.token_ids)
        for turn, (start, end) in enumerate(self.turn_spans):
            index[start:end] = [turn] * (end - start)
        return index


@dataclass
class TrainBatch:
    """Right-padded tensors, one row per trajectory, all of shape [rows, length] unless noted.

    `logprobs` and `advantages` are aligned with `input_ids`: entry [b, i] belongs to token i
    (the learner compares it with log p(token i | tokens < i)). `loss_mask` is 0 on padding.
    """

    input_ids: torch.Tensor  # long
    attention_mask: torch.Tensor  # long, 1 on real tokens
    loss_mask: torch.Tensor  # float, 1 on model-generated tokens that carry loss
    old_logprobs: torch.Tensor  # float, behaviour log-probs (0 where loss_mask is 0)
    advantages: torch.Tensor  # float, per-token advantage (0 where loss_mask is 0)
    group_ids: torch.Tensor  # long [rows]
    rewards: torch.Tensor  # float [rows], total score of each row

    @property
    def rows(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    def select(self, rows: torch.Tensor | Sequence[int]) -> TrainBatch:
        """The sub-batch of the given rows (for mini/micro-batches and rank shards)."""
        index = torch.as_tensor(rows, dtype=torch.long)
        return TrainBatch(**{name: getattr(self, name)[index] for name in _FIELDS})


_FIELDS = (
    "input_ids",
    "attention_mask",
    "loss_mask",
    "old_logprobs",
    "advantages",
    "group_ids",
    "rewards",
)


def build_train_batch(
    trajectories: Sequence[Trajectory],
    advantages: Sequence[float | Sequence[float]],
    pad_token_id: int,
    train_mask: Sequence[bool] | None = None,
    masked_turns: Sequence[Sequence[int]] | None = None,
) -> TrainBatch:
    """Pad trajectories into a `TrainBatch`.

    advantages[k] is either one number for the whole trajectory (GRPO) or one number per turn
    (GiGPO), broadcast over the tokens that turn generated. `train_mask[k]` False (a Dr.BoT
    filter or an infrastructure failure) zeroes that row's loss mask; the row stays in the batch
    so every rank sees the same shapes. `masked_turns[k]` lists turns of trajectory k whose
    tokens lose their loss (a Dr.BoT filter at turn scope).
    """
    if len(advantages) != len(trajectories):
        raise ValueError(f"{len(advantages)} advantages for {len(trajectories)} trajectories")
    rows = len(trajectories)
    length = max((len(t.token_ids) for t in trajectories), default=0)
    input_ids = torch.full((rows, length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, length), dtype=torch.long)
    loss_mask = torch.zeros((rows, length), dtype=torch.float32)
    old_logprobs = torch.zeros((rows, length), dtype=torch.float32)
    token_advantages = torch.zeros((rows, length), dtype=torch.float32)
    for row, (traj, adv) in enumerate(zip(trajectories, advantages, strict=True)):
        n = len(traj.token_ids)
        input_ids[row, :n] = torch.tensor(traj.token_ids, dtype=torch.long)
        attention_mask[row, :n] = 1
        mask = torch.tensor(traj.loss_mask, dtype=torch.float32)
        if train_mask is not None and not train_mask[row]:
            mask.zero_()
        for turn in masked_turns[row] if masked_turns is not None else ():
            start, end = traj.turn_spans[turn]
            mask[start:end] = 0
        loss_mask[row, :n] = mask
        old_logprobs[row, :n] = torch.tensor(traj.behaviour_logprobs, dtype=torch.float32) * mask
        token_advantages[row, :n] = _token_advantages(traj, adv) * mask
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        old_logprobs=old_logprobs,
        advantages=token_advantages,
        group_ids=torch.tensor([t.group_id for t in trajectories], dtype=torch.long),
        rewards=torch.tensor([t.rewards.total for t in trajectories], dtype=torch.float32),
    )


def _token_advantages(traj: Trajectory, advantage: float | Sequence[float]) -> torch.Tensor:
    n = len(traj.token_ids)
    if isinstance(advantage, (int, float)):
        return torch.full((n,), float(advantage))
    per_turn = list(advantage)
    if len(per_turn) != len(traj.turn_spans):
        raise ValueError(
            f"trajectory {traj.task_id}: {len(per_turn)} per-turn advantages for "
            f"{len(traj.turn_spans)} turns"
        )
    out = torch.zeros(n)
    for (start, end), value in zip(traj.turn_spans, per_turn, strict=True):
        out[start:end] = float(value)
    return out
