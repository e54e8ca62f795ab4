"""The algorithm variants an experiment compares: one table, each a named set of config values.

Every variant assigns the same keys (`VARIANT_KEYS`): the fields that tell GRPO, Dr.BoT, GiGPO
and SPEAR apart. So a variant never inherits an algorithm choice from the base preset, and two
variants differ exactly where the table says. What a variant leaves alone (learning rate, entropy
bonus, schedule lengths T and T_tc, buffer size, Clip-Cov ratios/bounds, env reward penalties) is
the base preset's and the same for every variant.

The pieces (docs/algorithm.md sections in brackets):
- GRPO [§1]: std-normalised group advantages, symmetric clip 0.2/0.2, token-mean aggregation, no
  Dr.BoT filters, no group filter, no SIL, no tool bonus, no Clip-Cov.
- Dr.BoT [§1, §2]: no std normalisation, clip-higher 0.2/0.28, seq-mean-token-sum-norm
  aggregation, the void-turn/overlong/repetitive/unreadable masks and the 75% group filter.
- SPEAR [§3-§7] on top: the replay buffer and SIL loss with its w_SIL ramp, advantage
  recalibration against the running P50 baseline, the decaying tool-call bonus, Clip-Cov on
  the on-policy and the replay update.
- GiGPO [§1]: the GiGPO estimator (episode + anchor-state step advantages) instead of GRPO's,
  std-normalised in every variant as in the reference (Dr.BoT turns off GRPO's std division
  only).

`dotted_overrides(name)` gives a variant as `load_config` override strings.
"""

from __future__ import annotations

import json
from typing import Any

# Plain GRPO (docs/algorithm.md §1): every SPEAR and Dr.BoT piece off.
_GRPO: dict[str, Any] = {
    "algo.advantage.estimator": "grpo",
    "algo.advantage.norm_by_std": True,
    # GiGPO's own std normalisation (the reference's gigpo.mode mean_std_norm in every released
    # GiGPO script, Dr.BoT and SPEAR included); only read by the gigpo estimator
    "algo.advantage.gigpo_std_norm": True,
    "algo.policy_loss.clip_low": 0.2,
    "algo.policy_loss.clip_high": 0.2,
    "algo.policy_loss.aggregation": "token-mean",
    "algo.policy_loss.on_policy_cov.mode": "none",
    "algo.policy_loss.replay_cov.mode": "none",
    "algo.filters.void_turn": False,
    "algo.filters.overlong": False,
    "algo.filters.repetition": False,
    "algo.filters.unreadable": False,
    "algo.filters.group_keep_ratio": 1.0,
    "algo.tool_reward.enabled": False,
    "algo.sil.enabled": False,
    "buffer.recalibration": "baseline",
    "buffer.recalibration_weight": 1.0,
}

# Dr.BoT's bag of tricks (§1 clip-higher, no std norm, aggregation; §2 masks and group filter).
_DRBOT: dict[str, Any] = {
    "algo.advantage.norm_by_std": False,
    "algo.policy_loss.clip_high": 0.28,
    "algo.policy_loss.aggregation": "seq-mean-token-sum-norm",
    "algo.filters.void_turn": True,
    "algo.filters.overlong": True,
    "algo.filters.repetition": True,
    "algo.filters.unreadable": True,
    "algo.filters.group_keep_ratio": 0.75,
}

# SPEAR's own pieces, each of which one ablation turns off.
_SIL = {"algo.sil.enabled": True}  # §3 replay buffer + §5 SIL loss with the w_SIL ramp
_RECALIBRATION = {"buffer.recalibration": "baseline"}  # §4 A_hat = R - P50(history means)
# §4 "weight" mode with weight 1: replayed rows keep the advantage they had when collected
_NO_RECALIBRATION = {"buffer.recalibration": "weight", "buffer.recalibration_weight": 1.0}
_TOOL_CURRICULUM = {"algo.tool_reward.enabled": True}  # §6 r_tc * lambda(t), lambda decays to 0
_CLIP_COV = {  # §7, with the preset's ratio/bounds for each phase
    "algo.policy_loss.on_policy_cov.mode": "clip-cov",
    "algo.policy_loss.replay_cov.mode": "clip-cov",
}
_SPEAR = {**_SIL, **_RECALIBRATION, **_TOOL_CURRICULUM, **_CLIP_COV}

_GIGPO = {"algo.advantage.estimator": "gigpo"}  # §1 GiGPO: episode + anchor-state step groups


def _variant(*parts: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for part in (_GRPO, *parts):
        out.update(part)
    return out


# name -> (config values, one line for `--help`, summaries and plots)
VARIANTS: dict[str, tuple[dict[str, Any], str]] = {
    "grpo": (_variant(), "GRPO (plain: std-normalised, clip 0.2/0.2, token-mean)"),
    "drbot": (_variant(_DRBOT), "Dr.BoT(GRPO): clip-higher, seq-mean-token-sum-norm, filters"),
    "drbot_spear": (_variant(_DRBOT, _SPEAR), "Dr.BoT(GRPO) + SPEAR (full)"),
    "drbot_spear_no_sil": (
        _variant(_DRBOT, _SPEAR, {"algo.sil.enabled": False}),
        "Dr.BoT + SPEAR without SIL (no replay buffer, no SIL loss)",
    ),
    "drbot_spear_no_recalibration": (
        _variant(_DRBOT, _SPEAR, _NO_RECALIBRATION),
        "Dr.BoT + SPEAR without advantage recalibration (replay keeps stored advantages)",
    ),
    "drbot_spear_no_tool_curriculum": (
        _variant(_DRBOT, _SPEAR, {"algo.tool_reward.enabled": False}),
        "Dr.BoT + SPEAR without the tool-call bonus curriculum",
    ),
    "drbot_spear_no_clip_cov": (
        _variant(
            _DRBOT,
            _SPEAR,
            {
                "algo.policy_loss.on_policy_cov.mode": "none",
                "algo.policy_loss.replay_cov.mode": "none",
            },
        ),
        "Dr.BoT + SPEAR without Clip-Cov (on-policy and replay)",
    ),
    # The GRPO -> +SPEAR row of the paper's table: SPEAR's pieces on plain GRPO, no Dr.BoT.
    "grpo_spear": (_variant(_SPEAR), "GRPO + SPEAR (no Dr.BoT)"),
    # The paper's GiGPO rows; GiGPO's anchor states need multi-turn envs (textworld, frozenlake).
    "gigpo": (_variant(_GIGPO), "GiGPO (std-normalised, clip 0.2/0.2, token-mean)"),
    "gigpo_spear": (_variant(_GIGPO, _SPEAR), "GiGPO + SPEAR (no Dr.BoT)"),
    "drbot_gigpo": (_variant(_GIGPO, _DRBOT), "Dr.BoT(GiGPO)"),
    "drbot_gigpo_spear": (_variant(_GIGPO, _DRBOT, _SPEAR), "Dr.BoT(GiGPO) + SPEAR"),
}

VARIANT_KEYS: tuple[str, ...] = tuple(_GRPO)


def variant_names() -> list[str]:
    return list(VARIANTS)


def variant_values(name: str) -> dict[str, Any]:
    """The config values of a variant (KeyError for an unknown name)."""
    return dict(VARIANTS[name][0])


def describe_variant(name: str) -> str:
    return VARIANTS[name][1]


def to_override(key: str, value: Any) -> str:
    """`key=value` with the value written as JSON, which `load_config` reads back as YAML."""
    return f"{key}={json.dumps(value)}"


def dotted_overrides(name: str) -> list[str]:
    return [to_override(k, v) for k, v in variant_values(name).items()]
