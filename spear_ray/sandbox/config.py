"""Configuration of the Python sandbox (the `sandbox` section of the project config).

Imports nothing from spear_ray, so the top-level config can include it without cycles.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class SandboxConfig(BaseModel):
    """Limits and isolation of the per-node fork-server that runs model-written Python."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    isolation: Literal["bwrap", "none"] = Field(
        "bwrap",
        description="'bwrap': bubblewrap + per-call uid + seccomp; 'none': trusted debugging only",
    )
    timeout_s: float = Field(
        30.0, gt=0, description="wall-clock limit of one call; the whole process group is killed"
    )
    cpu_seconds: int = Field(30, gt=0, description="RLIMIT_CPU of each process a call starts")
    memory_mb: int = Field(1024, gt=0, description="RLIMIT_AS (address space) of each process, MiB")
    max_open_files: int = Field(256, ge=16, description="RLIMIT_NOFILE of each process")
    max_file_size_mb: int = Field(
        64, ge=0, description="RLIMIT_FSIZE: largest file a call may write, MiB"
    )
    max_processes: int = Field(
        64, ge=1, description="RLIMIT_NPROC: processes+threads one call may have (per-call uid)"
    )
    max_output_bytes: int = Field(
        65536, ge=0, description="bytes of stdout and of stderr kept per call; the rest is dropped"
    )
    output_kill_bytes: int = Field(
        16 * 2**20, gt=0, description="a call writing more than this to stdout+stderr is killed"
    )
    max_concurrent: int = Field(
        32, ge=1, description="calls executing at once on the server; more wait in its queue"
    )
    warm_children: int = Field(
        2, ge=0, description="processes forked and locked down ahead of calls (hides fork latency)"
    )
    tmp_size_mb: int = Field(
        1024, gt=0, description="size of the sandbox's private /tmp and /dev/shm (all scratch dirs)"
    )
    uid_base: int = Field(
        1_900_000_000,
        gt=0,
        description="calls run as uid/gid uid_base+slot (one per concurrent slot) as root",
    )
    python: str = Field(
        "", description="Python interpreter inside the sandbox; '' = the one running spear-ray"
    )
    preload_modules: tuple[str, ...] = Field(
        ("math", "numpy", "sympy"),
        description="imported by the server before it forks (if installed), so calls start warm",
    )
    hugepages: bool = Field(
        True, description="back the warmed-up server heap with 2 MiB pages: cheaper forks"
    )
    bwrap_path: str = Field("bwrap", description="bubblewrap executable (name on PATH or a path)")
    expose_paths: tuple[str, ...] = Field(
        (),
        description="extra host paths visible read-only; the sandbox sees only these, the "
        "interpreter (prefixes, sys.path), /usr, /bin, /lib*, and a few files of /etc",
    )
    hide_paths: tuple[str, ...] = Field(
        (),
        description="host paths hidden even where they lie under a visible one (an env's data "
        "files are hidden automatically); older configs' list of top-level dirs is harmless",
    )
    start_timeout_s: float = Field(
        120.0, gt=0, description="how long the server may take to start and pre-import modules"
    )
    reply_grace_s: float = Field(
        10.0, gt=0, description="extra wait past a call's timeout before the server counts as hung"
    )

    @field_validator("expose_paths", "hide_paths")
    @classmethod
    def _absolute(cls, paths: tuple[str, ...], info: ValidationInfo) -> tuple[str, ...]:
        for p in paths:
            if not os.path.isabs(p):
                raise ValueError(
                    f"sandbox.{info.field_name}: {p!r} is not an absolute path; give the full path"
                )
        return paths

    @model_validator(mode="after")
    def _check(self) -> SandboxConfig:
        if self.warm_children > self.max_concurrent:
            raise ValueError(
                f"sandbox.warm_children ({self.warm_children}) exceeds sandbox.max_concurrent "
                f"({self.max_concurrent}): lower warm_children or raise max_concurrent"
            )
        if self.uid_base + self.max_concurrent > 2**32 - 2:
            raise ValueError(
                f"sandbox.uid_base ({self.uid_base}) + max_concurrent must stay below 2**32 - 1: "
                "lower uid_base"
            )
        return self
