"""Time per phase of a training step, GRPO vs GRPO+SPEAR, on the same workload in one run.

    .venv/bin/python benchmarks/step.py [--steps 3] [--warmup 1] [--prompts 8]

Both modes use the demo preset (tiny Llama, frozenlake, one vLLM rollout worker, one DeepSpeed
learner rank, local Ray) with the same seeds and therefore the same tasks; GRPO is the same config
with `algo.sil.enabled=false` (no replay buffer, no replay update). The modes run one after the
other in this process, each with its own Controller, started and waited for before its first
step; the first `--warmup` steps of each are not timed (first forward passes, lazy imports).
Replay fires only when the buffer's trigger does (with the defaults, in the last timed step).

What is measured, and how:

- Phases: `Controller.step` times rollout, experience, replay_batch, logp_old, update,
  update_replay, buffer and sync_weights; the table shows their mean per measured step.
- SPEAR bookkeeping share = (replay_batch + buffer) / step time, summed over SPEAR's measured
  steps. replay_batch is the buffer actor's trigger check, recalibration and draw; buffer is
  building the ReplayEntry rows and the actor's expire/admit/baseline/checkpoint. The replay
  update (update_replay) is learning compute, not bookkeeping: it is reported on its own line.
  The experience phase runs the same code in both modes (nothing in it depends on SIL), so its
  SPEAR-only cost is zero by construction; its GRPO/SPEAR difference is printed as a noise gauge.
- Weight sync: LearnerGroup.publish_weights (rank 0 gathers, packs buckets, puts them in the
  object store) + RolloutGroup.update_weights (the worker fetches, unpacks and loads them into
  vLLM), timed directly `--sync-repeats` times, against a plain in-memory copy of the same state
  dict in this process (`{k: v.clone()}`), each copy timed right after a sync.
  weight_sync_vs_memcpy = the median of the paired sync s / memcpy s, i.e. how many times slower
  than a memcpy the sync is (1.0 would be memcpy speed).
- Learner tokens/s: LearnerGroup.update(phase="on_policy") on one fixed TrainBatch (a fresh
  rollout of step 0's tasks, every row trainable, seeded +-1 advantages), timed from the driver
  (Ray calls and batch transfer included), against a plain single-process torch loop in this
  process on the same model: AutoModelForCausalLM, AdamW with the learner's settings, the same
  mini-batches and micro-batch packing, PPO-clip + entropy loss, gradient clipping, the same
  number of torch threads as the learner rank. Interleaved, so drift hits both sides alike.
  learner_vs_plain_torch = learner tokens/s / plain tokens/s. The learner also runs Clip-Cov
  selection and per-token statistics that the plain loop does not; they count as learner cost.

The machine may be shared: numbers are noisy, nothing here asserts a timing. The last line of
stdout is JSON with keys spear_bookkeeping_share, weight_sync_s, weight_sync_vs_memcpy,
learner_vs_plain_torch (and a few more).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import ray
import torch

from buffers.replay_buffer import ReplayBuffer, ReplayEntry
from learners.policy import micro_batches, split_sizes
from spear_ray.config import SpearConfig, load_config
from spear_ray.containers import TrainBatch, build_train_batch
from spear_ray.controller import Controller, tasks_for_step
from spear_ray.recipe import Recipe
from spear_ray.run_dir import RunDir

PHASES = (
    "rollout",
    "experience",
    "replay_batch",
    "logp_old",
    "update",
    "update_replay",
    "buffer",
    "sync_weights",
)
BOOKKEEPING = ("replay_batch", "buffer")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- config


def bench_config(mode: str, args: argparse.Namespace, runs_dir: str) -> SpearConfig:
    """The demo preset, shortened; `mode` "grpo" switches SIL off, "spear" keeps the preset."""
    overrides = [
        f"run.total_steps={args.warmup + args.steps}",
        "run.eval_every_steps=0",
        f"run.runs_dir={runs_dir}",
        f"run.name=step-bench-{mode}",
        f"rollout.prompts_per_step={args.prompts}",
        *args.override,
    ]
    if mode == "grpo":
        overrides.append("algo.sil.enabled=false")
    return load_config("demo", overrides)


def pad_token_id(config: SpearConfig) -> int:
    from transformers import AutoTokenizer

    from spear_ray.models import resolve_model_path

    path = config.model.tokenizer_path or config.model.path
    tokenizer = AutoTokenizer.from_pretrained(str(resolve_model_path(path)))
    pad = tokenizer.pad_token_id
    return pad if pad is not None else tokenizer.eos_token_id


# ----------------------------------------------------------------------------- phases


def run_steps(controller: Controller, mode: str, total: int, warmup: int) -> list[dict]:
    """Run steps 0..total-1; the metrics of the steps after the warm-up."""
    measured = []
    for t in range(total):
        m = controller.step(t)
        timed = t >= warmup
        log(
            f"[{mode}] step {t + 1}/{total}{'' if timed else ' (warm-up)'}: "
            f"{m['time/step']:.2f}s  rollout {m['time/rollout']:.2f}s  "
            f"update {m['time/update']:.2f}s  replay rows {m['spear/replay_rows']}  "
            f"buffer {m.get('buffer/size', '-')}"
        )
        if timed:
            measured.append(m)
    return measured


def phase_seconds(steps: list[dict]) -> dict[str, float]:
    """Mean seconds per step of every phase, and of the whole step."""
    return {
        name: statistics.fmean(m.get(f"time/{name}", 0.0) for m in steps)
        for name in (*PHASES, "step")
    }


# ----------------------------------------------------------------------------- weight sync


def measure_weight_sync(controller: Controller, repeats: int) -> dict[str, float]:
    """Median publish + load seconds vs a plain clone of the same state dict in this process."""
    learners, rollouts = controller.learners, controller.rollouts
    state = learners.full_state_dict()
    nbytes = sum(v.numel() * v.element_size() for v in state.values())
    publish, load, memcpy = [], [], []
    for k in range(repeats):
        # a version the worker has not seen, or update_weights is a no-op (idempotence)
        version = controller.weight_version + 1 + k
        t0 = time.perf_counter()
        weights = learners.publish_weights()
        t1 = time.perf_counter()
        rollouts.update_weights(weights, version)
        t2 = time.perf_counter()
        publish.append(t1 - t0)
        load.append(t2 - t1)
        del weights  # drop the refs so the object store frees the buckets
        # the copy right after each sync, so drift of a shared machine hits both alike
        t0 = time.perf_counter()
        copy = {name: tensor.clone() for name, tensor in state.items()}
        memcpy.append(time.perf_counter() - t0)
        del copy
    controller.weight_version += repeats
    sync = [p + q for p, q in zip(publish, load, strict=True)]
    return {
        "bytes": nbytes,
        "tensors": len(state),
        "publish_s": statistics.median(publish),
        "load_s": statistics.median(load),
        "sync_s": statistics.median(sync),
        "memcpy_s": statistics.median(memcpy),
        "sync_vs_memcpy": statistics.median(a / b for a, b in zip(sync, memcpy, strict=True)),
    }


# ----------------------------------------------------------------------------- learner


def fixed_rollout(controller: Controller, config: SpearConfig, pad_id: int):
    """Step 0's tasks rolled out once more, and their TrainBatch with every row trainable and
    seeded +-1 advantages (a filtered or zero-advantage row would skip work and flatter the
    throughput)."""
    trajectories = controller.rollouts.rollout(tasks_for_step(config, 0))
    generator = torch.Generator().manual_seed(config.run.seed)
    signs = torch.randint(0, 2, (len(trajectories),), generator=generator) * 2 - 1
    return trajectories, build_train_batch(trajectories, [float(s) for s in signs], pad_id)


def buffer_breakdown(
    config: SpearConfig, trajectories: list, batch: TrainBatch, directory: str, repeats: int = 3
) -> dict[str, float]:
    """Where the `buffer` phase goes, replayed on one step's rows with a ReplayBuffer in this
    process (median of `repeats` steps): building the ReplayEntry rows (driver), moving them
    through the object store (what the actor call pays), end_step's expire/admit/baseline, and
    its durable checkpoint."""
    rule = Recipe.from_config(config).replay
    if rule is None:
        raise SystemExit("benchmarks/step.py: the buffer breakdown needs algo.sil.enabled: true")
    buffer = ReplayBuffer(rule, seed=config.run.seed)
    groups = [0.0] * config.rollout.prompts_per_step
    seconds: dict[str, list[float]] = {"entries": [], "transfer": [], "end_step": [], "save": []}
    for step in range(repeats):
        t0 = time.perf_counter()
        entries = [
            ReplayEntry.from_batch_row(traj, batch, i, step=step)
            for i, traj in enumerate(trajectories)
        ]
        t1 = time.perf_counter()
        ray.get(ray.put(entries))
        t2 = time.perf_counter()
        buffer.end_step(step=step, entries=entries, group_means=groups, group_stds=groups)
        t3 = time.perf_counter()
        buffer.save(Path(directory) / "breakdown-buffer.npz")
        t4 = time.perf_counter()
        for name, dt in zip(seconds, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            seconds[name].append(dt)
    result = {f"{name}_s": statistics.median(values) for name, values in seconds.items()}
    return {"rows": len(trajectories), **result}


def learner_threads(controller: Controller) -> int:
    """torch's intra-op thread count inside learner rank 0 (Ray sets OMP_NUM_THREADS from the
    actor's num_cpus)."""
    rank = controller.learners.ranks[0]
    return int(ray.get(rank.__ray_call__.remote(lambda _self: torch.get_num_threads())))


class PlainTorchLoop:
    """The reference: one process, HF model, AdamW, the learner's batching, nothing else."""

    def __init__(self, config: SpearConfig):
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        from spear_ray.models import resolve_model_path

        hf_logging.disable_progress_bar()
        torch.manual_seed(config.run.seed)
        self.model = AutoModelForCausalLM.from_pretrained(
            str(resolve_model_path(config.model.path)), dtype=torch.float32
        )
        self.model.config.use_cache = False
        self.model.eval()  # as the learner: dropout off
        learner = config.learner
        self.learner = learner
        self.loss_cfg = config.algo.policy_loss
        self.norm_length = float(config.rollout.max_response_tokens)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=learner.lr,
            betas=tuple(learner.betas),
            weight_decay=learner.weight_decay,
        )

    def loss(self, micro: TrainBatch, num_sequences: int) -> torch.Tensor:
        """PPO-clip + entropy bonus, seq-mean-token-sum-norm: the same tensors as the learner's."""
        logits = self.model(
            input_ids=micro.input_ids, attention_mask=micro.attention_mask, use_cache=False
        ).logits[:, :-1]
        targets = micro.input_ids[:, 1:].unsqueeze(-1)
        lse = torch.logsumexp(logits, dim=-1)
        logp = logits.gather(-1, targets).squeeze(-1) - lse
        mask = micro.loss_mask[:, 1:]
        adv = micro.advantages[:, 1:]
        ratio = torch.exp(logp - micro.old_logprobs[:, 1:])
        clipped = ratio.clamp(1 - self.loss_cfg.clip_low, 1 + self.loss_cfg.clip_high)
        pg = -torch.minimum(ratio * adv, clipped * adv)
        entropy = lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        per_token = pg - self.loss_cfg.entropy_coef * entropy
        return (per_token * mask).sum() / (self.norm_length * num_sequences)

    def update(self, batch: TrainBatch) -> int:
        """ppo_epochs x mini-batches optimizer steps; returns the tokens forwarded."""
        tokens = 0
        for _ in range(self.learner.ppo_epochs):
            start = 0
            for size in split_sizes(batch.rows, self.learner.mini_batches_per_step):
                mini = batch.select(list(range(start, start + size)))
                start += size
                for micro in micro_batches(mini, self.learner.tokens_per_micro_batch):
                    self.loss(micro, num_sequences=size).backward()
                    tokens += int(micro.attention_mask.sum())
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.learner.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        return tokens


def measure_learner(
    controller: Controller, config: SpearConfig, batch: TrainBatch, repeats: int
) -> dict[str, float]:
    """tokens/s of LearnerGroup.update vs PlainTorchLoop.update on `batch`, interleaved; the
    first call of each is a warm-up."""
    threads = learner_threads(controller)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    plain = PlainTorchLoop(config)
    # update() is idempotent per step: every call needs a step number it has not seen
    first_step = config.run.total_steps + 1000
    runs: dict[str, list[tuple[float, float]]] = {"learner": [], "plain": []}
    rank_tok_s: list[float] = []
    try:
        for k in range(repeats + 1):
            t0 = time.perf_counter()
            metrics = controller.learners.update(
                batch=batch, step=first_step + k, phase="on_policy"
            )
            t1 = time.perf_counter()
            tokens = plain.update(batch)
            t2 = time.perf_counter()
            log(
                f"[learner] round {k + 1}/{repeats + 1}{' (warm-up)' if k == 0 else ''}: "
                f"learner {metrics['tokens']:.0f} tok in {t1 - t0:.2f}s, "
                f"plain torch {tokens} tok in {t2 - t1:.2f}s"
            )
            if k == 0:
                continue
            runs["learner"].append((metrics["tokens"], t1 - t0))
            runs["plain"].append((float(tokens), t2 - t1))
            rank_tok_s.append(metrics["tokens_per_s"])
    finally:
        torch.set_num_threads(previous_threads)
    rates = {name: sum(r[0] for r in rows) / sum(r[1] for r in rows) for name, rows in runs.items()}
    return {
        "threads": threads,
        "tokens_per_update": runs["plain"][0][0],
        "learner_tok_s": rates["learner"],
        "learner_rank_tok_s": statistics.fmean(rank_tok_s),
        "plain_tok_s": rates["plain"],
    }


# ----------------------------------------------------------------------------- report


def print_phase_table(grpo: dict[str, float], spear: dict[str, float]) -> None:
    print(f"{'phase (mean s/step)':22} {'GRPO':>9} {'GRPO+SPEAR':>11} {'% of SPEAR':>11}")
    for name in (*PHASES, "step"):
        share = 100 * spear[name] / spear["step"]
        mark = "  bookkeeping" if name in BOOKKEEPING else ""
        print(f"{name:22} {grpo[name]:9.3f} {spear[name]:11.3f} {share:10.2f}%{mark}")


def report(results: dict) -> None:
    """The human-readable table and lines, then the JSON line (last line of stdout)."""
    grpo, spear = results["grpo"], results["spear"]
    sync, learner, parts = results["sync"], results["learner"], results["buffer_breakdown"]
    print_phase_table(grpo, spear)
    bookkeeping = sum(spear[name] for name in BOOKKEEPING)
    share = bookkeeping / spear["step"]
    print(
        f"SPEAR bookkeeping (replay_batch + buffer): {bookkeeping * 1000:.1f} ms/step = "
        f"{100 * share:.2f}% of the SPEAR step (aim <= 1%)"
    )
    print(
        f"  buffer phase, replayed in-process on {parts['rows']} rows: ReplayEntry rows "
        f"{parts['entries_s'] * 1000:.1f} ms, object-store round trip "
        f"{parts['transfer_s'] * 1000:.1f} ms, end_step {parts['end_step_s'] * 1000:.1f} ms, "
        f"durable checkpoint {parts['save_s'] * 1000:.1f} ms"
    )
    print(
        f"replay update (learning, not bookkeeping): {spear['update_replay']:.3f} s/step; "
        f"replayed rows per timed step {results['replay_rows']}"
    )
    print(
        f"experience phase, SPEAR - GRPO (same code in both, so noise): "
        f"{1000 * (spear['experience'] - grpo['experience']):+.1f} ms/step"
    )
    mb, vs_memcpy = sync["bytes"] / 1e6, sync["sync_vs_memcpy"]
    print(
        f"weight sync of {mb:.2f} MB ({sync['tensors']} tensors): "
        f"{sync['sync_s'] * 1000:.1f} ms (publish {sync['publish_s'] * 1000:.1f} + "
        f"load {sync['load_s'] * 1000:.1f}) = {mb / 1000 / sync['sync_s']:.3f} GB/s; "
        f"in-memory copy {sync['memcpy_s'] * 1000:.2f} ms = "
        f"{mb / 1000 / sync['memcpy_s']:.2f} GB/s; sync takes {vs_memcpy:.0f}x the copy's time"
    )
    ratio = learner["learner_tok_s"] / learner["plain_tok_s"]
    print(
        f"learner: {learner['learner_tok_s']:.0f} tok/s from the driver "
        f"({learner['learner_rank_tok_s']:.0f} inside the rank) vs plain torch "
        f"{learner['plain_tok_s']:.0f} tok/s = {ratio:.2f}x (aim >= 0.9x); "
        f"{learner['tokens_per_update']:.0f} tokens/update, {learner['threads']} torch thread(s)"
    )
    print(f"wall {results['wall_s']:.0f} s, cpus={os.cpu_count()}")
    print(
        json.dumps(
            {
                "spear_bookkeeping_share": round(share, 5),
                "weight_sync_s": round(sync["sync_s"], 5),
                "weight_sync_vs_memcpy": round(vs_memcpy, 2),
                "learner_vs_plain_torch": round(ratio, 3),
                "grpo_step_s": round(grpo["step"], 3),
                "spear_step_s": round(spear["step"], 3),
                "spear_update_replay_s": round(spear["update_replay"], 3),
                "weight_sync_bytes": sync["bytes"],
                "weight_sync_gb_s": round(mb / 1000 / sync["sync_s"], 4),
                "memcpy_gb_s": round(mb / 1000 / sync["memcpy_s"], 3),
                "learner_tok_s": round(learner["learner_tok_s"], 1),
                "plain_torch_tok_s": round(learner["plain_tok_s"], 1),
            }
        )
    )


def measure(args: argparse.Namespace, runs_dir: str) -> dict:
    """Both modes' steps, then (on the SPEAR controller) weight sync, buffer and learner."""
    configs = {mode: bench_config(mode, args, runs_dir) for mode in ("grpo", "spear")}
    pad_id = pad_token_id(configs["spear"])
    res = configs["spear"].resources
    need = res.cpus_per_learner + res.cpus_per_rollout_worker * configs["spear"].rollout.num_workers
    ray.init(
        num_cpus=max(os.cpu_count() or 1, math.ceil(need)),
        include_dashboard=False,
        log_to_driver=args.verbose,
    )
    results: dict = {}
    try:
        for mode, config in configs.items():  # GRPO first, then SPEAR
            log(f"[{mode}] starting the controller (learner rank, rollout worker, buffer)")
            controller = Controller(config, RunDir.create(config), pad_id, log=log)
            try:
                # The Controller does not wait for the vLLM engine to start; wait here, so the
                # warm-up step is a warm-up and not the engine's start.
                controller.rollouts.health()
                steps = run_steps(controller, mode, config.run.total_steps, args.warmup)
                results[mode] = phase_seconds(steps)
                if mode == "grpo":
                    continue
                results["replay_rows"] = [m["spear/replay_rows"] for m in steps]
                log("[sync] timing publish_weights + update_weights")
                results["sync"] = measure_weight_sync(controller, args.sync_repeats)
                log("[learner] rolling out a fixed batch")
                trajectories, batch = fixed_rollout(controller, config, pad_id)
                results["buffer_breakdown"] = buffer_breakdown(
                    config, trajectories, batch, runs_dir
                )
                results["learner"] = measure_learner(
                    controller, config, batch, args.learner_repeats
                )
            finally:
                controller.shutdown()
    finally:
        ray.shutdown()
    return results


# ----------------------------------------------------------------------------- vs one process


def single_turn_config(args: argparse.Namespace, runs_dir: str) -> SpearConfig:
    """The single-process comparison's workload: GRPO (the variant table's keys), one tiny
    random Llama (small-random, fp32), `--prompts` x 4 samples, single turn, at most 64 new
    tokens, temperature 1, lr 1e-5, one learner rank and one rollout worker (one core each)."""
    from spear_ray.experiments.variants import dotted_overrides

    return load_config(
        "demo",
        [
            *dotted_overrides("grpo"),
            "model.path=builtin:small-random",
            "model.dtype=float32",
            f"rollout.prompts_per_step={args.prompts}",
            "rollout.samples_per_prompt=4",
            "rollout.max_tokens_per_turn=64",
            "rollout.max_prompt_tokens=256",
            "rollout.max_response_tokens=64",
            "rollout.temperature=1.0",
            "env.name=bench_tool",
            "env.options={max_turns: 1}",
            "learner.lr=1e-5",
            "learner.mini_batches_per_step=1",
            "learner.tokens_per_micro_batch=4096",
            "run.total_steps=1000",
            "run.eval_every_steps=0",
            "checkpoint.every_steps=1000",
            f"run.runs_dir={runs_dir}",
            "run.name=step-vs-single-process",
            *args.override,
        ],
    )


def measure_vs_single_process(args: argparse.Namespace, runs_dir: str) -> dict:
    """Rounds of `--steps` spear-ray steps alternate with rounds of the single-process loop's
    (benchmarks/single_process.py, in a subprocess using every core); the first step of each
    round is not timed. Total cores equal: the machine's."""
    import subprocess

    from engine_ratio import ROOT, register_bench_env

    register_bench_env()
    config = single_turn_config(args, runs_dir)
    config_file = Path(runs_dir) / "single-process-config.json"
    config_file.write_text(config.model_dump_json())
    baseline = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "single_process.py"),
            str(config_file),
            str(args.steps + 1),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"},
    )

    def baseline_round() -> list[dict]:
        baseline.stdin.write("go\n")
        baseline.stdin.flush()
        rows = []
        for line in baseline.stdout:
            row = json.loads(line) if line.startswith("{") else {}
            if "round_done" in row:
                return rows[1:]
            if "seconds" in row:
                rows.append(row)
        raise RuntimeError(f"single-process loop ended (exit {baseline.wait()})")

    for line in baseline.stdout:  # set up before anything is timed
        if line.startswith('{"ready"'):
            break
    ray.init(
        num_cpus=os.cpu_count(),
        include_dashboard=False,
        log_to_driver=args.verbose,
        runtime_env={
            "env_vars": {"PYTHONPATH": str(ROOT)},
            "worker_process_setup_hook": "benchmarks.engine_ratio.register_bench_env",
        },
    )
    spear_steps: list[float] = []
    single_steps: list[dict] = []
    phases: list[dict] = []
    cpu = {name: {"spear": 0.0, "single": 0.0} for name in ("user", "system", "idle")}
    try:
        controller = Controller(config, RunDir.create(config), pad_token_id(config), log=log)
        try:
            controller.rollouts.health()
            t = 0
            for round_index in range(args.rounds):
                before = machine_cpu_seconds()
                for k in range(args.steps + 1):
                    t0 = time.perf_counter()
                    metrics = controller.step(t)
                    if k:  # the first step of a round is a warm-up
                        spear_steps.append(time.perf_counter() - t0)
                        phases.append(metrics)
                    t += 1
                between = machine_cpu_seconds()
                single_steps += baseline_round()
                after = machine_cpu_seconds()
                for name in cpu:
                    cpu[name]["spear"] += (between[name] - before[name]) / (args.steps + 1)
                    cpu[name]["single"] += (after[name] - between[name]) / (args.steps + 1)
                log(
                    f"[round {round_index + 1}/{args.rounds}] spear-ray "
                    f"{statistics.median(spear_steps):.3f} s/step, single process "
                    f"{statistics.median(r['seconds'] for r in single_steps):.3f} s/step"
                )
        finally:
            controller.shutdown()
    finally:
        ray.shutdown()
        baseline.stdin.close()
        baseline.wait(timeout=120)
    return {
        "step_s": statistics.median(spear_steps),
        "single_process_step_s": statistics.median(r["seconds"] for r in single_steps),
        "phases": phase_seconds(phases),
        "single_process_phases": {
            name: statistics.fmean(r["phases"][name] for r in single_steps)
            for name in single_steps[0]["phases"]
        },
        "cpu_per_step": {
            name: {side: v / args.rounds for side, v in sides.items()}
            for name, sides in cpu.items()
        },
    }


def machine_cpu_seconds() -> dict[str, float]:
    """The whole machine's CPU seconds so far (/proc/stat), by kind: user (incl. nice),
    system (incl. irq, softirq) and idle (incl. iowait), summed over cores."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:8]]
    user, nice, system, idle, iowait, irq, softirq = fields
    hz = os.sysconf("SC_CLK_TCK")
    return {
        "user": (user + nice) / hz,
        "system": (system + irq + softirq) / hz,
        "idle": (idle + iowait) / hz,
    }


def report_vs_single_process(results: dict) -> None:
    step, single = results["step_s"], results["single_process_step_s"]
    single_phases = results["single_process_phases"]
    print(f"{'phase (mean s/step)':22} {'spear-ray':>9} {'single process':>14}")
    for name, seconds in results["phases"].items():
        other = f"{single_phases[name]:14.3f}" if name in single_phases else f"{'':>14}"
        print(f"{name:22} {seconds:9.3f} {other}")
    for name, sides in results["cpu_per_step"].items():
        print(
            f"machine {name} CPU s/step (round mean, warm-up step included): spear-ray "
            f"{sides['spear']:.3f}, single process {sides['single']:.3f}"
        )
    print(
        f"spear-ray step {step:.3f} s vs single process {single:.3f} s: ratio "
        f"{step / single:.2f} (aim <= 0.8 on CPU), cpus={os.cpu_count()}"
    )
    print(
        json.dumps(
            {
                "step_s": round(step, 4),
                "single_process_step_s": round(single, 4),
                "step_ratio": round(step / single, 3),
                "system_cpu_s_per_step": round(results["cpu_per_step"]["system"]["spear"], 4),
                "single_process_system_cpu_s_per_step": round(
                    results["cpu_per_step"]["system"]["single"], 4
                ),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps per mode")
    parser.add_argument("--prompts", type=int, default=8, help="rollout.prompts_per_step")
    parser.add_argument("--sync-repeats", type=int, default=5)
    parser.add_argument("--learner-repeats", type=int, default=3)
    parser.add_argument(
        "--override", action="append", default=[], help="extra dotted config override"
    )
    parser.add_argument("--verbose", action="store_true", help="show the actors' logs")
    parser.add_argument(
        "--vs-single-process",
        action="store_true",
        help="instead: spear-ray's step against one plain process on a single-turn GRPO workload",
    )
    parser.add_argument("--rounds", type=int, default=3, help="with --vs-single-process")
    args = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    runs_dir = tempfile.mkdtemp(prefix="step-bench-")
    try:
        if args.vs_single_process:
            report_vs_single_process(measure_vs_single_process(args, runs_dir))
            return
        results = measure(args, runs_dir)
    finally:
        shutil.rmtree(runs_dir, ignore_errors=True)
    results["wall_s"] = time.perf_counter() - started
    report(results)


if __name__ == "__main__":
    main()
