"""What a replay (SIL update) replayed and what it did, per step (docs/algorithm.md §5):
replay/rows, replay/success_frac, replay/mean_advantage and replay/logp_change. The arithmetic
by hand, the metrics row, and a learner rank's real replay update in one process (a plain-torch
stand-in for the DeepSpeed engine)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from buffers.replay_buffer import ReplayEntry, replay_batch_stats
from learners.learner_rank import METRIC_REDUCTIONS, REPLAY_ONLY_METRICS, LearnerRank
from learners.policy import logprob_change_sums, token_weighted_mean
from spear_ray.algo.replay import mean_row_advantage, success_fraction
from spear_ray.config.schema import SpearConfig
from spear_ray.containers import TrainBatch
from spear_ray.controller import StepRecord, step_metrics
from spear_ray.recipe import learner_spec

REPLAY_KEYS = {"replay/rows", "replay/success_frac", "replay/mean_advantage", "replay/logp_change"}

# ----------------------------------------------------------------------------- arithmetic


def test_logprob_change_is_token_weighted_over_loss_tokens_only():
    before = torch.tensor([[0.0, -1.0, -2.0, 0.0], [0.0, -0.5, -0.5, -0.5]])
    after = torch.tensor([[9.0, -0.5, -2.5, 7.0], [0.0, -0.25, -0.25, -0.5]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]])
    # row 0: +0.5 - 0.5 = 0 over 2 tokens; row 1: 0.25 + 0.25 + 0 = 0.5 over 3 tokens (the 9 and
    # 7 are off the loss mask)
    total, tokens = logprob_change_sums(before, after, mask)
    assert (total, tokens) == (pytest.approx(0.5), 5.0)
    assert token_weighted_mean(total, tokens) == pytest.approx(0.1)  # not (0 + 1/6) / 2
    # two ranks, one row each: their parts (token sum / global count) add up to the same mean
    parts = [logprob_change_sums(before[[r]], after[[r]], mask[[r]]) for r in (0, 1)]
    all_tokens = sum(n for _, n in parts)
    assert sum(token_weighted_mean(t, all_tokens) for t, _ in parts) == pytest.approx(0.1)
    # (the mean of the ranks' own means would be 1/12)
    assert math.isnan(token_weighted_mean(0.0, 0.0))
    with pytest.raises(ValueError, match="shapes"):
        logprob_change_sums(before, after[:, :3], mask)


def test_success_fraction_leaves_unknown_flags_out():
    assert success_fraction([True, False, None, True]) == pytest.approx(2 / 3)
    assert success_fraction([False, False]) == 0.0
    assert math.isnan(success_fraction([None, None])) and math.isnan(success_fraction([]))


def test_mean_row_advantage_takes_each_row_once():
    advantages = [[0.0, 2.0, 2.0, 2.0], [0.0, 0.5], [0.0, 3.0]]
    masks = [[0, 1, 1, 1], [0, 1], [0, 0]]  # the last row has no loss token: left out
    # (2 + 0.5) / 2, not the token mean (2 + 2 + 2 + 0.5) / 4
    assert mean_row_advantage(advantages, masks) == pytest.approx(1.25)
    assert math.isnan(mean_row_advantage([], []))
    with pytest.raises(ValueError, match="masks"):
        mean_row_advantage(advantages, masks[:2])


def replayed_entry(name: str, a_hat: float, success: bool | None, tokens: int = 2) -> ReplayEntry:
    n = 2 + tokens
    mask = [0, 0] + [1] * tokens
    return ReplayEntry(
        token_ids=np.arange(n) + 3,
        loss_mask=mask,
        behaviour_logprobs=[-0.5 * m for m in mask],
        advantages=[0.1 * m for m in mask],  # the stored advantage: not what is reported
        reward=1.0,
        tool_calls=1,
        group_id=0,
        step=1,
        weight_version=1,
        prompt_length=2,
        task_id=name,
        success=success,
        replay_advantages=[a_hat * m for m in mask],
    )


def test_replay_batch_stats_of_the_rows_replay_batch_returned():
    rows = [
        replayed_entry("a", 1.5, True, tokens=4),
        replayed_entry("b", 0.5, False),
        replayed_entry("c", 1.0, None),
    ]
    stats = replay_batch_stats(rows)
    assert stats == {"rows": 3, "success_frac": 0.5, "mean_advantage": pytest.approx(1.0)}
    assert replay_batch_stats([]) == {}
    plain = replayed_entry("d", 1.0, True)
    plain.replay_advantages = None
    with pytest.raises(ValueError, match="replay_batch"):
        replay_batch_stats([plain])


# ----------------------------------------------------------------------------- metrics row


def test_a_step_with_a_replay_logs_the_four_keys_and_a_step_without_none():
    learner = {name: 0.5 for name in METRIC_REDUCTIONS}
    on_policy = {k: v for k, v in learner.items() if k not in REPLAY_ONLY_METRICS}
    rows = [replayed_entry("a", 2.0, True), replayed_entry("b", 1.0, None)]
    with_replay = step_metrics(
        StepRecord(
            step=3,
            trajectories=[],
            on_policy=on_policy,
            replay={**learner, "logp_change": 0.03},
            replay_rows=2,
            replayed=replay_batch_stats(rows),
        )
    )
    assert set(with_replay) >= REPLAY_KEYS
    assert with_replay["replay/rows"] == 2 == with_replay["spear/replay_rows"]
    assert with_replay["replay/success_frac"] == 1.0  # the unknown row is left out
    assert with_replay["replay/mean_advantage"] == pytest.approx(1.5)
    assert with_replay["replay/logp_change"] == 0.03
    assert "update/logp_change" not in with_replay
    unknown = step_metrics(
        StepRecord(step=3, trajectories=[], replayed=replay_batch_stats(rows[1:]))
    )
    assert unknown["replay/success_frac"] is None  # NaN: null in metrics.jsonl
    without = step_metrics(StepRecord(step=4, trajectories=[], on_policy=on_policy))
    assert not REPLAY_KEYS & set(without)


# ----------------------------------------------------------------------------- learner rank

VOCAB = 23


class _TorchEngine:
    """What LearnerRank uses of a DeepSpeed engine (ZeRO 0, fp32, one process), in plain torch."""

    def __init__(self, model: torch.nn.Module):
        self.module = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr set per step

    def __call__(self, *, input_ids, attention_mask, use_cache=False):
        return self.module(input_ids=input_ids, attention_mask=attention_mask)

    def set_gradient_accumulation_boundary(self, boundary: bool) -> None:
        pass

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad()

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()


def learner_rank(ppo_epochs: int) -> LearnerRank:
    from spear_ray.models.tiny import ModelSize, random_llama

    config = SpearConfig.model_validate(
        {
            "env": {"name": "frozenlake"},
            "rollout": {
                "prompts_per_step": 4,
                "samples_per_prompt": 2,  # M = 8 rows per on-policy mini-batch
                "max_prompt_tokens": 8,
                "max_response_tokens": 16,
                "max_tokens_per_turn": 16,
            },
            "learner": {
                "zero_stage": 0,
                "lr": 1e-2,
                "lr_schedule": "constant",
                "ppo_epochs": ppo_epochs,
                "mini_batches_per_step": 1,
                "tokens_per_micro_batch": 40,  # 2-3 rows per micro-batch
            },
        }
    )
    rank = LearnerRank(learner_spec(config))
    size = ModelSize(16, 2, 2, 2, 32, max_position_embeddings=64)
    model = random_llama(size, VOCAB, seed=0, pad_token_id=0).to(torch.float64).eval()
    rank.engine = _TorchEngine(model)
    return rank


def replay_batch(rank: LearnerRank, sign: float) -> TrainBatch:
    """6 rows of 8-16 tokens, loss after a 4-token prompt, one advantage per row of the given
    sign; logp_old = the current policy's (as stored: what the on-policy update trained on)."""
    g = torch.Generator().manual_seed(3)
    lengths = [16, 9, 12, 8, 15, 11]
    rows, width = len(lengths), max(lengths)
    input_ids = torch.zeros(rows, width, dtype=torch.long)
    attention_mask = torch.zeros(rows, width, dtype=torch.long)
    loss_mask = torch.zeros(rows, width)
    for r, n in enumerate(lengths):
        input_ids[r, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        attention_mask[r, :n] = 1
        loss_mask[r, 4:n] = 1
    advantages = sign * (0.5 + torch.rand(rows, 1, generator=g)) * loss_mask
    batch = TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        old_logprobs=torch.zeros(rows, width),
        advantages=advantages,
        group_ids=torch.arange(rows),
        rewards=torch.zeros(rows),
    )
    batch.old_logprobs = rank.compute_logprobs(batch=batch) * loss_mask
    return batch


def expected_change(before: torch.Tensor, after: torch.Tensor, batch: TrainBatch) -> float:
    mask = batch.loss_mask.bool()
    return (after[mask].double() - before[mask].double()).mean().item()


@pytest.mark.parametrize(
    ("ppo_epochs", "mini_batch_sizes"),
    [
        (1, None),  # one epoch of one mini-batch: "before" is the update's own first forward
        (2, None),  # the second epoch runs on updated weights: an explicit pass before
        (1, [3, 3]),  # so does the second mini-batch
    ],
)
def test_a_replay_of_positive_advantage_rows_raises_their_log_prob(ppo_epochs, mini_batch_sizes):
    rank = learner_rank(ppo_epochs)
    batch = replay_batch(rank, sign=+1.0)
    before = rank.compute_logprobs(batch=batch)
    metrics = rank.update(
        batch=batch, step=1, phase="replay", loss_weight=1.0, mini_batch_sizes=mini_batch_sizes
    )
    after = rank.compute_logprobs(batch=batch)
    assert metrics["optimizer_steps"] == ppo_epochs * len(mini_batch_sizes or [1])
    assert metrics["logp_change"] > 1e-4  # the SIL loss with A_hat > 0 raised their log-prob
    assert metrics["logp_change"] == pytest.approx(
        expected_change(before, after, batch), rel=1e-6, abs=1e-9
    )
    # a retried call reports the same number and changes nothing
    again = rank.update(batch=batch, step=1, phase="replay", loss_weight=1.0)
    assert again["logp_change"] == metrics["logp_change"]


def test_negative_advantages_lower_the_log_prob_and_no_update_changes_nothing():
    rank = learner_rank(ppo_epochs=1)
    batch = replay_batch(rank, sign=-1.0)
    assert rank.update(batch=batch, step=1, phase="replay")["logp_change"] < -1e-4
    weights = [p.detach().clone() for p in rank.engine.module.parameters()]
    idle = rank.update(batch=batch, step=2, phase="replay", loss_weight=0.0)
    assert idle["logp_change"] == 0.0 and idle["optimizer_steps"] == 0
    assert all(
        torch.equal(a, b) for a, b in zip(weights, rank.engine.module.parameters(), strict=True)
    )
    on_policy = rank.update(batch=batch, step=2, phase="on_policy")
    assert on_policy["optimizer_steps"] == 1 and "logp_change" not in on_policy
