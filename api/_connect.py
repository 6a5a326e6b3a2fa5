"""``connect()``, ``connect_async()`` and ``shutdown()``: the entry points.

Clients are cached per process and cluster, so ``connect()`` inside a Ray task or actor is cheap
after the first call in that worker process, and a client unpickled in a task re-attaches to the
cached link.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from shardstate._client import AsyncStateClient, ClusterLink, StateClient
from shardstate._errors import Unavailable
from shardstate.cluster import bootstrap
from shardstate.cluster.config import DEFAULT_CLUSTER

DEFAULT_TIMEOUT = 120.0
DEFAULT_RETRY_TIMEOUT = 60.0

_links: dict[str, ClusterLink] = {}
_lock = threading.Lock()


def _link(
    cluster: str, settings: dict[str, Any], address: str | None, timeout: float, retry_timeout: float
) -> ClusterLink:
    with _lock:
        link = _links.get(cluster)
        if link is not None and not link.closed and not settings:
            return link
        bootstrap.ensure_ray(address)
        router, actual = bootstrap.open_cluster({"name": cluster, **settings}, timeout=timeout)
        if link is None or link.closed:
            link = _links[cluster] = ClusterLink(cluster, router, actual, timeout, retry_timeout)
        return link


def _settings(**given: Any) -> dict[str, Any]:
    return {k: v for k, v in given.items() if v is not None}


def connect(
    cluster: str = DEFAULT_CLUSTER,
    shards: int | None = None,
    storage: str | None = None,
    address: str | None = None,
    *,
    durability: str | None = None,
    max_value_size: int | None = None,
    op_retention: float | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
) -> StateClient:
    """Connect to state cluster ``cluster``, creating it if it does not exist; return a sync client.

    Joins the running Ray cluster (``RAY_ADDRESS`` or the latest local one), else starts a local
    Ray. ``shards`` (default 4), ``storage`` (default ``~/.shardstate``; files under
    ``<storage>/<cluster>/``), ``durability`` (``"os"`` default, ``"fsync"``, ``"memory"``),
    ``max_value_size`` (default 16 MiB) and ``op_retention`` (default 24 h) apply when the cluster
    is created; an existing cluster keeps its own (also across restarts: they are stored in Ray's
    GCS) and a differing request is reported with a ``ClusterMismatchWarning``. ``timeout`` bounds
    every call; ``retry_timeout`` bounds retries while a shard restarts or loads (then
    ``Unavailable``). Attaching never stops a running cluster: if it cannot serve, this raises
    ``Unavailable`` with the reason and the cluster keeps running.
    """
    settings = _settings(
        shards=shards,
        storage=storage,
        durability=durability,
        max_value_size=max_value_size,
        op_retention=op_retention,
    )
    return StateClient(_link(cluster, settings, address, timeout, retry_timeout))


async def connect_async(
    cluster: str = DEFAULT_CLUSTER,
    shards: int | None = None,
    storage: str | None = None,
    address: str | None = None,
    *,
    durability: str | None = None,
    max_value_size: int | None = None,
    op_retention: float | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
) -> AsyncStateClient:
    """Like :func:`connect`, returning an :class:`AsyncStateClient` (start-up runs off the loop)."""
    settings = _settings(
        shards=shards,
        storage=storage,
        durability=durability,
        max_value_size=max_value_size,
        op_retention=op_retention,
    )
    link = await asyncio.to_thread(_link, cluster, settings, address, timeout, retry_timeout)
    return AsyncStateClient(link)


def shutdown(cluster: str = DEFAULT_CLUSTER) -> bool:
    """Stop ``cluster``'s actors (data on disk and the cluster's metadata stay: ``connect(cluster)``
    brings it back as it was). Returns False if it was not running.

    Clients of that cluster in this process are closed: their calls raise ``Unavailable``. Clients
    elsewhere get ``Unavailable`` when they next reach a stopped shard.
    """
    with _lock:
        link = _links.pop(cluster, None)
        if link is not None:
            link.closed = True
        return bootstrap.stop_cluster(cluster)


def _reattach(
    cluster: str, kind: str, timeout: float, retry_timeout: float = DEFAULT_RETRY_TIMEOUT
) -> StateClient | AsyncStateClient:
    """Unpickle a client: attach to the running cluster by name (never creates one)."""
    with _lock:
        link = _links.get(cluster)
        if link is None or link.closed:
            bootstrap.ensure_ray(None)
            router = bootstrap.find_router(cluster)
            if router is None:
                raise Unavailable(f"state cluster {cluster!r} is not running")
            link = _links[cluster] = ClusterLink(
                cluster, router, bootstrap.cluster_settings(router, timeout), timeout, retry_timeout
            )
    return AsyncStateClient(link) if kind == "async" else StateClient(link)
