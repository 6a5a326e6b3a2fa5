"""Where a shard must run: on the node that has its file (pure; the router calls it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from shardstate.shards.storage import StorageError


def place_shard(
    index: int, known: dict[str, Any] | None, alive: Sequence[tuple[str, str]]
) -> tuple[str, str]:
    """``(node id, node IP)`` where shard ``index`` must run.

    ``known``: where the cluster metadata says its file is (``node_id``, ``node_ip``), or None (a
    new shard: spread over the alive nodes). The node is found by id, else by IP (a node restarted
    with the same address); on a one-node Ray the one node (its file is checked when opened: a
    missing or foreign file is refused). Otherwise a :class:`StorageError` names the node it needs.
    """
    if not alive:
        raise StorageError("no alive Ray node to place shards on")
    if known is None:
        return alive[index % len(alive)]
    node_id, node_ip = known.get("node_id"), known.get("node_ip")
    for node in alive:
        if node_id is not None and node[0] == node_id:
            return node
    for node in alive:
        if node_ip is not None and node[1] == node_ip:
            return node
    if len(alive) == 1:
        return alive[0]
    raise StorageError(
        f"shard {index} keeps its data on node {node_id} ({node_ip}), which is not in the Ray cluster "
        f"(alive: {', '.join(f'{i} ({ip})' for i, ip in alive)}); bring that node back, or restore the "
        "shard's file on another node"
    )
