"""The e2e tier shares the Ray tier's local-Ray fixture."""

from tests.ray.conftest import ray_local  # noqa: F401
