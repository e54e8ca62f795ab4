"""LearnerRank: one data-parallel rank of the policy, a DeepSpeed engine around the HF model.

A plain class (testable without Ray); `learners.learner_group` applies `ray.remote` and starts
`num_ranks` of them, which rendezvous in one process group. Mutating calls carry a step number
and are idempotent; every call below is collective (all ranks call it together).

    rank = LearnerRank(spec, rank=0, world_size=1)        # spec: the recipe's LearnerSpec
    rank.setup(master_addr="127.0.0.1", master_port=29500)
    logp = rank.compute_logprobs(batch=batch)                      # logp_old = "recompute"
    metrics = rank.update(batch=batch, step=t, phase="on_policy")
    metrics = rank.update(batch=replay, step=t, phase="replay", loss_weight=w_sil)
    weights = rank.full_state_dict()                               # rank 0: {name: tensor}
    rank.save_checkpoint(directory=d, step=t); rank.load_checkpoint(directory=d)

One update (docs/algorithm.md §1, §5): for each PPO epoch, for each mini-batch (one optimizer
step): pack its rows into micro-batches by `tokens_per_micro_batch`, forward/backward each with
the mini-batch's global loss divisors (summed over ranks, scaled to the on-policy mini-batch
size), then one DeepSpeed step with gradient clipping. The replay phase runs the same loop on
the replay batch with the replay loss constants and its loss scaled by w_SIL, as separate
optimizer steps after the on-policy ones, and measures what it did to the replayed rows'
log-probs (`logp_change`, docs/algorithm.md §5).

Devices. CPU (what runs here): DS_ACCELERATOR=cpu, gloo, fp32 whatever `model.dtype` says.
GPU (written, NOT RUN here: no GPU on these machines): nccl, one GPU per rank (Ray sets
CUDA_VISIBLE_DEVICES), bf16/fp16 per `model.dtype` with fp32 master weights in the optimizer.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import math
import os
import socket
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from learners.policy import (
    PHASES,
    logprob_change_sums,
    micro_batch_loss,
    micro_batches_with_rows,
    mini_batch_divisors,
    num_mini_batches,
    pack_micro_batches,
    split_sizes,
    token_logprobs,
    token_weighted_mean,
    trim_padding,
)
from learners.weight_sync import (
    DEFAULT_BUCKET_BYTES,
    WeightGroup,
    WeightGroupError,
    WeightGroupSpec,
    collective_backend,
    put_weights,
)
from spear_ray.algo.losses import loss_divisors
from spear_ray.config.schema import LearnerConfig
from spear_ray.containers import TrainBatch
from spear_ray.recipe import LearnerSpec, PhaseLoss

# How LearnerGroup combines each metric of `update` over ranks. Token statistics are reported
# by each rank as its share of the mini-batch value (its token sum / the GLOBAL token count), so
# the sum over ranks is the exact mini-batch value; the same holds for the loss, whose divisors
# are global. Within a rank every metric is a mean over the optimizer steps that were applied.
METRIC_REDUCTIONS: dict[str, str] = {
    "loss": "sum",  # loss_weight * (pg_loss + entropy term): what was backpropagated
    "pg_loss": "sum",  # the aggregated clipped policy loss (docs/algorithm.md §1), unweighted
    "entropy": "sum",  # token-mean entropy of the policy on loss tokens
    "clip_frac": "sum",  # fraction of loss tokens where PPO's clipped branch was taken
    "dual_clip_frac": "sum",  # ... where the dual clip (A < 0) was taken
    "cov_frac": "sum",  # ... selected by Clip-Cov / KL-Cov
    "approx_kl": "sum",  # k3 estimate of KL(old || new) per token
    "ppo_kl": "sum",  # k1 estimate mean(logp_old - logp)
    "grad_norm": "max",  # global norm before clipping (identical on every rank)
    "lr": "max",
    "loss_weight": "max",
    "optimizer_steps": "max",  # optimizer steps applied (identical on every rank)
    "skipped": "max",  # optimizer steps skipped for a non-finite loss or gradient
    "empty": "max",  # mini-batches without any loss token: no optimizer step
    "micro_batches": "sum",  # forward/backward passes with data (padding passes excluded)
    "tokens": "sum",  # tokens forwarded (real length, all epochs)
    "loss_tokens": "sum",  # loss tokens trained on (all epochs)
    "update_s": "max",
    "tokens_per_s": "sum",
    # replay phase only: mean over the replayed rows' loss tokens of logp(after the update) -
    # logp(before it), at the sampling temperature (each rank: its token sum / the GLOBAL count)
    "logp_change": "sum",
}
# Metrics that only the replay phase reports (the on-policy update has every other one).
REPLAY_ONLY_METRICS = frozenset({"logp_change"})

_TOKEN_STATS = {  # metric -> MicroBatchLoss.sums key, divided by the global token count
    "entropy": "entropy",
    "clip_frac": "clipped",
    "dual_clip_frac": "dual_clipped",
    "cov_frac": "cov_selected",
    "approx_kl": "approx_kl",
    "ppo_kl": "ppo_kl",
}


def learning_rate(
    step: int, *, peak: float, schedule: str, warmup_steps: int, total_steps: int
) -> float:
    """The lr of training step `step` (0-based): linear warm-up over `warmup_steps` steps, then
    constant, or a cosine / linear decay to 0 at `total_steps`. Keyed by the training step, not
    by optimizer steps, so replay and skipped steps do not shift the schedule."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak
    progress = min(max((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0), 1.0)
    if schedule == "cosine":
        return peak * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return peak * (1.0 - progress)
    raise ValueError(f"unknown lr schedule {schedule!r}; expected constant, cosine or linear")


def deepspeed_config(learner: LearnerConfig, *, world_size: int, precision: str) -> dict[str, Any]:
    """The DeepSpeed config of a learner rank. Micro-batching is ours (variable count per
    mini-batch, boundary set by hand), so DeepSpeed sees one micro-batch per step."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": world_size,
        "gradient_clipping": learner.grad_clip,
        "zero_optimization": {"stage": learner.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if precision == "bfloat16":
        config["bf16"] = {"enabled": True, "check_grad_overflow": True}
    elif precision == "float16":
        config["fp16"] = {"enabled": True, "loss_scale": 0}  # dynamic loss scaling
    return config


def shm_op_built() -> bool:
    """Whether DeepSpeed's CPU communication op is prebuilt or in the torch extensions cache."""
    try:
        from deepspeed.git_version_info import installed_ops

        if installed_ops.get("deepspeed_shm_comm"):
            return True
    except ImportError:  # pragma: no cover
        pass
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    return any(root.glob("deepspeed_shm_comm/*.so")) or any(root.glob("*/deepspeed_shm_comm/*.so"))


def free_port() -> int:
    """A TCP port that is free on this node right now (for the process-group rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return int(sock.getsockname()[1])


class LearnerRank:
    def __init__(self, spec: LearnerSpec, *, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.spec = spec
        self.rank = rank
        self.world_size = world_size
        self.on_gpu = spec.on_gpu
        # CPU trains in fp32 whatever model.dtype says (CPU bf16 matmuls are slow or missing on
        # many CPUs); on GPU model.dtype is the compute dtype, with fp32 master weights.
        self.precision = spec.model.dtype if self.on_gpu else "float32"
        self.zero_stage = spec.learner.zero_stage
        self.engine: Any = None
        self.device = torch.device("cpu")
        self._pad_id = 0
        self._model_dir: Path | None = None
        self._hf_ds_config: Any = None  # must outlive from_pretrained under ZeRO-3
        self._setup_s = 0.0
        self._done: dict[str, tuple[int, dict[str, float]]] = {}  # phase -> (step, metrics)
        self._weight_group: WeightGroup | None = None  # rank 0: the collective weight sync's

    # ------------------------------------------------------------------ setup

    def node_info(self) -> dict[str, Any]:
        """Where this rank runs: node IP and id (for the rendezvous and local ranks), and a free
        port on this node."""
        import ray

        return {
            "ip": ray.util.get_node_ip_address(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "free_port": free_port(),
        }

    def setup(
        self,
        *,
        master_addr: str,
        master_port: int,
        local_rank: int = 0,
        local_world_size: int = 1,
    ) -> dict[str, Any]:
        """Join the process group and build the DeepSpeed engine (collective)."""
        if self.engine is not None:
            return self._info()
        t0 = time.monotonic()
        os.environ.update(
            DS_ACCELERATOR="cuda" if self.on_gpu else "cpu",
            MASTER_ADDR=master_addr,
            MASTER_PORT=str(master_port),
            RANK=str(self.rank),
            WORLD_SIZE=str(self.world_size),
            # Ray gives each GPU rank its own device (CUDA_VISIBLE_DEVICES), which is cuda:0;
            # on CPU the local rank/size tell DeepSpeed's shared-memory op who is on this node.
            LOCAL_RANK="0" if self.on_gpu else str(local_rank),
            LOCAL_SIZE=str(local_world_size),
        )
        if not self.on_gpu and self.rank == 0 and not shm_op_built():
            print(
                "spear_ray: building DeepSpeed's CPU communication op (first run only, ~30-60 s, "
                "longer on a busy machine)",
                file=sys.stderr,
                flush=True,
            )
        if self.spec.resources.threads_per_learner > 0 and not self.on_gpu:
            # more threads than the rank's CPU reservation: the phases take turns (async 0)
            torch.set_num_threads(self.spec.resources.threads_per_learner)
        import deepspeed
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from spear_ray.models import resolve_model_path

        hf_logging.disable_progress_bar()  # one "Loading weights" bar per rank is noise
        if self.on_gpu:  # NOT RUN HERE
            torch.cuda.set_device(0)
            self.device = torch.device("cuda", 0)
        # A dead or hung peer fails the collectives after this timeout instead of blocking them.
        deepspeed.init_distributed(
            dist_backend="nccl" if self.on_gpu else "gloo",
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(seconds=self.spec.learner.collective_timeout_s),
        )
        if not self.on_gpu:
            release_shm_buffer(master_addr, master_port, self.rank)
        self._model_dir = resolve_model_path(self.spec.model.path)
        ds_config = deepspeed_config(
            self.spec.learner, world_size=self.world_size, precision=self.precision
        )
        if self.zero_stage == 3:
            self._hf_ds_config = _partitioned_loading(ds_config)
        torch.manual_seed(self.spec.seed)
        model = AutoModelForCausalLM.from_pretrained(
            str(self._model_dir),
            dtype=getattr(torch, self.precision),
            trust_remote_code=self.spec.model.trust_remote_code,
        )
        model.config.use_cache = False
        # Dropout off: the ratio must compare the same deterministic function the sampler used.
        model.eval()
        # any valid id does for the padding passes
        self._pad_id = next(
            (i for i in (model.config.pad_token_id, model.config.eos_token_id) if type(i) is int),
            0,
        )
        learner = self.spec.learner
        # A torch optimizer: DeepSpeed's own AdamW would JIT-compile FusedAdam (~65 s on CPU).
        optimizer = torch.optim.AdamW(
            model.parameters(),
            lr=learner.lr,
            betas=tuple(learner.betas),
            weight_decay=learner.weight_decay,
        )
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self._setup_s = time.monotonic() - t0
        return self._info()

    def _info(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "zero_stage": self.zero_stage,
            "precision": self.precision,
            "device": str(self.device),
            "pid": os.getpid(),
            "setup_s": round(self._setup_s, 3),
            "num_parameters": sum(
                getattr(p, "ds_numel", p.numel()) for p in self.engine.module.parameters()
            ),
        }

    def _require_setup(self) -> None:
        if self.engine is None:
            raise RuntimeError(f"learner rank {self.rank}: call setup() first")

    # ------------------------------------------------------------------ collectives

    def _all_reduce(self, values: list[float], op: str) -> list[float]:
        if self.world_size == 1:
            return values
        import torch.distributed as dist

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return tensor.tolist()

    def _forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.engine(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            use_cache=False,
        )
        return out.logits

    def _padding_forward(self) -> Tensor:
        """A one-token forward that keeps this rank in step with ranks that have more
        micro-batches (ZeRO-3 gathers parameters in every forward, all ranks together)."""
        ids = torch.full((1, 1), self._pad_id, dtype=torch.long)
        return self._forward(ids, torch.ones_like(ids))

    # ------------------------------------------------------------------ log-probs

    @torch.no_grad()
    def compute_logprobs(self, *, batch: TrainBatch) -> Tensor:
        """log p(token i | tokens < i) under the current policy at the sampling temperature
        (logits / T), [rows, length] like the batch's tensors: 0 at i = 0 and on padding
        (multiply by loss_mask for old_logprobs)."""
        self._require_setup()
        result = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        lengths = batch.attention_mask.sum(dim=-1).tolist()
        groups = pack_micro_batches(lengths, self.spec.learner.tokens_per_micro_batch)
        (count,) = self._all_reduce([float(len(groups))], "max")
        for rows in groups:
            micro = trim_padding(batch.select(rows))
            logits = self._forward(micro.input_ids, micro.attention_mask)
            logp = token_logprobs(logits, micro.input_ids.to(self.device), self.spec.temperature)
            logp = logp * micro.attention_mask.to(self.device)
            result[torch.as_tensor(rows), : logp.shape[1]] = logp.float().cpu()
        for _ in range(int(count) - len(groups)):
            self._padding_forward()
        return result

    # ------------------------------------------------------------------ update

    def update(
        self,
        *,
        batch: TrainBatch,
        step: int,
        phase: str,
        loss_weight: float = 1.0,
        mini_batch_sizes: list[int] | None = None,
        own_logp_old: bool = False,
    ) -> dict[str, float]:
        """Train on `batch` (this rank's rows): ppo_epochs x mini-batches optimizer steps.

        phase "on_policy" or "replay" picks the phase's loss constants (LearnerSpec.loss);
        batch.old_logprobs is logp_old (recomputed or behaviour log-probs, the caller's choice).
        loss_weight scales the loss (w_SIL for replay); 0 means no update at all.
        mini_batch_sizes: this rank's rows per mini-batch (LearnerGroup passes them so that
        local mini-batch m is part of global mini-batch m); default: ceil(rows / M) near-equal
        mini-batches, M the on-policy mini-batch size.
        own_logp_old: logp_old is the update's own detached log-probs (batch.old_logprobs
        unused); the caller asserts that is the recomputed value (one epoch, one mini-batch).
        Idempotent: a second call with a step <= the last one of this phase returns the
        metrics of the last call and changes nothing.
        The replay phase also reports logp_change (REPLAY_ONLY_METRICS): the mean over its
        rows' loss tokens of the log-prob after the update minus before it; 0.0 with
        loss_weight 0 (no update). It costs one no-grad forward of the rows after the last
        optimizer step, and one before the first unless the update is one epoch of one
        mini-batch (then the update's own first forward saw the weights before it).
        """
        self._require_setup()
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if phase in self._done and step <= self._done[phase][0]:
            return dict(self._done[phase][1])
        learner = self.spec.learner
        settings = self.spec.loss(phase)
        sizes = (
            list(mini_batch_sizes)
            if mini_batch_sizes is not None
            else split_sizes(batch.rows, num_mini_batches(batch.rows, settings.rows_per_mini_batch))
        )
        if sum(sizes) != batch.rows:
            raise ValueError(f"mini_batch_sizes {sizes} do not add up to {batch.rows} rows")
        lr = learning_rate(
            step,
            peak=learner.lr,
            schedule=learner.lr_schedule,
            warmup_steps=learner.warmup_steps,
            total_steps=self.spec.total_steps,
        )
        # replay/logp_change needs the replayed rows' log-probs before the first optimizer
        # step. The update's own first forward gives them only with one epoch of one
        # mini-batch (the same on every rank); otherwise a no-grad pass computes them first.
        track = phase == "replay" and loss_weight > 0
        reuse = learner.ppo_epochs == 1 and len(sizes) == 1
        before: Tensor | None = None
        if track:
            before = (
                torch.zeros(batch.input_ids.shape) if reuse else self.compute_logprobs(batch=batch)
            )
        t0 = time.monotonic()  # update_s: the optimizer steps only, not the metric's passes
        totals: dict[str, float] = defaultdict(float)
        if loss_weight > 0:
            for epoch in range(learner.ppo_epochs):
                start = 0
                for index, size in enumerate(sizes):
                    mini = batch.select(list(range(start, start + size)))
                    start += size
                    seed = _seed(self.spec.seed, step, phase, epoch, index, self.rank)
                    self._train_mini_batch(
                        mini,
                        settings,
                        loss_weight,
                        lr,
                        seed,
                        totals,
                        own_logp_old,
                        capture=before if track and reuse else None,
                    )
        metrics = self._finish_metrics(totals, lr, loss_weight, time.monotonic() - t0)
        if phase == "replay":  # no update (loss_weight 0): the weights, so log-probs, are as before
            metrics["logp_change"] = self._logp_change(batch, before) if track else 0.0
        self._done[phase] = (step, metrics)
        return dict(metrics)

    def _logp_change(self, batch: TrainBatch, before: Tensor) -> float:
        """This rank's part of replay/logp_change: the sum over its rows' loss tokens of
        logp(now) - `before`, over the loss tokens of all ranks (so the ranks' parts add up to
        the token-weighted mean over all rows). One no-grad pass (collective)."""
        after = self.compute_logprobs(batch=batch)
        total, tokens = logprob_change_sums(before, after, batch.loss_mask)
        (all_tokens,) = self._all_reduce([tokens], "sum")
        return token_weighted_mean(total, all_tokens)

    def _train_mini_batch(
        self,
        mini: TrainBatch,
        settings: PhaseLoss,
        loss_weight: float,
        lr: float,
        seed: int,
        totals: dict[str, float],
        own_logp_old: bool = False,
        capture: Tensor | None = None,
    ) -> None:
        """Forward/backward every micro-batch of one mini-batch, then one optimizer step.
        capture: a [rows, length] tensor that receives the forwards' log-probs, row by row."""
        local = loss_divisors(mini.loss_mask)
        budget = self.spec.learner.tokens_per_micro_batch
        packed = micro_batches_with_rows(mini, budget) if mini.rows else []
        pieces = [piece for _, piece in packed]
        num_tokens, num_rows = self._all_reduce(
            [float(local["num_tokens"]), float(mini.rows)], "sum"
        )
        if num_tokens == 0:  # nothing to learn from: an optimizer step would only decay weights
            totals["empty"] += 1
            return
        (count,) = self._all_reduce([float(len(pieces))], "max")
        divisors = mini_batch_divisors(num_rows, num_tokens, settings.rows_per_mini_batch)
        generator = torch.Generator().manual_seed(seed)  # Clip-Cov draws: reproducible
        # DeepSpeed averages gradients over ranks; the divisors are global, so undo the mean.
        scale = loss_weight * self.world_size
        step_sums: dict[str, float] = defaultdict(float)
        for k in range(int(count)):
            self.engine.set_gradient_accumulation_boundary(k == int(count) - 1)
            if k < len(pieces):
                micro = pieces[k]
                logits = self._forward(micro.input_ids, micro.attention_mask)
                out = micro_batch_loss(
                    logits,
                    micro,
                    settings,
                    divisors,
                    generator=generator,
                    own_logp_old=own_logp_old,
                )
                self.engine.backward(out.loss * scale)
                if capture is not None and out.logp is not None:
                    rows = torch.as_tensor(packed[k][0])
                    capture[rows, : out.logp.shape[1]] = out.logp.float().cpu()
                step_sums["pg_loss"] += out.pg_loss
                step_sums["loss"] += loss_weight * (out.pg_loss + out.entropy_term)
                for name, key in _TOKEN_STATS.items():
                    step_sums[name] += out.sums[key] / num_tokens
                step_sums["loss_tokens"] += out.sums["tokens"]
                step_sums["tokens"] += float(micro.attention_mask.sum())
                step_sums["micro_batches"] += 1
            else:  # padding pass: no data, zero gradient, same collectives as the other ranks
                self.engine.backward(self._padding_forward().sum() * 0.0)
        applied, grad_norm = self._optimizer_step(lr)
        # Throughput counts every pass; loss statistics only the steps that were applied.
        totals["tokens"] += step_sums.pop("tokens", 0.0)
        totals["micro_batches"] += step_sums.pop("micro_batches", 0.0)
        if not applied:
            totals["skipped"] += 1
            return
        totals["optimizer_steps"] += 1
        totals["grad_norm"] += grad_norm
        for name, value in step_sums.items():
            totals[name] += value

    def _optimizer_step(self, lr: float) -> tuple[bool, float]:
        """One DeepSpeed step at `lr` with gradient clipping; (applied, grad norm).

        A non-finite gradient (e.g. from a NaN loss on any rank) skips the step on every rank:
        ZeRO 1-3 detect it themselves (global norm, all-reduced); ZeRO 0 in fp32 has no such
        check, so it is done here on the already averaged gradients.
        """
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        if self.zero_stage == 0 and self.precision == "float32":
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
            if not math.isfinite(norm):
                self.engine.zero_grad()
                return False, norm
            self.engine.step()
            return True, norm
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return bool(self.engine.was_step_applied()) and math.isfinite(norm), norm

    def _finish_metrics(
        self, totals: Mapping[str, float], lr: float, loss_weight: float, seconds: float
    ) -> dict[str, float]:
        steps = totals.get("optimizer_steps", 0.0)
        per_step = ("loss", "pg_loss", "grad_norm", *_TOKEN_STATS)
        metrics = {
            name: (totals.get(name, 0.0) / steps if steps else float("nan")) for name in per_step
        }
        metrics.update(
            lr=lr,
            loss_weight=float(loss_weight),
            optimizer_steps=steps,
            skipped=totals.get("skipped", 0.0),
            empty=totals.get("empty", 0.0),
            micro_batches=totals.get("micro_batches", 0.0),
            tokens=totals.get("tokens", 0.0),
            loss_tokens=totals.get("loss_tokens", 0.0),
            update_s=seconds,
            tokens_per_s=totals.get("tokens", 0.0) / seconds if seconds > 0 else 0.0,
        )
        assert set(metrics) == set(METRIC_REDUCTIONS) - REPLAY_ONLY_METRICS, (
            "declare every metric's reduction"
        )
        return metrics

    # ------------------------------------------------------------------ weights

    def full_state_dict(
        self, *, copy: bool = True, device: str | torch.device = "cpu"
    ) -> dict[str, Tensor] | None:
        """The full weights on rank 0 (in the training dtype, on `device`); None on other ranks.

        Collective under ZeRO-3 (the partitions are gathered layer by layer). Tied parameters
        appear once, under their first name (engines and HF loaders re-tie them). copy=False
        may return the live parameters (ZeRO 0-2, on their own device): only for a caller that
        copies them before the next update (the weight syncs pack them into buckets at once).
        """
        self._require_setup()
        if self.zero_stage == 3:
            # all ranks take part; DeepSpeed keeps tied weights as one tensor
            state = self.engine._zero3_consolidated_16bit_state_dict()
            if self.rank != 0:
                return None
        elif self.rank != 0:
            return None
        else:
            state = self.engine.module.state_dict()
        seen: set[int] = set()
        result: dict[str, Tensor] = {}
        for name, tensor in state.items():
            if tensor.data_ptr() in seen:
                continue
            seen.add(tensor.data_ptr())
            result[name] = tensor.detach().to(device, copy=copy)
        return result

    def _engine_weights(self, device: str | torch.device = "cpu") -> dict[str, Tensor] | None:
        """Rank 0: the full weights in the rollout engines' dtype (model.dtype), possibly the live
        parameters (the caller packs them into buckets at once); None on other ranks.
        Collective under ZeRO-3. On CPU the learner trains in fp32 while a bf16 engine would
        cast every tensor itself; casting here also halves the bytes moved."""
        state = self.full_state_dict(copy=False, device=device)
        if state is None:
            return None
        engine_dtype = getattr(torch, self.spec.model.dtype)
        return {name: tensor.to(engine_dtype) for name, tensor in state.items()}

    def publish_weights(self, *, bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> list[Any] | None:
        """Rank 0: the full weights as bucket ObjectRefs in the Ray object store (see
        learners.weight_sync); None on other ranks. Collective under ZeRO-3."""
        state = self._engine_weights()
        return None if state is None else put_weights(state, bucket_bytes=bucket_bytes)

    # ------------------------------------------------------------------ collective weight sync
    # learner.weight_transport = "collective": rank 0 is rank 0 of a process group with the
    # rollout workers (learners.weight_sync.WeightGroup). These calls return a failure of that
    # group as a WeightGroupError VALUE, not raised, so that the driver can tell it from a
    # failed learner rank (it falls back to the object store; a learner fault ends the run).

    def open_weight_group(
        self,
        *,
        world_size: int,
        generation: int,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ) -> WeightGroupSpec | WeightGroupError | None:
        """Rank 0: close any previous group, host a new one's store on this node and plan its
        buckets from the current weights; its spec, for the rollout workers. None on other ranks.
        Collective under ZeRO-3 (the weights are gathered to plan the buckets)."""
        import ray

        res = self.spec.resources  # NCCL (NOT RUN HERE) needs whole GPUs on both ends
        backend = collective_backend(res.gpus_per_learner, res.gpus_per_rollout_worker)
        state = self._engine_weights(device=self.device if backend == "nccl" else "cpu")
        if state is None:
            return None
        self.close_weight_group()
        try:
            self._weight_group = WeightGroup.host(
                state,
                address=ray.util.get_node_ip_address(),
                world_size=world_size,
                generation=generation,
                backend=backend,
                timeout_s=self.spec.learner.collective_timeout_s,
                bucket_bytes=bucket_bytes,
            )
        except WeightGroupError as err:
            return err
        return self._weight_group.spec

    def join_weight_group(self) -> WeightGroupError | None:
        """Rank 0: connect to the group opened last; returns once every rollout worker in it
        has connected too (they are told to by the driver at the same time)."""
        if self._weight_group is None:
            return WeightGroupError(f"learner rank {self.rank} has no weight group to join")
        try:
            self._weight_group.connect()
        except WeightGroupError as err:
            self._weight_group = None
            return err
        return None

    def broadcast_weights(self, *, generation: int) -> int | WeightGroupError | None:
        """Rank 0: send the current weights (in the engines' dtype) to the group's rollout
        workers, bucket by bucket; the bytes sent. None on other ranks. Collective under
        ZeRO-3 (the weights are gathered first)."""
        group = self._weight_group
        on_device = group is not None and group.device.type != "cpu"
        state = self._engine_weights(device=group.device if on_device else "cpu")
        if state is None:
            return None
        if group is None or not group.connected or group.spec.generation != generation:
            self.close_weight_group()  # receivers of a group it is in fail at once
            return WeightGroupError(
                f"learner rank {self.rank} is not connected to weight group {generation}"
            )
        try:
            return group.send(state)
        except WeightGroupError as err:
            self._weight_group = None  # send closed it already
            return err

    def close_weight_group(self) -> None:
        """Leave the weight group (rank 0 also stops its store). Idempotent."""
        group, self._weight_group = self._weight_group, None
        if group is not None:
            group.close()

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, *, directory: str, step: int) -> str:
        """Write `directory`/deepspeed (DeepSpeed's model + optimizer state, one file set per
        rank, tag step_<step>) and, on rank 0, `directory`/policy (an HF model directory with
        safetensors + tokenizer, loadable by vLLM/transformers). Collective; saving the same
        step again rewrites the same state."""
        self._require_setup()
        root = Path(directory)
        state = self.full_state_dict()  # collective under ZeRO-3: before anything rank-only
        client_state = {
            "step": step,
            "done": {phase: [s, dict(m)] for phase, (s, m) in self._done.items()},
        }
        self.engine.save_checkpoint(
            str(root / "deepspeed"), tag=f"step_{step}", client_state=client_state
        )
        if self.rank == 0 and state is not None:
            self._export_hf(state, root / "policy")
        self._barrier()
        return str(root)

    def _export_hf(self, state: dict[str, Tensor], path: Path) -> None:
        from huggingface_hub import save_torch_state_dict
        from transformers import AutoTokenizer

        from spear_ray.models import resolve_model_path

        path.mkdir(parents=True, exist_ok=True)
        save_torch_state_dict(state, path)  # safetensors, sharded if large
        module = self.engine.module
        module.config.save_pretrained(path)
        if getattr(module, "generation_config", None) is not None:
            module.generation_config.save_pretrained(path)
        tokenizer_dir = self.spec.model.tokenizer_path or str(self._model_dir)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(tokenizer_dir)))
        except (OSError, ValueError) as err:
            print(f"spear_ray: exported {path} without a tokenizer ({err})", file=sys.stderr)
        else:
            tokenizer.save_pretrained(path)

    def load_checkpoint(self, *, directory: str) -> int:
        """Restore the state `save_checkpoint` wrote into `directory` (same world size and ZeRO
        stage); returns its step. Collective."""
        self._require_setup()
        load_dir, client_state = self.engine.load_checkpoint(str(Path(directory) / "deepspeed"))
        if load_dir is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}/deepspeed")
        self._done = {
            phase: (int(s), dict(m)) for phase, (s, m) in client_state.get("done", {}).items()
        }
        return int(client_state["step"])

    def _barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def shutdown(self) -> None:
        import torch.distributed as dist

        self.close_weight_group()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        self.engine = None


SHM_BUFFER_DIR = Path("/dev/shm")


def shm_buffer_path(master_addr: str, master_port: int, rank: int) -> Path:
    """The shared-memory file DeepSpeed's CPU allreduce op creates for `rank`
    (deepspeed/ops/csrc/cpu/comm/shm.cpp: deepspeed_allreduce_buffer_UID_ADDR_PORT_RANK)."""
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{master_addr}_{master_port}_{rank}"
    return SHM_BUFFER_DIR / name


def release_shm_buffer(master_addr: str, master_port: int, rank: int) -> None:
    """Unlink this rank's 69 MB shared-memory buffer once every rank has mapped every other's.

    DeepSpeed never unlinks it, so each learner start left one per rank in /dev/shm (RAM) for
    good: 15 GB of them filled this 24 GB machine until Ray's memory monitor killed a run. The
    op opens the buffers by name only inside init_distributed, so after a barrier the names are
    no longer needed; the memory stays mapped and is freed when the last rank exits, a SIGKILL
    included."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    shm_buffer_path(master_addr, master_port, rank).unlink(missing_ok=True)


def _partitioned_loading(ds_config: dict[str, Any]) -> Any:
    """Under ZeRO-3, make from_pretrained build the model already partitioned (zero.Init), so
    no rank ever holds the whole model (needed for 32B on 8 GPUs). transformers needs the
    `accelerate` package for it; without it each rank loads the full model first and DeepSpeed
    partitions it afterwards (fine for small models). Keep the returned object alive."""
    try:
        from transformers.integrations import HfDeepSpeedConfig

        return HfDeepSpeedConfig(ds_config)
    except (ImportError, importlib.metadata.PackageNotFoundError):
        print(
            "spear_ray: ZeRO-3 without partitioned loading (transformers needs the `accelerate` "
            "package for it): each learner rank loads the whole model once",
            file=sys.stderr,
        )
        return None


def _seed(*parts: Any) -> int:
    """A stable 63-bit seed from the parts (Python's str hash is salted per process)."""
    import hashlib

    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


__all__ = [
    "METRIC_REDUCTIONS",
    "REPLAY_ONLY_METRICS",
    "LearnerRank",
    "deepspeed_config",
    "free_port",
    "learning_rate",
    "shm_op_built",
]
