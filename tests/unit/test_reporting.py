"""The Reporter and its sinks (TensorBoard, W&B offline, Ray metrics mapping), the secret scrub, and
the Grafana dashboard's queries. No Ray here: tests/ray/test_dashboard_metrics.py reads Ray's
Prometheus endpoint."""

from __future__ import annotations

import json
import re
import secrets
import struct
import sys
from pathlib import Path

import pytest

from spear_ray import dashboard_metrics
from spear_ray.config import ConfigError, load_config
from spear_ray.dashboard_metrics import METRICS, DashboardMetrics, exported_names, readings
from spear_ray.reporting import REDACTED, Reporter, scalars, scrub, secret_values
from spear_ray.run_dir import RunDir

DASHBOARD = Path(__file__).parents[2] / "clusters" / "grafana" / "spear-ray-dashboard.json"

STEP_ROWS = [
    {
        "step": t,
        "reward/mean": 0.25 * t,
        "success_rate": 0.5,
        "buffer/size": 3 + t,
        "time/rollout": 1.5,
        "update/entropy": float("nan"),  # not finite: never forwarded
        "weight_version": t + 1,
    }
    for t in range(3)
]
EVAL_ROW = {"step": 3, "eval/success_rate": 0.75, "eval/infra_failures": 0}


# ----------------------------------------------------------------------------- secrets


def test_secret_values_take_long_values_of_secret_looking_names():
    env = {
        "WANDB_API_KEY": "k" * 40,
        "RAY_AUTH_TOKEN": "tok-123456",
        "db_password": "hunter22",
        "AWS_SECRET_ACCESS_KEY": "abc/def+ghi",
        "TOKENIZERS_PARALLELISM": "false",  # a TOKEN name, but a value too short to be a secret
        "HOME": "/home/someone",
    }
    assert secret_values(env) == ["k" * 40, "abc/def+ghi", "tok-123456", "hunter22"]


def test_scrub_replaces_secrets_in_nested_strings_and_keys():
    value = {"a": ["x tok-123456 y", ("tok-123456",)], "tok-123456": 1, "n": 2.5, "b": None}
    assert scrub(value, ["tok-123456"]) == {
        "a": [f"x {REDACTED} y", (REDACTED,)],
        REDACTED: 1,
        "n": 2.5,
        "b": None,
    }


def test_scalars_keep_finite_numbers_and_drop_the_step():
    row = {"step": 4, "a": 1, "b": 2.5, "c": float("inf"), "d": None, "e": "text", "f": True}
    assert scalars(row) == {"a": 1.0, "b": 2.5}


# ----------------------------------------------------------------------------- sinks


def _wandb_records(path: Path) -> list:
    """The records of a .wandb file: a 7-byte header, then LevelDB-log framed protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, records, parts = 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            continue
        parts = chunk if kind == 2 else parts + chunk  # 1 full, 2 first, 3 middle, 4 last
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def _history(records) -> dict[int, dict[str, float]]:
    steps: dict[int, dict[str, float]] = {}
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        items = {
            item.key or "/".join(item.nested_key): json.loads(item.value_json)
            for item in record.history.item
        }
        steps[int(items.get("_step", 0))] = items
    return steps


@pytest.fixture
def planted_secrets(monkeypatch) -> dict[str, str]:
    values = {
        "WANDB_API_KEY": secrets.token_hex(20),
        "RAY_AUTH_TOKEN": secrets.token_urlsafe(24),
        "SPEAR_DB_PASSWORD": secrets.token_hex(8),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    return values


def test_tensorboard_and_wandb_get_the_metrics_and_no_secret(tmp_path, planted_secrets):
    token = planted_secrets["RAY_AUTH_TOKEN"]
    config = load_config(
        "demo",
        [
            f"run.runs_dir={tmp_path}",
            "run.name=secrets",
            "run.loggers=[jsonl, tensorboard, wandb]",
            f"model.path=/models/{token}/policy",  # a secret inside the config itself
        ],
    )
    # (not RunDir.create: its config.yaml is the run's own resolved config, not the Reporter's)
    run = RunDir(tmp_path / "secrets")
    run.path.mkdir()
    reporter = Reporter.open(config, run)
    try:
        for row in STEP_ROWS:
            reporter.log(row)
        reporter.log({**EVAL_ROW, "note": f"checkpoint at /ckpt/{token}"})
    finally:
        reporter.close()

    files = [p for p in run.path.rglob("*") if p.is_file()]
    assert len(files) >= 3
    for path in files:
        data = path.read_bytes()
        for name, value in planted_secrets.items():
            assert value.encode() not in data, f"{name} found in {path.relative_to(run.path)}"

    rows = run.read_metrics()
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert rows[-1]["note"] == f"checkpoint at /ckpt/{REDACTED}"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    assert "update/entropy" not in events.Tags()["scalars"]
    reward = events.Scalars("reward/mean")
    assert [(e.step, e.value) for e in reward] == [(0, 0.0), (1, 0.25), (2, 0.5)]
    assert [(e.step, e.value) for e in events.Scalars("eval/success_rate")] == [(3, 0.75)]
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"path: /models/{REDACTED}/policy" in config_text

    (wandb_file,) = (run.path / "wandb").glob("offline-run-*/run-*.wandb")
    records = _wandb_records(wandb_file)
    kinds = {r.WhichOneof("record_type") for r in records}
    assert "environment" not in kinds and "stats" not in kinds  # no machine/program metadata
    history = _history(records)
    assert [history[t]["reward/mean"] for t in range(3)] == [0.0, 0.25, 0.5]
    assert history[3]["eval/success_rate"] == 0.75
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    logged = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    assert logged["model"]["path"] == f"/models/{REDACTED}/policy"
    assert run_record.project == "spear-ray" and run_record.display_name == "secrets"


def test_wandb_run_id_is_kept_so_a_resumed_run_continues_it(tmp_path):
    config = load_config("demo", [f"run.runs_dir={tmp_path}", "run.loggers=[wandb]"])
    run = RunDir(tmp_path / "demo")
    run.path.mkdir()
    for _ in range(2):
        Reporter.open(config, run).close()
    run_id = (run.path / "wandb" / "run_id").read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{8}", run_id)
    runs = list((run.path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(f"-{run_id}" in p.name for p in runs)


def test_jsonl_only_by_default(tmp_path):
    config = load_config("demo", [f"run.runs_dir={tmp_path}"])
    assert config.run.loggers == ["jsonl"]
    run = RunDir(tmp_path / "demo")
    run.path.mkdir()
    reporter = Reporter.open(config, run)
    assert [type(s) for s in reporter.sinks] == [DashboardMetrics]
    reporter.log(STEP_ROWS[0])
    reporter.close()
    assert sorted(p.name for p in run.path.iterdir()) == ["metrics.jsonl"]


def test_missing_wandb_is_a_one_line_error_naming_run_loggers(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    config = load_config("demo", [f"run.runs_dir={tmp_path}", "run.loggers=[tensorboard, wandb]"])
    run = RunDir(tmp_path / "demo")
    run.path.mkdir()
    with pytest.raises(ConfigError) as err:
        Reporter.open(config, run)
    message = str(err.value)
    assert message.startswith("run.loggers: wandb") and "\n" not in message
    assert "spear-ray[wandb]" in message


def test_a_failing_sink_is_dropped_and_the_others_go_on(tmp_path, capsys):
    class Broken:
        closed = False

        def write(self, step, values):
            raise OSError("disk full")

        def close(self):
            Broken.closed = True

    class Recorder:
        def __init__(self):
            self.seen = []

        def write(self, step, values):
            self.seen.append((step, values))

        def close(self):
            pass

    run = RunDir(tmp_path)
    good = Recorder()
    reporter = Reporter(run, [Broken(), good], secrets=[])
    reporter.log(STEP_ROWS[0])
    reporter.log(STEP_ROWS[1])
    reporter.log({"step": 2, "event": "resumed"})  # no numbers: nothing to forward
    reporter.close()
    assert [step for step, _ in good.seen] == [0, 1]
    assert good.seen[1][1] == {
        "reward/mean": 0.25,
        "success_rate": 0.5,
        "buffer/size": 4.0,
        "time/rollout": 1.5,
        "weight_version": 2.0,
    }
    assert len(run.read_metrics()) == 3
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 1 and "Broken" in warnings[0] and "disk full" in warnings[0]
    assert not Broken.closed  # dropped sinks are not closed again at the end


# ----------------------------------------------------------------------------- Ray metrics


def test_metric_table_is_well_formed():
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for m in METRICS:
        assert re.fullmatch(r"spear_[a-z0-9_]+", m.name), m.name
        assert m.description
        assert bool(m.sources) != bool(m.prefix), m.name  # one way to find its keys
        tagged = [tag is not None for tag in m.sources.values()]
        assert all(tagged) if m.tag else not any(tagged), m.name
        assert m.kind in ("gauge", "counter", "histogram")
        assert (m.kind == "histogram") == bool(m.boundaries)
        assert not m.cumulative or m.kind == "counter"


def test_readings_map_row_keys_to_metrics_and_tags():
    row = {
        "step": 7,
        "reward/mean": 0.5,
        "reward/task": 1.0,
        "time/rollout": 2.0,
        "time/step": 3.0,
        "replay/clip_frac": 0.1,
        "success_rate": None,
        "staleness/mean": float("nan"),
        "unknown/key": 1.0,
    }
    got = {(m.name, tuple(tags.items()), value) for m, tags, value in readings(row)}
    assert got == {
        ("spear_step", (), 7.0),
        ("spear_reward", (("part", "total"),), 0.5),
        ("spear_reward", (("part", "task"),), 1.0),
        ("spear_phase_seconds", (("phase", "rollout"),), 2.0),
        ("spear_phase_seconds", (("phase", "step"),), 3.0),
        ("spear_step_seconds", (), 3.0),
        ("spear_clip_fraction", (("update", "replay"),), 0.1),
    }


def test_replay_trigger_counter_increments_by_the_growth_of_the_total(monkeypatch):
    import ray

    recorded: list[tuple[str, str, float, dict]] = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def set(self, value, tags):
            recorded.append((self.name, "set", value, tags))

        def inc(self, value, tags):
            recorded.append((self.name, "inc", value, tags))

        def observe(self, value, tags):
            recorded.append((self.name, "observe", value, tags))

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(dashboard_metrics, "_ray_metric", lambda m: Fake(m.name))
    sink = DashboardMetrics("run-a")
    for step, total in enumerate([0, 2, 2, 3]):
        sink.write(step, {"buffer/triggers_total": float(total), "time/step": 1.0})
    incs = [(value, tags) for name, op, value, tags in recorded if op == "inc"]
    assert incs == [(2.0, {"run": "run-a"}), (1.0, {"run": "run-a"})]
    observed = [name for name, op, _, _ in recorded if op == "observe"]
    assert observed == ["spear_step_seconds"] * 4
    assert all(tags["run"] == "run-a" for *_, tags in recorded)


def test_dashboard_sink_does_nothing_without_ray(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(dashboard_metrics, "_ray_metric", lambda m: pytest.fail("created"))
    DashboardMetrics("run-a").write(0, {"reward/mean": 1.0})


# ----------------------------------------------------------------------------- Grafana


def _queries(dashboard: dict) -> list[str]:
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_grafana_dashboard_queries_only_metrics_the_module_exports():
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["run"]["type"] == "query"
    assert "run" in variables["run"]["query"]
    queries = _queries(dashboard)
    assert queries and all('run=~"$run"' in q for q in queries)
    referenced = {name for q in queries for name in re.findall(r"\bray_[a-z0-9_]+", q)}
    run_query_names = set(re.findall(r"\bray_[a-z0-9_]+", variables["run"]["query"]))
    assert referenced | run_query_names <= exported_names()
    # every metric of the module has a panel
    for m in METRICS:
        assert any(f"ray_{m.name}" in q for q in queries), m.name
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["title"] and panel["targets"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
