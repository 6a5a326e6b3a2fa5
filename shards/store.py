"""The in-memory state of one shard: groups of keys, each holding a pickled value (pure, no I/O)."""

from __future__ import annotations


class GroupStore:
    """Groups → keys → pickled values, in insertion order.

    Setting an existing key keeps its position; a deleted and re-set key moves to the end. Empty
    groups do not exist: the last delete of a group removes it.
    """

    def __init__(self) -> None:
        self.groups: dict[str, dict[str, bytes]] = {}

    def get(self, group_id: str, key: str) -> bytes | None:
        """The stored bytes of ``key``, or None if absent."""
        group = self.groups.get(group_id)
        return None if group is None else group.get(key)

    def contains(self, group_id: str, key: str) -> bool:
        """True if ``key`` exists in ``group_id``."""
        group = self.groups.get(group_id)
        return group is not None and key in group

    def put(self, group_id: str, key: str, data: bytes) -> bytes | None:
        """Store ``data`` under ``key``; return the previous bytes or None."""
        group = self.groups.get(group_id)
        if group is None:
            group = self.groups[group_id] = {}
        old = group.get(key)
        group[key] = data
        return old

    def delete(self, group_id: str, key: str) -> bytes | None:
        """Remove ``key``; return its bytes, or None if it was absent."""
        group = self.groups.get(group_id)
        if group is None:
            return None
        old = group.pop(key, None)
        if not group:
            del self.groups[group_id]
        return old

    def values(self, group_id: str) -> list[bytes]:
        """Every value of the group, in insertion order."""
        return list(self.groups.get(group_id, {}).values())

    def items(self, group_id: str) -> list[tuple[str, bytes]]:
        """Every ``(key, bytes)`` of the group, in insertion order."""
        return list(self.groups.get(group_id, {}).items())

    def clear(self, group_id: str) -> list[tuple[str, bytes]]:
        """Remove the whole group; return what it held (in insertion order)."""
        return list(self.groups.pop(group_id, {}).items())

    def group_ids(self) -> list[str]:
        """The non-empty groups, sorted."""
        return sorted(self.groups)

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())
