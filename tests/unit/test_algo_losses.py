"""PPO-clip / Clip-Cov / KL-Cov / aggregation / entropy against reference loops, plus the
padding and micro-batch properties the learner relies on."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spear_ray.algo.losses import (
    COV_MODES,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    aggregate_loss,
    clip_cov_loss,
    compute_policy_loss,
    entropy_from_logits,
    entropy_loss,
    kl_cov_loss,
    loss_divisors,
    ppo_clip_loss,
)

SETTINGS = settings(max_examples=40, deadline=None)
F64 = torch.float64


def make_batch(seed: int, rows: int = 4, cols: int = 7, p_mask: float = 0.75):
    g = torch.Generator().manual_seed(seed)
    logp_old = -3 * torch.rand(rows, cols, generator=g, dtype=F64) - 0.05
    logp = logp_old + 0.4 * torch.randn(rows, cols, generator=g, dtype=F64)
    adv = torch.randn(rows, 1, generator=g, dtype=F64).expand(rows, cols).clone()
    mask = torch.rand(rows, cols, generator=g) < p_mask
    mask[0, 0] = True  # never empty
    return logp, logp_old, adv, mask


# ------------------------------------------------------------------ reference loops ---------


def ref_ppo_token(lp, lpo, a, lo, hi, dual, clamp=20.0):
    """Returns (loss, clipped, dual_clipped, ratio, log_ratio) of one token."""
    lr = max(-clamp, min(clamp, lp - lpo))
    r = math.exp(lr)
    l1 = -a * r
    l2 = -a * min(max(r, 1 - lo), 1 + hi)
    loss, clipped, dualed = max(l1, l2), l2 > l1, False
    if dual is not None and a < 0 and loss > -a * dual:
        loss, dualed = -a * dual, True
    return loss, clipped, dualed, r, lr


def ref_ppo(logp, logp_old, adv, mask, lo, hi, dual):
    rows, cols = mask.shape
    loss = [[0.0] * cols for _ in range(rows)]
    n = clipped = dualed = 0
    k1 = k3 = 0.0
    for i in range(rows):
        for j in range(cols):
            if not mask[i, j]:
                continue
            t = ref_ppo_token(
                logp[i, j].item(), logp_old[i, j].item(), adv[i, j].item(), lo, hi, dual
            )
            loss[i][j] = t[0]
            n += 1
            clipped += t[1]
            dualed += t[2]
            k3 += (t[3] - 1) - t[4]
            k1 += -t[4]
    return torch.tensor(loss, dtype=F64), clipped / n, dualed / n, k3 / n, k1 / n


def ref_cov(adv, logp, mask):
    vals = [(i, j) for i in range(mask.shape[0]) for j in range(mask.shape[1]) if mask[i, j]]
    mean_a = sum(adv[i, j].item() for i, j in vals) / len(vals)
    mean_l = sum(logp[i, j].item() for i, j in vals) / len(vals)
    return {(i, j): (adv[i, j].item() - mean_a) * (logp[i, j].item() - mean_l) for i, j in vals}


def ref_aggregate(loss, mask, mode, norm_length=None):
    rows = [
        [loss[i, j].item() for j in range(mask.shape[1]) if mask[i, j]]
        for i in range(mask.shape[0])
    ]
    rows = [r for r in rows if r]
    if mode == "token-mean":
        n = sum(len(r) for r in rows)
        return sum(sum(r) for r in rows) / max(n, 1)
    if mode == "seq-mean-token-mean":
        return sum(sum(r) / len(r) for r in rows) / max(len(rows), 1)
    length = norm_length if norm_length is not None else mask.shape[1]
    return sum(sum(r) for r in rows) / (length * max(len(rows), 1))


# --------------------------------------------------------------------------- PPO-clip -------


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("dual", [None, 3.0])
def test_ppo_clip_matches_reference_loop(seed, dual):
    logp, logp_old, adv, mask = make_batch(seed)
    logp = logp_old + 3 * (logp - logp_old)  # wide ratios so every branch is hit
    out = ppo_clip_loss(logp, logp_old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip=dual)
    want, clip_frac, dual_frac, k3, k1 = ref_ppo(logp, logp_old, adv, mask, 0.2, 0.28, dual)
    torch.testing.assert_close(out.per_token_loss, want)
    assert out.stats["clip_frac"].item() == pytest.approx(clip_frac)
    assert out.stats["dual_clip_frac"].item() == pytest.approx(dual_frac)
    assert out.stats["approx_kl"].item() == pytest.approx(k3)
    assert out.stats["ppo_kl"].item() == pytest.approx(k1)
    assert out.stats["n_tokens"].item() == mask.sum().item()
    assert out.stats["approx_kl"].item() >= 0
    assert not (out.clipped & ~mask).any() and not (out.dual_clipped & ~mask).any()


def _one_token(log_ratio: float, adv: float, **kw):
    logp = torch.tensor([[log_ratio]], dtype=F64, requires_grad=True)
    out = ppo_clip_loss(
        logp,
        torch.zeros(1, 1, dtype=F64),
        torch.tensor([[adv]], dtype=F64),
        torch.ones(1, 1, dtype=torch.bool),
        **kw,
    )
    out.per_token_loss.sum().backward()
    return out, logp.grad.item()


@pytest.mark.parametrize("adv", [2.0, -2.0])
@pytest.mark.parametrize("side", ["high", "low"])
def test_ratio_exactly_on_the_boundary_is_unclipped(adv, side):
    # Pick the bound so that 1 +- eps equals the computed ratio bit for bit (r - 1 and 1 - r are
    # exact for r in [0.5, 2]).
    log_ratio = 0.21 if side == "high" else -0.19
    r = math.exp(log_ratio)
    kw = {"clip_high": r - 1, "clip_low": 0.2} if side == "high" else {"clip_low": 1 - r}
    assert (1 + kw.get("clip_high", 0.28) == r) or (1 - kw["clip_low"] == r)
    out, grad = _one_token(log_ratio, adv, **kw)
    assert not out.clipped.item()
    assert out.per_token_loss.item() == pytest.approx(-adv * r)
    assert grad == pytest.approx(-adv * r)  # d(-A e^x)/dx, undivided (no max() tie split)


@pytest.mark.parametrize(
    ("log_ratio", "adv", "clipped"),
    [
        (0.5, 1.0, True),  # r = 1.65 > 1.28, A > 0: clipped, no gradient
        (0.5, -1.0, False),  # A < 0 wants r down: the unclipped loss is larger
        (-0.5, -1.0, True),  # r = 0.61 < 0.8, A < 0: clipped
        (-0.5, 1.0, False),  # A > 0 wants r up: unclipped
    ],
)
def test_gradient_is_zero_beyond_the_clip_on_the_right_side(log_ratio, adv, clipped):
    out, grad = _one_token(log_ratio, adv, clip_low=0.2, clip_high=0.28)
    assert out.clipped.item() == clipped
    r = math.exp(log_ratio)
    if clipped:
        assert grad == 0.0
        bound = 1.28 if log_ratio > 0 else 0.8
        assert out.per_token_loss.item() == pytest.approx(-adv * bound)
    else:
        assert grad == pytest.approx(-adv * r)


def test_dual_clip_caps_negative_advantage_loss():
    out, grad = _one_token(3.0, -1.0, dual_clip=10.0)  # r = 20.1 > c = 10
    assert out.dual_clipped.item() and out.per_token_loss.item() == pytest.approx(10.0)
    assert grad == 0.0
    out, grad = _one_token(3.0, -1.0)  # no dual clip: the full -A r
    assert out.per_token_loss.item() == pytest.approx(math.exp(3.0)) and grad != 0.0
    out, _ = _one_token(3.0, 1.0, dual_clip=10.0)  # A > 0 is never dual clipped
    assert not out.dual_clipped.item()
    with pytest.raises(ValueError, match="dual_clip"):
        _one_token(0.0, 1.0, dual_clip=1.0)


def test_log_ratio_clamp_bounds_the_ratio_and_stops_its_gradient():
    out, grad = _one_token(50.0, -1.0)
    assert out.per_token_loss.item() == pytest.approx(math.exp(20.0))
    assert grad == 0.0
    out, _ = _one_token(50.0, -1.0, log_ratio_clamp=5.0)
    assert out.per_token_loss.item() == pytest.approx(math.exp(5.0))


@pytest.mark.parametrize("mode", COV_MODES)
def test_garbage_at_masked_positions_never_leaks(mode):
    logp, logp_old, adv, mask = make_batch(3)
    mask[:, -2:] = False
    dirty = [t.clone() for t in (logp, logp_old, adv)]
    for t, v in zip(dirty, [float("nan"), float("inf"), float("nan")], strict=True):
        t[:, -2:] = v
    leaf = dirty[0].requires_grad_(True)
    kw = {"cov_ratio": 0.2, "cov_lb": -1e9, "cov_ub": 1e9}
    out = compute_policy_loss(
        mode, leaf, dirty[1], dirty[2], mask, generator=torch.Generator().manual_seed(0), **kw
    )
    clean = compute_policy_loss(
        mode, logp, logp_old, adv, mask, generator=torch.Generator().manual_seed(0), **kw
    )
    torch.testing.assert_close(out.per_token_loss, clean.per_token_loss)
    aggregate_loss(out.per_token_loss, mask, "token-mean").backward()
    assert torch.isfinite(leaf.grad).all() and (leaf.grad[:, -2:] == 0).all()
    assert all(torch.isfinite(v) for v in out.stats.values())


# --------------------------------------------------------------------------- Clip-Cov -------


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("ratio", [0.05, 0.3, 1.0])
def test_clip_cov_zeroes_exactly_k_candidates_never_a_clipped_token(seed, ratio):
    logp, logp_old, adv, mask = make_batch(seed, rows=6, cols=9)
    logp = logp_old + 2 * (logp - logp_old)
    lb, ub = -0.5, 0.8
    out = clip_cov_loss(
        logp,
        logp_old,
        adv,
        mask,
        cov_ratio=ratio,
        cov_lb=lb,
        cov_ub=ub,
        dual_clip=3.0,
        generator=torch.Generator().manual_seed(seed),
    )
    base, clip_frac, _, _, _ = ref_ppo(logp, logp_old, adv, mask, 0.2, 0.28, None)
    cov = ref_cov(adv, logp, mask)
    clipped = {(i, j) for (i, j) in cov if out.clipped[i, j]}
    assert len(clipped) / len(cov) == pytest.approx(clip_frac)
    candidates = {ij for ij, c in cov.items() if lb < c < ub and ij not in clipped}
    selected = {tuple(ij) for ij in torch.nonzero(out.cov_selected).tolist()}
    k = max(int(ratio * len(cov)), 1)
    assert selected <= candidates
    assert len(selected) == min(k, len(candidates))
    for i in range(mask.shape[0]):
        for j in range(mask.shape[1]):
            want = 0.0 if (i, j) in selected else base[i, j].item()  # no dual clip in this mode
            assert out.per_token_loss[i, j].item() == pytest.approx(want)
    assert out.stats["cov_frac"].item() == pytest.approx(len(selected) / len(cov))
    assert not out.dual_clipped.any()


def test_clip_cov_draw_is_reproducible_and_random():
    logp, logp_old, adv, mask = make_batch(5, rows=8, cols=16, p_mask=1.0)
    kw = {"cov_ratio": 0.1, "cov_lb": -1e9, "cov_ub": 1e9}

    def draw(seed):
        gen = torch.Generator().manual_seed(seed)
        return clip_cov_loss(logp, logp_old, adv, mask, generator=gen, **kw).cov_selected

    assert torch.equal(draw(1), draw(1))
    assert any(not torch.equal(draw(1), draw(s)) for s in range(2, 6))


def test_clip_cov_selected_tokens_get_no_gradient():
    logp, logp_old, adv, mask = make_batch(7, rows=5, cols=8, p_mask=1.0)
    leaf = logp.clone().requires_grad_(True)
    out = clip_cov_loss(
        leaf,
        logp_old,
        adv,
        mask,
        cov_ratio=0.2,
        cov_lb=-1e9,
        cov_ub=1e9,
        generator=torch.Generator().manual_seed(0),
    )
    out.per_token_loss.sum().backward()
    assert out.cov_selected.sum().item() == 8
    assert (leaf.grad[out.cov_selected] == 0).all()
    assert (leaf.grad[~out.cov_selected & ~out.clipped] != 0).all()


# ---------------------------------------------------------------------------- KL-Cov --------


@pytest.mark.parametrize("seed", range(10))
def test_kl_cov_penalises_the_top_k_covariance_tokens(seed):
    logp, logp_old, adv, mask = make_batch(seed, rows=5, cols=8)
    out = kl_cov_loss(logp, logp_old, adv, mask, cov_ratio=0.1, kl_coef=0.1, dual_clip=3.0)
    cov = ref_cov(adv, logp, mask)
    k = max(int(0.1 * len(cov)), 1)
    top = set(sorted(cov, key=cov.get, reverse=True)[:k])
    selected = {tuple(ij) for ij in torch.nonzero(out.cov_selected).tolist()}
    assert selected == top
    for i, j in cov:
        # Unclipped -A*r everywhere (the paper's and verl's KL-Cov); penalty on the top-k only.
        lr = logp[i, j].item() - logp_old[i, j].item()
        want = -adv[i, j].item() * math.exp(lr) + (0.1 * abs(lr) if (i, j) in top else 0.0)
        assert out.per_token_loss[i, j].item() == pytest.approx(want)
    assert not (out.clipped & out.cov_selected).any()


# ------------------------------------------------------------------------- gradcheck --------


def _gradcheck(fn, logp):
    assert torch.autograd.gradcheck(fn, (logp.clone().requires_grad_(True),), eps=1e-6, atol=1e-6)


def _branch_batch():
    """Log-ratios and advantages chosen far (> 0.1) from every kink: the clip bounds
    (log 0.8, log 1.28), the dual clip (log 3) and |log r| = 0."""
    deltas = torch.tensor([-1.0, -0.05, 0.05, 0.5, 2.0], dtype=F64)
    advs = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=F64)
    logp_old = -torch.linspace(0.3, 2.5, 20, dtype=F64).reshape(4, 5)
    logp = logp_old + deltas.expand(4, 5)
    adv = advs.unsqueeze(-1).expand(4, 5).clone()
    mask = torch.ones(4, 5, dtype=torch.bool)
    mask[2, 4] = False
    return logp, logp_old, adv, mask


def test_gradcheck_ppo_with_dual_clip():
    logp, logp_old, adv, mask = _branch_batch()
    out = ppo_clip_loss(logp, logp_old, adv, mask, dual_clip=3.0)
    assert out.clipped.any() and out.dual_clipped.any() and (mask & ~out.clipped).any()
    _gradcheck(
        lambda lp: aggregate_loss(
            ppo_clip_loss(lp, logp_old, adv, mask, dual_clip=3.0).per_token_loss, mask, "token-mean"
        ),
        logp,
    )


def test_gradcheck_clip_cov():
    logp, logp_old, adv, mask = _branch_batch()
    kw = {"cov_ratio": 0.15, "cov_lb": -0.3, "cov_ub": 0.6}

    def loss(lp):
        gen = torch.Generator().manual_seed(0)  # the same draw on every evaluation
        per_token = clip_cov_loss(lp, logp_old, adv, mask, generator=gen, **kw).per_token_loss
        return aggregate_loss(per_token, mask, "seq-mean-token-sum-norm", norm_length=8)

    cov = torch.tensor(list(ref_cov(adv, logp, mask).values()))
    assert ((cov - kw["cov_lb"]).abs().min() > 1e-3) and ((cov - kw["cov_ub"]).abs().min() > 1e-3)
    out = clip_cov_loss(logp, logp_old, adv, mask, generator=torch.Generator().manual_seed(0), **kw)
    assert out.cov_selected.sum().item() == 2 and out.clipped.any()
    _gradcheck(loss, logp)


def test_gradcheck_kl_cov():
    logp, logp_old, adv, mask = _branch_batch()
    out = kl_cov_loss(logp, logp_old, adv, mask, cov_ratio=0.15)
    assert out.cov_selected.sum().item() == 2
    _gradcheck(
        lambda lp: aggregate_loss(
            kl_cov_loss(lp, logp_old, adv, mask, cov_ratio=0.15).per_token_loss,
            mask,
            "seq-mean-token-mean",
        ),
        logp,
    )


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_gradcheck_aggregations(mode):
    _, _, _, mask = make_batch(2)
    values = torch.randn(mask.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    assert torch.autograd.gradcheck(
        lambda v: aggregate_loss(v, mask, mode, norm_length=11), (values.requires_grad_(True),)
    )


def test_gradcheck_entropy():
    logits = torch.randn(3, 4, 6, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert torch.autograd.gradcheck(entropy_from_logits, (logits.requires_grad_(True),))


# ------------------------------------------------------------------------ aggregation -------


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_aggregate_matches_reference_loop(seed, mode):
    _, _, _, mask = make_batch(seed, rows=5, cols=6, p_mask=0.5)
    mask[3] = False  # a fully masked row is not a sequence
    loss = torch.randn(mask.shape, dtype=F64, generator=torch.Generator().manual_seed(seed))
    for norm_length in (None, 10):
        got = aggregate_loss(loss, mask, mode, norm_length=norm_length)
        assert got.item() == pytest.approx(ref_aggregate(loss, mask, mode, norm_length))


def test_aggregate_empty_mask_is_zero_and_unknown_mode_raises():
    loss = torch.ones(2, 3)
    for mode in LOSS_AGGREGATIONS:
        assert aggregate_loss(loss, torch.zeros(2, 3, dtype=torch.bool), mode).item() == 0.0
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate_loss(loss, torch.ones(2, 3), "sum")


def test_loss_divisors_counts():
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 0, 1]])
    assert loss_divisors(mask) == {"num_tokens": 4, "num_sequences": 2}


@st.composite
def padded_problem(draw):
    rows = draw(st.integers(1, 6))
    cols = draw(st.integers(1, 9))
    seed = draw(st.integers(0, 10_000))
    extra_rows = draw(st.integers(0, 3))
    extra_cols = draw(st.integers(0, 4))
    mode = draw(st.sampled_from(LOSS_AGGREGATIONS))
    return rows, cols, seed, extra_rows, extra_cols, mode


@SETTINGS
@given(problem=padded_problem(), dual=st.sampled_from([None, 3.0]))
def test_padding_does_not_change_the_loss_or_gradient(problem, dual):
    rows, cols, seed, extra_rows, extra_cols, mode = problem
    logp, logp_old, adv, mask = make_batch(seed, rows, cols, p_mask=0.7)
    logp = logp_old + 3 * (logp - logp_old)

    def pad(t, value):
        out = torch.full((rows + extra_rows, cols + extra_cols), value, dtype=t.dtype)
        out[:rows, :cols] = t
        return out

    def run(lp, lpo, a, m):
        leaf = lp.clone().requires_grad_(True)
        per_token = ppo_clip_loss(leaf, lpo, a, m, dual_clip=dual).per_token_loss
        loss = aggregate_loss(per_token, m, mode, norm_length=16)
        loss.backward()
        return loss.detach(), leaf.grad

    loss, grad = run(logp, logp_old, adv, mask)
    p_loss, p_grad = run(pad(logp, 7.0), pad(logp_old, -50.0), pad(adv, 1e3), pad(mask, False))
    torch.testing.assert_close(p_loss, loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(p_grad[:rows, :cols], grad, rtol=1e-12, atol=1e-12)
    assert (p_grad[rows:] == 0).all() and (p_grad[:, cols:] == 0).all()


@st.composite
def split_problem(draw):
    rows = draw(st.integers(2, 10))
    cols = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 10_000))
    cuts = sorted(draw(st.sets(st.integers(1, rows - 1), max_size=rows - 1)))
    mode = draw(st.sampled_from(LOSS_AGGREGATIONS))
    return rows, cols, seed, [0, *cuts, rows], mode


@SETTINGS
@given(problem=split_problem(), dual=st.sampled_from([None, 3.0]))
def test_micro_batches_with_global_divisors_sum_to_the_full_batch(problem, dual):
    rows, cols, seed, bounds, mode = problem
    logp, logp_old, adv, mask = make_batch(seed, rows, cols, p_mask=0.6)
    logp = logp_old + 3 * (logp - logp_old)

    full_leaf = logp.clone().requires_grad_(True)
    full_tok = ppo_clip_loss(full_leaf, logp_old, adv, mask, dual_clip=dual).per_token_loss
    full = aggregate_loss(full_tok, mask, mode, norm_length=12)
    full.backward()

    divisors = loss_divisors(mask)  # counted once over the whole mini-batch
    micro_leaf = logp.clone().requires_grad_(True)
    total = torch.zeros((), dtype=F64)
    for lo, hi in itertools.pairwise(bounds):
        out = ppo_clip_loss(
            micro_leaf[lo:hi], logp_old[lo:hi], adv[lo:hi], mask[lo:hi], dual_clip=dual
        )
        part = aggregate_loss(out.per_token_loss, mask[lo:hi], mode, norm_length=12, **divisors)
        part.backward()  # gradients accumulate on the leaf, as in a learner
        total = total + part.detach()
    torch.testing.assert_close(total, full.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(micro_leaf.grad, full_leaf.grad, rtol=1e-12, atol=1e-12)


def test_local_divisors_are_wrong_when_token_counts_differ():
    # Documents why the divisors are arguments: averaging per-micro-batch token means (what
    # gradient accumulation with local divisors does) is not the token mean of the batch.
    loss = torch.tensor([[1.0, 1.0, 1.0, 1.0], [5.0, 0.0, 0.0, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, True], [True, False, False, False]])
    full = aggregate_loss(loss, mask, "token-mean")  # (4 + 5) / 5 = 1.8
    local = sum(aggregate_loss(loss[i : i + 1], mask[i : i + 1], "token-mean") for i in (0, 1)) / 2
    assert full.item() == pytest.approx(1.8)
    assert local.item() == pytest.approx(3.0)
    divs = loss_divisors(mask)
    glob = sum(
        aggregate_loss(loss[i : i + 1], mask[i : i + 1], "token-mean", **divs) for i in (0, 1)
    )
    assert glob.item() == pytest.approx(full.item())


def test_sum_norm_default_length_is_the_padded_width():
    loss = torch.ones(2, 4, dtype=F64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    assert aggregate_loss(loss, mask, "seq-mean-token-sum-norm").item() == pytest.approx(1.0)
    wide = torch.cat([loss, torch.ones(2, 4, dtype=F64)], dim=1)
    wide_mask = torch.cat([mask, torch.zeros(2, 4, dtype=torch.bool)], dim=1)
    # Without a constant norm_length the padded width leaks into the loss; with one it does not.
    assert aggregate_loss(wide, wide_mask, "seq-mean-token-sum-norm").item() == pytest.approx(0.5)
    assert aggregate_loss(
        wide, wide_mask, "seq-mean-token-sum-norm", norm_length=4
    ).item() == pytest.approx(1.0)


# --------------------------------------------------------------------------- entropy --------


def test_entropy_matches_reference_and_bonus_sign():
    logits = torch.randn(2, 3, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    got = entropy_from_logits(logits)
    for i in range(2):
        for j in range(3):
            z = [logits[i, j, v].item() for v in range(5)]
            norm = sum(math.exp(x) for x in z)
            want = -sum(math.exp(x) / norm * math.log(math.exp(x) / norm) for x in z)
            assert got[i, j].item() == pytest.approx(want)
    uniform = entropy_from_logits(torch.zeros(1, 7, dtype=F64))
    assert uniform.item() == pytest.approx(math.log(7))
    mask = torch.tensor([[True, True, False], [True, False, False]])
    term = entropy_loss(got, mask, "token-mean", coef=0.01)
    assert term.item() == pytest.approx(-0.01 * ref_aggregate(got, mask, "token-mean"))
    assert entropy_loss(got, mask, "token-mean", coef=0.0).item() == 0.0


def test_registry_keys_and_dispatch():
    assert set(POLICY_LOSSES) == {"none", "clip-cov", "kl-cov"} == set(COV_MODES)
    assert set(LOSS_AGGREGATIONS) == {
        "token-mean",
        "seq-mean-token-mean",
        "seq-mean-token-sum-norm",
    }
    logp, logp_old, adv, mask = make_batch(0)
    a = compute_policy_loss("none", logp, logp_old, adv, mask, dual_clip=3.0)
    b = ppo_clip_loss(logp, logp_old, adv, mask, dual_clip=3.0)
    torch.testing.assert_close(a.per_token_loss, b.per_token_loss)
    with pytest.raises(ValueError, match="unknown cov mode"):
        compute_policy_loss("clip", logp, logp_old, adv, mask)
