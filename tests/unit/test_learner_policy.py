"""The learner's per-micro-batch math (learners/policy.py): log-prob alignment against a direct
loop, micro-batch packing, rank sharding, and the property the whole learner rests on: summing
the micro-batch (and rank-shard) losses and gradients gives exactly the mini-batch ones."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from learners.policy import (
    micro_batch_loss,
    micro_batches,
    mini_batch_divisors,
    num_mini_batches,
    pack_micro_batches,
    rank_rows,
    split_sizes,
    token_entropy,
    token_logprobs,
    trim_padding,
)
from spear_ray.algo.losses import LOSS_AGGREGATIONS, loss_divisors
from spear_ray.config import load_config
from spear_ray.containers import TrainBatch
from spear_ray.models.tiny import ModelSize, random_llama
from spear_ray.recipe import Recipe

F64 = torch.float64
VOCAB = 23


def tiny_model(seed: int = 0):
    """A random float64 Llama, hidden 16 x 2 layers (tied embeddings)."""
    size = ModelSize(16, 2, 2, 2, 32, max_position_embeddings=64)
    return random_llama(size, VOCAB, seed, pad_token_id=0).to(F64).eval()


def make_batch(seed: int, lengths: list[int], width: int | None = None) -> TrainBatch:
    """Right-padded rows with a prompt of 2 tokens, loss on the rest (some rows fully masked),
    per-row advantages and behaviour log-probs that differ from the model's (so clipping acts)."""
    g = torch.Generator().manual_seed(seed)
    rows, width = len(lengths), width or max(lengths) + 2
    input_ids = torch.zeros(rows, width, dtype=torch.long)
    attention_mask = torch.zeros(rows, width, dtype=torch.long)
    loss_mask = torch.zeros(rows, width)
    for r, n in enumerate(lengths):
        input_ids[r, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        attention_mask[r, :n] = 1
        loss_mask[r, 2:n] = (torch.rand(n - 2, generator=g) < 0.8).float()
    loss_mask[-1] = 0  # a filtered row: in the batch, carries no loss
    adv = torch.randn(rows, 1, generator=g).expand(rows, width) * loss_mask
    old = (-3 * torch.rand(rows, width, generator=g) - 0.1) * loss_mask
    return TrainBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        loss_mask=loss_mask,
        old_logprobs=old.to(F64),
        advantages=adv.to(F64),
        group_ids=torch.arange(rows),
        rewards=torch.zeros(rows),
    )


# ----------------------------------------------------------------------------- log-probs


def test_token_logprobs_and_entropy_match_a_direct_loop():
    model = tiny_model()
    batch = make_batch(0, [5, 9, 3, 7])
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = token_logprobs(logits, batch.input_ids)
    entropy = token_entropy(logits)
    assert logp.shape == entropy.shape == batch.input_ids.shape
    for b in range(batch.rows):
        assert logp[b, 0] == 0 and entropy[b, 0] == 0
        for i in range(1, batch.input_ids.shape[1]):
            probs = torch.softmax(logits[b, i - 1], dim=-1)
            expected = math.log(probs[batch.input_ids[b, i]].item())
            assert logp[b, i].item() == pytest.approx(expected, abs=1e-10)
            h = -sum(p * math.log(p) for p in probs.tolist())
            assert entropy[b, i].item() == pytest.approx(h, abs=1e-10)


def test_token_logprobs_of_real_tokens_ignore_padding():
    model = tiny_model()
    batch = make_batch(1, [6, 4])
    wide = make_batch(1, [6, 4], width=15)  # same rows, more padding columns
    with torch.no_grad():
        a = token_logprobs(model(input_ids=batch.input_ids).logits, batch.input_ids)
        b = token_logprobs(model(input_ids=wide.input_ids).logits, wide.input_ids)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(a[real], b[:, : a.shape[1]][real])


# ----------------------------------------------------------------------------- batching


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30),
    extra=st.integers(0, 60),
)
def test_packing_respects_the_budget_and_covers_every_row_once(lengths, extra):
    budget = max(lengths) + extra
    groups = pack_micro_batches(lengths, budget)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        assert group
        assert len(group) * max(lengths[i] for i in group) <= budget  # padded size
    # greedy over rows sorted longest first: the next row never fit into the previous group
    for prev in groups[:-1]:
        assert (len(prev) + 1) * max(lengths[i] for i in prev) > budget


def test_packing_rejects_a_row_over_the_budget():
    with pytest.raises(ValueError, match="tokens_per_micro_batch"):
        pack_micro_batches([3, 12, 4], 10)


def test_micro_batches_are_trimmed_to_their_longest_row():
    batch = make_batch(2, [3, 9, 4, 8], width=20)
    pieces = micro_batches(batch, 18)
    assert sum(p.rows for p in pieces) == batch.rows
    for piece in pieces:
        assert piece.input_ids.shape[1] == int(piece.attention_mask.sum(-1).max())
        assert piece.rows * piece.input_ids.shape[1] <= 18
    assert trim_padding(batch).input_ids.shape[1] == 9


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(0, 50), ranks=st.integers(1, 4), minis=st.integers(1, 5))
def test_rank_rows_split_every_global_mini_batch_across_ranks(rows, ranks, minis):
    global_minis = []
    start = 0
    for size in split_sizes(rows, minis):
        global_minis.append(set(range(start, start + size)))
        start += size
    seen = []
    for r in range(ranks):
        mine, sizes = rank_rows(rows, num_ranks=ranks, mini_batches=minis, rank=r)
        assert sum(sizes) == len(mine) and len(sizes) == minis
        seen.extend(mine)
        offset = 0
        for m, size in enumerate(sizes):  # local mini-batch m lies inside global mini-batch m
            assert set(mine[offset : offset + size]) <= global_minis[m]
            offset += size
        if rows % (ranks * minis) == 0:
            assert sizes == [rows // (ranks * minis)] * minis
    assert sorted(seen) == list(range(rows))


# ----------------------------------------------------------------------------- the loss


def _settings(aggregation: str, cov_mode: str = "none", entropy_coef: float = 0.01):
    config = load_config(
        None,
        [
            f"algo.policy_loss.aggregation={aggregation}",
            f"algo.policy_loss.entropy_coef={entropy_coef}",
            f"algo.policy_loss.on_policy_cov.mode={cov_mode}",
        ],
    )
    return dataclasses.replace(Recipe.from_config(config).on_policy_loss, norm_length=32)


def _loss_and_grads(model, pieces, settings, divisors, scale=1.0):
    model.zero_grad()
    total = 0.0
    for piece in pieces:
        logits = model(input_ids=piece.input_ids, attention_mask=piece.attention_mask).logits
        out = micro_batch_loss(logits, piece, settings, divisors)
        (out.loss * scale).backward()
        total += out.loss.item()
    grads = [p.grad.clone() for p in model.parameters()]
    return total, grads


@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
def test_micro_batched_loss_and_gradient_equal_the_whole_mini_batch(aggregation):
    model = tiny_model()
    batch = make_batch(3, [5, 11, 3, 8, 6, 10, 4, 7])
    settings = _settings(aggregation)
    divisors = loss_divisors(batch.loss_mask)
    whole_loss, whole_grads = _loss_and_grads(model, [batch], settings, divisors)
    pieces = micro_batches(batch, 16)
    assert len(pieces) > 2
    micro_loss, micro_grads = _loss_and_grads(model, pieces, settings, divisors)
    assert micro_loss == pytest.approx(whole_loss, rel=1e-12, abs=1e-14)
    for a, b in zip(micro_grads, whole_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
def test_rank_shards_with_global_divisors_sum_to_the_mini_batch(aggregation):
    """What DeepSpeed does across 2 ranks: each rank's micro-batches, loss x world size, then
    the mean of the ranks' gradients."""
    model = tiny_model()
    batch = make_batch(4, [5, 11, 3, 8, 6, 10, 4, 7])
    settings = _settings(aggregation)
    divisors = loss_divisors(batch.loss_mask)
    whole_loss, whole_grads = _loss_and_grads(model, [batch], settings, divisors)
    world = 2
    loss_sum, grad_sum = 0.0, [torch.zeros_like(g) for g in whole_grads]
    for r in range(world):
        rows, _ = rank_rows(batch.rows, num_ranks=world, mini_batches=1, rank=r)
        pieces = micro_batches(batch.select(rows), 20)
        loss, grads = _loss_and_grads(model, pieces, settings, divisors, scale=world)
        loss_sum += loss
        grad_sum = [s + g / world for s, g in zip(grad_sum, grads, strict=True)]
    assert loss_sum == pytest.approx(whole_loss, rel=1e-12, abs=1e-14)
    for a, b in zip(grad_sum, whole_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-13)


def test_micro_batch_loss_matches_the_algo_functions_and_reports_token_sums():
    from spear_ray.algo.losses import aggregate_loss, compute_policy_loss, entropy_loss

    model = tiny_model()
    batch = make_batch(5, [6, 9, 4])
    settings = _settings("token-mean", entropy_coef=0.05)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids).logits
        out = micro_batch_loss(logits, batch, settings, loss_divisors(batch.loss_mask))
        logp = token_logprobs(logits, batch.input_ids)
        mask = batch.loss_mask.bool()
        ref = compute_policy_loss(
            "none", logp, batch.old_logprobs, batch.advantages, mask, **settings.loss_kwargs()
        )
        pg = aggregate_loss(ref.per_token_loss, mask, "token-mean")
        ent = entropy_loss(token_entropy(logits), mask, "token-mean", coef=0.05)
    assert out.loss.item() == pytest.approx((pg + ent).item(), rel=1e-12)
    assert out.pg_loss == pytest.approx(pg.item(), rel=1e-12)
    assert out.sums["tokens"] == batch.num_loss_tokens
    assert out.sums["clipped"] == ref.clipped.sum().item() > 0
    assert out.sums["entropy"] / out.sums["tokens"] == pytest.approx(
        (token_entropy(logits)[mask]).mean().item(), rel=1e-12
    )


def test_recipe_gives_each_phase_its_cov_constants():
    recipe = Recipe.from_config(load_config(None))
    on, replay = recipe.on_policy_loss, recipe.replay_loss
    assert on.cov_ratio == 0.0002 and (on.cov_lb, on.cov_ub) == (1.0, 5.0)
    assert replay.cov_ratio == 0.02 and (replay.cov_lb, replay.cov_ub) == (2.0, 60.0)
    assert on.norm_length == 8192 and on.aggregation == "seq-mean-token-sum-norm"
    assert recipe.learner.loss("replay") is replay
    with pytest.raises(ValueError, match="phase"):
        recipe.learner.loss("offline")


# ----------------------------------------------------------------------------- replay weight


@pytest.mark.parametrize("aggregation", LOSS_AGGREGATIONS)
def test_a_replayed_row_weighs_what_an_on_policy_row_weighs(aggregation):
    """The replay update divides by the on-policy mini-batch size M, not by its own rows: the
    gradient of 2 replayed rows in a 2-row replay mini-batch equals their share of an 8-row
    on-policy mini-batch (the reference scales replay micro-batches by the on-policy gradient
    accumulation count). Before, a replay of 2 rows was normalised by 2 and weighed 4x."""
    model = tiny_model()
    lengths = [5, 11, 3, 8, 6, 10, 4, 7]
    batch = make_batch(6, lengths)
    settings = _settings(aggregation, entropy_coef=0.0)
    m = batch.rows  # the on-policy mini-batch size M

    def grads_of(rows):
        part = batch.select(rows)
        tokens = float(part.loss_mask.sum())
        divisors = mini_batch_divisors(float(part.rows), tokens, m)
        _, grads = _loss_and_grads(model, [part], settings, divisors)
        return grads

    if aggregation == "token-mean":
        # token-mean weighs tokens, not rows: the replay's tokens weigh as in an on-policy
        # mini-batch with the same tokens per row; compare with that mini-batch scaled by R/M
        whole = _loss_and_grads(
            model, [batch.select([0, 1])], settings, loss_divisors(batch.select([0, 1]).loss_mask)
        )[1]
        expected = [g * 2 / m for g in whole]
    else:
        rest = [2, 3, 4, 5, 6, 7]
        full = _loss_and_grads(model, [batch], settings, mini_batch_divisors(8.0, 1.0, m))[1]
        others = _loss_and_grads(
            model, [batch.select(rest)], settings, mini_batch_divisors(8.0, 1.0, m)
        )[1]
        expected = [f - o for f, o in zip(full, others, strict=True)]  # rows 0, 1's share
    for a, b in zip(grads_of([0, 1]), expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_replay_batches_are_cut_into_on_policy_sized_mini_batches():
    assert num_mini_batches(32, 8) == 4  # the on-policy batch: mini_batches_per_step
    assert num_mini_batches(4, 8) == 1  # a small replay: one step, scaled by 4 / 8
    assert num_mini_batches(20, 8) == 3
    assert num_mini_batches(0, 8) == 1


# ----------------------------------------------------------------------------- temperature


@pytest.mark.parametrize("temperature", [0.5, 1.0])
def test_log_probs_are_those_of_the_tempered_distribution(temperature):
    model = tiny_model()
    batch = make_batch(7, [6, 9])
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids).logits
    logp = token_logprobs(logits, batch.input_ids, temperature)
    for b in range(batch.rows):
        for i in range(1, int(batch.attention_mask[b].sum())):
            expected = torch.log_softmax(logits[b, i - 1] / temperature, -1)[batch.input_ids[b, i]]
            assert logp[b, i].item() == pytest.approx(expected.item(), abs=1e-12)
    entropy = token_entropy(logits, temperature)
    p = torch.softmax(logits[0, 2] / temperature, -1)
    assert entropy[0, 3].item() == pytest.approx(-(p * p.log()).sum().item(), abs=1e-10)


# ----------------------------------------------------------------------------- logp_old


def test_the_updates_own_log_probs_are_the_recomputed_logp_old():
    """With one epoch of one mini-batch the recompute before the update gives exactly the
    update's own detached log-probs, so the learner may skip it (Recipe.logp_old "update")."""
    model = tiny_model()
    batch = make_batch(8, [6, 9, 5])
    settings = _settings("seq-mean-token-sum-norm", cov_mode="clip-cov")
    divisors = loss_divisors(batch.loss_mask)
    logits = model(input_ids=batch.input_ids).logits
    recomputed = dataclasses.replace(
        batch,
        old_logprobs=token_logprobs(logits.detach(), batch.input_ids, settings.temperature)
        * batch.loss_mask,
    )
    gen = torch.Generator().manual_seed(0)
    a = micro_batch_loss(logits, recomputed, settings, divisors, generator=gen)
    gen = torch.Generator().manual_seed(0)
    b = micro_batch_loss(logits, batch, settings, divisors, generator=gen, own_logp_old=True)
    assert a.loss.item() == b.loss.item() and a.sums == b.sums
    assert b.sums["approx_kl"] == 0.0  # ratio 1 everywhere


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["learner.mini_batches_per_step=1", "algo.sil.enabled=false"], "update"),
        (["learner.mini_batches_per_step=4", "algo.sil.enabled=false"], "recompute"),
        (
            ["learner.mini_batches_per_step=1", "learner.ppo_epochs=2", "algo.sil.enabled=false"],
            "recompute",
        ),
        (["learner.mini_batches_per_step=1"], "recompute"),  # the buffer stores them
        (["learner.mini_batches_per_step=1", "learner.logp_old=behaviour"], "behaviour"),
    ],
)
def test_the_recompute_is_skipped_only_where_it_provably_equals_the_updates(overrides, expected):
    assert Recipe.from_config(load_config(None, overrides)).logp_old == expected
