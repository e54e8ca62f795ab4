"""Model output that is not a valid action or tool call is normal input, for every registered env.

Each env gets the same garbage turns (empty, whitespace only, 100 kB, control characters and
U+FFFD, unbalanced and nested tags, a real tag with nonsense inside, broken tool-call JSON, ...):
`step` must never raise (a raise would turn the agent's mistake into an infrastructure failure,
DESIGN.md "Contracts"), must flag `invalid_action` by the env's own rules, and leaves the penalty to
the agent loop, which adds `env.invalid_action_penalty` (-0.1, docs/algorithm.md §2) per invalid
action.

textworld needs generated games: the two tiny one-room games of tests/unit/test_env_textworld.py,
generated once per session into a tmp cache (~6-8 s).
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spear_ray.envs import make_env
from spear_ray.envs.registry import known_envs
from spear_ray.recipe import rollout_spec
from spear_ray.sandbox.result import ExecResult
from tests.unit.test_env_textworld import TINY as TEXTWORLD_TINY

# No small number anywhere: a gym Discrete space would read it as an action.
GARBAGE = {
    "empty": "",
    "whitespace": " \n\t\r\n  \u00a0\u2003\n",
    "huge": "blah " * 20_000,  # 100 kB without a tag
    "huge_tag": "<action>" + "x" * 100_000 + "</action>",
    "binaryish": "\x00\x01\x07\x1b[31m\ufffd\ufffd\u202e\u200b\U0001f600\uffff",
    "unbalanced": "</action>Up<action",
    "nested": "<action><action>Up</action></action>",
    "tag_nonsense": "<action>dance wildly \u2206\u00a7</action>",
    "deep_json": "<action>" + "[" * 100_000 + "</action>",
    "huge_digits": "<action>" + "9" * 5_000 + "</action>",  # not a Discrete action: too big
    "broken_tool_call": '<tool_call>{"name": "python", "arguments": {"code": </tool_call>',
    "code_nonsense": "<code>\u00a7\u2206 this is not python \u2206\u00a7</code>",
}

# A tagged command is sent to the game unless inadmissible_is_invalid: the game answers it.
TEXTWORLD_SENT = {"huge_tag", "nested", "tag_nonsense", "deep_json", "huge_digits"}

# id -> (env name, options, garbage that is a valid action or tool call by that env's rules)
CASES: dict[str, tuple[str, dict, set[str]]] = {
    "frozenlake": ("frozenlake", {}, set()),
    "sokoban": ("sokoban", {}, set()),
    "gym-discrete": (
        "gym",
        {
            "env_id": "FrozenLake-v1",
            "env_config": {"is_slippery": False},
            "stringify_observations": True,
            "action_names": ["left", "down", "right", "up"],
        },
        set(),
    ),
    "gym-box": ("gym", {"env_id": "Pendulum-v1", "stringify_observations": True}, set()),
    # a tagged program runs (its error is the observation): a tool call, not an invalid action
    "python_math": ("python_math", {}, {"code_nonsense"}),
    "python_math-hermes_json": ("python_math", {"tool_call_syntax": "hermes_json"}, set()),
    "textworld-strict": ("textworld", {"inadmissible_is_invalid": True}, set()),
    "textworld": ("textworld", {}, TEXTWORLD_SENT),
}


class FakeSandbox:
    """What the interpreter says to a program that is not Python."""

    def __init__(self):
        self.programs: list[str] = []

    def run_python(self, code, timeout_s=None):
        self.programs.append(code)
        return ExecResult(
            stdout="",
            stderr="SyntaxError: invalid syntax",
            exit_code=1,
            timed_out=False,
            wall_s=0.01,
        )


@pytest.fixture(scope="session")
def textworld_games(tmp_path_factory):
    pytest.importorskip("textworld")
    from spear_ray.envs.textworld_env import TextWorldOptions, ensure_games

    options = {**TEXTWORLD_TINY, "cache_dir": str(tmp_path_factory.mktemp("textworld"))}
    ensure_games(TextWorldOptions(**options), "train")
    return options


def _make(case: str, request) -> tuple[object, FakeSandbox]:
    name, options, _ = CASES[case]
    sandbox = FakeSandbox()
    options = {**options, "max_turns": 100}
    if name == "textworld":
        options = {**request.getfixturevalue("textworld_games"), **options}
    return make_env(name, options, sandbox=sandbox), sandbox


def test_every_registered_env_is_covered():
    assert {name for name, _, _ in CASES.values()} == set(known_envs())


def _params():
    for case in CASES:
        for garbage in GARBAGE:
            yield pytest.param(case, garbage, id=f"{case}-{garbage}")


@pytest.fixture(scope="module")
def envs(request):
    """One env per case, reset once: every garbage turn is a step of the same episode."""
    made: dict[str, tuple] = {}
    yield lambda case: made.setdefault(case, _reset(*_make(case, request)))
    for env, _ in made.values():
        env.close()


def _reset(env, sandbox):
    env.reset(0)
    return env, sandbox


# jericho truncates a command over 198 bytes and warns with the whole command (100 kB here)
@pytest.mark.filterwarnings("ignore:Once converted to bytes")
@pytest.mark.parametrize(("case", "garbage"), list(_params()))
def test_garbage_is_an_invalid_action_not_an_error(envs, case, garbage):
    env, sandbox = envs(case)
    valid = garbage in CASES[case][2]
    result = env.step(GARBAGE[garbage])
    assert isinstance(result.observation, str) and result.observation
    assert result.info.invalid_action is not valid
    assert result.reward == 0.0 and not result.info.success  # the penalty is the loop's
    assert not result.done  # the episode goes on (max_turns is far away)
    if CASES[case][0] == "python_math":
        assert result.info.tool_call is valid
        assert bool(sandbox.programs) is valid  # only a tool call reaches the sandbox
        sandbox.programs.clear()


@given(text=st.text(max_size=300))
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_arbitrary_text_never_raises_and_is_valid_or_invalid(text):
    """Agent envs: any text is a valid or an invalid action, never an error; every env step,
    invalid ones too, counts toward r_tc (the reference counts episode_lengths)."""
    for name in ("frozenlake", "sokoban"):
        env = make_env(name, {"max_turns": 1000})
        env.reset(3)
        wrapped = f"<action>{text}</action>" if len(text) % 2 else text
        result = env.step(wrapped)
        assert result.info.tool_call
        assert result.reward >= 0.0


# ----------------------------------------------------------------------------- the penalty


class ScriptedEngine:
    """Replies with the next scripted text (token-in-token-out through the real tokenizer)."""

    def __init__(self, tokenizer, replies):
        self.tokenizer = tokenizer
        self.replies = list(replies)
        self.weight_version = 0
        self.calls = 0

    async def generate(self, prompt_ids, spec):
        from spear_ray.engines.base import Generation

        text = self.replies[min(self.calls, len(self.replies) - 1)]
        self.calls += 1
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        ids = [*ids[: spec.max_tokens - 1], self.tokenizer.convert_tokens_to_ids("<|im_end|>")]
        return Generation(ids, [-0.5] * len(ids), "stop", self.weight_version)

    def shutdown(self):
        pass


@pytest.mark.parametrize("penalty", [None, -0.5])
def test_the_rollout_worker_penalises_each_invalid_action_by_the_config(penalty):
    """Through RolloutWorker (config -> EpisodeSettings -> agent loop): every garbage turn of a
    frozenlake episode is invalid, costs env.invalid_action_penalty (default -0.1) and the
    trajectory is scored, not an infrastructure failure."""
    from actors.rollout_worker import RolloutWorker
    from spear_ray.agent.loop import Task
    from spear_ray.config import load_config
    from spear_ray.models.tiny import ensure_tokenizer, load_tokenizer

    replies = list(GARBAGE.values())
    overrides = [
        f"env.options.max_turns={len(replies)}",
        "rollout.max_tokens_per_turn=128",
        "rollout.max_response_tokens=16384",
        "learner.tokens_per_micro_batch=17000",
    ]
    if penalty is not None:
        overrides.append(f"env.invalid_action_penalty={penalty}")
    config = load_config("demo", overrides)
    expected = -0.1 if penalty is None else penalty
    assert config.env.invalid_action_penalty == expected
    tokenizer = load_tokenizer(ensure_tokenizer())
    worker = RolloutWorker(
        rollout_spec(config), engine=ScriptedEngine(tokenizer, replies), tokenizer=tokenizer
    )
    try:
        (traj,) = asyncio.run(
            worker.rollout(tasks=[Task(task_id="t", group_id=0, env_seed=5, num_samples=1)])
        )
    finally:
        worker.shutdown()
    assert traj.failure is None
    assert traj.invalid_actions == len(replies) == len(traj.turn_rewards)
    assert traj.rewards.invalid_penalty == pytest.approx(expected * len(replies))
    assert traj.turn_rewards == pytest.approx([expected] * len(replies))
    assert traj.tool_calls == len(replies) and not traj.success  # every env step counts
