"""A run directory: resolved config, metrics, checkpoints and the buffer's durable state.

    runs/NAME/
      config.yaml            the fully resolved config of the run
      metrics.jsonl          one JSON object per step (and per evaluation)
      buffer/                the replay buffer's own every-step checkpoint
      checkpoints/step_000010/
        learner/             DeepSpeed state per rank + an HF model directory (policy/)
        buffer.npz           the replay buffer at that step
        COMPLETE             written last: a directory without it is partial and ignored

Checkpoints are written into a temporary directory and renamed into place, so a crash never
leaves a half-written `step_*`; only the newest `keep_last` are kept.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from spear_ray.config import ConfigError, SpearConfig, config_to_yaml, load_config

COMPLETE = "COMPLETE"


class RunDir:
    def __init__(self, path: str | os.PathLike, keep_last: int = 3):
        self.path = Path(path)
        self.keep_last = keep_last

    # ------------------------------------------------------------------ layout

    @property
    def config_file(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def buffer_dir(self) -> Path:
        return self.path / "buffer"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    # ------------------------------------------------------------------ create / open

    @classmethod
    def create(cls, config: SpearConfig) -> RunDir:
        """A new run directory runs_dir/name; refuses to touch an existing one."""
        run = cls(Path(config.run.runs_dir) / config.run.name, config.checkpoint.keep_last)
        if run.path.exists() and any(run.path.iterdir()):
            raise ConfigError(
                f"{run.path} already exists; continue it with --resume {run.path}, or pick "
                f"another run.name / run.runs_dir"
            )
        run.path.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(run.config_file, config_to_yaml(config))
        return run

    @classmethod
    def open(
        cls, path: str | os.PathLike, overrides: list[str] | None = None
    ) -> tuple[RunDir, SpearConfig]:
        """An existing run and its config (overrides may change what is safe to change)."""
        run = cls(path)
        if not run.config_file.is_file():
            raise ConfigError(f"{run.path} is not a spear-ray run directory (no config.yaml)")
        config = load_config(run.config_file, overrides or [])
        run.keep_last = config.checkpoint.keep_last
        return run, config

    # ------------------------------------------------------------------ metrics

    def log_metrics(self, row: dict[str, Any]) -> None:
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()
        }
        with self.metrics_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(clean) + "\n")

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line]

    # ------------------------------------------------------------------ checkpoints

    @contextmanager
    def checkpoint(self, step: int) -> Iterator[Path]:
        """Yields a temporary directory to fill; on success it becomes checkpoints/step_N."""
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints_dir / f"step_{step:06d}"
        tmp = self.checkpoints_dir / f".tmp_step_{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
            (tmp / COMPLETE).write_text(json.dumps({"step": step}) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in self.complete_checkpoints()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def complete_checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first (partial ones lack COMPLETE and are skipped)."""
        if not self.checkpoints_dir.exists():
            return []
        return sorted(p for p in self.checkpoints_dir.glob("step_*") if (p / COMPLETE).is_file())

    def latest_checkpoint(self) -> Path | None:
        found = self.complete_checkpoints()
        return found[-1] if found else None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
