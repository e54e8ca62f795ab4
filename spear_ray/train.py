"""`spear-ray train`: start (or resume) a run on a local or remote Ray and drive the Controller.

Progress goes to stdout (spear_ray/console.py: a line per step, a progress bar on a terminal, or
quiet); every step's and evaluation's metrics go through a Reporter (spear_ray/reporting.py) to
RUN_DIR/metrics.jsonl and the sinks run.loggers names.
"""

from __future__ import annotations

import os
import shutil
import time

from spear_ray.config import SpearConfig
from spear_ray.console import OutputMode, TrainOutput, format_duration
from spear_ray.placement import Demand, bundle_of, check_fits, connect_ray
from spear_ray.preflight import resolve_run  # noqa: F401  (the CLI's: checks, then the run dir)
from spear_ray.reporting import Reporter
from spear_ray.run_dir import RunDir


def run_training(
    config: SpearConfig,
    *,
    run: RunDir,
    resume: bool = False,
    address: str | None = None,
    log=print,
    output: OutputMode = "lines",
) -> dict:
    """Train to `config.run.total_steps`; returns the last evaluation's metrics. `output`: a
    line per step, a progress bar, or quiet (see spear_ray/console.py)."""
    from transformers import AutoTokenizer

    from spear_ray.controller import Controller
    from spear_ray.models import resolve_model_path

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    out = TrainOutput(config.run.total_steps, mode=output, log=log)
    out.notice(f"run directory: {run.path}")
    stepped = resume  # a resumed run has trained before; a new one after its first step
    reporter = controller = None
    try:
        reporter = Reporter.open(config, run)  # first: a logger that cannot start fails fast
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
        connect_ray(address, out.info)
        check_fits(run_demands(config))  # a local Ray cannot grow: fail now, not in 120 s
        out.info(
            f"starting {config.learner.num_ranks} learner rank(s), "
            f"{config.rollout.num_workers} rollout worker(s), the replay buffer"
        )
        controller = Controller(config, run, pad_token_id=pad_id, log=out.info)
        first = 0
        if resume:  # the newest usable checkpoint; partial or damaged ones are reported
            checkpoint, step = controller.restore_latest(log=out.notice)
            if checkpoint is not None:
                first = step + 1
                out.notice(f"resumed from {checkpoint} (next step {first})")
                # rows of steps >= first logged before the interruption are superseded by the
                # ones that follow this marker (readers keep the last row of a step)
                reporter.log({"step": first, "event": "resumed", "checkpoint": str(checkpoint)})
        evaluation = {}
        every = config.run.eval_every_steps
        if every and first == 0:
            evaluation = _evaluate(controller, reporter, step=0, out=out)
        out.start(first)
        for t in range(first, config.run.total_steps):
            t0 = time.perf_counter()
            metrics = controller.step(t)
            stepped = True
            reporter.log(metrics)
            out.step(t, metrics, time.perf_counter() - t0)
            done = t + 1 == config.run.total_steps
            if every and ((t + 1) % every == 0 or done):
                evaluation = _evaluate(controller, reporter, step=t + 1, out=out)
            if (t + 1) % config.checkpoint.every_steps == 0 or done:
                controller.save(t)
                out.notice(f"checkpoint saved: {run.latest_checkpoint()}")
        out.close()
        _log_success_summary(run, out.notice)
        last = (
            f"; held-out success rate {evaluation['eval/success_rate']:.3f}" if evaluation else ""
        )
        out.notice(
            f"done: {config.run.total_steps} steps in "
            f"{format_duration(time.monotonic() - started)}{last}; {run.path}"
        )
        return evaluation
    finally:
        out.close()
        if controller is not None:
            controller.shutdown()
        if reporter is not None:
            reporter.close()
        if not stepped:
            _remove_unstarted_run(run, out.notice)


def _remove_unstarted_run(run: RunDir, log) -> None:
    """A new run that failed before its first step holds nothing worth keeping (its config,
    at most a step-0 evaluation): remove it, so that the same command, fixed, starts it again
    instead of being refused as an existing run that --resume cannot continue either."""
    shutil.rmtree(run.path, ignore_errors=True)
    log(f"removed {run.path}: the run stopped before its first step; the same command starts it")


def run_demands(config: SpearConfig) -> list[Demand]:
    """What a run reserves: one bundle per learner rank and per rollout worker (the replay
    buffer reserves none)."""
    from actors.rollout_group import rollout_bundle
    from spear_ray.recipe import rollout_spec

    res = config.resources
    return [
        Demand(
            "learner ranks",
            bundle_of(res.cpus_per_learner, res.gpus_per_learner),
            config.learner.num_ranks,
            ("learner.num_ranks", "resources.cpus_per_learner"),
        ),
        Demand(
            "rollout workers",
            rollout_bundle(rollout_spec(config)),
            config.rollout.num_workers,
            ("rollout.num_workers", "resources.cpus_per_rollout_worker"),
        ),
    ]


def _evaluate(controller, reporter: Reporter, *, step: int, out: TrainOutput) -> dict:
    tasks = controller.config.env.eval_tasks
    out.info(f"evaluating on {tasks} held-out tasks")
    metrics = controller.evaluate()
    reporter.log({"step": step, **metrics})
    failed = metrics["eval/infra_failures"]
    lost = f" ({failed} infrastructure failures, not counted)" if failed else ""
    out.notice(
        f"eval after {step} steps: success rate {metrics['eval/success_rate']:.3f} "
        f"on {tasks} held-out tasks{lost}"
    )
    return metrics


def _log_success_summary(run: RunDir, log) -> None:
    """One line comparing the run's first and last held-out evaluation."""
    evals = {
        r["step"]: r["eval/success_rate"]
        for r in run.read_metrics()
        if r.get("eval/success_rate") is not None
    }
    if len(evals) >= 2:
        (s0, first), (s1, last) = min(evals.items()), max(evals.items())
        log(
            f"held-out success rate: {first:.3f} after {s0} steps -> {last:.3f} after {s1} "
            f"steps ({last - first:+.3f})"
        )
