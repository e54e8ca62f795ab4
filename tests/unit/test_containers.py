"""Trajectory -> TrainBatch: padding, loss masks and per-token advantages in one place."""

from __future__ import annotations

import pytest
import torch

from spear_ray.containers import RewardParts, Trajectory, build_train_batch


def _traj(group_id=0, n_prompt=3, turns=((2, 1), (3, 0)), task="t", failure=None, logp=-0.5):
    """A trajectory with the given (generated, observation) token counts per turn."""
    ids = list(range(100, 100 + n_prompt))
    mask = [0] * n_prompt
    spans = []
    next_id = 200
    for generated, observed in turns:
        spans.append((len(ids), len(ids) + generated))
        ids += list(range(next_id, next_id + generated))
        mask += [1] * generated
        next_id += generated
        ids += [7] * observed
        mask += [0] * observed
    logprobs = [logp if m else 0.0 for m in mask]
    return Trajectory(
        task_id=task,
        group_id=group_id,
        env_seed=1,
        prompt_length=n_prompt,
        token_ids=ids,
        loss_mask=mask,
        behaviour_logprobs=logprobs,
        turn_spans=spans,
        rewards=RewardParts(task=1.0, invalid_penalty=-0.1, tool_bonus=0.05),
        failure=failure,
    )


def test_reward_total_is_the_sum_of_parts():
    assert RewardParts(task=1.0, invalid_penalty=-0.2, tool_bonus=0.1).total == pytest.approx(0.9)


def test_lengths_must_agree_and_prompt_carries_no_loss():
    with pytest.raises(ValueError, match="same length"):
        Trajectory(
            task_id="x",
            group_id=0,
            env_seed=0,
            prompt_length=1,
            token_ids=[1, 2],
            loss_mask=[0],
            behaviour_logprobs=[0.0, 0.0],
        )
    with pytest.raises(ValueError, match="prompt"):
        Trajectory(
            task_id="x",
            group_id=0,
            env_seed=0,
            prompt_length=2,
            token_ids=[1, 2],
            loss_mask=[1, 0],
            behaviour_logprobs=[0.0, 0.0],
        )


def test_token_turn_index_marks_generated_tokens_only():
    traj = _traj(turns=((2, 1), (3, 0)))
    assert traj.token_turn_index() == [-1, -1, -1, 0, 0, -1, 1, 1, 1]
    assert traj.generated_tokens == 5 and traj.response_length == 6


def test_batch_pads_right_and_keeps_masks_and_logprobs():
    short, long = _traj(turns=((1, 0),)), _traj(group_id=1, turns=((2, 1), (3, 0)))
    batch = build_train_batch([short, long], [0.5, -1.0], pad_token_id=0)
    assert batch.input_ids.shape == (2, 9)
    assert batch.input_ids[0].tolist() == [100, 101, 102, 200, 0, 0, 0, 0, 0]
    assert batch.attention_mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0]
    assert batch.loss_mask[1].tolist() == [0, 0, 0, 1, 1, 0, 1, 1, 1]
    assert torch.equal(batch.old_logprobs != 0, batch.loss_mask.bool())
    assert batch.advantages[0].tolist() == [0, 0, 0, 0.5, 0, 0, 0, 0, 0]
    assert batch.advantages[1].sum().item() == pytest.approx(-5.0)
    assert batch.group_ids.tolist() == [0, 1]
    assert batch.rewards[0].item() == pytest.approx(0.95)
    assert batch.num_loss_tokens == 6


def test_per_turn_advantages_are_broadcast_over_each_turns_tokens():
    traj = _traj(turns=((2, 1), (3, 0)))
    batch = build_train_batch([traj], [[0.25, -2.0]], pad_token_id=0)
    assert batch.advantages[0].tolist() == [0, 0, 0, 0.25, 0.25, 0, -2, -2, -2]
    with pytest.raises(ValueError, match="per-turn"):
        build_train_batch([traj], [[1.0]], pad_token_id=0)


def test_train_mask_zeroes_a_filtered_row_but_keeps_it():
    a, b = _traj(), _traj(group_id=1)
    batch = build_train_batch([a, b], [1.0, 1.0], pad_token_id=0, train_mask=[True, False])
    assert batch.rows == 2
    assert batch.loss_mask[1].sum() == 0 and batch.advantages[1].abs().sum() == 0
    assert batch.loss_mask[0].sum() == a.generated_tokens


def test_select_takes_rows_of_every_field():
    trajs = [_traj(group_id=g) for g in range(4)]
    batch = build_train_batch(trajs, [0.0, 1.0, 2.0, 3.0], pad_token_id=0)
    sub = batch.select([3, 1])
    assert sub.group_ids.tolist() == [3, 1]
    assert sub.advantages[:, 3].tolist() == [3.0, 1.0]
    assert sub.input_ids.shape == (2, batch.input_ids.shape[1])


def test_infrastructure_failure_is_not_valid():
    assert not _traj(failure="sandbox died").is_valid
    assert _traj().is_valid
