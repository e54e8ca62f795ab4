"""The recipe: the one place where the config becomes SPEAR's constants and schedules.

`Recipe.from_config(config)` is built once, in the driver. Every other part of the system gets
the typed slice it needs from it, never the whole config:

    recipe.tool_bonus        score = task reward + r_tc * lambda(t)          (algorithm.md §6)
    recipe.filters           Dr.BoT masks and the group filter               (§2)
    recipe.advantage         GRPO / GiGPO advantages                          (§1)
    recipe.on_policy_loss    PPO-clip (+ Clip-Cov / KL-Cov) of the on-policy update   (§1, §7)
    recipe.replay_loss       the same loss on replay rows, with replay constants     (§5, §7)
    recipe.replay            the buffer's rules: admission, staleness, trigger,
                             recalibration (None when SIL is off)             (§3, §4)
    recipe.sil               w_SIL(t), the weight of the replay loss          (§5)
    recipe.learner           what a learner rank needs (LearnerSpec)
    recipe.rollout           what a rollout worker needs (RolloutSpec)

docs/algorithm.md lists every rule with its formula, config field, released value and the
function that implements it; the section numbers above are that page's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from spear_ray.algo.curriculum import (
    SIL_WEIGHT_SCHEDULES,
    TOOL_REWARD_SCHEDULES,
    shaped_score,
)
from spear_ray.algo.filters import DrBoTChecks
from spear_ray.config.schema import (
    CovConfig,
    EnvConfig,
    LearnerConfig,
    ModelConfig,
    ResourcesConfig,
    RolloutConfig,
    SpearConfig,
)
from spear_ray.sandbox.config import SandboxConfig

# --------------------------------------------------------------------------- §6 tool bonus


@dataclass(frozen=True)
class ToolBonus:
    """The intrinsic tool-call reward r_tc = min(cap, per_call * calls) and its decay lambda(t)."""

    enabled: bool
    per_call: float
    cap: float
    schedule: str  # "cosine" | "constant"
    decay_steps: int  # T_tc
    combine: str  # "additive" (Qwen2.5 / agent recipe) | "qwen3"

    def lam(self, step: int) -> float:
        """lambda(t); 0 when the bonus is off."""
        if not self.enabled:
            return 0.0
        return TOOL_REWARD_SCHEDULES[self.schedule](step, self.decay_steps)

    def bonus(self, task_reward: float, tool_calls: int, step: int) -> float:
        """What the bonus adds to `task_reward` at `step` (0 when off)."""
        if not self.enabled:
            return 0.0
        score = shaped_score(
            task_reward,
            tool_calls,
            step,
            total_steps=self.decay_steps,
            schedule=self.schedule,
            combination=self.combine,
            per_call=self.per_call,
            cap=self.cap,
        )
        return float(score) - task_reward


# --------------------------------------------------------------------------- §2 filters


@dataclass(frozen=True)
class Filters:
    """Dr.BoT masks (per turn or per trajectory) and the group filter."""

    scope: str  # "turn" (agent recipe) | "trajectory" (math recipe)
    checks: DrBoTChecks
    max_tokens_per_turn: int  # a turn this long is overlong (turn scope)
    max_response_tokens: int  # a trajectory that ran out of this budget is overlong
    group_keep_ratio: float  # 1.0 = group filter off
    min_valid_samples: int


# --------------------------------------------------------------------------- §1 advantages


@dataclass(frozen=True)
class AdvantageRule:
    estimator: str  # "grpo" | "gigpo"
    norm_by_std: bool  # GRPO (and replay recalibration): divide by the group std
    gigpo_std_norm: bool  # GiGPO: mean_std_norm (True) or mean_norm
    epsilon: float
    gamma: float  # GiGPO step returns
    step_weight: float  # GiGPO w

    @property
    def divides_by_std(self) -> bool:
        """Whether the chosen estimator divides by the group std."""
        return self.gigpo_std_norm if self.estimator == "gigpo" else self.norm_by_std


# --------------------------------------------------------------------------- §1 §5 §7 loss


@dataclass(frozen=True)
class PhaseLoss:
    """The scalars of one update phase's loss (on-policy or replay).

    rows_per_mini_batch (M) is the on-policy mini-batch size in rows, summed over ranks. Every
    optimizer step of either phase divides its loss by M (as the reference divides a replay
    micro-batch by the on-policy gradient-accumulation count), so a replayed row weighs exactly
    what an on-policy row weighs, and a replay batch smaller than M makes a proportionally
    smaller step. temperature is the sampling temperature: log-probs are those of logits / T.
    """

    aggregation: str
    norm_length: float  # the constant L of seq-mean-token-sum-norm (max response tokens)
    entropy_coef: float
    cov_mode: str  # "none" | "clip-cov" | "kl-cov"
    clip_low: float
    clip_high: float
    dual_clip: float | None
    log_ratio_clamp: float
    cov_ratio: float
    cov_lb: float
    cov_ub: float
    kl_coef: float
    temperature: float
    rows_per_mini_batch: int

    def loss_kwargs(self) -> dict[str, float | None]:
        """The keyword arguments of `spear_ray.algo.losses.compute_policy_loss`."""
        return {
            "clip_low": self.clip_low,
            "clip_high": self.clip_high,
            "dual_clip": self.dual_clip,
            "log_ratio_clamp": self.log_ratio_clamp,
            "cov_ratio": self.cov_ratio,
            "cov_lb": self.cov_lb,
            "cov_ub": self.cov_ub,
            "kl_coef": self.kl_coef,
        }


# --------------------------------------------------------------------------- §3 §4 replay


@dataclass(frozen=True)
class ReplayRule:
    """The replay buffer's rules. Sizes count rows (= trajectories)."""

    size: int  # buffer_size: replay cap and trigger scale
    trigger_factor: float
    tolerate_steps: int
    history_length: int
    recalibration: str  # "baseline" | "weight"
    recalibration_weight: float
    strict_positive: bool
    require_tool_call: bool
    norm_by_std: bool  # recalibration divides by P50(history stds)
    epsilon: float
    checkpoint_every_steps: int = 1

    @property
    def trigger_rows(self) -> float:
        return self.trigger_factor * self.size


# --------------------------------------------------------------------------- §5 SIL weight


@dataclass(frozen=True)
class SilSchedule:
    enabled: bool
    coef: float
    schedule: str  # "cosine" | "constant"
    ramp_steps: int  # T

    def weight(self, step: int) -> float:
        """w_SIL(t): the weight of the replay loss (0 when SIL is off)."""
        if not self.enabled:
            return 0.0
        return SIL_WEIGHT_SCHEDULES[self.schedule](step, self.ramp_steps, self.coef)


# --------------------------------------------------------------------------- actor slices


@dataclass(frozen=True)
class LearnerSpec:
    """Everything a learner rank (and the learner group) needs: model, optimizer, losses."""

    model: ModelConfig
    learner: LearnerConfig
    resources: ResourcesConfig
    seed: int
    total_steps: int
    temperature: float  # log-probs of logits / T, as the sampler drew them
    on_policy_loss: PhaseLoss
    replay_loss: PhaseLoss

    @property
    def on_gpu(self) -> bool:
        return self.resources.gpus_per_learner > 0

    def loss(self, phase: str) -> PhaseLoss:
        if phase == "on_policy":
            return self.on_policy_loss
        if phase == "replay":
            return self.replay_loss
        raise ValueError(f"phase must be 'on_policy' or 'replay', got {phase!r}")


@dataclass(frozen=True)
class RolloutSpec:
    """Everything a rollout worker (and the rollout group) needs: engine, sampling, env."""

    model: ModelConfig
    rollout: RolloutConfig
    env: EnvConfig
    sandbox: SandboxConfig
    resources: ResourcesConfig
    seed: int


# --------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class Recipe:
    # logp_old of the on-policy loss: "recompute" (the learners, before the update), "update"
    # (the update's own detached log-probs: provably the recomputed ones when there is one
    # epoch of one mini-batch and nothing else needs them, so the recompute is skipped) or
    # "behaviour" (the engine's, learner.logp_old: behaviour)
    logp_old: str
    tool_bonus: ToolBonus
    filters: Filters
    advantage: AdvantageRule
    on_policy_loss: PhaseLoss
    replay_loss: PhaseLoss
    replay: ReplayRule | None  # None: SIL off, no buffer
    sil: SilSchedule
    learner: LearnerSpec = field(repr=False)
    rollout: RolloutSpec = field(repr=False)

    @classmethod
    def from_config(cls, config: SpearConfig) -> Recipe:
        algo, rollout = config.algo, config.rollout
        tr, flt, adv, pl = algo.tool_reward, algo.filters, algo.advantage, algo.policy_loss
        rows_per_mini_batch = rollout.samples_per_step // config.learner.mini_batches_per_step

        def phase_loss(cov: CovConfig) -> PhaseLoss:
            return PhaseLoss(
                aggregation=pl.aggregation,
                norm_length=float(rollout.max_response_tokens),
                entropy_coef=pl.entropy_coef,
                cov_mode=cov.mode,
                clip_low=pl.clip_low,
                clip_high=pl.clip_high,
                dual_clip=pl.dual_clip_c,
                log_ratio_clamp=pl.log_ratio_clamp,
                cov_ratio=cov.ratio,
                cov_lb=cov.lower_bound,
                cov_ub=cov.upper_bound,
                kl_coef=cov.kl_coef,
                temperature=rollout.temperature,
                rows_per_mini_batch=rows_per_mini_batch,
            )

        on_policy_loss, replay_loss = phase_loss(pl.on_policy_cov), phase_loss(pl.replay_cov)
        buf = config.buffer
        logp_old = config.learner.logp_old
        one_pass = config.learner.ppo_epochs == 1 and config.learner.mini_batches_per_step == 1
        # the replay buffer stores the recomputed logp_old: with SIL on, it is computed anyway
        if logp_old == "recompute" and one_pass and not algo.sil.enabled:
            logp_old = "update"
        return cls(
            logp_old=logp_old,
            tool_bonus=ToolBonus(
                enabled=tr.enabled,
                per_call=tr.per_call,
                cap=tr.cap,
                schedule=tr.schedule,
                decay_steps=tr.decay_steps,
                combine=tr.combine,
            ),
            filters=Filters(
                scope=flt.scope,
                checks=DrBoTChecks(
                    void=flt.void_turn,
                    overlong=flt.overlong,
                    repetition=flt.repetition,
                    unreadable=flt.unreadable,
                    ngram=flt.repetition_ngram,
                    max_repeats=flt.repetition_max_count,
                ),
                max_tokens_per_turn=rollout.max_tokens_per_turn,
                max_response_tokens=rollout.max_response_tokens,
                group_keep_ratio=flt.group_keep_ratio,
                min_valid_samples=flt.min_valid_samples,
            ),
            advantage=AdvantageRule(
                estimator=adv.estimator,
                norm_by_std=adv.norm_by_std,
                gigpo_std_norm=adv.gigpo_std_norm,
                epsilon=adv.epsilon,
                gamma=adv.gigpo_gamma,
                step_weight=adv.gigpo_step_weight,
            ),
            on_policy_loss=on_policy_loss,
            replay_loss=replay_loss,
            replay=ReplayRule(
                size=buf.size,
                trigger_factor=buf.trigger_factor,
                tolerate_steps=buf.tolerate_steps,
                history_length=buf.history_length,
                recalibration=buf.recalibration,
                recalibration_weight=buf.recalibration_weight,
                strict_positive=buf.strict_positive,
                require_tool_call=buf.require_tool_call,
                norm_by_std=adv.norm_by_std,
                epsilon=adv.epsilon,
                checkpoint_every_steps=buf.checkpoint_every_steps,
            )
            if algo.sil.enabled
            else None,
            sil=SilSchedule(
                enabled=algo.sil.enabled,
                coef=algo.sil.coef,
                schedule=algo.sil.schedule,
                ramp_steps=algo.sil.ramp_steps,
            ),
            learner=LearnerSpec(
                model=config.model,
                learner=config.learner,
                resources=config.resources,
                seed=config.run.seed,
                total_steps=config.run.total_steps,
                temperature=rollout.temperature,
                on_policy_loss=on_policy_loss,
                replay_loss=replay_loss,
            ),
            rollout=rollout_spec(config),
        )


def rollout_spec(config: SpearConfig) -> RolloutSpec:
    """The rollout workers' slice of a config (evaluation builds one without a recipe)."""
    return RolloutSpec(
        model=config.model,
        rollout=config.rollout,
        env=config.env,
        sandbox=config.sandbox,
        resources=config.resources,
        seed=config.run.seed,
    )


def learner_spec(config: SpearConfig) -> LearnerSpec:
    """The learners' slice of a config."""
    return Recipe.from_config(config).learner


__all__ = [
    "AdvantageRule",
    "Filters",
    "LearnerSpec",
    "PhaseLoss",
    "Recipe",
    "ReplayRule",
    "RolloutSpec",
    "SilSchedule",
    "ToolBonus",
    "learner_spec",
    "rollout_spec",
]
