"""Environment throughput: env steps per second under a scripted random-valid policy.

    .venv/bin/python benchmarks/envs.py [--seconds 3] [--envs sokoban,frozenlake,...]

Each env is driven for about `--seconds` seconds by a policy that always sends a valid action
(random moves for the grid games, random admissible commands for textworld, a short program
then a \\boxed{} answer for python_math, random moves through the gym adapter), resetting with
a new seed when an episode ends. Per env it prints steps/s and resets/s (a reset includes level
generation / game loading). textworld plays small cached games (generated on the first run,
default cache dir). python_math needs the sandbox (bubblewrap); it is skipped with a note when
the sandbox cannot start. The last line is JSON: {"<env>": {"steps_per_s", "resets_per_s",
"steps", "episodes"}, ...}.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections.abc import Callable
from typing import Any

from spear_ray.envs import make_env

MOVES = ("Up", "Down", "Left", "Right")


def drive(env: Any, policy: Callable[[Any, random.Random], str], seconds: float) -> dict:
    rng = random.Random(0)
    steps = episodes = 0
    reset_s = step_s = 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        env.reset(episodes)
        reset_s += time.perf_counter() - t0
        episodes += 1
        done = False
        while not done and time.perf_counter() < t_end:
            action = policy(env, rng)
            t0 = time.perf_counter()
            result = env.step(action)
            step_s += time.perf_counter() - t0
            assert not result.info.invalid_action, result.observation
            steps += 1
            done = result.done
    env.close()
    return {
        "steps_per_s": round(steps / step_s, 1) if step_s else 0.0,
        "resets_per_s": round(episodes / reset_s, 1) if reset_s else 0.0,
        "steps": steps,
        "episodes": episodes,
    }


def grid_policy(env: Any, rng: random.Random) -> str:
    return f"<action>{rng.choice(MOVES)}</action>"


def textworld_policy(env: Any, rng: random.Random) -> str:
    return f"<action>{rng.choice(env._commands())}</action>"


def math_policy(env: Any, rng: random.Random) -> str:
    if env.turns < 2:
        return f"<code>print(sum(i * i for i in range({rng.randint(10, 1000)})))</code>"
    return "The answer is \\boxed{42}."


def gym_policy(env: Any, rng: random.Random) -> str:
    return f"<action>{rng.choice(['left', 'down', 'right', 'up'])}</action>"


def build(name: str) -> tuple[Any, Callable] | str:
    """(env, policy), or a string saying why the env is skipped."""
    if name == "sokoban":
        return make_env("sokoban", {"size": 6, "num_boxes": 1}), grid_policy
    if name == "frozenlake":
        return make_env("frozenlake", {"size": 4}), grid_policy
    if name == "textworld":
        opts = {"num_train_games": 4, "recipe": 2, "take": 2, "go": 6}
        return make_env("textworld", opts), textworld_policy
    if name == "python_math":
        try:
            from spear_ray.sandbox import SandboxClient, SandboxConfig

            sandbox = SandboxClient(SandboxConfig())
            sandbox.start()
        except Exception as e:  # no bubblewrap etc.: report and go on
            return f"sandbox unavailable: {type(e).__name__}: {e}"
        return make_env("python_math", {}, sandbox=sandbox), math_policy
    if name == "gym":
        opts = {
            "env_id": "FrozenLake-v1",
            "stringify_observations": True,
            "env_config": {"is_slippery": False},
            "action_names": ["left", "down", "right", "up"],
        }
        return make_env("gym", opts), gym_policy
    raise SystemExit(f"unknown env {name!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--envs", default="sokoban,frozenlake,textworld,python_math,gym")
    args = parser.parse_args()
    results: dict[str, Any] = {}
    for name in args.envs.split(","):
        built = build(name)
        if isinstance(built, str):
            print(f"{name:12s} skipped: {built}", flush=True)
            results[name] = {"skipped": built}
            continue
        env, policy = built
        r = drive(env, policy, args.seconds)
        results[name] = r
        print(
            f"{name:12s} {r['steps_per_s']:>10.1f} steps/s {r['resets_per_s']:>10.1f} resets/s"
            f"  ({r['steps']} steps, {r['episodes']} episodes)",
            flush=True,
        )
    sys.stdout.flush()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
