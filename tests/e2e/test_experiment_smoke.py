"""The experiment runner for real: examples/experiments/frozenlake-smoke.yaml (GRPO vs Dr.BoT +
SPEAR on the demo's frozenlake, one seed, 3 steps) through `run_experiment`, then once more to
check that finished runs are skipped.

Asserts only what must hold (both runs finish, replay fires in the SPEAR variant and never in
GRPO, the summary and the curves are written), not which variant learns faster. Builds the demo
model on first use (cached).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spear_ray.experiments import load_spec, run_experiment
from spear_ray.plots import read_curves

SPEC = Path(__file__).resolve().parents[2] / "examples" / "experiments" / "frozenlake-smoke.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def experiment(ray_local, tmp_path_factory):
    spec = load_spec(SPEC)
    root = tmp_path_factory.mktemp("experiment")
    lines: list[str] = []
    summary = run_experiment(spec, root, log=lines.append)
    return spec, root, summary, lines


def test_every_run_finishes_with_its_final_eval(experiment):
    spec, root, _, lines = experiment
    assert [r.label for r in spec.runs()] == [
        "frozenlake/grpo/seed0",
        "frozenlake/drbot_spear/seed0",
    ]
    for run in spec.runs():
        curves = read_curves(run.path(root))
        assert sorted(curves.train) == list(range(spec.steps))
        assert sorted(curves.eval) == [0, spec.steps]
        assert (
            run.path(root) / "checkpoints" / f"step_{spec.steps - 1:06d}" / "COMPLETE"
        ).is_file()
    assert any(line.startswith("[1/2] frozenlake/grpo/seed0: starting") for line in lines)
    assert any("[2/2] frozenlake/drbot_spear/seed0: done in" for line in lines)


def test_replay_fires_in_spear_and_not_in_grpo(experiment):
    _, root, summary, _ = experiment
    spear = read_curves(root / "frozenlake" / "drbot_spear" / "seed0")
    grpo = read_curves(root / "frozenlake" / "grpo" / "seed0")
    assert any(row["spear/replay_rows"] > 0 for row in spear.train.values())
    assert all(row["spear/replay_rows"] == 0 for row in grpo.train.values())
    variants = summary["envs"]["frozenlake"]["variants"]
    assert variants["drbot_spear"]["replay_steps"][0] > 0
    assert variants["grpo"]["replay_steps"] == [0]


def test_summary_and_curves_are_written(experiment):
    _, root, summary, _ = experiment
    on_disk = json.loads((root / "summary.json").read_text())
    assert on_disk["envs"].keys() == {"frozenlake"}
    env = on_disk["envs"]["frozenlake"]
    assert env["success_source"] == "eval"
    assert env["baseline"] == "grpo" and env["baseline_final_success"] is not None
    for name in ("grpo", "drbot_spear"):
        entry = env["variants"][name]
        assert entry["seeds"] == [0]
        assert len(entry["final_eval_success"]["per_seed"]) == 1
        assert 0.0 <= entry["final_eval_success"]["mean"] <= 1.0
        assert len(entry["steps_to_baseline_final"]["per_seed"]) == 1
    # GRPO reaches its own final success at the latest at the last step
    assert env["variants"]["grpo"]["steps_to_baseline_final"]["per_seed"][0] is not None
    assert "| grpo |" in (root / "summary.md").read_text()
    for png in ("frozenlake-success.png", "frozenlake-reward.png"):
        path = root / "plots" / png
        assert path.stat().st_size > 1000
    assert summary["plots"]["frozenlake"] == [
        "plots/frozenlake-success.png",
        "plots/frozenlake-reward.png",
    ]


def test_rerunning_skips_finished_runs(experiment):
    spec, root, _, _ = experiment
    lines: list[str] = []

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    run_experiment(spec, root, log=lines.append, train=no_training)
    assert sum(line.endswith("finished, skipped") for line in lines) == 2

    # archived as docs/results/ keeps them (config.yaml, metrics.jsonl, FINISHED): still finished
    archive = root.parent / (root.name + "-archive")
    for run in spec.runs():
        source, target = run.path(root), run.path(archive)
        target.mkdir(parents=True)
        for name in ("config.yaml", "metrics.jsonl", "FINISHED"):
            (target / name).write_bytes((source / name).read_bytes())
    lines = []
    run_experiment(spec, archive, log=lines.append, train=no_training)
    assert sum(line.endswith("finished, skipped") for line in lines) == 2
