"""Experiments: a grid of algorithm variants x seeds x envs with one sample budget per env.

    spear-ray experiment SPEC.yaml        # run (or resume) the grid, then write the summary

- `variants.py`: the table of variants (GRPO, Dr.BoT, SPEAR and its ablations, GiGPO), each a
  set of config values mapped to docs/algorithm.md;
- `spec.py`: SPEC.yaml, validated with one-line errors, and the runs it expands to;
- `runner.py`: runs them one after another in one Ray session, skipping finished runs and
  resuming partial ones, with progress and an ETA;
- `summary.py`: summary.json, summary.md and PNGs (drawn by `spear_ray.plots`).
"""

from spear_ray.experiments.runner import ExperimentError, plan_runs, run_experiment, run_state
from spear_ray.experiments.spec import ExperimentSpec, RunSpec, SpecError, load_spec, parse_spec
from spear_ray.experiments.summary import summarize, write_summary
from spear_ray.experiments.variants import VARIANTS, dotted_overrides, variant_names

__all__ = [
    "VARIANTS",
    "ExperimentError",
    "ExperimentSpec",
    "RunSpec",
    "SpecError",
    "dotted_overrides",
    "load_spec",
    "parse_spec",
    "plan_runs",
    "run_experiment",
    "run_state",
    "summarize",
    "variant_names",
    "write_summary",
]
