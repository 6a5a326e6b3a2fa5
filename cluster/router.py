"""The router actor: owns a cluster's shard map and exposes the whole API for handle-only callers.

Clients ask the router for the map once (``shard_map``) and then call shard actors directly: the
router is not on the data path. Callers that hold only the router's handle (another language's
worker, a quick script) can call ``set/get/...`` on it; it forwards each call to the owning shard.
It is an async actor, so forwarding many calls at once costs no threads.
"""

from __future__ import annotations

import asyncio
import builtins
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shardstate._models import SetResult, StateItem
from shardstate._requests import (
    GROUPS_COMMAND,
    Request,
    clear_request,
    delete_request,
    get_request,
    items_request,
    list_request,
    merge_groups,
    set_request,
    unwrap,
    update_request,
)
from shardstate.cluster.config import NAMESPACE, ClusterConfig
from shardstate.cluster.slots import SlotMap
from shardstate.cluster.subscriber import subscriber_actor_class
from shardstate.shards.actor import SWEEP_INTERVAL, shard_actor_class
from shardstate.shards.storage import StorageError

MANIFEST = "cluster.json"
#: subscriber actors per cluster (each follows every SUBSCRIBERS-th shard)
SUBSCRIBERS = 1


class RouterActor:
    """Creates (or re-attaches to) a cluster's shard actors and holds the versioned slot map.

    With durable storage the router keeps a manifest (``<storage>/<cluster>/cluster.json``: the
    settings and which node holds each shard's file). A re-created cluster reads it: its settings
    win over the requested ones, each shard is pinned to the node that has its file, and a shard
    whose file is gone fails to start with a clear error instead of coming up empty.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        requested = ClusterConfig(**config)
        self.manifest_path: Path | None = None
        manifest: dict[str, Any] | None = None
        if requested.durability != "memory":
            self.manifest_path = Path(os.path.expanduser(requested.directory())) / MANIFEST
            manifest = _read_manifest(self.manifest_path)
        if manifest is not None:
            kept = {k: v for k, v in manifest["config"].items() if k not in ("name", "storage")}
            requested = ClusterConfig(**{**requested.to_dict(), **kept})
        self.config = requested
        self.map = SlotMap.initial(self.config.shards)
        self.nodes = _place(self.config.shards, manifest)
        self.shards = [self._start_shard(i, manifest is not None) for i in range(self.config.shards)]
        self.subscribers = [
            subscriber_actor_class.options(
                name=self.config.subscriber_name(i),
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
            ).remote(self.config.to_dict(), i, SUBSCRIBERS)
            for i in range(SUBSCRIBERS)
        ]

    def _start_shard(self, index: int, must_exist: bool) -> Any:
        cfg = self.config
        node_id, _ip = self.nodes[index]
        return shard_actor_class.options(
            name=cfg.shard_name(index),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=cfg.durability == "memory"),
        ).remote(
            cfg.name,
            index,
            self.map.slots_of(index),
            self.map.epoch,
            cfg.max_value_size,
            None if cfg.durability == "memory" else cfg.directory(),
            cfg.durability,
            must_exist,
            cfg.op_retention,
            SWEEP_INTERVAL,
            cfg.subscriber_name(index % SUBSCRIBERS),
        )

    # -- cluster management -------------------------------------------------------------------
    async def ready(self) -> dict[str, Any]:
        """Wait until every shard answers, record the manifest; return the cluster's settings."""
        await asyncio.gather(*(s.ping.remote() for s in self.shards))
        if self.manifest_path is not None:
            _write_manifest(self.manifest_path, self.config, self.nodes)
        for sub in self.subscribers:
            sub.ensure_running.remote()  # starts the pumps (they pick up unacknowledged events)
        return self.config.to_dict()

    def settings(self) -> dict[str, Any]:
        """The cluster's settings (without waiting for the shards)."""
        return self.config.to_dict()

    def shard_map(self) -> tuple[int, tuple[int, ...], list[Any]]:
        """``(epoch, slot owners, shard handles)`` for clients that route by themselves."""
        return (self.map.epoch, self.map.owners, list(self.shards))

    async def shard_info(self) -> builtins.list[dict[str, Any]]:
        """Every shard's ``info()``, in shard order."""
        return list(await asyncio.gather(*(s.info.remote() for s in self.shards)))

    def shutdown(self) -> int:
        """Stop every shard and subscriber actor; return how many shards were stopped."""
        for actor in [*self.subscribers, *self.shards]:
            ray.kill(actor, no_restart=True)
        return len(self.shards)

    async def subscribers_ready(self) -> list[int]:
        """Start (if needed) every subscriber's pumps and reload its triggers; wait for both."""
        await asyncio.gather(*(s.ensure_running.remote() for s in self.subscribers))
        return list(await asyncio.gather(*(s.reload_triggers.remote() for s in self.subscribers)))

    async def subscriber_stats(self) -> list[dict[str, Any]]:
        """Every subscriber's counters."""
        return list(await asyncio.gather(*(s.stats.remote() for s in self.subscribers)))

    # -- the API, forwarded -------------------------------------------------------------------
    async def _forward(self, req: Request) -> Any:
        shard = self.shards[self.map.shard_of(req.group_id)]
        (result,) = await shard.execute.remote([req.cmd])
        return req.decode(unwrap(result))

    async def set(self, group_id: str, key: str, value: Any) -> SetResult:
        """See ``StateClient.set``."""
        return await self._forward(set_request(group_id, key, value, self.config.max_value_size))  # type: ignore[no-any-return]

    async def get(self, group_id: str, key: str) -> Any:
        """See ``StateClient.get``."""
        return await self._forward(get_request(group_id, key))

    async def delete(self, group_id: str, key: str) -> Any:
        """See ``StateClient.delete``."""
        return await self._forward(delete_request(group_id, key))

    async def list(self, group_id: str) -> builtins.list[Any]:
        """See ``StateClient.list``."""
        return await self._forward(list_request(group_id))  # type: ignore[no-any-return]

    async def items(self, group_id: str) -> builtins.list[StateItem]:
        """See ``StateClient.items``."""
        return await self._forward(items_request(group_id))  # type: ignore[no-any-return]

    async def clear(self, group_id: str) -> int:
        """See ``StateClient.clear``."""
        return await self._forward(clear_request(group_id))  # type: ignore[no-any-return]

    async def update(self, group_id: str, key: str, ops: Sequence[Any]) -> SetResult:
        """See ``StateClient.update``."""
        return await self._forward(update_request(group_id, key, ops))  # type: ignore[no-any-return]

    async def list_groups(self) -> builtins.list[str]:
        """See ``StateClient.list_groups``."""
        results = await asyncio.gather(*(s.execute.remote([GROUPS_COMMAND]) for s in self.shards))
        return merge_groups([r[0] for r in results])


#: The Ray actor class (async: forwarding calls interleave while shards work).
router_actor_class = ray.remote(num_cpus=0)(RouterActor)


def _read_manifest(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
        manifest["config"]["shards"]  # noqa: B018 - must be there
        return manifest
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"cluster manifest {path} is unreadable: {exc}") from None


def _write_manifest(path: Path, config: ClusterConfig, nodes: list[tuple[str, str]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"config": config.to_dict(), "placement": {str(i): ip for i, (_, ip) in enumerate(nodes)}}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=2))
    os.replace(tmp, path)


def _place(num_shards: int, manifest: dict[str, Any] | None) -> list[tuple[str, str]]:
    """``(node_id, node_ip)`` per shard: where its file is, or spread over the alive nodes."""
    alive = sorted((n["NodeID"], n["NodeManagerAddress"]) for n in ray.nodes() if n.get("Alive"))
    if not alive:
        raise StorageError("no alive Ray node to place shards on")
    placement = (manifest or {}).get("placement", {})
    nodes = []
    for index in range(num_shards):
        ip = placement.get(str(index))
        if ip is None:
            nodes.append(alive[index % len(alive)])
            continue
        match = [n for n in alive if n[1] == ip]
        if match:
            nodes.append(match[0])
        elif len(alive) == 1:  # a one-node cluster whose address changed: the file is here
            nodes.append(alive[0])
        else:
            raise StorageError(
                f"shard {index} keeps its data on node {ip}, which is not in the Ray cluster; "
                "bring that node back (or restore its shard file on another node and edit the manifest)"
            )
    return nodes
