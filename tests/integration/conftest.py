"""One local Ray and one state cluster per test session; every test uses its own groups."""

from __future__ import annotations

import json
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
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


# -- the HTTP API (console) -----------------------------------------------------------------------
@pytest.fixture(scope="session")
def console(session_cluster: shardstate.StateClient) -> shardstate.ConsoleInfo:
    """The session cluster's console (HTTP API v1 and web console), on a free loopback port."""
    return session_cluster.start_console(port=0)


@pytest.fixture
def http(console: shardstate.ConsoleInfo) -> Iterator[httpx.Client]:
    """An HTTP client of the console with the bearer token."""
    with httpx.Client(
        base_url=console.url, headers={"Authorization": f"Bearer {console.token}"}, timeout=60
    ) as client:
        yield client


@pytest.fixture
def sse(console: shardstate.ConsoleInfo) -> Iterator[Callable[..., SSEReader]]:
    """Opens SSE streams of the console (``sse(params, last_id=None)``); closed after the test."""
    readers: list[SSEReader] = []

    def open_stream(params: dict[str, str] | None = None, last_id: str | None = None) -> SSEReader:
        reader = SSEReader(console.url, console.token, params, last_id)
        readers.append(reader)
        assert reader.ready.wait(30), "the event stream did not open"
        return reader

    yield open_stream
    for reader in readers:
        reader.close()


class SSEReader:
    """Reads ``GET /api/v1/events`` on a thread; parsed events land in ``events`` (a queue of
    ``{"id", "event", "data"}``). ``ready`` is set once the stream's first bytes arrived."""

    def __init__(
        self, url: str, token: str, params: dict[str, str] | None = None, last_id: str | None = None
    ):
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.ready = threading.Event()
        self.status: int | None = None
        self._stop = threading.Event()
        headers = {"Authorization": f"Bearer {token}"}
        if last_id is not None:
            headers["Last-Event-ID"] = last_id
        self._client = httpx.Client(base_url=url, headers=headers, timeout=httpx.Timeout(60, read=None))
        self._thread = threading.Thread(target=self._run, args=(params or {},), daemon=True)
        self._thread.start()

    def _run(self, params: dict[str, str]) -> None:
        try:
            with self._client.stream("GET", "/api/v1/events", params=params) as response:
                self.status = response.status_code
                block: dict[str, Any] = {}
                for line in response.iter_lines():
                    self.ready.set()
                    if self._stop.is_set():
                        return
                    if line == "":
                        if "data" in block:
                            block["data"] = json.loads(block["data"])
                            self.events.put(block)
                        block = {}
                    elif not line.startswith(":") and ":" in line:
                        name, _, value = line.partition(":")
                        block[name] = value[1:] if value.startswith(" ") else value
        except (httpx.HTTPError, RuntimeError):
            pass
        finally:
            self.ready.set()

    def take(self, count: int, timeout: float = 30.0) -> list[dict[str, Any]]:
        """The next ``count`` events (fails the test if they do not come within ``timeout``)."""
        return [self.events.get(timeout=timeout) for _ in range(count)]

    def close(self) -> None:
        self._stop.set()
        self._client.close()
