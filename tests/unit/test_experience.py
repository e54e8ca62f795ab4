"""score -> Dr.BoT masks -> group filter -> advantages, on hand-made trajectories."""

from __future__ import annotations

import math

import pytest

from spear_ray.config import SpearConfig
from spear_ray.config.schema import AlgoConfig
from spear_ray.containers import RewardParts, Trajectory
from spear_ray.experience import process_step


def _traj(
    group, task_reward, *, tool_calls=1, turns=2, invalid=0, failure=None, gen=None, anchors=None
):
    gen = gen or [5, 6, 7]
    ids, mask, spans = [1, 2], [0, 0], []
    for _ in range(turns):
        spans.append((len(ids), len(ids) + len(gen)))
        ids += gen
        mask += [1] * len(gen)
        ids += [9]
        mask += [0]
    return Trajectory(
        task_id=f"g{group}",
        group_id=group,
        env_seed=group,
        prompt_length=2,
        token_ids=ids,
        loss_mask=mask,
        behaviour_logprobs=[-0.5 * m for m in mask],
        turn_spans=spans,
        rewards=RewardParts(task=task_reward),
        tool_calls=tool_calls,
        invalid_actions=invalid,
        turn_anchors=anchors or [f"s{k}" for k in range(turns)],
        turn_rewards=[0.0] * (turns - 1) + [task_reward],
        failure=failure,
    )


def _algo(**overrides) -> AlgoConfig:
    return SpearConfig.model_validate({"algo": overrides, "env": {"name": "frozenlake"}}).algo


NO_FILTERS = {"filters": {"group_keep_ratio": 1.0}, "tool_reward": {"enabled": False}}


def test_tool_bonus_follows_the_decay_schedule():
    algo = _algo(tool_reward={"decay_steps": 10, "per_call": 0.1, "cap": 1.0})
    trajs = [_traj(0, 1.0, tool_calls=3), _traj(0, 0.0, tool_calls=20)]
    process_step(trajs, step=0, algo=algo, max_response_tokens=100)
    assert trajs[0].rewards.tool_bonus == pytest.approx(0.3)
    assert trajs[1].rewards.tool_bonus == pytest.approx(1.0)  # capped
    process_step(trajs, step=5, algo=algo, max_response_tokens=100)
    assert trajs[0].rewards.tool_bonus == pytest.approx(0.3 * (math.cos(math.pi / 2) + 1) / 2)
    process_step(trajs, step=10, algo=algo, max_response_tokens=100)
    assert trajs[0].rewards.tool_bonus == pytest.approx(0.0, abs=1e-12)


def test_qwen3_combination_gives_the_indicator_when_the_task_succeeds():
    algo = _algo(tool_reward={"combine": "qwen3", "decay_steps": 10})
    trajs = [_traj(0, 1.0, tool_calls=3), _traj(0, -1.0, tool_calls=3)]
    process_step(trajs, step=0, algo=algo, max_response_tokens=100)
    assert trajs[0].rewards.tool_bonus == pytest.approx(1.0)  # 1[r_tc > 0] * lambda
    assert trajs[1].rewards.tool_bonus == pytest.approx(0.3)  # r_tc * lambda


def test_infrastructure_failures_do_not_change_the_others_advantages():
    algo = _algo(**NO_FILTERS)
    clean = [_traj(0, 1.0), _traj(0, 0.0), _traj(0, 0.5)]
    with_failure = [*clean, _traj(0, 0.0, failure="sandbox died")]
    a = process_step(clean, 0, algo, 100)
    b = process_step(with_failure, 0, algo, 100)
    assert b.advantages[:3] == pytest.approx(a.advantages)
    assert b.advantages[3] == 0.0 and b.train_mask == [True, True, True, False]
    assert b.filter_counts["infra_failure"] == 1
    assert b.group_means.tolist() == pytest.approx([0.5])  # the failure is not in the mean


def test_drbot_filters_mask_loss_but_keep_group_statistics():
    algo = _algo(
        filters={"group_keep_ratio": 1.0, "repetition_ngram": 2, "repetition_max_count": 3},
        tool_reward={"enabled": False},
    )
    trajs = [
        _traj(0, 1.0),
        _traj(0, 0.0, invalid=2),  # void: no valid action at all
        _traj(0, 0.0, gen=[4, 4, 4, 4, 4, 4]),  # 2-gram (4, 4) repeated -> repetitive
        _traj(0, 0.0, turns=1, gen=list(range(10, 120))),  # length >= 100: overlong
    ]
    exp = process_step(trajs, 0, algo, max_response_tokens=100)
    assert exp.train_mask == [True, False, False, False]
    assert exp.filter_counts["void_turn"] == 1
    assert exp.filter_counts["repetitive"] == 1 and exp.filter_counts["overlong"] == 1
    assert exp.group_means.tolist() == pytest.approx([0.25])  # filtered rows still count
    assert sum(exp.advantages) == pytest.approx(0.0)


def test_group_filter_keeps_the_highest_std_groups():
    algo = _algo(filters={"group_keep_ratio": 0.5}, tool_reward={"enabled": False})
    trajs = [_traj(0, 1.0), _traj(0, 0.0), _traj(1, 0.5), _traj(1, 0.5)]
    exp = process_step(trajs, 0, algo, 100)
    assert exp.train_mask == [True, True, False, False]
    assert exp.filter_counts["group_filter"] == 2


def test_gigpo_gives_one_advantage_per_turn_and_a_train_batch_takes_them():
    algo = _algo(advantage={"estimator": "gigpo"}, **NO_FILTERS)
    trajs = [_traj(0, 1.0, turns=3), _traj(0, 0.0, turns=2)]
    exp = process_step(trajs, 0, algo, 100)
    assert [len(a) for a in exp.advantages] == [3, 2]
    batch = exp.train_batch(pad_token_id=0)
    start, end = trajs[0].turn_spans[2]
    assert batch.advantages[0, start:end].tolist() == pytest.approx([exp.advantages[0][2]] * 3)
