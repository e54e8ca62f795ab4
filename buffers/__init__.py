"""The SPEAR replay buffer (docs/algorithm.md §3-§4): `ReplayBuffer` is a plain class; the Ray actor
is spawned by `buffers.actor.spawn_replay_buffer` (imported from there, so `import buffers` stays
free of Ray)."""

from buffers.replay_buffer import (
    BufferCheckpointError,
    ReplayBuffer,
    ReplayEntry,
    StepOrderError,
    replay_batch_stats,
    replay_train_batch,
)

__all__ = [
    "BufferCheckpointError",
    "ReplayBuffer",
    "ReplayEntry",
    "StepOrderError",
    "replay_batch_stats",
    "replay_train_batch",
]
