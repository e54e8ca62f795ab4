"""Environments by name.

    register_env(name, factory, options_model, description)
    make_env(name, options, **runtime_deps) -> TextEnv
    known_envs() -> tuple of names
    env_options_model(name) -> the env's frozen pydantic options model
    env_description(name) -> its one-line description

`factory(options, **runtime_deps)` gets the validated options object and whatever objects the
caller supplies that cannot live in a config (e.g. `sandbox=` for python_math, `env=` a ready
gymnasium env for gym). Deps a factory's signature does not name are not passed to it, so a
rollout worker can hand every env the same deps. The built-in
envs register themselves when this module is imported; their modules import only pydantic and
the standard library at module level, so this stays fast.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from spear_ray.envs.base import TextEnv


@dataclass(frozen=True)
class EnvSpec:
    name: str
    factory: Callable[..., TextEnv]
    options_model: type[BaseModel]
    description: str


_REGISTRY: dict[str, EnvSpec] = {}


def register_env(
    name: str,
    factory: Callable[..., TextEnv],
    options_model: type[BaseModel],
    description: str,
    *,
    overwrite: bool = False,
) -> None:
    """Make `name` known to make_env. Re-registering a name needs overwrite=True."""
    if not name or not isinstance(name, str):
        raise ValueError(f"env name must be a non-empty string, got {name!r}")
    if not (isinstance(options_model, type) and issubclass(options_model, BaseModel)):
        raise TypeError(f"options_model for env {name!r} must be a pydantic BaseModel subclass")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"env {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = EnvSpec(name, factory, options_model, description)


def unregister_env(name: str) -> None:
    """Forget `name` (for tests that register a throwaway env)."""
    _REGISTRY.pop(name, None)


def known_envs() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def env_spec(name: str) -> EnvSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown env {name!r}; known envs: {', '.join(known_envs())}") from None


def env_options_model(name: str) -> type[BaseModel]:
    return env_spec(name).options_model


def env_description(name: str) -> str:
    return env_spec(name).description


def validate_env_options(name: str, options: Mapping[str, Any] | BaseModel | None) -> BaseModel:
    """The options as `name`'s options model (a dict is validated; a model must be that type)."""
    model = env_options_model(name)
    if options is None:
        return model()
    if isinstance(options, model):
        return options
    if isinstance(options, BaseModel):
        raise TypeError(
            f"env {name!r} takes {model.__name__} options, got {type(options).__name__}"
        )
    return model.model_validate(dict(options))


def make_env(
    name: str, options: Mapping[str, Any] | BaseModel | None = None, **runtime_deps: Any
) -> TextEnv:
    """Build the env `name` with validated options and the given runtime dependencies."""
    spec = env_spec(name)
    return spec.factory(
        validate_env_options(name, options), **_accepted(spec.factory, runtime_deps)
    )


def _accepted(factory: Callable[..., Any], deps: dict[str, Any]) -> dict[str, Any]:
    """The deps the factory takes, so a rollout worker can hand every env the same set."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return deps
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return deps
    names = {p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    return {k: v for k, v in deps.items() if k in names}


def _register_builtins() -> None:
    from spear_ray.envs import frozenlake, gym_adapter, python_math, sokoban, textworld_env

    for module in (python_math, textworld_env, sokoban, frozenlake, gym_adapter):
        register_env(
            module.ENV_NAME, module.make, module.OPTIONS_MODEL, module.DESCRIPTION, overwrite=True
        )


_register_builtins()
