"""The slot map: a stable group → slot hash and the assignment of slots to shards.

Groups hash into a fixed number of slots with CRC-32 of their UTF-8 bytes (stable across processes
and Python versions, unlike the salted built-in ``hash()``); slots are dealt to shards round-robin.
Moving a slot to another shard later changes only the assignment, never the hash.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

NUM_SLOTS = 4096


def slot_of(group_id: str) -> int:
    """The slot of ``group_id``: CRC-32 of its UTF-8 bytes modulo :data:`NUM_SLOTS`."""
    return zlib.crc32(group_id.encode("utf-8")) % NUM_SLOTS


def round_robin(num_shards: int) -> tuple[int, ...]:
    """A slot → shard assignment dealing slots to ``num_shards`` shards in turn."""
    if num_shards < 1:
        raise ValueError("a cluster needs at least one shard")
    return tuple(slot % num_shards for slot in range(NUM_SLOTS))


@dataclass(frozen=True)
class SlotMap:
    """Which shard owns each slot, versioned by ``epoch`` (bumped on every change)."""

    epoch: int
    owners: tuple[int, ...]

    def shard_of(self, group_id: str) -> int:
        """The index of the shard that owns ``group_id``."""
        return self.owners[slot_of(group_id)]

    def slots_of(self, shard: int) -> frozenset[int]:
        """The slots owned by ``shard``."""
        return frozenset(s for s, owner in enumerate(self.owners) if owner == shard)

    @classmethod
    def initial(cls, num_shards: int) -> SlotMap:
        """The map of a new cluster: epoch 1, round-robin."""
        return cls(1, round_robin(num_shards))

    @staticmethod
    def check(owners: Sequence[int], num_shards: int) -> None:
        """Raise ValueError unless ``owners`` assigns every slot to an existing shard."""
        if len(owners) != NUM_SLOTS or any(not 0 <= o < num_shards for o in owners):
            raise ValueError("slot map must assign every slot to an existing shard")
