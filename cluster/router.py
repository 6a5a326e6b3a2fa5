"""The router actor: owns a cluster's shard map and exposes the whole API for handle-only callers.

Clients ask the router for the map once (``shard_map``) and then call shard actors directly: the
router is not on the data path. Callers that hold only the router's handle (another language's
worker, a quick script) can call ``set/get/...`` on it; it forwards each call to the owning shard.
It is an async actor, so forwarding many calls at once costs no threads.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import Sequence
from typing import Any

import ray

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
from shardstate.shards.actor import shard_actor_class


class RouterActor:
    """Creates (or re-attaches to) a cluster's shard actors and holds the versioned slot map."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = ClusterConfig(**config)
        self.map = SlotMap.initial(self.config.shards)
        self.shards = [self._start_shard(i) for i in range(self.config.shards)]

    def _start_shard(self, index: int) -> Any:
        cfg = self.config
        return shard_actor_class.options(
            name=cfg.shard_name(index),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            scheduling_strategy="SPREAD",
        ).remote(cfg.name, index, self.map.slots_of(index), self.map.epoch, cfg.max_value_size)

    # -- cluster management -------------------------------------------------------------------
    async def ready(self) -> dict[str, Any]:
        """Wait until every shard answers; return the cluster's settings."""
        await asyncio.gather(*(s.ping.remote() for s in self.shards))
        return self.config.to_dict()

    def shard_map(self) -> tuple[int, tuple[int, ...], list[Any]]:
        """``(epoch, slot owners, shard handles)`` for clients that route by themselves."""
        return (self.map.epoch, self.map.owners, list(self.shards))

    async def shard_info(self) -> builtins.list[dict[str, Any]]:
        """Every shard's ``info()``, in shard order."""
        return list(await asyncio.gather(*(s.info.remote() for s in self.shards)))

    def shutdown(self) -> int:
        """Stop every shard actor; return how many were stopped."""
        for shard in self.shards:
            ray.kill(shard, no_restart=True)
        return len(self.shards)

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
