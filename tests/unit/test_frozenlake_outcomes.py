"""scripts/frozenlake_outcomes.py: its env wrapper counts endings and edge bumps."""

from __future__ import annotations

import collections
import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "frozenlake_outcomes.py"


def _script():
    spec = importlib.util.spec_from_file_location("frozenlake_outcomes", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_wrapper_counts_bumps_and_how_episodes_end():
    counts: collections.Counter = collections.Counter()
    make = _script().counting_make_env(counts)
    opts = {"fixed_corners": True, "hole_prob": 0.0, "max_turns": 3}
    env = make("frozenlake", opts)
    env.reset(0)
    for move in ("Up", "Left", "Right"):  # two bumps, then out of turns
        env.step(f"<action>{move}</action>")
    won = make("frozenlake", {**opts, "size": 2, "min_solution_moves": 2})
    won.reset(0)
    won.step("<action>Right</action>")
    won.step("<action>Down</action>")
    assert counts == {"moves": 5, "edge_bumps": 2, "out_of_turns": 1, "success": 1}
