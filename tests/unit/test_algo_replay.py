"""Replay-buffer math: admission, staleness, baseline, trigger, recalibration, sampling."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_ray.algo.replay import (
    RECALIBRATIONS,
    admission_keep,
    baseline_advantages,
    group_reward_stats,
    nonnegative_keep,
    num_above_baseline,
    percentile50,
    recalibrate_advantages,
    replay_subset_size,
    replay_triggered,
    sample_subset,
    stale_keep,
    weighted_advantages,
)

SETTINGS = settings(max_examples=80, deadline=None)
F64 = torch.float64


def ref_row_means(token_adv, mask):
    out = []
    for i in range(mask.shape[0]):
        vals = [token_adv[i, j].item() for j in range(mask.shape[1]) if mask[i, j]]
        out.append(sum(vals) / len(vals) if vals else None)
    return out


@SETTINGS
@given(seed=st.integers(0, 10_000), require=st.booleans())
def test_admission_matches_reference(seed, require):
    g = torch.Generator().manual_seed(seed)
    token_adv = torch.randn(6, 5, generator=g, dtype=F64)
    mask = torch.rand(6, 5, generator=g) < 0.6
    calls = torch.randint(0, 3, (6,), generator=g)
    got = admission_keep(token_adv, mask, calls, require_tool_call=require)
    want = [
        m is not None and m > 0 and (not require or calls[i].item() >= 1)
        for i, m in enumerate(ref_row_means(token_adv, mask))
    ]
    assert got.tolist() == want


def test_admission_edge_cases():
    token_adv = torch.tensor([[1.0, -1.0, 5.0], [0.0, 0.0, 0.0], [9.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 0, 0]])
    # row 0: mean 0 -> not admitted (strict); row 2: empty mask -> never admitted
    assert admission_keep(token_adv, mask).tolist() == [False, False, False]
    mask[0, 2] = 1
    assert admission_keep(token_adv, mask).tolist() == [True, False, False]
    with pytest.raises(ValueError):
        admission_keep(token_adv, mask, require_tool_call=True)


def test_staleness_boundary_is_inclusive():
    collected = torch.tensor([10, 14, 15, 16, 20])
    # age = 20 - step: 10, 6, 5, 4, 0 ; tolerate 5 keeps ages <= 5
    assert stale_keep(collected, 20, 5).tolist() == [False, False, True, True, True]
    assert stale_keep([20], 20, 0).tolist() == [True]
    assert stale_keep([19], 20, 0).tolist() == [False]
    with pytest.raises(ValueError):
        stale_keep([1], 2, -1)


def test_group_reward_stats_matches_reference():
    rewards = torch.tensor([1.0, 0.0, 0.0, 4.0, 2.0, 7.0, 3.0], dtype=F64)
    groups = torch.tensor([5, 5, 5, 2, 2, 9, 9])
    valid = torch.tensor([True, True, True, True, True, False, True])
    means, stds = group_reward_stats(rewards, groups, valid)
    # groups in id order 2, 5, 9 ; group 9 has one valid member -> std 0
    torch.testing.assert_close(means, torch.tensor([3.0, 1 / 3, 3.0], dtype=F64))
    # population std (np.std), as the reference's baseline history stores
    torch.testing.assert_close(
        stds, torch.tensor([np.std([4.0, 2.0]), np.std([1.0, 0.0, 0.0]), 0.0], dtype=F64)
    )
    assert stds[0].item() == pytest.approx(1.0) and not math.isclose(stds[0].item(), 2**0.5)
    all_bad = torch.tensor([False] * 7)
    assert group_reward_stats(rewards, groups, all_bad)[0].numel() == 0


@SETTINGS
@given(values=st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=50))
def test_percentile50_is_linear_interpolation(values):
    got = percentile50(values)
    assert got == pytest.approx(float(np.percentile(values, 50)))
    q = torch.quantile(torch.tensor(values, dtype=F64), 0.5).item()
    assert got == pytest.approx(q)
    s = sorted(values)
    n = len(s)
    want = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
    assert got == pytest.approx(want)


def test_percentile50_inputs_and_empty():
    assert percentile50(torch.tensor([1.0, 2.0, 3.0, 10.0])) == 2.5
    assert percentile50(np.array([4.0])) == 4.0
    with pytest.raises(ValueError):
        percentile50([])


def test_trigger_counts_strictly_above_the_median_and_strictly_more_than_the_threshold():
    hist = [0.0, 0.5, 1.0]  # P50 = 0.5
    stored = [0.5, 0.6, 0.7, 0.8, 1.0, 0.2]  # 4 strictly above 0.5
    assert num_above_baseline(stored, hist) == 4
    assert replay_triggered(stored, hist, buffer_size=2, trigger_factor=1.5)  # 4 > 3
    assert not replay_triggered(stored, hist, buffer_size=2, trigger_factor=2.0)  # 4 > 4 no
    assert not replay_triggered(stored, [], buffer_size=1)  # no baseline yet
    assert num_above_baseline([], hist) == 0


def test_baseline_recalibration_values():
    rewards = torch.tensor([1.0, 0.2, 0.5], dtype=F64)
    means, stds = [0.0, 0.5, 1.0], [0.1, 0.2, 0.3, 0.4]  # P50 0.5 and 0.25
    torch.testing.assert_close(
        baseline_advantages(rewards, means), torch.tensor([0.5, -0.3, 0.0], dtype=F64)
    )
    got = baseline_advantages(rewards, means, stds, norm_by_std=True, epsilon=1e-6)
    torch.testing.assert_close(got, torch.tensor([0.5, -0.3, 0.0], dtype=F64) / (0.25 + 1e-6))
    with pytest.raises(ValueError):
        baseline_advantages(rewards, means, norm_by_std=True)


def test_std_recalibration_with_a_zero_p50_std_stays_bounded():
    # Sparse binary rewards: most groups are all-fail, so P50 of the group stds is 0. Dividing
    # by 0 + 1e-6 made a reward gap of 1 an advantage of 1e6; the guard leaves it unscaled.
    rewards = torch.tensor([1.0, 0.0], dtype=F64)
    means, stds = [0.0, 0.0, 0.0, 0.5], [0.0, 0.0, 0.0, 0.5]
    got = baseline_advantages(rewards, means, stds, norm_by_std=True, epsilon=1e-6)
    torch.testing.assert_close(got, torch.tensor([1.0, 0.0], dtype=F64))
    assert got.abs().max() <= 1.0


def test_weight_recalibration():
    stored = torch.tensor([[0.4, 0.4, 0.0]])
    torch.testing.assert_close(weighted_advantages(stored, weight=0.5), stored * 0.5)
    for bad in (0.0, 1.5, -0.2):
        with pytest.raises(ValueError):
            weighted_advantages(stored, weight=bad)


def test_recalibrate_dispatch_returns_masked_token_advantages():
    assert set(RECALIBRATIONS) == {"baseline", "weight"}
    rewards = torch.tensor([1.0, 0.0], dtype=F64)
    stored = torch.tensor([[0.3, 0.3, 0.3], [0.2, 0.2, 0.2]], dtype=F64)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    base = recalibrate_advantages(
        "baseline", rewards=rewards, stored_advantages=stored, mask=mask, hist_group_means=[0.5]
    )
    torch.testing.assert_close(base, torch.tensor([[0.5, 0.5, 0], [0, -0.5, -0.5]], dtype=F64))
    wgt = recalibrate_advantages(
        "weight", rewards=rewards, stored_advantages=stored, mask=mask,
        hist_group_means=[0.5], weight=0.5,
    )  # fmt: skip
    torch.testing.assert_close(wgt, torch.tensor([[0.15, 0.15, 0], [0, 0.1, 0.1]], dtype=F64))
    with pytest.raises(ValueError, match="unknown recalibration mode"):
        recalibrate_advantages(
            "decay", rewards=rewards, stored_advantages=stored, mask=mask, hist_group_means=[0.0]
        )


@SETTINGS
@given(
    rewards=st.lists(st.sampled_from([-1.0, 0.0, 0.25, 0.5, 1.0]), min_size=1, max_size=30),
    hist=st.lists(st.sampled_from([-0.5, 0.0, 0.25, 0.5, 0.75]), min_size=1, max_size=30),
    strict=st.booleans(),
    norm=st.booleans(),
)
def test_recalibrated_advantages_are_nonnegative_after_the_filter(rewards, hist, strict, norm):
    r = torch.tensor(rewards, dtype=F64)
    mask = torch.ones(len(rewards), 4, dtype=torch.bool)
    mask[0, 1:] = False
    adv = recalibrate_advantages(
        "baseline", rewards=r, stored_advantages=torch.zeros_like(mask, dtype=F64),
        mask=mask, hist_group_means=hist, hist_group_stds=[0.3], norm_by_std=norm,
    )  # fmt: skip
    keep = nonnegative_keep(adv, mask, strict=strict)
    kept = adv[keep]
    assert (kept >= 0).all()
    if strict:
        assert (kept[mask[keep]] > 0).all()
    # exactly the rewards at or above (strictly above) the P50 baseline survive
    p50 = percentile50(hist)
    want = [(x > p50) if strict else (x >= p50) for x in rewards]
    assert keep.tolist() == want


def test_nonnegative_keep_drops_empty_rows():
    adv = torch.zeros(2, 3)
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    assert nonnegative_keep(adv, mask).tolist() == [True, False]
    assert nonnegative_keep(adv, mask, strict=True).tolist() == [False, False]


@SETTINGS
@given(n=st.integers(0, 100_000), buffer_size=st.integers(1, 5000))
def test_replay_subset_size_is_a_power_of_two_bounded_by_both(n, buffer_size):
    size = replay_subset_size(n, buffer_size)
    if n == 0:
        assert size == 0
        return
    p = 1
    while 2 * p <= n:
        p *= 2
    assert size == min(p, buffer_size)
    assert size <= n and size <= buffer_size
    if buffer_size & (buffer_size - 1) == 0:  # power-of-two buffer: result is one too
        assert size & (size - 1) == 0
    assert 2 * size > n or size == buffer_size  # the largest such power


def test_replay_subset_size_examples():
    assert [replay_subset_size(n, 2048) for n in (0, 1, 2, 3, 1000, 1024, 2047, 5000)] == [
        0, 1, 2, 2, 512, 1024, 1024, 2048,
    ]  # fmt: skip
    with pytest.raises(ValueError):
        replay_subset_size(-1, 8)


def test_sample_subset_is_distinct_uniform_and_reproducible():
    idx = sample_subset(100, 64, torch.Generator().manual_seed(3))
    assert idx.numel() == 64 and len(set(idx.tolist())) == 64
    assert idx.min() >= 0 and idx.max() < 100
    assert torch.equal(idx, sample_subset(100, 64, torch.Generator().manual_seed(3)))
    assert not torch.equal(idx, sample_subset(100, 64, torch.Generator().manual_seed(4)))
    # uniform: each index is drawn with probability 1/2 over many draws
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(10)
    for _ in range(2000):
        hits[sample_subset(10, 5, g)] += 1
    assert ((hits / 2000 - 0.5).abs() < 0.05).all()
    assert sample_subset(5, 0).numel() == 0
    with pytest.raises(ValueError):
        sample_subset(3, 4)
