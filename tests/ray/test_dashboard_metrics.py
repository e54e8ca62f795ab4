"""SPEAR's Ray metrics on a real local Ray: rows built by the real producers (the controller's
step_metrics, the learners' metric names, the replay buffer's stats, evaluation_metrics) are
recorded by DashboardMetrics in the driver and read back from the node's Prometheus endpoint."""

from __future__ import annotations

import time
import urllib.request
import uuid

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from buffers.replay_buffer import ReplayBuffer
from learners.learner_rank import METRIC_REDUCTIONS
from spear_ray.config import load_config
from spear_ray.containers import RewardParts, Trajectory
from spear_ray.controller import StepRecord, step_metrics
from spear_ray.dashboard_metrics import METRICS, DashboardMetrics, exported_names, readings
from spear_ray.evaluation import evaluation_metrics
from spear_ray.recipe import Recipe
from spear_ray.reporting import scalars

pytestmark = pytest.mark.ray

EXPORT_WAIT_S = 60  # Ray's metrics agent exports every few seconds


def _trajectory(i: int, *, success: bool, failure: str | None = None) -> Trajectory:
    return Trajectory(
        task_id=f"t{i}",
        group_id=0,
        env_seed=i,
        prompt_length=2,
        token_ids=[1, 2, 3, 4, 5, 6],
        loss_mask=[0, 0, 1, 1, 0, 1],
        behaviour_logprobs=[0.0, 0.0, -0.1, -0.2, 0.0, -0.3],
        rewards=RewardParts(task=1.0 if success else 0.0, tool_bonus=0.1),
        tool_calls=2,
        invalid_actions=1,
        success=success,
        weight_version=3,
        failure=failure,
    )


def _rows() -> tuple[dict, dict]:
    """A step row and an evaluation row, as run_training logs them."""
    trajectories = [
        _trajectory(0, success=True),
        _trajectory(1, success=False),
        _trajectory(2, success=True, failure="sandbox died"),
    ]
    buffer_stats = ReplayBuffer(
        Recipe.from_config(load_config(None, ["buffer.size=4"])).replay
    ).stats()
    buffer_stats.update(size=5, above_p50=3, triggers_total=2, replay_mean_advantage_last=0.25)
    learner = {name: 0.5 for name in METRIC_REDUCTIONS}
    step = step_metrics(
        StepRecord(
            step=4,
            trajectories=trajectories,
            filter_counts={"void_turn": 1},
            on_policy={**learner, "entropy": 1.25, "tokens_per_s": 800.0},
            replay={**learner, "entropy": 0.75},
            buffer=buffer_stats,
            w_sil=0.5,
            lambda_tc=0.9,
            weight_version=4,
            seconds={"rollout": 2.0, "experience": 0.5, "update": 1.5},
            replay_rows=2,
            rollout_seconds=4.0,
        )
    )
    evaluation = {"step": 5, **evaluation_metrics(trajectories)}
    return step, evaluation


def _series(port: int, run: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels other than Ray's own) -> value, for the samples of `run`."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("run") == run:
                labels = {
                    k: v
                    for k, v in sample.labels.items()
                    if k in ("part", "split", "rows", "update", "stat", "phase", "stage", "le")
                }
                out[(sample.name, frozenset(labels.items()))] = sample.value
    return out


def test_every_metric_is_fed_by_the_rows_a_run_logs():
    step, evaluation = _rows()
    fed = {m.name for row in (step, evaluation) for m, _, _ in readings(row)}
    assert fed == {m.name for m in METRICS}


def test_recorded_rows_reach_rays_prometheus_endpoint(ray_local):
    step, evaluation = _rows()
    run = f"dash-{uuid.uuid4().hex[:8]}"
    sink = DashboardMetrics(run)
    sink.write(step["step"], scalars(step))
    sink.write(evaluation["step"], scalars(evaluation))

    (node,) = [n for n in ray.nodes() if n["Alive"]]
    port = node["MetricsExportPort"]
    wanted = exported_names()
    deadline = time.monotonic() + EXPORT_WAIT_S
    series: dict = {}
    while time.monotonic() < deadline:
        series = _series(port, run)
        if wanted <= {name for name, _ in series}:
            break
        time.sleep(2)
    missing = wanted - {name for name, _ in series}
    assert not missing, f"not exported within {EXPORT_WAIT_S} s: {sorted(missing)}"

    def value(name: str, **labels: str) -> float:
        return series[(name, frozenset(labels.items()))]

    assert value("ray_spear_reward", part="total") == pytest.approx(step["reward/mean"])
    assert value("ray_spear_success_rate", split="train") == pytest.approx(0.5)
    assert value("ray_spear_success_rate", split="eval") == pytest.approx(0.5)
    assert value("ray_spear_infra_failures", split="train") == 1
    assert value("ray_spear_buffer_rows", rows="above_p50") == 3
    assert value("ray_spear_buffer_rows", rows="trigger_threshold") == 6  # 1.5 x size 4
    assert value("ray_spear_replay_triggers_total") == 2
    assert value("ray_spear_replay_rows") == 2
    assert value("ray_spear_sil_weight") == pytest.approx(0.5)
    assert value("ray_spear_tool_reward_lambda") == pytest.approx(0.9)
    assert value("ray_spear_replay_advantage_mean") == pytest.approx(0.25)
    assert value("ray_spear_entropy", update="on_policy") == pytest.approx(1.25)
    assert value("ray_spear_entropy", update="replay") == pytest.approx(0.75)
    assert value("ray_spear_step") == 5  # the evaluation row came last
    phases = {dict(labels)["phase"] for name, labels in series if name == "ray_spear_phase_seconds"}
    assert phases == {"rollout", "experience", "update", "step"}
    assert value("ray_spear_step_seconds_count") == 1
    buckets = {
        float(dict(labels)["le"]): v
        for (name, labels), v in series.items()
        if name == "ray_spear_step_seconds_bucket"
    }
    assert buckets[2.0] == 0 and buckets[5.0] == 1  # the step took 4 s
    assert value("ray_spear_tokens_per_second", stage="update") == pytest.approx(800.0)
    # 3 trajectories (the failed one generated too) x 3 generated tokens, over 4 s of rollout
    assert value("ray_spear_tokens_per_second", stage="rollout") == pytest.approx(9 / 4.0)
    assert value("ray_spear_tokens_per_second", stage="update_replay") == pytest.approx(0.5)
