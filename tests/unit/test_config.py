"""Config system: presets load, overrides apply, every kind of bad input is one clear line."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from spear_ray.cli import main
from spear_ray.config import ConfigError, SpearConfig, config_to_yaml, load_config, preset_names

PRESETS = ("demo", "textworld-1.5b", "math-code-32b")


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def _error(source, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(source, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_shipped_presets_are_the_three_named_ones():
    assert set(PRESETS) <= set(preset_names())


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_round_trips_through_yaml(name, tmp_path):
    config = load_config(name)
    printed = config_to_yaml(config)
    again = load_config(_write(tmp_path, printed))
    assert again == config


def test_presets_carry_the_released_settings():
    tw = load_config("textworld-1.5b")
    assert (tw.rollout.prompts_per_step, tw.rollout.samples_per_prompt) == (32, 8)
    assert tw.learner.lr == 1e-6 and tw.learner.weight_decay == 0.01 and tw.learner.grad_clip == 1.0
    assert tw.algo.sil.ramp_steps == tw.algo.tool_reward.decay_steps == 200
    assert tw.buffer.tolerate_steps == 5
    math = load_config("math-code-32b")
    assert (math.rollout.prompts_per_step, math.rollout.samples_per_prompt) == (128, 16)
    assert math.env.options["max_turns"] == 8 and math.rollout.max_response_tokens == 16384
    assert tw.env.options["max_turns"] == 50
    assert math.algo.sil.ramp_steps == 300 and math.algo.tool_reward.combine == "qwen3"
    assert math.env.options["tool_timeout_s"] == 30
    assert math.buffer.require_tool_call and math.buffer.strict_positive
    # several optimizer steps per rollout, as the reference's mini-batches give (agent: ~4-8k
    # turn rows in mini-batches of 1024; math: 128 prompts in mini-batches of 64)
    assert tw.learner.mini_batches_per_step == 4 and math.learner.mini_batches_per_step == 2
    assert load_config("demo").learner.mini_batches_per_step == 4
    assert tw.algo.filters.scope == "turn" and math.algo.filters.scope == "trajectory"


@pytest.mark.parametrize("name", ["textworld-1.5b", "demo"])
def test_agent_presets_never_pay_a_wandering_loss_like_a_win(name):
    # The reference's ALFWorld win is worth 10 against a tool-call bonus capped at 1: a loss that
    # wanders for max_turns earns at most a tenth of a win. With a win worth 1 it earned as much.
    from spear_ray.recipe import Recipe

    config = load_config(name)
    options = config.env.options
    win = options.get("win_reward", options.get("goal_reward"))
    turns = options["max_turns"]
    bonus = Recipe.from_config(config).tool_bonus
    wandering_loss = bonus.bonus(0.0, turns, step=0)  # lambda(0) = 1: the largest bonus
    quickest_win = win + bonus.bonus(win, 1, step=0)
    assert wandering_loss <= 0.1 * win < quickest_win


def test_defaults_are_spears_released_constants():
    c = SpearConfig()
    loss = c.algo.policy_loss
    assert (loss.clip_low, loss.clip_high, loss.dual_clip_c, loss.log_ratio_clamp) == (
        0.2,
        0.28,
        10,
        20,
    )
    assert loss.aggregation == "seq-mean-token-sum-norm" and loss.entropy_coef == 0.001
    assert (
        loss.on_policy_cov.ratio,
        loss.on_policy_cov.lower_bound,
        loss.on_policy_cov.upper_bound,
    ) == (0.0002, 1, 5)
    assert (loss.replay_cov.ratio, loss.replay_cov.lower_bound, loss.replay_cov.upper_bound) == (
        0.02,
        2,
        60,
    )
    assert c.algo.advantage.norm_by_std is False and c.algo.advantage.epsilon == 1e-6
    assert (c.algo.advantage.gigpo_gamma, c.algo.advantage.gigpo_step_weight) == (0.95, 1.0)
    f = c.algo.filters
    assert (f.repetition_ngram, f.repetition_max_count, f.group_keep_ratio) == (20, 10, 0.75)
    t = c.algo.tool_reward
    assert (t.per_call, t.cap, t.decay_steps, t.schedule) == (0.1, 1.0, 200, "cosine")
    b = c.buffer
    assert (b.size, b.trigger_factor, b.tolerate_steps, b.history_length) == (2048, 1.5, 5, 10240)
    assert c.env.invalid_action_penalty == -0.1
    assert c.algo.sil.coef == 1.0


def _all_models(model: type[BaseModel], seen=None):
    seen = set() if seen is None else seen
    if model in seen:
        return seen
    seen.add(model)
    for field in model.model_fields.values():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _all_models(annotation, seen)
    return seen


def test_every_field_has_a_description_and_unknown_fields_are_forbidden():
    models = _all_models(SpearConfig)
    assert len(models) >= 12
    for model in models:
        assert model.model_config.get("extra") == "forbid", model.__name__
        assert model.model_config.get("frozen") is True, model.__name__
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_config_is_frozen():
    config = SpearConfig()
    with pytest.raises(ValidationError, match="frozen"):
        config.learner.lr = 1.0  # type: ignore[misc]


def test_dotted_overrides_apply_with_yaml_typing():
    config = load_config(
        "demo", ["algo.sil.coef=0.5", "run.total_steps=7", "algo.sil.enabled=false"]
    )
    assert config.algo.sil.coef == 0.5
    assert config.run.total_steps == 7
    assert config.algo.sil.enabled is False


def test_samples_per_step_is_derived():
    config = load_config("demo", ["rollout.prompts_per_step=4", "rollout.samples_per_prompt=2"])
    assert config.rollout.samples_per_step == 8


def test_unknown_field_names_file_line_and_known_fields(tmp_path):
    path = _write(tmp_path, "run:\n  name: x\nalgo:\n  sil:\n    coeff: 0.5\n")
    message = _error(path)
    assert f"{path}:5:" in message
    assert "algo.sil.coeff: unknown field" in message
    assert "coef" in message  # the hint lists the real field


def test_wrong_type_names_field_and_line(tmp_path):
    path = _write(tmp_path, "learner:\n  lr: fast\n")
    message = _error(path)
    assert message.startswith(f"{path}:2: learner.lr:")
    assert "'fast'" in message


def test_out_of_range_value(tmp_path):
    message = _error(_write(tmp_path, "buffer:\n  tolerate_steps: 11\n"))
    assert ":2: buffer.tolerate_steps:" in message and "10" in message


def test_yaml_syntax_error_names_line_and_column(tmp_path):
    path = _write(tmp_path, "run:\n  name: [unclosed\nlearner:\n  lr: 1\n")
    message = _error(path)
    assert message.startswith(f"{path}:")
    assert "YAML syntax error" in message


def test_top_level_must_be_a_mapping(tmp_path):
    assert "top level must be a mapping" in _error(_write(tmp_path, "- 1\n- 2\n"))


def test_bad_override_is_named():
    message = _error("demo", ["learner.lr=abc"])
    assert message.startswith("override 'learner.lr=abc': learner.lr:")
    assert "override" in _error("demo", ["no_equals_sign"])
    assert "algo.sil.nope: unknown field" in _error("demo", ["algo.sil.nope=1"])
    assert "is a value, not a section" in _error("demo", ["run.name.x=1"])


def test_missing_file_and_unknown_preset():
    assert "no such config file" in _error("does/not/exist.yaml")
    message = _error("no-such-preset")
    assert "demo" in message and "preset" in message


def test_unknown_env_lists_known_ones():
    message = _error("demo", ["env.name=chess"])
    assert message.startswith("override 'env.name=chess': env.name: unknown env 'chess'")
    assert "frozenlake" in message and "textworld" in message


def test_env_options_are_validated_against_the_env(tmp_path):
    message = _error("demo", ["env.options={not_an_option: 1}"])
    assert "env.options.not_an_option" in message


def test_samples_must_divide_among_learner_ranks(tmp_path):
    path = _write(
        tmp_path,
        "rollout:\n  prompts_per_step: 3\n  samples_per_prompt: 3\nlearner:\n"
        "  num_ranks: 2\n  tokens_per_micro_batch: 100000\n",
    )
    message = _error(path)
    assert f"{path}:2: rollout.prompts_per_step:" in message
    assert "9 samples per step" in message and "learner.num_ranks" in message


def test_micro_batch_budget_must_hold_the_longest_sequence():
    message = _error("demo", ["learner.tokens_per_micro_batch=100"])
    assert message.startswith(
        "override 'learner.tokens_per_micro_batch=100': learner.tokens_per_micro_batch:"
    )
    assert "raise it to at least" in message


def test_tensor_parallel_needs_gpus():
    message = _error("demo", ["rollout.tensor_parallel_size=2"])
    assert "rollout.tensor_parallel_size:" in message and "gpus_per_rollout_worker" in message


def test_eval_seeds_must_be_held_out():
    message = _error("demo", ["env.eval_seed_start=5"])
    assert "env.eval_seed_start:" in message and "overlap" in message


def test_clip_cov_bounds_must_be_ordered():
    message = _error("demo", ["algo.policy_loss.on_policy_cov.lower_bound=9"])
    assert "algo.policy_loss.on_policy_cov.lower_bound:" in message


# ----------------------------------------------------------------------------- CLI


def test_cli_show_prints_full_resolved_yaml(capsys):
    assert main(["config", "show", "demo", "run.total_steps=3"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["run"]["total_steps"] == 3
    assert set(data) == set(SpearConfig.model_fields)
    assert data["algo"]["policy_loss"]["replay_cov"]["upper_bound"] == 60


def test_cli_check_and_presets(capsys, tmp_path):
    assert main(["config", "check", "math-code-32b"]) == 0
    assert "ok" in capsys.readouterr().out
    assert main(["config", "presets"]) == 0
    assert set(PRESETS) <= set(capsys.readouterr().out.split())


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    path = _write(tmp_path, "rollout:\n  temperature: hot\n")
    result = subprocess.run(
        [sys.executable, "-m", "spear_ray.cli", "config", "check", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "rollout.temperature" in lines[0] and f"{path}:2" in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n# and another\n", "{}\n"])
def test_a_config_file_that_sets_nothing_is_an_error(tmp_path, capsys, text):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError, match="sets nothing") as info:
        load_config(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert main(["config", "check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert "ok" not in out and len(err.strip().splitlines()) == 1 and str(path) in err
    runs = tmp_path / "runs"
    assert main(["train", "--config", str(path), f"run.runs_dir={runs}"]) == 2
    assert not runs.exists()  # refused before any run directory is made


def test_config_literals_match_the_algo_registries():
    """A variant the config accepts must exist in spear_ray.algo, and vice versa."""
    from typing import get_args

    from spear_ray import algo
    from spear_ray.config.schema import (
        AdvantageConfig,
        BufferConfig,
        CovConfig,
        PolicyLossConfig,
        SilConfig,
        ToolRewardConfig,
    )

    def literal(model, name):
        return set(get_args(model.model_fields[name].annotation))

    assert literal(AdvantageConfig, "estimator") == set(algo.ADVANTAGE_ESTIMATORS)
    assert literal(PolicyLossConfig, "aggregation") == set(algo.LOSS_AGGREGATIONS)
    assert literal(CovConfig, "mode") == set(algo.COV_MODES)
    assert literal(ToolRewardConfig, "schedule") == set(algo.TOOL_REWARD_SCHEDULES)
    assert literal(ToolRewardConfig, "combine") == set(algo.TOOL_REWARD_COMBINATIONS)
    assert literal(SilConfig, "schedule") == set(algo.SIL_WEIGHT_SCHEDULES)
    assert literal(BufferConfig, "recalibration") == set(algo.RECALIBRATIONS)


def test_a_legacy_logging_section_still_loads(tmp_path):
    """Run directories from before run.loggers have a `logging:` section; they must resume."""
    old = tmp_path / "config.yaml"
    old.write_text(
        "logging:\n  tensorboard: true\n  wandb: false\n  wandb_project: p\n"
        "  wandb_mode: offline\n  progress: true\nrun:\n  total_steps: 3\n"
    )
    config = load_config(old)
    assert config.run.loggers == ["jsonl", "tensorboard"]
    assert config.run.wandb_project == "p"
    assert config.run.total_steps == 3
    quiet = tmp_path / "quiet.yaml"
    quiet.write_text("logging:\n  tensorboard: false\n")
    assert load_config(quiet).run.loggers == ["jsonl"]


# ------------------------------------------------------------------ one override, one field


def _leaf_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, object]]:
    """(dotted name, field info) of every leaf field, walking nested sections."""
    out = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += _leaf_fields(annotation, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", info))
    return out


def _candidates(value, info):
    """Values different from `value` to try as its override, most likely valid first."""
    choices = [c for c in typing.get_args(info.annotation) if isinstance(c, (str, int))]
    if typing.get_origin(info.annotation) is typing.Literal:
        return [c for c in choices if c != value]
    if isinstance(value, bool):
        return [not value]
    if isinstance(value, int):
        return [value + 1, value - 1, value * 2, 1, 2]
    if isinstance(value, float):
        return [value * 0.5, value * 1.5, value + 0.1, value - 0.1, 0.5, 2.0]
    if isinstance(value, str):
        return [f"{value}x"]
    if isinstance(value, (list, tuple)):
        return ["[jsonl, tensorboard]", "[0.8, 0.9]", "[/opt/spear-test]"]  # last: paths
    if value is None:
        return [1.5, 2, "x"]
    return []


# Fields whose override may change others by design (each says why).
DERIVED = {
    "env.name": "env.options are resolved per env, so a new env brings its own options",
    "rollout.engine": "a Literal with one value",
    "buffer.row_unit": "a Literal with one value",
    "learner.optimizer": "a Literal with one value",
    "rollout.tensor_parallel_size": "above 1 it needs resources.gpus_per_rollout_worker too",
}


@pytest.mark.parametrize("source", [None, "demo"])
def test_an_override_changes_the_field_it_names_and_nothing_else(source):
    # Overrides of nested sections once rebuilt the section from its class defaults, so
    # algo.policy_loss.replay_cov.mode=clip-cov reset replay_cov.ratio to the on-policy 0.0002.
    from spear_ray.config.load import flat_fields

    base = load_config(source)
    base_flat = flat_fields(base)
    untested = []
    for dotted, _info in _leaf_fields(SpearConfig):
        if dotted in DERIVED or dotted == "env.options":
            continue
        current = base_flat.get(dotted)
        for candidate in _candidates(current, _info):
            text = candidate if isinstance(candidate, str) else yaml.safe_dump(candidate).strip()
            text = text.removesuffix("\n...").strip()
            try:
                changed = load_config(source, [f"{dotted}={text}"])
            except ConfigError:
                continue
            flat = flat_fields(changed)
            if flat[dotted] == current:
                continue
            others = {k: v for k, v in flat.items() if k != dotted}
            expected = {k: v for k, v in base_flat.items() if k != dotted}
            assert others == expected, (
                f"{dotted}={text} also changed "
                f"{[k for k in expected if others.get(k) != expected[k]]}"
            )
            break
        else:
            untested.append(dotted)
    assert not untested, f"no valid different value found for {untested}; add a candidate"
    # and the case that was found broken, explicitly
    cov = load_config(source, ["algo.policy_loss.replay_cov.mode=clip-cov"])
    replay = cov.algo.policy_loss.replay_cov
    assert (replay.ratio, replay.lower_bound, replay.upper_bound) == (0.02, 2.0, 60.0)


def test_nested_section_defaults_live_on_their_class():
    # A partial section (one override) is rebuilt from the class defaults: a default_factory that
    # builds the class with other values would silently lose them.
    def walk(model: type[BaseModel], prefix: str = "") -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                if info.default_factory is not None:
                    assert info.default_factory() == annotation(), f"{prefix}{name}"
                walk(annotation, f"{prefix}{name}.")

    walk(SpearConfig)


def test_rollout_worker_threads_reach_the_engine_process():
    # vLLM's CPU kernels take OpenMP's thread count at process start: it goes in the actor's
    # environment, not through torch.set_num_threads later (which vLLM refuses).
    from actors.rollout_group import rollout_actor_options
    from spear_ray.recipe import rollout_spec

    unset = load_config("demo", ["resources.threads_per_rollout_worker=0"])
    default = rollout_actor_options(rollout_spec(unset), 0)
    assert "runtime_env" not in default and default["num_cpus"] == 1.0
    threaded = load_config("demo", ["resources.threads_per_rollout_worker=3"])
    options = rollout_actor_options(rollout_spec(threaded), 0)
    assert options["runtime_env"] == {"env_vars": {"OMP_NUM_THREADS": "3"}}
    assert options["num_cpus"] == 1.0  # the reservation is unchanged


def test_weight_transport_is_a_learner_field_the_controller_passes_on():
    from spear_ray.recipe import learner_spec

    default = load_config("demo")
    assert default.learner.weight_transport == "object_store"
    collective = load_config("demo", ["learner.weight_transport=collective"])
    assert collective.learner.weight_transport == "collective"
    assert learner_spec(collective).learner.weight_transport == "collective"  # reaches the ranks
    message = _error("demo", ["learner.weight_transport=nccl"])
    assert "learner.weight_transport" in message
    assert "'object_store' or 'collective'" in message and "nccl" in message
