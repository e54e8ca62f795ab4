"""Pure algorithm math of SPEAR (see docs/algorithm.md): tensors in, tensors out.

No Ray, no IO, no config objects: every constant is an explicit argument, and each variant the
config can name is an entry of a registry dict keyed by the config's literal:

    ADVANTAGE_ESTIMATORS     "grpo", "gigpo"                                  advantages.py
    POLICY_LOSSES            "none", "clip-cov", "kl-cov"  (COV_MODES)         losses.py
    LOSS_AGGREGATIONS        "token-mean", "seq-mean-token-mean",
                             "seq-mean-token-sum-norm"                         losses.py
    TOOL_REWARD_SCHEDULES    "cosine", "constant"                              curriculum.py
    TOOL_REWARD_COMBINATIONS "additive", "qwen3"                               curriculum.py
    SIL_WEIGHT_SCHEDULES     "cosine", "constant"                              curriculum.py
    RECALIBRATIONS           "baseline", "weight"                              replay.py

Where each rule of docs/algorithm.md lives:

    §1 PPO-clip, clip-higher, dual clip,      losses.ppo_clip_loss (log-ratio clamp inside)
       log-ratio clamp
    §1 GRPO advantage (+ optional std norm)   advantages.grpo_advantages
    §1 GiGPO (episode + anchor-state step)    advantages.gigpo_advantages, discounted_step_returns
    §1 aggregation modes                      losses.aggregate_loss, loss_divisors
    §1 entropy bonus                          losses.entropy_from_logits, entropy_loss
    §2 void turn / overlong / repetition /    filters.drbot_reasons (has_repeated_ngram,
       unreadable                             is_unreadable)
    §2 group reward-std filter                filters.group_filter_keep (num_groups_kept)
    §3 admission (mean token adv > 0)         replay.admission_keep
    §3 staleness                              replay.stale_keep
    §3 baseline history statistics            replay.group_reward_stats
    §3 trigger (> factor x size above P50)    replay.replay_triggered, num_above_baseline
    §3 power-of-two random subset             replay.replay_subset_size, sample_subset
    §4 recalibration (P50 baseline / weight)  replay.recalibrate_advantages, baseline_advantages,
                                              weighted_advantages, percentile50
    §4 keep A_hat >= 0 (> 0 math)             replay.nonnegative_keep
    §5 SIL weight ramp w_SIL(t)               curriculum.sil_weight (cosine_ramp)
    §6 tool-call reward r_tc, lambda(t),      curriculum.tool_call_reward, cosine_decay,
       additive / qwen3 combination           shaped_score, additive_/qwen3_combination
    §7 Clip-Cov / KL-Cov                      losses.clip_cov_loss (clip_cov_select),
                                              losses.kl_cov_loss (kl_cov_select), token_covariance
"""

from spear_ray.algo.advantages import (
    ADVANTAGE_ESTIMATORS,
    AdvantageInputs,
    broadcast_to_tokens,
    compute_advantages,
    discounted_step_returns,
    gigpo_advantages,
    group_mean_std,
    grpo_advantages,
)
from spear_ray.algo.curriculum import (
    SIL_WEIGHT_SCHEDULES,
    TOOL_REWARD_COMBINATIONS,
    TOOL_REWARD_SCHEDULES,
    shaped_score,
    sil_weight,
    tool_call_reward,
)
from spear_ray.algo.filters import (
    DrBoTChecks,
    drbot_reasons,
    group_filter_keep,
    has_repeated_ngram,
    is_unreadable,
)
from spear_ray.algo.losses import (
    COV_MODES,
    LOSS_AGGREGATIONS,
    POLICY_LOSSES,
    PolicyLossOutput,
    aggregate_loss,
    compute_policy_loss,
    entropy_from_logits,
    entropy_loss,
    loss_divisors,
    masked_mean,
)
from spear_ray.algo.replay import (
    RECALIBRATIONS,
    admission_keep,
    group_reward_stats,
    nonnegative_keep,
    num_above_baseline,
    percentile50,
    recalibrate_advantages,
    replay_subset_size,
    replay_triggered,
    sample_subset,
    stale_keep,
)

__all__ = [
    "ADVANTAGE_ESTIMATORS",
    "COV_MODES",
    "LOSS_AGGREGATIONS",
    "POLICY_LOSSES",
    "RECALIBRATIONS",
    "SIL_WEIGHT_SCHEDULES",
    "TOOL_REWARD_COMBINATIONS",
    "TOOL_REWARD_SCHEDULES",
    "AdvantageInputs",
    "DrBoTChecks",
    "PolicyLossOutput",
    "admission_keep",
    "aggregate_loss",
    "broadcast_to_tokens",
    "compute_advantages",
    "compute_policy_loss",
    "discounted_step_returns",
    "drbot_reasons",
    "entropy_from_logits",
    "entropy_loss",
    "gigpo_advantages",
    "group_filter_keep",
    "group_mean_std",
    "group_reward_stats",
    "grpo_advantages",
    "has_repeated_ngram",
    "is_unreadable",
    "loss_divisors",
    "masked_mean",
    "nonnegative_keep",
    "num_above_baseline",
    "percentile50",
    "recalibrate_advantages",
    "replay_subset_size",
    "replay_triggered",
    "sample_subset",
    "shaped_score",
    "sil_weight",
    "stale_keep",
    "tool_call_reward",
]
