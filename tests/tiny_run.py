"""The smallest run that really trains (builtin:tiny-random: 1 vLLM rollout worker, 1 DeepSpeed
rank, the buffer actor, 2 prompts x 2 samples, 3-turn frozenlake), shared by the tests that
start one; each test changes what it is about with `tiny_run_overrides({...})`."""

from __future__ import annotations

from typing import Any

TINY_RUN: dict[str, str] = {
    "model.path": "builtin:tiny-random",
    "model.dtype": "float32",
    "rollout.num_workers": "1",
    "rollout.prompts_per_step": "2",
    "rollout.samples_per_prompt": "2",
    "rollout.max_tokens_per_turn": "8",
    "rollout.max_response_tokens": "256",
    "rollout.cpu_kv_cache_gib": "0.25",
    "env.options": "{max_turns: 3}",
    "env.eval_tasks": "4",
    "learner.num_ranks": "1",
    "learner.tokens_per_micro_batch": "1024",
    "resources.cpus_per_learner": "0.5",
    "resources.cpus_per_rollout_worker": "0.5",
    # a random model's turns are all invalid/unreadable and use every token they may: keep them
    # trainable
    "algo.filters.void_turn": "false",
    "algo.filters.unreadable": "false",
    "algo.filters.overlong": "false",
    "algo.filters.group_keep_ratio": "1.0",
    "buffer.size": "2",
    "run.eval_every_steps": "0",
    "checkpoint.every_steps": "1",
}


def tiny_run_overrides(changes: dict[str, Any] | None = None) -> list[str]:
    """`key=value` overrides of the tiny run with `changes` applied (added or replaced)."""
    merged = {**TINY_RUN, **{key: str(value) for key, value in (changes or {}).items()}}
    return [f"{key}={value}" for key, value in merged.items()]
