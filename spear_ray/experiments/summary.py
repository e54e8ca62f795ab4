"""An experiment's summary: summary.json, summary.md and per-env PNGs in the experiment directory.

Per env and variant, over the seeds whose run finished:
- final eval success: `eval/success_rate` of the evaluation after the last step;
- final train success: the training `success_rate` averaged over the last 10% of steps;
- AUC: the area under the eval (and the train) success curve divided by its step range, i.e. the
  curve's mean height: 1.0 = solved from the start, higher = learnt sooner;
- steps to the baseline's final success: the first step at which the variant's success reaches
  the baseline variant's (GRPO's) final mean success; None if it never does. The success used is
  the held-out eval when every finished run of the env has one after its last step (and at least
  two), else the training success smoothed by a trailing mean over 10% of the steps. Reported per
  seed, for the seed-mean curve, and as a fraction of the total steps;
- replay steps: steps whose update replayed rows (`spear/replay_rows` > 0).

Means are over seeds; std is the sample std (None for one seed). Plots show every run with
metrics, finished or not; the numbers only the finished ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spear_ray.experiments.spec import ExperimentSpec
from spear_ray.experiments.variants import describe_variant
from spear_ray.plots import (
    REWARD_PANELS,
    SUCCESS_PANELS,
    RunCurves,
    first_reaching,
    moving_average,
    normalized_auc,
    plot_curves,
    read_curves,
    seed_band,
    smoothing_window,
)


def stats(values: Sequence[float | None]) -> dict[str, Any]:
    """per_seed (None = missing), mean and sample std over the present values, n."""
    present = [float(v) for v in values if v is not None]
    mean = sum(present) / len(present) if present else None
    std = None
    if len(present) >= 2:
        std = math.sqrt(sum((v - mean) ** 2 for v in present) / (len(present) - 1))
    return {"per_seed": list(values), "mean": mean, "std": std, "n": len(present)}


def final_eval_success(curves: RunCurves, total_steps: int) -> float | None:
    row = curves.eval.get(total_steps)
    value = None if row is None else row.get("eval/success_rate")
    return float(value) if value is not None else None


def final_train_success(curves: RunCurves, total_steps: int) -> float | None:
    """Mean training success over the last 10% of steps."""
    first = total_steps - smoothing_window(total_steps)
    steps, values = curves.series("success_rate")
    tail = values[steps >= first]
    return float(tail.mean()) if len(tail) else None


def success_curve(curves: RunCurves, source: str, total_steps: int):
    """(steps, success) that steps-to-baseline reads: eval points, or smoothed train success."""
    if source == "eval":
        return curves.series("eval/success_rate", "eval")
    steps, values = curves.series("success_rate")
    return moving_average(steps, values, smoothing_window(total_steps))


def success_source(runs: Sequence[RunCurves], total_steps: int) -> str:
    has_eval = all(
        final_eval_success(c, total_steps) is not None and len(c.eval) >= 2 for c in runs
    )
    return "eval" if runs and has_eval else "train"


def summarize_env(
    runs: dict[str, list[tuple[int, RunCurves]]],
    total_steps: int,
    baseline: str | None,
) -> dict[str, Any]:
    """The numbers of one env; `runs` maps variant -> [(seed, curves)] of its finished runs."""
    all_runs = [c for group in runs.values() for _, c in group]
    source = success_source(all_runs, total_steps)

    def final(c: RunCurves) -> float | None:
        if source == "eval":
            return final_eval_success(c, total_steps)
        return final_train_success(c, total_steps)

    threshold = None
    if baseline is not None and runs.get(baseline):
        threshold = stats([final(c) for _, c in runs[baseline]])["mean"]
    variants: dict[str, Any] = {}
    for name, group in runs.items():
        seeds = [seed for seed, _ in group]
        curves = [c for _, c in group]
        entry: dict[str, Any] = {
            "seeds": seeds,
            "final_eval_success": stats([final_eval_success(c, total_steps) for c in curves]),
            "final_train_success": stats([final_train_success(c, total_steps) for c in curves]),
            "auc_eval": stats(
                [
                    normalized_auc(*c.series("eval/success_rate", "eval"))
                    if len(c.eval) >= 2
                    else None
                    for c in curves
                ]
            ),
            "auc_train": stats([normalized_auc(*c.series("success_rate")) for c in curves]),
            "replay_steps": [int(np.sum(c.series("spear/replay_rows")[1] > 0)) for c in curves],
        }
        if threshold is not None:
            per_seed = [
                first_reaching(*success_curve(c, source, total_steps), threshold) for c in curves
            ]
            reached = [s for s in per_seed if s is not None]
            band = seed_band([success_curve(c, source, total_steps) for c in curves])
            mean_curve = first_reaching(band.steps, band.mean, threshold)
            entry["steps_to_baseline_final"] = {
                "per_seed": per_seed,
                "ratio_per_seed": [None if s is None else s / total_steps for s in per_seed],
                "reached": len(reached),
                "mean": sum(reached) / len(reached) if reached else None,
                "mean_curve": mean_curve,
                "mean_curve_ratio": None if mean_curve is None else mean_curve / total_steps,
            }
        variants[name] = entry
    return {
        "success_source": source,
        "baseline": baseline if threshold is not None else None,
        "baseline_final_success": threshold,
        "variants": variants,
    }


def summarize(spec: ExperimentSpec, root: str | Path) -> dict[str, Any]:
    """summary.json's content: per env, the numbers of every variant over its finished seeds."""
    from spear_ray.experiments.runner import is_finished

    root = Path(root)
    out: dict[str, Any] = {
        "experiment": spec.name,
        "description": spec.description,
        "steps": spec.steps,
        "seeds": list(spec.seeds),
        "baseline": spec.baseline,
        "smoothing_window": smoothing_window(spec.steps),
        "envs": {},
    }
    for env in spec.envs:
        finished: dict[str, list[tuple[int, RunCurves]]] = {}
        unfinished: list[str] = []
        samples_per_step = None
        for run in spec.runs():
            if run.env != env.name:
                continue
            path = run.path(root)
            if samples_per_step is None:
                samples_per_step = run.config(root, spec.steps).rollout.samples_per_step
            if is_finished(path, spec.steps):
                finished.setdefault(run.variant, []).append((run.seed, read_curves(path)))
            else:
                unfinished.append(run.label)
        env_summary = summarize_env(finished, spec.steps, spec.baseline)
        for name, entry in env_summary["variants"].items():
            variant = next(v for v in spec.variants if v.name == name)
            entry["description"] = describe_variant(variant.variant)
            if variant.overrides:
                entry["extra_overrides"] = list(variant.overrides)
        out["envs"][env.name] = {
            "samples_per_step": samples_per_step,
            "trajectories_per_run": (samples_per_step or 0) * spec.steps,
            "unfinished_runs": unfinished,
            **env_summary,
        }
    return out


# ----------------------------------------------------------------------------- writing


def _fmt(stat: dict[str, Any], digits: int = 3) -> str:
    if stat["mean"] is None:
        return "-"
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else "")


def _fmt_steps(entry: dict[str, Any] | None, total: int, seeds: int) -> str:
    if entry is None:
        return "-"
    if not entry["reached"]:
        return f"never (0/{seeds})"
    mean = entry["mean"]
    return f"{mean:.1f} ({mean / total:.2f} of steps; {entry['reached']}/{seeds} seeds)"


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def render_markdown(summary: dict[str, Any], plots: dict[str, list[str]]) -> str:
    steps, baseline = summary["steps"], summary["baseline"]
    lines = [
        f"# Experiment `{summary['experiment']}`",
        "",
        *([summary["description"], ""] if summary.get("description") else []),
        f"{steps} steps per run, seeds {summary['seeds']}. Mean ± sample std over finished seeds; "
        f"'last 10%' = the last {_steps(summary['smoothing_window'])}. AUC = mean height of the "
        "success curve.",
        "",
    ]
    for env, data in summary["envs"].items():
        source = "held-out eval" if data["success_source"] == "eval" else "smoothed train"
        lines += [
            f"## {env}",
            "",
            f"{data['samples_per_step']} trajectories per step, {data['trajectories_per_run']} "
            "per run (every variant).",
        ]
        if data["baseline"] is not None:
            lines.append(
                f"Steps to {data['baseline']}'s final success "
                f"({data['baseline_final_success']:.3f}, {source} success): first step at which "
                "a seed's success reaches it; mean over the seeds that do."
            )
        lines += [
            "",
            "| variant | final eval success | train success (last 10%) | AUC eval | AUC train "
            f"| steps to {baseline or 'baseline'} final | replay steps | seeds |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, entry in data["variants"].items():
            n = len(entry["seeds"])
            lines.append(
                f"| {name} | {_fmt(entry['final_eval_success'])} | "
                f"{_fmt(entry['final_train_success'])} | {_fmt(entry['auc_eval'])} | "
                f"{_fmt(entry['auc_train'])} | "
                f"{_fmt_steps(entry.get('steps_to_baseline_final'), steps, n)} | "
                f"{sum(entry['replay_steps']) / max(n, 1):.1f} | {n} |"
            )
        if data["unfinished_runs"]:
            lines += ["", f"Not finished (left out): {', '.join(data['unfinished_runs'])}."]
        lines += [""] + [f"![{Path(p).stem}]({p})" for p in plots.get(env, [])] + [""]
    return "\n".join(lines)


def plot_experiment(spec: ExperimentSpec, root: str | Path) -> dict[str, list[str]]:
    """plots/<env>-success.png and plots/<env>-reward.png: one line per variant (seed mean),
    a min-max band over seeds; every run with metrics, finished or not. Paths relative to root."""
    root = Path(root)
    out: dict[str, list[str]] = {}
    for env in spec.envs:
        groups: dict[str, list[RunCurves]] = {}
        for run in spec.runs():
            if run.env == env.name and (run.path(root) / "metrics.jsonl").is_file():
                groups.setdefault(run.variant, []).append(read_curves(run.path(root)))
        if not groups:
            continue
        window = smoothing_window(spec.steps)
        written = []
        for kind, panels in (("success", SUCCESS_PANELS), ("reward", REWARD_PANELS)):
            path = plot_curves(
                groups,
                root / "plots" / f"{env.name}-{kind}.png",
                panels,
                title=f"{spec.name}: {env.name}",
                window=window,
            )
            written.append(str(path.relative_to(root)))
        out[env.name] = written
    return out


def write_summary(
    spec: ExperimentSpec, root: str | Path, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Write summary.json, summary.md and the plots; returns the summary."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    summary = summarize(spec, root)
    plots = plot_experiment(spec, root)
    summary["plots"] = plots
    (root / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    markdown = render_markdown(summary, plots)
    (root / "summary.md").write_text(markdown, encoding="utf-8")
    log(f"summary: {root / 'summary.md'}, {root / 'summary.json'}")
    for line in markdown.splitlines():
        if line.startswith("|") or line.startswith("## "):
            log(line)
    return summary
