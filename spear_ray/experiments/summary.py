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
- replay steps: steps whose update replayed rows (`spear/replay_rows` > 0);
- eval points: the held-out success of each seed at every step an evaluation was logged (step 0
  = before the first update), and the seed mean at each;
- train success (second half): per seed, the mean training `success_rate` over steps >=
  total_steps / 2;
- paired vs baseline: per seed that both finished, the variant's value minus the baseline's
  (final held-out success; train success over the second half), their mean and a 95% two-sided
  Student-t interval (n - 1 degrees of freedom; None for fewer than 2 seeds);
- common start: per env, the seed mean of the step-0 held-out success (every variant of a seed
  starts from the same model). When the baseline's final success is at or below it,
  steps-to-baseline is `degenerate`: the seed-mean curve reaches it at its first point.

Means are over seeds; std is the sample std (None for one seed). Plots show every run with
metrics, finished or not, as the seed mean with a min-max band over seeds; the numbers only the
finished ones.
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


# two-sided 95%: the 0.975 quantile of Student's t for 1..30 degrees of freedom (scipy's values,
# rounded to 3 decimals); used when scipy is not installed
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(dof: int) -> float:
    """The 0.975 quantile of Student's t with `dof` degrees of freedom (scipy.stats.t when
    scipy is importable, else T_975, and beyond 30 dof a Cornish-Fisher expansion)."""
    if dof < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {dof}")
    try:
        from scipy.stats import t
    except ImportError:
        if dof <= len(T_975):
            return T_975[dof - 1]
        z = 1.959963984540054
        return (
            z
            + (z**3 + z) / (4 * dof)
            + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * dof**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * dof**3)
        )
    return float(t.ppf(0.975, dof))


def paired_differences(
    seeds: Sequence[int],
    values: Sequence[float | None],
    baseline_seeds: Sequence[int],
    baseline_values: Sequence[float | None],
) -> dict[str, Any]:
    """Per seed both have a value: value - baseline's; their mean, sample std and a 95% two-sided
    Student-t interval for the mean difference (mean +- t(0.975, n-1) * std / sqrt(n))."""
    base = {s: v for s, v in zip(baseline_seeds, baseline_values, strict=True) if v is not None}
    pairs = [
        (s, float(v) - float(base[s]))
        for s, v in zip(seeds, values, strict=True)
        if v is not None and s in base
    ]
    diffs = [d for _, d in pairs]
    spread = stats(diffs)
    n, mean, std = spread["n"], spread["mean"], spread["std"]
    t_value = half = ci = None
    if n >= 2:
        t_value = t_quantile_975(n - 1)
        half = t_value * std / math.sqrt(n)
        ci = [mean - half, mean + half]
    return {
        "seeds": [s for s, _ in pairs],
        "differences": diffs,
        "n": n,
        "mean": mean,
        "std": std,
        "t_quantile": t_value,
        "half_width": half,
        "ci95": ci,
    }


def eval_points(curves: Sequence[RunCurves]) -> list[dict[str, Any]]:
    """Per step with a logged held-out success (any seed): every seed's value (None where that
    seed has none) and the mean over the seeds that have it."""
    per_run = [dict(zip(*c.series("eval/success_rate", "eval"), strict=True)) for c in curves]
    steps = sorted({int(step) for points in per_run for step in points})
    out = []
    for step in steps:
        values = [None if step not in p else float(p[step]) for p in per_run]
        present = [v for v in values if v is not None]
        out.append(
            {
                "step": step,
                "per_seed": values,
                "mean": sum(present) / len(present),
                "n": len(present),
            }
        )
    return out


def train_success_second_half(curves: RunCurves, total_steps: int) -> float | None:
    """Mean training success over the steps >= total_steps / 2."""
    return _train_success_from(curves, total_steps / 2)


def common_start(
    runs: dict[str, list[tuple[int, RunCurves]]],
) -> dict[str, Any]:
    """The env's step-0 held-out success: per seed the mean over its runs (every variant of a
    seed starts from the same model, so they should agree; `max_spread` is the largest
    difference between two variants of one seed), and the mean over seeds."""
    by_seed: dict[int, list[float]] = {}
    for group in runs.values():
        for seed, curves in group:
            row = curves.eval.get(0)
            value = None if row is None else row.get("eval/success_rate")
            if isinstance(value, (int, float)) and math.isfinite(value):
                by_seed.setdefault(seed, []).append(float(value))
    seeds = sorted(by_seed)
    per_seed = [sum(by_seed[s]) / len(by_seed[s]) for s in seeds]
    return {
        "seeds": seeds,
        "per_seed": per_seed,
        "mean": sum(per_seed) / len(per_seed) if per_seed else None,
        "max_spread": max((max(by_seed[s]) - min(by_seed[s]) for s in seeds), default=None),
    }


def final_eval_success(curves: RunCurves, total_steps: int) -> float | None:
    row = curves.eval.get(total_steps)
    value = None if row is None else row.get("eval/success_rate")
    return float(value) if value is not None else None


def final_train_success(curves: RunCurves, total_steps: int) -> float | None:
    """Mean training success over the last 10% of steps."""
    return _train_success_from(curves, total_steps - smoothing_window(total_steps))


def _train_success_from(curves: RunCurves, first_step: float) -> float | None:
    """Mean training success over the steps >= first_step (None without such steps)."""
    steps, values = curves.series("success_rate")
    tail = values[steps >= first_step]
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
    start = common_start(runs)

    def final(c: RunCurves) -> float | None:
        if source == "eval":
            return final_eval_success(c, total_steps)
        return final_train_success(c, total_steps)

    threshold = None
    if baseline is not None and runs.get(baseline):
        threshold = stats([final(c) for _, c in runs[baseline]])["mean"]
    degenerate, reason = _degenerate(runs, source, total_steps, baseline, threshold, start)
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
            "train_success_second_half": stats(
                [train_success_second_half(c, total_steps) for c in curves]
            ),
            "eval_points": eval_points(curves),
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
                "degenerate": degenerate,
                "degenerate_reason": reason,
            }
        variants[name] = entry
    if threshold is not None:
        base = variants[baseline]
        for name, entry in variants.items():
            if name == baseline:
                continue
            entry["paired_vs_baseline"] = {"baseline": baseline} | {
                key: paired_differences(
                    entry["seeds"], entry[key]["per_seed"], base["seeds"], base[key]["per_seed"]
                )
                for key in ("final_eval_success", "train_success_second_half")
            }
    return {
        "success_source": source,
        "baseline": baseline if threshold is not None else None,
        "baseline_final_success": threshold,
        "common_start": start["mean"],
        "common_start_per_seed": {k: start[k] for k in ("seeds", "per_seed", "max_spread")},
        "variants": variants,
    }


def _degenerate(
    runs: dict[str, list[tuple[int, RunCurves]]],
    source: str,
    total_steps: int,
    baseline: str | None,
    threshold: float | None,
    start: dict[str, Any],
) -> tuple[bool, str | None]:
    """Is "steps to the baseline's final success" trivially the curve's first point? Yes when
    the baseline's final (seed mean) is at or below where the curves start: the common start
    (step-0 held-out success) for eval curves, the seed mean of the first point of the smoothed
    train curves otherwise."""
    if threshold is None:
        return False, None
    if source == "eval":
        first, what = start["mean"], "the common start (step-0 held-out success)"
    else:
        points = [
            float(values[0])
            for group in runs.values()
            for _, c in group
            for _, values in [success_curve(c, source, total_steps)]
            if len(values)
        ]
        first = sum(points) / len(points) if points else None
        what = "the first point of the smoothed train success curves (mean over runs)"
    if first is None or threshold > first + 1e-12:
        return False, None
    return True, (
        f"{baseline}'s final success {threshold:.3f} is at or below {what} {first:.3f}: every "
        f"curve that starts there reaches it at its first point, so steps-to-baseline says "
        f"nothing about learning speed"
    )


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


def _fmt_paired(entry: dict[str, Any] | None, digits: int = 3) -> str:
    if entry is None or entry["mean"] is None:
        return "-"
    text = f"{entry['mean']:+.{digits}f}"
    if entry["ci95"] is not None:
        lo, hi = entry["ci95"]
        text += f" [{lo:+.{digits}f}, {hi:+.{digits}f}]"
    return text


def _fmt_value(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def render_markdown(summary: dict[str, Any], plots: dict[str, list[str]]) -> str:
    steps, baseline = summary["steps"], summary["baseline"]
    lines = [
        f"# Experiment `{summary['experiment']}`",
        "",
        *([summary["description"], ""] if summary.get("description") else []),
        f"{steps} steps per run, seeds {summary['seeds']}. Mean ± sample std over finished seeds; "
        f"'last 10%' = the last {_steps(summary['smoothing_window'])}; '2nd half' = steps >= "
        f"{steps / 2:g}. AUC = mean height of the success curve.",
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
        if data.get("common_start") is not None:
            lines.append(
                f"Common start (step-0 held-out success, mean over seeds): "
                f"{data['common_start']:.3f}."
            )
        reach = None
        if data["baseline"] is not None:
            lines.append(
                f"Steps to {data['baseline']}'s final success "
                f"({data['baseline_final_success']:.3f}, {source} success): first step at which "
                "a seed's success reaches it; mean over the seeds that do."
            )
            reach = data["variants"][data["baseline"]].get("steps_to_baseline_final")
            if reach is not None and reach.get("degenerate"):
                lines.append(
                    f"**Steps-to-baseline is degenerate here**: {reach['degenerate_reason']}."
                )
        lines += [
            "",
            "| variant | final eval success | train success (last 10%) | train success (2nd half) "
            f"| AUC eval | AUC train | steps to {baseline or 'baseline'} final | replay steps "
            "| seeds |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, entry in data["variants"].items():
            n = len(entry["seeds"])
            lines.append(
                f"| {name} | {_fmt(entry['final_eval_success'])} | "
                f"{_fmt(entry['final_train_success'])} | "
                f"{_fmt(entry['train_success_second_half'])} | {_fmt(entry['auc_eval'])} | "
                f"{_fmt(entry['auc_train'])} | "
                f"{_fmt_steps(entry.get('steps_to_baseline_final'), steps, n)} | "
                f"{sum(entry['replay_steps']) / max(n, 1):.1f} | {n} |"
            )
        lines += _paired_table(data)
        lines += _eval_points_table(data)
        if data["unfinished_runs"]:
            lines += ["", f"Not finished (left out): {', '.join(data['unfinished_runs'])}."]
        env_plots = plots.get(env, [])
        if env_plots:
            lines += ["", "Plots: the seed mean of each variant with a min-max band over seeds."]
        lines += [""] + [f"![{Path(p).stem}]({p})" for p in env_plots] + [""]
    return "\n".join(lines)


def _paired_table(data: dict[str, Any]) -> list[str]:
    """Per non-baseline variant: the mean paired difference to the baseline with its 95% t
    interval, over the seeds both finished."""
    baseline = data["baseline"]
    rows = [
        (name, entry["paired_vs_baseline"])
        for name, entry in data["variants"].items()
        if "paired_vs_baseline" in entry
    ]
    if baseline is None or not rows:
        return []
    lines = [
        "",
        f"Paired differences to {baseline} (variant minus {baseline}, per seed both finished): "
        "mean [95% Student-t interval, n-1 dof].",
        "",
        "| variant | Δ final eval success | n | Δ train success (2nd half) | n |",
        "|---|---|---|---|---|",
    ]
    for name, paired in rows:
        final, half = paired["final_eval_success"], paired["train_success_second_half"]
        lines.append(
            f"| {name} | {_fmt_paired(final)} | {final['n']} | {_fmt_paired(half)} | {half['n']} |"
        )
    return lines


def _eval_points_table(data: dict[str, Any]) -> list[str]:
    """Seed-mean held-out success per evaluation step, one column per variant."""
    names = [name for name, entry in data["variants"].items() if entry.get("eval_points")]
    if not names:
        return []
    by_variant = {
        name: {p["step"]: p["mean"] for p in data["variants"][name]["eval_points"]}
        for name in names
    }
    steps = sorted({step for points in by_variant.values() for step in points})
    lines = [
        "",
        "Held-out success per evaluation step (seed mean):",
        "",
        "| step | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
    ]
    for step in steps:
        cells = [_fmt_value(by_variant[name].get(step)) for name in names]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return lines


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
