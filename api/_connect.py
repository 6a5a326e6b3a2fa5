"""``connect()``, ``connect_async()`` and ``shutdown()``: the entry points.

Clients are cached per process and cluster, so ``connect()`` inside a Ray task or actor is cheap
after the first call in that worker process, and a client unpickled in a task re-attaches to the
cached link.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from shardstate._client import AsyncStateClient, StateClient
from shardstate._errors import InvalidInput, Unavailable
from shardstate._link import ClusterLink
from shardstate._transport import TRANSPORTS
from shardstate.cluster import bootstrap
from shardstate.cluster.config import DEFAULT_CLUSTER

DEFAULT_TIMEOUT = 120.0
DEFAULT_RETRY_TIMEOUT = 60.0
#: Set to ``ray`` to make Ray actor calls the default transport of this process's clients.
TRANSPORT_ENV = "SHARDSTATE_TRANSPORT"

_links: dict[tuple[str, str], ClusterLink] = {}
_lock = threading.Lock()


def _transport(transport: str | None) -> str:
    chosen = transport if transport is not None else (os.environ.get(TRANSPORT_ENV) or "socket")
    if chosen not in TRANSPORTS:
        raise InvalidInput(f"transport must be one of {TRANSPORTS}, got {chosen!r}")
    return chosen


def _link(
    cluster: str,
    settings: dict[str, Any],
    address: str | None,
    timeout: float,
    retry_timeout: float,
    transport: str,
) -> ClusterLink:
    with _lock:
        link = _links.get((cluster, transport))
        if link is not None and not link.closed and not settings:
            return link
        bootstrap.ensure_ray(address)
        router, actual = bootstrap.open_cluster({"name": cluster, **settings}, timeout=timeout)
        if link is None or link.closed:
            link = _links[(cluster, transport)] = ClusterLink(
                cluster, router, actual, timeout, retry_timeout, transport
            )
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
    wire_host: str | None = None,
    replicas: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
    transport: str | None = None,
) -> StateClient:
    """Connect to state cluster ``cluster``, creating it if it does not exist; return a sync client.

    Joins the running Ray cluster (``RAY_ADDRESS`` or the latest local one), else starts a local
    Ray. ``shards`` (default 4), ``storage`` (default ``~/.shardstate``; files under
    ``<storage>/<cluster>/``), ``durability`` (``"os"`` default, ``"fsync"``, ``"memory"``),
    ``max_value_size`` (default 16 MiB), ``op_retention`` (default 24 h) and ``wire_host`` (where
    shards listen for clients: ``"127.0.0.1"`` default, ``"node"`` for the node's IP) and
    ``replicas`` (backups per shard on other nodes, with automatic failover; default 0 on a
    one-node Ray, 1 on more nodes) apply when
    the cluster is created; an existing cluster keeps its own (also across restarts: they are stored in Ray's
    GCS) and a differing request is reported with a ``ClusterMismatchWarning``. ``timeout`` bounds
    every call; ``retry_timeout`` bounds retries while a shard restarts or loads (then
    ``Unavailable``). Attaching never stops a running cluster: if it cannot serve, this raises
    ``Unavailable`` with the reason and the cluster keeps running.

    ``transport``: ``"socket"`` (default; each shard's own authenticated connection, about ten
    times faster than an actor call; a shard this process cannot reach is called through Ray) or
    ``"ray"`` (Ray actor calls only, e.g. where nodes cannot reach each other's ports). The
    ``SHARDSTATE_TRANSPORT`` environment variable sets the default.
    """
    settings = _settings(
        shards=shards,
        storage=storage,
        durability=durability,
        max_value_size=max_value_size,
        op_retention=op_retention,
        wire_host=wire_host,
        replicas=replicas,
    )
    link = _link(cluster, settings, address, timeout, retry_timeout, _transport(transport))
    return StateClient(link)


async def connect_async(
    cluster: str = DEFAULT_CLUSTER,
    shards: int | None = None,
    storage: str | None = None,
    address: str | None = None,
    *,
    durability: str | None = None,
    max_value_size: int | None = None,
    op_retention: float | None = None,
    wire_host: str | None = None,
    replicas: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
    transport: str | None = None,
) -> AsyncStateClient:
    """Like :func:`connect`, returning an :class:`AsyncStateClient` (start-up runs off the loop)."""
    settings = _settings(
        shards=shards,
        storage=storage,
        durability=durability,
        max_value_size=max_value_size,
        op_retention=op_retention,
        wire_host=wire_host,
        replicas=replicas,
    )
    chosen = _transport(transport)
    link = await asyncio.to_thread(_link, cluster, settings, address, timeout, retry_timeout, chosen)
    return AsyncStateClient(link)


def shutdown(cluster: str = DEFAULT_CLUSTER) -> bool:
    """Stop ``cluster``'s actors (data on disk and the cluster's metadata stay: ``connect(cluster)``
    brings it back as it was). Returns False if it was not running.

    Clients of that cluster in this process are closed: their calls raise ``Unavailable``. Clients
    elsewhere get ``Unavailable`` when they next reach a stopped shard.
    """
    with _lock:
        for transport in TRANSPORTS:
            link = _links.pop((cluster, transport), None)
            if link is not None:
                link.close()
        return bootstrap.stop_cluster(cluster)


def _reattach(
    cluster: str,
    kind: str,
    timeout: float,
    retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
    transport: str = "socket",
) -> StateClient | AsyncStateClient:
    """Unpickle a client: attach to the running cluster by name (never creates one)."""
    with _lock:
        link = _links.get((cluster, transport))
        if link is None or link.closed:
            bootstrap.ensure_ray(None)
            router = bootstrap.find_router(cluster)
            if router is None:
                raise Unavailable(f"state cluster {cluster!r} is not running")
            settings = bootstrap.cluster_settings(router, timeout)
            link = _links[(cluster, transport)] = ClusterLink(
                cluster, router, settings, timeout, retry_timeout, transport
            )
    return AsyncStateClient(link) if kind == "async" else StateClient(link)
