"""SPEAR's metrics as Ray metrics: Ray's dashboard and any Prometheus that scrapes Ray show them.

One table, METRICS, says which metrics-row keys (spear_ray/controller.py `step_metrics`, the
learners' `update/*` and `replay/*`, the buffer's `buffer/*`, evaluation's `eval/*`) feed which
Ray metric. Every metric is tagged with the run name (tag "run") and at most one more tag that
tells its series apart (e.g. `phase`). The metric objects are created on the first row, in the
driver, and only while Ray is running.

Prometheus names: Ray prefixes each name with `ray_`; a counter gets `_total`, a histogram
`_bucket`, `_sum` and `_count` (see `exported_names`). clusters/grafana/spear-ray-dashboard.json
plots them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

RUN_TAG = "run"
STEP_SECONDS_BOUNDARIES = (1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 1800, 3600)


@dataclass(frozen=True)
class SpearMetric:
    name: str
    kind: Literal["gauge", "counter", "histogram"]
    description: str
    # row key -> value of the metric's `tag` (None when the metric has no tag of its own)
    sources: Mapping[str, str | None] = field(default_factory=dict)
    tag: str | None = None
    # every row key under this prefix is a source; the rest of the key is the tag value
    prefix: str | None = None
    # a counter fed by a running total (increments by how much the total grew)
    cumulative: bool = False
    boundaries: tuple[float, ...] = ()

    @property
    def tag_keys(self) -> tuple[str, ...]:
        return (RUN_TAG, self.tag) if self.tag else (RUN_TAG,)


METRICS: tuple[SpearMetric, ...] = (
    SpearMetric(
        "spear_step",
        "gauge",
        "Last step logged (a step row: its index; an evaluation row: steps done).",
        {"step": None},
    ),
    SpearMetric(
        "spear_reward",
        "gauge",
        "Mean reward of the step's valid trajectories by part (eval_task: held-out task reward).",
        {
            "reward/mean": "total",
            "reward/task": "task",
            "reward/tool_bonus": "tool_bonus",
            "eval/task_reward": "eval_task",
        },
        tag="part",
    ),
    SpearMetric(
        "spear_success_rate",
        "gauge",
        "Success rate of the step's trajectories (train) or of the held-out tasks (eval).",
        {"success_rate": "train", "eval/success_rate": "eval"},
        tag="split",
    ),
    SpearMetric(
        "spear_response_length_tokens",
        "gauge",
        "Mean tokens after the prompt per trajectory (generated and observation tokens).",
        {"response_length": None},
    ),
    SpearMetric(
        "spear_tool_calls_per_episode",
        "gauge",
        "Mean tool calls per trajectory.",
        {"tool_calls": None},
    ),
    SpearMetric(
        "spear_invalid_actions_per_episode",
        "gauge",
        "Mean invalid actions per trajectory.",
        {"invalid_actions": None},
    ),
    SpearMetric(
        "spear_infra_failures",
        "gauge",
        "Trajectories lost to an infrastructure failure in the last step (train) or evaluation.",
        {"infra_failures": "train", "eval/infra_failures": "eval"},
        tag="split",
    ),
    SpearMetric(
        "spear_buffer_rows",
        "gauge",
        "Replay buffer rows: stored, above the P50 baseline, and the replay trigger threshold.",
        {
            "buffer/size": "stored",
            "buffer/above_p50": "above_p50",
            "buffer/trigger_threshold": "trigger_threshold",
        },
        tag="rows",
    ),
    SpearMetric(
        "spear_replay_triggers",
        "counter",
        "Times the replay buffer's trigger fired (replay rows were drawn or too few survived).",
        {"buffer/triggers_total": None},
        cumulative=True,
    ),
    SpearMetric(
        "spear_replay_rows",
        "gauge",
        "Rows in the step's replay (SIL) batch.",
        {"spear/replay_rows": None},
    ),
    SpearMetric(
        "spear_sil_weight",
        "gauge",
        "w_SIL(t): the weight of the replay (self-imitation) loss.",
        {"spear/w_sil": None},
    ),
    SpearMetric(
        "spear_tool_reward_lambda",
        "gauge",
        "lambda_tc(t): the weight of the tool-call reward.",
        {"spear/lambda_tc": None},
    ),
    SpearMetric(
        "spear_replay_advantage_mean",
        "gauge",
        "Mean recalibrated advantage of the latest replay batch.",
        {"buffer/replay_mean_advantage_last": None},
    ),
    SpearMetric(
        "spear_entropy",
        "gauge",
        "Token-mean policy entropy on loss tokens, per update.",
        {"update/entropy": "on_policy", "replay/entropy": "replay"},
        tag="update",
    ),
    SpearMetric(
        "spear_clip_fraction",
        "gauge",
        "Fraction of loss tokens where PPO's clipped branch was taken, per update.",
        {"update/clip_frac": "on_policy", "replay/clip_frac": "replay"},
        tag="update",
    ),
    SpearMetric(
        "spear_loss",
        "gauge",
        "Loss that was backpropagated, per update (the replay one weighted by w_SIL).",
        {"update/loss": "on_policy", "replay/loss": "replay"},
        tag="update",
    ),
    SpearMetric(
        "spear_staleness_versions",
        "gauge",
        "Weight versions between a trajectory's sampling weights and the learner's (mean, max).",
        {"staleness/mean": "mean", "staleness/max": "max"},
        tag="stat",
    ),
    SpearMetric(
        "spear_phase_seconds",
        "gauge",
        "Wall-clock seconds of each phase of the last step (phase=step: the whole step).",
        tag="phase",
        prefix="time/",
    ),
    SpearMetric(
        "spear_step_seconds",
        "histogram",
        "Wall-clock seconds per training step.",
        {"time/step": None},
        boundaries=STEP_SECONDS_BOUNDARIES,
    ),
    SpearMetric(
        "spear_tokens_per_second",
        "gauge",
        "Throughput: generated tokens per second of the rollout's wall time (stage rollout); "
        "tokens forwarded per second of each update, summed over ranks (update stages).",
        {
            "rollout/tokens_per_s": "rollout",
            "update/tokens_per_s": "update",
            "replay/tokens_per_s": "update_replay",
        },
        tag="stage",
    ),
)


def exported_names(metrics: tuple[SpearMetric, ...] = METRICS) -> set[str]:
    """The Prometheus series names Ray exports for `metrics`."""
    names: set[str] = set()
    for m in metrics:
        base = f"ray_{m.name}"
        if m.kind == "counter":
            names.add(f"{base}_total")
        elif m.kind == "histogram":
            names.update(f"{base}_{suffix}" for suffix in ("bucket", "sum", "count"))
        else:
            names.add(base)
    return names


def readings(
    row: Mapping[str, Any], metrics: tuple[SpearMetric, ...] = METRICS
) -> Iterator[tuple[SpearMetric, dict[str, str], float]]:
    """(metric, tags without the run tag, value) for each number of `row` that a metric takes."""
    for m in metrics:
        if m.prefix:
            pairs = [(k, k[len(m.prefix) :]) for k in row if k.startswith(m.prefix)]
        else:
            pairs = [(k, tag) for k, tag in m.sources.items() if k in row]
        for key, tag_value in pairs:
            value = row[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value):
                continue
            yield m, ({m.tag: tag_value} if m.tag else {}), float(value)


_RAY_METRICS: dict[str, Any] = {}  # one Ray metric object per name and driver process


def _ray_metric(m: SpearMetric) -> Any:
    """The Ray metric object of `m`, created on first use (runs of an experiment share it)."""
    if m.name not in _RAY_METRICS:
        from ray.util.metrics import Counter, Gauge, Histogram

        if m.kind == "gauge":
            made = Gauge(m.name, description=m.description, tag_keys=m.tag_keys)
        elif m.kind == "counter":
            made = Counter(m.name, description=m.description, tag_keys=m.tag_keys)
        else:
            boundaries = list(m.boundaries)
            made = Histogram(m.name, m.description, boundaries=boundaries, tag_keys=m.tag_keys)
        _RAY_METRICS[m.name] = made
    return _RAY_METRICS[m.name]


class DashboardMetrics:
    """A Reporter sink: records each row into Ray's metrics while Ray is running."""

    def __init__(self, run_name: str, metrics: tuple[SpearMetric, ...] = METRICS):
        self.run_name = run_name
        self.metrics = metrics
        self._totals: dict[tuple[str, tuple], float] = {}  # last running total per counter series

    def write(self, step: int, values: dict[str, float]) -> None:
        import ray

        if not ray.is_initialized():
            return
        for m, tags, value in readings({**values, "step": step}, self.metrics):
            tags = {RUN_TAG: self.run_name, **tags}
            metric = _ray_metric(m)
            if m.kind == "gauge":
                metric.set(value, tags=tags)
            elif m.kind == "histogram":
                metric.observe(value, tags=tags)
            else:
                if m.cumulative:
                    series = (m.name, tuple(sorted(tags.items())))
                    value, self._totals[series] = value - self._totals.get(series, 0.0), value
                if value > 0:
                    metric.inc(value, tags=tags)

    def close(self) -> None:
        """Nothing to release: Ray's metrics live as long as the driver's Ray connection."""
