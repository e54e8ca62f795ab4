"""Any gymnasium env with text observations, as a TextEnv (env name "gym").

`env_id` names either a gymnasium id (`gymnasium.make(env_id, **env_config)`) or an env
registered with `ray.tune.registry.register_env(name, creator)` (then `creator(EnvContext(
env_config))`); `source` says which registry to look in ("auto": gymnasium first, then Ray).
ray and gymnasium are imported only when the adapter is built.

Action: the text extracted from the model's turn (last <action> tag, see
spear_ray.envs.actions) is turned into an action of the env's action space:
- Text: the string itself; Discrete(n, start): an integer, or a name from `action_names`
  (case-insensitive; the i-th name is action start+i); any other space: the string parsed as
  JSON. An action the space does not contain is an invalid action and the env is not stepped.
Observation: a str observation is passed through; anything else is an error unless
`stringify_observations` (then str(obs)). `done` = terminated or truncated or the turn limit.
Success: `info[success_key]` when the env reports it, else episode return >= `success_return`
when that is set, else False.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field

from spear_ray.envs.actions import (
    StopAtActionTag,
    TurnOptions,
    extract_action,
    format_hint,
    shown_action,
)
from spear_ray.envs.base import EnvError, EnvInfo, StepResult

ENV_NAME = "gym"
DESCRIPTION = "Adapter for gymnasium envs with text observations (gymnasium id or Ray env name)."


class GymOptions(TurnOptions):
    max_turns: int = Field(50, ge=1, description="Episode ends (truncated) after this many turns.")
    env_id: str = Field("", description="gymnasium id or ray.tune.registry env name (required).")
    source: Literal["auto", "gymnasium", "ray"] = Field(
        "auto", description="Registry to find env_id in; auto = gymnasium, then Ray."
    )
    env_config: dict[str, Any] = Field(
        default_factory=dict, description="Keyword args for gymnasium.make / the Ray creator."
    )
    action_names: tuple[str, ...] = Field(
        (), description="Names of Discrete actions in order (accepted besides integers)."
    )
    stringify_observations: bool = Field(
        False, description="Accept non-str observations by showing str(obs)."
    )
    success_key: str = Field("success", description="info key that reports success, if any.")
    success_return: float | None = Field(
        None, description="Without success_key: success when the episode return reaches this."
    )
    instructions: str = Field("", description="Text put before the first observation.")


OPTIONS_MODEL = GymOptions


def _from_ray(name: str, config: dict[str, Any]) -> Any | None:
    try:
        from ray.tune.registry import ENV_CREATOR, _global_registry
    except ImportError:
        return None
    if not _global_registry.contains(ENV_CREATOR, name):
        return None
    creator = _global_registry.get(ENV_CREATOR, name)
    try:
        from ray.rllib.env.env_context import EnvContext

        ctx: Any = EnvContext(dict(config), worker_index=0)
    except ImportError:
        ctx = dict(config)
    return creator(ctx)


def _from_gymnasium(name: str, config: dict[str, Any]) -> Any | None:
    import gymnasium

    if name not in gymnasium.registry:
        return None
    return gymnasium.make(name, **config)


def build_gym_env(o: GymOptions) -> Any:
    if not o.env_id:
        raise ValueError("gym env needs options.env_id (a gymnasium id or a Ray env name)")
    finders = {
        "gymnasium": (_from_gymnasium,),
        "ray": (_from_ray,),
        "auto": (_from_gymnasium, _from_ray),
    }[o.source]
    for find in finders:
        env = find(o.env_id, dict(o.env_config))
        if env is not None:
            return env
    where = {
        "auto": "gymnasium or ray.tune.registry",
        "gymnasium": "gymnasium",
        "ray": "ray.tune.registry",
    }[o.source]
    raise ValueError(f"gym env_id {o.env_id!r} is not registered in {where}")


class GymTextEnv(StopAtActionTag):
    """Wraps one gymnasium.Env; `reset(seed)` calls `env.reset(seed=seed)`."""

    def __init__(self, options: GymOptions, env: Any | None = None):
        self.options = options
        self.env = env if env is not None else build_gym_env(options)
        self.turns = 0
        self.episode_return = 0.0
        self.done = True
        self.last_text = ""

    def _text(self, obs: Any) -> str:
        if isinstance(obs, str):
            return obs
        if self.options.stringify_observations:
            return str(obs)
        raise EnvError(
            f"gym env {self.options.env_id!r} returned a {type(obs).__name__} observation, not"
            " text; set stringify_observations=true to show str(obs)"
        )

    def to_action(self, text: str | None) -> Any | None:
        """The env action for an extracted action string, or None if it is not valid."""
        if text is None:
            return None
        from gymnasium import spaces

        space = self.env.action_space
        action: Any
        if isinstance(space, spaces.Text):
            action = text
        elif isinstance(space, spaces.Discrete):
            names = [n.lower() for n in self.options.action_names]
            word = text.strip().lower()
            if word in names:
                action = int(space.start) + names.index(word)
            else:
                try:
                    action = int(word)
                except ValueError:
                    return None
        else:
            try:
                action = json.loads(text)
            except (ValueError, RecursionError):  # bad JSON, a >4300-digit number, deep nesting
                return None
        try:
            return action if space.contains(action) else None
        except Exception:  # contains() may raise on a wrongly-shaped value
            return None

    def reset(self, seed: int) -> str:
        obs, _ = self.env.reset(seed=seed)
        self.turns = 0
        self.episode_return = 0.0
        self.done = False
        text = self.last_text = self._text(obs)
        o = self.options
        if o.include_instructions:
            head = o.instructions or f"{format_hint(o.action_tag)}"
            return f"{head}\n\n{text}"
        return text

    def step(self, action_text: str) -> StepResult:
        if self.done:
            raise EnvError("gym: step() called before reset() or after the episode ended")
        o = self.options
        self.turns += 1
        extracted = extract_action(action_text, o.action_tag, o.action_fallback)
        action = self.to_action(extracted)
        if action is None:
            truncated = self.turns >= o.max_turns
            self.done = truncated
            obs = (
                f"Invalid action {shown_action(extracted)} for action space "
                f"{self.env.action_space}.\n{self.last_text}"
            )
            info = EnvInfo(
                invalid_action=True,
                truncated=truncated,
                anchor=self.last_text,
                extra={"turn": self.turns, "action": extracted},
            )
            return StepResult(obs, 0.0, truncated, info)
        obs, reward, terminated, env_truncated, env_info = self.env.step(action)
        reward = float(reward)
        self.episode_return += reward
        text = self.last_text = self._text(obs)
        limit = self.turns >= o.max_turns
        self.done = bool(terminated or env_truncated or limit)
        if o.success_key in env_info:
            success = bool(env_info[o.success_key])
        elif o.success_return is not None:
            success = bool(terminated) and self.episode_return >= o.success_return
        else:
            success = False
        info = EnvInfo(
            success=success,
            tool_call=True,  # agent envs: every env step counts toward r_tc (docs/algorithm.md §6)
            anchor=text,
            truncated=bool(env_truncated or limit) and not terminated,
            extra={"turn": self.turns, "action": extracted, "env_info": dict(env_info)},
        )
        return StepResult(text, reward, self.done, info)

    def close(self) -> None:
        self.done = True
        self.env.close()


def make(options: GymOptions, env: Any | None = None) -> GymTextEnv:
    return GymTextEnv(options, env)
