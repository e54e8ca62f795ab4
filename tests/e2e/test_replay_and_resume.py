"""SPEAR's replay in the whole loop, and resuming, with the demo's warm-started model.

The demo model (builtin:tiny-llama) succeeds on some frozenlake maps and not others, so groups
have reward variance: positive-advantage rows reach the replay buffer, and with `buffer.size: 2`
replay triggers from the second step on. One uninterrupted run of STEPS steps (checkpoint every
step) is compared with a run resumed from its checkpoint after step RESUME_AFTER.

The model is built on first use (a few minutes, once per machine; cached).
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from spear_ray.algo import sil_weight
from spear_ray.config import load_config
from spear_ray.run_dir import RunDir
from spear_ray.train import run_training

STEPS = 4
RESUME_AFTER = 1  # the resumed run restores checkpoint step_000001 and runs steps 2 and 3

OVERRIDES = [
    "model.path=builtin:tiny-llama",
    "rollout.num_workers=2",
    "rollout.prompts_per_step=4",
    "rollout.samples_per_prompt=4",
    "rollout.cpu_kv_cache_gib=0.25",
    "learner.num_ranks=2",
    "resources.cpus_per_learner=0.5",
    "resources.cpus_per_rollout_worker=0.5",
    "buffer.size=2",
    "algo.sil.ramp_steps=6",  # w_SIL strictly between 0 and 1 at every replayed step
    "algo.policy_loss.entropy_coef=0",  # so the replay loss is exactly w_SIL x its PG loss
    f"run.total_steps={STEPS}",
    "run.eval_every_steps=0",
    "checkpoint.every_steps=1",
    f"checkpoint.keep_last={STEPS}",
]


def _final_weights(run: RunDir) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    policy = run.latest_checkpoint() / "learner" / "policy"
    return load_file(str(next(policy.glob("*.safetensors"))))


def _step_rows(run: RunDir) -> dict[int, dict]:
    """The last logged row of each training step (a resumed run logs steps again)."""
    return {r["step"]: r for r in run.read_metrics() if "reward/mean" in r}


@pytest.fixture(scope="module")
def runs(ray_local, tmp_path_factory):
    runs_dir = tmp_path_factory.mktemp("runs")
    config = load_config("demo", [*OVERRIDES, f"run.runs_dir={runs_dir}", "run.name=full"])
    full = RunDir.create(config)
    run_training(config, run=full, log=lambda line: None)

    # The resumed run: a copy of the full run as it was right after step RESUME_AFTER.
    resumed_path = runs_dir / "resumed"
    shutil.copytree(full.path, resumed_path)
    for checkpoint in RunDir(resumed_path).complete_checkpoints():
        if int(checkpoint.name.removeprefix("step_")) > RESUME_AFTER:
            shutil.rmtree(checkpoint)
    resumed, resumed_config = RunDir.open(resumed_path)
    lines: list[str] = []
    run_training(resumed_config, run=resumed, resume=True, log=lines.append)
    return config, full, resumed, lines


def test_replay_fires_and_is_applied_with_w_sil(runs):
    config, full, _, _ = runs
    rows = _step_rows(full)
    replayed = [r for r in rows.values() if r["spear/replay_rows"] > 0]
    assert replayed, "replay never triggered"
    for row in replayed:
        expected = sil_weight(
            row["step"],
            total_steps=config.algo.sil.ramp_steps,
            coef=config.algo.sil.coef,
            schedule=config.algo.sil.schedule,
        )
        assert 0 < expected < 1
        assert row["spear/w_sil"] == pytest.approx(expected)
        assert row["replay/loss_weight"] == pytest.approx(expected)
        assert row["replay/optimizer_steps"] >= 1
        assert math.isfinite(row["replay/pg_loss"])
        # what was back-propagated is the replay loss scaled by w_SIL (no entropy term here)
        assert row["replay/loss"] == pytest.approx(expected * row["replay/pg_loss"], abs=1e-7)
        assert row["buffer/triggers_total"] >= 1


def test_rollouts_are_on_policy_with_the_new_weight_version(runs):
    _, full, _, _ = runs
    rows = _step_rows(full)
    assert sorted(rows) == list(range(STEPS))
    assert [rows[t]["weight_version"] for t in range(STEPS)] == list(range(1, STEPS + 1))
    assert all(rows[t]["staleness/max"] == 0 for t in range(STEPS))
    assert all(rows[t]["infra_failures"] == 0 for t in range(STEPS))


def test_a_resumed_run_ends_with_the_parameters_of_an_uninterrupted_one(runs):
    _, full, resumed, lines = runs
    assert any(f"(next step {RESUME_AFTER + 1})" in line for line in lines)
    assert resumed.latest_checkpoint().name == full.latest_checkpoint().name
    a, b = _final_weights(full), _final_weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name
    # the same trajectories were sampled after the resume, not just similar weights reached
    full_rows, resumed_rows = _step_rows(full), _step_rows(resumed)
    for t in range(RESUME_AFTER + 1, STEPS):
        for key in ("reward/mean", "response_length", "spear/replay_rows", "buffer/size"):
            assert resumed_rows[t][key] == full_rows[t][key], (t, key)
