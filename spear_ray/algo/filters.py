"""Dr.BoT filters (docs/algorithm.md, "Dr.BoT filters"): the one implementation that runs.

A filter zeroes loss: the sample (or turn) stays in the batch and in its group's reward
statistics, so dropping a broken response does not shift its siblings' advantages.
Infrastructure failures are a different thing (the `valid` flag of advantages.py): those leave
the statistics too.

Two scopes, one per reference recipe (both mask a *row*; the recipes differ in what a row is):
- "turn" (the agent recipe, where every env step is its own training row): each turn is judged
  on its own response and a flagged turn's tokens lose their loss; the other turns still train.
- "trajectory" (the math recipe, where a row is one whole multi-turn response): the episode is
  judged as a whole and a flagged episode loses all its loss.

The reasons, each a pure function of the tokens/text (the caller says which to check):
- void:       turn: its action was invalid (no parsable action); trajectory: no final answer
              (the env never ended the episode itself: truncated by max turns or the budget),
- overlong:   turn: it used the whole per-turn token limit; trajectory: the response budget ran
              out,
- repetitive: some `ngram` of token ids occurs `max_repeats` or more times in the response,
- unreadable: the decoded text holds U+FFFD or UTF-8-as-Latin-1 mojibake.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from spear_ray.algo.advantages import group_mean_std


@dataclass(frozen=True)
class DrBoTChecks:
    """Which Dr.BoT filters run, with their constants (explicit scalars, no config object)."""

    void: bool = True
    overlong: bool = True
    repetition: bool = True
    unreadable: bool = True
    ngram: int = 20
    max_repeats: int = 10


def drbot_reasons(
    token_ids: Sequence[int],
    text: str,
    *,
    void: bool,
    overlong: bool,
    checks: DrBoTChecks,
) -> list[str]:
    """The Dr.BoT reasons one response (a turn, or a whole trajectory's generated tokens) trips.

    `void` / `overlong` are the caller's facts about the response (they depend on the scope, see
    the module docstring); repetition and unreadability are computed here. Empty = it trains.
    """
    reasons = []
    if checks.void and void:
        reasons.append("void_turn")
    if checks.overlong and overlong:
        reasons.append("overlong")
    if checks.repetition and has_repeated_ngram(token_ids, checks.ngram, checks.max_repeats):
        reasons.append("repetitive")
    if checks.unreadable and is_unreadable(text):
        reasons.append("unreadable")
    return reasons


# Polynomial rolling hash mod 2^64 (numpy uint64 arithmetic wraps). The base is odd, so it is
# invertible mod 2^64 and every window hash comes from one prefix sum: O(L) vectorised work.
_BASE = 0x9E3779B97F4A7C15
_BASE_INV = pow(_BASE, -1, 1 << 64)


def _window_hashes(ids: np.ndarray, n: int) -> np.ndarray:
    """h_i = sum_k ids[i+k] * BASE^(n-1-k) mod 2^64 for every window of n tokens."""
    length = ids.shape[0]
    inv_pows = np.full(length, _BASE_INV, dtype=np.uint64)
    inv_pows[0] = 1
    inv_pows = np.cumprod(inv_pows, dtype=np.uint64)  # BASE^-j
    pows = np.full(length, _BASE, dtype=np.uint64)
    pows[0] = 1
    pows = np.cumprod(pows, dtype=np.uint64)  # BASE^j
    prefix = np.zeros(length + 1, dtype=np.uint64)
    prefix[1:] = np.cumsum(ids * inv_pows, dtype=np.uint64)
    window = prefix[n:] - prefix[:-n]  # sum_j ids_j * BASE^-j over each window
    # Multiply by BASE^(i+n-1) to turn BASE^-j into BASE^(i+n-1-j): a position-free hash.
    return window * pows[n - 1 :]


def has_repeated_ngram(
    token_ids: Sequence[int] | np.ndarray | Tensor, n: int = 20, max_repeats: int = 10
) -> bool:
    """True when some n-gram of token ids occurs at >= max_repeats positions (overlapping
    occurrences count: a run of n + 9 equal tokens holds its n-gram 10 times).

    O(L): every window is hashed with a rolling hash and counted; any hash reaching the threshold
    is confirmed on the actual token tuples, so a hash collision can never cause a false positive.
    """
    if n < 1 or max_repeats < 1:
        raise ValueError("n and max_repeats must be >= 1")
    if isinstance(token_ids, Tensor):
        token_ids = token_ids.detach().cpu().numpy()
    ids = np.asarray(token_ids, dtype=np.int64)
    if ids.shape[0] - n + 1 < max_repeats:
        return False
    hashes = _window_hashes(ids.astype(np.uint64), n)
    counts = Counter(hashes.tolist())
    for value, count in counts.items():
        if count < max_repeats:
            continue
        starts = np.nonzero(hashes == value)[0]
        exact = Counter(tuple(ids[s : s + n].tolist()) for s in starts)
        if max(exact.values()) >= max_repeats:
            return True
    return False


# What "unreadable" means here, kept deliberately small:
# - U+FFFD, the replacement character a tokenizer emits for bytes that are not valid UTF-8
#   (the model produced a broken multi-byte sequence);
# - UTF-8 text decoded as Latin-1/cp1252 ("mojibake"): a lead byte C2..F4 shown as one of
#   Â..ô followed by a continuation byte shown in U+0080..U+00BF (e.g. "Ã©" for "é"), or the
#   three-byte punctuation prefix E2 80 shown as "â€" (e.g. "â€™" for "’").
# Legitimate text almost never has a Latin-1 letter directly followed by a C1 control or by
# one of ¡..¿, so the false-positive rate on normal text is negligible.
_UNREADABLE = re.compile("\ufffd|[\u00c2-\u00f4][\u0080-\u00bf]|\u00e2\u20ac")


def is_unreadable(text: str) -> bool:
    """True when decoded text contains U+FFFD or a typical UTF-8-as-Latin-1 mojibake pair."""
    return _UNREADABLE.search(text) is not None


def num_groups_kept(n_groups: int, keep_ratio: float) -> int:
    """floor(keep_ratio * n_groups), at least 1 and at most n_groups (0 if there are no groups).

    floor matches the reference (`int(ratio * num_groups)`); the 1e-9 guards products such as
    0.29 * 100 = 28.999999999999996; the minimum of 1 keeps a tiny batch from training on nothing.
    """
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
    if n_groups <= 0:
        return 0
    return min(n_groups, max(1, math.floor(keep_ratio * n_groups + 1e-9)))


def group_filter_keep(
    rewards: Tensor, group_ids: Tensor, valid: Tensor | None = None, keep_ratio: float = 0.75
) -> Tensor:
    """Keep the groups with the highest reward std (the reference's `rollout_filter_ratio`).

    The std is the population std over valid members (np.std, as the reference ranks groups;
    0 with fewer than two). The
    `num_groups_kept(n_groups, keep_ratio)` groups of largest std are kept; ties are broken
    by ascending group id, so the result is deterministic. Returns [N] bool.
    """
    if rewards.numel() == 0:
        return torch.zeros(0, dtype=torch.bool, device=rewards.device)
    unique_ids, inverse = torch.unique(group_ids, return_inverse=True)
    _, std, _ = group_mean_std(rewards, group_ids, valid, unbiased=False)
    n_groups = unique_ids.numel()
    group_std = torch.zeros(n_groups, dtype=std.dtype, device=std.device)
    group_std[inverse] = std  # every member of a group carries the same std
    # torch.unique sorts ids, so a stable sort on -std breaks ties by ascending group id.
    order = torch.argsort(-group_std, stable=True)
    keep_group = torch.zeros(n_groups, dtype=torch.bool, device=rewards.device)
    keep_group[order[: num_groups_kept(n_groups, keep_ratio)]] = True
    return keep_group[inverse]
