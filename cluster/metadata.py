"""Cluster metadata in Ray's GCS internal KV: settings, placement, epochs, incarnations, trigger state.

The GCS outlives every actor and worker node (and, with GCS fault tolerance, the head), so what a
cluster must know to restart correctly lives here, keyed by cluster name, instead of in a file on one
node. Values are small JSON documents; only shardstate's own actors and clients read or write them,
and Ray's token authentication guards the GCS.

Keys (namespace :data:`KV_NAMESPACE`): ``<cluster>/<name>``:

- ``<cluster>/cluster``: ``{"id": <random hex, made with the cluster>, "config": {...settings}}``
- ``<cluster>/shard/<i>``: where shard ``i`` last opened its storage: ``{"node_id", "node_ip", "path"}``
  (``path`` None for memory shards); a shard with a record must find its file again
- ``<cluster>/shard/<i>/incarnation``: how many times shard ``i`` started (memory shards start their
  event seqs above it; SQLite files carry it too, so an older copy of a file is refused)
- ``<cluster>/triggers``: whether any trigger is registered
- ``<cluster>/shard/<i>/hold``: test/operator switch: a shard holds its load while it is true
- ``<cluster>/console_token``: the bearer token of the cluster's HTTP API and web console (made with
  the first console; clients read it here or from ``start_console()``)
- ``<cluster>/secret``: the cluster's secret (32 random bytes, raw, not JSON), made with the cluster:
  shards and clients prove it to each other when a connection opens (``shardstate.shards.wire``)
"""

from __future__ import annotations

import json
import os
import secrets
import uuid
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


def create(
    cluster: str, config: dict[str, Any], cluster_id: str | None = None
) -> tuple[dict[str, Any], bool]:
    """The cluster's record, creating it (with a new random id) if there is none.

    Atomic in the GCS (put-if-absent): of two creators, both get the record of the one that won.
    Returns ``(record, created)``.
    """
    record = {"id": cluster_id or uuid.uuid4().hex, "config": config}
    existed = internal_kv._internal_kv_put(  # returns whether the key was there already
        _key(cluster, "cluster"), json.dumps(record).encode(), overwrite=False, namespace=KV_NAMESPACE
    )
    if not existed:
        return record, True
    return read(cluster, "cluster"), False


def secret(cluster: str) -> bytes:
    """The cluster's secret, created (32 random bytes) by the first caller.

    Atomic in the GCS (put-if-absent, then read back): every caller gets the one that won. Kept
    only in the GCS (which Ray's token authentication guards), never in a file; clients get it
    through a Ray call to the router.
    """
    key = _key(cluster, "secret")
    internal_kv._internal_kv_put(key, os.urandom(32), overwrite=False, namespace=KV_NAMESPACE)
    value = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
    if not isinstance(value, bytes) or len(value) != 32:
        raise RuntimeError(f"state cluster {cluster!r}: its secret in the GCS is unreadable")
    return value


def console_token(cluster: str) -> str:
    """The bearer token of the cluster's console, created (URL-safe, 256 random bits) by the first
    caller; atomic in the GCS like :func:`secret`."""
    key = _key(cluster, "console_token")
    internal_kv._internal_kv_put(
        key, secrets.token_urlsafe(32).encode(), overwrite=False, namespace=KV_NAMESPACE
    )
    value = internal_kv._internal_kv_get(key, namespace=KV_NAMESPACE)
    if not isinstance(value, bytes) or len(value) < 32:
        raise RuntimeError(f"state cluster {cluster!r}: its console token in the GCS is unreadable")
    return value.decode()


def cluster_record(cluster: str) -> dict[str, Any] | None:
    """``{"id", "config"}`` of ``cluster``, or None if the GCS knows no such cluster."""
    record = read(cluster, "cluster")
    return record if isinstance(record, dict) else None


def shard_record(cluster: str, shard: int) -> dict[str, Any] | None:
    """Where shard ``shard`` last opened its storage (``node_id``, ``node_ip``, ``path``), or None."""
    record = read(cluster, f"shard/{shard}")
    return record if isinstance(record, dict) else None


def record_shard(
    cluster: str, shard: int, node_id: str | None, node_ip: str | None, path: str | None
) -> None:
    """Record where shard ``shard`` keeps its storage (the shard writes this once it opened it)."""
    write(cluster, f"shard/{shard}", {"node_id": node_id, "node_ip": node_ip, "path": path})


def forget_settings(cluster: str) -> None:
    """Drop the cluster's record and placement, keep incarnations (a memory cluster's shutdown)."""
    internal_kv._internal_kv_del(_key(cluster, "cluster"), namespace=KV_NAMESPACE)
    for raw in internal_kv._internal_kv_list(_key(cluster, "shard/"), namespace=KV_NAMESPACE):
        name = raw.decode()
        if not name.endswith("/incarnation"):
            internal_kv._internal_kv_del(raw, namespace=KV_NAMESPACE)


def incarnation(cluster: str, shard: int) -> int:
    """How many times shard ``shard`` started so far (0: never)."""
    return int(read(cluster, f"shard/{shard}/incarnation") or 0)


def record_incarnation(cluster: str, shard: int, count: int) -> None:
    """Record that shard ``shard`` is now in start number ``count``."""
    write(cluster, f"shard/{shard}/incarnation", int(count))


def hold_loading(cluster: str, shard: int, hold: bool) -> None:
    """Make shard ``shard`` hold its next load before reading rows (tests, operators), or release it."""
    write(cluster, f"shard/{shard}/hold", bool(hold))


def load_held(cluster: str, shard: int) -> bool:
    """Whether shard ``shard`` should hold its load (see :func:`hold_loading`)."""
    return bool(read(cluster, f"shard/{shard}/hold"))


def next_incarnation(cluster: str, shard: int) -> int:
    """Count one more start of shard ``shard`` and return the new count (1 on the first start).

    Only one process runs a given shard at a time (Ray restarts an actor after its process is gone),
    so a read-then-write is enough.
    """
    count = incarnation(cluster, shard) + 1
    record_incarnation(cluster, shard, count)
    return count


def triggers_active(cluster: str) -> bool:
    """Whether any trigger is registered (what a (re)starting shard needs to know about its events)."""
    return bool(read(cluster, "triggers"))


def set_triggers_active(cluster: str, active: bool) -> None:
    """Record whether any trigger is registered (the subscriber keeps this current)."""
    write(cluster, "triggers", bool(active))
