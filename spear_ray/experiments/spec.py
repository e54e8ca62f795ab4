"""An experiment spec (SPEC.yaml): a grid of envs x variants x seeds with one sample budget.

    name: spear-vs-grpo          # optional; default: the file's stem
    base: demo                   # preset name or YAML file (relative to the spec file or the cwd)
    steps: 40                    # run.total_steps of every run
    seeds: [0, 1, 2]             # run.seed of each run (or a count: 3 -> [0, 1, 2])
    baseline: grpo               # steps-to-baseline compares against this variant's final success
    output_dir: experiments/spear-vs-grpo   # optional; default experiments/NAME (cwd-relative)
    overrides: {run.eval_every_steps: 10}   # for every run (a mapping or a list of key=value)
    envs:
      - name: frozenlake         # directory label; also env.name when it is a registered env
        overrides: {model.path: builtin:tiny-llama}
      - {name: tw, env: textworld, base: textworld-1.5b}   # own env name and base config
    variants:
      - grpo                     # a name from spear_ray.experiments.variants.VARIANTS
      - {name: drbot_spear, overrides: {algo.sil.coef: 0.5}}
      - {name: spear_t50, variant: drbot_spear, overrides: {algo.sil.ramp_steps: 50}}
      - {name: gigpo, envs: [frozenlake]}   # only on these envs

A run's overrides apply in this order: the base config, `overrides`, the env's, the variant's
table values, the variant's own `overrides`, then what the runner sets (run.total_steps,
run.seed, run.runs_dir, run.name). The runner's keys may not be overridden, and a variant may not
change the sample budget (rollout.prompts_per_step, rollout.samples_per_prompt): every variant of
an env trains on total_steps x prompts x samples trajectories. Every error is one line
(`SpecError`, a `ConfigError`, so the CLI prints it and exits with status 2).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from spear_ray.config import ConfigError, SpearConfig, load_config
from spear_ray.config.load import parse_yaml_with_lines, yaml_problem
from spear_ray.experiments.variants import VARIANTS, dotted_overrides, to_override

# Set by the runner for each run; a spec that overrides them would break the grid.
RUNNER_KEYS = ("run.total_steps", "run.seed", "run.runs_dir", "run.name")
# The sample budget: the same for every variant of an env.
BUDGET_KEYS = ("rollout.prompts_per_step", "rollout.samples_per_prompt")

TOP_KEYS = ("name", "description", "base", "steps", "seeds", "baseline", "output_dir")
TOP_KEYS += ("overrides", "envs", "variants")
ENV_KEYS = ("name", "env", "base", "overrides")
VARIANT_KEYS = ("name", "variant", "overrides", "envs")
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class SpecError(ConfigError):
    """A bad experiment spec; the message is one line naming the file, YAML line and field."""


@dataclass(frozen=True)
class EnvSpec:
    name: str  # label: the run directory level under the experiment
    base: str
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class VariantSpec:
    name: str  # label: the run directory level under the env
    variant: str  # the VARIANTS table entry
    overrides: tuple[str, ...]  # extra overrides after the table's
    envs: tuple[str, ...] | None  # None = every env


@dataclass(frozen=True)
class RunSpec:
    """One run of the grid: EXPERIMENT_DIR/<env>/<variant>/seed<k>."""

    env: str
    variant: str
    seed: int
    base: str
    overrides: tuple[str, ...]  # everything but the runner's run.* keys

    @property
    def label(self) -> str:
        return f"{self.env}/{self.variant}/seed{self.seed}"

    def path(self, root: str | Path) -> Path:
        return Path(root) / self.env / self.variant / f"seed{self.seed}"

    def config(self, root: str | Path, steps: int) -> SpearConfig:
        path = self.path(root)
        runner = [
            f"run.total_steps={steps}",
            f"run.seed={self.seed}",
            to_override("run.runs_dir", str(path.parent)),
            to_override("run.name", path.name),
        ]
        return load_config(self.base, [*self.overrides, *runner])


@dataclass(frozen=True)
class ExperimentSpec:
    name: str
    base: str
    steps: int
    seeds: tuple[int, ...]
    envs: tuple[EnvSpec, ...]
    variants: tuple[VariantSpec, ...]
    overrides: tuple[str, ...] = ()
    baseline: str | None = None
    output_dir: Path | None = None
    description: str = ""
    source: Path | None = field(default=None, compare=False)
    text: str = field(default="", compare=False, repr=False)  # the spec file as written

    def default_output_dir(self) -> Path:
        return self.output_dir if self.output_dir is not None else Path("experiments") / self.name

    def variants_for(self, env: str) -> list[VariantSpec]:
        return [v for v in self.variants if v.envs is None or env in v.envs]

    def runs(self) -> list[RunSpec]:
        """Every run, env by env, seed by seed, variant by variant (so a partial grid already
        holds a comparable first seed of every variant)."""
        out = []
        for env in self.envs:
            for seed in self.seeds:
                for variant in self.variants_for(env.name):
                    overrides = (
                        *self.overrides,
                        *env.overrides,
                        *dotted_overrides(variant.variant),
                        *variant.overrides,
                    )
                    out.append(RunSpec(env.name, variant.name, seed, env.base, overrides))
        return out

    def check(self) -> None:
        """Load the config of every (env, variant) once and check the sample budget is equal."""
        for env in self.envs:
            budgets: dict[int, str] = {}
            for run in self.runs():
                if run.env != env.name or run.seed != self.seeds[0]:
                    continue
                try:
                    config = run.config("experiments", self.steps)
                except ConfigError as err:
                    raise SpecError(
                        f"{self._where()}env {env.name!r}, variant {run.variant!r}: {err}"
                    ) from None
                budgets[config.run.total_steps * config.rollout.samples_per_step] = run.variant
            if len(budgets) > 1:  # cannot happen through the spec; a guard for the table
                raise SpecError(
                    f"{self._where()}env {env.name!r}: variants train on different sample "
                    f"budgets: {budgets}"
                )

    def _where(self) -> str:
        return f"{self.source}: " if self.source is not None else ""


# ----------------------------------------------------------------------------- loading


def load_spec(path: str | Path, *, check: bool = True) -> ExperimentSpec:
    """Read and validate SPEC.yaml; with `check`, also load every run's config."""
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"{path}: no such experiment spec")
    text = path.read_text(encoding="utf-8")
    try:
        data, lines = parse_yaml_with_lines(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise SpecError(f"{where}: YAML syntax error: {yaml_problem(err)}") from None
    spec = parse_spec(data, source=path, lines=lines, text=text)
    if check:
        spec.check()
    return spec


def parse_spec(
    data: Any,
    *,
    source: Path | None = None,
    lines: dict[tuple[str, ...], int] | None = None,
    text: str = "",
) -> ExperimentSpec:
    """Validate the spec's structure (not the run configs: see `ExperimentSpec.check`)."""
    p = _Parser(source, lines or {})
    if not isinstance(data, dict):
        p.fail((), "the top level must be a mapping (base:, steps:, seeds:, envs:, variants:)")
    p.known_keys(data, (), TOP_KEYS)
    for key in ("steps", "envs", "variants"):
        if key not in data:
            p.fail((key,), "missing; an experiment needs steps:, envs: and variants:")

    name = data.get("name", source.stem if source is not None else "experiment")
    p.label(name, ("name",))
    base = data.get("base", "demo")
    if not isinstance(base, str) or not base:
        p.fail(("base",), f"expected a preset name or a YAML file, got {base!r}")
    steps = data["steps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        p.fail(("steps",), f"expected a whole number of training steps >= 1, got {steps!r}")
    seeds = p.seeds(data.get("seeds", [0]))
    overrides = p.overrides(data.get("overrides"), ("overrides",))
    p.reserved(overrides, ("overrides",), budget_ok=True)

    envs = p.envs(data["envs"], _resolve_base(base, source))
    variants = p.variants(data["variants"], {e.name for e in envs})
    names = [v.name for v in variants]
    baseline = data.get("baseline")
    if baseline is None:
        baseline = "grpo" if "grpo" in names else None
    elif baseline not in names:
        p.fail(
            ("baseline",),
            f"{baseline!r} is not one of this experiment's variants: {', '.join(names)}",
        )
    output_dir = data.get("output_dir")
    if output_dir is not None and (not isinstance(output_dir, str) or not output_dir):
        p.fail(("output_dir",), f"expected a directory path, got {output_dir!r}")
    description = data.get("description", "")
    return ExperimentSpec(
        name=name,
        base=_resolve_base(base, source),
        steps=steps,
        seeds=seeds,
        envs=envs,
        variants=variants,
        overrides=overrides,
        baseline=baseline,
        output_dir=Path(output_dir) if output_dir else None,
        description=str(description),
        source=source,
        text=text,
    )


def _resolve_base(base: str, source: Path | None) -> str:
    """A base YAML path is read relative to the spec file when it exists there."""
    if source is not None and base.endswith((".yaml", ".yml")):
        beside = source.parent / base
        if beside.is_file():
            return str(beside)
    return base


class _Parser:
    def __init__(self, source: Path | None, lines: dict[tuple[str, ...], int]):
        self.source = source
        self.lines = lines

    def fail(self, loc: tuple[Any, ...], message: str):
        keys = tuple(str(k) for k in loc)
        where = ""
        if self.source is not None:
            line = next(
                (self.lines[keys[:n]] for n in range(len(keys), 0, -1) if keys[:n] in self.lines),
                None,
            )
            where = f"{self.source}:{line}: " if line else f"{self.source}: "
        field_name = ".".join(keys)
        raise SpecError(f"{where}{field_name}: {message}" if field_name else f"{where}{message}")

    def known_keys(self, data: dict, loc: tuple[Any, ...], known: Iterable[str]) -> None:
        for key in data:
            if key not in known:
                self.fail((*loc, key), f"unknown field; known fields here: {', '.join(known)}")

    def label(self, value: Any, loc: tuple[Any, ...]) -> None:
        if not isinstance(value, str) or not _LABEL.match(value):
            self.fail(loc, f"expected a name of letters, digits, '_', '.', '-', got {value!r}")

    def seeds(self, value: Any) -> tuple[int, ...]:
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                self.fail(("seeds",), f"a number of seeds must be >= 1, got {value}")
            return tuple(range(value))
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(s, int) and not isinstance(s, bool) for s in value)
        ):
            self.fail(("seeds",), f"expected a list of integer seeds or a count, got {value!r}")
        if len(set(value)) != len(value):
            self.fail(("seeds",), f"seeds repeat: {value}")
        return tuple(value)

    def overrides(self, value: Any, loc: tuple[Any, ...]) -> tuple[str, ...]:
        """A mapping {dotted.key: value} or a list of 'dotted.key=value' strings."""
        if value is None:
            return ()
        if isinstance(value, dict):
            return tuple(to_override(str(k), v) for k, v in value.items())
        if isinstance(value, list) and all(isinstance(v, str) and "=" in v for v in value):
            return tuple(value)
        self.fail(loc, "expected a mapping {dotted.key: value} or a list of 'dotted.key=value'")
        raise AssertionError  # unreachable

    def reserved(self, overrides: tuple[str, ...], loc: tuple[Any, ...], budget_ok: bool) -> None:
        for text in overrides:
            key = text.partition("=")[0].strip()
            for reserved in RUNNER_KEYS:
                if reserved == key or reserved.startswith(f"{key}."):
                    self.fail(
                        loc,
                        f"{key!r} is set by the experiment runner (steps:, seeds: and the "
                        f"output directory); remove it",
                    )
            if budget_ok:
                continue
            for budget in BUDGET_KEYS:
                if budget == key or budget.startswith(f"{key}."):
                    self.fail(
                        loc,
                        f"{key!r} would change the sample budget of one variant; set it in "
                        f"the top-level or the env's overrides so every variant shares it",
                    )

    def named_entries(
        self, value: Any, section: str, what: str, keys: Iterable[str]
    ) -> list[tuple[tuple[str, int], dict[str, Any]]]:
        """The entries of the list `section` (envs:, variants:) as (location, mapping): a bare
        name becomes {name: NAME}; each has a valid name and only known keys."""
        if not isinstance(value, list) or not value:
            self.fail(
                (section,), f"expected a non-empty list of {section} (a name or {{name: ...}})"
            )
        entries = []
        for i, item in enumerate(value):
            loc = (section, i)
            if isinstance(item, str):
                item = {"name": item}
            if not isinstance(item, dict) or "name" not in item:
                self.fail(loc, f"expected {what} name or a mapping with name:, got {item!r}")
            self.known_keys(item, loc, keys)
            self.label(item["name"], (*loc, "name"))
            entries.append((loc, item))
        return entries

    def unique_names(self, section: str, what: str, names: list[str]) -> None:
        if len(set(names)) != len(names):
            self.fail((section,), f"{what} names repeat: {', '.join(names)}")

    def envs(self, value: Any, base: str) -> tuple[EnvSpec, ...]:
        from spear_ray.envs.registry import known_envs

        out: list[EnvSpec] = []
        for loc, item in self.named_entries(value, "envs", "an env", ENV_KEYS):
            env_name = item.get("env", item["name"] if item["name"] in known_envs() else None)
            if env_name is not None and env_name not in known_envs():
                self.fail(
                    (*loc, "env"),
                    f"unknown env {env_name!r}; known envs: {', '.join(known_envs())}",
                )
            env_base = item.get("base", base)
            if not isinstance(env_base, str) or not env_base:
                self.fail(
                    (*loc, "base"), f"expected a preset name or a YAML file, got {env_base!r}"
                )
            overrides = self.overrides(item.get("overrides"), (*loc, "overrides"))
            self.reserved(overrides, (*loc, "overrides"), budget_ok=True)
            if env_name is not None:
                overrides = (to_override("env.name", env_name), *overrides)
            out.append(EnvSpec(item["name"], _resolve_base(env_base, self.source), overrides))
        self.unique_names("envs", "env", [e.name for e in out])
        return tuple(out)

    def variants(self, value: Any, env_names: set[str]) -> tuple[VariantSpec, ...]:
        known = ", ".join(VARIANTS)
        out: list[VariantSpec] = []
        for loc, item in self.named_entries(value, "variants", "a variant", VARIANT_KEYS):
            table_name = item.get("variant", item["name"])
            if table_name not in VARIANTS:
                key = "variant" if "variant" in item else "name"
                self.fail((*loc, key), f"unknown variant {table_name!r}; known variants: {known}")
            overrides = self.overrides(item.get("overrides"), (*loc, "overrides"))
            self.reserved(overrides, (*loc, "overrides"), budget_ok=False)
            envs = item.get("envs")
            if envs is not None:
                if not isinstance(envs, list) or not envs:
                    self.fail(
                        (*loc, "envs"), f"expected a non-empty list of env names, got {envs!r}"
                    )
                for env in envs:
                    if env not in env_names:
                        self.fail(
                            (*loc, "envs"),
                            f"{env!r} is not one of this experiment's envs: "
                            f"{', '.join(sorted(env_names))}",
                        )
                envs = tuple(envs)
            out.append(VariantSpec(item["name"], table_name, overrides, envs))
        self.unique_names("variants", "variant", [v.name for v in out])
        return tuple(out)
