"""`spear-ray train`: start (or resume) a run on a local or remote Ray and drive the Controller.

Progress goes to stdout one line per step; every step's metrics go to RUN_DIR/metrics.jsonl.
"""

from __future__ import annotations

import os
import time
from collections import deque
from pathlib import Path

from spear_ray.config import SpearConfig
from spear_ray.run_dir import RunDir


def connect_ray(address: str | None, log) -> bool:
    """Start a local Ray, or join `address`, unless Ray is running already; True if this call
    started or joined it (so the caller owns the shutdown)."""
    import ray

    if ray.is_initialized():
        return False
    if address:
        log(f"connecting to Ray at {address}")
        ray.init(address=address, log_to_driver=True)
    else:
        log("starting a local Ray")
        ray.init(include_dashboard=False, log_to_driver=True)
    return True


def _format(metrics: dict, keys: list[tuple[str, str, str]]) -> str:
    parts = []
    for key, label, fmt in keys:
        value = metrics.get(key)
        if value is not None:
            parts.append(f"{label} {value:{fmt}}")
    return "  ".join(parts)


SUCCESS_WINDOW = 10  # one step's sampled success is noisy (few tasks): also show a running mean

STEP_LINE = [
    ("reward/mean", "reward", "+.3f"),
    ("success_rate", "success", ".2f"),
    ("buffer/size", "buffer", "d"),
    ("spear/replay_rows", "replayed", "d"),
    ("spear/w_sil", "w_sil", ".2f"),
    ("update/loss", "loss", "+.4f"),
]


def run_training(
    config: SpearConfig,
    *,
    run: RunDir,
    resume: bool = False,
    address: str | None = None,
    log=print,
) -> dict:
    """Train to `config.run.total_steps`; returns the last evaluation's metrics."""
    from transformers import AutoTokenizer

    from spear_ray.controller import Controller
    from spear_ray.models import resolve_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    log(f"run directory: {run.path}")
    model_dir = resolve_model_path(config.model.path)
    tokenizer = AutoTokenizer.from_pretrained(
        str(
            resolve_model_path(config.model.tokenizer_path)
            if config.model.tokenizer_path
            else model_dir
        )
    )
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    connect_ray(address, log)
    log(
        f"starting {config.learner.num_ranks} learner rank(s), "
        f"{config.rollout.num_workers} rollout worker(s), the replay buffer"
    )
    controller = Controller(config, run, pad_token_id=pad_id, log=log)
    first = 0
    try:
        if resume:
            checkpoint = run.latest_checkpoint()
            if checkpoint is not None:
                first = controller.restore(checkpoint) + 1
                log(f"resumed from {checkpoint} (next step {first})")
                # rows of steps >= first logged before the interruption are superseded by the
                # ones that follow this marker (readers keep the last row of a step)
                run.log_metrics({"step": first, "event": "resumed", "checkpoint": str(checkpoint)})
        evaluation = {}
        every = config.run.eval_every_steps
        if every and first == 0:
            evaluation = _evaluate(controller, run, step=0, log=log)
        recent_success: deque[float] = deque(maxlen=SUCCESS_WINDOW)
        for t in range(first, config.run.total_steps):
            t0 = time.perf_counter()
            metrics = controller.step(t)
            run.log_metrics(metrics)
            if metrics.get("success_rate") is not None:
                recent_success.append(metrics["success_rate"])
            log(
                f"step {t + 1}/{config.run.total_steps}  {_format(metrics, STEP_LINE)}"
                f"  (success over the last {len(recent_success)} steps "
                f"{sum(recent_success) / max(len(recent_success), 1):.2f}; "
                f"{time.perf_counter() - t0:.1f}s)"
            )
            done = t + 1 == config.run.total_steps
            if every and ((t + 1) % every == 0 or done):
                evaluation = _evaluate(controller, run, step=t + 1, log=log)
            if (t + 1) % config.checkpoint.every_steps == 0 or done:
                controller.save(t)
                log(f"checkpoint saved: {run.latest_checkpoint()}")
        _log_success_summary(run, log)
        return evaluation
    finally:
        controller.shutdown()


def _evaluate(controller, run: RunDir, *, step: int, log) -> dict:
    metrics = controller.evaluate()
    run.log_metrics({"step": step, **metrics})
    log(
        f"eval after {step} steps: success rate {metrics['eval/success_rate']:.3f} "
        f"on {controller.config.env.eval_tasks} held-out tasks"
    )
    return metrics


def _log_success_summary(run: RunDir, log) -> None:
    """One line comparing the run's first and last held-out evaluation."""
    evals = {
        r["step"]: r["eval/success_rate"] for r in run.read_metrics() if "eval/success_rate" in r
    }
    if len(evals) >= 2:
        (s0, first), (s1, last) = min(evals.items()), max(evals.items())
        log(
            f"held-out success rate: {first:.3f} after {s0} steps -> {last:.3f} after {s1} "
            f"steps ({last - first:+.3f})"
        )


def resolve_run(config_source: str | None, overrides: list[str], resume: str | None):
    """(config, run dir, resuming?) from the CLI's arguments."""
    from spear_ray.config import load_config

    if resume:
        run, config = RunDir.open(Path(resume), overrides)
        return config, run, True
    config = load_config(config_source or "demo", overrides)
    return config, RunDir.create(config), False
