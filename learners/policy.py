"""The learner's per-micro-batch math, in plain torch (no Ray, no DeepSpeed).

This is where the clipped policy loss and its aggregation (docs/algorithm.md §1) and the same
loss on replay rows (§5) meet the model:

    logits ──token_logprobs──▶ logp[b, i] = log softmax(logits / T)(token i | tokens < i)
           ──token_entropy───▶ H[b, i]    = entropy of that distribution
    micro_batch_loss(logits, micro, loss, divisors) = aggregate(policy loss) - coef*entropy

T is the sampling temperature (`PhaseLoss.temperature`): the log-probs are those of the
distribution the sampler drew from, as the reference's learner divides its logits by the
rollout temperature (docs/algorithm.md "Log-probs and temperature").

A learner rank splits its rows into mini-batches (one optimizer step each), packs each mini-batch
into micro-batches by a token budget (one forward/backward each) and accumulates gradients. The
divisors of the aggregation are those of the WHOLE mini-batch summed over ranks, scaled to the
on-policy mini-batch size M (`mini_batch_divisors`), so the micro-batch losses add up exactly to
the mini-batch loss however the rows were packed, sharded or padded, and every row of either
phase weighs 1/M.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from spear_ray.algo.losses import (
    aggregate_loss,
    compute_policy_loss,
    entropy_from_logits,
    entropy_loss,
)
from spear_ray.containers import TrainBatch
from spear_ray.recipe import PhaseLoss

Phase = Literal["on_policy", "replay"]
PHASES: tuple[str, ...] = ("on_policy", "replay")

# --------------------------------------------------------------------------- log-probs ------


def _float_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    # bf16/fp16 logits lose too much in log_softmax; fp32 and fp64 are kept as they are.
    logits = logits.float() if logits.dtype in (torch.bfloat16, torch.float16) else logits
    # T = 0 is greedy sampling, never trained on; treat it as 1 rather than divide by zero.
    return logits / temperature if temperature not in (0.0, 1.0) else logits


def token_logprobs(logits: Tensor, input_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """logp[b, i] = log_softmax(logits[b, i-1] / T)[input_ids[b, i]], and 0 at i = 0.

    logits [B, T, V] are the model's outputs for input_ids [B, T]; the result [B, T] is aligned
    with TrainBatch.old_logprobs (entry i belongs to token i).
    """
    logits = _float_logits(logits, temperature)[:, :-1]
    targets = input_ids[:, 1:].unsqueeze(-1)
    picked = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return F.pad(picked, (1, 0))


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """H[b, i] = entropy of softmax(logits[b, i-1] / T) (the distribution token i was drawn
    from); 0 at i = 0. Same alignment as token_logprobs."""
    return F.pad(entropy_from_logits(_float_logits(logits, temperature)[:, :-1]), (1, 0))


# --------------------------------------------------------------------------- batching -------


def split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of `parts` contiguous near-equal pieces of `total` items (larger ones first)."""
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    base, extra = divmod(total, parts)
    return [base + (k < extra) for k in range(parts)]


def num_mini_batches(rows: int, rows_per_mini_batch: int) -> int:
    """Optimizer steps for a batch of `rows` rows: ceil(rows / M), at least 1. The on-policy
    batch gives learner.mini_batches_per_step; a replay batch is cut into mini-batches of the
    on-policy size, as the reference splits it by ppo_mini_batch_size."""
    return max(1, math.ceil(rows / max(rows_per_mini_batch, 1)))


def rank_rows(
    num_rows: int, *, num_ranks: int, mini_batches: int, rank: int
) -> tuple[list[int], list[int]]:
    """The rows of a step's batch that `rank` trains on, and its local mini-batch sizes.

    Global mini-batch m is the m-th contiguous chunk of rows; each rank takes a contiguous slice
    of every mini-batch. So rank r's m-th local mini-batch is part of global mini-batch m, and
    the sharded update (gradients summed over ranks) equals the single-process one. Sizes are
    equal when num_ranks * mini_batches divides num_rows (the config guarantees it for on-policy
    batches); otherwise they differ by at most one row, and a rank may get none.
    """
    rows: list[int] = []
    sizes: list[int] = []
    start = 0
    for mini_size in split_sizes(num_rows, mini_batches):
        shard_sizes = split_sizes(mini_size, num_ranks)
        offset = start + sum(shard_sizes[:rank])
        rows.extend(range(offset, offset + shard_sizes[rank]))
        sizes.append(shard_sizes[rank])
        start += mini_size
    return rows, sizes


def pack_micro_batches(lengths: Sequence[int], tokens_per_micro_batch: int) -> list[list[int]]:
    """Group row indices into micro-batches of at most `tokens_per_micro_batch` padded tokens.

    Rows are sorted longest first and cut greedily into consecutive groups, so each micro-batch
    holds rows of similar length and its padded size (rows x its longest row) stays within the
    budget; every row appears exactly once. A row longer than the budget is an error (the
    config checks that the budget fits the longest possible sequence).
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    for i in order:
        length = max(int(lengths[i]), 1)
        if length > tokens_per_micro_batch:
            raise ValueError(
                f"row {i} has {length} tokens, more than learner.tokens_per_micro_batch="
                f"{tokens_per_micro_batch}; raise the budget to at least the longest sequence"
            )
        # rows come longest first, so a group's first row is its longest
        if groups and (len(groups[-1]) + 1) * max(int(lengths[groups[-1][0]]), 1) <= (
            tokens_per_micro_batch
        ):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def trim_padding(batch: TrainBatch) -> TrainBatch:
    """The same rows without the padding columns beyond the longest real row."""
    width = int(batch.attention_mask.sum(dim=-1).max().item()) if batch.rows else 0
    columns = {
        f.name: getattr(batch, f.name)[:, : max(width, 1)]
        for f in fields(batch)
        if getattr(batch, f.name).dim() == 2
    }
    return replace(batch, **columns)


def micro_batches(batch: TrainBatch, tokens_per_micro_batch: int) -> list[TrainBatch]:
    """`batch` packed by token budget (see pack_micro_batches), each trimmed of padding."""
    return [piece for _, piece in micro_batches_with_rows(batch, tokens_per_micro_batch)]


def micro_batches_with_rows(
    batch: TrainBatch, tokens_per_micro_batch: int
) -> list[tuple[list[int], TrainBatch]]:
    """micro_batches, each with the indices of its rows in `batch`."""
    lengths = batch.attention_mask.sum(dim=-1).tolist()
    return [
        (rows, trim_padding(batch.select(rows)))
        for rows in pack_micro_batches(lengths, tokens_per_micro_batch)
    ]


# --------------------------------------------------------------------------- the loss -------


def mini_batch_divisors(rows: float, tokens: float, rows_per_mini_batch: int) -> dict[str, float]:
    """The aggregation divisors of one mini-batch of `rows` rows holding `tokens` loss tokens
    (both summed over ranks), for a phase whose on-policy mini-batch has M rows.

    num_sequences = M and num_tokens = tokens * M / rows: the mini-batch's loss is its own
    aggregate times rows / M. A full on-policy mini-batch (rows = M) gets its plain aggregate;
    a replay mini-batch of 4 rows against M = 32 gets 4/32 of its own, so each replayed row
    weighs what an on-policy row weighs (the reference scales a replay micro-batch by the
    on-policy gradient-accumulation count, docs/algorithm.md §5). Rows whose loss is masked
    (filters) count in `rows`, as they do in the reference's divisor.
    """
    m = float(rows_per_mini_batch)
    return {"num_sequences": m, "num_tokens": tokens * m / max(rows, 1.0)}


@dataclass(frozen=True)
class MicroBatchLoss:
    """loss: the scalar to backpropagate (this micro-batch's share of the mini-batch loss).

    pg_loss, entropy_term: its detached parts (loss = pg_loss + entropy_term).
    sums: detached token sums over the micro-batch's loss tokens, to be divided by the
    mini-batch's global token count: entropy, clipped, dual_clipped, cov_selected, approx_kl,
    ppo_kl, tokens.
    logp: this forward's log-probs [rows, length] (detached, on the logits' device), aligned
    with the micro-batch like token_logprobs.
    """

    loss: Tensor
    pg_loss: float
    entropy_term: float
    sums: dict[str, float]
    logp: Tensor | None = None


def micro_batch_loss(
    logits: Tensor,
    micro: TrainBatch,
    settings: PhaseLoss,
    divisors: Mapping[str, float],
    *,
    generator: torch.Generator | None = None,
    own_logp_old: bool = False,
) -> MicroBatchLoss:
    """The policy loss of one micro-batch (docs/algorithm.md §1, §5), normalised by the divisors
    of its whole mini-batch (`mini_batch_divisors`). own_logp_old: logp_old is this forward's
    own detached log-probs (what a recompute with the same weights gives)."""
    device = logits.device
    mask = micro.loss_mask.to(device).bool()
    logp = token_logprobs(logits, micro.input_ids.to(device), settings.temperature)
    logp_old = logp.detach() if own_logp_old else micro.old_logprobs.to(device, logp.dtype)
    out = compute_policy_loss(
        settings.cov_mode,
        logp,
        logp_old,
        micro.advantages.to(device, logp.dtype),
        mask,
        generator=generator,
        **settings.loss_kwargs(),
    )
    agg = {
        "num_tokens": divisors["num_tokens"],
        "num_sequences": divisors["num_sequences"],
        "norm_length": settings.norm_length,
    }
    pg_loss = aggregate_loss(out.per_token_loss, mask, settings.aggregation, **agg)
    # The entropy over the vocabulary is only differentiated when it is part of the loss.
    with torch.set_grad_enabled(torch.is_grad_enabled() and settings.entropy_coef > 0):
        entropy = token_entropy(logits, settings.temperature)
        entropy_term = entropy_loss(
            entropy, mask, settings.aggregation, coef=settings.entropy_coef, **agg
        )
    with torch.no_grad():
        n = out.stats["n_tokens"]
        parts = {
            "pg_loss": pg_loss,
            "entropy_term": entropy_term,
            "entropy": torch.where(mask, entropy, torch.zeros_like(entropy)).sum(),
            "clipped": out.clipped.sum(),
            "dual_clipped": out.dual_clipped.sum(),
            "cov_selected": out.cov_selected.sum(),
            "approx_kl": out.stats["approx_kl"] * n,
            "ppo_kl": out.stats["ppo_kl"] * n,
            "tokens": n,
        }
        # one device-to-host copy for all of them
        stacked = torch.stack([v.detach().double() for v in parts.values()]).tolist()
        values = dict(zip(parts, stacked, strict=True))
    return MicroBatchLoss(
        loss=pg_loss + entropy_term,
        pg_loss=values.pop("pg_loss"),
        entropy_term=values.pop("entropy_term"),
        sums=values,
        logp=logp.detach(),
    )


# --------------------------------------------------------------------------- replay metric ----


def logprob_change_sums(before: Tensor, after: Tensor, loss_mask: Tensor) -> tuple[float, float]:
    """(sum over loss tokens of after - before, number of loss tokens), in float64.

    before/after: per-row token log-probs [rows, length] (as token_logprobs aligns them) under
    the weights before and after an update; loss_mask marks the tokens that carry loss. Every
    loss token counts once, so a row weighs by its loss tokens. A learner rank's part of
    `replay/logp_change`: the token-weighted mean over all ranks' rows is the sum of the first
    numbers over ranks divided by the sum of the second (`token_weighted_mean`)."""
    if not before.shape == after.shape == loss_mask.shape:
        raise ValueError(
            f"shapes differ: before {tuple(before.shape)}, after {tuple(after.shape)}, "
            f"loss_mask {tuple(loss_mask.shape)}"
        )
    on = loss_mask.bool()
    delta = after.double() - before.double()
    return float(torch.where(on, delta, torch.zeros_like(delta)).sum()), float(on.sum())


def token_weighted_mean(total: float, tokens: float) -> float:
    """total / tokens, NaN without tokens (a mean over no token is undefined, not 0)."""
    return total / tokens if tokens > 0 else float("nan")


__all__ = [
    "PHASES",
    "MicroBatchLoss",
    "Phase",
    "logprob_change_sums",
    "micro_batch_loss",
    "micro_batches",
    "micro_batches_with_rows",
    "mini_batch_divisors",
    "num_mini_batches",
    "pack_micro_batches",
    "rank_rows",
    "split_sizes",
    "token_entropy",
    "token_logprobs",
    "token_weighted_mean",
    "trim_padding",
]
