"""score -> Dr.BoT masks -> group filter -> advantages, on hand-made trajectories."""

from __future__ import annotations

import math

import pytest

from spear_ray.config import SpearConfig
from spear_ray.containers import RewardParts, Trajectory
from spear_ray.experience import StepExperience, process_step
from spear_ray.recipe import Recipe
from tests.unit.test_replay_metrics import replayed_entry


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
        turn_invalid=[k < invalid for k in range(turns)],
        turn_texts=["text"] * turns,
        turn_anchors=anchors or [f"s{k}" for k in range(turns)],
        turn_rewards=[0.0] * (turns - 1) + [task_reward],
        failure=failure,
    )


def _config(algo: dict, max_response_tokens: int = 100) -> SpearConfig:
    return SpearConfig.model_validate(
        {
            "algo": algo,
            "env": {"name": "frozenlake"},
            "rollout": {"max_response_tokens": max_response_tokens, "max_tokens_per_turn": 50},
        }
    )


def _step(trajs, step=0, max_response_tokens=100, **algo) -> StepExperience:
    """process_step with the recipe of a config whose algo section is `algo`."""
    recipe = Recipe.from_config(_config(algo, max_response_tokens))
    return process_step(
        trajs,
        step,
        tool_bonus=recipe.tool_bonus,
        filters=recipe.filters,
        advantage=recipe.advantage,
    )


NO_FILTERS = {"filters": {"group_keep_ratio": 1.0}, "tool_reward": {"enabled": False}}


def test_tool_bonus_follows_the_decay_schedule():
    algo = dict(tool_reward={"decay_steps": 10, "per_call": 0.1, "cap": 1.0})
    trajs = [_traj(0, 1.0, tool_calls=3), _traj(0, 0.0, tool_calls=20)]
    _step(trajs, 0, **algo)
    assert trajs[0].rewards.tool_bonus == pytest.approx(0.3)
    assert trajs[1].rewards.tool_bonus == pytest.approx(1.0)  # capped
    _step(trajs, 5, **algo)
    assert trajs[0].rewards.tool_bonus == pytest.approx(0.3 * (math.cos(math.pi / 2) + 1) / 2)
    _step(trajs, 10, **algo)
    assert trajs[0].rewards.tool_bonus == pytest.approx(0.0, abs=1e-12)


def test_qwen3_combination_gives_the_indicator_when_the_task_succeeds():
    algo = dict(tool_reward={"combine": "qwen3", "decay_steps": 10})
    trajs = [_traj(0, 1.0, tool_calls=3), _traj(0, -1.0, tool_calls=3)]
    _step(trajs, 0, **algo)
    assert trajs[0].rewards.tool_bonus == pytest.approx(1.0)  # 1[r_tc > 0] * lambda
    assert trajs[1].rewards.tool_bonus == pytest.approx(0.3)  # r_tc * lambda


def test_infrastructure_failures_do_not_change_the_others_advantages():
    algo = dict(**NO_FILTERS)
    clean = [_traj(0, 1.0), _traj(0, 0.0), _traj(0, 0.5)]
    with_failure = [*clean, _traj(0, 0.0, failure="sandbox died")]
    a = _step(clean, 0, **algo)
    b = _step(with_failure, 0, **algo)
    assert b.advantages[:3] == pytest.approx(a.advantages)
    assert b.advantages[3] == 0.0 and b.train_mask == [True, True, True, False]
    assert b.filter_counts["infra_failure"] == 1
    assert b.group_means.tolist() == pytest.approx([0.5])  # the failure is not in the mean


def test_drbot_filters_mask_loss_but_keep_group_statistics():
    algo = dict(
        filters={"group_keep_ratio": 1.0, "repetition_ngram": 2, "repetition_max_count": 3},
        tool_reward={"enabled": False},
    )
    trajs = [
        _traj(0, 1.0),
        _traj(0, 0.0, invalid=2),  # void: no valid action at all
        _traj(0, 0.0, gen=[4, 4, 4, 4, 4, 4]),  # 2-gram (4, 4) repeated -> repetitive
        _traj(0, 0.0, turns=1, gen=list(range(10, 120))),  # length >= 100: overlong
    ]
    exp = _step(trajs, 0, **algo)
    assert exp.train_mask == [True, False, False, False]  # every turn of them is flagged
    assert exp.filter_counts["void_turn"] == 2  # turn scope counts turns
    assert exp.filter_counts["repetitive"] == 2 and exp.filter_counts["overlong"] == 1
    assert exp.group_means.tolist() == pytest.approx([0.25])  # filtered rows still count
    assert sum(exp.advantages) == pytest.approx(0.0)


def test_turn_scope_masks_only_the_flagged_turns():
    # The agent recipe trains each turn as its own row and masks invalid ones: here turn 0 is
    # void, turn 1 trains. (Before, only an all-invalid trajectory was masked.)
    trajs = [_traj(0, 1.0, invalid=1), _traj(0, 0.0)]
    exp = _step(trajs, **NO_FILTERS)
    assert exp.train_mask == [True, True] and exp.masked_turns == [[0], []]
    assert exp.filter_counts["void_turn"] == 1
    batch = exp.train_batch(pad_token_id=0)
    (s0, e0), (s1, e1) = trajs[0].turn_spans
    assert batch.loss_mask[0, s0:e0].sum() == 0 and batch.loss_mask[0, s1:e1].sum() == e1 - s1


def test_trajectory_scope_masks_a_whole_episode_without_a_final_answer():
    # The math recipe's row is the whole response: no final answer masks all of it.
    answered, truncated = _traj(0, 1.0, invalid=1), _traj(0, -1.0)
    answered.env_info["ended_by"] = "done"
    truncated.env_info["ended_by"] = "truncated"
    exp = _step([answered, truncated], filters={"scope": "trajectory", "group_keep_ratio": 1.0})
    assert exp.train_mask == [True, False] and exp.masked_turns == [[], []]
    assert exp.filter_counts == {"infra_failure": 0, "groups_too_few_valid": 0, "void_turn": 1}


def test_groups_dropped_by_the_group_filter_leave_the_baseline_history():
    # The reference removes filtered groups from the batch before it records the history.
    trajs = [_traj(0, 1.0), _traj(0, 0.0), _traj(1, 0.5), _traj(1, 0.5)]
    exp = _step(trajs, filters={"group_keep_ratio": 0.5}, tool_reward={"enabled": False})
    assert exp.group_means.tolist() == [0.5] and exp.group_stds.tolist() == [0.5]
    kept_all = _step(trajs, **NO_FILTERS)
    assert kept_all.group_means.tolist() == [0.5, 0.5]


def test_group_filter_keeps_the_highest_std_groups():
    algo = dict(filters={"group_keep_ratio": 0.5}, tool_reward={"enabled": False})
    trajs = [_traj(0, 1.0), _traj(0, 0.0), _traj(1, 0.5), _traj(1, 0.5)]
    exp = _step(trajs, 0, **algo)
    assert exp.train_mask == [True, True, False, False]
    assert exp.filter_counts["group_filter"] == 2


def test_gigpo_gives_one_advantage_per_turn_and_a_train_batch_takes_them():
    algo = dict(advantage={"estimator": "gigpo"}, **NO_FILTERS)
    trajs = [_traj(0, 1.0, turns=3), _traj(0, 0.0, turns=2)]
    exp = _step(trajs, 0, **algo)
    assert [len(a) for a in exp.advantages] == [3, 2]
    batch = exp.train_batch(pad_token_id=0)
    start, end = trajs[0].turn_spans[2]
    assert batch.advantages[0, start:end].tolist() == pytest.approx([exp.advantages[0][2]] * 3)


def test_a_group_with_too_few_valid_samples_is_dropped_and_the_others_are_unchanged():
    algo = dict(filters={"group_keep_ratio": 0.67}, tool_reward={"enabled": False})
    kept = [
        *[_traj(0, r) for r in (1.0, 0.0, 0.0)],
        _traj(0, 0.0, failure="timeout: env.step exceeded 120s"),  # 3 valid of 4: kept
        *[_traj(2, r) for r in (1.0, 0.5, 0.5, 0.5)],
    ]
    one_valid = [_traj(1, 5.0), *[_traj(1, 0.0, failure="sandbox died") for _ in range(3)]]
    a = _step(list(kept), 0, **algo)
    b = _step([*kept[:4], *one_valid, *kept[4:]], 0, **algo)
    # group 1 has 1 valid sample < algo.filters.min_valid_samples = 2: dropped whole
    assert (
        b.filter_counts["groups_too_few_valid"] == 1
        and a.filter_counts["groups_too_few_valid"] == 0
    )
    assert b.advantages[4:8] == [0.0] * 4 and b.train_mask[4:8] == [False] * 4
    # the others: advantages bitwise equal, the same groups kept by the group filter (3 groups
    # x 0.67 would keep 2; the dropped group takes no place, so 2 x 0.67 keeps 1, as without it)
    assert b.advantages[:4] + b.advantages[8:] == a.advantages
    assert b.train_mask[:4] + b.train_mask[8:] == a.train_mask
    assert a.train_mask == [True, True, True, False, False, False, False, False]
    # nor is it in the baseline history (its one valid reward 5.0 would raise the mean); nor is
    # group 2, which the group filter dropped
    assert b.group_means.tolist() == a.group_means.tolist() == pytest.approx([1 / 3])


def test_min_valid_samples_is_configurable_and_capped_by_the_group_size():
    trajs = [_traj(0, 1.0), _traj(0, 0.0), _traj(0, 0.5, failure="sandbox died"), _traj(1, 1.0)]
    strict_algo = dict(
        filters={"group_keep_ratio": 1.0, "min_valid_samples": 3}, tool_reward={"enabled": False}
    )
    strict = _step(list(trajs), 0, **strict_algo)
    # group 0: 2 valid < 3, dropped; group 1 has one sample (a group of size 1 cannot have 3):
    # it is kept, as a group of one always was (its advantage is 0: no one to compare with)
    assert strict.filter_counts["groups_too_few_valid"] == 1
    assert strict.train_mask == [False, False, False, True]
    assert strict.group_means.tolist() == pytest.approx([1.0])
    lenient = _step(list(trajs), 0, **NO_FILTERS)
    assert lenient.filter_counts["groups_too_few_valid"] == 0
    assert lenient.train_mask == [True, True, False, True]


def test_a_step_with_no_trajectories_gives_an_empty_batch():
    exp = _step([], 0)
    assert exp.train_batch(pad_token_id=0).rows == 0 and exp.group_means.numel() == 0


class _FakeLearners:
    def __init__(self):
        self.calls: list[str] = []

    def recompute_old_logprobs(self, batch):
        self.calls.append("recompute_old_logprobs")
        return batch

    def update(self, *, batch, step, phase, loss_weight=1.0, own_logp_old=False):
        self.calls.append(f"update:{phase}:{batch.rows}")
        return {"loss": 0.5}

    def publish_weights(self):
        return "weights"


@pytest.mark.parametrize(
    "trajectories, infra_failures",
    [
        ([], 8),  # every group dropped with a dead rollout worker
        ([_traj(0, 0.0, failure="worker died"), _traj(0, 1.0, failure="timeout")], 10),
        ([_traj(0, 0.0), _traj(0, 1.0)], 8),  # valid rows: the update runs
    ],
)
def test_a_step_without_one_valid_row_skips_the_update_and_counts_it(trajectories, infra_failures):
    """Controller.step on fakes (no Ray): an empty or all-failed rollout does not reach the
    learner (whose update refuses an empty batch) and the step's metrics say so."""
    from types import SimpleNamespace

    from spear_ray.controller import Controller
    from spear_ray.faults import NonFiniteGuard

    config = SpearConfig.model_validate(
        {
            "env": {"name": "frozenlake"},
            "algo": {"sil": {"enabled": False}},
            "run": {"total_steps": 1},
        }
    )
    counts = {"worker_restarts": 1, "groups_reissued": 0, "groups_dropped": 4, "samples_dropped": 8}
    learners = _FakeLearners()
    synced = []
    ctl = Controller.__new__(Controller)  # the real step on fake actor groups
    ctl.config, ctl.recipe, ctl.pad_token_id = config, Recipe.from_config(config), 0
    ctl.buffer, ctl.learners, ctl.guard, ctl.weight_version = None, learners, NonFiniteGuard(3), 0
    ctl.log = print
    ctl.rollouts = SimpleNamespace(
        sync_weights=lambda group, v, **_: synced.append((group.publish_weights(), v))
    )
    ctl._pending = SimpleNamespace(all=lambda: list(trajectories), counts=counts, wall_seconds=2.0)
    metrics = ctl.step(0)
    usable = any(t.is_valid for t in trajectories)
    # (one epoch of one mini-batch, no SIL: the update's own log-probs are logp_old)
    assert ctl.recipe.logp_old == "update"
    assert learners.calls == ([f"update:on_policy:{len(trajectories)}"] if usable else [])
    assert metrics["update/skipped_no_valid_rows"] == int(not usable)
    assert metrics["rollout/groups_dropped"] == 4 and metrics["rollout/worker_restarts"] == 1
    assert metrics["infra_failures"] == infra_failures
    assert synced == [("weights", 1)]  # the step still completes: weights go out as usual


class _ReplayLearners(_FakeLearners):
    """The learners' replay update reports what it did to the rows' log-probs."""

    def update(self, *, batch, step, phase, loss_weight=1.0, own_logp_old=False):
        metrics = super().update(batch=batch, step=step, phase=phase, loss_weight=loss_weight)
        return {**metrics, "logp_change": 0.125} if phase == "replay" else metrics


def test_a_replay_step_logs_what_it_replayed_and_a_step_without_replay_does_not():
    """Controller.step on fakes: a step whose replay update ran has replay/rows,
    replay/success_frac, replay/mean_advantage and replay/logp_change; the next, without a
    replay, has none of them."""
    from types import SimpleNamespace

    from spear_ray.controller import Controller
    from spear_ray.faults import NonFiniteGuard

    config = SpearConfig.model_validate({"env": {"name": "frozenlake"}, "run": {"total_steps": 1}})
    learners = _ReplayLearners()
    ctl = Controller.__new__(Controller)  # the real step on fake actor groups and buffer
    ctl.config, ctl.recipe, ctl.pad_token_id = config, Recipe.from_config(config), 0
    ctl.buffer, ctl.learners, ctl.guard, ctl.weight_version = None, learners, NonFiniteGuard(3), 0
    ctl.log = print
    ctl.rollouts = SimpleNamespace(sync_weights=lambda group, v, **_: None)
    replays = [
        [
            replayed_entry(n, a, ok, tokens=3)
            for n, a, ok in [("a", 2.0, True), ("b", 1.0, False), ("c", 0.5, None)]
        ],
        None,  # the buffer's trigger did not fire
    ]
    ctl._replay_rows = lambda t: replays[t - 5]
    ctl._end_buffer_step = lambda t, exp, batch: {}
    keys = {"replay/rows", "replay/success_frac", "replay/mean_advantage", "replay/logp_change"}
    rows = []
    for t in (5, 6):
        trajectories = [_traj(0, 0.0), _traj(0, 1.0)]
        ctl._pending = SimpleNamespace(
            all=lambda trajs=trajectories: trajs, counts={}, wall_seconds=1.0
        )
        rows.append(ctl.step(t))
    with_replay, without = rows
    assert learners.calls.count("update:replay:3") == 1
    assert with_replay["replay/rows"] == 3 == with_replay["spear/replay_rows"]
    assert with_replay["replay/success_frac"] == 0.5  # the unknown flag is left out
    assert with_replay["replay/mean_advantage"] == pytest.approx((2.0 + 1.0 + 0.5) / 3)
    assert with_replay["replay/logp_change"] == 0.125
    assert not keys & set(without) and without["spear/replay_rows"] == 0


def test_evaluation_with_only_infrastructure_failures_measures_nothing():
    """All-failed evaluations are NaN (logged as null), never a success rate of 0."""
    import math

    from spear_ray.evaluation import evaluation_metrics

    failed = [_traj(k, 0.0, failure="RuntimeError: boom") for k in range(3)]
    metrics = evaluation_metrics(failed)
    assert math.isnan(metrics["eval/success_rate"]) and metrics["eval/infra_failures"] == 3
    mixed = evaluation_metrics([*failed, _traj(9, 1.0)])
    assert mixed["eval/infra_failures"] == 3
    assert mixed["eval/task_reward"] == 1.0


def test_gigpo_keeps_its_std_normalisation_when_grpo_drops_it():
    # The reference's Dr.BoT(GiGPO) scripts set norm_adv_by_std_in_grpo=False and
    # gigpo.mode=mean_std_norm: GiGPO's advantages stay std-normalised.
    trajs = [_traj(0, 4.0, turns=1), _traj(0, 0.0, turns=1)]
    algo = dict(advantage={"estimator": "gigpo", "norm_by_std": False}, **NO_FILTERS)
    normalised = _step(trajs, **algo)
    # episode: (4 - 2) / (std 2.83 + eps); step (distinct anchors s0 = s0: one step group of two)
    episode = 2.0 / (math.sqrt(8.0) + 1e-6)
    assert normalised.advantages[0][0] == pytest.approx(2 * episode, rel=1e-6)
    algo["advantage"]["gigpo_std_norm"] = False
    raw = _step(trajs, **algo)
    assert raw.advantages[0][0] == pytest.approx(2.0 + 2.0)  # mean_norm: episode 2 + step 2
