"""Env registry, options models, the shared action-extraction rule, and import weight."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spear_ray.envs import (
    EnvInfo,
    StepResult,
    TextEnv,
    env_description,
    env_options_model,
    known_envs,
    make_env,
    register_env,
    validate_env_options,
)
from spear_ray.envs.actions import extract_action, find_tagged
from spear_ray.envs.registry import unregister_env

BUILTINS = ("python_math", "textworld", "sokoban", "frozenlake", "gym")


def test_builtins_are_registered():
    assert set(BUILTINS) <= set(known_envs())
    for name in BUILTINS:
        assert env_description(name)


def test_unknown_env_is_one_line_listing_known_ones():
    with pytest.raises(KeyError) as info:
        make_env("alfworld")
    message = info.value.args[0]
    assert "\n" not in message
    assert "alfworld" in message
    for name in BUILTINS:
        assert name in message


@pytest.mark.parametrize("name", BUILTINS)
def test_options_models_are_frozen_strict_and_documented(name):
    model = env_options_model(name)
    assert model.model_config.get("frozen") is True
    assert model.model_config.get("extra") == "forbid"
    defaults = model()  # every field has a default
    assert "max_turns" in model.model_fields
    for field_name, field in model.model_fields.items():
        assert field.description, f"{name}.{field_name} has no description"
        assert "\n" not in field.description
    with pytest.raises(ValidationError):
        model(no_such_option=1)
    with pytest.raises(ValidationError):
        defaults.max_turns = 3  # frozen


def test_validate_options_accepts_dict_and_model_rejects_other_model():
    model = env_options_model("sokoban")
    assert validate_env_options("sokoban", {"size": 7}).size == 7
    given = model(size=8)
    assert validate_env_options("sokoban", given) is given
    assert validate_env_options("sokoban", None) == model()
    with pytest.raises(TypeError, match="SokobanOptions"):
        validate_env_options("sokoban", env_options_model("frozenlake")())
    with pytest.raises(ValidationError):
        validate_env_options("sokoban", {"size": "big"})


class _EchoOptions(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    max_turns: int = Field(2, description="turns")


class _EchoEnv:
    def __init__(self, options: _EchoOptions, greeting: str):
        self.options, self.greeting, self.turns = options, greeting, 0

    def reset(self, seed: int) -> str:
        self.turns = 0
        return f"{self.greeting} {seed}"

    def step(self, action_text: str) -> StepResult:
        self.turns += 1
        done = self.turns >= self.options.max_turns
        return StepResult(action_text, 0.0, done, EnvInfo(anchor=action_text))

    def close(self) -> None:
        pass


def test_register_custom_env_with_runtime_deps():
    register_env("echo-test", _EchoEnv, _EchoOptions, "echoes")
    try:
        with pytest.raises(ValueError, match="already registered"):
            register_env("echo-test", _EchoEnv, _EchoOptions, "echoes")
        env = make_env("echo-test", {"max_turns": 1}, greeting="hi")
        assert isinstance(env, TextEnv)
        assert env.reset(3) == "hi 3"
        assert env.step("x").done
        assert "echo-test" in known_envs()
    finally:
        unregister_env("echo-test")
    assert "echo-test" not in known_envs()


def test_deps_an_env_does_not_take_are_not_passed():
    sandbox = object()  # a rollout worker hands every env the same deps
    env = make_env("sokoban", {}, sandbox=sandbox)
    assert env.reset(0)


def test_python_math_without_sandbox_says_how_to_pass_one():
    with pytest.raises(TypeError, match="sandbox="):
        make_env("python_math")


@pytest.mark.parametrize(
    ("text", "fallback", "expected"),
    [
        ("think... <action>Up</action>", "none", "Up"),
        ("<action>Up</action> no, <action> Left </action>", "none", "Left"),
        ("I go <action>go north", "none", "go north"),  # stop string dropped by the engine
        ("<action></action>", "none", None),
        ("Up", "none", None),
        ("let me think\nLeft\n\n", "last_line", "Left"),
        ("  go east  ", "whole_text", "go east"),
        ("", "last_line", None),
    ],
)
def test_extract_action(text, fallback, expected):
    assert extract_action(text, "action", fallback) == expected


def test_custom_tag_and_find_tagged():
    assert extract_action("<answer>Down</answer>", "answer") == "Down"
    assert extract_action("<action>Down</action>", "answer") is None
    assert find_tagged("<a>1</a><a>2</a>", "a") == ["1", "2"]


def test_import_is_light():
    code = (
        "import sys, spear_ray.envs\n"
        "heavy = [m for m in ('ray', 'gymnasium', 'textworld', 'sympy', 'math_verify', 'torch')"
        " if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
