"""A rollout worker fetches bucketed weights without blocking its event loop: BucketedWeights.fetch
awaits each bucket. Ray flags any blocking ray.get inside an async actor (the warning "Using
blocking ray.get inside async actor"); the flag is read back from the actor."""

from __future__ import annotations

import pytest
import ray
import torch

from learners.weight_sync import BucketedWeights, put_weights

pytestmark = pytest.mark.ray


@ray.remote(num_cpus=0)
class AsyncHolder:
    async def fetch(self, weights: BucketedWeights) -> tuple[dict, bool]:
        tensors = await weights.fetch()
        return {name: t.clone() for name, t in tensors}, self._warned()

    async def iterate(self, weights: BucketedWeights) -> tuple[dict, bool]:
        tensors = list(weights)  # ray.get per bucket: what fetch avoids
        return {name: t.clone() for name, t in tensors}, self._warned()

    def _warned(self) -> bool:
        from ray._private import worker

        return bool(worker.blocking_get_inside_async_warned)


def test_bucketed_weights_are_awaited_not_fetched_with_a_blocking_get(ray_local):
    state = {f"w{i}": torch.randn(64, 32) for i in range(6)}
    weights = BucketedWeights(put_weights(state, bucket_bytes=4 * 64 * 32 * 2))
    assert len(weights) == 3
    got, warned = ray.get(AsyncHolder.remote().fetch.remote(weights))
    assert not warned
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)
    # the check can fail: iterating (a blocking ray.get per bucket) trips Ray's flag
    got, warned = ray.get(AsyncHolder.remote().iterate.remote(weights))
    assert warned and all(torch.equal(got[k], state[k]) for k in state)
