"""Dr.BoT filters against naive references."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_ray.algo import filters
from spear_ray.algo.filters import (
    DrBoTChecks,
    drbot_reasons,
    group_filter_keep,
    has_repeated_ngram,
    is_unreadable,
    num_groups_kept,
)

SETTINGS = settings(max_examples=150, deadline=None)


def naive_repeated(ids, n, max_repeats):
    counts = Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))
    return any(c >= max_repeats for c in counts.values())


def test_drbot_reasons_checks_each_filter_it_is_asked_to():
    checks = DrBoTChecks(ngram=2, max_repeats=10)
    clean = list(range(40))
    assert drbot_reasons(clean, "fine", void=False, overlong=False, checks=checks) == []
    assert drbot_reasons(clean, "fine", void=True, overlong=True, checks=checks) == [
        "void_turn",
        "overlong",
    ]
    assert drbot_reasons([1, 2] * 20, "ok", void=False, overlong=False, checks=checks) == [
        "repetitive"
    ]
    assert drbot_reasons(clean, "bad \ufffd", void=False, overlong=False, checks=checks) == [
        "unreadable"
    ]
    off = DrBoTChecks(void=False, overlong=False, repetition=False, unreadable=False)
    assert drbot_reasons([7] * 40, "\ufffd", void=True, overlong=True, checks=off) == []


@SETTINGS
@given(
    ids=st.lists(st.integers(0, 3), max_size=80),
    n=st.integers(1, 5),
    max_repeats=st.integers(1, 6),
)
def test_repeated_ngram_matches_naive_count(ids, n, max_repeats):
    assert has_repeated_ngram(ids, n, max_repeats) == naive_repeated(ids, n, max_repeats)


def test_repeated_ngram_default_thresholds():
    motif = list(range(100, 120))  # one 20-gram
    filler = list(range(1000, 1400))
    assert has_repeated_ngram(filler[:200] + motif * 10 + filler[200:])
    assert not has_repeated_ngram(filler[:200] + motif * 9 + filler[200:])
    # A run of 29 equal tokens holds the same 20-gram at 10 overlapping positions.
    assert has_repeated_ngram([7] * 29) and not has_repeated_ngram([7] * 28)
    assert not has_repeated_ngram([])
    # tensors and arrays are accepted, large ids too
    big = np.array([151_000, 151_001] * 40)
    assert has_repeated_ngram(torch.from_numpy(big), n=4, max_repeats=10)
    assert has_repeated_ngram(big, n=4, max_repeats=10)
    with pytest.raises(ValueError):
        has_repeated_ngram([1, 2], n=0)


def test_hash_collisions_cannot_cause_a_false_positive(monkeypatch):
    # Force every window to the same hash: the exact confirmation must still decide correctly.
    monkeypatch.setattr(
        filters, "_window_hashes", lambda ids, n: np.zeros(len(ids) - n + 1, np.uint64)
    )
    rng = np.random.default_rng(0)
    for _ in range(30):
        ids = rng.integers(0, 4, size=int(rng.integers(0, 60))).tolist()
        assert has_repeated_ngram(ids, 3, 4) == naive_repeated(ids, 3, 4)


@pytest.mark.parametrize(
    ("text", "bad"),
    [
        ("The answer is 42.", False),
        ("café naïve Grüße, señor — “quoted” «guillemets» ¿qué?", False),
        ("数学题的答案是 42。😀", False),
        ("25°C and 3½ cups", False),
        ("broken \ufffd byte", True),
        ("cafÃ©", True),  # "café" UTF-8 read as Latin-1
        ("itâ€™s", True),  # "it’s" UTF-8 read as cp1252
        ("Â°C", True),
    ],
)
def test_unreadable_rule(text, bad):
    assert is_unreadable(text) == bad


def test_unreadable_catches_real_mojibake_round_trips():
    for word in ["café", "naïve", "Grüße", "it’s", "–", "日本"]:
        assert not is_unreadable(word)
        assert is_unreadable(word.encode("utf-8").decode("latin-1")), word


def test_num_groups_kept_rounding():
    assert num_groups_kept(8, 0.75) == 6
    assert num_groups_kept(10, 0.75) == 7  # floor(7.5)
    assert num_groups_kept(100, 0.29) == 29  # 0.29 * 100 = 28.999999999999996 in floats
    assert num_groups_kept(3, 0.1) == 1  # never nothing
    assert num_groups_kept(5, 1.0) == 5
    assert num_groups_kept(0, 0.75) == 0
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            num_groups_kept(4, bad)


def ref_group_filter(rewards, groups, valid, ratio):
    stds = {}
    for g in sorted(set(groups)):
        xs = [r for r, gg, v in zip(rewards, groups, valid, strict=True) if gg == g and v]
        if len(xs) < 2:
            stds[g] = 0.0
        else:
            m = sum(xs) / len(xs)
            stds[g] = math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))  # np.std
    ranked = sorted(stds, key=lambda g: (-stds[g], g))  # ties: smaller id first
    n_keep = min(len(ranked), max(1, math.floor(ratio * len(ranked) + 1e-9)))
    kept = set(ranked[:n_keep])
    return [g in kept for g in groups]


@SETTINGS
@given(
    data=st.lists(
        st.tuples(st.integers(0, 7), st.sampled_from([0.0, 1.0, 0.5, -1.0]), st.booleans()),
        min_size=1,
        max_size=40,
    ),
    ratio=st.sampled_from([0.25, 0.5, 0.75, 1.0]),
)
def test_group_filter_matches_reference(data, ratio):
    groups, rewards, valid = (list(x) for x in zip(*data, strict=True))
    got = group_filter_keep(
        torch.tensor(rewards, dtype=torch.float64),
        torch.tensor(groups),
        torch.tensor(valid),
        keep_ratio=ratio,
    )
    assert got.tolist() == ref_group_filter(rewards, groups, valid, ratio)
    kept_groups = {g for g, k in zip(groups, got.tolist(), strict=True) if k}
    assert len(kept_groups) == num_groups_kept(len(set(groups)), ratio)


def test_group_filter_ignores_invalid_members_and_keeps_whole_groups():
    rewards = torch.tensor([0.0, 1.0, 0.0, 0.0, 1000.0, 0.2, 0.3])
    groups = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    valid = torch.tensor([True, True, True, True, False, True, True])
    keep = group_filter_keep(rewards, groups, valid, keep_ratio=0.5)  # 1 of 3 groups
    assert keep.tolist() == [True, True, False, False, False, False, False]
    assert group_filter_keep(torch.zeros(0), torch.zeros(0, dtype=torch.long)).numel() == 0


def test_group_filter_breaks_std_ties_by_ascending_group_id():
    rewards = torch.zeros(8)  # every group has std 0
    groups = torch.tensor([30, 30, 10, 10, 20, 20, 40, 40])
    keep = group_filter_keep(rewards, groups, keep_ratio=0.5)
    assert keep.tolist() == [False, False, True, True, True, True, False, False]


def test_group_filter_ranks_by_population_std_as_the_reference():
    # Group 0 has 2 members, group 1 has 4. Population stds (np.std, the reference's rank):
    # 0.9 vs 1.0, so group 1 is kept; the unbiased stds (1.27 vs 1.15) would keep group 0.
    rewards = torch.tensor([0.0, 1.8, 0.0, 0.0, 2.0, 2.0])
    groups = torch.tensor([0, 0, 1, 1, 1, 1])
    assert np.std([0.0, 1.8]) < np.std([0.0, 0.0, 2.0, 2.0])
    keep = group_filter_keep(rewards, groups, keep_ratio=0.5)
    assert keep.tolist() == [False, False, True, True, True, True]
