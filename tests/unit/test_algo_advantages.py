"""GRPO / GiGPO advantages against slow reference loops, plus group properties."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_ray.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    broadcast_to_tokens,
    compute_advantages,
    discounted_step_returns,
    gigpo_advantages,
    grpo_advantages,
)

SETTINGS = settings(max_examples=60, deadline=None)


# ------------------------------------------------------------------ reference loops ---------


def ref_grpo(rewards, groups, valid, norm_by_std, eps=1e-6):
    out = []
    for i in range(len(rewards)):
        if not valid[i]:
            out.append(0.0)
            continue
        members = [rewards[j] for j in range(len(rewards)) if groups[j] == groups[i] and valid[j]]
        if len(members) < 2:
            out.append(0.0)
            continue
        mean = sum(members) / len(members)
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / (len(members) - 1))
        adv = rewards[i] - mean
        if norm_by_std:
            adv = adv / (std + eps)
        out.append(adv)
    return out


def ref_returns(step_traj, step_rewards, gamma):
    out = [0.0] * len(step_rewards)
    for traj in set(step_traj):
        positions = [s for s in range(len(step_traj)) if step_traj[s] == traj]
        running = 0.0
        for s in reversed(positions):
            running = step_rewards[s] + gamma * running
            out[s] = running
    return out


def ref_gigpo(rewards, groups, valid, step_traj, step_rewards, step_anchor, norm, gamma, w):
    episode = ref_grpo(rewards, groups, valid, norm)
    returns = ref_returns(step_traj, step_rewards, gamma)
    keys = [(groups[step_traj[s]], step_anchor[s]) for s in range(len(step_traj))]
    key_ids = {k: i for i, k in enumerate(dict.fromkeys(keys))}
    step_valid = [valid[step_traj[s]] for s in range(len(step_traj))]
    step_adv = ref_grpo(returns, [key_ids[k] for k in keys], step_valid, norm)
    return [episode[step_traj[s]] + w * step_adv[s] for s in range(len(step_traj))]


# ------------------------------------------------------------------------ strategies --------


@st.composite
def grouped_batch(draw, max_n=24):
    n = draw(st.integers(1, max_n))
    groups = draw(st.lists(st.integers(0, 5), min_size=n, max_size=n))
    rewards = draw(st.lists(st.floats(-10, 10, allow_nan=False, width=32), min_size=n, max_size=n))
    valid = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    return rewards, groups, valid


def random_episodes(seed, n_traj=12, n_groups=3, max_steps=6, n_anchors=3):
    rng = random.Random(seed)
    groups = [rng.randrange(n_groups) for _ in range(n_traj)]
    rewards = [rng.choice([0.0, 1.0, 10.0, -0.5]) + rng.random() for _ in range(n_traj)]
    valid = [rng.random() > 0.2 for _ in range(n_traj)]
    per_traj = {t: rng.randint(1, max_steps) for t in range(n_traj)}
    # Interleave the steps of different trajectories but keep each one's time order.
    pending = {t: list(range(k)) for t, k in per_traj.items()}
    step_traj = []
    while any(pending.values()):
        t = rng.choice([t for t, left in pending.items() if left])
        pending[t].pop(0)
        step_traj.append(t)
    step_rewards = [rng.choice([0.0, 0.0, -0.1, 1.0]) for _ in step_traj]
    step_anchor = [rng.randrange(n_anchors) for _ in step_traj]
    return rewards, groups, valid, step_traj, step_rewards, step_anchor


def t64(x):
    return torch.tensor(x, dtype=torch.float64)


# ----------------------------------------------------------------------------- GRPO ---------


@SETTINGS
@given(batch=grouped_batch(), norm=st.booleans())
def test_grpo_matches_reference_loop(batch, norm):
    rewards, groups, valid = batch
    got = grpo_advantages(t64(rewards), torch.tensor(groups), torch.tensor(valid), norm_by_std=norm)
    want = ref_grpo(rewards, groups, valid, norm)
    torch.testing.assert_close(got, t64(want), rtol=1e-9, atol=1e-9)


@SETTINGS
@given(batch=grouped_batch(), norm=st.booleans())
def test_grpo_sums_to_zero_within_each_group(batch, norm):
    rewards, groups, valid = batch
    adv = grpo_advantages(t64(rewards), torch.tensor(groups), torch.tensor(valid), norm_by_std=norm)
    for g in set(groups):
        members = [i for i in range(len(groups)) if groups[i] == g and valid[i]]
        assert abs(float(adv[members].sum())) < 1e-6 * max(1.0, float(adv.abs().max()))


@SETTINGS
@given(batch=grouped_batch(), garbage=st.sampled_from([float("nan"), 1e9, -1e9, 0.0]))
def test_invalid_samples_do_not_change_the_others(batch, garbage):
    rewards, groups, valid = batch
    rewards = [*rewards, garbage]
    groups = [*groups, groups[0]]
    valid_with = [*valid, False]
    with_bad = grpo_advantages(t64(rewards), torch.tensor(groups), torch.tensor(valid_with))
    without = grpo_advantages(t64(rewards[:-1]), torch.tensor(groups[:-1]), torch.tensor(valid))
    torch.testing.assert_close(with_bad[:-1], without)
    assert with_bad[-1].item() == 0.0  # the failure itself gets no signal


def test_grpo_concrete_values_and_singleton_group():
    rewards = t64([1.0, 0.0, 0.0, 0.0, 5.0])
    groups = torch.tensor([7, 7, 7, 7, 3])
    adv = grpo_advantages(rewards, groups)
    torch.testing.assert_close(adv, t64([0.75, -0.25, -0.25, -0.25, 0.0]))
    std = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)  # unbiased
    normed = grpo_advantages(rewards, groups, norm_by_std=True, epsilon=1e-6)
    assert normed[0].item() == pytest.approx(0.75 / (std + 1e-6))
    assert normed[4].item() == 0.0


def test_grpo_all_invalid_group_and_empty_batch():
    adv = grpo_advantages(t64([1.0, 2.0]), torch.tensor([0, 0]), torch.tensor([False, False]))
    assert adv.tolist() == [0.0, 0.0]
    assert grpo_advantages(t64([]), torch.tensor([], dtype=torch.long)).numel() == 0


# ---------------------------------------------------------------------------- GiGPO ---------


def test_discounted_returns_known_values():
    got = discounted_step_returns(
        torch.tensor([0, 1, 0, 1, 0]), t64([0.0, 2.0, 0.0, 1.0, 1.0]), 0.5
    )
    # trajectory 0: rewards 0, 0, 1 -> 0.25, 0.5, 1 ; trajectory 1: 2, 1 -> 2.5, 1
    torch.testing.assert_close(got, t64([0.25, 2.5, 0.5, 1.0, 1.0]))


@pytest.mark.parametrize("seed", range(8))
def test_discounted_returns_match_reference(seed):
    _, _, _, step_traj, step_rewards, _ = random_episodes(seed)
    got = discounted_step_returns(torch.tensor(step_traj), t64(step_rewards), 0.95)
    torch.testing.assert_close(got, t64(ref_returns(step_traj, step_rewards, 0.95)))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("norm", [False, True])
def test_gigpo_matches_reference_loop(seed, norm):
    rewards, groups, valid, step_traj, step_rewards, step_anchor = random_episodes(seed)
    inputs = AdvantageInputs(
        rewards=t64(rewards),
        group_ids=torch.tensor(groups),
        valid=torch.tensor(valid),
        step_traj_index=torch.tensor(step_traj),
        step_rewards=t64(step_rewards),
        step_anchor=torch.tensor(step_anchor),
    )
    got = gigpo_advantages(inputs, norm_by_std=norm, gamma=0.9, step_weight=0.5)
    want = ref_gigpo(rewards, groups, valid, step_traj, step_rewards, step_anchor, norm, 0.9, 0.5)
    torch.testing.assert_close(got, t64(want), rtol=1e-9, atol=1e-9)
    # The registry entry is the same function with the same defaults.
    torch.testing.assert_close(
        compute_advantages("gigpo", inputs, norm_by_std=norm, gamma=0.9, step_weight=0.5), got
    )


def test_gigpo_step_groups_do_not_cross_prompt_groups():
    # Two trajectories see the same anchor id but belong to different prompts: no step group.
    inputs = AdvantageInputs(
        rewards=t64([1.0, 0.0, 1.0, 0.0]),
        group_ids=torch.tensor([0, 0, 1, 1]),
        step_traj_index=torch.tensor([0, 2]),
        step_rewards=t64([3.0, 5.0]),
        step_anchor=torch.tensor([9, 9]),
    )
    got = gigpo_advantages(inputs, step_weight=1.0)
    torch.testing.assert_close(got, t64([0.5, 0.5]))  # episode term only


def test_grpo_estimator_with_steps_repeats_episode_advantage_and_gigpo_needs_steps():
    inputs = AdvantageInputs(
        rewards=t64([1.0, 0.0]),
        group_ids=torch.tensor([0, 0]),
        step_traj_index=torch.tensor([0, 0, 1]),
        step_rewards=t64([0.0, 1.0, 0.0]),
        step_anchor=torch.tensor([0, 1, 0]),
    )
    torch.testing.assert_close(compute_advantages("grpo", inputs), t64([0.5, 0.5, -0.5]))
    no_steps = AdvantageInputs(rewards=t64([1.0, 0.0]), group_ids=torch.tensor([0, 0]))
    torch.testing.assert_close(compute_advantages("grpo", no_steps), t64([0.5, -0.5]))
    with pytest.raises(ValueError, match="gigpo needs"):
        compute_advantages("gigpo", no_steps)
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        compute_advantages("ppo", no_steps)
    assert set(ADVANTAGE_ESTIMATORS) == {"grpo", "gigpo"}


# ------------------------------------------------------------------------ broadcast ---------


def test_broadcast_per_sample_and_per_step():
    mask = torch.tensor([[1, 1, 0, 1], [0, 1, 1, 0]])
    got = broadcast_to_tokens(t64([2.0, -1.0]), mask)
    torch.testing.assert_close(got, t64([[2, 2, 0, 2], [0, -1, -1, 0]]))
    # Per-turn: row 0 has turns 0 and 1 (flat ids 0, 1), row 1 has turn 2; -1 = no turn.
    token_index = torch.tensor([[0, 0, -1, 1], [-1, 2, 2, -1]])
    got = broadcast_to_tokens(t64([1.0, 3.0, 5.0]), mask, token_index)
    torch.testing.assert_close(got, t64([[1, 1, 0, 3], [0, 5, 5, 0]]))
    # A token of a turn that is masked out (e.g. filtered) gets 0 too.
    got = broadcast_to_tokens(t64([1.0, 3.0, 5.0]), torch.zeros_like(mask), token_index)
    assert got.abs().sum().item() == 0.0
    with pytest.raises(ValueError):
        broadcast_to_tokens(t64([1.0]), mask)
