"""`spear-ray eval` on a real local Ray: one vLLM rollout worker on a fake tiny-random checkpoint
(laid out like a real one, see tests/unit/test_export.py) plays held-out frozenlake maps."""

from __future__ import annotations

import json

import pytest

from spear_ray.cli import main
from tests.unit.test_export import fake_run, modified_state

RUN_OVERRIDES = [
    "model.dtype=float32",
    "rollout.max_tokens_per_turn=8",
    "rollout.max_response_tokens=128",
    "rollout.cpu_kv_cache_gib=0.25",
    "resources.cpus_per_rollout_worker=0.5",
    "env.options={max_turns: 2}",
    "env.eval_tasks=2",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return fake_run(tmp_path_factory.mktemp("eval"), modified_state(), RUN_OVERRIDES)


def test_eval_reports_success_on_held_out_tasks(ray_local, run, capsys):
    checkpoint = run / "checkpoints" / "step_000001"
    assert main(["eval", "--checkpoint", str(checkpoint), "--tasks", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["tasks"] == 4 and result["env"] == "frozenlake" and result["step"] == 1
    assert 0.0 <= result["eval/success_rate"] <= 1.0
    assert result["eval/infra_failures"] == 0
    assert result["temperature"] == 0.0  # the demo's eval_temperature
    per_task = [line for line in lines[:-1] if line.startswith("eval-")]
    assert len(per_task) == 4
    start = result["eval_seed_start"]
    assert start == 1_000_000  # the run's held-out seeds
    assert sorted(line.split(": ")[0] for line in per_task) == [
        f"eval-{k} (env seed {start + k})" for k in range(4)
    ]


def test_unknown_env_is_one_line_listing_known_envs(run, capsys):
    assert main(["eval", "--checkpoint", str(run), "--env", "chess"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown env 'chess'" in err and "frozenlake" in err and "sokoban" in err
