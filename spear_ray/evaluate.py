"""`spear-ray eval`: held-out success of a checkpoint's policy, without any learner.

    result = run_eval("runs/demo", tasks=16)            # latest complete checkpoint of the run
    result = run_eval("runs/demo/checkpoints/step_000009", env="sokoban", temperature=0.7)

One rollout worker (vLLM) is started on the checkpoint's HF model (learner/policy) and plays the
held-out tasks of `eval_tasks(config)` (seeds env.eval_seed_start, +1, ...) with the run's
evaluation sampling (`rollout.eval_temperature`). `evaluate_rollouts` (spear_ray/evaluation.py) is
the one evaluation of the project: `Controller.evaluate` calls it during training with the
learners' current weights.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from spear_ray.config import ConfigError, SpearConfig, load_config
from spear_ray.containers import Trajectory
from spear_ray.evaluation import eval_tasks, evaluate_rollouts, evaluation_metrics
from spear_ray.export import has_tokenizer, resolve_checkpoint, run_tokenizer_path


def result_line(t: Trajectory) -> str:
    if not t.is_valid:
        return f"{t.task_id} (env seed {t.env_seed}): infrastructure failure: {t.failure}"
    return (
        f"{t.task_id} (env seed {t.env_seed}): {'success' if t.success else 'failure'}  "
        f"task reward {t.rewards.task:+.3f}  turns {len(t.turn_spans)}  "
        f"invalid actions {t.invalid_actions}"
    )


def _yaml_str(value: str | os.PathLike) -> str:
    return json.dumps(str(value))  # a JSON string is a YAML string, whatever the path holds


def eval_config(
    checkpoint: str | os.PathLike,
    *,
    env: str | None = None,
    tasks: int | None = None,
    temperature: float | None = None,
    overrides: Sequence[str] = (),
    config_source: str | None = None,
) -> tuple[SpearConfig, dict[str, Any]]:
    """The config of the evaluation (the run's, or `config_source`'s for a bare HF directory)
    with the policy as model and one rollout worker; and a description of what is evaluated."""
    from spear_ray.envs.registry import known_envs

    if env is not None and env not in known_envs():
        raise ConfigError(f"--env: unknown env {env!r}; known envs: {', '.join(known_envs())}")
    path = Path(checkpoint)
    if (
        (path / "config.json").is_file()
        and any(path.glob("*.safetensors"))
        and not (path / "config.yaml").is_file()
    ):
        # an exported (or any) HF model directory: the env and sampling come from --config
        source: str | Path = config_source or "demo"
        model, tokenizer, about = path, None, {"checkpoint": str(path), "step": None}
    else:
        found = resolve_checkpoint(path)
        if found.run is None:
            raise ConfigError(
                f"{found.path} is not inside a run directory (RUN/config.yaml holds its env)"
            )
        source = config_source or found.run / "config.yaml"
        model = found.policy
        tokenizer = None if has_tokenizer(found.policy) else run_tokenizer_path(found.run)
        about = {"checkpoint": str(found.path), "step": found.step}
    chosen: list[str] = []
    if env is not None:
        chosen += [f"env.name={env}", "env.options={}"]  # the env's default options
    if tasks is not None:
        chosen.append(f"env.eval_tasks={tasks}")
    if temperature is not None:
        chosen.append(f"rollout.eval_temperature={temperature}")
    forced = [
        f"model.path={_yaml_str(model)}",
        f"model.tokenizer_path={_yaml_str(tokenizer) if tokenizer else 'null'}",
        "rollout.num_workers=1",
    ]
    config = load_config(source, [*chosen, *overrides, *forced])
    return config, about


def run_eval(
    checkpoint: str | os.PathLike,
    *,
    env: str | None = None,
    tasks: int | None = None,
    temperature: float | None = None,
    overrides: Sequence[str] = (),
    config_source: str | None = None,
    address: str | None = None,
    log: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
    on_result: Callable[[Trajectory], None] | None = None,
) -> dict[str, Any]:
    """Evaluate a checkpoint (see the module docstring); returns the summary (a JSON object)."""
    import ray

    from actors.rollout_group import RolloutGroup
    from spear_ray.placement import connect_ray
    from spear_ray.recipe import rollout_spec

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    config, about = eval_config(
        checkpoint,
        env=env,
        tasks=tasks,
        temperature=temperature,
        overrides=overrides,
        config_source=config_source,
    )
    started_ray = connect_ray(address, log)
    t0 = time.perf_counter()
    rollouts = None
    try:
        log(f"starting one rollout worker on {config.model.path}")
        rollouts = RolloutGroup(rollout_spec(config))
        rollouts.health()
        log(f"evaluating on {config.env.eval_tasks} held-out {config.env.name} tasks")
        metrics, trajectories = evaluate_rollouts(rollouts, config, on_result=on_result)
    finally:
        if rollouts is not None:
            rollouts.shutdown()
        if started_ray:
            ray.shutdown()
    return {
        **about,
        "env": config.env.name,
        "tasks": len(trajectories),
        "eval_seed_start": config.env.eval_seed_start,
        "temperature": config.rollout.eval_temperature,
        **metrics,
        "seconds": round(time.perf_counter() - t0, 1),
    }


__all__ = ["eval_config", "eval_tasks", "evaluate_rollouts", "evaluation_metrics", "run_eval"]
