"""What `spear-ray train` prints while it trains.

Three modes:
  lines  one line per step (what a log file or `ray job logs` should hold; the default when
         stdout is not a terminal)
  bar    a progress bar on a terminal (step/total, reward, success, buffer size, ETA); other
         messages print above it
  quiet  only the start, evaluations, checkpoints and the final summary (`notice`); no per-step
         lines and no set-up chatter (`info`) -- for `ray job submit`. Errors are raised and
         print their traceback in every mode.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

OutputMode = Literal["lines", "bar", "quiet"]

SUCCESS_WINDOW = 10  # one step's sampled success is noisy (few tasks): also show a running mean

STEP_LINE = [
    ("reward/mean", "reward", "+.3f"),
    ("success_rate", "success", ".2f"),
    ("buffer/size", "buffer", "d"),
    ("spear/replay_rows", "replayed", "d"),
    ("spear/w_sil", "w_sil", ".2f"),
    ("update/loss", "loss", "+.4f"),
]
BAR_FIELDS = STEP_LINE[:3]

# a step line, also behind the "[i/n] label " prefix an experiment adds
STEP_LINE_PATTERN = re.compile(r"(^|\s)step \d+/\d+  ")


def format_metrics(metrics: dict, keys: list[tuple[str, str, str]]) -> str:
    parts = []
    for key, label, fmt in keys:
        value = metrics.get(key)
        if value is not None:
            parts.append(f"{label} {value:{fmt}}")
    return "  ".join(parts)


def format_duration(seconds: float) -> str:
    seconds = max(round(seconds), 0)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def eta_seconds(elapsed: float, steps_done: int, steps_left: int) -> float | None:
    """Time left at the mean pace of the steps done so far (None before the first step)."""
    return elapsed / steps_done * steps_left if steps_done > 0 else None


def quiet_log(log: Callable[[str], None]) -> Callable[[str], None]:
    """`log` without the per-step lines (for output that `run_training` reaches only through a
    log function, e.g. the runs of an experiment)."""

    def filtered(line: str) -> None:
        if not STEP_LINE_PATTERN.search(line):
            log(line)

    return filtered


class TrainOutput:
    def __init__(
        self,
        total_steps: int,
        *,
        mode: OutputMode = "lines",
        log: Callable[[str], None] = print,
        console: Any = None,
    ):
        self.total_steps = total_steps
        self.mode = mode
        self.log = log
        self._console = console
        self._progress: Any = None
        self._task: Any = None
        self._recent_success: deque[float] = deque(maxlen=SUCCESS_WINDOW)
        self._first_step = 0
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------ messages

    def _print(self, message: str) -> None:
        if self.mode == "bar":
            console = self._progress.console if self._progress else self._rich_console()
            console.print(message, markup=False, highlight=False, soft_wrap=True)
        else:
            self.log(message)

    def info(self, message: str) -> None:
        """Set-up progress and the announcement of a long wait: not in quiet mode."""
        if self.mode != "quiet":
            self._print(message)

    def notice(self, message: str) -> None:
        """Start, evaluations, checkpoints, the final summary: in every mode."""
        self._print(message)

    # ------------------------------------------------------------------ steps

    def start(self, first_step: int) -> None:
        """The training loop begins at `first_step` (> 0 when resuming)."""
        self._first_step = first_step
        self._t0 = time.monotonic()
        if self.mode == "bar":
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            self._progress = Progress(
                TextColumn("step"),
                MofNCompleteColumn(),
                BarColumn(),
                TextColumn("{task.fields[stats]}"),
                console=self._rich_console(),
                transient=False,
            )
            self._task = self._progress.add_task(
                "train", total=self.total_steps, completed=first_step, stats="ETA after a step"
            )
            self._progress.start()

    def step(self, t: int, metrics: dict[str, Any], seconds: float) -> None:
        """Step `t` (0-based) finished in `seconds` with `metrics`."""
        if metrics.get("success_rate") is not None:
            self._recent_success.append(metrics["success_rate"])
        if self.mode == "lines":
            n = len(self._recent_success)
            self.log(
                f"step {t + 1}/{self.total_steps}  {format_metrics(metrics, STEP_LINE)}"
                f"  (success over the last {n} steps "
                f"{sum(self._recent_success) / max(n, 1):.2f}; {seconds:.1f}s)"
            )
        elif self.mode == "bar":
            self._progress.update(self._task, completed=t + 1, stats=self.bar_stats(t, metrics))

    def bar_stats(self, t: int, metrics: dict[str, Any]) -> str:
        eta = eta_seconds(
            time.monotonic() - self._t0, t + 1 - self._first_step, self.total_steps - t - 1
        )
        eta_text = "ETA -" if eta is None else f"ETA {format_duration(eta)}"
        return f"{format_metrics(metrics, BAR_FIELDS)}  {eta_text}".strip()

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def _rich_console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console()
        return self._console
