"""Multi-turn text environments and their registry.

    from spear_ray.envs import make_env
    env = make_env("sokoban", {"size": 6, "num_boxes": 1})
    obs = env.reset(seed=0)
    result = env.step("<action>Up</action>")

Built-in names: python_math, textworld, sokoban, frozenlake, gym (see each module's docstring).
"""

from spear_ray.envs.base import EnvError, EnvInfo, StepResult, TextEnv
from spear_ray.envs.registry import (
    env_description,
    env_options_model,
    known_envs,
    make_env,
    register_env,
    validate_env_options,
)

__all__ = [
    "EnvError",
    "EnvInfo",
    "StepResult",
    "TextEnv",
    "env_description",
    "env_options_model",
    "known_envs",
    "make_env",
    "register_env",
    "validate_env_options",
]
