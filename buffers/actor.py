"""Where the replay buffer becomes a Ray actor: every actor option is set here, in one place.

The buffer is bookkeeping (num_cpus=0). It survives a process crash through `max_restarts`: the
restarted actor's constructor restores the last checkpoint in `checkpoint_dir`, and calls in
flight are retried (`max_task_retries`), which is safe because every mutating method carries the
step number and is a no-op for an already-applied step. Rows admitted after the last checkpoint
are lost with the process; checkpoint every step (`buffer.checkpoint_every_steps: 1`, the
default) to lose none. On a multi-node cluster `checkpoint_dir` must be storage every node sees
(or pin the actor to one node through `options`), since a restart may land on another node.
"""

from __future__ import annotations

import os
from typing import Any

import ray

from buffers.replay_buffer import ReplayBuffer
from spear_ray.recipe import ReplayRule

DEFAULT_MAX_RESTARTS = -1  # the buffer is cheap to restart and its state is on disk
DEFAULT_MAX_TASK_RETRIES = 3  # bounded: a call that kills the process every time must surface


def spawn_replay_buffer(
    rule: ReplayRule,
    checkpoint_dir: str | os.PathLike[str] | None,
    *,
    seed: int = 0,
    max_restarts: int = DEFAULT_MAX_RESTARTS,
    max_task_retries: int = DEFAULT_MAX_TASK_RETRIES,
    **options: Any,
) -> ray.actor.ActorHandle:
    """Start the `ReplayBuffer` actor with the recipe's replay rules (`Recipe.replay`).

    Extra `options` (name, lifetime, scheduling_strategy, ...) go to `.options()` unchanged.
    """
    actor_options = {
        "num_cpus": 0,
        "max_restarts": max_restarts,
        "max_task_retries": max_task_retries,
        **options,
    }
    return (
        ray.remote(ReplayBuffer)
        .options(**actor_options)
        .remote(
            rule,
            seed=seed,
            checkpoint_dir=None if checkpoint_dir is None else os.fspath(checkpoint_dir),
        )
    )


__all__ = ["DEFAULT_MAX_RESTARTS", "DEFAULT_MAX_TASK_RETRIES", "spawn_replay_buffer"]
