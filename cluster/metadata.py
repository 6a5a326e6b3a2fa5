"""Cluster metadata in Ray's GCS internal KV: settings, placement, epochs, incarnations, trigger state.

The GCS outlives every actor and worker node (and, with GCS fault tolerance, the head), so what a
cluster must know to restart correctly lives here, keyed by cluster name, instead of in a file on one
node. Values are small JSON documents; only shardstate's own actors and clients read or write them,
and Ray's token authentication guards the GCS.

Keys (namespace :data:`KV_NAMESPACE`): ``<cluster>/<name>``, e.g. ``etl/config``, ``etl/shard/3``,
``etl/triggers``.
"""

from __future__ import annotations

import json
from typing import Any

from ray.experimental import internal_kv

#: the GCS KV namespace of every shardstate key
KV_NAMESPACE = "shardstate"


def _key(cluster: str, name: str) -> bytes:
    return f"{cluster}/{name}".encode()


def read(cluster: str, name: str) -> Any:
    """The JSON value stored under ``<cluster>/<name>``, or None."""
    raw = internal_kv._internal_kv_get(_key(cluster, name), namespace=KV_NAMESPACE)
    return None if raw is None else json.loads(raw)


def write(cluster: str, name: str, value: Any) -> None:
    """Store ``value`` (JSON-serializable) under ``<cluster>/<name>``, replacing what was there."""
    internal_kv._internal_kv_put(
        _key(cluster, name), json.dumps(value).encode(), overwrite=True, namespace=KV_NAMESPACE
    )


def forget(cluster: str) -> int:
    """Remove every key of ``cluster`` (a cluster deleted for good); returns how many."""
    return int(internal_kv._internal_kv_del(_key(cluster, ""), del_by_prefix=True, namespace=KV_NAMESPACE))


def next_incarnation(cluster: str, shard: int) -> int:
    """Count one more start of shard ``shard`` and return the new count (1 on the first start).

    Only one process runs a given shard at a time (Ray restarts an actor after its process is gone),
    so a read-then-write is enough.
    """
    name = f"shard/{shard}/incarnation"
    count = int(read(cluster, name) or 0) + 1
    write(cluster, name, count)
    return count


def triggers_active(cluster: str) -> bool:
    """Whether any trigger is registered (what a (re)starting shard needs to know about its events)."""
    return bool(read(cluster, "triggers"))


def set_triggers_active(cluster: str, active: bool) -> None:
    """Record whether any trigger is registered (the subscriber keeps this current)."""
    write(cluster, "triggers", bool(active))
