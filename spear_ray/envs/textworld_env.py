"""TextWorld cooking games: the long-horizon, sparse-reward stand-in for ALFWorld.

Games come from TextWorld's bundled generator (`tw-cooking`, the First TextWorld Problems
family), generated offline once and cached on disk:

    {cache_dir}/{settings key}/{train|eval}/{index:05d}.z8 (+ .json)

Game i of a set depends only on the settings, the set and i, so a larger set reuses the smaller
one's files. Train games draw their food from tw-cooking's "train" split and eval games from
`eval_food_split` (unseen foods), with disjoint seeds. Missing games are generated in parallel in
a process pool (progress on stderr) under a file lock, so rollout workers that start together
generate each game once. `prepare_games(options)` does this ahead of time.

`reset(seed)` plays a game from its start: with split=train (eval) game `seed % num_games` of that
set; with split=auto (default) seeds below `eval_seed_start` play train game
`seed % num_train_games` and seeds from it on play eval game
`(seed - eval_seed_start) % num_eval_games`. `eval_seed_start` is the config's
`env.eval_seed_start`, passed to `make` by the caller (one source of truth). The env finds or
generates its set(s) when built.
The observation is the game's text, optionally followed by the admissible commands. The action
is the content of the last <action> tag (see spear_ray.envs.actions). Reward: `win_reward` when
the game is won (sparse), else 0; a lost game ends the episode without success. The anchor
(GiGPO) is the room description plus the inventory, which identify the state better than the
feedback line.

textworld is imported inside the functions that use it, so `import spear_ray.envs` stays fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sys
import threading
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from spear_ray.envs.actions import StopAtActionTag, TurnOptions, extract_action, format_hint
from spear_ray.envs.base import EnvError, EnvInfo, StepResult

ENV_NAME = "textworld"
DESCRIPTION = "TextWorld cooking games (tw-cooking), cached seeded train/eval sets; win = +1."

DEFAULT_CACHE_DIR = "~/.cache/spear_ray/textworld"


class TextWorldOptions(TurnOptions):
    max_turns: int = Field(50, ge=1, description="Episode ends (truncated) after this many turns.")
    split: Literal["auto", "train", "eval"] = Field(
        "auto", description="Game set reset() plays; auto = eval for seeds >= env.eval_seed_start."
    )
    num_train_games: int = Field(100, ge=1, description="Size of the train game set.")
    num_eval_games: int = Field(20, ge=1, description="Size of the eval game set.")
    eval_food_split: Literal["valid", "test"] = Field(
        "valid", description="tw-cooking food split of the eval games (unseen in train)."
    )
    game_seed: int = Field(0, ge=0, description="Base seed of both game sets.")
    recipe: int = Field(2, ge=1, le=5, description="Ingredients in the recipe.")
    take: int = Field(2, ge=0, le=5, description="Ingredients to find (<= recipe).")
    go: Literal[1, 6, 9, 12] = Field(6, description="Rooms in the house.")
    open: bool = Field(True, description="Containers and doors must be opened.")
    cook: bool = Field(True, description="Some ingredients must be cooked.")
    cut: bool = Field(True, description="Some ingredients must be cut.")
    drop: bool = Field(False, description="Inventory has limited capacity.")
    cache_dir: str = Field(DEFAULT_CACHE_DIR, description="Where generated games are cached.")
    generate_missing: bool = Field(
        True, description="Generate missing games on first use (False = error if not cached)."
    )
    gen_workers: int = Field(
        0, ge=0, description="Processes generating games; 0 = one per CPU core."
    )
    admissible_commands: bool = Field(
        True, description="List the admissible commands after each observation."
    )
    inadmissible_is_invalid: bool = Field(
        False, description="Flag a command outside the admissible list as an invalid action."
    )
    win_reward: float = Field(
        10.0,
        description="Reward when the game is won (10, as ALFWorld pays a win in the agent "
        "recipe: the tool-call bonus, at most 1, stays a tenth of it).",
    )

    @model_validator(mode="after")
    def _take_fits(self) -> TextWorldOptions:
        if self.take > self.recipe:
            raise ValueError(f"textworld take={self.take} exceeds recipe={self.recipe}: lower take")
        return self


OPTIONS_MODEL = TextWorldOptions


# ---------------------------------------------------------------- game sets on disk


def game_settings(o: TextWorldOptions) -> dict[str, Any]:
    return {
        "recipe": o.recipe,
        "take": o.take,
        "go": o.go,
        "open": o.open,
        "cook": o.cook,
        "cut": o.cut,
        "drop": o.drop,
        "recipe_seed": 0,
    }


def settings_key(o: TextWorldOptions) -> str:
    s = game_settings(o)
    skills = "".join(k[0] for k in ("open", "cook", "cut", "drop") if s[k])
    digest = hashlib.sha256(
        json.dumps({**s, "game_seed": o.game_seed, "version": 1}, sort_keys=True).encode()
    ).hexdigest()[:8]
    return f"cooking-r{o.recipe}t{o.take}g{o.go}{skills}-s{o.game_seed}-{digest}"


def set_dir(o: TextWorldOptions, which: Literal["train", "eval"]) -> Path:
    return Path(o.cache_dir).expanduser() / settings_key(o) / which


def game_seed_for(o: TextWorldOptions, which: str, index: int, attempt: int = 0) -> int:
    h = hashlib.sha256(f"{which}:{o.game_seed}:{index}:{attempt}".encode()).hexdigest()
    return int(h[:8], 16) % (2**31 - 1)


def game_paths(o: TextWorldOptions, which: Literal["train", "eval"]) -> list[Path]:
    n = o.num_train_games if which == "train" else o.num_eval_games
    d = set_dir(o, which)
    return [d / f"{i:05d}.z8" for i in range(n)]


def _make_one_game(settings: dict[str, Any], seeds: list[int], out: str) -> str:
    """Generate one game into `out` (.z8 + .json), atomically. Runs in a pool process."""
    import textworld
    from textworld.challenges.tw_cooking import cooking

    out_path = Path(out)
    tmp = out_path.with_name(f".tmp-{out_path.stem}-{os.getpid()}")
    last_error: Exception | None = None
    for seed in seeds:  # a seed whose quest cannot be generated falls back to the next
        opts = textworld.GameOptions()
        opts.seeds = seed
        opts.path = str(tmp) + ".z8"
        opts.file_ext = ".z8"
        opts.force_recompile = True
        try:
            with warnings.catch_warnings():  # jericho's "not fully supported" on every game
                warnings.simplefilter("ignore")
                game = cooking.make(dict(settings), opts)
                textworld.generator.compile_game(game, opts)
        except Exception as e:  # textworld's QuestGenerationError and friends
            last_error = e
            continue
        os.replace(str(tmp) + ".json", out_path.with_suffix(".json"))
        os.replace(str(tmp) + ".z8", out_path)  # the .z8 last: its presence means "done"
        with contextlib.suppress(FileNotFoundError):
            os.remove(str(tmp) + ".ni")
        return out
    raise RuntimeError(f"textworld: could not generate {out} with seeds {seeds}: {last_error}")


@contextlib.contextmanager
def _locked(directory: Path):
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_games(o: TextWorldOptions, which: Literal["train", "eval"]) -> list[Path]:
    """The game files of a set, generating the missing ones (in parallel) if allowed."""
    paths = game_paths(o, which)
    if all(p.exists() for p in paths):
        return paths
    d = set_dir(o, which)
    if not o.generate_missing:
        missing = sum(not p.exists() for p in paths)
        raise EnvError(
            f"textworld: {missing} of {len(paths)} {which} games missing in {d} and"
            " generate_missing=false; run spear_ray.envs.textworld_env.prepare_games"
        )
    with _locked(d):
        todo = [(i, p) for i, p in enumerate(paths) if not p.exists()]
        if not todo:
            return paths
        settings = {**game_settings(o), "split": "train" if which == "train" else o.eval_food_split}
        workers = min(o.gen_workers or os.cpu_count() or 1, len(todo))
        t0 = time.monotonic()
        last = [t0]
        print(
            f"[textworld] generating {len(todo)} {which} games into {d} with {workers} processes",
            file=sys.stderr,
            flush=True,
        )
        jobs = [
            (settings, [game_seed_for(o, which, i, a) for a in range(3)], str(p)) for i, p in todo
        ]
        if workers == 1:
            for k, job in enumerate(jobs, 1):
                _make_one_game(*job)
                _progress(k, len(jobs), t0, last)
        else:
            import multiprocessing as mp

            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
                futures = [pool.submit(_make_one_game, *job) for job in jobs]
                for k, fut in enumerate(as_completed(futures), 1):
                    fut.result()
                    _progress(k, len(jobs), t0, last)
    return paths


def _progress(done: int, total: int, t0: float, last: list[float]) -> None:
    """A progress line at most every 10 s and at the end (plain lines: Ray logs show them)."""
    now = time.monotonic()
    if done == total or now - last[0] >= 10.0:
        last[0] = now
        print(f"[textworld] {done}/{total} games, {now - t0:.0f}s", file=sys.stderr, flush=True)


def prepare_games(options: TextWorldOptions | dict | None = None) -> dict[str, list[Path]]:
    """Generate (or find) both game sets now, e.g. on the driver before rollout workers start."""
    o = options if isinstance(options, TextWorldOptions) else TextWorldOptions(**(options or {}))
    return {which: ensure_games(o, which) for which in ("train", "eval")}


# ---------------------------------------------------------------- the env

_PROMPT_LINE = re.compile(r"^\s*>.*$", re.MULTILINE)


# TextWorld parses game logic with a module-level tatsu parser that is not thread-safe: two envs
# starting, resetting or stepping at once in one process (a rollout worker runs its envs on
# threads) corrupt its stacks ("IndexError: pop from empty list" in tatsu/contexts.py). Every call
# into textworld holds this lock; a call takes milliseconds, so serialising them costs little.
_TEXTWORLD_LOCK = threading.RLock()


def clean_feedback(text: str) -> str:
    """The game's reply without its '>' prompt/status lines and extra blank lines."""
    text = _PROMPT_LINE.sub("", text)
    text = re.sub(r"\n\s*\n(\s*\n)+", "\n\n", text)
    return text.strip()


class TextWorldEnv(StopAtActionTag):
    """A TextWorld cooking game as a multi-turn text env."""

    def __init__(self, options: TextWorldOptions | None = None, eval_seed_start: int = 1_000_000):
        self.options = options or TextWorldOptions()
        # The config's env.eval_seed_start (one source of truth), passed in by make_env's caller.
        self.eval_seed_start = eval_seed_start
        self._sets: dict[str, list[Path]] = {}
        for which in ("train", "eval"):  # generate (or find) up front, not mid-training
            if self.options.split in (which, "auto"):
                self.games_for(which)
        self._game_env: Any = None
        self._game_file: Path | None = None
        self.state: Any = None
        self.walkthrough: list[str] = []
        self.turns = 0
        self.done = True

    def games_for(self, which: Literal["train", "eval"]) -> list[Path]:
        if which not in self._sets:
            self._sets[which] = ensure_games(self.options, which)
        return self._sets[which]

    def game_for_seed(self, seed: int) -> Path:
        o = self.options
        which = o.split
        if which == "auto":
            which = "eval" if seed >= self.eval_seed_start else "train"
        if which == "eval" and o.split == "auto":
            seed -= self.eval_seed_start
        games = self.games_for(which)
        return games[seed % len(games)]

    def _request_infos(self):
        import textworld

        return textworld.EnvInfos(
            admissible_commands=True,
            won=True,
            lost=True,
            description=True,
            inventory=True,
            objective=True,
            extras=["walkthrough"],
        )

    def _open(self, game_file: Path) -> None:
        import textworld

        if self._game_env is not None and self._game_file == game_file:
            return
        self._close_game()
        with _TEXTWORLD_LOCK, warnings.catch_warnings():  # jericho: "not fully supported"
            warnings.simplefilter("ignore")
            self._game_env = textworld.start(str(game_file), request_infos=self._request_infos())
        self._game_file = game_file

    def _close_game(self) -> None:
        if self._game_env is not None:
            with _TEXTWORLD_LOCK:
                self._game_env.close()
        self._game_env = None
        self._game_file = None

    def _commands(self) -> list[str]:
        return sorted(c for c in (self.state["admissible_commands"] or []) if c)

    def _with_commands(self, text: str) -> str:
        if not self.options.admissible_commands:
            return text
        return f"{text}\n\nAdmissible commands: {', '.join(self._commands())}"

    def _anchor(self) -> str:
        return f"{self.state['description'] or ''}\n{self.state['inventory'] or ''}".strip()

    def instructions(self) -> str:
        o = self.options
        return (
            "You are playing a text adventure. Type commands such as 'go north', 'open fridge',"
            " 'take apple', 'examine cookbook'. "
            f"{format_hint(o.action_tag)} You have {o.max_turns} turns."
        )

    def reset(self, seed: int) -> str:
        self._open(self.game_for_seed(seed))
        with _TEXTWORLD_LOCK:
            self.state = self._game_env.reset()
        self.walkthrough = list(self.state.get("extra.walkthrough") or [])
        self.turns = 0
        self.done = False
        body = f"{self.state['objective']}\n\n{clean_feedback(self.state['description'] or '')}"
        if self.options.include_instructions:
            body = f"{self.instructions()}\n\n{body}"
        return self._with_commands(body)

    def step(self, action_text: str) -> StepResult:
        if self.done or self._game_env is None:
            raise EnvError("textworld: step() called before reset() or after the episode ended")
        o = self.options
        self.turns += 1
        command = extract_action(action_text, o.action_tag, o.action_fallback)
        if command is not None:
            command = " ".join(command.lower().rstrip(".!").split())
        invalid = not command
        won = lost = False
        if invalid:
            feedback = (
                f"Invalid action: write one command inside <{o.action_tag}></{o.action_tag}>."
            )
        else:
            admissible = command in self._commands()
            invalid = o.inadmissible_is_invalid and not admissible
            with _TEXTWORLD_LOCK:
                self.state, _, _ = self._game_env.step(command)
            feedback = clean_feedback(self.state.feedback or "")
            won, lost = bool(self.state["won"]), bool(self.state["lost"])
        truncated = not (won or lost) and self.turns >= o.max_turns
        self.done = won or lost or truncated
        info = EnvInfo(
            success=won,
            invalid_action=invalid,
            tool_call=True,  # agent envs: every env step counts toward r_tc (the reference counts
            # episode_lengths, invalid steps too; each of those also pays the -0.1 penalty)
            anchor=self._anchor(),
            truncated=truncated,
            extra={"turn": self.turns, "action": command, "lost": lost},
        )
        obs = feedback if self.done else self._with_commands(feedback)
        return StepResult(obs, o.win_reward if won else 0.0, self.done, info)

    def close(self) -> None:
        self._close_game()
        self.done = True


def make(options: TextWorldOptions, eval_seed_start: int = 1_000_000) -> TextWorldEnv:
    return TextWorldEnv(options, eval_seed_start=eval_seed_start)


if __name__ == "__main__":  # python -m spear_ray.envs.textworld_env '{"num_train_games": 8}'
    opts = TextWorldOptions(**json.loads(sys.argv[1])) if len(sys.argv) > 1 else None
    for which, files in prepare_games(opts).items():
        print(f"{which}: {len(files)} games in {files[0].parent}")
