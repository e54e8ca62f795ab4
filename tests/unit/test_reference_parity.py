"""Parity of our SPEAR math with a transcription of the reference implementation.

Each `_ref_*` function below is a line-by-line transcription (DataProto plumbing, logging and
prints dropped; float64 instead of the reference's float32 where it casts) of the reference
formulas of TencentYoutuResearch/SPEAR (paths below are in that repository; nothing of it is
needed at test time). The tests compute OUR functions (spear_ray.algo.*) on small
random toy batches (seeds 0..4, float64) and compare with the transcription to 1e-6 (abs).

Transcribed from:
- verl-agent/verl/trainer/ppo/core_algos.py: compute_grpo_outcome_advantage (+ its
  custom_reward_mean_std branch used by replay), agg_loss, verl_F.masked_mean
  (verl/utils/torch_functional.py), compute_policy_loss_vanilla, compute_policy_loss_clip_cov,
  compute_policy_loss_kl_cov.
- verl-agent/gigpo/core_gigpo.py: episode_norm_reward, build_step_group, step_norm_reward,
  compute_step_discounted_returns, compute_gigpo_outcome_advantage.
- verl-agent/verl/trainer/ppo/ray_trainer_hybrid.py, class TrajectoryBufferBatch:
  update_batch (baseline history, admission mask), maintain_reward_statistics (P50s),
  prepare_for_selection (recalibration + non-negative filter), get_buffer (power-of-two subset),
  get_buffer_size / is_full_capacity (replay trigger).
- verl-agent/verl/trainer/ppo/ray_trainer.py: RayPPOTrainer._filter_rollout (group std filter).
- verl-agent/verl/workers/actor/dp_actor.py: update_policy, the SIL (replay) loss weight.
- verl-agent/agent_system/reward_manager/episode.py: the additive tool-call bonus.
- verl/recipe/spear/reward.py: default_compute_score_enforce_toolcall_posneg_decay_qwen3 (qwen3).

Documented divergences (tested below as such, or avoided by construction):
1. GRPO singleton groups: the reference uses mean 0 / std 1 (advantage = raw reward); we give 0
   (groups with < 2 valid members have no baseline). Parity tests use groups of >= 2.
2. GRPO/GiGPO rows: verl-agent's rows are turns and, with compute_mean_std_cross_all_data=True
   (its default), the group statistics are over rows, so a trajectory with more turns weighs
   more. Ours are per trajectory: parity holds with one row per trajectory (GRPO) or with the
   reference's compute_mean_std_cross_all_data=False, which counts each trajectory once (GiGPO).
3. Replay baseline guard: when P50 of the history's group stds is <= epsilon we do not divide
   (the reference divides by std + eps, turning a reward gap of 1 into ~1e6).
4. replay_subset_size(1) is 1; the reference's nearest_lower_power_of_2(1) is 0.
5. seq-mean-token-sum-norm: the reference's agg_loss gives sum / L per micro-batch and the
   actor then divides by its gradient accumulation (or scales by micro/mini size), a constant;
   ours divides by the number of sequences N of the (mini-)batch directly: ours * N == ref.
6. Group filter: the reference also trims the kept rows to a power of two (random rows) so the
   batch splits evenly across GPUs; not adopted, and not tested here. Ties in the std ranking
   are broken by first appearance in the reference and by ascending group id in ours: equal when
   ids ascend in order of first appearance, as the tests construct them.
Divergences found by this file (beyond the list above; 7-9 have `test_divergence_*` tests):
7. Clip-Cov and KL-Cov: the reference does not clamp the log-ratio there (only vanilla clamps at
   +-20); ours clamps it at +-log_ratio_clamp in every mode. Parity tests keep |log r| < 20.
8. Non-negative replay filter on a row with an empty loss mask: the reference keeps it
   (mean over the padded width of zeros is 0 >= 0); ours drops it.
9. Group-filter keep count: ours floors ratio * n_groups + 1e-9 (0.29 * 100 -> 29 groups); the
   reference's int(0.29 * 100) is 28.
10. seq-mean-token-mean with a fully masked row: the reference divides 0 by 0 (NaN); ours
   leaves the row out of the mean. Parity tests give every row >= 1 token.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pytest
import torch

from spear_ray.algo.advantages import (
    AdvantageInputs,
    discounted_step_returns,
    gigpo_advantages,
    grpo_advantages,
)
from spear_ray.algo.curriculum import shaped_score, sil_weight
from spear_ray.algo.filters import group_filter_keep, num_groups_kept
from spear_ray.algo.losses import aggregate_loss, compute_policy_loss
from spear_ray.algo.replay import (
    admission_keep,
    group_reward_stats,
    nonnegative_keep,
    num_above_baseline,
    recalibrate_advantages,
    replay_subset_size,
    replay_triggered,
)

F64 = torch.float64
TOL = 1e-6
SEEDS = list(range(5))
EPS = 1e-6  # the reference's epsilon default in compute_grpo_outcome_advantage / GiGPO


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(ours.to(F64), ref.to(F64), atol=TOL, rtol=0)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# =============================================================================================
# Reference transcriptions
# =============================================================================================


def _ref_masked_mean(values, mask, axis=None):
    # verl/utils/torch_functional.py: masked_mean
    return (values * mask).sum(axis=axis) / (mask.sum(axis=axis) + 1e-8)


def _ref_grpo(
    token_level_rewards,
    response_mask,
    index,
    traj_index,
    epsilon=1e-6,
    norm_adv_by_std_in_grpo=True,
    compute_mean_std_cross_all_data=True,
    custom_reward_mean_std=None,
):
    # verl-agent/verl/trainer/ppo/core_algos.py: compute_grpo_outcome_advantage.
    # (torch.stack instead of torch.tensor(list of 0-d tensors): same values, keeps float64.)
    custom_reward_mean_std = custom_reward_mean_std or {}
    scores = token_level_rewards.sum(dim=-1)
    id2score = defaultdict(list)
    id2mean = {}
    id2std = {}
    seen_pairs = set()
    with torch.no_grad():
        bsz = scores.shape[0]
        if custom_reward_mean_std == {}:
            for i in range(bsz):
                if (index[i], traj_index[i]) in seen_pairs:
                    continue
                id2score[index[i]].append(scores[i])
                if not compute_mean_std_cross_all_data:
                    seen_pairs.add((index[i], traj_index[i]))
            for idx in id2score:
                if len(id2score[idx]) == 1:
                    id2mean[idx] = torch.tensor(0.0)
                    id2std[idx] = torch.tensor(1.0)
                elif len(id2score[idx]) > 1:
                    id2mean[idx] = torch.mean(torch.stack(id2score[idx]))
                    id2std[idx] = torch.std(torch.stack(id2score[idx]).unsqueeze(0))
                else:
                    raise ValueError(f"no score in prompt index: {idx}")
        else:
            custom_reward = custom_reward_mean_std["mean"]
            custom_std = custom_reward_mean_std["std"]
            for i in range(bsz):
                if type(custom_reward) is list:
                    id2mean[index[i]] = custom_reward[i]
                else:
                    id2mean[index[i]] = custom_reward
                if type(custom_std) is list:
                    id2std[index[i]] = custom_std[i]
                else:
                    id2std[index[i]] = custom_std
        for i in range(bsz):
            if norm_adv_by_std_in_grpo:
                scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
            else:
                scores[i] = scores[i] - id2mean[index[i]]
        scores = scores.unsqueeze(-1) * response_mask
    return scores


def _ref_agg_loss(loss_mat, loss_mask, loss_agg_mode):
    # verl-agent/verl/trainer/ppo/core_algos.py: agg_loss
    if loss_agg_mode == "token-mean":
        loss = _ref_masked_mean(loss_mat, loss_mask)
    elif loss_agg_mode == "seq-mean-token-sum":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        loss = torch.mean(seq_losses)
    elif loss_agg_mode == "seq-mean-token-mean":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1) / torch.sum(loss_mask, dim=-1)
        loss = torch.mean(seq_losses)
    elif loss_agg_mode == "seq-mean-token-sum-norm":
        seq_losses = torch.sum(loss_mat * loss_mask, dim=-1)
        loss = torch.sum(seq_losses) / loss_mask.shape[-1]
    else:
        raise ValueError(f"Invalid loss_agg_mode: {loss_agg_mode}")
    return loss


def _ref_vanilla(old_log_prob, log_prob, advantages, cliprange_low, cliprange_high, clip_ratio_c):
    # verl-agent/verl/trainer/ppo/core_algos.py: compute_policy_loss_vanilla, up to the per-token
    # `pg_losses` handed to agg_loss.
    assert clip_ratio_c > 1.0
    negative_approx_kl = log_prob - old_log_prob
    negative_approx_kl = torch.clamp(negative_approx_kl, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    return pg_losses


def _ref_clip_cov_candidates(
    old_log_prob, log_prob, advantages, response_mask, cliprange_low, cliprange_high, ratio_, lb, ub
):
    # verl-agent/verl/trainer/ppo/core_algos.py: compute_policy_loss_clip_cov, the candidate rule
    # and clip_num (everything before the random draw `randperm(len(top_k_idx))`).
    negative_approx_kl = log_prob - old_log_prob
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    clip_by_origin = (pg_losses2 > pg_losses1) & (response_mask > 0)
    cov_all = (advantages - _ref_masked_mean(advantages, response_mask)) * (
        log_prob - _ref_masked_mean(log_prob.detach(), response_mask)
    )
    cov_all[response_mask == 0] = -torch.inf
    cov_all[clip_by_origin] = -torch.inf
    clip_num = max(int(ratio_ * response_mask.sum().item()), 1)
    candidates = (cov_all < ub) & (cov_all > lb) & (response_mask > 0)
    return candidates, clip_num, clip_by_origin


def _ref_clip_cov_loss_given_selection(
    old_log_prob, log_prob, advantages, selected, cliprange_low, cliprange_high
):
    # verl-agent/verl/trainer/ppo/core_algos.py: compute_policy_loss_clip_cov, the per-token loss
    # with `top_k_idx` (the random draw) replaced by the given `selected` mask.
    negative_approx_kl = log_prob - old_log_prob
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    corr = torch.ones_like(advantages)
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - cliprange_low, 1 + cliprange_high)
    top_k_idx = torch.nonzero(selected)
    corr[top_k_idx[:, 0], top_k_idx[:, 1]] = 0
    pg_losses = torch.maximum(pg_losses1, pg_losses2) * corr
    return pg_losses


def _ref_kl_cov(old_log_prob, log_prob, advantages, response_mask, kl_cov_ratio, ppo_kl_coef):
    # verl-agent/verl/trainer/ppo/core_algos.py: compute_policy_loss_kl_cov, up to the per-token
    # `pg_losses` handed to agg_loss. Also returns the chosen flat indices.
    negative_approx_kl = log_prob - old_log_prob
    abs_kl = negative_approx_kl.abs()
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses_kl = -advantages * ratio + ppo_kl_coef * abs_kl
    pg_losses = pg_losses1
    all_valid = response_mask > 0
    all_valid_idx = torch.nonzero(all_valid.reshape(-1), as_tuple=True)[0]
    all_valid_adv = advantages[all_valid].detach().reshape(-1).cpu()
    all_valid_logp = log_prob[all_valid].detach().reshape(-1).cpu()
    k = min(kl_cov_ratio, len(all_valid_adv))
    large_cov_idxs = torch.zeros(0, dtype=torch.long)
    if k != 0:
        cov_lst_all = (all_valid_adv - all_valid_adv.mean()) * (
            all_valid_logp - all_valid_logp.mean()
        )
        k_percent_nums = max(1, int(len(cov_lst_all) * kl_cov_ratio))
        large_cov_idxs = torch.topk(cov_lst_all, k_percent_nums, largest=True).indices
        if len(large_cov_idxs) != 0:
            large_cov_idxs = all_valid_idx[large_cov_idxs]
            width = advantages.shape[1]
            pg_losses[large_cov_idxs // width, large_cov_idxs % width] = pg_losses_kl[
                large_cov_idxs // width, large_cov_idxs % width
            ]
    return pg_losses, large_cov_idxs


def _ref_step_discounted_returns(rewards, traj_uids, gamma):
    # verl-agent/gigpo/core_gigpo.py: compute_step_discounted_returns (float64 instead of the
    # reference's astype(np.float32); active_masks all 1).
    rewards = np.asarray(rewards, dtype=np.float64)
    returns_by_traj = {}
    for uid in np.unique(traj_uids):
        traj_indices = np.where(traj_uids == uid)[0]
        traj_rewards = rewards[traj_indices]
        traj_returns = np.zeros_like(traj_rewards)
        running_return = 0
        for t in reversed(range(len(traj_rewards))):
            running_return = traj_rewards[t] + gamma * running_return
            traj_returns[t] = running_return
        returns_by_traj[uid] = traj_returns
    all_returns = np.zeros_like(rewards)
    for i, uid in enumerate(traj_uids):
        traj_indices = np.where(traj_uids == uid)[0]
        idx_in_traj = np.where(traj_indices == i)[0][0]
        all_returns[i] = returns_by_traj[uid][idx_in_traj]
    return torch.tensor(all_returns, dtype=F64)


def _ref_episode_norm_reward(
    token_level_rewards,
    response_mask,
    index,
    traj_index,
    epsilon=1e-6,
    remove_std=True,
    compute_mean_std_cross_all_data=True,
):
    # verl-agent/gigpo/core_gigpo.py: episode_norm_reward
    response_length = token_level_rewards.shape[-1]
    scores = token_level_rewards.sum(dim=-1)
    id2score = defaultdict(list)
    id2mean = {}
    id2std = {}
    seen_pairs = set()
    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            if (index[i], traj_index[i]) in seen_pairs:
                continue
            id2score[index[i]].append(scores[i])
            if not compute_mean_std_cross_all_data:
                seen_pairs.add((index[i], traj_index[i]))
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx] = torch.tensor(0.0)
                id2std[idx] = torch.tensor(1.0)
            elif len(id2score[idx]) > 1:
                id2mean[idx] = torch.mean(torch.stack(id2score[idx]))
                id2std[idx] = torch.std(torch.stack(id2score[idx]).unsqueeze(0))
            else:
                raise ValueError(f"no score in prompt index: {idx}")
        for i in range(bsz):
            if remove_std:
                scores[i] = scores[i] - id2mean[index[i]]
            else:
                scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
        episode_advantages = scores.unsqueeze(-1).tile([1, response_length]) * response_mask
    return episode_advantages


def _ref_build_step_group(anchor_obs, index):
    # verl-agent/gigpo/core_gigpo.py: build_step_group (a counter instead of uuid4; anchors are
    # plain ints here, so to_hashable is the identity).
    step_group_uids = np.empty(len(anchor_obs), dtype=object)
    next_uid = 0
    for idx in np.unique(index):
        indices = np.where(index == idx)[0]
        obs_group = anchor_obs[indices]
        clusters = defaultdict(list)
        for i, obs in enumerate(obs_group):
            clusters[int(obs)].append(indices[i])
        for _, original_indices in clusters.items():
            uid = next_uid
            next_uid += 1
            for original_idx in original_indices:
                step_group_uids[original_idx] = uid
    return step_group_uids


def _ref_step_norm_reward(step_rewards, response_mask, index, epsilon=1e-6, remove_std=True):
    # verl-agent/gigpo/core_gigpo.py: step_norm_reward
    response_length = response_mask.shape[-1]
    scores = step_rewards.clone()
    id2score = defaultdict(list)
    id2mean = {}
    id2std = {}
    with torch.no_grad():
        bsz = scores.shape[0]
        for i in range(bsz):
            id2score[index[i]].append(scores[i])
        for idx in id2score:
            if len(id2score[idx]) == 1:
                id2mean[idx] = torch.mean(torch.stack(id2score[idx]))
                id2std[idx] = torch.tensor(1.0)
            elif len(id2score[idx]) > 1:
                id2mean[idx] = torch.mean(torch.stack(id2score[idx]))
                id2std[idx] = torch.std(torch.stack(id2score[idx]).unsqueeze(0))
            else:
                raise ValueError(f"no score in prompt index: {idx}")
        for i in range(bsz):
            if remove_std:
                scores[i] = scores[i] - id2mean[index[i]]
            else:
                scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
        step_advantages = scores.unsqueeze(-1).tile([1, response_length]) * response_mask
    return step_advantages


def _ref_gigpo(
    token_level_rewards,
    step_rewards,
    response_mask,
    anchor_obs,
    index,
    traj_index,
    epsilon=1e-6,
    step_advantage_w=1.0,
    mode="mean_norm",
    compute_mean_std_cross_all_data=True,
):
    # verl-agent/gigpo/core_gigpo.py: compute_gigpo_outcome_advantage (with the episode term's
    # compute_mean_std_cross_all_data exposed; the reference leaves it at its default True).
    if mode == "mean_std_norm":
        remove_std = False
    elif mode == "mean_norm":
        remove_std = True
    else:
        raise ValueError(f"Unknown mode: {mode}")
    episode_advantages = _ref_episode_norm_reward(
        token_level_rewards,
        response_mask,
        index,
        traj_index,
        epsilon,
        remove_std,
        compute_mean_std_cross_all_data,
    )
    step_group_uids = _ref_build_step_group(anchor_obs, index)
    step_advantages = _ref_step_norm_reward(
        step_rewards, response_mask, step_group_uids, epsilon, remove_std
    )
    return episode_advantages + step_advantage_w * step_advantages


def _ref_group_stats(rm_scores, uid_list, traj_uid_list):
    # verl-agent/verl/trainer/ppo/ray_trainer_hybrid.py: TrajectoryBufferBatch.update_batch, the
    # per-group (mean, np.std) appended to the baseline history. (_filter_rollout in
    # ray_trainer.py computes the same two lists.) Returns [[uid, mean]], [[uid, std]].
    reward_by_uid_traj_uid = {}
    for uid, traj_uid, rm_score in zip(uid_list, traj_uid_list, rm_scores, strict=False):
        if uid not in reward_by_uid_traj_uid:
            reward_by_uid_traj_uid[uid] = {}
        if traj_uid not in reward_by_uid_traj_uid[uid]:
            reward_by_uid_traj_uid[uid][traj_uid] = []
        reward_by_uid_traj_uid[uid][traj_uid].append(float(rm_score))
    reward_by_uid_mean = []
    reward_by_uid_std = []
    for uid, reward_traj in reward_by_uid_traj_uid.items():
        reward_traj_rwscore = []
        for traj_uid in reward_traj:
            reward_traj_rwscore.append(np.mean(reward_traj[traj_uid]))
        reward_by_uid_mean.append([uid, float(np.mean(reward_traj_rwscore))])
        reward_by_uid_std.append([uid, float(np.std(reward_traj_rwscore))])
    return reward_by_uid_mean, reward_by_uid_std


def _ref_p50(reward_mean_history, reward_std_history):
    # verl-agent/verl/trainer/ppo/ray_trainer_hybrid.py: maintain_reward_statistics, the two
    # values prepare_for_selection uses (the per-step / 95p outputs only feed logs).
    reward_mean_history_flatten = []
    reward_std_history_flatten = []
    for reward_mean_history_item in reward_mean_history:
        reward_mean_history_flatten += reward_mean_history_item[1]
    for reward_std_history_item in reward_std_history:
        reward_std_history_flatten += reward_std_history_item[1]
    reward_mean_50p = np.percentile(reward_mean_history_flatten, 50)
    reward_std_50p = np.percentile(reward_std_history_flatten, 50)
    return reward_mean_50p, reward_std_50p


def _ref_recalibrate(
    token_level_rewards,
    response_mask,
    uid,
    traj_uid,
    reward_mean_50p,
    reward_std_50p,
    norm_adv_by_std_in_grpo,
    weight_decay_trajectory_replay=-1.0,
    stored_advantages=None,
):
    # verl-agent/verl/trainer/ppo/ray_trainer_hybrid.py: prepare_for_selection. Returns the
    # replay advantages and the rows kept (all rows in the weight mode).
    if weight_decay_trajectory_replay <= 0 or weight_decay_trajectory_replay > 1:
        advantages = _ref_grpo(
            token_level_rewards,
            response_mask,
            uid,
            traj_uid,
            norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
            custom_reward_mean_std={"mean": reward_mean_50p, "std": reward_std_50p},
        )
        mask = advantages.mean(-1) >= 0
        return advantages, mask
    advantages = stored_advantages * weight_decay_trajectory_replay
    return advantages, torch.ones(advantages.shape[0], dtype=torch.bool)


def _ref_admission(advantages):
    # verl-agent/verl/trainer/ppo/ray_trainer_hybrid.py: update_batch, `mask = advantages.mean(-1)
    # > 0` (verl's advantages are 0 outside the response mask).
    return advantages.mean(-1) > 0


def _ref_buffer_count(stored_reward_tensors, reward_mean_history):
    # verl-agent/verl/trainer/ppo/ray_trainer_hybrid.py: get_buffer_size (baseline mode).
    num_buffer = 0
    if len(reward_mean_history):
        flat = []
        for reward_item in reward_mean_history:
            flat += reward_item[1]
        reward_mean_50p = np.percentile(flat, 50)
    else:
        reward_mean_50p = None
    for reward_tensor in stored_reward_tensors:
        reward_tensor_sum = (reward_tensor.view(reward_tensor.size(0), -1)).sum(dim=-1)
        if reward_mean_50p is None:
            reward_tensor_sum_pos = reward_tensor_sum > reward_tensor_sum.mean()
        else:
            reward_tensor_sum_pos = reward_tensor_sum > reward_mean_50p
        num_buffer += int(reward_tensor_sum_pos.sum())
    return num_buffer


def _ref_is_full_capacity(num_buffer, buffer_size):
    # verl-agent/verl/trainer/ppo/ray_trainer_hybrid.py: TrajectoryBufferBatch.is_full_capacity
    return num_buffer > buffer_size * 1.5


def _ref_subset_size(n, buffer_size):
    # verl-agent/verl/trainer/ppo/ray_trainer_hybrid.py: get_buffer, nearest_lower_power_of_2
    # then min with the buffer size.
    def nearest_lower_power_of_2(n):
        if n <= 1:
            return 0
        return 1 << (n.bit_length() - 1)

    return min(nearest_lower_power_of_2(n), buffer_size)


def _ref_filter_rollout_mask(rm_scores, uid_list, traj_uid_list, rollout_filter_ratio):
    # verl-agent/verl/trainer/ppo/ray_trainer.py: _filter_rollout, rollout_filter_type "std",
    # up to the group mask. NOT transcribed: the final trim of the kept rows to a power of two
    # (random rows), which only makes the batch divisible across GPUs and is not adopted.
    reward_by_uid_mean, reward_by_uid_std = _ref_group_stats(rm_scores, uid_list, traj_uid_list)
    if rollout_filter_ratio == 1:
        return torch.ones(len(rm_scores), dtype=torch.bool)
    num_rollout_filter = int(float(rollout_filter_ratio) * float(len(reward_by_uid_mean)))
    assert num_rollout_filter > 0
    std_chosen = sorted(reward_by_uid_std, key=lambda x: x[1], reverse=True)[:num_rollout_filter]
    top_groups = [item[0] for item in std_chosen]
    mask = torch.zeros(len(rm_scores), dtype=torch.bool)
    for idx in range(len(rm_scores)):
        mask[idx] = uid_list[idx] in top_groups
    return mask


def _ref_sil_weight(global_steps, max_replay_loss_steps, replay_loss_coef):
    # verl-agent/verl/workers/actor/dp_actor.py: update_policy, the factor the replay loss is
    # multiplied by (after its own / gradient_accumulation, which the on-policy loss shares).
    if global_steps <= max_replay_loss_steps:
        return replay_loss_coef * (-np.cos((global_steps / max_replay_loss_steps) * np.pi) + 1) / 2
    return replay_loss_coef


def _ref_tool_bonus(score, episode_lengths, global_steps, max_toolcall_steps, use_toolcall_reward):
    # verl-agent/agent_system/reward_manager/episode.py: the tool-call bonus (additive),
    # normalize_by_length off.
    if use_toolcall_reward == "none":
        score += 0
    elif use_toolcall_reward == "constant":
        score_toolcall = min(1.0, episode_lengths * 0.1)
        score += score_toolcall * 1
    else:
        assert global_steps >= 0
        if global_steps <= max_toolcall_steps:
            score_toolcall = min(1.0, episode_lengths * 0.1)
            score_toolcall *= (np.cos((global_steps / max_toolcall_steps) * np.pi) + 1) / 2
            score_toolcall = max(0, score_toolcall)
            score += score_toolcall
    return score


def _ref_tool_bonus_qwen3(res, n_tool_calls, global_steps, max_toolcall_steps, use_toolcall_reward):
    # verl/recipe/spear/reward.py: default_compute_score_enforce_toolcall_posneg_decay_qwen3,
    # after `res = default_compute_score(...)` (a float score; one 0.1 per assistant tool call).
    res_toolcall = 0.0
    for _ in range(n_tool_calls):
        res_toolcall += 0.1
    res_toolcall = min(res_toolcall, 1.0)
    assert global_steps >= 0
    if use_toolcall_reward == "none":
        res_toolcall_ratio = 0.0
    elif use_toolcall_reward == "constant":
        res_toolcall_ratio = 1
    elif use_toolcall_reward == "cosine":
        res_toolcall_ratio = 1
        if global_steps <= max_toolcall_steps:
            res_toolcall_ratio *= (np.cos((global_steps / max_toolcall_steps) * np.pi) + 1) / 2
        else:
            res_toolcall_ratio = 0
    else:
        raise NotImplementedError
    res_toolcall_ratio = max(res_toolcall_ratio, 0)
    if res <= 0:
        res += float(res_toolcall) * res_toolcall_ratio
    else:
        res += float(res_toolcall > 0) * res_toolcall_ratio
    return res


# =============================================================================================
# Toy batches
# =============================================================================================


def _grouped_rewards(seed: int, n_groups: int = 6, min_size: int = 2, max_size: int = 5):
    """Per-trajectory rewards of n_groups groups (sizes >= 2), rows shuffled, with group ids
    relabelled to ascend in order of first appearance. Group kinds: continuous, binary {0, 1},
    all-equal. Returns (rewards [N] f64, group_ids [N] long)."""
    g = _gen(seed)
    rewards, ids = [], []
    for k in range(n_groups):
        size = int(torch.randint(min_size, max_size + 1, (1,), generator=g))
        kind = k % 3
        if kind == 0:
            r = torch.randn(size, generator=g, dtype=F64)
        elif kind == 1:
            r = torch.randint(0, 2, (size,), generator=g).to(F64)
        else:
            r = torch.full((size,), 0.3, dtype=F64)
        rewards.append(r)
        ids += [k] * size
    rewards_t = torch.cat(rewards)
    ids_t = torch.tensor(ids)
    perm = torch.randperm(rewards_t.numel(), generator=g)
    rewards_t, ids_t = rewards_t[perm], ids_t[perm]
    first_seen: dict[int, int] = {}
    for i in ids_t.tolist():
        first_seen.setdefault(i, len(first_seen))
    ids_t = torch.tensor([first_seen[i] for i in ids_t.tolist()]) * 7 + 3  # arbitrary ascending
    return rewards_t, ids_t


def _response_mask(g: torch.Generator, b: int, t: int, holes: bool = True) -> torch.Tensor:
    """[b, t] bool; every row has >= 1 token (column 0), lengths vary, optional holes (tool
    output inside a multi-turn response)."""
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
    if holes:
        hole = torch.rand(b, t, generator=g) < 0.2
        hole[:, 0] = False
        mask = mask & ~hole
    return mask


def _reward_tensor(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's token_level_rewards: the scalar reward at each row's last valid token."""
    out = torch.zeros(mask.shape, dtype=F64)
    last = (mask.long() * torch.arange(mask.shape[1])).argmax(dim=1)
    out[torch.arange(mask.shape[0]), last] = rewards
    return out


def _loss_batch(seed: int, b: int = 6, t: int = 9, adv_scale: float = 1.0, spikes: bool = True):
    """(logp_old, logp, advantages, mask). Advantages vary per token and are 0 outside the mask,
    as verl's are. With spikes, fixed tokens exercise every PPO branch: clip high, clip low, dual
    clip, and a log-ratio beyond the +-20 clamp."""
    g = _gen(seed)
    mask = _response_mask(g, b, t)
    logp_old = -torch.rand(b, t, generator=g, dtype=F64) * 4.0
    logp = logp_old + torch.randn(b, t, generator=g, dtype=F64) * 0.4
    adv = adv_scale * (
        torch.randn(b, 1, generator=g, dtype=F64) + 0.5 * torch.randn(b, t, generator=g, dtype=F64)
    )
    if spikes:
        # (row, adv, log-ratio): clip high (A>0, r>1.28), clip low (A<0, r<0.8), dual clip
        # (A<0, r=e^3>10), clamp + dual clip (log r = 25 > 20), A>0 with r far below 1-0.2.
        # (With the dual clip on, the +-20 clamp never changes a loss value, only keeps exp()
        # finite: the token at log r = 25 is capped at -A*c either way.)
        for row, a, lr in [(0, 1.0, 0.5), (1, -1.0, -0.5), (2, -1.5, 3.0), (3, -0.5, 25.0)]:
            adv[row, 0], logp[row, 0] = a, logp_old[row, 0] + lr
        adv[4, 0], logp[4, 0] = 0.7, logp_old[4, 0] - 2.0
    adv = torch.where(mask, adv, torch.zeros_like(adv))
    return logp_old, logp, adv, mask


# =============================================================================================
# Advantages
# =============================================================================================


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("norm_by_std", [False, True])
def test_grpo_matches_reference(seed: int, norm_by_std: bool) -> None:
    rewards, ids = _grouped_rewards(seed)
    ours = grpo_advantages(rewards, ids, norm_by_std=norm_by_std, epsilon=EPS)
    # One row per trajectory: the reference's rows are trajectories, traj_uid = row index.
    mask = _response_mask(_gen(seed + 100), rewards.numel(), 5)
    ref = _ref_grpo(
        _reward_tensor(rewards, mask),
        mask.to(F64),
        ids.tolist(),
        list(range(rewards.numel())),
        epsilon=EPS,
        norm_adv_by_std_in_grpo=norm_by_std,
    )
    _close(ours.unsqueeze(-1) * mask, ref)
    assert ours.abs().max() > 0.1  # not a vacuous comparison


@pytest.mark.parametrize("seed", SEEDS)
def test_grpo_invalid_members_equal_reference_on_valid_subset(seed: int) -> None:
    # An invalid sample (infrastructure failure) leaves its group's statistics: ours on the full
    # batch == the reference on the valid rows; invalid rows get 0.
    rewards, ids = _grouped_rewards(seed, min_size=3, max_size=5)
    g = _gen(seed + 200)
    valid = torch.ones(rewards.numel(), dtype=torch.bool)
    for gid in ids.unique():  # drop one member of every other group (>= 2 stay valid)
        if int(gid) % 2 == 1:
            members = torch.nonzero(ids == gid).flatten()
            valid[members[torch.randint(members.numel(), (1,), generator=g)]] = False
    rewards = torch.where(valid, rewards, torch.full_like(rewards, float("nan")))
    ours = grpo_advantages(rewards, ids, valid, norm_by_std=True, epsilon=EPS)
    sub = torch.nonzero(valid).flatten()
    ref = _ref_grpo(
        rewards[sub].unsqueeze(-1),
        torch.ones(sub.numel(), 1, dtype=F64),
        ids[sub].tolist(),
        sub.tolist(),
        epsilon=EPS,
        norm_adv_by_std_in_grpo=True,
    )
    _close(ours[sub], ref[:, 0])
    assert (ours[~valid] == 0).all() and (~valid).any()


def test_divergence_grpo_singleton_group() -> None:
    # Documented divergence 1: a singleton group gets 0 from us, the raw reward (mean 0, std 1)
    # from the reference.
    rewards = torch.tensor([0.7, 1.0, 0.0], dtype=F64)
    ids = torch.tensor([5, 9, 9])
    ours = grpo_advantages(rewards, ids, norm_by_std=False)
    ref = _ref_grpo(
        rewards.unsqueeze(-1),
        torch.ones(3, 1, dtype=F64),
        [5, 9, 9],
        [0, 1, 2],
        norm_adv_by_std_in_grpo=False,
    )
    assert ours[0].item() == 0.0 and ref[0, 0].item() == pytest.approx(0.7)
    _close(ours[1:], ref[1:, 0])


def _gigpo_batch(seed: int, n_groups: int = 3, group_size: int = 4, n_anchors: int = 3):
    """Trajectories of 1..4 steps each, steps of different trajectories interleaved at random
    (each trajectory's steps stay in time order). Anchors from a small set so anchor-state
    groups have several members (and some singletons)."""
    g = _gen(seed)
    n = n_groups * group_size
    rewards = torch.randn(n, generator=g, dtype=F64)
    group_ids = torch.arange(n_groups).repeat_interleave(group_size) * 10 + 1
    lengths = torch.randint(1, 5, (n,), generator=g).tolist()
    left = list(lengths)
    traj_index = []
    while any(left):
        choices = [i for i in range(n) if left[i] > 0]
        i = choices[int(torch.randint(len(choices), (1,), generator=g))]
        traj_index.append(i)
        left[i] -= 1
    traj_index_t = torch.tensor(traj_index)
    s = traj_index_t.numel()
    step_rewards = torch.randn(s, generator=g, dtype=F64)
    step_anchor = torch.randint(0, n_anchors, (s,), generator=g)
    return rewards, group_ids, traj_index_t, step_rewards, step_anchor


@pytest.mark.parametrize("seed", SEEDS)
def test_discounted_step_returns_matches_reference(seed: int) -> None:
    _, _, traj, step_rewards, _ = _gigpo_batch(seed)
    for gamma in (0.95, 1.0, 0.5):
        ours = discounted_step_returns(traj, step_rewards, gamma)
        ref = _ref_step_discounted_returns(step_rewards.numpy(), traj.numpy(), gamma)
        _close(ours, ref)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("norm_by_std", [False, True])
def test_gigpo_matches_reference(seed: int, norm_by_std: bool) -> None:
    rewards, group_ids, traj, step_rewards, step_anchor = _gigpo_batch(seed)
    gamma, step_weight = 0.95, 0.7
    ours = gigpo_advantages(
        AdvantageInputs(
            rewards=rewards,
            group_ids=group_ids,
            step_traj_index=traj,
            step_rewards=step_rewards,
            step_anchor=step_anchor,
        ),
        norm_by_std=norm_by_std,
        epsilon=EPS,
        gamma=gamma,
        step_weight=step_weight,
    )
    # Reference rows are steps; every row of a trajectory carries the episode reward
    # (episode.py writes episode_rewards on each step row) and `step_rewards` holds the
    # discounted returns (ray_trainer_hybrid.py: compute_step_discounted_returns before
    # compute_advantage).
    s = traj.numel()
    mask = torch.ones(s, 2, dtype=F64)
    index = group_ids[traj].numpy()
    returns = _ref_step_discounted_returns(step_rewards.numpy(), traj.numpy(), gamma)
    ref = _ref_gigpo(
        _reward_tensor(rewards[traj], mask.bool()),
        returns,
        mask,
        step_anchor.numpy(),
        index,
        traj.numpy(),
        epsilon=EPS,
        step_advantage_w=step_weight,
        mode="mean_std_norm" if norm_by_std else "mean_norm",
        # Divergence 2: each trajectory counts once in the episode statistics.
        compute_mean_std_cross_all_data=False,
    )
    _close(ours.unsqueeze(-1) * mask, ref)
    # The step term is live: some anchor-state group has >= 2 members.
    keys = list(zip(index.tolist(), step_anchor.tolist(), strict=True))
    assert max(keys.count(k) for k in set(keys)) >= 2


def test_divergence_gigpo_episode_stats_over_rows() -> None:
    # Divergence 2: with the reference's default compute_mean_std_cross_all_data=True, the
    # episode statistics are over step rows. Two trajectories of one group, R = 1 (1 step) and
    # R = 0 (3 steps), step rewards 0, distinct anchors (no step term): the reference's group
    # mean is 0.25 (rows), ours 0.5 (trajectories).
    rewards = torch.tensor([1.0, 0.0], dtype=F64)
    group_ids = torch.tensor([0, 0])
    traj = torch.tensor([0, 1, 1, 1])
    step_rewards = torch.zeros(4, dtype=F64)
    anchors = torch.tensor([0, 1, 2, 3])
    inputs = AdvantageInputs(
        rewards=rewards,
        group_ids=group_ids,
        step_traj_index=traj,
        step_rewards=step_rewards,
        step_anchor=anchors,
    )
    ours = gigpo_advantages(inputs, norm_by_std=False)
    ref = _ref_gigpo(
        rewards[traj].unsqueeze(-1),
        step_rewards,
        torch.ones(4, 1, dtype=F64),
        anchors.numpy(),
        group_ids[traj].numpy(),
        traj.numpy(),
    )
    _close(ours, torch.tensor([0.5, -0.5, -0.5, -0.5], dtype=F64))
    _close(ref[:, 0], torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=F64))


# =============================================================================================
# Policy losses and aggregation
# =============================================================================================


@pytest.mark.parametrize("seed", SEEDS)
def test_vanilla_ppo_matches_reference(seed: int) -> None:
    logp_old, logp, adv, mask = _loss_batch(seed)
    clip_low, clip_high, c = 0.2, 0.28, 10.0
    out = compute_policy_loss(
        "none",
        logp,
        logp_old,
        adv,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=c,
        log_ratio_clamp=20.0,
    )
    ref = _ref_vanilla(logp_old, logp, adv, clip_low, clip_high, c)
    _close(out.per_token_loss[mask], ref[mask])
    assert (out.per_token_loss[~mask] == 0).all()
    # Every branch was exercised (the spikes of _loss_batch).
    assert out.clipped.any() and out.dual_clipped.any()
    # Our flags agree with the reference's clip-fraction numerators (on the mask).
    ratio = torch.exp(torch.clamp(logp - logp_old, -20.0, 20.0))
    l1, l2 = -adv * ratio, -adv * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    assert torch.equal(out.clipped, torch.gt(l2, l1) & mask)
    dual_ref = torch.gt(torch.maximum(l1, l2), -adv * c) & (adv < 0) & mask
    assert torch.equal(out.dual_clipped, dual_ref)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("cov_ratio", "lb", "ub"),
    [(0.05, 1.0, 5.0), (0.3, 1.0, 5.0), (0.9, 1.0, 5.0), (0.002, 1.0, 40.0)],
    ids=["ratio0.05", "ratio0.3", "ratio0.9", "replay-constants"],
)
def test_clip_cov_matches_reference_given_selection(
    seed: int, cov_ratio: float, lb: float, ub: float
) -> None:
    # Large advantages and spread log-probs so covariances land in (lb, ub); no log-ratio
    # beyond +-20 (divergence 7).
    logp_old, logp, adv, mask = _loss_batch(seed, adv_scale=2.5, spikes=False)
    logp[1, 0] = logp_old[1, 0] + 1.0  # a token PPO clips (A may be either sign)
    clip_low, clip_high = 0.2, 0.28
    out = compute_policy_loss(
        "clip-cov",
        logp,
        logp_old,
        adv,
        mask,
        clip_low=clip_low,
        clip_high=clip_high,
        dual_clip=10.0,  # ignored in this mode, as in the reference
        cov_ratio=cov_ratio,
        cov_lb=lb,
        cov_ub=ub,
        generator=_gen(seed + 300),
    )
    selected = out.cov_selected
    # 1) Per-token loss: the reference formula with our draw in place of its randperm.
    ref = _ref_clip_cov_loss_given_selection(logp_old, logp, adv, selected, clip_low, clip_high)
    _close(out.per_token_loss[mask], ref[mask])
    # 2) Our draw obeys the reference's candidate rule and count.
    candidates, clip_num, clip_by_origin = _ref_clip_cov_candidates(
        logp_old, logp, adv, mask.to(F64), clip_low, clip_high, cov_ratio, lb, ub
    )
    assert candidates.any(), "toy batch must have covariance candidates"
    assert not (selected & ~candidates).any()
    assert int(selected.sum()) == min(clip_num, int(candidates.sum()))
    assert torch.equal(out.clipped, clip_by_origin)
    assert clip_num == max(int(cov_ratio * int(mask.sum())), 1)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize(
    ("cov_ratio", "kl_coef"), [(0.05, 1.0), (0.2, 0.1), (0.8, 1.0)], ids=["r.05", "r.2", "replay"]
)
def test_kl_cov_matches_reference(seed: int, cov_ratio: float, kl_coef: float) -> None:
    logp_old, logp, adv, mask = _loss_batch(seed, spikes=False)
    logp[2, 0] = logp_old[2, 0] + 3.0  # a ratio PPO would clip: the reference does not
    out = compute_policy_loss(
        "kl-cov",
        logp,
        logp_old,
        adv,
        mask,
        clip_low=0.2,
        clip_high=0.28,
        cov_ratio=cov_ratio,
        kl_coef=kl_coef,
    )
    ref, idx = _ref_kl_cov(logp_old, logp, adv, mask.to(F64), cov_ratio, kl_coef)
    _close(out.per_token_loss[mask], ref[mask])
    ref_selected = torch.zeros(mask.numel(), dtype=torch.bool)
    ref_selected[idx] = True
    assert torch.equal(out.cov_selected, ref_selected.view(mask.shape))
    assert int(out.cov_selected.sum()) == max(1, int(int(mask.sum()) * cov_ratio))


def test_divergence_cov_modes_clamp_log_ratio() -> None:
    # Divergence 7: with |log r| > 20 the reference's clip_cov / kl_cov use exp(log r) unclamped;
    # ours clamps at +-20 in every mode. One token, A = -1, log r = 25. kl-cov: k = 1 selects it,
    # loss -A*r + |log r|. clip-cov: A < 0 with r > 1 is not PPO-clipped (no dual clip in this
    # mode) and its covariance is 0 (a single token), so nothing is zeroed: loss -A*r.
    logp_old = torch.zeros(1, 1, dtype=F64)
    logp = torch.full((1, 1), 25.0, dtype=F64)
    adv = torch.full((1, 1), -1.0, dtype=F64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    ours = compute_policy_loss("kl-cov", logp, logp_old, adv, mask, kl_coef=1.0, cov_ratio=0.5)
    ref, _ = _ref_kl_cov(logp_old, logp, adv, mask.to(F64), 0.5, 1.0)
    assert ours.per_token_loss.item() == pytest.approx(math.exp(20.0) + 20.0)
    assert ref.item() == pytest.approx(math.exp(25.0) + 25.0)
    ours_cc = compute_policy_loss("clip-cov", logp, logp_old, adv, mask, cov_ratio=0.5)
    ref_cc = _ref_clip_cov_loss_given_selection(
        logp_old, logp, adv, ours_cc.cov_selected, 0.2, 0.28
    )
    assert ours_cc.per_token_loss.item() == pytest.approx(math.exp(20.0))
    assert ref_cc.item() == pytest.approx(math.exp(25.0))


@pytest.mark.parametrize("seed", SEEDS)
def test_aggregation_matches_reference(seed: int) -> None:
    g = _gen(seed)
    b, t = 5, 11
    mask = _response_mask(g, b, t)
    loss = torch.randn(b, t, generator=g, dtype=F64)
    loss = torch.where(mask, loss, 1e3 * torch.rand(b, t, generator=g, dtype=F64))  # garbage
    m = mask.to(F64)
    for mode in ("token-mean", "seq-mean-token-mean"):
        _close(aggregate_loss(loss, mask, mode), _ref_agg_loss(loss, m, mode))
    # seq-mean-token-sum-norm: the reference returns sum / L for its micro-batch and the actor
    # divides by gradient accumulation (a constant); ours also divides by the number of
    # sequences N. For one micro-batch of N rows: ours * N == ref.
    ref = _ref_agg_loss(loss, m, "seq-mean-token-sum-norm")
    ours = aggregate_loss(loss, mask, "seq-mean-token-sum-norm", num_sequences=b, norm_length=t)
    _close(ours * b, ref)
    ours_default = aggregate_loss(loss, mask, "seq-mean-token-sum-norm")
    _close(ours_default * b, ref)
    assert ref.abs() > 1e-3


# =============================================================================================
# Replay: baseline history, admission, trigger, recalibration, subset size
# =============================================================================================


def _history(seed: int, n_steps: int = 3, binary: bool = False):
    """Baseline history as the reference stores it: [[step, [group means]]], [[step, [stds]]],
    built by its update_batch from per-turn rows (several rows per trajectory carry the same
    reward). Also returns ours (group_reward_stats per step) for comparison."""
    g = _gen(seed)
    ref_means, ref_stds, our_means, our_stds = [], [], [], []
    for step in range(n_steps):
        rewards, ids = _grouped_rewards(seed * 31 + step, n_groups=5)
        if binary:
            rewards = (rewards > 0.2).to(F64)
        turns = torch.randint(1, 4, (rewards.numel(),), generator=g)
        traj = torch.arange(rewards.numel()).repeat_interleave(turns)
        rm, uid = rewards[traj], ids[traj]
        mean_pairs, std_pairs = _ref_group_stats(rm.tolist(), uid.tolist(), traj.tolist())
        ref_means.append([step, [v for _, v in mean_pairs]])
        ref_stds.append([step, [v for _, v in std_pairs]])
        gm, gs = group_reward_stats(rewards, ids)
        our_means.append(gm)
        our_stds.append(gs)
        # Ours lists groups by ascending id; the reference by first appearance (ascending here).
        _close(gm, torch.tensor([v for _, v in mean_pairs], dtype=F64))
        _close(gs, torch.tensor([v for _, v in std_pairs], dtype=F64))
    return ref_means, ref_stds, torch.cat(our_means), torch.cat(our_stds)


@pytest.mark.parametrize("seed", SEEDS)
def test_group_reward_stats_match_reference_history(seed: int) -> None:
    # _history itself compares group_reward_stats with update_batch's mean / np.std.
    _, ref_stds, _, our_stds = _history(seed)
    assert max(max(v) for _, v in ref_stds) > 0.1 and our_stds.numel() == 15


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("norm_by_std", [False, True])
@pytest.mark.parametrize("binary", [False, True])
def test_recalibration_and_nonnegative_filter_match_reference(
    seed: int, norm_by_std: bool, binary: bool
) -> None:
    ref_means, ref_stds, our_means, our_stds = _history(seed, binary=binary)
    p50_mean, p50_std = _ref_p50(ref_means, ref_stds)
    assert p50_std > EPS  # the reference equality holds where our guard is off (divergence 3)
    g = _gen(seed + 400)
    b, t = 8, 6
    mask = _response_mask(g, b, t)
    stored = torch.randn(b, generator=g, dtype=F64) * 0.5 + float(p50_mean)
    stored[0] = float(p50_mean)  # advantage exactly 0: kept by both (>= 0)
    if binary:
        stored[1:] = (stored[1:] > float(p50_mean)).to(F64)
    uid = torch.randint(0, 3, (b,), generator=g)
    ours = recalibrate_advantages(
        "baseline",
        rewards=stored,
        stored_advantages=torch.zeros(b, t, dtype=F64),
        mask=mask,
        hist_group_means=our_means,
        hist_group_stds=our_stds,
        norm_by_std=norm_by_std,
        epsilon=EPS,
    )
    ref, ref_keep = _ref_recalibrate(
        _reward_tensor(stored, mask),
        mask.to(F64),
        uid.tolist(),
        list(range(b)),
        p50_mean,
        p50_std,
        norm_by_std,
    )
    _close(ours, ref)
    keep = nonnegative_keep(ours, mask)
    assert torch.equal(keep, ref_keep)
    assert keep.any() and not keep.all()


@pytest.mark.parametrize("seed", SEEDS)
def test_weight_recalibration_matches_reference(seed: int) -> None:
    g = _gen(seed)
    mask = _response_mask(g, 6, 7)
    stored_adv = torch.where(mask, torch.randn(6, 7, generator=g, dtype=F64), 0.0)
    for w in (0.9, 0.5, 1.0):
        ours = recalibrate_advantages(
            "weight",
            rewards=torch.zeros(6, dtype=F64),
            stored_advantages=stored_adv,
            mask=mask,
            hist_group_means=[0.0],
            weight=w,
        )
        ref, _ = _ref_recalibrate(
            None,
            None,
            None,
            None,
            None,
            None,
            False,
            weight_decay_trajectory_replay=w,
            stored_advantages=stored_adv,
        )
        _close(ours, ref)


def test_divergence_baseline_guard_when_p50_std_is_zero() -> None:
    # Divergence 3: most recent groups had no spread (binary rewards, all 0 or all 1), so P50 of
    # the history's stds is 0. The reference divides by 0 + 1e-6; ours leaves A unscaled.
    means = [0.0, 0.0, 1.0, 0.5, 0.0]
    stds = [0.0, 0.0, 0.0, 0.5, 0.0]
    p50_mean, p50_std = _ref_p50([[0, means]], [[0, stds]])
    assert p50_std == 0.0
    stored = torch.tensor([1.0, 0.0], dtype=F64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    ours = recalibrate_advantages(
        "baseline",
        rewards=stored,
        stored_advantages=torch.zeros(2, 3, dtype=F64),
        mask=mask,
        hist_group_means=means,
        hist_group_stds=stds,
        norm_by_std=True,
        epsilon=EPS,
    )
    ref, _ = _ref_recalibrate(
        _reward_tensor(stored, mask), mask.to(F64), [0, 0], [0, 1], p50_mean, p50_std, True
    )
    _close(ours[:, 0], torch.tensor([1.0, 0.0], dtype=F64))
    _close(ref[:, 0] * EPS, torch.tensor([1.0, 0.0], dtype=F64))  # 1e6 in the reference


def test_divergence_nonnegative_filter_empty_mask_row() -> None:
    # Divergence 8: a replay row with an empty loss mask. The reference's advantages.mean(-1)
    # over the padded width is 0 >= 0, so it keeps the row; ours drops it.
    mask = torch.tensor([[True, True, False], [False, False, False]])
    stored = torch.tensor([1.0, 1.0], dtype=F64)
    ours_adv = recalibrate_advantages(
        "baseline",
        rewards=stored,
        stored_advantages=torch.zeros(2, 3, dtype=F64),
        mask=mask,
        hist_group_means=[0.5],
    )
    _, ref_keep = _ref_recalibrate(
        _reward_tensor(stored, mask),
        mask.to(F64),
        [0, 1],
        [0, 1],
        0.5,
        1.0,
        False,
    )
    assert ref_keep.tolist() == [True, True]
    assert nonnegative_keep(ours_adv, mask).tolist() == [True, False]


@pytest.mark.parametrize("seed", SEEDS)
def test_admission_matches_reference(seed: int) -> None:
    g = _gen(seed)
    b, t = 10, 8
    mask = _response_mask(g, b, t)
    mask[0] = False  # empty row: admitted by neither
    adv = torch.randn(b, t, generator=g, dtype=F64) + 0.2 * torch.randn(b, 1, generator=g)
    adv = torch.where(mask, adv, torch.zeros_like(adv))  # verl: scores * response_mask
    adv[1] = 0.0  # zero advantage: not admitted (> 0)
    ours = admission_keep(adv, mask)
    ref = _ref_admission(adv)
    assert torch.equal(ours, ref)
    assert ours.any() and not ours.all()


@pytest.mark.parametrize("seed", SEEDS)
def test_replay_trigger_matches_reference(seed: int) -> None:
    ref_means, ref_stds, our_means, _ = _history(seed)
    p50_mean, _ = _ref_p50(ref_means, ref_stds)
    g = _gen(seed + 500)
    # The buffer: one reward tensor per admitted step, rewards on the last token.
    stored = [torch.randn(int(torch.randint(2, 9, (1,), generator=g)), generator=g, dtype=F64)]
    stored.append(torch.randn(5, generator=g, dtype=F64) + 0.5)
    stored[0][0] = float(p50_mean)  # equal to the baseline: not counted (strict >)
    stored_tensors = [_reward_tensor(r, torch.ones(r.numel(), 4, dtype=torch.bool)) for r in stored]
    count = _ref_buffer_count(stored_tensors, ref_means)
    flat = torch.cat(stored)
    assert num_above_baseline(flat, our_means) == count
    assert 0 < count < flat.numel()
    for buffer_size in range(0, count + 2):
        ours = replay_triggered(flat, our_means, buffer_size=buffer_size, trigger_factor=1.5)
        assert ours == _ref_is_full_capacity(count, buffer_size), buffer_size


def test_replay_subset_size_matches_reference() -> None:
    for buffer_size in (1, 3, 8, 64, 256):
        for n in range(2, 300):
            assert replay_subset_size(n, buffer_size) == _ref_subset_size(n, buffer_size)
    # Divergence 4: one sample.
    assert replay_subset_size(1, 8) == 1 and _ref_subset_size(1, 8) == 0
    assert replay_subset_size(0, 8) == 0 == _ref_subset_size(0, 8)


# =============================================================================================
# Group filter
# =============================================================================================


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("keep_ratio", [0.25, 0.5, 0.75, 1.0])
def test_group_filter_matches_reference(seed: int, keep_ratio: float) -> None:
    # n_groups = 8 with mixed continuous / binary / constant groups: ties in the std ranking
    # (binary and constant groups) are broken the same way because ids ascend in order of
    # first appearance (divergence 6).
    rewards, ids = _grouped_rewards(seed, n_groups=8)
    ours = group_filter_keep(rewards, ids, keep_ratio=keep_ratio)
    ref = _ref_filter_rollout_mask(
        rewards.tolist(), ids.tolist(), list(range(rewards.numel())), keep_ratio
    )
    assert torch.equal(ours, ref)
    if keep_ratio < 1.0:
        assert not ours.all()


def test_divergence_group_filter_keep_count_rounding() -> None:
    # Divergence 9: 0.29 * 100 == 28.999999999999996 in float; ours keeps 29, the reference 28.
    assert int(0.29 * 100) == 28
    assert num_groups_kept(100, 0.29) == 29


# =============================================================================================
# Curriculum: SIL weight and tool-call bonus
# =============================================================================================


@pytest.mark.parametrize("total_steps", [1, 7, 200])
@pytest.mark.parametrize("coef", [1.0, 0.5, 2.0])
def test_sil_weight_matches_reference(total_steps: int, coef: float) -> None:
    for step in range(0, 2 * total_steps + 3):
        ours = sil_weight(step, total_steps=total_steps, coef=coef, schedule="cosine")
        ref = _ref_sil_weight(step, total_steps, coef)
        assert abs(ours - ref) <= TOL, (step, ours, ref)
    assert sil_weight(total_steps // 2 + 1, total_steps=total_steps, coef=coef) > 0


@pytest.mark.parametrize("total_steps", [1, 10, 200])
@pytest.mark.parametrize("schedule", ["cosine", "constant"])
@pytest.mark.parametrize("combination", ["additive", "qwen3"])
def test_tool_bonus_matches_reference(total_steps: int, schedule: str, combination: str) -> None:
    reference = {"additive": _ref_tool_bonus, "qwen3": _ref_tool_bonus_qwen3}[combination]
    for task in (-1.0, -0.5, 0.0, 0.3, 1.0):
        for calls in range(0, 13):
            for step in range(0, 2 * total_steps + 2, max(1, total_steps // 7)):
                ours = shaped_score(
                    task,
                    calls,
                    step,
                    total_steps=total_steps,
                    schedule=schedule,
                    combination=combination,
                    per_call=0.1,
                    cap=1.0,
                )
                ref = reference(task, calls, step, total_steps, schedule)
                assert abs(ours - ref) <= TOL, (task, calls, step, ours, ref)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("combination", ["additive", "qwen3"])
def test_tool_bonus_vectorised_matches_reference(seed: int, combination: str) -> None:
    g = _gen(seed)
    task = torch.randint(-1, 2, (16,), generator=g).to(F64) * torch.rand(16, generator=g)
    calls = torch.randint(0, 14, (16,), generator=g)
    step = int(torch.randint(0, 60, (1,), generator=g))
    ours = shaped_score(task, calls, step, total_steps=50, combination=combination)
    ref_fn = _ref_tool_bonus if combination == "additive" else _ref_tool_bonus_qwen3
    ref = torch.tensor(
        [ref_fn(float(a), int(n), step, 50, "cosine") for a, n in zip(task, calls, strict=True)],
        dtype=F64,
    )
    _close(ours, ref)
