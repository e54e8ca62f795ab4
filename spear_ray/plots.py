"""Learning curves: read runs' metrics.jsonl, aggregate seeds, draw PNGs.

Used by `spear-ray plot RUN_DIR...` (one curve per run) and by `spear-ray experiment` (one curve
per variant: the mean over seeds with a min-max or +-std band).

x is the number of updates done: a training row of step t was sampled with the policy after t
updates, an evaluation row of step s evaluates the policy after s updates. A resumed run logs
steps again after a {"event": "resumed"} row; the last row of a step wins.

matplotlib is imported inside the drawing function (Agg canvas, no pyplot state), so importing
this module stays cheap.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class RunCurves:
    """The metrics of one run: the last training row and the last eval row of each step."""

    path: Path
    train: dict[int, dict[str, Any]]
    eval: dict[int, dict[str, Any]]

    @property
    def steps_done(self) -> int:
        """Training steps logged (the largest step + 1)."""
        return max(self.train) + 1 if self.train else 0

    def series(self, key: str, source: str = "train") -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) where `key` has a finite value, by step."""
        rows = self.train if source == "train" else self.eval
        points = [
            (step, float(row[key]))
            for step, row in sorted(rows.items())
            if isinstance(row.get(key), (int, float)) and math.isfinite(row[key])
        ]
        if not points:
            return np.zeros(0, dtype=int), np.zeros(0)
        steps, values = zip(*points, strict=True)
        return np.asarray(steps, dtype=int), np.asarray(values, dtype=float)


def read_curves(path: str | Path) -> RunCurves:
    """A run directory's (or a metrics.jsonl file's) curves."""
    path = Path(path)
    metrics = path / "metrics.jsonl" if path.is_dir() else path
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a crash
            if not isinstance(row, dict) or "event" in row or not isinstance(row.get("step"), int):
                continue
            if any(key.startswith("eval/") for key in row):
                evals[row["step"]] = row
            elif "success_rate" in row or "reward/mean" in row:
                train[row["step"]] = row
    return RunCurves(path if path.is_dir() else path.parent, train, evals)


# ----------------------------------------------------------------------------- curve math


def smoothing_window(total_steps: int) -> int:
    """The window of moving averages and of 'the last 10% of steps': ceil(total / 10), >= 1."""
    return max(1, math.ceil(total_steps / 10))


def moving_average(
    steps: np.ndarray, values: np.ndarray, window: int
) -> tuple[np.ndarray, np.ndarray]:
    """Trailing mean over `window` consecutive points, full windows only: the point at step s
    averages the `window` points ending at s."""
    if window <= 1 or len(values) < window:
        return (steps, values) if window <= 1 else (steps[:0], values[:0])
    sums = np.cumsum(np.concatenate([[0.0], values]))
    return steps[window - 1 :], (sums[window:] - sums[:-window]) / window


def normalized_auc(steps: np.ndarray, values: np.ndarray) -> float | None:
    """Area under the curve divided by its step range (the curve's mean height); a single point
    is its own value; no points: None."""
    if len(values) == 0:
        return None
    if len(values) == 1 or steps[-1] == steps[0]:
        return float(values[-1])
    area = float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(steps)))
    return area / float(steps[-1] - steps[0])


def first_reaching(steps: np.ndarray, values: np.ndarray, threshold: float) -> int | None:
    """The first step whose value is >= threshold (None if none is)."""
    hits = np.nonzero(values >= threshold - 1e-12)[0]
    return int(steps[hits[0]]) if len(hits) else None


@dataclass
class Band:
    """Per step over seeds: mean, std, min, max and how many seeds have the step."""

    steps: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    count: np.ndarray


def seed_band(series: Sequence[tuple[np.ndarray, np.ndarray]]) -> Band:
    """Aggregate curves of several seeds at each step any of them has (a shorter, unfinished
    seed only counts where it has points)."""
    if not series:
        empty = np.zeros(0)
        return Band(np.zeros(0, dtype=int), empty, empty, empty, empty, np.zeros(0, dtype=int))
    all_steps = np.unique(np.concatenate([steps for steps, _ in series]))
    table = np.full((len(series), len(all_steps)), np.nan)
    for i, (steps, values) in enumerate(series):
        table[i, np.searchsorted(all_steps, steps)] = values
    # every column holds at least one value (its step came from some seed): no all-NaN warning
    return Band(
        all_steps,
        np.nanmean(table, axis=0),
        np.nanstd(table, axis=0),
        np.nanmin(table, axis=0),
        np.nanmax(table, axis=0),
        np.sum(~np.isnan(table), axis=0),
    )


# ----------------------------------------------------------------------------- drawing


@dataclass(frozen=True)
class Panel:
    title: str
    key: str
    source: str = "train"  # "train" rows or "eval" rows
    smooth: bool = False  # moving average over smoothing_window(steps)


EVAL_SUCCESS = Panel("held-out success (eval)", "eval/success_rate", "eval")
TRAIN_SUCCESS = Panel("train success", "success_rate", "train", smooth=True)
TASK_REWARD = Panel("task reward", "reward/task", "train", smooth=True)
TOTAL_REWARD = Panel("reward incl. tool bonus", "reward/mean", "train", smooth=True)

SUCCESS_PANELS = (EVAL_SUCCESS, TRAIN_SUCCESS)
REWARD_PANELS = (TASK_REWARD, TOTAL_REWARD)
RUN_PANELS = (EVAL_SUCCESS, TRAIN_SUCCESS, TASK_REWARD)


def plot_curves(
    groups: Mapping[str, Sequence[RunCurves]],
    out: str | Path,
    panels: Sequence[Panel] = RUN_PANELS,
    *,
    title: str = "",
    window: int | None = None,
    band: str = "minmax",
) -> Path:
    """One PNG, one subplot per panel, one curve per group: a group of one run is its line, a
    group of several (seeds) is their mean line with a band (`minmax` or `std`)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    if band not in ("minmax", "std"):
        raise ValueError(f"band must be 'minmax' or 'std', got {band!r}")
    runs = [run for group in groups.values() for run in group]
    if window is None:
        window = smoothing_window(max((run.steps_done for run in runs), default=1))
    fig = Figure(figsize=(5.2 * len(panels), 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    colors = [f"C{i % 10}" for i in range(len(groups))]
    for ax, panel in zip(axes, panels, strict=True):
        drawn = False
        for color, (label, group) in zip(colors, groups.items(), strict=True):
            series = []
            for run in group:
                steps, values = run.series(panel.key, panel.source)
                if panel.smooth:
                    steps, values = moving_average(steps, values, window)
                if len(values):
                    series.append((steps, values))
            if not series:
                continue
            drawn = True
            agg = seed_band(series)
            marker = "o" if panel.source == "eval" and len(agg.steps) <= 30 else None
            name = label if len(series) == 1 else f"{label} (mean of {len(series)})"
            ax.plot(agg.steps, agg.mean, color=color, marker=marker, markersize=3, label=name)
            if len(series) > 1:
                lo, hi = (
                    (agg.lo, agg.hi)
                    if band == "minmax"
                    else (agg.mean - agg.std, agg.mean + agg.std)
                )
                ax.fill_between(agg.steps, lo, hi, color=color, alpha=0.2, linewidth=0)
        suffix = f" (moving average of {window} steps)" if panel.smooth and window > 1 else ""
        ax.set_title(panel.title + suffix, fontsize=10)
        ax.set_xlabel("training step (updates done)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(
                0.5,
                0.5,
                f"no {panel.key} logged",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="gray",
            )
    if title:
        spread = "min-max over seeds" if band == "minmax" else "+-1 std over seeds"
        several = any(len(group) > 1 for group in groups.values())
        fig.suptitle(title + (f" (bands: {spread})" if several else ""), fontsize=11)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out


# ----------------------------------------------------------------------------- `spear-ray plot`


def find_run_dirs(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories: each path itself if it holds metrics.jsonl, else every run directory
    below it (an experiment directory); a path with neither is an error."""
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if (path / "metrics.jsonl").is_file():
            found.append(path)
            continue
        below = sorted(p.parent for p in path.rglob("metrics.jsonl")) if path.is_dir() else []
        if not below:
            from spear_ray.config import ConfigError

            raise ConfigError(f"{path}: no metrics.jsonl in it or below it; not a run directory")
        found.extend(below)
    return found


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Short labels: each path relative to the paths' common parent."""
    resolved = [p.resolve() for p in paths]
    if len(resolved) == 1:
        return [resolved[0].name]
    common = Path(*_common_parts([p.parts for p in resolved]))
    return [str(p.relative_to(common)) or p.name for p in resolved]


def _common_parts(parts: Sequence[tuple[str, ...]]) -> tuple[str, ...]:
    out = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        out.append(column[0])
    # keep at least the last part of each path as its label
    shortest = min(len(p) for p in parts)
    return tuple(out[: shortest - 1])


def plot_runs(
    paths: Sequence[str | Path], out: str | Path | None = None, window: int | None = None
) -> Path:
    """`spear-ray plot`: every run's curves overlaid in one PNG (default: RUN_DIR/curves.png
    for one run, ./curves.png for several)."""
    run_dirs = find_run_dirs(paths)
    if out is None:
        out = run_dirs[0] / "curves.png" if len(run_dirs) == 1 else Path("curves.png")
    groups = {
        label: [read_curves(p)] for label, p in zip(run_labels(run_dirs), run_dirs, strict=True)
    }
    return plot_curves(groups, out, RUN_PANELS, window=window)
