"""The replay buffer (docs/algorithm.md §3-§4, step order §8) against a slow reference written here
with plain lists and loops, plus its edge cases, idempotency and durable checkpoints."""

from __future__ import annotations

import dataclasses
import math
import os

import numpy as np
import pytest
import torch

import buffers.replay_buffer as rb
from buffers import (
    BufferCheckpointError,
    ReplayBuffer,
    ReplayEntry,
    StepOrderError,
    replay_train_batch,
)
from spear_ray.containers import RewardParts, Trajectory, build_train_batch
from spear_ray.recipe import ReplayRule

# --------------------------------------------------------------------- the slow reference


class RefBuffer:
    """docs/algorithm.md §3-§4 read literally: plain Python lists, numpy percentile, one loop per
    rule."""

    def __init__(self, cfg: ReplayRule, norm_by_std: bool, epsilon: float, seed: int):
        self.cfg, self.norm, self.eps = cfg, norm_by_std, epsilon
        self.rows: list[dict] = []
        self.means: list[float] = []
        self.stds: list[float] = []
        self.gen = torch.Generator().manual_seed(seed)  # the same uniform draw: randperm prefix
        self.triggers = 0
        self.replayed_total = 0
        self.evicted_total = 0

    def replay(self, min_rows: int):
        if not self.means:
            return None
        p50 = float(np.percentile(self.means, 50))
        above = 0
        for row in self.rows:
            if row["reward"] > p50:
                above += 1
        if not above > self.cfg.trigger_factor * self.cfg.size:
            return None
        self.triggers += 1
        survivors = []
        for row in self.rows:
            if self.cfg.recalibration == "baseline":
                a = row["reward"] - p50
                if self.norm:
                    a = a / (float(np.percentile(self.stds, 50)) + self.eps)
                adv = [a if m else 0.0 for m in row["mask"]]
            else:
                w = self.cfg.recalibration_weight
                adv = [
                    float(x) * w if m else 0.0 for x, m in zip(row["adv"], row["mask"], strict=True)
                ]
            on = [adv[i] for i in range(len(adv)) if row["mask"][i]]
            if not on:
                continue
            mean = sum(on) / len(on)
            if (mean > 0) if self.cfg.strict_positive else (mean >= 0):
                survivors.append((row, adv))
        n = len(survivors)
        k = 0
        if n > 0:
            k = 1
            while k * 2 <= n:
                k *= 2
            k = min(k, self.cfg.size)
        order = torch.randperm(n, generator=self.gen)[:k].tolist()
        self.rows = []
        if k < max(min_rows, 1):
            return None
        self.replayed_total += k
        return [survivors[i] for i in order]

    def end_step(self, step: int, candidates: list[dict], means, stds) -> int:
        kept = []
        for row in self.rows:
            if step - row["step"] <= self.cfg.tolerate_steps:
                kept.append(row)
            else:
                self.evicted_total += 1
        admitted = 0
        for row in candidates:
            on = [float(a) for a, m in zip(row["adv"], row["mask"], strict=True) if m]
            if not on or not sum(on) / len(on) > 0:
                continue
            if self.cfg.require_tool_call and row["tool_calls"] < 1:
                continue
            kept.append(row)
            admitted += 1
        self.rows = kept
        self.means = (self.means + list(means))[-self.cfg.history_length :]
        self.stds = (self.stds + list(stds))[-self.cfg.history_length :]
        return admitted


# ------------------------------------------------------------------------------ data


def make_entry(name, reward, adv, mask, *, step=1, tool_calls=1, group=0, prompt=1):
    n = len(adv)
    return ReplayEntry(
        token_ids=np.arange(n) + 10,
        loss_mask=mask,
        behaviour_logprobs=[-0.5 * m for m in mask],
        advantages=[a * m for a, m in zip(adv, mask, strict=True)],
        reward=reward,
        tool_calls=tool_calls,
        group_id=group,
        step=step,
        weight_version=step - 1,
        prompt_length=prompt,
        task_id=name,
    )


def positive(name, reward, *, step=1, tokens=3, tool_calls=1, group=0):
    """A row that passes admission (stored advantage 0.5 on every response token)."""
    mask = [0] + [1] * tokens
    return make_entry(
        name, reward, [0.5] * (tokens + 1), mask, step=step, tool_calls=tool_calls, group=group
    )


def scripted_step(rng: np.random.Generator, step: int, groups=3, per_group=4):
    """One step of scored rows: rewards with a tool bonus, GRPO advantages (per-token noise on
    some rows, GiGPO-like), empty masks for filtered rows. Returns (entries, means, stds)."""
    lam = max(0.0, 1.0 - step / 10)
    entries, means, stds = [], [], []
    for g in range(groups):
        calls = rng.integers(0, 3, size=per_group)
        task = rng.choice([-1.0, 0.0, 1.0], size=per_group, p=[0.4, 0.2, 0.4])
        rewards = [float(t + min(1.0, 0.1 * c) * lam) for t, c in zip(task, calls, strict=True)]
        mean = float(np.mean(rewards))
        means.append(mean)
        stds.append(float(np.std(rewards, ddof=1)))
        for k in range(per_group):
            n_prompt = int(rng.integers(1, 4))
            n_resp = int(rng.integers(1, 7))
            resp_mask = (rng.random(n_resp) < 0.8).astype(int).tolist()
            if rng.random() < 0.1:
                resp_mask = [0] * n_resp  # a Dr.BoT-filtered row
            mask = [0] * n_prompt + resp_mask
            base = rewards[k] - mean
            noise = rng.normal(0, 0.3, size=len(mask)) if rng.random() < 0.3 else 0.0
            adv = (np.full(len(mask), base) + noise).tolist()
            traj = Trajectory(
                task_id=f"s{step}g{g}k{k}",
                group_id=g,
                env_seed=0,
                prompt_length=n_prompt,
                token_ids=rng.integers(0, 1000, size=len(mask)).tolist(),
                loss_mask=mask,
                behaviour_logprobs=(-rng.random(len(mask)) * np.array(mask)).tolist(),
                rewards=RewardParts(task=float(task[k]), tool_bonus=rewards[k] - float(task[k])),
                tool_calls=int(calls[k]),
                success=bool(task[k] > 0),
                weight_version=step - 1,
            )
            entries.append(entry_of(traj, np.array(adv), step=step))
    return entries, means, stds


def as_ref_row(e: ReplayEntry) -> dict:
    return {
        "id": e.task_id,
        "reward": e.reward,
        "adv": e.advantages.tolist(),
        "mask": e.loss_mask.tolist(),
        "tool_calls": e.tool_calls,
        "step": e.step,
    }


def ids(entries):
    return [e.task_id for e in entries]


def assert_same_entries(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        for name in ("token_ids", "loss_mask", "behaviour_logprobs", "advantages"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and np.array_equal(x, y), name
        for name in ("reward", "tool_calls", "group_id", "step", "weight_version", "success"):
            assert getattr(a, name) == getattr(b, name), name
        assert (a.prompt_length, a.task_id) == (b.prompt_length, b.task_id)


def cfg(**kw) -> ReplayRule:
    base = dict(
        size=4,
        trigger_factor=1.5,
        tolerate_steps=2,
        history_length=7,
        recalibration="baseline",
        recalibration_weight=1.0,
        strict_positive=False,
        require_tool_call=False,
        norm_by_std=False,
        epsilon=1e-6,
    )
    base.update(kw)
    return ReplayRule(**base)


def entry_of(traj: Trajectory, advantages, *, step: int, trainable: bool = True) -> ReplayEntry:
    """A buffer row as the controller makes one: the trajectory's row of a TrainBatch."""
    per_token = not isinstance(advantages, (int, float))
    batch = build_train_batch([traj], [0.0 if per_token else advantages], 0, [trainable])
    if per_token:
        values = torch.as_tensor(np.asarray(advantages), dtype=torch.float32)
        if values.numel() != len(traj.token_ids):
            raise ValueError(f"{values.numel()} per-token advantages for {len(traj.token_ids)}")
        batch.advantages[0] = values * batch.loss_mask[0]
    return ReplayEntry.from_batch_row(traj, batch, 0, step=step)


# ---------------------------------------------------------------- scripted sequence vs reference

VARIANTS = [
    dict(mode="baseline", norm=False, strict=False, require=False, min_rows=1),
    dict(mode="baseline", norm=True, strict=True, require=False, min_rows=1),
    dict(mode="baseline", norm=False, strict=False, require=True, min_rows=1),
    dict(mode="weight", norm=False, strict=True, require=False, min_rows=2),
    dict(mode="weight", norm=True, strict=False, require=True, min_rows=1),
    dict(mode="baseline", norm=False, strict=False, require=False, min_rows=8),  # always skipped
]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{v[k]}" for k in v))
def test_scripted_sequence_matches_reference(seed, variant):
    config = cfg(
        recalibration=variant["mode"],
        recalibration_weight=0.5,
        strict_positive=variant["strict"],
        require_tool_call=variant["require"],
    )
    buf = ReplayBuffer(dataclasses.replace(config, norm_by_std=variant["norm"]), seed=seed)
    ref = RefBuffer(config, variant["norm"], 1e-6, seed)
    rng = np.random.default_rng(seed)
    fired = quiet = 0
    for step in range(1, 15):
        got = buf.replay_batch(step=step, min_rows=variant["min_rows"])
        want = ref.replay(variant["min_rows"])
        if want is None:
            assert got is None
            quiet += 1
        else:
            fired += 1
            assert ids(got) == [row["id"] for row, _ in want]
            for e, (_, adv) in zip(got, want, strict=True):
                np.testing.assert_allclose(e.replay_advantages, adv, rtol=1e-6, atol=1e-7)
                assert len(e.replay_advantages) == e.num_tokens
        assert len(buf) == len(ref.rows)  # cleared iff triggered

        entries, means, stds = scripted_step(rng, step)
        stats = buf.end_step(step=step, entries=entries, group_means=means, group_stds=stds)
        admitted = ref.end_step(step, [as_ref_row(e) for e in entries], means, stds)
        assert ids(buf.entries()) == [row["id"] for row in ref.rows]
        hist_means, hist_stds = buf.history()
        assert len(hist_means) == min(3 * step, 7)
        np.testing.assert_allclose(hist_means, ref.means)
        np.testing.assert_allclose(hist_stds, ref.stds)
        p50 = np.percentile(ref.means, 50)
        assert stats["size"] == len(ref.rows)
        assert stats["above_p50"] == sum(row["reward"] > p50 for row in ref.rows)
        assert stats["admitted_step"] == admitted
        assert stats["triggers_total"] == ref.triggers
        assert stats["replayed_total"] == ref.replayed_total
        assert stats["evicted_stale_total"] == ref.evicted_total
        assert stats["trigger_threshold"] == 6.0
    assert quiet > 0
    if variant["min_rows"] <= config.size:
        assert fired > 0  # the trigger path was exercised
    else:
        assert fired == 0 and ref.triggers > 0


# --------------------------------------------------------------------------- the trigger


def fill(buf, rewards, *, step=1, means=(0.0,), stds=(1.0,)):
    entries = [positive(f"r{i}", r, step=step) for i, r in enumerate(rewards)]
    buf.end_step(step=step, entries=entries, group_means=list(means), group_stds=list(stds))


@pytest.mark.parametrize(
    ("size", "factor", "n_above"),
    [(4, 1.5, 6), (4, 1.25, 5), (4, 1.3, 5), (2, 0.5, 1), (3, 2.0, 6)],
)
def test_trigger_fires_exactly_when_count_exceeds_factor_times_size(size, factor, n_above):
    """n_above = floor(factor*size): that many rows above P50 do not trigger, one more does.
    Rows equal to P50 never count."""
    for extra, fires in ((0, False), (1, True)):
        buf = ReplayBuffer(cfg(size=size, trigger_factor=factor))
        fill(buf, [1.0] * (n_above + extra) + [0.0] * 5)  # P50 of history [0.0] is 0
        assert buf.stats()["above_p50"] == n_above + extra
        got = buf.replay_batch(step=2)
        assert (got is not None) == fires
        assert buf.stats()["triggers_total"] == int(fires)
        assert len(buf) == (0 if fires else n_above + extra + 5)


def test_no_history_means_no_replay():
    buf = ReplayBuffer(cfg(size=1, trigger_factor=0.1))
    buf.end_step(step=1, entries=[positive("a", 5.0)], group_means=[], group_stds=[])
    assert buf.replay_batch(step=2) is None
    assert len(buf) == 1


# ------------------------------------------------------------------- recalibration values


def one_row_replay(*, mode="baseline", norm=False, weight=1.0):
    """History means [0, 1, 2, 10] (P50 1.5), stds [1, 2, 3, 4] (P50 2.5); one row, reward 3.5,
    stored advantages [_, 0.4, 0.8, _] on mask [0, 1, 1, 0]."""
    buf = ReplayBuffer(
        cfg(
            size=1,
            trigger_factor=0.5,
            recalibration=mode,
            recalibration_weight=weight,
            norm_by_std=norm,
        )
    )
    row = make_entry("x", 3.5, [9.0, 0.4, 0.8, 9.0], [0, 1, 1, 0])
    buf.end_step(step=1, entries=[row], group_means=[0, 1, 2, 10], group_stds=[1, 2, 3, 4])
    (got,) = buf.replay_batch(step=2)
    return got.replay_advantages


def test_recalibration_baseline_without_std():
    np.testing.assert_allclose(one_row_replay(), [0.0, 2.0, 2.0, 0.0])


def test_recalibration_baseline_with_std():
    a = 2.0 / (2.5 + 1e-6)
    np.testing.assert_allclose(one_row_replay(norm=True), [0.0, a, a, 0.0], rtol=1e-6)


@pytest.mark.parametrize("norm", [False, True])  # the weight mode ignores the std history
def test_recalibration_weight_mode(norm):
    np.testing.assert_allclose(
        one_row_replay(mode="weight", weight=0.5, norm=norm), [0.0, 0.2, 0.4, 0.0], rtol=1e-6
    )


def test_mean_recalibrated_advantage_is_reported():
    buf = ReplayBuffer(cfg(size=8, trigger_factor=0.1))
    fill(buf, [3.0, 1.0], means=[0.0, 1.0, 1.0], stds=[0.0] * 3)  # P50 1 -> A_hat 2 and 0
    got = buf.replay_batch(step=2)
    assert sorted(e.reward for e in got) == [1.0, 3.0]
    stats = buf.stats()
    assert stats["replay_mean_advantage_last"] == pytest.approx(1.0)
    assert stats["replayed_last"] == stats["replayed_total"] == 2


# --------------------------------------------------------------------- filter and subset


@pytest.mark.parametrize(("strict", "kept"), [(False, {"above", "equal"}), (True, {"above"})])
def test_nonnegative_filter(strict, kept):
    buf = ReplayBuffer(cfg(size=8, trigger_factor=0.1, strict_positive=strict))
    rows = [positive("above", 3.0), positive("equal", 1.0), positive("below", 0.0)]
    buf.end_step(step=1, entries=rows, group_means=[0.0, 1.0, 2.0], group_stds=[0, 0, 0])
    assert set(ids(buf.replay_batch(step=2))) == kept


@pytest.mark.parametrize(
    ("survivors", "size", "drawn"),
    [(7, 8, 4), (7, 2, 2), (12, 16, 8), (1, 4, 1), (16, 16, 16), (31, 64, 16), (8, 5, 5)],
)
def test_subset_is_min_of_power_of_two_and_size(survivors, size, drawn):
    buf = ReplayBuffer(cfg(size=size, trigger_factor=0.01), seed=3)
    fill(buf, [1.0] * survivors)
    got = buf.replay_batch(step=2)
    assert len(got) == drawn
    assert len(set(ids(got))) == drawn  # distinct rows, drawn without replacement
    assert set(ids(got)) <= {f"r{i}" for i in range(survivors)}


def test_draw_is_uniform():
    """Each of 6 survivors lands in a 4-row subset with probability 4/6."""
    hits = {f"r{i}": 0 for i in range(6)}
    trials = 300
    for seed in range(trials):
        buf = ReplayBuffer(cfg(size=8, trigger_factor=0.01), seed=seed)
        fill(buf, [1.0] * 6)
        for name in ids(buf.replay_batch(step=2)):
            hits[name] += 1
    for count in hits.values():
        assert abs(count / trials - 4 / 6) < 0.08


def test_replay_clears_the_buffer_and_too_few_rows_skip():
    buf = ReplayBuffer(cfg(size=8, trigger_factor=0.1))
    fill(buf, [1.0] * 3)
    assert buf.replay_batch(step=2, min_rows=4) is None  # 2 rows drawn < 4 learners
    assert len(buf) == 0 and buf.entries() == []
    stats = buf.end_step(step=2, entries=[], group_means=[0.0], group_stds=[0.0])
    assert stats["size"] == 0 and stats["evicted_stale_step"] == 0
    assert stats["triggers_total"] == 1 and stats["replay_skipped_total"] == 1
    assert stats["replayed_total"] == 0


# ------------------------------------------------------------------ staleness, admission


@pytest.mark.parametrize("tolerate", [0, 1, 2, 5])
def test_expiry_boundary(tolerate):
    """A row collected at step s survives end_step(s + tolerate) and is dropped at
    end_step(s + tolerate + 1), before that step's rows are admitted."""
    buf = ReplayBuffer(cfg(tolerate_steps=tolerate, trigger_factor=100.0))
    fill(buf, [1.0], step=1)
    for step in range(2, 2 + tolerate):
        stats = buf.end_step(step=step, entries=[], group_means=[0.0], group_stds=[0.0])
        assert ids(buf.entries()) == ["r0"] and stats["evicted_stale_step"] == 0
    last = 1 + tolerate + 1
    new = positive("new", 1.0, step=last)
    stats = buf.end_step(step=last, entries=[new], group_means=[0.0], group_stds=[0.0])
    assert ids(buf.entries()) == ["new"]
    assert stats["evicted_stale_step"] == 1 and stats["evicted_stale_total"] == 1


def test_rows_collected_at_an_older_step_age_from_their_own_step():
    """Async rollout: rows of step 4 admitted at end_step(5) expire by their collection step."""
    buf = ReplayBuffer(cfg(tolerate_steps=1, trigger_factor=100.0))
    buf.end_step(step=5, entries=[positive("old", 1.0, step=4)], group_means=[0], group_stds=[0])
    buf.end_step(step=6, entries=[], group_means=[0], group_stds=[0])
    assert len(buf) == 0
    with pytest.raises(ValueError, match="later steps"):
        buf.end_step(step=7, entries=[positive("x", 1.0, step=8)], group_means=[], group_stds=[])


@pytest.mark.parametrize(("require", "admitted"), [(False, ["pos0", "pos1"]), (True, ["pos1"])])
def test_admission_rule(require, admitted):
    rows = [
        make_entry("pos0", 1.0, [0.0, 0.2, 0.3], [0, 1, 1], tool_calls=0),
        make_entry("pos1", 1.0, [0.0, 0.2, 0.3], [0, 1, 1], tool_calls=1),
        make_entry("zero", 1.0, [0.0, 0.5, -0.5], [0, 1, 1], tool_calls=2),  # mean exactly 0
        make_entry("neg", 1.0, [0.0, 0.9, -1.0], [0, 1, 1], tool_calls=2),
        make_entry("masked", 1.0, [0.0, 5.0, -1.0], [0, 0, 1], tool_calls=2),  # + token masked
        make_entry("empty", 1.0, [0.0, 5.0, 5.0], [0, 0, 0], tool_calls=2),
    ]
    buf = ReplayBuffer(cfg(require_tool_call=require))
    stats = buf.end_step(step=1, entries=rows, group_means=[0.0], group_stds=[0.0])
    assert ids(buf.entries()) == admitted and stats["admitted_step"] == len(admitted)


def test_history_is_a_fifo_of_group_statistics():
    buf = ReplayBuffer(cfg(history_length=5))
    for step in range(1, 4):
        means = [step * 10 + g for g in range(3)]
        buf.end_step(step=step, entries=[], group_means=means, group_stds=[-m for m in means])
    means, stds = buf.history()
    assert means == [12.0, 20.0, 21.0, 22.0, 30.0, 31.0, 32.0][-5:]
    assert stds == [-m for m in means]
    assert buf.stats()["history_length"] == 5 and buf.stats()["baseline_p50"] == 30.0
    with pytest.raises(ValueError, match="group stds"):
        buf.end_step(step=4, entries=[], group_means=[1.0], group_stds=[])


# ------------------------------------------------------------------------- idempotency


def snapshot(buf):
    return (
        [(e.task_id, e.reward, e.step) for e in buf.entries()],
        buf.history(),
        buf.stats(),
        buf._generator.get_state().clone(),
    )


def same_snapshot(a, b):
    return a[0] == b[0] and a[1] == b[1] and _nan_equal(a[2], b[2]) and torch.equal(a[3], b[3])


def _nan_equal(x: dict, y: dict) -> bool:
    def norm(v):
        return "nan" if isinstance(v, float) and math.isnan(v) else v

    return {k: norm(v) for k, v in x.items()} == {k: norm(v) for k, v in y.items()}


def test_end_step_twice_is_a_no_op():
    buf = ReplayBuffer(cfg())
    rng = np.random.default_rng(0)
    entries, means, stds = scripted_step(rng, 1)
    first = buf.end_step(step=1, entries=entries, group_means=means, group_stds=stds)
    before = snapshot(buf)
    other, m2, s2 = scripted_step(rng, 1)
    again = buf.end_step(step=1, entries=other, group_means=m2, group_stds=s2)
    assert _nan_equal(again, first)
    assert same_snapshot(snapshot(buf), before)
    with pytest.raises(StepOrderError):
        buf.end_step(step=0, entries=[], group_means=[], group_stds=[])


def test_replay_batch_twice_is_a_no_op():
    def run(duplicate: bool):
        buf = ReplayBuffer(cfg(size=4, trigger_factor=0.1), seed=7)
        out = []
        for step in (1, 2, 3):
            fill(buf, [1.0] * 6, step=step)
            got = buf.replay_batch(step=step + 1)
            if duplicate:
                again = buf.replay_batch(step=step + 1)
                assert ids(again) == ids(got)
                assert len(buf) == 0 and buf.stats()["triggers_total"] == step
            out.append(ids(got))
        return out

    assert run(True) == run(False)  # the retry did not advance the generator


def test_calls_out_of_order_raise():
    buf = ReplayBuffer(cfg())
    buf.end_step(step=3, entries=[], group_means=[0.0], group_stds=[0.0])
    with pytest.raises(StepOrderError, match="before its end_step"):
        buf.replay_batch(step=3)
    buf.replay_batch(step=5)
    with pytest.raises(StepOrderError):
        buf.replay_batch(step=4)
    with pytest.raises(StepOrderError):
        buf.end_step(step=4, entries=[], group_means=[], group_stds=[])


# ----------------------------------------------------------------------------- durability


def run_steps(buf, rng, steps):
    out = []
    for step in steps:
        got = buf.replay_batch(step=step)
        out.append(None if got is None else [(e.task_id, e.replay_advantages) for e in got])
        entries, means, stds = scripted_step(rng, step)
        buf.end_step(step=step, entries=entries, group_means=means, group_stds=stds)
    return out


def test_save_load_round_trip(tmp_path):
    config = cfg(recalibration="weight", recalibration_weight=0.5)
    buf = ReplayBuffer(config, seed=11)
    run_steps(buf, np.random.default_rng(5), range(1, 6))
    path = buf.save(tmp_path / "b.npz")
    twin = ReplayBuffer(config, seed=999)  # the seed is replaced by the saved generator state
    twin.load(path)
    assert_same_entries(twin.entries(), buf.entries())
    assert twin.history() == buf.history()
    assert _nan_equal(twin.stats(), buf.stats())
    assert twin.last_step == buf.last_step == 5
    assert torch.equal(twin._generator.get_state(), buf._generator.get_state())
    # both go on identically, replays included
    a = run_steps(buf, np.random.default_rng(9), range(6, 12))
    b = run_steps(twin, np.random.default_rng(9), range(6, 12))
    assert any(x is not None for x in a)
    for x, y in zip(a, b, strict=True):
        assert (x is None) == (y is None)
        if x is not None:
            assert [n for n, _ in x] == [n for n, _ in y]
            for (_, u), (_, v) in zip(x, y, strict=True):
                assert np.array_equal(u, v)


def test_the_success_flag_survives_a_checkpoint_and_old_checkpoints_read_as_unknown(tmp_path):
    """ReplayEntry.success (True, False or unknown) goes through save/load, drawn replay rows
    included; a checkpoint written before the flag was kept loads with every flag unknown."""
    config = cfg(size=4, trigger_factor=0.1, checkpoint_every_steps=5)
    buf = ReplayBuffer(config, checkpoint_dir=tmp_path, seed=4)
    flags = [True, False, None, True, False, True, None]
    rows = [
        dataclasses.replace(positive(f"r{i}", 1.0), success=flag) for i, flag in enumerate(flags)
    ]
    buf.end_step(step=1, entries=rows[:5], group_means=[0.0], group_stds=[1.0])
    path = buf.save(tmp_path / "b.npz")
    twin = ReplayBuffer(config)
    twin.load(path)
    assert [e.success for e in twin.entries()] == flags[:5]
    # a replay that fired is saved with its rows (for a retried replay_batch): flags included
    buf.end_step(step=2, entries=rows[5:], group_means=[0.0], group_stds=[1.0])
    drawn = buf.replay_batch(step=3)
    assert len(drawn) == 4
    restarted = ReplayBuffer(config, checkpoint_dir=tmp_path)
    assert [e.success for e in restarted.replay_batch(step=3)] == [e.success for e in drawn]

    with np.load(path) as data:  # the same checkpoint as an older version wrote it
        old = {key: data[key] for key in data.files if not key.endswith(".success")}
    assert len(old) < len(np.load(path).files)
    np.savez(tmp_path / "old.npz", **old)
    legacy = ReplayBuffer(config)
    legacy.load(tmp_path / "old.npz")
    assert ids(legacy.entries()) == ids(twin.entries())
    assert all(e.success is None for e in legacy.entries())


def test_empty_buffer_round_trip(tmp_path):
    buf = ReplayBuffer(cfg())
    twin = ReplayBuffer(cfg())
    twin.load(buf.save(tmp_path / "empty.npz"))
    assert twin.entries() == [] and twin.last_step is None and twin.history() == ([], [])


def test_checkpoint_dir_saves_every_n_steps_and_restores_on_construction(tmp_path):
    config = cfg(checkpoint_every_steps=2, trigger_factor=100.0)  # no replay here
    buf = ReplayBuffer(config, checkpoint_dir=tmp_path)
    rng = np.random.default_rng(1)
    path = tmp_path / rb.CHECKPOINT_NAME
    run_steps(buf, rng, [1])
    assert not path.exists()
    run_steps(buf, rng, [2])
    assert path.exists()
    saved_ids, saved_stats = ids(buf.entries()), buf.stats()
    run_steps(buf, rng, [3])  # not checkpointed: lost on a crash

    (tmp_path / f".{rb.CHECKPOINT_NAME}.x1y2.tmp").write_bytes(b"PK")  # a crash mid-write
    restarted = ReplayBuffer(config, checkpoint_dir=tmp_path)
    assert restarted.last_step == 2 and ids(restarted.entries()) == saved_ids
    assert restarted.stats()["checkpoint_step"] == 2
    # the retried end_step of the checkpointed step is a no-op with the same answer
    again = restarted.end_step(step=2, entries=[], group_means=[], group_stds=[])
    assert _nan_equal(again, saved_stats)
    # a later step is applied and counts the step the crash lost
    stats = restarted.end_step(step=4, entries=[], group_means=[0.0], group_stds=[0.0])
    assert stats["missing_steps_total"] == 1
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_a_fired_replay_is_durable_before_end_step(tmp_path):
    """A crash between replay_batch(t) and end_step(t): the restarted buffer answers the retried
    replay_batch(t) with the same rows and does not hold them any more (no double replay)."""
    config = cfg(size=4, trigger_factor=0.1, checkpoint_every_steps=5)
    buf = ReplayBuffer(config, checkpoint_dir=tmp_path, seed=4)
    fill(buf, [1.0] * 7)
    assert not (tmp_path / rb.CHECKPOINT_NAME).exists()  # step 1 is not a checkpoint step
    drawn = buf.replay_batch(step=2)
    assert len(drawn) == 4 and (tmp_path / rb.CHECKPOINT_NAME).exists()

    restarted = ReplayBuffer(config, checkpoint_dir=tmp_path)
    assert restarted.entries() == [] and restarted.last_step == 1
    again = restarted.replay_batch(step=2)
    assert ids(again) == ids(drawn)
    for a, b in zip(again, drawn, strict=True):
        assert np.array_equal(a.replay_advantages, b.replay_advantages)
    assert_same_entries(again, drawn)
    stats = restarted.end_step(step=2, entries=[], group_means=[0.0], group_stds=[0.0])
    assert stats["triggers_total"] == 1 and stats["replayed_total"] == 4
    # a replay that fired but was too small for the learners is durable as "no replay"
    fill(restarted, [1.0] * 3, step=3)
    assert restarted.replay_batch(step=4, min_rows=4) is None
    again = ReplayBuffer(config, checkpoint_dir=tmp_path)
    assert again.replay_batch(step=4, min_rows=4) is None and again.entries() == []


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "not-a-buffer"])
def test_corrupt_checkpoint_is_a_clear_error(tmp_path, damage):
    buf = ReplayBuffer(cfg())
    run_steps(buf, np.random.default_rng(2), [1, 2])
    path = buf.save(tmp_path / rb.CHECKPOINT_NAME)
    data = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"\x00garbage" * 50)
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        np.savez(path.open("wb"), meta=np.array('{"format": "something else"}'))
    with pytest.raises(BufferCheckpointError) as info:
        ReplayBuffer(cfg()).load(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    with pytest.raises(BufferCheckpointError):
        ReplayBuffer(cfg(), checkpoint_dir=tmp_path)  # a restart does not silently start empty


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no replay-buffer checkpoint"):
        ReplayBuffer(cfg()).load(tmp_path / "nope.npz")
    assert ReplayBuffer(cfg(), checkpoint_dir=tmp_path / "new").last_step is None  # fresh start


def test_failed_write_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    buf = ReplayBuffer(cfg())
    rng = np.random.default_rng(3)
    run_steps(buf, rng, [1, 2])
    path = buf.save(tmp_path / rb.CHECKPOINT_NAME)
    old_bytes, old_ids = path.read_bytes(), ids(buf.entries())
    run_steps(buf, rng, [3])

    def half_written(f, arrays):
        f.write(b"PK\x03\x04 half of a zip")
        raise OSError("disk full")

    monkeypatch.setattr(rb, "_write_payload", half_written)
    with pytest.raises(OSError, match="disk full"):
        buf.save(path)
    assert path.read_bytes() == old_bytes
    assert os.listdir(tmp_path) == [rb.CHECKPOINT_NAME]  # the temp file is gone
    twin = ReplayBuffer(cfg())
    twin.load(path)
    assert ids(twin.entries()) == old_ids and twin.last_step == 2


# ------------------------------------------------------------- entries and the train batch


def _traj(name, *, mask, group=0, failure=None, reward=1.0):
    n = len(mask)
    return Trajectory(
        task_id=name,
        group_id=group,
        env_seed=0,
        prompt_length=2,
        token_ids=list(range(50, 50 + n)),
        loss_mask=mask,
        behaviour_logprobs=[-0.25 * m for m in mask],
        rewards=RewardParts(task=reward, tool_bonus=0.1),
        tool_calls=1,
        weight_version=4,
        failure=failure,
    )


def test_entry_from_trajectory():
    traj = _traj("a", mask=[0, 0, 1, 0, 1])
    e = entry_of(traj, 0.5, step=3)
    assert e.token_ids.dtype == np.int32 and e.loss_mask.dtype == np.uint8
    assert e.behaviour_logprobs.dtype == e.advantages.dtype == np.float32
    assert e.advantages.tolist() == [0, 0, 0.5, 0, 0.5]
    assert e.reward == pytest.approx(1.1) and e.step == 3 and e.weight_version == 4
    assert e.success is False
    assert entry_of(dataclasses.replace(traj, success=True), 0.5, step=3).success is True
    per_token = entry_of(traj, torch.arange(5.0), step=3)
    assert per_token.advantages.tolist() == [0, 0, 2, 0, 4]
    for dropped in (
        entry_of(traj, 0.5, step=3, trainable=False),
        entry_of(_traj("f", mask=[0, 0, 1], failure="sandbox"), 1.0, step=3),
    ):
        assert dropped.loss_mask.sum() == 0
    with pytest.raises(ValueError, match="per-token"):
        entry_of(traj, [1.0, 2.0], step=3)


def test_replay_train_batch_pads_with_recalibrated_advantages():
    trajs = [
        _traj("a", mask=[0, 0, 1, 1], group=0, reward=2.0),
        _traj("b", mask=[0, 0, 1, 0, 1, 1], group=1, reward=3.0),
        _traj("c", mask=[0, 0, 1], group=0, reward=4.0),
    ]
    buf = ReplayBuffer(cfg(size=4, trigger_factor=0.1, tolerate_steps=5))
    buf.end_step(
        step=1,
        entries=[entry_of(t, 1.0, step=1) for t in trajs[:2]],
        group_means=[0.0, 0.0],
        group_stds=[1.0, 1.0],
    )
    buf.end_step(
        step=2,
        entries=[entry_of(trajs[2], 1.0, step=2)],
        group_means=[1.0],
        group_stds=[1.0],
    )
    rows = buf.replay_batch(step=3)  # P50 of [0, 0, 1] = 0
    assert len(rows) == 2
    batch = replay_train_batch(rows, pad_token_id=0)
    assert batch.input_ids.shape == (2, max(e.num_tokens for e in rows))
    for r, e in enumerate(rows):
        n = e.num_tokens
        assert batch.input_ids[r, :n].tolist() == e.token_ids.tolist()
        assert batch.loss_mask[r, :n].tolist() == e.loss_mask.tolist()
        assert batch.loss_mask[r, n:].sum() == 0 and batch.advantages[r, n:].sum() == 0
        want = (e.reward - 0.0) * e.loss_mask
        assert torch.allclose(batch.advantages[r, :n], torch.tensor(want, dtype=torch.float32))
        logp = torch.tensor(-0.25 * e.loss_mask, dtype=torch.float32)
        assert torch.allclose(batch.old_logprobs[r, :n], logp)
        assert batch.rewards[r].item() == pytest.approx(e.reward)
    steps_groups = [(e.step, e.group_id) for e in rows]
    assert (batch.group_ids[0] == batch.group_ids[1]) == (steps_groups[0] == steps_groups[1])
    with pytest.raises(ValueError, match="replay_batch"):
        replay_train_batch([entry_of(trajs[0], 1, step=1)], 0)
