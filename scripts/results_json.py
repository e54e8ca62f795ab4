"""docs/results.json from an experiment's summary.json: per env and variant, the per-seed final
success rates, the steps each seed took to reach the baseline's (GRPO's) final success, the
held-out success per evaluation step (seed mean), the train success over the second half, and
the paired differences to the baseline with their 95% t-intervals.

    .venv/bin/python scripts/results_json.py experiments/learning-evidence/summary.json \
        docs/results.json [--wall-seconds S] [--machine TEXT] [--command TEXT]

Every number is copied from summary.json (spear_ray/experiments/summary.py says how each is
computed); nothing is recomputed here. `null` = a seed that never reached the baseline (or a
missing value). `steps_to_baseline_final_degenerate`: the baseline's final success is at or below
the env's `common_start` (step-0 held-out success), so reaching it says nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def results_from_summary(summary: dict[str, Any]) -> dict[str, Any]:
    envs: dict[str, Any] = {}
    for env_name, env in summary["envs"].items():
        variants = {}
        for name, variant in env["variants"].items():
            reach = variant.get("steps_to_baseline_final") or {}
            half = variant["train_success_second_half"]
            variants[name] = {
                "seeds": variant["seeds"],
                "final_success_per_seed": variant["final_eval_success"]["per_seed"],
                "final_success_mean": variant["final_eval_success"]["mean"],
                "final_success_std": variant["final_eval_success"]["std"],
                "final_train_success_per_seed": variant["final_train_success"]["per_seed"],
                "train_success_second_half_per_seed": half["per_seed"],
                "train_success_second_half_mean": half["mean"],
                "train_success_second_half_std": half["std"],
                "eval_points_steps": [point["step"] for point in variant["eval_points"]],
                "eval_points_seed_mean": [point["mean"] for point in variant["eval_points"]],
                "steps_to_baseline_final_per_seed": reach.get("per_seed"),
                "steps_to_baseline_final_of_seed_mean_curve": reach.get("mean_curve"),
                "steps_to_baseline_final_degenerate": reach.get("degenerate"),
                "steps_to_baseline_final_degenerate_reason": reach.get("degenerate_reason"),
                "replay_steps_per_seed": variant["replay_steps"],
            }
            if "paired_vs_baseline" in variant:
                variants[name]["paired_vs_baseline"] = variant["paired_vs_baseline"]
        envs[env_name] = {
            "success_source": env["success_source"],
            "baseline": env["baseline"],
            "baseline_final_success": env["baseline_final_success"],
            "common_start": env["common_start"],
            "trajectories_per_run": env["trajectories_per_run"],
            "unfinished_runs": env["unfinished_runs"],
            "variants": variants,
        }
    return {
        "experiment": summary["experiment"],
        "steps": summary["steps"],
        "seeds": summary["seeds"],
        "baseline": summary["baseline"],
        "envs": envs,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("summary", type=Path, help="an experiment's summary.json")
    parser.add_argument("output", type=Path, help="where to write results.json")
    parser.add_argument("--wall-seconds", type=float, help="the grid's wall time, recorded as is")
    parser.add_argument("--machine", help="the machine it ran on, recorded as is")
    parser.add_argument("--command", help="the command that produced it, recorded as is")
    args = parser.parse_args(argv)
    try:
        summary = json.loads(args.summary.read_text(encoding="utf-8"))
        results = results_from_summary(summary)
    except (OSError, ValueError, KeyError) as err:
        print(f"{args.summary}: not an experiment summary.json ({err!r})", file=sys.stderr)
        return 2
    for key in ("command", "machine", "wall_seconds"):
        value = getattr(args, key)
        if value is not None:
            results[key] = value
    args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
