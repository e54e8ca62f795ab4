"""Policy losses and loss aggregation (docs/algorithm.md §1 PPO-clip, §5 SIL loss, §7 Clip-Cov /
KL-Cov).

Three per-token policy losses share one signature and are picked by the config's covariance
mode through `POLICY_LOSSES`:

- "none":     PPO-clip with asymmetric ("clip-higher") bounds and optional dual clip.
- "clip-cov": PPO-clip, then a few random high-covariance tokens lose their gradient.
- "kl-cov":   PPO-clip, except the top covariance tokens get -A*r + kl_coef*|log r|.

The same functions serve the on-policy update and the SIL replay update (docs/algorithm.md §5);
replay passes the stored behaviour log-probs as `logp_old` and its own Clip-Cov constants.

Per-token losses are reduced by `aggregate_loss`, whose divisors are explicit arguments (see
there): with the whole mini-batch's counts, summing micro-batch losses gives exactly the
mini-batch loss and gradient, and padding never changes the result.

Shapes: logp, logp_old, advantages, mask are [B, T]; mask is bool or 0/1 and marks the tokens
the model generated (prompt, tool output and padding excluded). Advantages are constants.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PolicyLossOutput:
    """per_token_loss is 0 outside the mask; the bool masks are False outside it too.

    stats (detached 0-d tensors, means over valid tokens of this call):
        clip_frac       fraction where PPO's clipped branch was taken
        dual_clip_frac  fraction where the dual clip (A < 0) was taken
        cov_frac        fraction selected by Clip-Cov (zeroed) or KL-Cov (penalised)
        approx_kl       k3 estimator of KL(old || new): mean((r - 1) - log r), >= 0, low variance
        ppo_kl          k1 estimator mean(logp_old - logp), what verl logs as `ppo_kl`
        n_tokens        number of valid tokens (to weight these means across micro-batches)
    """

    per_token_loss: Tensor
    clipped: Tensor
    dual_clipped: Tensor
    cov_selected: Tensor
    stats: dict[str, Tensor]


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of `values` over mask; 0 when the mask is empty."""
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / mask.sum().clamp(min=1)


def _log_ratio(logp: Tensor, logp_old: Tensor, mask: Tensor, log_ratio_clamp: float) -> Tensor:
    # Zero outside the mask so garbage log-probs at padding never reach exp() or the gradient;
    # the clamp keeps exp() finite when the policy moved far (verl clamps at +-20 too).
    diff = torch.where(mask, logp - logp_old, torch.zeros_like(logp))
    return torch.clamp(diff, -log_ratio_clamp, log_ratio_clamp)


def _ppo_terms(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_low: float,
    clip_high: float,
    dual_clip: float | None,
    log_ratio_clamp: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(loss, clipped, dual_clipped, ratio, log_ratio) of PPO-clip, masked."""
    mask = mask.bool()
    adv = torch.where(mask, advantages, torch.zeros_like(advantages)).detach()
    log_ratio = _log_ratio(logp, logp_old, mask, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped_loss = -adv * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    # max(unclipped, clipped) written as a select: strictly greater means the ratio is strictly
    # outside the trust region on the side where it matters, so the clamp's gradient is 0 there.
    # At the boundary the two agree and we keep the unclipped branch (gradient of -A*r), which
    # also avoids torch.maximum splitting the gradient of a tie in half.
    clipped = (clipped_loss > unclipped) & mask
    loss = torch.where(clipped, clipped_loss, unclipped)
    dual_clipped = torch.zeros_like(mask)
    if dual_clip is not None:
        if dual_clip <= 1.0:
            raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
        # Dual clip (A < 0 only): cap the loss at -A*c so one token whose ratio exploded cannot
        # dominate the batch. The cap is a constant, so those tokens carry no gradient.
        lower = -adv * dual_clip
        dual_clipped = (adv < 0) & (loss > lower) & mask
        loss = torch.where(dual_clipped, lower, loss)
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    return loss, clipped, dual_clipped, ratio, log_ratio


def _output(
    loss: Tensor,
    clipped: Tensor,
    dual_clipped: Tensor,
    cov_selected: Tensor,
    mask: Tensor,
    ratio: Tensor,
    log_ratio: Tensor,
) -> PolicyLossOutput:
    """The PolicyLossOutput of every policy loss: its tensors plus the stats computed from them."""
    with torch.no_grad():
        ratio, log_ratio = ratio.detach(), log_ratio.detach()
        stats = {
            "clip_frac": masked_mean(clipped.to(ratio.dtype), mask),
            "dual_clip_frac": masked_mean(dual_clipped.to(ratio.dtype), mask),
            "cov_frac": masked_mean(cov_selected.to(ratio.dtype), mask),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio, mask),
            "ppo_kl": masked_mean(-log_ratio, mask),
            "n_tokens": mask.bool().sum().to(ratio.dtype),
        }
    return PolicyLossOutput(loss, clipped, dual_clipped, cov_selected, stats)


def token_covariance(advantages: Tensor, logp: Tensor, mask: Tensor) -> Tensor:
    """cov_i = (A_i - mean A) * (logp_i - mean logp), means over valid tokens (docs/algorithm.md
    §7).

    Detached: it only chooses tokens. 0 outside the mask.
    """
    mask = mask.bool()
    adv, lp = advantages.detach(), logp.detach()
    cov = (adv - masked_mean(adv, mask)) * (lp - masked_mean(lp, mask))
    return torch.where(mask, cov, torch.zeros_like(cov))


def _num_cov_tokens(ratio: float, n_valid: int) -> int:
    # Same float expression as verl (int(ratio * n) floored, at least 1), so counts match.
    return max(int(ratio * n_valid), 1)


def clip_cov_select(
    advantages: Tensor,
    logp: Tensor,
    mask: Tensor,
    eligible: Tensor,
    *,
    ratio: float,
    lb: float,
    ub: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Clip-Cov's token choice: k = max(floor(ratio * n_valid), 1) tokens drawn uniformly from
    the eligible tokens with lb < cov < ub (all of them if fewer). Returns a [B, T] bool mask.
    """
    mask = mask.bool()
    selected = torch.zeros_like(mask)
    n_valid = int(mask.sum().item())
    if n_valid == 0:
        return selected
    cov = token_covariance(advantages, logp, mask)
    candidates = eligible.bool() & mask & (cov > lb) & (cov < ub)
    idx = torch.nonzero(candidates.reshape(-1), as_tuple=True)[0]
    k = _num_cov_tokens(ratio, n_valid)
    if idx.numel() > k:
        rng_device = generator.device if generator is not None else torch.device("cpu")
        perm = torch.randperm(idx.numel(), generator=generator, device=rng_device)
        idx = idx[perm[:k].to(idx.device)]
    selected.view(-1)[idx] = True
    return selected


def kl_cov_select(advantages: Tensor, logp: Tensor, mask: Tensor, *, ratio: float) -> Tensor:
    """KL-Cov's token choice: the k = max(floor(ratio * n_valid), 1) valid tokens of largest
    covariance. Returns a [B, T] bool mask."""
    mask = mask.bool()
    selected = torch.zeros_like(mask)
    n_valid = int(mask.sum().item())
    if n_valid == 0:
        return selected
    cov = token_covariance(advantages, logp, mask).reshape(-1)
    valid_idx = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
    k = min(_num_cov_tokens(ratio, n_valid), n_valid)
    top = torch.topk(cov[valid_idx], k, largest=True).indices
    selected.view(-1)[valid_idx[top]] = True
    return selected


def ppo_clip_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    log_ratio_clamp: float = 20.0,
    cov_ratio: float = 2e-4,
    cov_lb: float = 1.0,
    cov_ub: float = 5.0,
    kl_coef: float = 0.1,
    generator: torch.Generator | None = None,
) -> PolicyLossOutput:
    """PPO-clip per token (docs/algorithm.md §1): max(-A*r, -A*clip(r, 1-clip_low, 1+clip_high)),
    with r = exp(clamp(logp - logp_old, +-log_ratio_clamp)); if dual_clip = c (> 1) is given, tokens
    with A < 0 are further capped at -A*c. cov_* / kl_coef / generator are unused here (the
    signature is shared by every entry of POLICY_LOSSES).
    """
    del cov_ratio, cov_lb, cov_ub, kl_coef, generator
    mask = mask.bool()
    loss, clipped, dual, ratio, log_ratio = _ppo_terms(
        logp, logp_old, advantages, mask, clip_low, clip_high, dual_clip, log_ratio_clamp
    )
    none = torch.zeros_like(mask)
    return _output(loss, clipped, dual, none, mask, ratio, log_ratio)


def clip_cov_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    log_ratio_clamp: float = 20.0,
    cov_ratio: float = 2e-4,
    cov_lb: float = 1.0,
    cov_ub: float = 5.0,
    kl_coef: float = 0.1,
    generator: torch.Generator | None = None,
) -> PolicyLossOutput:
    """Clip-Cov (docs/algorithm.md §7): PPO-clip without dual clip; among valid tokens that PPO did
    not clip, k random tokens with cov_lb < cov < cov_ub get loss 0 (no gradient).

    dual_clip and kl_coef are ignored: the reference applies no dual clip in this mode. The
    selection uses this call's tokens (k and the covariance means are per call, as in verl),
    so pass the generator for reproducible draws.
    """
    del dual_clip, kl_coef
    mask = mask.bool()
    loss, clipped, dual, ratio, log_ratio = _ppo_terms(
        logp, logp_old, advantages, mask, clip_low, clip_high, None, log_ratio_clamp
    )
    selected = clip_cov_select(
        advantages,
        logp,
        mask,
        mask & ~clipped,
        ratio=cov_ratio,
        lb=cov_lb,
        ub=cov_ub,
        generator=generator,
    )
    loss = torch.where(selected, torch.zeros_like(loss), loss)
    return _output(loss, clipped, dual, selected, mask, ratio, log_ratio)


def kl_cov_loss(
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    log_ratio_clamp: float = 20.0,
    cov_ratio: float = 2e-4,
    cov_lb: float = 1.0,
    cov_ub: float = 5.0,
    kl_coef: float = 0.1,
    generator: torch.Generator | None = None,
) -> PolicyLossOutput:
    """KL-Cov (docs/algorithm.md §7; arXiv 2505.22617 eq. for L_KL-Cov): every valid token gets the
    unclipped -A*r, and the top-k covariance tokens (k = max(floor(cov_ratio * n_valid), 1)) get
    -A*r + kl_coef*|logp - logp_old|. No PPO clip and no dual clip in this mode: the KL penalty on
    the high-covariance tokens is what keeps the policy near the old one (as in the paper's and
    verl's kl_cov). cov_lb/cov_ub/generator are unused; clip_low/clip_high only feed the clip-
    fraction statistic (which tokens the PPO clip *would* have clipped).
    """
    del dual_clip, cov_lb, cov_ub, generator
    mask = mask.bool()
    _, would_clip, dual, ratio, log_ratio = _ppo_terms(
        logp, logp_old, advantages, mask, clip_low, clip_high, None, log_ratio_clamp
    )
    selected = kl_cov_select(advantages, logp, mask, ratio=cov_ratio)
    adv = torch.where(mask, advantages, torch.zeros_like(advantages)).detach()
    loss = -adv * ratio + torch.where(selected, kl_coef * log_ratio.abs(), torch.zeros_like(ratio))
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    clipped = would_clip & ~selected
    return _output(loss, clipped, dual, selected, mask, ratio, log_ratio)


PolicyLoss = Callable[..., PolicyLossOutput]

# Keyed by the config's covariance-token mode. Uniform call:
#   fn(logp, logp_old, advantages, mask, *, clip_low, clip_high, dual_clip, log_ratio_clamp,
#      cov_ratio, cov_lb, cov_ub, kl_coef, generator) -> PolicyLossOutput
POLICY_LOSSES: dict[str, PolicyLoss] = {
    "none": ppo_clip_loss,
    "clip-cov": clip_cov_loss,
    "kl-cov": kl_cov_loss,
}
COV_MODES = tuple(POLICY_LOSSES)


def compute_policy_loss(
    cov_mode: str,
    logp: Tensor,
    logp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    **kwargs: object,
) -> PolicyLossOutput:
    """Run POLICY_LOSSES[cov_mode] with the shared keyword arguments."""
    try:
        fn = POLICY_LOSSES[cov_mode]
    except KeyError:
        raise ValueError(
            f"unknown cov mode {cov_mode!r}; expected one of {sorted(POLICY_LOSSES)}"
        ) from None
    return fn(logp, logp_old, advantages, mask, **kwargs)


# --------------------------------------------------------------------------- aggregation ----
#
# Why explicit divisors. A learner splits a mini-batch into micro-batches (and across ranks),
# backpropagates each and sums the gradients before one optimizer step. If each micro-batch
# divided by its own token count, a micro-batch with few tokens would weigh as much as one with
# many, and the result would depend on how the batch was split and padded. So every divisor is
# an argument: pass the counts of the WHOLE mini-batch (`loss_divisors(mini_batch_mask)`) and a
# constant `norm_length`; then sum(aggregate(micro_i)) == aggregate(mini_batch), exactly, for
# every mode, and extra masked rows/columns change nothing. Under data parallelism pass the
# counts summed over ranks and multiply the loss by the world size, since DDP averages
# gradients over ranks. None means "this call's own counts" (a single full batch).


def loss_divisors(mask: Tensor) -> dict[str, int]:
    """Global divisors of a mini-batch, to pass to aggregate_loss for each of its micro-batches.

    num_tokens: valid tokens. num_sequences: rows with at least one valid token (fully masked
    rows, i.e. padding or filtered samples, do not dilute the mean).
    """
    mask = mask.bool()
    return {
        "num_tokens": int(mask.sum().item()),
        "num_sequences": int(mask.any(dim=-1).sum().item()),
    }


def _divisor(value: float | int | None, local: Tensor) -> Tensor | float:
    if value is None:
        return local.clamp(min=1)
    return max(float(value), 1.0)


def _token_mean(
    loss: Tensor,
    mask: Tensor,
    num_tokens: float | None,
    num_sequences: float | None,
    norm_length: float | None,
) -> Tensor:
    del num_sequences, norm_length
    return loss.sum() / _divisor(num_tokens, mask.sum().to(loss.dtype))


def _seq_mean_token_mean(
    loss: Tensor,
    mask: Tensor,
    num_tokens: float | None,
    num_sequences: float | None,
    norm_length: float | None,
) -> Tensor:
    del num_tokens, norm_length
    tokens_per_seq = mask.sum(dim=-1).to(loss.dtype)
    seq_means = loss.sum(dim=-1) / tokens_per_seq.clamp(min=1)
    local_seqs = (tokens_per_seq > 0).sum().to(loss.dtype)
    return seq_means.sum() / _divisor(num_sequences, local_seqs)


def _seq_mean_token_sum_norm(
    loss: Tensor,
    mask: Tensor,
    num_tokens: float | None,
    num_sequences: float | None,
    norm_length: float | None,
) -> Tensor:
    # Dr.GRPO: (1/G) sum_i sum_t loss_it / L with L a constant, so a sequence's weight does not
    # shrink with its own length. None falls back to the padded width, as verl does; pass the
    # config's max response length to make it a true constant.
    del num_tokens
    length = float(norm_length) if norm_length is not None else float(loss.shape[-1])
    local_seqs = mask.any(dim=-1).sum().to(loss.dtype)
    return loss.sum() / (max(length, 1.0) * _divisor(num_sequences, local_seqs))


_AGGREGATIONS = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}
LOSS_AGGREGATIONS = tuple(_AGGREGATIONS)


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
    norm_length: float | None = None,
) -> Tensor:
    """Reduce a [B, T] per-token loss to a scalar (docs/algorithm.md §1 "Aggregation").

    token-mean:               sum(loss*mask) / num_tokens
    seq-mean-token-mean:      sum_i mean_t(loss_i*mask_i) / num_sequences
    seq-mean-token-sum-norm:  sum(loss*mask) / (norm_length * num_sequences)   (Dr.BoT / Dr.GRPO)

    num_tokens / num_sequences default to this batch's counts (see loss_divisors) and
    norm_length to the padded width; pass the mini-batch's values when accumulating
    micro-batches (see the note above). Returns 0 for an empty mask.
    """
    try:
        fn = _AGGREGATIONS[mode]
    except KeyError:
        raise ValueError(
            f"unknown loss aggregation {mode!r}; expected one of {list(_AGGREGATIONS)}"
        ) from None
    mask = mask.bool()
    loss = torch.where(mask, per_token_loss, torch.zeros_like(per_token_loss))
    return fn(loss, mask, num_tokens, num_sequences, norm_length)


# ------------------------------------------------------------------------------ entropy -----


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the softmax over the last dim: logsumexp(z) - sum(softmax(z) * z).

    Logits must be finite (a -inf logit makes 0 * -inf). Returns logits.shape[:-1].
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


def entropy_loss(
    entropy: Tensor,
    mask: Tensor,
    mode: str,
    *,
    coef: float = 0.001,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
    norm_length: float | None = None,
) -> Tensor:
    """The entropy bonus as a term to ADD to the loss: -coef * aggregate(entropy), aggregated
    with the same mode and divisors as the policy loss (docs/algorithm.md §1: coef 0.001 agents, 0
    math).
    """
    if coef == 0:
        return entropy.new_zeros(())
    agg = aggregate_loss(
        entropy,
        mask,
        mode,
        num_tokens=num_tokens,
        num_sequences=num_sequences,
        norm_length=norm_length,
    )
    return -coef * agg


__all__ = [
    "COV_MODES",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "PolicyLossOutput",
    "aggregate_loss",
    "clip_cov_loss",
    "clip_cov_select",
    "compute_policy_loss",
    "entropy_from_logits",
    "entropy_loss",
    "kl_cov_loss",
    "kl_cov_select",
    "loss_divisors",
    "masked_mean",
    "ppo_clip_loss",
    "token_covariance",
]
