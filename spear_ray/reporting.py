"""Where a run's metrics rows go: RUN_DIR/metrics.jsonl, and the sinks `run.loggers` names.

    reporter = Reporter.open(config, run)   # after the run directory exists
    reporter.log(row)                       # every step row and every evaluation row
    reporter.close()

jsonl is always on (RunDir.log_metrics). The other sinks get the row's finite numbers, keyed as in
the row, at `row["step"]`: TensorBoard (RUN_DIR/tensorboard), Weights & Biases (files under
RUN_DIR/wandb, offline unless run.wandb_mode says online) and Ray's metrics
(spear_ray/dashboard_metrics.py; on whenever Ray is running).

Secrets: the value of every environment variable whose name contains KEY, TOKEN, SECRET or
PASSWORD is replaced by "***" in whatever this module records (the config sent to TensorBoard and
W&B, string values of rows); W&B is told not to record the environment, code, git state or
machine (its "metadata").
"""

from __future__ import annotations

import math
import os
import sys
import uuid
from collections.abc import Mapping
from typing import Any, Protocol

from spear_ray.config import ConfigError, SpearConfig, config_to_yaml
from spear_ray.run_dir import RunDir

SECRET_NAME_PARTS = ("KEY", "TOKEN", "SECRET", "PASSWORD")
MIN_SECRET_CHARS = 6  # shorter values ("1", "true", "false") would blank out ordinary text
REDACTED = "***"

# W&B settings that keep the environment out of a run: no system metadata (which holds the
# command line, host and paths), no system stats, no code or git state, no pip freeze, no console
# capture. Only those the installed wandb knows are passed (names change between versions).
WANDB_PRIVATE_SETTINGS = {
    "x_disable_meta": True,
    "x_disable_stats": True,
    "x_disable_machine_info": True,
    "x_save_requirements": False,
    "x_disable_update_check": True,
    "disable_code": True,
    "disable_git": True,
    "save_code": False,
    "console": "off",
    "silent": True,
}


# ----------------------------------------------------------------------------- secrets


def secret_values(environ: Mapping[str, str] | None = None) -> list[str]:
    """Values of the environment variables whose names look secret, longest first (so a secret
    that contains another is replaced whole)."""
    environ = os.environ if environ is None else environ
    found = {
        value
        for name, value in environ.items()
        if any(part in name.upper() for part in SECRET_NAME_PARTS)
        and len(value) >= MIN_SECRET_CHARS
    }
    return sorted(found, key=len, reverse=True)


def scrub(value: Any, secrets: list[str]) -> Any:
    """`value` with every secret in its strings (dict keys included) replaced by "***"."""
    if isinstance(value, str):
        for secret in secrets:
            value = value.replace(secret, REDACTED)
        return value
    if isinstance(value, Mapping):
        return {scrub(k, secrets): scrub(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub(v, secrets) for v in value)
    return value


def scalars(row: Mapping[str, Any]) -> dict[str, float]:
    """The finite numbers of a metrics row, without `step` (the x axis)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step"
        and isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
    }


# ----------------------------------------------------------------------------- sinks


def check_loggers(config: SpearConfig) -> None:
    """ConfigError (one line) when a sink run.loggers names cannot be imported; writes nothing,
    so a run that cannot log is refused before its directory holds a partial sink."""
    if "tensorboard" in config.run.loggers:
        try:
            import torch.utils.tensorboard  # noqa: F401  (needs the tensorboard package)
        except ImportError:
            raise ConfigError(
                "run.loggers: tensorboard is chosen but the tensorboard package is not "
                "installed; pip install tensorboard, or remove tensorboard from run.loggers"
            ) from None
    if "wandb" in config.run.loggers:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ConfigError(
                "run.loggers: wandb is chosen but the wandb package is not installed; "
                "pip install 'spear-ray[wandb]', or remove wandb from run.loggers"
            ) from None


class Sink(Protocol):
    def write(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class TensorBoardSink:
    """Scalars into RUN_DIR/tensorboard, one tag per metric key; the config as text."""

    def __init__(self, run: RunDir, config_yaml: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run.path / "tensorboard"))
        self.writer.add_text("config", f"```yaml\n{config_yaml}```", global_step=0)
        self.writer.flush()

    def write(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # a row per step: cheap, and a crashed run keeps its curves

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    """One W&B run per run directory (its id is kept in RUN_DIR/wandb/run_id, so a resumed run
    continues it); offline mode writes RUN_DIR/wandb/offline-run-*/ and needs no network."""

    def __init__(self, config: SpearConfig, run: RunDir, config_dump: dict[str, Any]):
        import wandb  # check_loggers (Reporter.open) has already said if it is missing

        directory = run.path / "wandb"
        directory.mkdir(parents=True, exist_ok=True)
        id_file = directory / "run_id"
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = uuid.uuid4().hex[:8]  # W&B ids: lowercase letters and digits
            id_file.write_text(run_id + "\n")
        known = wandb.Settings.model_fields
        settings = wandb.Settings(**{k: v for k, v in WANDB_PRIVATE_SETTINGS.items() if k in known})
        self.wandb_run = wandb.init(
            project=config.run.wandb_project,
            name=config.run.name,
            id=run_id,
            resume="allow",
            dir=str(run.path),
            mode=config.run.wandb_mode,
            config=config_dump,
            settings=settings,
        )

    def write(self, step: int, values: dict[str, float]) -> None:
        self.wandb_run.log(values, step=step)

    def close(self) -> None:
        self.wandb_run.finish()


# ----------------------------------------------------------------------------- the reporter


class Reporter:
    """Fans each metrics row out to RUN_DIR/metrics.jsonl and the sinks. A sink that raises is
    dropped with a one-line warning: a monitoring outage must not stop a training run."""

    def __init__(self, run: RunDir, sinks: list[Sink], secrets: list[str] | None = None):
        self.run = run
        self.sinks = list(sinks)
        self.secrets = secret_values() if secrets is None else secrets

    @classmethod
    def open(cls, config: SpearConfig, run: RunDir) -> Reporter:
        """The sinks `config.run.loggers` names, plus Ray's metrics (recorded while Ray runs)."""
        from spear_ray.dashboard_metrics import DashboardMetrics

        check_loggers(config)  # before any sink makes its directory in the run
        secrets = secret_values()
        dump = scrub(config.model_dump(mode="json"), secrets)
        sinks: list[Sink] = []
        try:
            if "tensorboard" in config.run.loggers:
                sinks.append(TensorBoardSink(run, scrub(config_to_yaml(config), secrets)))
            if "wandb" in config.run.loggers:
                sinks.append(WandbSink(config, run, dump))
        except BaseException:
            for sink in sinks:
                sink.close()
            raise
        sinks.append(DashboardMetrics(config.run.name))
        return cls(run, sinks, secrets)

    def log(self, row: dict[str, Any]) -> None:
        row = scrub(row, self.secrets)
        self.run.log_metrics(row)
        step, values = row.get("step"), scalars(row)
        if not isinstance(step, int) or not values:
            return
        for sink in list(self.sinks):
            try:
                sink.write(step, values)
            except Exception as err:
                self.sinks.remove(sink)
                print(
                    f"spear_ray: metrics sink {type(sink).__name__} failed and is off for the "
                    f"rest of the run ({type(err).__name__}: {scrub(str(err), self.secrets)})",
                    file=sys.stderr,
                    flush=True,
                )

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            try:
                sink.close()
            except Exception as err:
                print(
                    f"spear_ray: closing {type(sink).__name__} failed ({type(err).__name__})",
                    file=sys.stderr,
                    flush=True,
                )
