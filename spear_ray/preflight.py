"""What `spear-ray train` checks before it writes anything or starts Ray.

    config, run, resume = resolve_run(config_source, overrides, resume_dir, address)

Bad input must not cost a Ray start, leave a half-made run directory behind (the next try would
be refused with "already exists") or touch the run being resumed. So the config is loaded, every
check below runs, and only then is the run directory created (a new run) or handed on (a resumed
one; nothing in it is written here). Each check raises `PreflightError`, a `ConfigError`: the CLI
prints its one line, which names the file and YAML line or the override and the field, and exits
with status 2. The checks, cheapest first:

- the run directory: a new run's must not exist yet; a resumed one must be a run, with a
  complete checkpoint, and the overrides may change only what a checkpoint can follow
  (`RESUMABLE_FIELDS`);
- the metrics sinks `run.loggers` names can be imported;
- the env's data files (python_math `data_path`): read whole, bad rows named FILE:LINE;
- `model.path` (and `model.tokenizer_path`): an HF model directory (config.json and weights),
  a .gguf file or builtin:NAME;
- `--address` (else $RAY_ADDRESS): something answers there within `ADDRESS_TIMEOUT_S`;
- the tokenizer loads and has a chat template the agent loop can use (spear_ray/agent/chat.py).
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from spear_ray.config import ConfigError, SpearConfig, load_config
from spear_ray.config.load import (
    config_differences,
    flat_fields,
    parse_yaml_with_lines,
    resolve_source,
)
from spear_ray.run_dir import COMPLETE, RunDir

ADDRESS_TIMEOUT_S = 5.0

# What may differ between a run's config.yaml and the config of its --resume. Everything else
# shapes the checkpoint (model, learner ranks and ZeRO stage, optimizer), the task stream (seeds,
# rollout sizes, env) or the algorithm, so a resumed run would not be the run its first steps
# belong to. Timeouts, placement and bookkeeping never change what a checkpoint holds.
RESUMABLE_FIELDS = (
    "run.total_steps",
    "run.eval_every_steps",
    "run.loggers",
    "run.wandb_project",
    "run.wandb_mode",
    "checkpoint.*",
    "rollout.num_workers",
    "rollout.*timeout_s",
    "rollout.max_restarts",
    "rollout.group_retries",
    "rollout.max_hung_env_threads",
    "rollout.cpu_kv_cache_gib",
    "rollout.gpu_memory_utilization",
    "learner.*timeout_s",
    "learner.max_nonfinite_in_row",
    "resources.cpus_per_learner",
    "resources.cpus_per_rollout_worker",
    "resources.placement_strategy",
    "resources.threads_per_*",
)

# HF weight files; a directory with config.json and one of these is a model directory.
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt")


class PreflightError(ConfigError):
    """Bad input found before a run starts; the message is one line naming the field."""


@dataclass(frozen=True)
class Origin:
    """Where a config's values came from (its YAML file and the CLI overrides), so a message can
    name the override or the file:line of a field."""

    file: Path | None
    overrides: tuple[str, ...] = ()

    @cached_property
    def _lines(self) -> dict[tuple[str, ...], int]:
        if self.file is None:
            return {}
        try:
            return parse_yaml_with_lines(self.file.read_text(encoding="utf-8"))[1]
        except Exception:  # the config loaded, so this cannot fail; a message is still wanted
            return {}

    def override_for(self, field: str) -> str | None:
        """The last override that set `field` (or a section holding it, or a key inside it)."""
        keys = tuple(field.split("."))
        for text in reversed(self.overrides):
            key = tuple(text.partition("=")[0].strip().split("."))
            n = min(len(key), len(keys))
            if key[:n] == keys[:n]:
                return text
        return None

    def where(self, field: str) -> str:
        """The prefix naming where `field` was set: the override, FILE:LINE, or "" (a default)."""
        text = self.override_for(field)
        if text is not None:
            return f"override {text!r}: "
        keys = tuple(field.split("."))
        for end in range(len(keys), 0, -1):
            if keys[:end] in self._lines:
                return f"{self.file}:{self._lines[keys[:end]]}: "
        return ""

    def error(self, field: str, message: str) -> PreflightError:
        return PreflightError(f"{self.where(field)}{field}: {message}")


# ----------------------------------------------------------------------------- entry point


def resolve_run(
    config_source: str | None,
    overrides: Sequence[str],
    resume: str | None,
    address: str | None = None,
) -> tuple[SpearConfig, RunDir, bool]:
    """(config, run dir, resuming?) from the CLI's arguments, after every preflight check; a new
    run's directory is created last, when nothing can fail any more."""
    if resume:
        if config_source is not None:
            raise PreflightError(
                f"--config {config_source} with --resume {resume}: a resumed run keeps the "
                "config.yaml of its run directory; drop --config (overrides may follow --resume)"
            )
        run, config, origin = open_for_resume(resume, overrides)
    else:
        source = resolve_source(config_source or "demo")
        config = load_config(source, overrides)
        origin = Origin(source, tuple(overrides))
        check_new_run_dir(config, origin)
    preflight(config, origin, address=address)
    if not resume:
        run = RunDir.create(config)
    return config, run, bool(resume)


def preflight(config: SpearConfig, origin: Origin, *, address: str | None = None) -> None:
    """Every check that needs no run directory; raises PreflightError, writes nothing."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # as run_training: before transformers loads
    check_loggers(config, origin)
    check_env_data(config, origin)
    _, tokenizer = check_model_paths(config, origin)
    check_address(address)
    field = "model.tokenizer_path" if config.model.tokenizer_path else "model.path"
    check_tokenizer(tokenizer, field, origin)


# ----------------------------------------------------------------------------- run directory


def check_new_run_dir(config: SpearConfig, origin: Origin) -> None:
    """A new run needs runs_dir/name to be absent or empty (RunDir.create checks again)."""
    runs_dir = Path(config.run.runs_dir)
    path = runs_dir / config.run.name
    for parent in (runs_dir, *runs_dir.parents):
        if parent.exists():
            if not parent.is_dir():
                raise origin.error(
                    "run.runs_dir", f"{parent} is a file, so {path} cannot be created; pick another"
                )
            break
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise PreflightError(
            f"{path} already exists; continue it with --resume {path}, or pick another run.name "
            "/ run.runs_dir"
        )


def open_for_resume(
    resume: str | os.PathLike, overrides: Sequence[str]
) -> tuple[RunDir, SpearConfig, Origin]:
    """The run to resume and its config with `overrides`, if the overrides change only
    RESUMABLE_FIELDS and the run has a complete checkpoint."""
    path = Path(resume)
    if not path.is_dir():
        what = "is a file" if path.exists() else "does not exist"
        raise PreflightError(f"--resume {path}: {what}; give the run directory (RUN_DIR)")
    if not (path / "config.yaml").is_file():
        hint = "the directory `spear-ray train` made (runs_dir/name, with config.yaml)"
        if path.parent.name == "checkpoints":
            hint = f"the run directory {path.parent.parent}, not one of its checkpoints"
        raise PreflightError(
            f"--resume {path}: not a spear-ray run directory (no config.yaml); give {hint}"
        )
    run, config = RunDir.open(path, list(overrides))
    origin = Origin(run.config_file, tuple(overrides))
    check_resume_changes(load_config(run.config_file), config, origin)
    if run.latest_checkpoint() is None:
        raise PreflightError(
            f"--resume {path}: no complete checkpoint to resume from ({_checkpoint_state(run)}; "
            f"one is written every checkpoint.every_steps={config.checkpoint.every_steps} steps), "
            f"so there is nothing to continue: remove {path} and start the run again"
        )
    return run, config, origin


def _checkpoint_state(run: RunDir) -> str:
    if not run.checkpoints_dir.is_dir():
        return "no checkpoints/ directory"
    found = sorted(p for p in run.checkpoints_dir.glob("step_*") if p.is_dir())
    if not found:
        return "checkpoints/ holds no step_* directory"
    partial = [p.name for p in found if not (p / COMPLETE).is_file()]
    damaged = [p.name for p in found if (p / COMPLETE).is_file()]  # refused by latest_checkpoint
    parts = (
        [f"{', '.join(partial)}: no {COMPLETE} marker, a save was interrupted"] if partial else []
    )
    parts += [f"{', '.join(damaged)}: damaged, files differ from the manifest"] if damaged else []
    return "; ".join(parts)


def check_resume_changes(stored: SpearConfig, resumed: SpearConfig, origin: Origin) -> None:
    """Refuse an override on --resume that changes a field outside RESUMABLE_FIELDS."""
    before, after = flat_fields(stored), flat_fields(resumed)
    for field in config_differences(stored, resumed):
        if any(fnmatch.fnmatchcase(field, pattern) for pattern in RESUMABLE_FIELDS):
            continue
        raise origin.error(
            field,
            f"cannot change when resuming (the run has {_show(before.get(field))}, this gives "
            f"{_show(after.get(field))}): its checkpoints and first steps were made with the old "
            f"value. On --resume only {_resumable()} may change; start a new run for this change",
        )


def _resumable() -> str:
    """RESUMABLE_FIELDS grouped by section: "run.total_steps/eval_every_steps, checkpoint.*"."""
    sections: dict[str, list[str]] = {}
    for pattern in RESUMABLE_FIELDS:
        section, _, rest = pattern.partition(".")
        sections.setdefault(section, []).append(rest)
    return ", ".join(f"{section}.{'/'.join(rest)}" for section, rest in sections.items())


def _show(value: Any) -> str:
    return "nothing" if value is None else json.dumps(value)


# ----------------------------------------------------------------------------- loggers, data


def check_loggers(config: SpearConfig, origin: Origin) -> None:
    from spear_ray.reporting import check_loggers as importable

    try:
        importable(config)
    except ConfigError as err:
        raise PreflightError(f"{origin.where('run.loggers')}{err}") from None


def _check_math_data(options: dict[str, Any], origin: Origin) -> None:
    from spear_ray.envs.math_data import MathDataError, load_problems

    path = options.get("data_path")
    if not path:
        return  # problems come from the generator
    try:
        load_problems(
            path,
            prompt_field=options["prompt_field"],
            answer_field=options["answer_field"],
            split=options.get("data_split"),
        )
    except MathDataError as err:
        raise origin.error("env.options.data_path", str(err)) from None
    except Exception as err:  # an unreadable file, a broken datasets directory, ...
        first = str(err).splitlines()[0] if str(err) else ""
        raise origin.error(
            "env.options.data_path", f"{path}: cannot read it ({type(err).__name__}: {first})"
        ) from None


# Envs whose options name data files, and the check that reads them whole on the driver. The
# rollout workers read them again when they build an env; a bad file found only there would make
# every trajectory an infrastructure failure after the run has started.
ENV_DATA_CHECKS: dict[str, Callable[[dict[str, Any], Origin], None]] = {
    "python_math": _check_math_data,
}


def check_env_data(config: SpearConfig, origin: Origin) -> None:
    check = ENV_DATA_CHECKS.get(config.env.name)
    if check is not None:
        check(config.env.options, origin)


# ----------------------------------------------------------------------------- model, tokenizer


def check_model_paths(config: SpearConfig, origin: Origin) -> tuple[Path, Path]:
    """(model path, tokenizer path), resolved (a builtin is built here if it is not cached)."""
    from spear_ray.models import ModelPathError, resolve_model_path

    resolved: dict[str, Path] = {}
    for field, value in (
        ("model.path", config.model.path),
        ("model.tokenizer_path", config.model.tokenizer_path),
    ):
        if value is None:
            continue
        try:
            resolved[field] = resolve_model_path(value)
        except ModelPathError as err:
            raise origin.error(field, str(err)) from None
    model = resolved["model.path"]
    if model.is_dir():
        problem = _not_a_model_dir(model)
        if problem:
            raise origin.error(
                "model.path",
                f"{model} is not a model directory ({problem}); give an HF model directory "
                "(config.json and *.safetensors or pytorch_model.bin), a .gguf file or "
                "builtin:NAME",
            )
    elif model.suffix != ".gguf":
        raise origin.error(
            "model.path",
            f"{model} is a file but not a .gguf model; give an HF model directory, a .gguf file "
            "or builtin:NAME",
        )
    return model, resolved.get("model.tokenizer_path", model)


def _not_a_model_dir(path: Path) -> str | None:
    config_file = path / "config.json"
    if not config_file.is_file():
        return "no config.json"
    try:
        parsed = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        return f"config.json is not readable JSON: {str(err).splitlines()[0]}"
    if not isinstance(parsed, dict):
        return "config.json is not a JSON object"
    if not any(next(path.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        return "no weights: no *.safetensors or *.bin file"
    return None


def check_tokenizer(path: Path, field: str, origin: Origin) -> None:
    """The tokenizer at `path` loads the way a rollout worker loads it and has a chat template
    that only appends between turns (what ChatFormat needs)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from spear_ray.agent.chat import ChatFormat, ChatTemplateError

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        if path.is_file() and path.suffix == ".gguf":
            tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        hint = (
            "set model.tokenizer_path to a tokenizer directory"
            if field == "model.path"
            else "give a tokenizer directory"
        )
        raise origin.error(
            field, f"cannot load a tokenizer from {path} ({type(err).__name__}: {first}); {hint}"
        ) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    try:
        ChatFormat(tokenizer, name=f"tokenizer {path}")
    except ChatTemplateError as err:
        raise origin.error(field, str(err)) from None
    except Exception as err:  # a template that raises on a plain user/assistant conversation
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise origin.error(
            field,
            f"the chat template of tokenizer {path} fails on a user/assistant conversation "
            f"({type(err).__name__}: {first})",
        ) from None


# ----------------------------------------------------------------------------- Ray address


def check_address(address: str | None, timeout_s: float = ADDRESS_TIMEOUT_S) -> None:
    """Something must answer at --address (else $RAY_ADDRESS) within timeout_s; no address
    (a local Ray is started) and "local" pass."""
    name = "--address"
    if not address:
        address, name = os.environ.get("RAY_ADDRESS") or None, "RAY_ADDRESS"
    if not address or address == "local":
        return
    where = f"{name} {address}"
    fix = "unset RAY_ADDRESS" if name == "RAY_ADDRESS" else "leave --address out"
    if address.startswith(("http://", "https://")):
        raise PreflightError(
            f"{where}: a dashboard URL (what `ray job submit` takes), not a cluster address; give "
            f"the head's GCS address HOST:PORT (e.g. 10.0.0.5:6379) or ray://HOST:PORT, or {fix} "
            "to start a local Ray"
        )
    if address == "auto":
        host_port = _auto_address(where)
        if host_port is None:
            return
    else:
        host_port = address.split("://", 1)[-1].split("/", 1)[0]
    host, sep, port = host_port.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit():
        raise PreflightError(
            f"{where}: expected HOST:PORT (the head's GCS port, e.g. 10.0.0.5:6379), "
            "ray://HOST:PORT or auto"
        )
    problem = _tcp_problem(host, int(port), timeout_s)
    if problem is None and "://" not in address:  # a GCS address: is it Ray that answers?
        problem = _gcs_problem(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", timeout_s)
    if problem is not None:
        raise PreflightError(
            f"{where}: no Ray answers there ({problem}); start the head there (ray start --head),"
            f" fix {name}, or {fix} to start a local Ray"
        )


def _tcp_problem(host: str, port: int, timeout_s: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return None
    except socket.gaierror:
        return f"unknown host {host!r}"
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except OSError as err:
        return err.strerror or type(err).__name__


# A GCS method every Ray version of this project serves; its request message is empty.
_GCS_PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"


def _gcs_problem(host_port: str, timeout_s: float) -> str | None:
    """None if a Ray GCS answers one gRPC call at host_port (a head with token authentication
    that refuses the unauthenticated call counts: it is there); else what answered instead.
    A port that merely accepts connections (another service, a proxy) is not enough."""
    try:
        import grpc  # Ray's own dependency
    except ImportError:
        return None
    with grpc.insecure_channel(host_port) as channel:
        call = channel.unary_unary(_GCS_PROBE_METHOD)
        try:
            call(b"", timeout=timeout_s)
            return None
        except grpc.RpcError as err:
            code, details = err.code(), (err.details() or "").strip()
    if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return None
    if code == grpc.StatusCode.UNIMPLEMENTED and "http2 header with status" not in details:
        return None  # a gRPC server without this method: a newer Ray; let ray.init judge it
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no gRPC answer within {timeout_s:g} s"
    first = details.splitlines()[0] if details else code.name
    return f"the port is open but it is not a Ray GCS: {first}"


def _auto_address(where: str) -> str | None:
    """host:port of the running cluster "auto" finds; None when Ray's lookup is unavailable."""
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        return None
    try:
        found = canonicalize_bootstrap_address("auto")
    except ConnectionError:
        found = None
    except Exception:
        return None  # let ray.init report it
    if not found:
        raise PreflightError(
            f"{where}: no running Ray cluster found on this machine; start one (ray start --head) "
            "or leave the address out to start a local Ray"
        )
    return found
