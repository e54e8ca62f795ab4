"""A run directory: resolved config, metrics, checkpoints and the buffer's durable state.

    runs/NAME/
      config.yaml            the fully resolved config of the run
      metrics.jsonl          one JSON object per step (and per evaluation)
      buffer/                the replay buffer's own every-step checkpoint
      checkpoints/step_000010/
        learner/             DeepSpeed state per rank + an HF model directory (policy/)
        buffer.npz           the replay buffer at that step
        COMPLETE             written last: the step and a manifest (size and CRC-32 of every
                             file); a directory without it is partial and skipped

Checkpoints are written into a temporary directory (.tmp_step_N), every file and directory is
fsynced, and the directory is renamed into place, so a crash never leaves a half-written
`step_*`; only the newest `checkpoint.keep_last` are kept. A checkpoint whose files no longer
match its manifest (truncated, missing, flipped bits) is damaged: `usable_checkpoint` skips it,
reports it in one line, and takes the previous one. Temporary directories left by a run
killed while saving are removed when that run is resumed (`remove_unfinished`, from
Controller.restore_latest), not whenever a run is opened: export and eval open runs that may
still be training.

Resuming from step_k (`spear-ray train --resume RUN`) continues exactly: with
`rollout.async_steps: 0` and fixed seeds a resumed run ends with the parameters of an
uninterrupted one, bitwise on CPU (tests/e2e/test_driver_kill_resume.py). With `async_steps: 1`
it does not: step k+1's rollout ran on weights v_k in the original run but runs on v_{k+1} after
a resume (the overlapped rollout in flight is not part of a checkpoint).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spear_ray.config import ConfigError, SpearConfig, config_to_yaml, load_config

COMPLETE = "COMPLETE"
TMP_PREFIX = ".tmp_step_"
_CHUNK = 8 << 20


@dataclass(frozen=True)
class CheckpointProblem:
    """Why a checkpoint cannot be used: `partial` (no COMPLETE marker) or `damaged` (a file
    differs from the manifest; `detail` names it)."""

    checkpoint: Path
    kind: str
    detail: str

    def line(self, instead: Path | None) -> str:
        """One line for the user, naming the checkpoint used instead."""
        using = f"using {instead.name}" if instead is not None else "no earlier usable checkpoint"
        return f"checkpoint {self.checkpoint.name} is {self.kind} ({self.detail}): {using}"


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
        """Yields a temporary directory to fill; on success it becomes checkpoints/step_N, with
        a manifest in COMPLETE and everything fsynced before the rename."""
        self.checkpoints_dir.mkdir(parents=True, exist_ok=True)
        final = self.checkpoints_dir / f"step_{step:06d}"
        tmp = self.checkpoints_dir / f"{TMP_PREFIX}{step:06d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
            files = _manifest(tmp)  # reads (and fsyncs) every file the writers left
            _write_synced(tmp / COMPLETE, json.dumps({"step": step, "files": files}) + "\n")
            for directory, _, _ in os.walk(tmp):
                _fsync_dir(Path(directory))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.checkpoints_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        for old in self.complete_checkpoints()[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def complete_checkpoints(self) -> list[Path]:
        """Finished checkpoints, oldest first (partial ones lack COMPLETE and are skipped)."""
        if not self.checkpoints_dir.exists():
            return []
        return sorted(p for p in self.checkpoints_dir.glob("step_*") if (p / COMPLETE).is_file())

    def checkpoints_newest_first(self) -> list[Path]:
        """Every checkpoint directory (complete or not), newest first."""
        if not self.checkpoints_dir.exists():
            return []
        return sorted((p for p in self.checkpoints_dir.glob("step_*") if p.is_dir()), reverse=True)

    def verify(
        self, checkpoint: Path, *, checksums: bool = True, under: str | None = None
    ) -> CheckpointProblem | None:
        """None if `checkpoint` is complete and its files match the manifest in COMPLETE (sizes;
        with `checksums` also CRC-32, which reads every file); else what is wrong. `under`
        limits the check to one subdirectory (e.g. "learner/policy"). A COMPLETE without a
        manifest (older runs) is trusted."""
        marker = checkpoint / COMPLETE
        if not marker.is_file():
            return CheckpointProblem(
                checkpoint,
                "partial",
                f"no {COMPLETE} marker: it was being written when the run stopped",
            )
        try:
            info = json.loads(marker.read_text(encoding="utf-8"))
            files = info.get("files") if isinstance(info, dict) else None
            entries = [(rel, int(e["size"]), int(e["crc32"])) for rel, e in (files or {}).items()]
        except (ValueError, TypeError, KeyError, AttributeError, UnicodeDecodeError):
            return CheckpointProblem(checkpoint, "damaged", f"file {COMPLETE}: unreadable")
        if under is not None:
            prefix = under.strip("/") + "/"
            entries = [entry for entry in entries if entry[0].startswith(prefix)]
        for rel, size, _ in entries:  # cheap checks first: a truncated or missing file
            try:
                found = (checkpoint / rel).stat().st_size
            except OSError:
                return CheckpointProblem(checkpoint, "damaged", f"file {rel}: missing")
            if found != size:
                return CheckpointProblem(
                    checkpoint, "damaged", f"file {rel}: {found} bytes, expected {size}"
                )
        if checksums:
            for rel, _, crc in entries:
                try:
                    _, found_crc = _size_and_crc(checkpoint / rel)
                except OSError as err:
                    return CheckpointProblem(
                        checkpoint, "damaged", f"file {rel}: unreadable ({err.strerror})"
                    )
                if found_crc != crc:
                    return CheckpointProblem(
                        checkpoint, "damaged", f"file {rel}: checksum mismatch"
                    )
        return None

    def usable_checkpoint(
        self, *, checksums: bool = False, log: Callable[[str], Any] | None = None
    ) -> Path | None:
        """The newest checkpoint that `verify` accepts. Each newer one that is partial or
        damaged is skipped and reported to `log` in one line, e.g. "checkpoint step_000009 is
        damaged (file learner/policy/model.safetensors: 0 bytes, expected 94312): using
        step_000008"."""
        problems = []
        found = None
        for checkpoint in self.checkpoints_newest_first():
            problem = self.verify(checkpoint, checksums=checksums)
            if problem is None:
                found = checkpoint
                break
            problems.append(problem)
        if log is not None:
            for problem in problems:
                log(problem.line(found))
        return found

    def latest_checkpoint(self, log: Callable[[str], Any] | None = None) -> Path | None:
        """The newest complete checkpoint whose files have their recorded sizes (see
        usable_checkpoint; restoring also checks the checksums)."""
        return self.usable_checkpoint(checksums=False, log=log)

    def remove_unfinished(self, log: Callable[[str], Any] | None = None) -> None:
        """Remove temporary checkpoint directories (.tmp_step_*) left by a run that was killed
        while saving. Only for the process that trains this run (it is the only writer)."""
        if not self.checkpoints_dir.exists():
            return
        for tmp in sorted(self.checkpoints_dir.glob(f"{TMP_PREFIX}*")):
            shutil.rmtree(tmp, ignore_errors=True)
            if log is not None:
                log(f"removed {tmp.name}, a checkpoint left unfinished when the run stopped")


def _size_and_crc(path: Path, fsync: bool = False) -> tuple[int, int]:
    size, crc = 0, 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            size += len(chunk)
            crc = zlib.crc32(chunk, crc)
        if fsync:  # flushes the file's data whoever wrote it (the learner ranks, the buffer)
            os.fsync(f.fileno())
    return size, crc


def _manifest(root: Path) -> dict[str, dict[str, int]]:
    files = {}
    for directory, _, names in sorted(os.walk(root)):
        for name in sorted(names):
            path = Path(directory) / name
            size, crc = _size_and_crc(path, fsync=True)
            files[path.relative_to(root).as_posix()] = {"size": size, "crc32": crc}
    return files


def _write_synced(path: Path, text: str) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename or new entry in `path` durable (not supported on every OS/filesystem)."""
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
