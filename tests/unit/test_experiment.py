"""The experiment runner without Ray: the variant table, spec validation, the summary math on
synthetic metrics.jsonl files, the plots, and the skip/resume decision on fake run directories
(with a fake trainer standing in for `run_training`)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from spear_ray.cli import main
from spear_ray.config import SpearConfig, load_config
from spear_ray.experiments import (
    SpecError,
    load_spec,
    parse_spec,
    plan_runs,
    run_experiment,
    run_state,
)
from spear_ray.experiments.summary import (
    T_975,
    paired_differences,
    render_markdown,
    summarize_env,
    t_quantile_975,
)
from spear_ray.experiments.variants import (
    VARIANT_KEYS,
    VARIANTS,
    dotted_overrides,
    variant_values,
)
from spear_ray.plots import (
    moving_average,
    normalized_auc,
    plot_curves,
    plot_runs,
    read_curves,
    seed_band,
    smoothing_window,
)
from spear_ray.run_dir import RunDir

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "experiments"


def _get(config: SpearConfig, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


# ----------------------------------------------------------------------------- the variant table


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_loads_on_the_demo_preset_and_sets_its_values(name):
    config = load_config("demo", dotted_overrides(name))
    for key, value in variant_values(name).items():
        assert _get(config, key) == value, key


def test_every_variant_sets_the_same_keys():
    # so no variant inherits an algorithm choice from the base preset
    for name in VARIANTS:
        assert tuple(variant_values(name)) == VARIANT_KEYS, name


def test_full_spear_is_the_schemas_released_default():
    defaults = load_config(None)  # every field at SPEAR's released (Dr.BoT + SPEAR) default
    for key, value in variant_values("drbot_spear").items():
        assert _get(defaults, key) == value, key


def _diff(a: str, b: str) -> dict[str, tuple]:
    va, vb = variant_values(a), variant_values(b)
    return {k: (va[k], vb[k]) for k in VARIANT_KEYS if va[k] != vb[k]}


def test_each_ablation_turns_off_exactly_one_piece_of_spear():
    assert _diff("drbot_spear", "drbot_spear_no_sil") == {"algo.sil.enabled": (True, False)}
    assert _diff("drbot_spear", "drbot_spear_no_recalibration") == {
        "buffer.recalibration": ("baseline", "weight")
    }
    assert _diff("drbot_spear", "drbot_spear_no_tool_curriculum") == {
        "algo.tool_reward.enabled": (True, False)
    }
    assert _diff("drbot_spear", "drbot_spear_no_clip_cov") == {
        "algo.policy_loss.on_policy_cov.mode": ("clip-cov", "none"),
        "algo.policy_loss.replay_cov.mode": ("clip-cov", "none"),
    }


def test_grpo_drbot_and_gigpo_differ_where_spear_md_says():
    grpo, drbot = variant_values("grpo"), variant_values("drbot")
    assert grpo["algo.advantage.norm_by_std"] and not drbot["algo.advantage.norm_by_std"]
    assert (grpo["algo.policy_loss.clip_low"], grpo["algo.policy_loss.clip_high"]) == (0.2, 0.2)
    assert drbot["algo.policy_loss.clip_high"] == 0.28
    assert grpo["algo.policy_loss.aggregation"] == "token-mean"
    assert drbot["algo.policy_loss.aggregation"] == "seq-mean-token-sum-norm"
    assert grpo["algo.filters.group_keep_ratio"] == 1.0
    assert drbot["algo.filters.group_keep_ratio"] == 0.75
    for name in ("grpo", "drbot", "gigpo"):  # no SPEAR piece in a baseline
        values = variant_values(name)
        assert not values["algo.sil.enabled"] and not values["algo.tool_reward.enabled"]
        assert values["algo.policy_loss.on_policy_cov.mode"] == "none"
    assert _diff("grpo", "gigpo") == {"algo.advantage.estimator": ("grpo", "gigpo")}
    assert _diff("gigpo", "gigpo_spear") == _diff("grpo", "grpo_spear")


# ----------------------------------------------------------------------------- the spec


def _spec_dict(**changes):
    data = {
        "base": "demo",
        "steps": 3,
        "seeds": [0, 1],
        "envs": [{"name": "frozenlake", "overrides": {"model.path": "builtin:tiny-random"}}],
        "variants": ["grpo", "drbot_spear"],
    }
    data.update(changes)
    return data


def _error(data) -> str:
    with pytest.raises(SpecError) as err:
        parse_spec(data).check()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_good_spec_expands_to_env_seed_variant_runs():
    spec = parse_spec(
        _spec_dict(
            envs=["frozenlake", {"name": "lake8", "env": "frozenlake"}],
            variants=[
                "grpo",
                {
                    "name": "spear_half",
                    "variant": "drbot_spear",
                    "overrides": ["algo.sil.coef=0.5"],
                },
                {"name": "gigpo", "envs": ["lake8"]},
            ],
        )
    )
    spec.check()
    assert spec.baseline == "grpo"
    assert [r.label for r in spec.runs()] == [
        "frozenlake/grpo/seed0",
        "frozenlake/spear_half/seed0",
        "frozenlake/grpo/seed1",
        "frozenlake/spear_half/seed1",
        "lake8/grpo/seed0",
        "lake8/spear_half/seed0",
        "lake8/gigpo/seed0",
        "lake8/grpo/seed1",
        "lake8/spear_half/seed1",
        "lake8/gigpo/seed1",
    ]
    run = spec.runs()[3]
    config = run.config("out", spec.steps)
    assert run.path("out") == Path("out/frozenlake/spear_half/seed1")
    assert Path(config.run.runs_dir) / config.run.name == run.path("out")
    assert (config.run.total_steps, config.run.seed) == (3, 1)
    assert config.algo.sil.coef == 0.5  # the variant's own override wins over the table
    assert config.algo.sil.enabled and config.algo.policy_loss.clip_high == 0.28


def test_every_variant_of_an_env_has_the_same_sample_budget():
    spec = parse_spec(
        _spec_dict(
            overrides={"rollout.prompts_per_step": 4},
            variants=list(VARIANTS),
        )
    )
    budgets = {
        r.config("out", spec.steps).rollout.samples_per_step * spec.steps for r in spec.runs()
    }
    assert budgets == {3 * 4 * 4}


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"variants": ["grpo", "spear"]}, "unknown variant 'spear'; known variants: grpo, drbot,"),
        ({"variants": [{"name": "x", "variant": "nope"}]}, "variants.0.variant: unknown variant"),
        ({"stepz": 3}, "stepz: unknown field; known fields here: name, description, base"),
        ({"steps": 0}, "steps: expected a whole number of training steps >= 1, got 0"),
        ({"steps": None}, "steps: expected a whole number"),
        ({"seeds": [0, 0]}, "seeds: seeds repeat: [0, 0]"),
        ({"seeds": "abc"}, "seeds: expected a list of integer seeds or a count"),
        ({"baseline": "gigpo"}, "baseline: 'gigpo' is not one of this experiment's variants"),
        ({"overrides": ["run.seed=3"]}, "'run.seed' is set by the experiment runner"),
        ({"overrides": {"run": {"total_steps": 9}}}, "'run' is set by the experiment runner"),
        (
            {"variants": [{"name": "grpo", "overrides": {"rollout.samples_per_prompt": 8}}]},
            "variants.0.overrides: 'rollout.samples_per_prompt' would change the sample budget",
        ),
        (
            {"variants": [{"name": "gigpo", "envs": ["textworld"]}]},
            "variants.0.envs: 'textworld' is not one of this experiment's envs: frozenlake",
        ),
        ({"envs": [{"name": "x", "env": "chess"}]}, "envs.0.env: unknown env 'chess'; known envs"),
        ({"envs": ["frozenlake", "frozenlake"]}, "envs: env names repeat"),
        ({"envs": [{"name": "a b"}]}, "envs.0.name: expected a name of letters"),
        ({"envs": []}, "envs: expected a non-empty list"),
        ({"variants": ["grpo", "grpo"]}, "variants: variant names repeat"),
        ({"overrides": "algo.sil.coef=1"}, "overrides: expected a mapping"),
        (
            {"variants": [{"name": "grpo", "overrides": {"algo.sil.coeff": 0.5}}]},
            "env 'frozenlake', variant 'grpo': override 'algo.sil.coeff=0.5': algo.sil.coeff: "
            "unknown field",
        ),
        ({"base": "no-such-preset"}, "'no-such-preset' is neither a config file nor a preset"),
    ],
)
def test_spec_errors_are_one_clear_line(changes, expected):
    assert expected in _error(_spec_dict(**changes))


def test_missing_fields_are_named():
    data = _spec_dict()
    del data["steps"]
    assert _error(data) == "steps: missing; an experiment needs steps:, envs: and variants:"
    assert "top level must be a mapping" in _error([1, 2])


def test_spec_file_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("base: demo\nsteps: 3\nenvs: [frozenlake]\nvariants:\n  - grpo\n  - sil\n")
    with pytest.raises(SpecError, match=rf"^{path}:6: variants\.1\.name: unknown variant 'sil'"):
        load_spec(path)
    path.write_text("steps: [3\n")
    with pytest.raises(SpecError, match=rf"^{path}:2: YAML syntax error"):
        load_spec(path)


def test_the_cli_prints_one_line_and_exits_2_on_a_bad_spec(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 3\nenvs: [frozenlake]\nvariants: [grpo, nope]\n")
    assert main(["experiment", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"spear-ray: error: {path}:3: variants.1.name: unknown variant 'nope'")
    assert "\n" not in err


@pytest.mark.parametrize("name", ["frozenlake-smoke.yaml", "spear-vs-grpo.yaml"])
def test_the_example_specs_are_valid(name):
    spec = load_spec(EXAMPLES / name)  # loads every (env, variant) config
    assert spec.baseline == "grpo"
    if name == "spear-vs-grpo.yaml":
        assert {e.name for e in spec.envs} == {"python_math", "textworld", "frozenlake"}
        assert len(spec.seeds) == 3
        labels = {r.label.rsplit("/", 1)[0] for r in spec.runs()}
        assert "python_math/gigpo" not in labels and "textworld/gigpo_spear" in labels


# ----------------------------------------------------------------------------- summary math


def _write_metrics(
    path: Path,
    train: dict[int, float],
    evals: dict[int, float] | None = None,
    replay: dict[int, int] | None = None,
    extra_lines: list[dict] | None = None,
):
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for step, value in (evals or {}).items():
        rows.append({"step": step, "eval/success_rate": value, "eval/task_reward": value})
    for step, value in train.items():
        rows.append(
            {
                "step": step,
                "success_rate": value,
                "reward/mean": value + 0.1,
                "reward/task": value,
                "spear/replay_rows": (replay or {}).get(step, 0),
            }
        )
    rows.sort(key=lambda r: (r["step"], "success_rate" in r))
    rows += extra_lines or []
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return read_curves(path)


def test_read_curves_keeps_the_last_row_of_a_step_after_a_resume(tmp_path):
    later = [
        {"step": 2, "event": "resumed", "checkpoint": "x"},
        {"step": 2, "success_rate": 0.9, "reward/mean": 1.0},
        {"step": 3, "success_rate": 1.0, "reward/mean": 1.0},
    ]
    curves = _write_metrics(tmp_path, {0: 0.0, 1: 0.1, 2: 0.2, 3: 0.3}, {0: 0.0}, extra_lines=later)
    (tmp_path / "metrics.jsonl").open("a").write('{"step": 4, "succ')  # cut short by a crash
    curves = read_curves(tmp_path)
    steps, values = curves.series("success_rate")
    assert steps.tolist() == [0, 1, 2, 3] and values.tolist() == [0.0, 0.1, 0.9, 1.0]
    assert curves.steps_done == 4 and list(curves.eval) == [0]


def test_curve_helpers():
    steps, values = np.arange(5), np.array([0.0, 1.0, 2.0, 3.0, 4.0])
    s, v = moving_average(steps, values, 2)
    assert s.tolist() == [1, 2, 3, 4] and v.tolist() == [0.5, 1.5, 2.5, 3.5]
    assert moving_average(steps, values, 1)[1].tolist() == values.tolist()
    assert len(moving_average(steps, values, 6)[0]) == 0
    assert normalized_auc(np.array([0, 10, 20]), np.array([0.0, 0.5, 0.7])) == pytest.approx(0.425)
    assert normalized_auc(np.array([5]), np.array([0.3])) == 0.3
    assert normalized_auc(np.zeros(0, int), np.zeros(0)) is None
    assert [smoothing_window(n) for n in (1, 3, 10, 11, 40, 200)] == [1, 1, 1, 2, 4, 20]


def test_seed_band_aggregates_per_step_over_the_seeds_that_have_it():
    band = seed_band(
        [
            (np.array([0, 1, 2]), np.array([0.0, 0.2, 0.4])),
            (np.array([0, 1, 2, 3]), np.array([0.2, 0.6, 0.8, 1.0])),
            (np.array([0, 1]), np.array([0.1, 0.1])),
        ]
    )
    assert band.steps.tolist() == [0, 1, 2, 3]
    assert band.mean == pytest.approx([0.1, 0.3, 0.6, 1.0])
    assert band.lo == pytest.approx([0.0, 0.1, 0.4, 1.0])
    assert band.hi == pytest.approx([0.2, 0.6, 0.8, 1.0])
    assert band.std == pytest.approx([np.std([0.0, 0.2, 0.1]), np.std([0.2, 0.6, 0.1]), 0.2, 0.0])
    assert band.count.tolist() == [3, 3, 2, 1]


def test_summary_from_eval_curves(tmp_path):
    steps = 20
    train = {t: 0.1 for t in range(steps)}
    runs = {
        "grpo": [
            (0, _write_metrics(tmp_path / "g0", train, {0: 0.0, 10: 0.2, 20: 0.4})),
            (1, _write_metrics(tmp_path / "g1", train, {0: 0.0, 10: 0.4, 20: 0.6})),
        ],
        "spear": [
            (0, _write_metrics(tmp_path / "s0", train, {0: 0.0, 10: 0.5, 20: 0.7}, {3: 4})),
            (1, _write_metrics(tmp_path / "s1", train, {0: 0.1, 10: 0.3, 20: 0.4}, {3: 2, 5: 2})),
        ],
    }
    out = summarize_env(runs, steps, "grpo")
    assert out["success_source"] == "eval"
    assert out["baseline_final_success"] == pytest.approx(0.5)
    grpo, spear = out["variants"]["grpo"], out["variants"]["spear"]
    assert spear["final_eval_success"]["per_seed"] == [0.7, 0.4]
    assert spear["final_eval_success"]["mean"] == pytest.approx(0.55)
    assert spear["final_eval_success"]["std"] == pytest.approx(math.sqrt(2 * 0.15**2))
    assert spear["final_train_success"]["mean"] == pytest.approx(0.1)
    assert spear["auc_eval"]["per_seed"] == pytest.approx([0.425, 0.275])
    assert spear["auc_train"]["mean"] == pytest.approx(0.1)
    assert spear["replay_steps"] == [1, 2] and grpo["replay_steps"] == [0, 0]
    to_grpo = spear["steps_to_baseline_final"]
    assert to_grpo["per_seed"] == [10, None]
    assert to_grpo["ratio_per_seed"] == [0.5, None]
    assert (to_grpo["reached"], to_grpo["mean"]) == (1, 10)
    assert to_grpo["mean_curve"] == 20  # seed mean: 0.05, 0.4, 0.55
    assert grpo["steps_to_baseline_final"]["per_seed"] == [None, 20]
    assert grpo["steps_to_baseline_final"]["mean_curve"] == 20  # 0.5 at the end, by definition


def test_summary_from_smoothed_train_success_when_there_is_no_final_eval(tmp_path):
    steps = 20  # window 2 for the smoothing and 'the last 10% of steps'
    grpo = _write_metrics(tmp_path / "g", {t: 0.25 for t in range(steps)})
    spear_train = {t: (0.0 if t < 5 else 0.5) for t in range(steps)}
    spear = _write_metrics(tmp_path / "s", spear_train, {0: 0.0})  # one eval: not enough
    out = summarize_env({"grpo": [(0, grpo)], "spear": [(0, spear)]}, steps, "grpo")
    assert out["success_source"] == "train"
    assert out["baseline_final_success"] == pytest.approx(0.25)
    entry = out["variants"]["spear"]
    # smoothed over 2 steps: 0 at step 4, 0.25 at step 5 -> reached at 5
    assert entry["steps_to_baseline_final"]["per_seed"] == [5]
    assert entry["steps_to_baseline_final"]["ratio_per_seed"] == [0.25]
    assert entry["final_train_success"]["per_seed"] == [0.5]
    assert entry["final_eval_success"]["per_seed"] == [None]
    assert entry["final_eval_success"]["mean"] is None
    assert entry["auc_eval"]["mean"] is None
    assert entry["final_train_success"]["std"] is None  # one seed: no spread
    assert out["variants"]["grpo"]["steps_to_baseline_final"]["per_seed"] == [1]


def test_no_baseline_no_steps_to_baseline(tmp_path):
    run = _write_metrics(tmp_path / "a", {0: 0.1, 1: 0.2})
    out = summarize_env({"drbot": [(0, run)]}, 2, "grpo")
    assert out["baseline"] is None and out["baseline_final_success"] is None
    assert "steps_to_baseline_final" not in out["variants"]["drbot"]


# ----------------------------------------------------------------------------- report statistics


def test_paired_differences_and_their_t_interval_by_hand():
    out = paired_differences([0, 1, 2], [0.6, 0.7, 0.8], [0, 1, 2], [0.5, 0.5, 0.5])
    assert out["seeds"] == [0, 1, 2] and out["n"] == 3
    assert out["differences"] == pytest.approx([0.1, 0.2, 0.3])
    assert out["mean"] == pytest.approx(0.2) and out["std"] == pytest.approx(0.1)
    assert out["t_quantile"] == pytest.approx(4.303, abs=5e-4)
    assert out["half_width"] == pytest.approx(4.303 * 0.1 / math.sqrt(3), abs=1e-4)  # 0.2484
    assert out["ci95"] == pytest.approx([0.2 - 0.2484, 0.2 + 0.2484], abs=1e-4)
    # only seeds both have: seed 2 has no baseline value, seed 3 no baseline run, seed 0 none
    out = paired_differences([0, 1, 2, 3], [None, 0.9, 0.5, 0.4], [0, 1, 2], [0.1, 0.4, None])
    assert (out["seeds"], out["n"]) == ([1], 1)
    assert out["differences"] == pytest.approx([0.5]) and out["mean"] == pytest.approx(0.5)
    assert out["std"] is out["ci95"] is out["half_width"] is out["t_quantile"] is None
    out = paired_differences([0], [None], [0], [0.3])
    assert (out["n"], out["mean"], out["ci95"]) == (0, None, None)


def test_t_quantiles_with_and_without_scipy(monkeypatch):
    scipy_stats = pytest.importorskip("scipy.stats")
    for dof in range(1, 31):  # the fallback table is scipy's, rounded
        assert T_975[dof - 1] == pytest.approx(scipy_stats.t.ppf(0.975, dof), abs=5e-4)
    assert t_quantile_975(2) == pytest.approx(scipy_stats.t.ppf(0.975, 2))
    monkeypatch.setitem(__import__("sys").modules, "scipy.stats", None)  # import fails
    assert t_quantile_975(2) == 4.303 and t_quantile_975(30) == 2.042
    for dof in (31, 40, 100, 1000):  # beyond the table: Cornish-Fisher, close to scipy's
        assert t_quantile_975(dof) == pytest.approx(scipy_stats.t.ppf(0.975, dof), abs=2e-4)
    with pytest.raises(ValueError):
        t_quantile_975(0)


def _report_runs(tmp_path: Path, grpo_final: tuple[float, ...], start: float = 0.1):
    """Three seeds of grpo and spear over 10 steps, held-out evals at steps 0, 5 and 10 (step 0
    the same for both variants of a seed: they start from the same model)."""
    steps = 10
    spear_final = (0.6, 0.7, 0.8)
    runs: dict[str, list] = {"grpo": [], "spear": []}
    for seed in range(3):
        s0 = start + 0.01 * (seed - 1)  # 0.09, 0.10, 0.11: mean `start`
        # grpo: train success 0.2 in the first half, 0.4 + seed/10 in the second (steps 5-9)
        grpo_train = {t: 0.2 if t < 5 else 0.4 + seed / 10 for t in range(steps)}
        spear_train = {t: 0.3 if t < 5 else 0.5 + seed / 5 for t in range(steps)}
        runs["grpo"].append(
            (
                seed,
                _write_metrics(
                    tmp_path / f"g{seed}", grpo_train, {0: s0, 5: 0.3, 10: grpo_final[seed]}
                ),
            )
        )
        spear_evals = {0: s0, 5: 0.4 + seed / 10, 10: spear_final[seed]}
        if seed == 2:
            del spear_evals[5]  # a seed without one of the evaluations
        runs["spear"].append(
            (seed, _write_metrics(tmp_path / f"s{seed}", spear_train, spear_evals))
        )
    return runs, steps


def test_summary_report_statistics_by_hand(tmp_path):
    runs, steps = _report_runs(tmp_path, grpo_final=(0.5, 0.5, 0.5))
    out = summarize_env(runs, steps, "grpo")
    assert out["common_start"] == pytest.approx(0.1)
    assert out["common_start_per_seed"]["seeds"] == [0, 1, 2]
    assert out["common_start_per_seed"]["per_seed"] == pytest.approx([0.09, 0.1, 0.11])
    assert out["common_start_per_seed"]["max_spread"] == pytest.approx(0.0)
    grpo, spear = out["variants"]["grpo"], out["variants"]["spear"]

    points = spear["eval_points"]
    assert [p["step"] for p in points] == [0, 5, 10]
    assert points[0]["per_seed"] == pytest.approx([0.09, 0.1, 0.11])
    assert points[0]["mean"] == pytest.approx(0.1) and points[0]["n"] == 3
    assert (
        points[1]["per_seed"][:2] == pytest.approx([0.4, 0.5]) and points[1]["per_seed"][2] is None
    )
    assert points[1]["mean"] == pytest.approx(0.45) and points[1]["n"] == 2
    assert points[2]["mean"] == pytest.approx(0.7)
    assert [p["mean"] for p in grpo["eval_points"]] == pytest.approx([0.1, 0.3, 0.5])

    # steps >= 10 / 2: steps 5..9 only, the first half's values do not count
    half = grpo["train_success_second_half"]
    assert half["per_seed"] == pytest.approx([0.4, 0.5, 0.6])
    assert half["mean"] == pytest.approx(0.5) and half["std"] == pytest.approx(0.1)
    assert spear["train_success_second_half"]["per_seed"] == pytest.approx([0.5, 0.7, 0.9])

    assert "paired_vs_baseline" not in grpo
    paired = spear["paired_vs_baseline"]
    assert paired["baseline"] == "grpo"
    final = paired["final_eval_success"]
    assert final["differences"] == pytest.approx([0.1, 0.2, 0.3]) and final["n"] == 3
    assert final["mean"] == pytest.approx(0.2)
    assert final["half_width"] == pytest.approx(0.2484, abs=1e-4)
    assert final["ci95"] == pytest.approx([-0.0484, 0.4484], abs=1e-4)
    train = paired["train_success_second_half"]
    # (0.5, 0.7, 0.9) - (0.4, 0.5, 0.6)
    assert train["differences"] == pytest.approx([0.1, 0.2, 0.3])
    assert train["ci95"] == pytest.approx(final["ci95"], abs=1e-9)

    # grpo's final (0.5) is above the common start (0.1): steps-to-baseline means something
    for entry in (grpo, spear):
        assert entry["steps_to_baseline_final"]["degenerate"] is False
        assert entry["steps_to_baseline_final"]["degenerate_reason"] is None
    # grpo's final 0.5: seed 0 is at 0.4 at step 5, seed 2 has no step-5 evaluation
    assert spear["steps_to_baseline_final"]["per_seed"] == [10, 5, 10]


def test_steps_to_baseline_is_degenerate_when_the_baseline_ends_at_the_common_start(tmp_path):
    # grpo ends at 0.10 (seed mean of 0.05, 0.10, 0.15) = the common start 0.10: reached at step 0
    runs, steps = _report_runs(tmp_path, grpo_final=(0.05, 0.1, 0.15))
    out = summarize_env(runs, steps, "grpo")
    assert out["baseline_final_success"] == pytest.approx(0.1)
    assert out["common_start"] == pytest.approx(0.1)
    reach = out["variants"]["spear"]["steps_to_baseline_final"]
    assert reach["degenerate"] is True and reach["mean_curve"] == 0
    assert (
        "at or below the common start (step-0 held-out success) 0.100" in reach["degenerate_reason"]
    )
    assert out["variants"]["grpo"]["steps_to_baseline_final"]["degenerate"] is True
    # just above the start: not degenerate
    runs, steps = _report_runs(tmp_path / "above", grpo_final=(0.06, 0.1, 0.15))
    reach = summarize_env(runs, steps, "grpo")["variants"]["spear"]["steps_to_baseline_final"]
    assert reach["degenerate"] is False


def test_the_markdown_shows_the_paired_table_and_the_eval_points(tmp_path):
    runs, steps = _report_runs(tmp_path, grpo_final=(0.05, 0.1, 0.15))
    summary = {
        "experiment": "report",
        "description": "",
        "steps": steps,
        "seeds": [0, 1, 2],
        "baseline": "grpo",
        "smoothing_window": 1,
        "envs": {
            "lake": {
                "samples_per_step": 8,
                "trajectories_per_run": 80,
                "unfinished_runs": [],
                **summarize_env(runs, steps, "grpo"),
            }
        },
    }
    markdown = render_markdown(summary, {"lake": ["plots/lake-success.png"]})
    assert "Common start (step-0 held-out success, mean over seeds): 0.100." in markdown
    assert "**Steps-to-baseline is degenerate here**: grpo's final success 0.100" in markdown
    assert "| variant | Δ final eval success | n | Δ train success (2nd half) | n |" in markdown
    # final: (0.6, 0.7, 0.8) - (0.05, 0.1, 0.15) = 0.55, 0.6, 0.65 -> 0.6 +- 4.303 * 0.05 / sqrt 3
    assert "| spear | +0.600 [+0.476, +0.724] | 3 | +0.200 [-0.048, +0.448] | 3 |" in markdown
    assert "| step | grpo | spear |" in markdown
    assert "| 5 | 0.300 | 0.450 |" in markdown
    assert "| spear | 0.700 ± 0.100 | " in markdown
    assert "min-max band over seeds" in markdown


# ----------------------------------------------------------------------------- plots


def _assert_real_png(path: Path):
    from matplotlib.image import imread

    assert path.stat().st_size > 1000
    pixels = imread(str(path))
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    flat = pixels.reshape(-1, pixels.shape[-1])
    assert len(np.unique(flat, axis=0)) > 10  # not one colour: axes, lines, bands


def test_plot_curves_draws_seed_bands(tmp_path):
    groups = {
        "grpo": [
            _write_metrics(
                tmp_path / f"g{k}",
                {t: t / 40 + k / 10 for t in range(20)},
                {0: 0.0, 10: 0.2 + k / 10, 20: 0.3},
            )
            for k in range(3)
        ],
        "spear": [_write_metrics(tmp_path / "s", {t: t / 20 for t in range(20)})],
    }
    for band in ("minmax", "std"):
        out = plot_curves(groups, tmp_path / f"plots/curves-{band}.png", title="t", band=band)
        _assert_real_png(out)
    with pytest.raises(ValueError, match="band"):
        plot_curves(groups, tmp_path / "x.png", band="iqr")


def test_plot_runs_and_the_plot_command(tmp_path, capsys, monkeypatch):
    for name in ("grpo", "spear"):
        _write_metrics(tmp_path / "exp" / "lake" / name / "seed0", {t: t / 10 for t in range(10)})
    single = plot_runs([tmp_path / "exp" / "lake" / "grpo" / "seed0"])
    assert single == tmp_path / "exp" / "lake" / "grpo" / "seed0" / "curves.png"
    _assert_real_png(single)
    monkeypatch.chdir(tmp_path)
    # an experiment directory stands for every run below it
    assert main(["plot", str(tmp_path / "exp"), "--out", "both.png", "--window", "3"]) == 0
    assert capsys.readouterr().out.strip() == "both.png"
    _assert_real_png(tmp_path / "both.png")
    assert main(["plot", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl in it or below it" in capsys.readouterr().err


# ----------------------------------------------------------------------------- skip / resume


def _config(root: Path, steps: int = 3, **extra) -> SpearConfig:
    overrides = [f"run.total_steps={steps}", f"run.runs_dir={root}", "run.name=seed0"]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    return load_config("demo", overrides)


def _fake_run(config: SpearConfig, *, steps_done: int, checkpoints: list[int]) -> RunDir:
    run = RunDir.create(config)
    run.log_metrics({"step": 0, "eval/success_rate": 0.0})
    for t in range(steps_done):
        run.log_metrics({"step": t, "success_rate": 0.5, "reward/mean": 0.5, "reward/task": 0.5})
    for step in checkpoints:
        with run.checkpoint(step) as directory:
            (directory / "learner").mkdir()
    return run


def test_run_state_decides_skip_resume_or_restart(tmp_path):
    config = _config(tmp_path / "a")
    assert run_state(tmp_path / "a" / "seed0", config) == "new"
    (tmp_path / "a" / "seed0").mkdir(parents=True)
    assert run_state(tmp_path / "a" / "seed0", config) == "new"  # empty

    finished = _fake_run(_config(tmp_path / "f"), steps_done=3, checkpoints=[1, 2])
    assert run_state(finished.path, _config(tmp_path / "f")) == "finished"

    partial = _fake_run(_config(tmp_path / "p"), steps_done=3, checkpoints=[1])
    assert run_state(partial.path, _config(tmp_path / "p")) == "resume"
    # the last step logged but its checkpoint never completed: still a resume
    (partial.checkpoints_dir / ".tmp_step_000002").mkdir()
    assert run_state(partial.path, _config(tmp_path / "p")) == "resume"

    early = _fake_run(_config(tmp_path / "e"), steps_done=1, checkpoints=[])
    assert run_state(early.path, _config(tmp_path / "e")) == "restart"

    # the experiment moved: where it lives does not count as a config change
    assert run_state(finished.path, _config(tmp_path / "elsewhere")) == "finished"


def test_run_state_refuses_a_run_whose_config_differs_from_the_spec(tmp_path):
    run = _fake_run(_config(tmp_path), steps_done=1, checkpoints=[0])
    changed = _config(tmp_path, **{"algo.sil.coef": 0.5, "learner.lr": 0.1})
    with pytest.raises(
        SpecError, match=r"differs from the spec's in algo\.sil\.coef, learner\.lr;"
    ):
        run_state(run.path, changed)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(SpecError, match="not a run directory"):
        run_state(tmp_path / "junk", changed)


def _fake_train(calls: list):
    """Stands in for run_training: logs steps and evals and checkpoints like it does."""

    def train(config, *, run, resume, log):
        first = 0
        if resume and run.latest_checkpoint() is not None:
            first = int(run.latest_checkpoint().name.removeprefix("step_")) + 1
            run.log_metrics({"step": first, "event": "resumed"})
        calls.append((str(run.path), resume, first))
        spear = config.algo.sil.enabled
        total = config.run.total_steps
        if first == 0:
            run.log_metrics({"step": 0, "eval/success_rate": 0.0})
        for t in range(first, total):
            success = min(1.0, (0.1 if spear else 0.05) * (t + 1) + 0.01 * config.run.seed)
            run.log_metrics(
                {
                    "step": t,
                    "success_rate": success,
                    "reward/mean": success,
                    "reward/task": success,
                    "spear/replay_rows": 4 if spear and t > 0 else 0,
                }
            )
            log(f"step {t + 1}/{total}")
            if t + 1 == total:
                run.log_metrics({"step": total, "eval/success_rate": success})
            with run.checkpoint(t) as directory:
                (directory / "learner").mkdir()
        return {}

    return train


def _train_outside_the_runner(run, root, steps):
    """Train `run` to its end with the fake, not through the runner: no FINISHED marker."""
    config = run.config(root, steps)
    _fake_train([])(config, run=RunDir.create(config), resume=False, log=lambda line: None)


def test_run_experiment_skips_resumes_restarts_and_summarises(tmp_path):
    spec = parse_spec(_spec_dict(steps=4))
    root = tmp_path / "exp"
    runs = {r.label: r for r in spec.runs()}
    # seed0 grpo finished, seed0 drbot_spear stopped after step 1, seed1 grpo died early
    done = runs["frozenlake/grpo/seed0"]
    _train_outside_the_runner(done, root, 4)
    partial = runs["frozenlake/drbot_spear/seed0"]
    _fake_run(partial.config(root, 4), steps_done=3, checkpoints=[0, 1])
    early = runs["frozenlake/grpo/seed1"]
    _fake_run(early.config(root, 4), steps_done=1, checkpoints=[])
    assert [p.state for p in plan_runs(spec, root)] == ["finished", "resume", "restart", "new"]

    calls, lines = [], []
    summary = run_experiment(spec, root, log=lines.append, train=_fake_train(calls))
    assert calls == [
        (str(partial.path(root)), True, 2),
        (str(early.path(root)), False, 0),
        (str(runs["frozenlake/drbot_spear/seed1"].path(root)), False, 0),
    ]
    assert lines[0].startswith(f"experiment experiment: 4 runs in {root} (1 finished, 1 to")
    assert "[1/4] frozenlake/grpo/seed0: finished, skipped" in lines
    assert (
        "[2/4] frozenlake/drbot_spear/seed0: resuming from step_000001 (3 runs left, "
        "ETA after the first run)" in lines
    )
    assert any(
        line.startswith("[3/4] frozenlake/grpo/seed1: no complete checkpoint")
        and "2 runs left, ETA " in line
        for line in lines
    )
    assert "[4/4] frozenlake/drbot_spear/seed1 step 4/4" in lines
    assert all(state == "finished" for state in (p.state for p in plan_runs(spec, root)))

    env = summary["envs"]["frozenlake"]
    assert env["unfinished_runs"] == [] and env["trajectories_per_run"] == 4 * 32
    assert env["variants"]["grpo"]["seeds"] == [0, 1]
    assert env["success_source"] == "eval"
    assert env["baseline_final_success"] == pytest.approx(0.205)
    assert env["variants"]["drbot_spear"]["replay_steps"] == [2, 3]  # resumed: steps 2-3 only
    assert env["variants"]["drbot_spear"]["steps_to_baseline_final"]["per_seed"] == [4, 4]
    on_disk = json.loads((root / "summary.json").read_text())
    assert on_disk["envs"]["frozenlake"]["variants"]["grpo"]["final_eval_success"]["per_seed"] == [
        pytest.approx(0.2),
        pytest.approx(0.21),
    ]
    markdown = (root / "summary.md").read_text()
    assert "| drbot_spear | 0.405 ± 0.007 |" in markdown
    assert "![frozenlake-success](plots/frozenlake-success.png)" in markdown
    for png in ("frozenlake-success.png", "frozenlake-reward.png"):
        _assert_real_png(root / "plots" / png)

    # a second invocation trains nothing
    again, lines = [], []
    run_experiment(spec, root, log=lines.append, train=_fake_train(again))
    assert again == []
    assert sum(line.endswith(": finished, skipped") for line in lines) == 4

    # runs the runner finished carry its marker, so they stay finished with their checkpoints
    # gone (archived as config.yaml + metrics.jsonl); the one finished before this call has none
    for label in ("frozenlake/grpo/seed1", "frozenlake/drbot_spear/seed1"):
        assert (runs[label].path(root) / "FINISHED").is_file()
        shutil.rmtree(runs[label].path(root) / "checkpoints")
    assert not (done.path(root) / "FINISHED").exists()
    shutil.rmtree(done.path(root) / "checkpoints")
    assert [p.state for p in plan_runs(spec, root)] == [
        "restart",
        "finished",
        "finished",
        "finished",
    ]


def test_a_failing_run_stops_the_grid_unless_keep_going(tmp_path):
    from spear_ray.experiments import ExperimentError

    spec = parse_spec(_spec_dict(steps=2, seeds=[0]))

    def broken(config, *, run, resume, log):
        raise RuntimeError("engine died")

    with pytest.raises(RuntimeError, match="engine died"):
        run_experiment(spec, tmp_path / "a", log=lambda line: None, train=broken)
    with pytest.raises(ExperimentError, match=r"2 run\(s\) failed: frozenlake/grpo/seed0: "):
        run_experiment(spec, tmp_path / "b", log=lambda line: None, train=broken, keep_going=True)
    assert (tmp_path / "b" / "summary.json").is_file()  # what there is, summarised anyway


def test_results_json_copies_the_summarys_numbers(tmp_path, capsys):
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "scripts" / "results_json.py"
    module_spec = importlib.util.spec_from_file_location("results_json", path)
    results_json = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(results_json)

    spec = parse_spec(_spec_dict(steps=4))
    root = tmp_path / "exp"
    summary = run_experiment(spec, root, log=lambda line: None, train=_fake_train([]))
    out = tmp_path / "results.json"
    assert results_json.main([str(root / "summary.json"), str(out), "--wall-seconds", "12"]) == 0
    results = json.loads(out.read_text())
    assert results["wall_seconds"] == 12 and results["baseline"] == "grpo"
    for name, variant in summary["envs"]["frozenlake"]["variants"].items():
        got = results["envs"]["frozenlake"]["variants"][name]
        assert got["final_success_per_seed"] == variant["final_eval_success"]["per_seed"]
        reach = variant["steps_to_baseline_final"]["per_seed"]
        assert got["steps_to_baseline_final_per_seed"] == reach
    # held-out evals at steps 0 and 4 only: both fake SPEAR seeds reach GRPO's final mean (0.205)
    # at step 4; GRPO's seed 0 ends at 0.20, below its own mean, and never reaches it (null)
    variants = results["envs"]["frozenlake"]["variants"]
    assert variants["drbot_spear"]["steps_to_baseline_final_per_seed"] == [4, 4]
    assert variants["grpo"]["steps_to_baseline_final_per_seed"] == [None, 4]
    # the report's fields: every run starts at 0.0 held-out success, below GRPO's final
    env = results["envs"]["frozenlake"]
    assert env["common_start"] == 0.0
    spear = variants["drbot_spear"]
    assert spear["eval_points_steps"] == [0, 4]
    assert spear["eval_points_seed_mean"] == pytest.approx([0.0, 0.405])
    # steps 2 and 3 of 4: (0.3 + 0.4) / 2 and (0.31 + 0.41) / 2; GRPO's (0.15 + 0.2) / 2, ...
    assert spear["train_success_second_half_per_seed"] == pytest.approx([0.35, 0.36])
    assert variants["grpo"]["train_success_second_half_mean"] == pytest.approx(0.18)
    assert spear["steps_to_baseline_final_degenerate"] is False
    paired = spear["paired_vs_baseline"]
    assert paired["final_eval_success"]["differences"] == pytest.approx([0.2, 0.2])
    assert paired["final_eval_success"]["ci95"] == pytest.approx([0.2, 0.2])  # no spread
    assert paired["train_success_second_half"]["mean"] == pytest.approx(0.175)
    assert "paired_vs_baseline" not in variants["grpo"]
    capsys.readouterr()
    assert results_json.main([str(tmp_path / "missing.json"), str(out)]) == 2
    assert "not an experiment summary.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------- --commit (git)

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="needs the git executable")


def _git(repo: Path, *args: str) -> str:
    import subprocess

    out = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, check=True
    )
    return out.stdout


def _identity(repo: Path) -> None:
    _git(repo, "config", "user.name", "experiment test")
    _git(repo, "config", "user.email", "test@example.invalid")
    _git(repo, "config", "commit.gpgsign", "false")


def _git_repo(path: Path) -> Path:
    """A repository whose .gitignore ignores the experiment directory (as /experiments/ is in
    this one), with one commit, one staged and one modified file of its own."""
    path.mkdir()
    _git(path, "init", "--quiet")
    _identity(path)
    (path / ".gitignore").write_text("/exp/\n")
    (path / "notes.txt").write_text("a\n")
    _git(path, "add", ".gitignore", "notes.txt")
    _git(path, "commit", "--quiet", "-m", "initial")
    (path / "staged.txt").write_text("staged\n")
    _git(path, "add", "staged.txt")
    (path / "notes.txt").write_text("a\nmodified\n")
    return path


def _commits(repo: Path) -> list[str]:
    """Subjects, oldest first."""
    return _git(repo, "log", "--reverse", "--format=%s").splitlines()


def _files_of(repo: Path, subject: str) -> list[str]:
    sha = _git(repo, "log", "--format=%H", "--fixed-strings", f"--grep={subject}").split()[0]
    return sorted(_git(repo, "show", "--name-only", "--format=", sha).split())


def _train_with_extras(calls: list, repo: Path, commits_at_start: list[int]):
    """The fake trainer, also writing a buffer file (never committed) and noting how many
    commits the repository had when each run started."""
    inner = _fake_train(calls)

    def train(config, *, run, resume, log):
        commits_at_start.append(len(_commits(repo)))
        run.buffer_dir.mkdir(parents=True, exist_ok=True)
        (run.buffer_dir / "state.npz").write_bytes(b"buffer")
        return inner(config, run=run, resume=resume, log=log)

    return train


@needs_git
def test_commit_records_each_run_as_it_finishes_and_the_summary_at_the_end(tmp_path):
    repo = _git_repo(tmp_path / "repo")
    spec = parse_spec(_spec_dict(steps=2))
    root = repo / "exp"
    calls, counts, lines = [], [], []
    run_experiment(
        spec,
        root,
        log=lines.append,
        train=_train_with_extras(calls, repo, counts),
        commit=True,
    )
    assert len(calls) == 4
    assert counts == [1, 2, 3, 4]  # each run was committed before the next one started
    subjects = _commits(repo)
    # final held-out success of the fake: 0.05 (0.1 with SPEAR) per step + 0.01 per seed
    assert subjects[1:] == [
        "experiment experiment: frozenlake/grpo/seed0 finished (2 steps, final held-out "
        "success 0.100)",
        "experiment experiment: frozenlake/drbot_spear/seed0 finished (2 steps, final "
        "held-out success 0.200)",
        "experiment experiment: frozenlake/grpo/seed1 finished (2 steps, final held-out "
        "success 0.110)",
        "experiment experiment: frozenlake/drbot_spear/seed1 finished (2 steps, final "
        "held-out success 0.210)",
        "experiment experiment: summary (4/4 runs finished)",
    ]
    run_dir = "exp/frozenlake/drbot_spear/seed0"
    assert _files_of(repo, "drbot_spear/seed0 finished") == [
        f"{run_dir}/FINISHED",
        f"{run_dir}/config.yaml",
        f"{run_dir}/metrics.jsonl",
    ]
    assert _files_of(repo, "summary (4/4") == [
        "exp/plots/frozenlake-reward.png",
        "exp/plots/frozenlake-success.png",
        "exp/summary.json",
        "exp/summary.md",
    ]
    tracked = _git(repo, "ls-files").split()
    assert not [p for p in tracked if "/checkpoints/" in p or "/buffer/" in p]
    assert "[1/4] frozenlake/grpo/seed0: committed" in " ".join(lines)
    # the repository's own staged and modified files are left as they were
    assert _git(repo, "status", "--porcelain").splitlines() == [" M notes.txt", "A  staged.txt"]
    assert "staged.txt" not in _git(repo, "log", "--name-only", "--format=")  # in no commit
    assert _git(repo, "show", "HEAD:notes.txt") == "a\n"

    # a fresh clone holds only config.yaml, metrics.jsonl and FINISHED of each run: all finished
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "--quiet", str(repo), str(clone))
    _identity(clone)
    assert not list((clone / "exp").rglob("checkpoints"))
    assert [p.state for p in plan_runs(spec, clone / "exp")] == ["finished"] * 4
    again = []
    summary = run_experiment(
        spec, clone / "exp", log=lambda line: None, train=_fake_train(again), commit=True
    )
    assert again == []
    assert summary["envs"]["frozenlake"]["variants"]["grpo"]["seeds"] == [0, 1]
    assert not [s for s in _commits(clone)[len(subjects) :] if " finished (" in s]


@needs_git
def test_commit_outside_a_git_work_tree_is_one_line_before_any_run(tmp_path, capsys):
    from spear_ray.experiments.runner import git_work_tree

    outside = tmp_path / "plain" / "exp"
    if git_work_tree(outside) is not None:
        pytest.skip("the test's temporary directory lies inside a git work tree")
    spec = parse_spec(_spec_dict(steps=2))
    calls = []
    with pytest.raises(SpecError, match=r"--commit: .* is not inside a git work tree"):
        run_experiment(spec, outside, log=lambda line: None, train=_fake_train(calls), commit=True)
    assert calls == [] and not outside.exists()

    path = tmp_path / "spec.yaml"
    path.write_text(
        "steps: 2\nenvs: [{name: frozenlake, overrides: {model.path: builtin:tiny-random}}]\n"
        "variants: [grpo]\n"
    )
    assert main(["experiment", str(path), "--out", str(outside), "--commit"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spear-ray: error: --commit: ") and "\n" not in err


@needs_git
def test_a_failed_commit_is_one_line_and_the_next_start_commits_the_run(tmp_path, capsys):
    repo = _git_repo(tmp_path / "repo")
    spec = parse_spec(_spec_dict(steps=2, seeds=[0]))
    root = repo / "exp"
    runs = {r.label: r for r in spec.runs()}
    # finished before the marker existed (final checkpoint only) and never committed
    done = runs["frozenlake/grpo/seed0"]
    _train_outside_the_runner(done, root, 2)
    assert not (done.path(root) / "FINISHED").exists()

    lock = repo / ".git" / "index.lock"  # another git process, as far as git can tell
    lock.write_text("")
    calls, lines = [], []
    run_experiment(spec, root, log=lines.append, train=_fake_train(calls), commit=True)
    assert len(calls) == 1  # the grid went on
    failed = [line for line in lines if "git add failed" in line]
    assert len(failed) == 3  # the earlier run, the new one and the summary
    assert all("index.lock" in line and "\n" not in line for line in failed)
    assert any(line.startswith("[2/2] frozenlake/drbot_spear/seed0: git add") for line in failed)
    assert (done.path(root) / "FINISHED").is_file()  # written at the start
    assert (runs["frozenlake/drbot_spear/seed0"].path(root) / "FINISHED").is_file()
    assert _commits(repo) == ["initial"]
    # --dry-run --commit tells which finished runs are not committed yet
    path = tmp_path / "spec.yaml"
    path.write_text(
        "steps: 2\nseeds: [0]\n"
        "envs: [{name: frozenlake, overrides: {model.path: builtin:tiny-random}}]\n"
        "variants: [grpo, drbot_spear]\n"
    )
    assert main(["experiment", str(path), "--out", str(root), "--dry-run", "--commit"]) == 0
    shown = capsys.readouterr().out.splitlines()
    assert [line.split("  (")[0] for line in shown] == [
        "[1/2] frozenlake/grpo/seed0: finished, not yet committed",
        "[2/2] frozenlake/drbot_spear/seed0: finished, not yet committed",
    ]

    lock.unlink()
    again, lines = [], []
    run_experiment(spec, root, log=lines.append, train=_fake_train(again), commit=True)
    assert again == []
    assert _commits(repo)[1:] == [
        "experiment experiment: frozenlake/grpo/seed0 finished (2 steps, final held-out "
        "success 0.100)",
        "experiment experiment: frozenlake/drbot_spear/seed0 finished (2 steps, final "
        "held-out success 0.200)",
        "experiment experiment: summary (2/2 runs finished)",
    ]
    # nothing left to commit: a third start commits no run
    run_experiment(spec, root, log=lambda line: None, train=_fake_train(again), commit=True)
    assert not [s for s in _commits(repo)[4:] if " finished (" in s]
