"""`spear-ray train` refuses bad input before it writes anything or starts Ray: exit status 2,
one line on stderr naming the file, YAML line, override or field, no new run directory, and a
run directory given to --resume left byte for byte (and mtime for mtime) as it was.

Most cases call cli.main in-process with run_training replaced by a recorder (a check that lets
bad input through fails the test instead of starting Ray); three run the real `spear-ray train`
in a subprocess. The tokenizer cases import transformers once (several seconds).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import spear_ray.train as train
from spear_ray import cli
from spear_ray.config import load_config
from spear_ray.preflight import RESUMABLE_FIELDS, PreflightError, check_address
from spear_ray.run_dir import COMPLETE, RunDir

PREFIX = "spear-ray: error: "


@pytest.fixture(autouse=True)
def started(monkeypatch):
    """The run_training calls that got through the preflight (no Ray is ever started here)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the preflight would set it for the session
    calls: list[dict] = []
    monkeypatch.setattr(
        train, "run_training", lambda config, **kw: calls.append({"config": config, **kw})
    )
    return calls


def _refused(argv: list[str], capsys, started) -> str:
    """Run `spear-ray train ARGV`; assert exit 2, one stderr line, no training; that line."""
    code = cli.main(["train", *argv])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX) and "Traceback" not in err
    assert started == []
    return lines[0].removeprefix(PREFIX)


def _snapshot(root: Path) -> dict[str, tuple]:
    """Every file and directory under root: kind, size, mtime and content."""
    found: dict[str, tuple] = {}
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        content = path.read_bytes() if path.is_file() else None
        found[str(path.relative_to(root))] = (
            path.is_dir(),
            stat.st_size,
            stat.st_mtime_ns,
            content,
        )
    return found


@pytest.fixture
def runs(tmp_path):
    return tmp_path / "runs"


def _new(runs: Path, *overrides: str) -> list[str]:
    return [f"run.runs_dir={runs}", *overrides]


# ----------------------------------------------------------------------------- config


def test_yaml_syntax_error_names_file_line_and_column(tmp_path, runs, capsys, started):
    path = tmp_path / "bad.yaml"
    path.write_text(f"run:\n  runs_dir: {runs}\n  name: [unclosed\n")
    line = _refused(["--config", str(path)], capsys, started)
    assert line.startswith(f"{path}:") and "YAML syntax error" in line
    assert not runs.exists()


def test_unknown_field_names_the_yaml_line_and_the_known_fields(tmp_path, runs, capsys, started):
    path = tmp_path / "typo.yaml"
    path.write_text(f"run:\n  runs_dir: {runs}\nrollout:\n  temprature: 1.0\n")
    line = _refused(["--config", str(path)], capsys, started)
    assert line.startswith(f"{path}:4: rollout.temprature: unknown field")
    assert "temperature" in line  # the hint lists the real name
    assert not runs.exists()


@pytest.mark.parametrize(
    ("override", "field", "needle"),
    [
        ("rollout.temperature=hot", "rollout.temperature", "hot"),  # wrong type
        ("learner.lr=-1", "learner.lr", "greater than 0"),  # out of range
        ("learner.num_ranks=3", "rollout.prompts_per_step", "learner.num_ranks"),  # 32 % 3
        ("learner.tokens_per_micro_batch=100", "learner.tokens_per_micro_batch", "768"),
        ("env.name=nope", "env.name", "known envs: frozenlake, gym, python_math, sokoban"),
    ],
)
def test_bad_values_name_the_field(runs, capsys, started, override, field, needle):
    line = _refused(_new(runs, override), capsys, started)
    assert f"{field}: " in line and needle in line, line
    assert not runs.exists()


def test_config_and_resume_together_are_refused(runs, capsys, started):
    line = _refused(["--config", "demo", "--resume", str(runs / "x")], capsys, started)
    assert line.startswith("--config demo with --resume") and "drop --config" in line


def test_existing_run_is_refused_before_any_check_and_left_alone(runs, capsys, started):
    run = RunDir.create(load_config("demo", _new(runs)))
    before = _snapshot(runs)
    line = _refused(_new(runs, "model.path=/no/such/model"), capsys, started)
    assert f"{run.path} already exists; continue it with --resume" in line
    assert _snapshot(runs) == before


def test_runs_dir_that_is_a_file(tmp_path, capsys, started):
    (tmp_path / "afile").write_text("x")
    line = _refused([f"run.runs_dir={tmp_path / 'afile' / 'runs'}"], capsys, started)
    assert "run.runs_dir: " in line and "is a file" in line


# ----------------------------------------------------------------------------- model, tokenizer


def _tokenizer_files(to: Path, *, chat_template: bool) -> Path:
    from spear_ray.models import ensure_tokenizer

    to.mkdir(parents=True, exist_ok=True)
    source = ensure_tokenizer()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, to / name)
    config = json.loads((to / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (to / "tokenizer_config.json").write_text(json.dumps(config))
    if chat_template:
        shutil.copy(source / "chat_template.jinja", to / "chat_template.jinja")
    return to


def _model_dir(to: Path, *, chat_template: bool = True) -> Path:
    """config.json, a (placeholder) weights file and the project tokenizer."""
    from spear_ray.models import builtin_dir

    _tokenizer_files(to, chat_template=chat_template)
    shutil.copy(builtin_dir("tiny-llama") / "config.json", to / "config.json")
    (to / "model.safetensors").write_bytes(b"")  # the preflight does not read weights
    return to


def test_missing_model_path(tmp_path, runs, capsys, started):
    missing = tmp_path / "no-model"
    line = _refused(_new(runs, f"model.path={missing}"), capsys, started)
    assert line.startswith(f"override 'model.path={missing}': model.path: ")
    assert "does not exist" in line and "builtin:tiny-llama" in line
    assert not runs.exists()


def test_unknown_builtin_model(runs, capsys, started):
    line = _refused(_new(runs, "model.path=builtin:nope"), capsys, started)
    assert "model.path: unknown builtin model builtin:nope; known: builtin:" in line


@pytest.mark.parametrize(
    ("files", "problem"),
    [
        ({}, "no config.json"),
        ({"config.json": "{not json"}, "config.json is not readable JSON"),
        ({"config.json": "{}", "README.md": "weights elsewhere"}, "no weights"),
    ],
)
def test_directory_that_is_not_a_model(tmp_path, runs, capsys, started, files, problem):
    model = tmp_path / "model"
    model.mkdir()
    for name, text in files.items():
        (model / name).write_text(text)
    line = _refused(_new(runs, f"model.path={model}"), capsys, started)
    assert f"model.path: {model} is not a model directory ({problem}" in line, line
    assert not runs.exists()


def test_a_file_that_is_not_a_gguf_model(tmp_path, runs, capsys, started):
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 16)
    line = _refused(_new(runs, f"model.path={weights}"), capsys, started)
    assert f"model.path: {weights} is a file but not a .gguf model" in line


def test_model_path_from_a_config_file_names_its_line(tmp_path, runs, capsys, started):
    path = tmp_path / "run.yaml"
    path.write_text(f"model:\n  path: {tmp_path / 'gone'}\nrun:\n  runs_dir: {runs}\n")
    line = _refused(["--config", str(path)], capsys, started)
    assert line.startswith(f"{path}:2: model.path: ")


def test_tokenizer_without_chat_template_is_refused_naming_model_path(
    tmp_path, runs, capsys, started
):
    model = _model_dir(tmp_path / "base-model", chat_template=False)
    line = _refused(_new(runs, f"model.path={model}"), capsys, started)
    assert line.startswith(f"override 'model.path={model}': model.path: tokenizer {model}")
    assert "has no chat template" in line
    assert not runs.exists()


def test_tokenizer_path_without_chat_template_is_refused_naming_it(tmp_path, runs, capsys, started):
    tokenizer = _tokenizer_files(tmp_path / "tok", chat_template=False)
    line = _refused(_new(runs, f"model.tokenizer_path={tokenizer}"), capsys, started)
    assert "model.tokenizer_path: tokenizer " in line and "has no chat template" in line


def test_model_directory_without_a_tokenizer(tmp_path, runs, capsys, started):
    model = _model_dir(tmp_path / "m")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model / name).unlink()
    line = _refused(_new(runs, f"model.path={model}"), capsys, started)
    assert f"model.path: cannot load a tokenizer from {model}" in line
    assert "model.tokenizer_path" in line


def test_a_good_model_directory_passes_and_then_the_run_is_created(tmp_path, runs, capsys, started):
    model = _model_dir(tmp_path / "m")
    assert cli.main(["train", *_new(runs, f"model.path={model}")]) == 0
    assert len(started) == 1 and started[0]["resume"] is False
    assert (runs / "demo" / "config.yaml").is_file()  # created after the checks


# ----------------------------------------------------------------------------- dataset


def _math(runs: Path, data: Path) -> list[str]:
    return _new(runs, "env.name=python_math", f"env.options.data_path={data}")


@pytest.mark.parametrize(
    ("content", "where", "needle"),
    [
        (None, ":0:", "no such file or directory"),
        (b"", ":0:", "no rows"),
        (
            b'{"prompt": "1+1?", "answer": "2"}\n{"prompt": "caf\xe9", "answer": "1"}\n',
            ":2:",
            "not UTF-8",
        ),
        (b'{"prompt": "1+1?", "answer": "2"}\n\n{"prompt": "2+2?"}\n', ":3:", "no answer"),
        (b'{"answer": "2"}\n', ":1:", "'prompt' is missing"),
        (b'{"prompt": "1+1?", "answer": "2"}\n{"prompt": \n', ":2:", "invalid JSON"),
    ],
    ids=["missing", "empty", "not-utf8", "no-answer", "no-prompt", "bad-json"],
)
def test_bad_dataset_is_named_by_file_and_line(
    tmp_path, runs, capsys, started, content, where, needle
):
    data = tmp_path / "problems.jsonl"
    if content is not None:
        data.write_bytes(content)
    line = _refused(_math(runs, data), capsys, started)
    assert line.startswith(f"override 'env.options.data_path={data}': env.options.data_path: ")
    assert f"{data}{where}" in line and needle in line, line
    assert not runs.exists()


# ----------------------------------------------------------------------------- --address


def test_address_where_nothing_answers(runs, capsys, started):
    line = _refused([*_new(runs), "--address", "127.0.0.1:1"], capsys, started)
    assert line.startswith("--address 127.0.0.1:1: no Ray answers there (")
    assert "leave --address out" in line
    assert not runs.exists()


def test_ray_address_from_the_environment_is_named(runs, capsys, started, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    line = _refused(_new(runs), capsys, started)
    assert line.startswith("RAY_ADDRESS 127.0.0.1:1: no Ray answers there")
    assert "unset RAY_ADDRESS" in line


def test_address_that_is_not_host_and_port():
    with pytest.raises(PreflightError, match="expected HOST:PORT"):
        check_address("headnode")


def test_dashboard_url_is_not_a_cluster_address(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")
    with pytest.raises(
        PreflightError, match=r"^RAY_ADDRESS http://127.0.0.1:8265: a dashboard URL"
    ):
        check_address(None)


def test_a_port_that_answers_but_is_not_ray(tmp_path):
    """A listening socket that closes without speaking gRPC is not a Ray head."""
    import socket
    import threading

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def serve():
        for _ in range(2):  # the TCP probe, then the gRPC call
            conn, _ = server.accept()
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(PreflightError, match=f"--address 127.0.0.1:{port}: no Ray answers"):
            check_address(f"127.0.0.1:{port}", timeout_s=5)
    finally:
        server.close()


# ----------------------------------------------------------------------------- --resume


def _run_with_checkpoint(runs: Path, *, complete: bool = True) -> RunDir:
    run = RunDir.create(load_config("demo", _new(runs)))
    run.log_metrics({"step": 0, "reward/mean": 0.25})
    if complete:
        with run.checkpoint(0) as directory:
            (directory / "buffer.npz").write_bytes(b"rows")
    else:
        partial = run.checkpoints_dir / "step_000009"
        partial.mkdir(parents=True)
        (partial / "buffer.npz").write_bytes(b"half")
    return run


def test_resume_of_a_missing_directory(tmp_path, capsys, started):
    line = _refused(["--resume", str(tmp_path / "nope")], capsys, started)
    assert line == f"--resume {tmp_path / 'nope'}: does not exist; give the run directory (RUN_DIR)"


def test_resume_of_a_directory_that_is_not_a_run(tmp_path, capsys, started):
    (tmp_path / "notes.txt").write_text("hello")
    before = _snapshot(tmp_path)
    line = _refused(["--resume", str(tmp_path)], capsys, started)
    assert "not a spear-ray run directory (no config.yaml)" in line
    assert _snapshot(tmp_path) == before


def test_resume_of_a_checkpoint_points_at_its_run(runs, capsys, started):
    run = _run_with_checkpoint(runs)
    line = _refused(["--resume", str(run.latest_checkpoint())], capsys, started)
    assert f"give the run directory {run.path}, not one of its checkpoints" in line


@pytest.mark.parametrize(
    ("override", "field", "was", "now"),
    [
        ("learner.num_ranks=2", "learner.num_ranks", "1", "2"),
        ("learner.zero_stage=3", "learner.zero_stage", "1", "3"),
        (
            "model.path=builtin:tiny-random",
            "model.path",
            '"builtin:tiny-llama"',
            '"builtin:tiny-random"',
        ),
        ("rollout.prompts_per_step=4", "rollout.prompts_per_step", "8", "4"),
        ("algo.advantage.estimator=gigpo", "algo.advantage.estimator", '"grpo"', '"gigpo"'),
        ("env.options={max_turns: 3}", "env.options.max_turns", "8", "3"),
        ("run.seed=1", "run.seed", "0", "1"),
    ],
)
def test_resume_refuses_changes_a_checkpoint_cannot_follow(
    runs, capsys, started, override, field, was, now
):
    run = _run_with_checkpoint(runs)
    before = _snapshot(runs)
    line = _refused(["--resume", str(run.path), override], capsys, started)
    assert line.startswith(f"override {override!r}: {field}: cannot change when resuming "), line
    assert f"(the run has {was}, this gives {now})" in line
    assert "run.total_steps" in line  # the allow-list is shown
    assert _snapshot(runs) == before


def test_resume_allows_length_checkpointing_logging_and_timeouts(runs, capsys, started):
    run = _run_with_checkpoint(runs)
    before = _snapshot(runs)
    allowed = [
        "run.total_steps=80",
        "run.eval_every_steps=0",
        "checkpoint.every_steps=5",
        "rollout.num_workers=2",
        "rollout.trajectory_timeout_s=60",
    ]
    assert cli.main(["train", "--resume", str(run.path), *allowed]) == 0
    (call,) = started
    assert call["resume"] is True and call["run"].path == run.path
    assert call["config"].run.total_steps == 80 and call["config"].rollout.num_workers == 2
    assert _snapshot(runs) == before  # the checks wrote nothing into the run


def test_resume_of_a_run_without_a_complete_checkpoint(runs, capsys, started):
    run = _run_with_checkpoint(runs, complete=False)
    before = _snapshot(runs)
    line = _refused(["--resume", str(run.path)], capsys, started)
    assert line.startswith(f"--resume {run.path}: no complete checkpoint to resume from (")
    every = load_config("demo").checkpoint.every_steps
    assert f"step_000009: no {COMPLETE} marker" in line
    assert f"checkpoint.every_steps={every}" in line
    assert _snapshot(runs) == before


def test_resume_of_a_run_that_never_checkpointed(runs, capsys, started):
    run = RunDir.create(load_config("demo", _new(runs)))
    line = _refused(["--resume", str(run.path)], capsys, started)
    assert "no complete checkpoint to resume from (no checkpoints/ directory;" in line


def test_resume_dead_address_leaves_the_run_alone(runs, capsys, started):
    run = _run_with_checkpoint(runs)
    before = _snapshot(runs)
    line = _refused(["--resume", str(run.path), "--address", "127.0.0.1:1"], capsys, started)
    assert line.startswith("--address 127.0.0.1:1: no Ray answers there")
    assert _snapshot(runs) == before


def test_allow_list_names_only_fields_that_exist_or_patterns():
    fields = set(_flat_fields(load_config("demo").model_dump(mode="json")))
    for entry in RESUMABLE_FIELDS:
        if "*" not in entry:
            section = entry.split(".")[0]
            # fields of other work in progress may be missing; the section must exist
            assert any(f.startswith(section + ".") for f in fields), entry


def _flat_fields(value, prefix=""):
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _flat_fields(item, f"{prefix}{key}.")
    else:
        yield prefix.rstrip(".")


# ----------------------------------------------------------------------------- the real command


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--config", "{bad_yaml}"], "YAML syntax error"),
        (["model.path={tmp}/no-model"], "model.path: model path"),
        (["--address", "127.0.0.1:1"], "--address 127.0.0.1:1: no Ray answers there"),
    ],
    ids=["yaml", "model-path", "address"],
)
def test_spear_ray_train_exits_2_with_one_line_and_no_run_dir(tmp_path, argv, needle):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("run:\n  name: [unclosed\n")
    argv = [a.format(bad_yaml=bad_yaml, tmp=tmp_path) for a in argv]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "spear_ray.cli",
            "train",
            *argv,
            f"run.runs_dir={tmp_path / 'runs'}",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(PREFIX), result.stderr[-2000:]
    assert needle in lines[0]
    assert not (tmp_path / "runs").exists()
