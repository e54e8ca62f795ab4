"""Group-relative advantage estimators: GRPO and GiGPO (docs/algorithm.md §1).

No critic: a trajectory's advantage is its reward minus the mean reward of its group (the G
samples of one prompt), optionally divided by the group std. GiGPO adds a step-level term
computed over "anchor-state" groups: steps of the same prompt group that saw the same
observation.

Conventions shared by every function here:
- `valid` marks samples whose episode ran to completion. An invalid sample (an environment or
  sandbox failure, `Trajectory.failure`) is excluded from its group's mean and std and gets
  advantage 0: a failure is never a zero reward.
- A group with fewer than two valid members gets advantage 0 (there is no baseline to compare
  against). verl instead uses mean 0 / std 1 for a singleton, which hands the raw reward back as
  the advantage; that is a signal without a baseline, so we do not copy it.
- std is the unbiased sample std (divide by n - 1), torch.std's default, as verl uses.

Entry point for the config: `ADVANTAGE_ESTIMATORS[name](inputs, norm_by_std=..., ...)` or
`compute_advantages(name, inputs, ...)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AdvantageInputs:
    """Everything an estimator may read. Trajectory fields are [N]; step fields are [S].

    rewards:          [N] float, the trajectory reward R (task reward + tool-call bonus).
    group_ids:        [N] long, the prompt group of each trajectory (any integer ids).
    valid:            [N] bool, False for infrastructure failures; None means all valid.
    step_traj_index:  [S] long, index (0..N-1) of the trajectory each step belongs to. The steps
                      of one trajectory appear in time order (they need not be contiguous).
    step_rewards:     [S] float, the per-step environment reward r_t.
    step_anchor:      [S] long, id of the observation the step acted on (e.g. a hash of the
                      observation text). Steps with the same (group id, anchor) form a step group.

    When step fields are given, every estimator returns one advantage per step [S]; otherwise
    one per trajectory [N]. GiGPO needs the step fields.
    """

    rewards: Tensor
    group_ids: Tensor
    valid: Tensor | None = None
    step_traj_index: Tensor | None = None
    step_rewards: Tensor | None = None
    step_anchor: Tensor | None = None

    @property
    def has_steps(self) -> bool:
        return self.step_traj_index is not None

    def valid_mask(self) -> Tensor:
        if self.valid is None:
            return torch.ones_like(self.rewards, dtype=torch.bool)
        return self.valid.bool()


def group_mean_std(
    values: Tensor, group_ids: Tensor, valid: Tensor | None = None, *, unbiased: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-element (mean, std, count) of its group, over valid members only.

    All three outputs have the shape of `values` [N]. std is the unbiased sample std (divide by
    n - 1, torch.std's default, what the reference's GRPO/GiGPO advantages use) or with
    unbiased=False the population std (np.std's default, what the reference's group filter and
    baseline history use). std is 0 where the group has fewer than two valid members; mean is 0
    where it has none.
    """
    if valid is None:
        valid = torch.ones_like(values, dtype=torch.bool)
    valid = valid.bool()
    if values.numel() == 0:
        empty = torch.zeros_like(values)
        return empty, empty, empty
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max().item()) + 1
    # where() rather than multiply: an invalid sample's reward may be NaN, and NaN * 0 is NaN.
    x = torch.where(valid, values, torch.zeros_like(values))
    w = valid.to(values.dtype)
    zeros = torch.zeros(n_groups, dtype=values.dtype, device=values.device)
    count = zeros.index_add(0, inverse, w)
    mean = zeros.index_add(0, inverse, x) / count.clamp(min=1)
    # Two-pass variance (deviations from the mean) is exact enough in float32 for rewards.
    dev = torch.where(valid, values - mean[inverse], torch.zeros_like(values))
    var = zeros.index_add(0, inverse, dev * dev) / (count - int(unbiased)).clamp(min=1)
    std = torch.where(count >= 2, var.sqrt(), torch.zeros_like(var))
    return mean[inverse], std[inverse], count[inverse]


def grpo_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    valid: Tensor | None = None,
    *,
    norm_by_std: bool = False,
    epsilon: float = 1e-6,
) -> Tensor:
    """GRPO outcome advantage (docs/algorithm.md §1): A_i = R_i - mean_group(R) [/ (std_group +
    eps)].

    Args:
        rewards: [N] float trajectory rewards.
        group_ids: [N] long group id per sample.
        valid: [N] bool; invalid samples are left out of the statistics and get 0.
        norm_by_std: divide by (std + epsilon); False for Dr.BoT / SPEAR, True for plain GRPO.
        epsilon: added to the std so a zero-variance group does not divide by zero.

    Returns:
        [N] advantages (same dtype as rewards). Valid members of each group sum to zero.
    """
    if valid is None:
        valid = torch.ones_like(rewards, dtype=torch.bool)
    valid = valid.bool()
    mean, std, count = group_mean_std(rewards, group_ids, valid)
    adv = rewards - mean
    if norm_by_std:
        adv = adv / (std + epsilon)
    return torch.where(valid & (count >= 2), adv, torch.zeros_like(adv))


def discounted_step_returns(step_traj_index: Tensor, step_rewards: Tensor, gamma: float) -> Tensor:
    """Discounted return G_t = r_t + gamma * G_{t+1} of every step within its trajectory.

    Steps of one trajectory are taken in the order they appear in the arrays. Vectorised over
    trajectories: the steps are laid out as a padded [n_traj, max_len] matrix (padding after the
    last step, reward 0) and swept backwards once, so the cost is O(S) work in max_len torch ops.
    """
    n_steps = step_rewards.numel()
    if n_steps == 0:
        return step_rewards.clone()
    order = torch.argsort(step_traj_index, stable=True)  # stable keeps time order per trajectory
    sorted_traj = step_traj_index[order]
    _, row, counts = torch.unique_consecutive(sorted_traj, return_inverse=True, return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(n_steps, device=step_rewards.device) - starts[row]
    table = torch.zeros(
        counts.numel(),
        int(counts.max().item()),
        dtype=step_rewards.dtype,
        device=step_rewards.device,
    )
    table[row, col] = step_rewards[order]
    running = torch.zeros(counts.numel(), dtype=step_rewards.dtype, device=step_rewards.device)
    for t in range(table.shape[1] - 1, -1, -1):
        running = table[:, t] + gamma * running
        table[:, t] = running
    returns = torch.empty_like(step_rewards)
    returns[order] = table[row, col]
    return returns


def step_group_ids(group_ids: Tensor, step_traj_index: Tensor, step_anchor: Tensor) -> Tensor:
    """Dense id of each step's anchor-state group: same prompt group and same anchor id."""
    keys = torch.stack([group_ids[step_traj_index].long(), step_anchor.long()], dim=1)
    if keys.shape[0] == 0:
        return step_anchor.long().clone()
    _, inverse = torch.unique(keys, dim=0, return_inverse=True)
    return inverse


def gigpo_advantages(
    inputs: AdvantageInputs,
    *,
    norm_by_std: bool = False,
    epsilon: float = 1e-6,
    gamma: float = 0.95,
    step_weight: float = 1.0,
) -> Tensor:
    """GiGPO (docs/algorithm.md §1): episode GRPO advantage + step_weight * step-level advantage.

    The episode term is GRPO over trajectories (one reward per trajectory). The step term is GRPO
    over anchor-state groups where each step's value is its discounted return within its
    trajectory. Steps of invalid trajectories are left out of the step statistics and get 0.

    Note: verl-agent's default computes the episode mean/std over step rows (a trajectory with
    more steps weighs more); here each trajectory counts once, as in the GiGPO paper.

    Returns:
        [S] per-step advantages.
    """
    if not inputs.has_steps or inputs.step_rewards is None or inputs.step_anchor is None:
        raise ValueError("gigpo needs step_traj_index, step_rewards and step_anchor")
    valid = inputs.valid_mask()
    episode = grpo_advantages(
        inputs.rewards, inputs.group_ids, valid, norm_by_std=norm_by_std, epsilon=epsilon
    )
    traj = inputs.step_traj_index.long()
    returns = discounted_step_returns(traj, inputs.step_rewards, gamma)
    step_groups = step_group_ids(inputs.group_ids, traj, inputs.step_anchor)
    step = grpo_advantages(
        returns, step_groups, valid[traj], norm_by_std=norm_by_std, epsilon=epsilon
    )
    return episode[traj] + step_weight * step


def _grpo_estimator(
    inputs: AdvantageInputs, *, norm_by_std: bool = False, epsilon: float = 1e-6, **_: object
) -> Tensor:
    """Registry adapter: GRPO per trajectory, repeated on each step when steps are given.

    GRPO has no step term: `**_` takes the uniform call's gamma and step_weight, unused.
    """
    adv = grpo_advantages(
        inputs.rewards,
        inputs.group_ids,
        inputs.valid_mask(),
        norm_by_std=norm_by_std,
        epsilon=epsilon,
    )
    if inputs.has_steps:
        return adv[inputs.step_traj_index.long()]
    return adv


AdvantageEstimator = Callable[..., Tensor]

# Keyed by the config's `advantage_estimator` literal. Uniform call:
#   fn(inputs, *, norm_by_std, epsilon, gamma, step_weight) -> [N] or [S] advantages.
ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    "grpo": _grpo_estimator,
    "gigpo": gigpo_advantages,
}


def compute_advantages(
    estimator: str,
    inputs: AdvantageInputs,
    *,
    norm_by_std: bool = False,
    epsilon: float = 1e-6,
    gamma: float = 0.95,
    step_weight: float = 1.0,
) -> Tensor:
    """Run the named estimator. Returns [S] when `inputs` has step fields, else [N]."""
    try:
        fn = ADVANTAGE_ESTIMATORS[estimator]
    except KeyError:
        raise ValueError(
            f"unknown advantage estimator {estimator!r}; expected one of "
            f"{sorted(ADVANTAGE_ESTIMATORS)}"
        ) from None
    return fn(
        inputs, norm_by_std=norm_by_std, epsilon=epsilon, gamma=gamma, step_weight=step_weight
    )


def broadcast_to_tokens(
    advantages: Tensor, loss_mask: Tensor, token_index: Tensor | None = None
) -> Tensor:
    """Spread per-sample or per-step advantages over response tokens.

    Args:
        advantages: [B] one per row (token_index None), or a flat [S] one per step/turn.
        loss_mask: [B, T] bool/0-1, the tokens that carry loss.
        token_index: [B, T] long, for per-step advantages: the index into `advantages` of the
            step each token belongs to, -1 for tokens of no step (prompt, tool output, padding).

    Returns:
        [B, T] float advantages, 0 wherever loss_mask is 0.
    """
    mask = loss_mask.bool()
    if token_index is None:
        if advantages.shape[0] != mask.shape[0]:
            raise ValueError("per-sample advantages need one value per row of loss_mask")
        out = advantages.unsqueeze(-1).expand(mask.shape)
    elif advantages.numel() == 0:
        out = torch.zeros(mask.shape, dtype=advantages.dtype, device=advantages.device)
    else:
        has_step = token_index >= 0
        out = advantages[token_index.clamp(min=0)]
        out = torch.where(has_step, out, torch.zeros_like(out))
    return torch.where(mask, out, torch.zeros_like(out))
