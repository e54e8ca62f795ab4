"""FrozenLake rendered as text (the RAGEN setting): walk from the start to the goal, avoiding holes.

Maps are generated from the seed: each cell is a hole with probability `hole_prob`, start and goal
are random distinct cells (or the two corners), and a map is kept only if BFS finds a path from
start to goal of at least `min_solution_moves` moves, so every level is solvable. With
`slip_prob` > 0 a move goes sideways with that probability (half each way), drawn from an RNG
seeded by the episode seed, so a seed and an action sequence always give the same episode.

Symbols: _ frozen, O hole, G goal, P you, X you in a hole, √ you on the goal.
Actions: Up, Down, Left, Right (case-insensitive; U/D/L/R also accepted). Walking off the edge
is a valid move that changes nothing (it pays `edge_penalty`, default 0). Reward: `goal_reward`
on reaching the goal, else 0;
falling into a hole ends the episode without success.
"""

from __future__ import annotations

import random
from collections import deque

from pydantic import Field, model_validator

from spear_ray.envs.actions import (
    GRID_MOVES,
    StopAtActionTag,
    TurnOptions,
    extract_action,
    format_hint,
    parse_grid_move,
    shown_action,
)
from spear_ray.envs.base import EnvError, EnvInfo, StepResult

ENV_NAME = "frozenlake"
DESCRIPTION = "FrozenLake grid walk as text; seeded solvable maps, optional slipping; goal = +1."

Pos = tuple[int, int]
_SIDEWAYS = {
    "up": ("left", "right"),
    "down": ("left", "right"),
    "left": ("up", "down"),
    "right": ("up", "down"),
}


class FrozenLakeOptions(TurnOptions):
    max_turns: int = Field(20, ge=1, description="Episode ends (truncated) after this many turns.")
    size: int = Field(4, ge=2, le=32, description="Map height and width in cells.")
    hole_prob: float = Field(
        0.2, ge=0.0, le=0.8, description="Chance that a cell is a hole (map difficulty)."
    )
    fixed_corners: bool = Field(
        False, description="Start top-left and goal bottom-right (gymnasium's layout)."
    )
    min_solution_moves: int = Field(
        3, ge=0, description="Reject maps whose shortest path is shorter than this many moves."
    )
    slip_prob: float = Field(
        0.0, ge=0.0, le=1.0, description="Chance a move goes sideways (gymnasium slippery = 2/3)."
    )
    describe_cells: bool = Field(
        False,
        description="Follow every grid with a line naming your cell, the goal's and what lies "
        "next to you (`P1,2 G3,3 up:O down:_ left:_ right:edge`): the map read out, so a small "
        "model need not count characters inside its tokens to know where it is.",
    )
    edge_penalty: float = Field(
        0.0,
        description="Reward added when a move runs into the edge and changes nothing (e.g. -1: "
        "a wasted turn costs something; without it RL at temperature 1 learns edge bumps as a "
        "safe way not to fall, and the greedy policy then loops until the turn limit).",
    )
    goal_reward: float = Field(
        10.0,
        description="Reward on reaching the goal (10, as the agent recipe's ALFWorld pays a win: "
        "the tool-call bonus, at most 1, stays a tenth of it).",
    )

    @model_validator(mode="after")
    def _path_fits(self) -> FrozenLakeOptions:
        if self.min_solution_moves > 2 * (self.size - 1):
            raise ValueError(
                f"frozenlake min_solution_moves={self.min_solution_moves} exceeds the longest"
                f" corner-to-corner path of a {self.size}x{self.size} map: lower it or raise size"
            )
        return self


OPTIONS_MODEL = FrozenLakeOptions


def shortest_path(size: int, holes: frozenset[Pos], start: Pos, goal: Pos) -> list[str] | None:
    """The moves of a shortest hole-free path from start to goal (BFS), or None."""
    parent: dict[Pos, tuple[Pos, str] | None] = {start: None}
    queue = deque([start])
    while queue:
        p = queue.popleft()
        if p == goal:
            path = []
            while parent[p] is not None:
                p, move = parent[p]
                path.append(move)
            return path[::-1]
        for move, (dr, dc) in GRID_MOVES.items():
            q = (p[0] + dr, p[1] + dc)
            if 0 <= q[0] < size and 0 <= q[1] < size and q not in holes and q not in parent:
                parent[q] = (p, move)
                queue.append(q)
    return None


def generate_map(
    seed: int, size: int, hole_prob: float, fixed_corners: bool, min_solution_moves: int = 0
) -> tuple[frozenset[Pos], Pos, Pos]:
    """(holes, start, goal) from `seed`, with a guaranteed path from start to goal."""
    rng = random.Random(f"frozenlake:{seed}:{size}:{hole_prob}:{fixed_corners}")
    min_moves = min(min_solution_moves, 2 * (size - 1))
    cells = [(r, c) for r in range(size) for c in range(size)]
    for _ in range(10_000):
        if fixed_corners:
            start, goal = (0, 0), (size - 1, size - 1)
        else:
            start, goal = rng.sample(cells, 2)
        holes = frozenset(p for p in cells if p not in (start, goal) and rng.random() < hole_prob)
        path = shortest_path(size, holes, start, goal)
        if path is not None and len(path) >= min_moves:
            return holes, start, goal
    raise EnvError(f"frozenlake: no solvable map for seed {seed} (size {size}, p={hole_prob})")


class FrozenLakeEnv(StopAtActionTag):
    """FrozenLake as a multi-turn text env; `reset(seed)` picks the map."""

    def __init__(self, options: FrozenLakeOptions | None = None):
        self.options = options or FrozenLakeOptions()
        self.holes: frozenset[Pos] = frozenset()
        self.start: Pos = (0, 0)
        self.goal: Pos = (0, 0)
        self.player: Pos = (0, 0)
        self.turns = 0
        self.done = True
        self._rng = random.Random(0)

    def cell(self, p: Pos) -> str:
        """The symbol the grid shows at cell p (module docstring)."""
        if p == self.player:
            return "X" if p in self.holes else ("√" if p == self.goal else "P")
        return "O" if p in self.holes else ("G" if p == self.goal else "_")

    def render(self) -> str:
        n = self.options.size
        return "\n".join("".join(self.cell((r, c)) for c in range(n)) for r in range(n))

    def describe(self) -> str:
        """`P<r>,<c> G<r>,<c> up:<x> down:<x> left:<x> right:<x>`, x the neighbour's symbol or
        `edge`."""
        n = self.options.size
        near = []
        for move, (dr, dc) in GRID_MOVES.items():
            q = (self.player[0] + dr, self.player[1] + dc)
            inside = 0 <= q[0] < n and 0 <= q[1] < n
            near.append(f"{move}:{self.cell(q) if inside else 'edge'}")
        p, g = self.player, self.goal
        return f"P{p[0]},{p[1]} G{g[0]},{g[1]} " + " ".join(near)

    def view(self) -> str:
        """The grid, and with describe_cells its read-out line."""
        grid = self.render()
        return f"{grid}\n{self.describe()}" if self.options.describe_cells else grid

    def instructions(self) -> str:
        o = self.options
        slip = " The ice is slippery: a move may go sideways." if o.slip_prob > 0 else ""
        return (
            "You are playing FrozenLake. Walk to the goal G without falling into a hole O.\n"
            "Symbols: _ frozen, O hole, G goal, P you, X you in a hole, √ you on the goal.\n"
            f"Moves: Up, Down, Left, Right.{slip} {format_hint(o.action_tag)}"
            f" You have {o.max_turns} turns."
        )

    def reset(self, seed: int) -> str:
        o = self.options
        self.holes, self.start, self.goal = generate_map(
            seed, o.size, o.hole_prob, o.fixed_corners, o.min_solution_moves
        )
        self.player = self.start
        self.turns = 0
        self.done = False
        self._rng = random.Random(f"frozenlake-slip:{seed}")
        grid = self.view()
        return f"{self.instructions()}\n\n{grid}" if o.include_instructions else grid

    def step(self, action_text: str) -> StepResult:
        if self.done:
            raise EnvError("frozenlake: step() called before reset() or after the episode ended")
        o = self.options
        self.turns += 1
        action = extract_action(action_text, o.action_tag, o.action_fallback)
        move = parse_grid_move(action)
        bumped = False
        if move is not None:
            if o.slip_prob > 0 and self._rng.random() < o.slip_prob:
                move = self._rng.choice(_SIDEWAYS[move])
            dr, dc = GRID_MOVES[move]
            r, c = self.player[0] + dr, self.player[1] + dc
            if 0 <= r < o.size and 0 <= c < o.size:
                self.player = (r, c)
            else:
                bumped = True
        success = self.player == self.goal
        fell = self.player in self.holes
        truncated = not (success or fell) and self.turns >= o.max_turns
        self.done = success or fell or truncated
        grid = self.view()
        obs = grid
        if move is None:
            obs = (
                f"Invalid action {shown_action(action)}: expected one of Up, Down, Left, Right"
                f" inside <{o.action_tag}></{o.action_tag}>.\n{grid}"
            )
        elif fell:
            obs = f"You fell into a hole.\n{grid}"
        info = EnvInfo(
            success=success,
            invalid_action=move is None,
            tool_call=True,  # agent envs: every env step counts toward r_tc (the reference counts
            # episode_lengths, invalid steps too; each of those also pays the -0.1 penalty)
            anchor=self.render(),
            truncated=truncated,
            extra={"turn": self.turns, "action": action, "fell": fell, "bumped": bumped},
        )
        reward = (o.goal_reward if success else 0.0) + (o.edge_penalty if bumped else 0.0)
        return StepResult(obs, reward, self.done, info)

    def close(self) -> None:
        self.done = True


def make(options: FrozenLakeOptions) -> FrozenLakeEnv:
    return FrozenLakeEnv(options)
