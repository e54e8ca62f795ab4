"""Load a `SpearConfig` from a preset or YAML file plus dotted overrides, with one-line errors.

    load_config("demo", ["algo.sil.coef=0.5", "run.total_steps=20"])

Every failure raises `ConfigError` whose message is one line naming the file and YAML line, or
the override, and the field; the CLI prints it and exits with status 2.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from spear_ray.config.schema import SpearConfig

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"


class ConfigError(ValueError):
    """A bad config file, preset name or override; the message is one line meant for a user."""


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def resolve_source(source: str | Path) -> Path:
    """A preset name or a YAML path -> the file to read."""
    path = Path(source)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        return path
    preset = PRESETS_DIR / f"{source}.yaml"
    if preset.is_file():
        return preset
    raise ConfigError(
        f"{source!r} is neither a config file nor a preset; presets: {', '.join(preset_names())}"
    )


def load_config(source: str | Path | None = None, overrides: Sequence[str] = ()) -> SpearConfig:
    """Build the config from a preset/file (None = all defaults) and `a.b.c=value` overrides."""
    data: dict[str, Any] = {}
    lines: dict[tuple[str, ...], int] = {}
    path: Path | None = None
    if source is not None:
        path = resolve_source(source)
        data, lines = _read_yaml(path)
        _migrate_legacy(data)
    origin: dict[tuple[str, ...], str] = {}
    for text in overrides:
        keys, value = _parse_override(text)
        _set_dotted(data, keys, value, text)
        origin[keys] = text
    try:
        return SpearConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_one_line(err, path, lines, origin)) from None


def _migrate_legacy(data: dict[str, Any]) -> None:
    """Run directories written before run.loggers existed carry a `logging:` section (whose
    switches never did anything); read it as run.loggers/wandb_* so those runs still resume."""
    legacy = data.pop("logging", None)
    if not isinstance(legacy, dict):
        return
    run = data.setdefault("run", {})
    if isinstance(run, dict) and "loggers" not in run:
        chosen = [name for name in ("tensorboard", "wandb") if legacy.get(name)]
        if chosen:
            run["loggers"] = ["jsonl", *chosen]
        for key in ("wandb_project", "wandb_mode"):
            if key in legacy:
                run.setdefault(key, legacy[key])


def config_differences(
    a: SpearConfig, b: SpearConfig, ignored: frozenset[str] = frozenset()
) -> list[str]:
    """The dotted fields (env.options.* included) whose values differ, sorted; `ignored` ones
    left out. Used where a stored config meets a new one: a resume, an experiment's runs."""
    flat_a, flat_b = flat_fields(a), flat_fields(b)
    keys = sorted((flat_a.keys() | flat_b.keys()) - ignored)
    return [key for key in keys if flat_a.get(key) != flat_b.get(key)]


def flat_fields(config: SpearConfig) -> dict[str, Any]:
    """Every field of `config` by its dotted name, env.options.* included."""
    return _flatten(config.model_dump(mode="json"))


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def config_to_yaml(config: SpearConfig) -> str:
    """The fully resolved config as YAML (every field, defaults included)."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False, width=100)


# ----------------------------------------------------------------------------- YAML with lines


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[tuple[str, ...], int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}); save it as UTF-8") from None
    try:
        data, lines = parse_yaml_with_lines(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ConfigError(f"{where}: YAML syntax error: {yaml_problem(err)}") from None
    if data is None or data == {}:
        # A file that sets nothing would silently train on every default: almost always the
        # wrong file, or one whose content was lost.
        raise ConfigError(
            f"{path}: the config file sets nothing (it is empty or holds only comments); give it "
            "at least one section (model:, rollout:, ...) or name a preset with --config"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}:1: the top level must be a mapping of sections (model:, rollout:, ...)"
        )
    return data, lines


def parse_yaml_with_lines(text: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """The YAML document and the 1-based line of every key path in it (for error messages).
    Raises yaml.YAMLError on a syntax error."""
    node = yaml.compose(text, Loader=yaml.SafeLoader)
    data = yaml.safe_load(text)
    lines: dict[tuple[str, ...], int] = {}
    if node is not None:
        collect_yaml_lines(node, (), lines)
    return data, lines


def yaml_problem(err: yaml.YAMLError) -> str:
    """The short description of a YAML syntax error (without its location)."""
    return getattr(err, "problem", None) or str(err).splitlines()[0]


def collect_yaml_lines(
    node: yaml.Node, prefix: tuple[str, ...], out: dict[tuple[str, ...], int]
) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = (*prefix, str(key_node.value))
            out[key] = key_node.start_mark.line + 1
            collect_yaml_lines(value_node, key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            key = (*prefix, str(i))
            out[key] = item.start_mark.line + 1
            collect_yaml_lines(item, key, out)


# ----------------------------------------------------------------------------- overrides


def _parse_override(text: str) -> tuple[tuple[str, ...], Any]:
    key, sep, raw = text.partition("=")
    keys = tuple(key.strip().split("."))
    if not sep or not all(keys):
        raise ConfigError(f"override {text!r}: expected dotted.key=value, e.g. algo.sil.coef=0.5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML: keep the raw string and let the schema judge it
    return keys, value


def _set_dotted(data: dict[str, Any], keys: tuple[str, ...], value: Any, text: str) -> None:
    node = data
    for depth, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            where = ".".join(keys[: depth + 1])
            raise ConfigError(f"override {text!r}: {where} is a value, not a section")
        node = child
    node[keys[-1]] = value


# ----------------------------------------------------------------------------- error text


# A validator's message may start with the dotted field it is about ("learner.num_ranks: ...").
_FIELD_PREFIX = re.compile(r"^([A-Za-z_][\w]*(?:\.[\w]+)*): ")


def _one_line(
    err: ValidationError,
    path: Path | None,
    lines: dict[tuple[str, ...], int],
    origin: dict[tuple[str, ...], str],
) -> str:
    errors = err.errors()
    first = errors[0]
    loc = tuple(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    named = _FIELD_PREFIX.match(message)
    if named:
        # The validator named its field: relative to the section that raised it, or absolute.
        dotted = tuple(named.group(1).split("."))
        if loc and dotted[0] != loc[0]:
            dotted = loc + dotted
        loc, message = dotted, message[named.end() :]
    elif first["type"] == "extra_forbidden":
        message = f"unknown field; {_known_fields_hint(loc)}"
    elif "input" in first and loc:
        message = f"{message} (got {first['input']!r})"
    field = ".".join(loc) if loc else "config"
    where = _where(loc, path, lines, origin)
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}{field}: {message}{more}"


def _where(
    loc: tuple[str, ...],
    path: Path | None,
    lines: dict[tuple[str, ...], int],
    origin: dict[tuple[str, ...], str],
) -> str:
    # The longest prefix of the failing field that came from an override or a YAML line.
    for end in range(len(loc), 0, -1):
        prefix = loc[:end]
        if prefix in origin:
            return f"override {origin[prefix]!r}: "
        if prefix in lines and path is not None:
            return f"{path}:{lines[prefix]}: "
    return f"{path}: " if path is not None else ""


def _known_fields_hint(loc: tuple[str, ...]) -> str:
    model: Any = SpearConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return "check the spelling"
        model = field.annotation
    names = sorted(getattr(model, "model_fields", {}))
    return f"known fields here: {', '.join(names)}" if names else "check the spelling"
