"""The shard actor: a thin Ray shell around :class:`ShardEngine`.

Written as a plain class and made remote at the edge (``shard_actor_class``). It runs as a sync actor
with ``max_concurrency=1``: Ray then executes its calls one at a time and keeps each caller's order,
so the actor itself is the serialization point of every group it owns and needs no locks.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from typing import Any

import ray

from shardstate._errors import InvalidInput
from shardstate.cluster.slots import slot_of
from shardstate.shards.commands import Result
from shardstate.shards.engine import ShardEngine
from shardstate.shards.validation import DEFAULT_MAX_VALUE_SIZE


class ShardActor:
    """Owns a set of slots and executes command batches for the groups in them."""

    def __init__(
        self,
        cluster: str,
        index: int,
        slots: Iterable[int],
        epoch: int,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
    ) -> None:
        self.cluster = cluster
        self.index = index
        self.epoch = epoch
        self.slots = frozenset(slots)
        self.engine = ShardEngine(owns=self._owns, max_value_size=max_value_size)

    def _owns(self, group_id: str) -> bool:
        return slot_of(group_id) in self.slots

    def execute(self, batch: Sequence[Any]) -> list[Result]:
        """Execute a batch of commands in order; one result per command (errors included)."""
        if not isinstance(batch, (list, tuple)):
            return [(False, _bad_batch(batch))]
        return self.engine.execute_batch(batch)

    def set_slots(self, slots: Iterable[int], epoch: int) -> int:
        """Take a new slot assignment (from the router); return the new epoch."""
        if epoch > self.epoch:
            self.slots, self.epoch = frozenset(slots), epoch
        return self.epoch

    def info(self) -> dict[str, Any]:
        """Where this shard runs and what it holds (for tests, the console and the CLI)."""
        store = self.engine.store
        return {
            "index": self.index,
            "epoch": self.epoch,
            "pid": os.getpid(),
            "node_id": ray.get_runtime_context().get_node_id(),
            "groups": len(store.groups),
            "keys": len(store),
        }

    def ping(self) -> int:
        """Liveness check: returns this shard's index."""
        return self.index


def _bad_batch(batch: Any) -> Exception:
    return InvalidInput(f"a batch is a list of commands, got {type(batch).__name__}")


#: The Ray actor class: sync, one call at a time (the serialization point).
shard_actor_class = ray.remote(max_concurrency=1, num_cpus=0)(ShardActor)  # type: ignore[call-overload]
