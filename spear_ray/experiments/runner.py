"""`spear-ray experiment SPEC.yaml`: run the grid, one run directory each, then summarise.

Runs go one after another through `run_training` in one Ray session (a small machine cannot run
two at once). Each run's state decides what happens to it:

- new:      no directory yet -> created and trained from step 0;
- finished: it holds the runner's FINISHED marker (written when its training returned), or its
            last step is logged and its final checkpoint is COMPLETE -> skipped. The marker lets
            a finished run keep only config.yaml + metrics.jsonl (all the summary reads): its
            checkpoints may be deleted, or the small files archived and copied back later;
- resume:   it has a COMPLETE checkpoint -> continued from it (`run_training(resume=True)`);
- restart:  it has a directory but no COMPLETE checkpoint (killed before its first one) -> removed
            and started again (its replay buffer's durable state would be ahead of step 0).

A run whose config.yaml no longer matches what the spec gives (the spec was edited) is an error
naming the fields that differ: delete that run directory, or restore the spec.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spear_ray.config import SpearConfig, config_differences, load_config
from spear_ray.experiments.spec import ExperimentSpec, RunSpec, SpecError
from spear_ray.run_dir import RunDir

NEW, FINISHED, RESUME, RESTART = "new", "finished", "resume", "restart"
FINISHED_MARKER = "FINISHED"


class ExperimentError(RuntimeError):
    """A run failed (with --keep-going: at least one did)."""


def is_finished(path: str | Path, total_steps: int) -> bool:
    """Nothing of the run is left to do: it holds the runner's FINISHED marker, or it logged its
    last training step and wrote the final checkpoint (written after the final evaluation)."""
    from spear_ray.plots import read_curves

    if (Path(path) / FINISHED_MARKER).is_file():
        return True
    run = RunDir(path)
    latest = run.latest_checkpoint()
    last = total_steps - 1
    return (
        latest is not None and latest.name == f"step_{last:06d}" and last in read_curves(path).train
    )


def run_state(path: str | Path, config: SpearConfig) -> str:
    """new / finished / resume / restart (see the module docstring); SpecError if the run
    directory holds a different config or is not a run directory."""
    path = Path(path)
    if not path.exists() or not any(path.iterdir()):
        return NEW
    run = RunDir(path)
    if not run.config_file.is_file():
        raise SpecError(f"{path} exists but is not a run directory (no config.yaml); move it away")
    # where the run directory lives does not count
    differing = config_differences(
        load_config(run.config_file), config, frozenset({"run.runs_dir", "run.name"})
    )
    if differing:
        shown = ", ".join(differing[:5]) + (
            f" and {len(differing) - 5} more" if len(differing) > 5 else ""
        )
        raise SpecError(
            f"{path}: its config.yaml differs from the spec's in {shown}; delete the run "
            f"directory to run it again with the spec, or restore the spec"
        )
    if is_finished(path, config.run.total_steps):
        return FINISHED
    return RESUME if run.latest_checkpoint() is not None else RESTART


@dataclass
class PlannedRun:
    run: RunSpec
    config: SpearConfig
    path: Path
    state: str


def plan_runs(spec: ExperimentSpec, root: str | Path) -> list[PlannedRun]:
    out = []
    for run in spec.runs():
        config = run.config(root, spec.steps)
        path = run.path(root)
        out.append(PlannedRun(run, config, path, run_state(path, config)))
    return out


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def run_experiment(
    spec: ExperimentSpec,
    root: str | Path | None = None,
    *,
    address: str | None = None,
    keep_going: bool = False,
    log: Callable[[str], None] = print,
    train: Callable[..., Any] | None = None,
) -> dict[str, Any]:
    """Run every unfinished run of the grid, then write the summary; returns the summary.

    `train` replaces `spear_ray.train.run_training` (tests); without it, Ray is started here (or
    joined at `address`) once for all runs and shut down at the end if started here.
    """
    from spear_ray.experiments.summary import write_summary

    root = Path(root) if root is not None else spec.default_output_dir()
    plan = plan_runs(spec, root)
    counts = {state: sum(p.state == state for p in plan) for state in (NEW, RESUME, RESTART)}
    to_run = sum(counts.values())
    log(
        f"experiment {spec.name}: {len(plan)} runs in {root} ({len(plan) - to_run} finished, "
        f"{counts[RESUME]} to resume, {counts[NEW] + counts[RESTART]} to start)"
    )
    root.mkdir(parents=True, exist_ok=True)
    if spec.text:
        (root / "spec.yaml").write_text(spec.text, encoding="utf-8")

    failures: list[str] = []
    durations: list[float] = []
    started_ray = False
    if to_run and train is None:
        from spear_ray.placement import connect_ray
        from spear_ray.train import run_training

        train = run_training
        started_ray = connect_ray(address, log)
    try:
        done = 0
        for i, planned in enumerate(plan, 1):
            tag = f"[{i}/{len(plan)}] {planned.run.label}"
            if planned.state == FINISHED:
                log(f"{tag}: finished, skipped")
                continue
            eta = (
                f"ETA {_duration(sum(durations) / len(durations) * (to_run - done))}"
                if durations
                else "ETA after the first run"
            )
            log(f"{tag}: {_describe(planned)} ({to_run - done} runs left, {eta})")
            t0 = time.perf_counter()
            try:
                _train_one(planned, train, log=lambda line, tag=tag: log(f"{tag} {line}"))
            except Exception as err:
                if not keep_going:
                    raise
                failures.append(f"{planned.run.label}: {type(err).__name__}: {err}")
                log(f"{tag}: FAILED ({type(err).__name__}: {err}); going on")
            else:
                durations.append(time.perf_counter() - t0)
                log(f"{tag}: done in {_duration(durations[-1])}")
            done += 1
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    summary = write_summary(spec, root, log=log)
    if failures:
        raise ExperimentError(f"{len(failures)} run(s) failed: " + "; ".join(failures))
    return summary


def _describe(planned: PlannedRun) -> str:
    if planned.state == RESUME:
        return f"resuming from {RunDir(planned.path).latest_checkpoint().name}"
    if planned.state == RESTART:
        return "no complete checkpoint: starting again from step 0"
    return "starting"


def _train_one(planned: PlannedRun, train: Callable[..., Any], log) -> None:
    if planned.state == RESTART:
        shutil.rmtree(planned.path)
    if planned.state == RESUME:
        run = RunDir(planned.path, planned.config.checkpoint.keep_last)
        train(planned.config, run=run, resume=True, log=log)
    else:
        train(planned.config, run=RunDir.create(planned.config), resume=False, log=log)
    # written last, so a marker always means the whole run (final eval and checkpoint) is done
    marker = planned.path / FINISHED_MARKER
    marker.write_text(f"{planned.config.run.total_steps} steps\n", encoding="utf-8")
