"""The gymnasium adapter: gymnasium ids, Ray-registered envs, action spaces, success, seeds."""

from __future__ import annotations

import string

import gymnasium
import pytest
from gymnasium import spaces

from spear_ray.envs import EnvError, make_env


class GuessEnv(gymnasium.Env):
    """Guess a hidden digit; the env answers higher/lower. Text observations."""

    action_space = spaces.Discrete(10)
    observation_space = spaces.Text(200, charset=string.printable)

    def __init__(self, guesses: int = 5):
        self.guesses = guesses

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.target = int(self.np_random.integers(10))
        self.left = self.guesses
        return f"Guess a digit. {self.left} guesses left.", {}

    def step(self, action):
        self.left -= 1
        if action == self.target:
            return "Correct!", 1.0, True, False, {"success": True}
        hint = "higher" if action < self.target else "lower"
        return f"Go {hint}. {self.left} left.", 0.0, False, self.left == 0, {"success": False}


class SayEnv(gymnasium.Env):
    """Say the magic word (Text action space); no success key in info."""

    action_space = spaces.Text(20, charset="abcdefghijklmnopqrstuvwxyz ")
    observation_space = spaces.Text(200, charset=string.printable)

    def __init__(self, word: str = "please"):
        self.word = word

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return "What is the magic word?", {}

    def step(self, action):
        if action == self.word:
            return "Yes.", 1.0, True, False, {}
        return "No.", 0.0, False, False, {}


@pytest.fixture(scope="module", autouse=True)
def _registered():
    gymnasium.register(id="SpearGuess-v0", entry_point=GuessEnv)
    yield
    gymnasium.registry.pop("SpearGuess-v0", None)


def _act(a: str) -> str:
    return f"<action>{a}</action>"


def _binary_search(env) -> list:
    lo, hi, results = 0, 9, []
    while True:
        mid = (lo + hi) // 2
        result = env.step(_act(str(mid)))
        results.append(result)
        if result.done:
            return results
        lo, hi = (mid + 1, hi) if "higher" in result.observation else (lo, mid - 1)


def test_gymnasium_id_oracle_succeeds():
    env = make_env("gym", {"env_id": "SpearGuess-v0", "env_config": {"guesses": 5}})
    for seed in range(10):
        assert "Guess a digit" in env.reset(seed)
        results = _binary_search(env)
        last = results[-1]
        assert last.info.success and last.reward == 1.0 and last.done
        assert not any(r.info.success for r in results[:-1])
        assert all(not r.info.invalid_action for r in results)
    env.close()


def test_discrete_action_names_and_invalid_actions():
    names = [f"d{i}" for i in range(10)]
    env = make_env("gym", {"env_id": "SpearGuess-v0", "action_names": names, "max_turns": 4})
    first = env.reset(0)
    for bad in (_act("11"), _act("five"), "3 without tags", _act("-1")):
        result = env.step(bad)
        assert result.info.invalid_action and result.reward == 0.0
        if not result.done:
            assert result.info.anchor in first
    assert result.done and result.info.truncated  # 4 invalid turns hit max_turns
    env.reset(0)
    assert not env.step(_act("D3")).info.invalid_action


def test_seeds_reproduce_and_differ():
    def play(seed):
        env = make_env("gym", {"env_id": "SpearGuess-v0", "include_instructions": False})
        return [env.reset(seed)] + [r.observation for r in _binary_search(env)]

    assert play(1) == play(1)
    assert len({tuple(play(s)) for s in range(8)}) >= 4


def test_ray_registered_env_with_text_actions():
    from ray.tune.registry import ENV_CREATOR, _global_registry, register_env

    register_env("spear-say-test", lambda config: SayEnv(**config))
    try:
        opts = {"env_id": "spear-say-test", "env_config": {"word": "thanks"}, "success_return": 1.0}
        env = make_env("gym", opts)
        env.reset(0)
        wrong = env.step(_act("please"))
        assert not wrong.done and not wrong.info.success and not wrong.info.invalid_action
        assert env.step(_act("NOT VALID 123")).info.invalid_action  # outside the charset
        right = env.step(_act("thanks"))
        assert right.done and right.info.success and right.reward == 1.0
        with pytest.raises(ValueError, match="not registered in gymnasium"):
            make_env("gym", {**opts, "source": "gymnasium"})
    finally:
        _global_registry.unregister(ENV_CREATOR, "spear-say-test")


def test_non_text_observations_need_stringify():
    with pytest.raises(EnvError, match="stringify_observations"):
        make_env("gym", {"env_id": "FrozenLake-v1"}).reset(0)
    opts = {
        "env_id": "FrozenLake-v1",
        "env_config": {"is_slippery": False},
        "stringify_observations": True,
        "action_names": ["left", "down", "right", "up"],
        "success_return": 1.0,
    }
    env = make_env("gym", opts)
    assert env.reset(0).endswith("0")
    path = ["down", "down", "right", "right", "down", "right"]
    for i, move in enumerate(path):
        result = env.step(_act(move))
        assert result.done is (i == len(path) - 1)
    assert result.info.success and result.reward == 1.0 and result.observation == "15"


def test_unknown_or_missing_env_id():
    with pytest.raises(ValueError, match=r"needs options\.env_id"):
        make_env("gym", {})
    with pytest.raises(ValueError, match="'NoSuchEnv-v9' is not registered"):
        make_env("gym", {"env_id": "NoSuchEnv-v9"})
