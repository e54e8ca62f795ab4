"""Curriculum schedules: end points, shapes, and the tool-call reward combinations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_ray.algo.curriculum import (
    SIL_WEIGHT_SCHEDULES,
    TOOL_REWARD_COMBINATIONS,
    TOOL_REWARD_SCHEDULES,
    cosine_decay,
    cosine_ramp,
    shaped_score,
    sil_weight,
    tool_call_reward,
)

SETTINGS = settings(max_examples=100, deadline=None)


def test_registry_keys():
    assert set(TOOL_REWARD_SCHEDULES) == {"cosine", "constant"}
    assert set(TOOL_REWARD_COMBINATIONS) == {"additive", "qwen3"}
    assert set(SIL_WEIGHT_SCHEDULES) == {"cosine", "constant"}


@pytest.mark.parametrize("total", [1, 7, 200])
def test_tool_reward_lambda_end_points(total):
    lam = TOOL_REWARD_SCHEDULES["cosine"]
    assert lam(0, total) == 1.0
    assert lam(total, total) == 0.0
    assert lam(total + 1, total) == 0.0 and lam(10 * total, total) == 0.0
    assert TOOL_REWARD_SCHEDULES["constant"](0, total) == 1.0
    assert TOOL_REWARD_SCHEDULES["constant"](10 * total, total) == 1.0


@pytest.mark.parametrize("total", [1, 7, 300])
@pytest.mark.parametrize("coef", [1.0, 0.5])
def test_sil_weight_end_points(total, coef):
    assert sil_weight(0, total_steps=total, coef=coef) == 0.0
    assert sil_weight(total, total_steps=total, coef=coef) == coef
    assert sil_weight(total + 5, total_steps=total, coef=coef) == coef
    assert sil_weight(0, total_steps=total, coef=coef, schedule="constant") == coef


def test_zero_length_schedule_sits_at_its_end_value():
    assert cosine_decay(0, 0) == 0.0 and cosine_decay(3, 0) == 0.0
    assert cosine_ramp(0, 0, 0.7) == 0.7 and cosine_ramp(3, 0, 0.7) == 0.7


def test_negative_steps_raise_and_unknown_keys_raise():
    with pytest.raises(ValueError):
        cosine_decay(-1, 10)
    with pytest.raises(ValueError):
        cosine_ramp(1, -10)
    with pytest.raises(ValueError, match="unknown SIL weight schedule"):
        sil_weight(1, schedule="linear")
    with pytest.raises(ValueError, match="unknown tool-reward combination"):
        shaped_score(1.0, 2, 0, combination="mult")


@SETTINGS
@given(t=st.integers(0, 400), total=st.integers(1, 300))
def test_schedules_match_formulas_and_are_complementary(t, total):
    lam = cosine_decay(t, total)
    w = cosine_ramp(t, total, 1.0)
    if t <= total:
        assert lam == pytest.approx((math.cos(math.pi * t / total) + 1) / 2, abs=1e-12)
        assert w == pytest.approx((1 - math.cos(math.pi * t / total)) / 2, abs=1e-12)
    assert lam + w == pytest.approx(1.0)  # one fades out exactly as the other fades in
    assert 0.0 <= lam <= 1.0
    if t + 1 <= 400:
        assert cosine_decay(t + 1, total) <= lam and cosine_ramp(t + 1, total, 1.0) >= w


def test_midpoint():
    assert cosine_decay(100, 200) == pytest.approx(0.5)
    assert sil_weight(150, total_steps=300, coef=2.0) == pytest.approx(1.0)


def test_tool_call_reward_cap_floats_and_tensors():
    assert tool_call_reward(0) == 0.0
    assert tool_call_reward(3) == pytest.approx(0.3)
    assert tool_call_reward(10) == pytest.approx(1.0)
    assert tool_call_reward(25) == 1.0
    got = tool_call_reward(torch.tensor([0, 3, 10, 25]))
    torch.testing.assert_close(got, torch.tensor([0.0, 0.3, 1.0, 1.0]))
    assert tool_call_reward(4, per_call=0.5, cap=1.5) == 1.5


def ref_combine(task, r_tc, lam, mode):
    if mode == "additive" or task <= 0:
        return task + r_tc * lam
    return task + (1.0 if r_tc > 0 else 0.0) * lam


@pytest.mark.parametrize("mode", ["additive", "qwen3"])
def test_shaped_score_matches_reference_for_floats_and_tensors(mode):
    # An exhaustive grid: every branch (task <, =, > 0; no/some/capped calls; ramp on/off).
    for task in (-1.0, 0.0, 0.5, 1.0):
        for calls in (0, 1, 3, 10, 15):
            for t in (0, 1, 50, 199, 200, 250):
                want = ref_combine(task, min(1.0, 0.1 * calls), cosine_decay(t, 200), mode)
                got = shaped_score(task, calls, t, total_steps=200, combination=mode)
                assert got == pytest.approx(want)
                got = shaped_score(
                    torch.tensor([task], dtype=torch.float64),
                    torch.tensor([calls]),
                    t,
                    combination=mode,
                )
                assert got.item() == pytest.approx(want, abs=1e-6)  # int counts become float32


def test_qwen3_concrete_cases():
    combine = TOOL_REWARD_COMBINATIONS["qwen3"]
    assert combine(-1.0, 0.3, 0.5) == pytest.approx(-0.85)  # failed: graded bonus
    assert combine(1.0, 0.3, 0.5) == pytest.approx(1.5)  # solved: flat bonus
    assert combine(1.0, 0.0, 0.5) == 1.0  # solved without tools: nothing
    assert combine(0.0, 0.3, 0.5) == pytest.approx(0.15)  # a zero score counts as failed
    got = combine(torch.tensor([-1.0, 1.0, 1.0, 0.0]), torch.tensor([0.3, 0.3, 0.0, 0.3]), 0.5)
    torch.testing.assert_close(got, torch.tensor([-0.85, 1.5, 1.0, 0.15]))
    assert shaped_score(1.0, 5, 200, total_steps=200) == 1.0  # the bonus is gone at T
    assert shaped_score(1.0, 5, 999, schedule="constant") == pytest.approx(1.5)
