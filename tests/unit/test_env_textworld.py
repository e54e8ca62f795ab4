"""textworld: cached game sets, walkthrough oracle wins, invalid actions, seeds, anchors.

Two tiny games (one room, one ingredient) are generated once per test session into a tmp cache
(~6-8 s); the parallel-generation and eval-set tests are marked slow.
"""

from __future__ import annotations

import pytest

from spear_ray.envs import EnvError, make_env
from spear_ray.envs.textworld_env import (
    TextWorldOptions,
    clean_feedback,
    ensure_games,
    game_paths,
)

pytest.importorskip("textworld")

TINY = {
    "recipe": 1,
    "take": 1,
    "go": 1,
    "open": False,
    "cook": False,
    "cut": False,
    "num_train_games": 2,
    "num_eval_games": 1,
    "gen_workers": 1,
    "split": "train",
}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    options = {**TINY, "cache_dir": str(tmp_path_factory.mktemp("textworld"))}
    ensure_games(TextWorldOptions(**options), "train")
    return options


def _cmd(c: str) -> str:
    return f"I should do this next.\n<action>{c}</action>"


def test_games_are_cached_on_disk(tiny):
    paths = game_paths(TextWorldOptions(**tiny), "train")
    assert len(paths) == 2 and all(p.exists() and p.with_suffix(".json").exists() for p in paths)
    stamps = [p.stat().st_mtime_ns for p in paths]
    make_env("textworld", tiny).close()  # found, not regenerated
    assert [p.stat().st_mtime_ns for p in paths] == stamps


def test_walkthrough_wins_every_game(tiny):
    env = make_env("textworld", tiny)
    for seed in (0, 1):
        obs = env.reset(seed)
        assert "<action></action>" in obs and "Admissible commands:" in obs
        assert env.walkthrough
        for i, command in enumerate(env.walkthrough):
            result = env.step(_cmd(command))
            last = i == len(env.walkthrough) - 1
            assert not result.info.invalid_action
            assert result.done is last and result.info.success is last
            assert result.reward == (10.0 if last else 0.0)  # a win pays 10 (ALFWorld)
    env.close()


def test_seeds_reproduce_and_differ(tiny):
    def play(seed):
        env = make_env("textworld", tiny)
        seq = [env.reset(seed)]
        seq += [env.step(_cmd(c)).observation for c in ("look", "examine cookbook", "inventory")]
        env.close()
        return seq

    assert play(0) == play(0)
    assert play(0) == play(2)  # seed % num_train_games
    assert play(0)[0] != play(1)[0]


def test_invalid_actions(tiny):
    env = make_env("textworld", {**tiny, "inadmissible_is_invalid": True, "max_turns": 5})
    first = env.reset(0)
    anchor0 = env.step(_cmd("look")).info.anchor
    result = env.step("look, without a tag")  # unparsable: not sent to the game
    assert result.info.invalid_action and not result.done
    assert "Invalid action" in result.observation
    result = env.step(_cmd("dance wildly"))  # parsed, but not an admissible command
    assert result.info.invalid_action
    result = env.step(_cmd("Inventory."))  # case and trailing period are normalised
    assert not result.info.invalid_action
    assert result.info.anchor == anchor0  # looking and inventory do not change the state
    assert first


def test_turn_limit_truncates_and_no_commands_option(tiny):
    env = make_env("textworld", {**tiny, "max_turns": 2, "admissible_commands": False})
    obs = env.reset(0)
    assert "Admissible commands" not in obs
    assert not env.step(_cmd("look")).done
    result = env.step(_cmd("look"))
    assert result.done and result.info.truncated and not result.info.success
    with pytest.raises(EnvError):
        env.step(_cmd("look"))


def test_missing_games_without_generation_is_a_clear_error(tiny):
    opts = {**tiny, "num_train_games": 5, "generate_missing": False}
    with pytest.raises(EnvError, match="3 of 5 train games missing"):
        make_env("textworld", opts)


def test_clean_feedback_drops_prompt_lines():
    raw = "\nYou take the knife.\n\n\n\n>   -= Kitchen =-4/13"
    assert clean_feedback(raw) == "You take the knife."


@pytest.mark.slow
def test_parallel_generation_and_eval_split(tmp_path):
    opts = {
        **TINY,
        "cache_dir": str(tmp_path),
        "num_train_games": 2,
        "num_eval_games": 2,
        "gen_workers": 2,
        "split": "auto",
    }
    env = make_env("textworld", opts)  # train set, two processes
    train_obs = env.reset(0)
    eval_obs = env.reset(1_000_000)  # split=auto: eval game 0
    assert train_obs != eval_obs
    for command in env.walkthrough:
        result = env.step(_cmd(command))
    assert result.info.success
    assert all(p.exists() for p in game_paths(TextWorldOptions(**opts), "eval"))


def test_walkthrough_demos_win_and_noise_only_idles(tiny):
    """The textworld demonstrator follows the walkthrough; a noisy turn is a command that leaves
    the game as it was (or has no tag), so the demo still wins, in more turns."""
    from spear_ray.models.demos import generate_demos

    clean = generate_demos("textworld", range(2), tiny, noise=0.0)
    noisy = generate_demos("textworld", range(2), tiny, noise=0.5, seed=3)
    for c, n in zip(clean, noisy, strict=True):
        assert c.success and n.success
        walk = [m["content"] for m in c.messages if m["role"] == "assistant"]
        assert all(a.startswith("<action>") and a.endswith("</action>") for a in walk)
        assert len([m for m in n.messages if m["role"] == "assistant"]) > len(walk)
        # the clean demo's commands appear in the noisy one in the same order
        said = iter(m["content"] for m in n.messages if m["role"] == "assistant")
        assert all(any(a == s for s in said) for a in walk)
    again = generate_demos("textworld", range(2), tiny, noise=0.5, seed=3)
    assert [d.messages for d in again] == [d.messages for d in noisy]
