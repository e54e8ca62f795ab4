"""Sokoban and FrozenLake: oracle policies solve them, invalid actions, seeds, difficulty knobs."""

from __future__ import annotations

import pytest

from spear_ray.envs import make_env
from spear_ray.envs.frozenlake import generate_map, shortest_path
from spear_ray.envs.sokoban import generate_level, solve


def _act(move: str) -> str:
    return f"I will move.\n<action>{move}</action>"


# ---------------------------------------------------------------- sokoban


@pytest.mark.parametrize(
    "options",
    [{}, {"size": 7, "num_boxes": 2}, {"size": 8, "num_boxes": 3, "reverse_steps": 150}],
)
def test_sokoban_bfs_oracle_solves_every_seed(options):
    for seed in range(8):
        env = make_env("sokoban", options)
        env.reset(seed)
        plan = solve(env.level)
        assert plan, f"seed {seed}: generated level has no solution"
        for i, move in enumerate(plan):
            result = env.step(_act(move.capitalize()))
            assert not result.info.invalid_action
            last = i == len(plan) - 1
            assert result.done is last
            assert result.info.success is last
            assert result.reward == (10.0 if last else 0.0)  # a win pays 10 (ALFWorld)
        assert "X" not in result.observation  # no box off target
        assert result.info.anchor == result.observation
        env.close()


def test_sokoban_min_solution_moves_is_a_difficulty_knob():
    for seed in range(10):
        level = generate_level(seed, 6, 1, 100, min_solution_moves=5)
        assert len(solve(level)) >= 5


def test_sokoban_invalid_actions_are_flagged_and_count_turns():
    for text in ("<action>Jump</action>", "Up without tags", "<action>Up, Left</action>"):
        env = make_env("sokoban", {"max_turns": 2, "include_instructions": False})
        before = env.reset(0)
        result = env.step(text)
        assert result.info.invalid_action
        assert result.reward == 0.0 and not result.done
        assert result.info.anchor == before  # nothing moved
        assert "Invalid action" in result.observation
        result = env.step(text)  # the invalid turn counted: this second one hits max_turns
        assert result.done and result.info.truncated and not result.info.success


def test_sokoban_turn_limit_truncates():
    env = make_env("sokoban", {"max_turns": 2})
    env.reset(1)
    assert not env.step("<action>Up</action>").done
    result = env.step("<action>Up</action>")
    if not result.info.success:
        assert result.done and result.info.truncated


def test_sokoban_multiple_actions_per_turn():
    env = make_env("sokoban", {"max_actions_per_turn": 20, "max_turns": 1})
    env.reset(4)
    plan = solve(env.level)
    result = env.step("<action>" + ", ".join(plan) + "</action>")
    assert result.info.success and result.reward == 10.0 and result.done


def test_sokoban_seeds_reproduce_and_differ():
    def play(seed):
        env = make_env("sokoban", {"include_instructions": False})
        seq = [env.reset(seed)]
        for move in ("Up", "Left", "Down", "Right", "Up", "Up", "Left"):
            result = env.step(_act(move))
            seq.append(result.observation)
            if result.done:
                break
        return seq

    assert play(5) == play(5)
    firsts = {play(s)[0] for s in range(10)}
    assert len(firsts) >= 8


def test_sokoban_rejects_room_too_small_for_boxes():
    with pytest.raises(ValueError, match="num_boxes"):
        make_env("sokoban", {"size": 5, "num_boxes": 4})


# ---------------------------------------------------------------- frozenlake


@pytest.mark.parametrize(
    "options",
    [{}, {"size": 8, "hole_prob": 0.35}, {"size": 4, "fixed_corners": True, "hole_prob": 0.3}],
)
def test_frozenlake_shortest_path_oracle_solves_every_seed(options):
    env = make_env("frozenlake", options)
    for seed in range(10):
        env.reset(seed)
        plan = shortest_path(env.options.size, env.holes, env.start, env.goal)
        assert plan and len(plan) >= env.options.min_solution_moves
        for i, move in enumerate(plan):
            result = env.step(_act(move))
            last = i == len(plan) - 1
            assert result.done is last and result.info.success is last
            assert result.reward == (10.0 if last else 0.0)  # a win pays 10 (ALFWorld)
        assert "√" in result.observation


def test_frozenlake_hole_ends_without_success():
    for seed in range(50):
        holes, start, _ = generate_map(seed, 4, 0.4, False)
        for move, (dr, dc) in {
            "up": (-1, 0),
            "down": (1, 0),
            "left": (0, -1),
            "right": (0, 1),
        }.items():
            if (start[0] + dr, start[1] + dc) in holes:
                env = make_env("frozenlake", {"hole_prob": 0.4})
                env.reset(seed)
                result = env.step(_act(move))
                assert result.done and not result.info.success and result.reward == 0.0
                assert result.info.extra["fell"] and "X" in result.observation
                return
    pytest.fail("no map with a hole next to the start")


def test_frozenlake_edge_penalty_charges_only_moves_into_the_edge():
    opts = {"edge_penalty": -1.0, "fixed_corners": True, "hole_prob": 0.0, "max_turns": 8}
    env = make_env("frozenlake", opts)
    env.reset(0)  # start top-left, no holes: up and left run into the edge
    for move in ("up", "left"):
        result = env.step(_act(move))
        assert result.reward == -1.0 and result.info.extra["bumped"] and not result.done
        assert env.player == (0, 0)
    result = env.step(_act("right"))  # a move that goes somewhere costs nothing
    assert result.reward == 0.0 and not result.info.extra["bumped"]
    result = env.step("<action>sideways</action>")  # invalid: not a bump, the env's own penalty
    assert result.reward == 0.0 and not result.info.extra["bumped"]
    plain = make_env("frozenlake", {**opts, "edge_penalty": 0.0})
    plain.reset(0)
    assert plain.step(_act("up")).reward == 0.0  # the default keeps the old rewards


def test_frozenlake_describe_cells_reads_the_map_out():
    env = make_env("frozenlake", {"describe_cells": True, "include_instructions": False})
    first = env.reset(3)
    grid, line = first.rsplit("\n", 1)
    assert grid == env.render()
    r, c = env.player
    assert line.startswith(f"P{r},{c} G{env.goal[0]},{env.goal[1]} ")
    for part in line.split()[2:]:  # every neighbour named with what the grid shows there
        move, what = part.split(":")
        dr, dc = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}[move]
        q = (r + dr, c + dc)
        inside = 0 <= q[0] < env.options.size and 0 <= q[1] < env.options.size
        assert what == (grid.splitlines()[q[0]][q[1]] if inside else "edge")
    result = env.step(_act("up"))
    assert result.observation.endswith(env.describe()) and result.info.anchor == env.render()
    plain = make_env("frozenlake", {"include_instructions": False})
    assert plain.reset(3) == plain.render()  # off by default: the grid alone


def test_frozenlake_invalid_and_truncation():
    env = make_env("frozenlake", {"max_turns": 2})
    first = env.reset(0)
    result = env.step("<action>north-west</action>")
    assert result.info.invalid_action and not result.done
    assert result.info.anchor in first
    result = env.step("no tag")
    assert result.info.invalid_action and result.done and result.info.truncated


def test_frozenlake_last_line_fallback():
    env = make_env("frozenlake", {"action_fallback": "last_line"})
    env.reset(0)
    plan = shortest_path(env.options.size, env.holes, env.start, env.goal)
    assert not env.step(f"thinking...\n{plan[0]}").info.invalid_action


def test_frozenlake_slippery_is_seeded():
    def play(seed):
        env = make_env(
            "frozenlake",
            {
                "slip_prob": 0.66,
                "size": 6,
                "hole_prob": 0.1,
                "max_turns": 12,
                "include_instructions": False,
            },
        )
        seq = [env.reset(seed)]
        for move in ["Down", "Right"] * 6:
            result = env.step(_act(move))
            seq.append(result.observation)
            if result.done:
                break
        return seq

    assert play(3) == play(3)
    assert len({tuple(play(s)) for s in range(6)}) >= 5


def test_frozenlake_min_moves_must_fit_the_map():
    with pytest.raises(ValueError, match="min_solution_moves"):
        make_env("frozenlake", {"size": 2, "min_solution_moves": 3})


def test_a_huge_invalid_action_is_quoted_cut_short():
    """The next observation quotes an invalid action, but never more than SHOWN_ACTION_CHARS
    of it (a 100 kB reply must not become a 100 kB observation); short ones are quoted whole."""
    from spear_ray.envs import make_env
    from spear_ray.envs.actions import SHOWN_ACTION_CHARS

    for name in ("frozenlake", "sokoban"):
        env = make_env(name, {"action_fallback": "whole_text"})
        env.reset(0)
        huge = env.step("x" * 100_000)
        assert huge.info.invalid_action
        assert len(huge.observation) < SHOWN_ACTION_CHARS + 400
        assert "(100000 characters)" in huge.observation
        env.reset(0)
        assert "'Jump'" in env.step("Jump").observation
