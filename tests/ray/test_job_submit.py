"""`spear-ray train` as a Ray job, the way a GPU cluster runs it (README.md, "Running on a GPU
cluster"): a real head started here with `ray start --head`, token authentication on, jobs
submitted through the Jobs SDK (`JobSubmissionClient`) and through the `ray job submit` CLI.

The head is this test's own: its own `--temp-dir` (so `ray.init()` elsewhere on the machine cannot
find it: `ray start` records its address in `<temp-dir>/ray_current_cluster`), its own free
ports, and its own token (`RAY_AUTH_TOKEN_PATH`, not ~/.ray/auth_token). It is stopped by killing
exactly its processes (those whose command line names its temp dir, and their descendants):
`ray stop` would stop every Ray on the machine."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from tests.tiny_run import tiny_run_overrides

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # ray, spear-ray
JOB_TIMEOUT_S = 600

# the smallest run that really trains: 1 vLLM rollout worker, 1 DeepSpeed rank, the buffer actor
TRAIN_OVERRIDES = tiny_run_overrides()
JOB_ENV_VARS = {"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}


@dataclass(frozen=True)
class Head:
    temp_dir: Path
    dashboard_url: str  # the Jobs API (http://127.0.0.1:PORT)
    token: str
    env: dict[str, str]  # for CLI calls: token mode on, this head's token

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _head_processes(temp_dir: Path) -> list[psutil.Process]:
    """Every process of the head started in `temp_dir`: Ray's daemons name it (or their session
    dir below it) on their command line; workers and job drivers descend from them."""
    own = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        if proc.pid not in own and str(temp_dir) in " ".join(proc.info["cmdline"] or []):
            found[proc.pid] = proc
    for proc in list(found.values()):
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update((c.pid, c) for c in proc.children(recursive=True) if c.pid not in own)
    return list(found.values())


def _stop_head(temp_dir: Path) -> None:
    """Stop only this head (`ray stop` has no way to pick one): SIGTERM, then SIGKILL (the GCS
    and the raylet take longer than 8 s to obey SIGTERM; a test head has nothing to save)."""
    procs = _head_processes(temp_dir)
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=5)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def head():
    # a short path: Ray's Unix sockets live under it (107-byte limit)
    temp_dir = Path(tempfile.mkdtemp(prefix="spear-job-", dir="/tmp"))
    token = secrets.token_hex(32)
    token_file = temp_dir / "auth_token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_API_SERVER_ADDRESS")
    }
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=str(token_file),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # the job's entrypoint finds spear-ray
    )
    names = [
        "--port",
        "--dashboard-port",
        "--ray-client-server-port",
        "--dashboard-agent-listen-port",
        "--dashboard-agent-grpc-port",
        "--runtime-env-agent-port",
        "--metrics-export-port",
        "--node-manager-port",
        "--object-manager-port",
    ]
    ports = dict(zip(names, _free_ports(len(names)), strict=True))
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        "--num-cpus=2",
        "--num-gpus=0",
        f"--object-store-memory={10**9}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *(f"{name}={port}" for name, port in ports.items()),
    ]
    try:
        started = subprocess.run(
            command, env=env, capture_output=True, text=True, timeout=180, start_new_session=True
        )
        assert started.returncode == 0, started.stdout + started.stderr
        yield Head(
            temp_dir=temp_dir,
            dashboard_url=f"http://127.0.0.1:{ports['--dashboard-port']}",
            token=token,
            env=env,
        )
    finally:
        _stop_head(temp_dir)
        left = _head_processes(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not left, f"processes of the test's Ray head still running: {left}"


def _client(head: Head):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(head.dashboard_url, headers=head.auth_headers)


def _wait_for_job(client, job_id: str):
    """The job's terminal JobStatus; stops it and fails after JOB_TIMEOUT_S."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id)
        if status.is_terminal():
            return status
        time.sleep(2)
    client.stop_job(job_id)
    logs = client.get_job_logs(job_id)
    pytest.fail(f"job {job_id} not done after {JOB_TIMEOUT_S}s; logs end:\n{logs[-4000:]}")


def _train_entrypoint(runs_dir: Path, name: str, steps: int) -> str:
    overrides = [*TRAIN_OVERRIDES, f"run.total_steps={steps}", f"run.runs_dir={runs_dir}"]
    return shlex.join(["spear-ray", "train", "--config", "demo", *overrides, f"run.name={name}"])


def _assert_trained(run_dir: Path, logs: str, steps: int) -> None:
    assert "connecting to Ray at" in logs and "starting a local Ray" not in logs
    for t in range(1, steps + 1):
        assert f"step {t}/{steps}" in logs, logs[-4000:]
    assert "checkpoint saved:" in logs and f"done: {steps} steps" in logs, logs[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == list(range(steps))
    last = run_dir / "checkpoints" / f"step_{steps - 1:06d}"
    assert (last / "COMPLETE").is_file(), sorted(p.name for p in run_dir.rglob("*"))


def test_the_job_api_refuses_a_request_without_the_token(head):
    assert requests.get(f"{head.dashboard_url}/api/jobs/", timeout=30).status_code == 401
    authorized = requests.get(
        f"{head.dashboard_url}/api/jobs/", headers=head.auth_headers, timeout=30
    )
    assert authorized.status_code == 200


def test_train_runs_as_a_job_submitted_through_the_sdk(head):  # 45-105 s on 2 cores
    from ray.job_submission import JobStatus

    runs_dir = head.temp_dir / "runs"
    client = _client(head)
    job_id = client.submit_job(
        entrypoint=_train_entrypoint(runs_dir, "sdk", steps=2),
        runtime_env={"env_vars": JOB_ENV_VARS},
    )
    status = _wait_for_job(client, job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    _assert_trained(runs_dir / "sdk", logs, steps=2)


def _cli_submit(head: Head, entrypoint: list[str]) -> str:
    """`ray job submit --no-wait` with the repository as working dir, as README.md shows it."""
    job_id = f"spear-cli-{secrets.token_hex(4)}"
    runtime_env = {"excludes": [".git/", "tests/", "benchmarks/"], "env_vars": JOB_ENV_VARS}
    command = [
        str(BIN / "ray"),
        "job",
        "submit",
        "--address",
        head.dashboard_url,
        "--submission-id",
        job_id,
        "--no-wait",
        "--working-dir",
        ".",
        "--runtime-env-json",
        json.dumps(runtime_env),
        "--",
        *entrypoint,
    ]
    submitted = subprocess.run(
        command, cwd=REPO, env=head.env, capture_output=True, text=True, timeout=180
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    return job_id


@pytest.mark.slow  # two jobs: 2-5 minutes on a loaded 2-core machine
def test_train_and_resume_run_as_jobs_submitted_with_the_cli(head):
    from ray.job_submission import JobStatus

    runs_dir = head.temp_dir / "runs"
    client = _client(head)
    job_id = _cli_submit(head, shlex.split(_train_entrypoint(runs_dir, "cli", steps=1)))
    status = _wait_for_job(client, job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    # the repository went up as a package (.gitignore'd .venv/ and the excludes left out)
    assert client.get_job_info(job_id).runtime_env["working_dir"].startswith("gcs://")
    _assert_trained(runs_dir / "cli", logs, steps=1)
    shown = subprocess.run(
        [str(BIN / "ray"), "job", "status", "--address", head.dashboard_url, job_id],
        env=head.env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0 and "succeeded" in shown.stdout, shown.stdout + shown.stderr

    # a new job continues the run from its checkpoint
    run_dir = runs_dir / "cli"
    job_id = _cli_submit(
        head, ["spear-ray", "train", "--resume", str(run_dir), "run.total_steps=2"]
    )
    status = _wait_for_job(client, job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    assert f"resumed from {run_dir / 'checkpoints' / 'step_000000'}" in logs, logs[-4000:]
    assert "step 2/2" in logs and "step 1/2" not in logs
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [0, 1]
    assert (run_dir / "checkpoints" / "step_000001" / "COMPLETE").is_file()
