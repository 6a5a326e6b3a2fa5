"""One local Ray and one state cluster per test session; every test uses its own groups."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

import shardstate

CLUSTER = f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """A new local Ray instance for the whole session (4 logical CPUs so tasks really overlap;
    ``address="local"``: never one a multi-node test's ``cluster_utils.Cluster`` left behind)."""
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def storage_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the session's clusters keep their files (never the user's ~/.shardstate)."""
    return tmp_path_factory.mktemp("shardstate")


@pytest.fixture(scope="session")
def session_cluster(ray_session: None, storage_root: Path) -> Iterator[shardstate.StateClient]:
    """A 4-shard state cluster on durable (sqlite, "os") storage, shared by the session."""
    client = shardstate.connect(cluster=CLUSTER, shards=4, storage=str(storage_root))
    yield client
    shardstate.shutdown(CLUSTER)


@pytest.fixture(scope="session")
def state(request: pytest.FixtureRequest, session_cluster: shardstate.StateClient) -> shardstate.StateClient:
    """The session cluster's client on the default transport, or on the one a test asks for with
    ``@pytest.mark.parametrize("state", ["socket", "ray"], indirect=True)``."""
    transport = getattr(request, "param", None)
    if transport is None:
        return session_cluster
    return shardstate.connect(cluster=CLUSTER, transport=transport)


@pytest.fixture
def group() -> str:
    """A fresh group name for one test."""
    return f"g-{uuid.uuid4().hex}"


@pytest.fixture
def new_cluster(ray_session: None, storage_root: Path) -> Iterator[dict[str, str]]:
    """The name and storage of a cluster a test creates itself; shut down afterwards."""
    spec = {"cluster": f"c-{uuid.uuid4().hex[:8]}", "storage": str(storage_root)}
    yield spec
    shardstate.shutdown(spec["cluster"])
