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

With `commit=True` (`--commit`) the grid records itself in git as it goes, so any machine can
continue it from a fresh clone: right after a run's FINISHED marker is written, exactly its
config.yaml, metrics.jsonl and FINISHED are force-added (the experiment directory may be
git-ignored) and committed on their own (`git commit --only -- <paths>`: other staged or modified
files of the repository stay as they are); runs already finished but not yet committed are
committed when the grid starts (a run finished by its checkpoints gets its marker first), and
spec.yaml, summary.json, summary.md and the plots at the end. A failed commit (a lock, no
identity) is one logged line: the run stays finished on disk and is committed by the next start.
"""

from __future__ import annotations

import shutil
import subprocess
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


# ----------------------------------------------------------------------------- git (--commit)

RUN_FILES = ("config.yaml", "metrics.jsonl", FINISHED_MARKER)  # all a finished run needs
GIT_TIMEOUT_S = 120


def _run_git(directory: Path, *args: str) -> subprocess.CompletedProcess:
    """`git -C directory ARGS`, output captured. No stdin (git never waits for a prompt) and a
    time limit (a hung git, e.g. a signing agent, is a failed commit, not a stopped grid)."""
    return subprocess.run(
        ["git", "-C", str(directory), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
        timeout=GIT_TIMEOUT_S,
    )


def git_work_tree(path: str | Path) -> Path | None:
    """The top of the git work tree that holds `path` (or, if it does not exist yet, its nearest
    existing parent); None when there is none (or no git)."""
    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        out = _run_git(probe, "rev-parse", "--show-toplevel")
    except (OSError, subprocess.SubprocessError):
        return None
    top = out.stdout.strip()
    return Path(top).resolve() if out.returncode == 0 and top else None


class GitRecorder:
    """Commits a finished run's files (or the summary's) to the git work tree holding the
    experiment, each commit holding only those paths. Never raises: a failure is one log line."""

    def __init__(self, repo: Path, experiment: str, log: Callable[[str], None]):
        self.repo = repo
        self.experiment = experiment
        self.log = log

    @classmethod
    def for_output(
        cls, root: str | Path, experiment: str, log: Callable[[str], None]
    ) -> GitRecorder:
        repo = git_work_tree(root)
        if repo is None:
            raise SpecError(
                f"--commit: {root} is not inside a git work tree; run the experiment in a clone "
                f"of the repository that keeps its results (or drop --commit)"
            )
        return cls(repo, experiment, log)

    def _git(self, *args: str) -> subprocess.CompletedProcess:
        return _run_git(self.repo, *args)

    def _relative(self, paths: list[Path]) -> list[str]:
        return [str(Path(p).resolve().relative_to(self.repo)) for p in paths if Path(p).is_file()]

    def pending(self, paths: list[Path]) -> bool:
        """Some of `paths` is untracked (ignored or not) or differs from HEAD or the index."""
        return self._pending(self._relative(paths))

    def _pending(self, rel: list[str]) -> bool:
        if not rel:
            return False
        out = self._git(
            "status", "--porcelain", "--ignored=matching", "--untracked-files=all", "--", *rel
        )
        return out.returncode != 0 or bool(out.stdout.strip())

    def commit(self, paths: list[Path], message: str, what: str) -> bool:
        """Force-add `paths` and commit only them; False (and one logged line) if git refused."""
        try:
            rel = self._relative(paths)
            if not self._pending(rel):
                return True
            for args in (
                ("add", "--force", "--", *rel),
                ("commit", "--quiet", "--only", "-m", message, "--", *rel),
            ):
                out = self._git(*args)
                if out.returncode != 0:
                    problem = (out.stderr.strip() or out.stdout.strip() or "no output").splitlines()
                    self.log(
                        f"{what}: git {args[0]} failed ({problem[0]}); not committed, the next "
                        f"start commits it"
                    )
                    return False
            head = self._git("rev-parse", "--short", "HEAD").stdout.strip()
            self.log(f"{what}: committed {head}")
            return True
        except Exception as err:  # never lose a run or stop the grid over git
            self.log(f"{what}: commit failed ({type(err).__name__}: {err}); going on")
            return False

    def run_paths(self, planned: PlannedRun) -> list[Path]:
        return [planned.path / name for name in RUN_FILES]

    def run_pending(self, planned: PlannedRun) -> bool:
        try:
            return self.pending(self.run_paths(planned))
        except Exception:
            return True

    def commit_run(self, planned: PlannedRun, what: str) -> bool:
        from spear_ray.experiments.summary import final_eval_success
        from spear_ray.plots import read_curves

        steps = planned.config.run.total_steps
        try:
            success = final_eval_success(read_curves(planned.path), steps)
        except Exception:
            success = None
        result = (
            f"final held-out success {success:.3f}"
            if success is not None
            else "no final held-out success"
        )
        message = (
            f"experiment {self.experiment}: {planned.run.label} finished ({steps} steps, {result})"
        )
        return self.commit(self.run_paths(planned), message, what)

    def commit_summary(self, root: Path, summary: dict[str, Any], total_runs: int) -> bool:
        plots = [root / p for paths in summary.get("plots", {}).values() for p in paths]
        paths = [root / "spec.yaml", root / "summary.json", root / "summary.md", *plots]
        finished = sum(
            len(entry["seeds"])
            for env in summary["envs"].values()
            for entry in env["variants"].values()
        )
        message = f"experiment {self.experiment}: summary ({finished}/{total_runs} runs finished)"
        return self.commit(paths, message, "summary")


def commit_finished_runs(
    plan: list[PlannedRun], recorder: GitRecorder, log: Callable[[str], None]
) -> None:
    """Commit the runs that are finished but not (or not wholly) committed; a run finished by its
    final checkpoint (before the marker existed) gets its marker first, so that a clone without
    checkpoints sees it finished."""
    for i, planned in enumerate(plan, 1):
        if planned.state != FINISHED:
            continue
        tag = f"[{i}/{len(plan)}] {planned.run.label}"
        marker = planned.path / FINISHED_MARKER
        if not marker.is_file():
            _write_marker(planned)
            log(f"{tag}: finished by its final checkpoint; wrote its {FINISHED_MARKER} marker")
        if recorder.run_pending(planned):
            recorder.commit_run(planned, tag)


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
    commit: bool = False,
) -> dict[str, Any]:
    """Run every unfinished run of the grid, then write the summary; returns the summary.

    `train` replaces `spear_ray.train.run_training` (tests); without it, Ray is started here (or
    joined at `address`) once for all runs and shut down at the end if started here. `commit`:
    commit each run to git as it finishes, and the summary at the end (the module docstring);
    a SpecError before anything runs if `root` is not inside a git work tree.
    """
    from spear_ray.experiments.summary import write_summary

    root = Path(root) if root is not None else spec.default_output_dir()
    recorder = GitRecorder.for_output(root, spec.name, log) if commit else None
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
    if recorder is not None:
        commit_finished_runs(plan, recorder, log)

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
                if recorder is not None:
                    recorder.commit_run(planned, tag)
            done += 1
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    summary = write_summary(spec, root, log=log)
    if recorder is not None:
        recorder.commit_summary(root, summary, len(plan))
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
    _write_marker(planned)


def _write_marker(planned: PlannedRun) -> None:
    marker = planned.path / FINISHED_MARKER
    marker.write_text(f"{planned.config.run.total_steps} steps\n", encoding="utf-8")
