"""Shared fixtures. `ray_local`: one small local Ray for the whole session, used by the ray/ and
e2e/ tiers (defined once here so two tiers cannot start two Rays)."""

from __future__ import annotations

import pytest
import ray


@pytest.fixture(scope="session")
def ray_local():
    """A local single-node Ray (2 CPUs, no dashboard), shut down after the session."""
    ray.init(num_cpus=2, include_dashboard=False)
    yield
    ray.shutdown()
