"""One local Ray and one state cluster per test session; every test uses its own groups."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import ray

import shardstate

CLUSTER = f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A local Ray instance for the whole session (4 logical CPUs so tasks really overlap)."""
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def state(ray_session: None) -> Iterator[shardstate.StateClient]:
    """A 4-shard state cluster shared by the session."""
    client = shardstate.connect(cluster=CLUSTER, shards=4)
    yield client
    shardstate.shutdown(CLUSTER)


@pytest.fixture
def group() -> str:
    """A fresh group name for one test."""
    return f"g-{uuid.uuid4().hex}"
