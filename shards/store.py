"""The in-memory state of one shard: groups of keys, each holding an :class:`Entry` (pure, no I/O)."""

from __future__ import annotations

from shardstate.shards.records import Entry


class GroupStore:
    """Groups → keys → entries (pickled value + version, times), in insertion order.

    Setting an existing key keeps its position; a deleted and re-set key moves to the end. Empty
    groups do not exist: the last delete of a group removes it.
    """

    def __init__(self) -> None:
        self.groups: dict[str, dict[str, Entry]] = {}

    def get(self, group_id: str, key: str) -> Entry | None:
        """The entry of ``key``, or None if absent."""
        group = self.groups.get(group_id)
        return None if group is None else group.get(key)

    def put(self, group_id: str, key: str, entry: Entry) -> Entry | None:
        """Store ``entry`` under ``key``; return the previous entry or None."""
        group = self.groups.get(group_id)
        if group is None:
            group = self.groups[group_id] = {}
        old = group.get(key)
        group[key] = entry
        return old

    def delete(self, group_id: str, key: str) -> Entry | None:
        """Remove ``key``; return its entry, or None if it was absent."""
        group = self.groups.get(group_id)
        if group is None:
            return None
        old = group.pop(key, None)
        if not group:
            del self.groups[group_id]
        return old

    def entries(self, group_id: str) -> list[tuple[str, Entry]]:
        """Every ``(key, entry)`` of the group, in insertion order."""
        return list(self.groups.get(group_id, {}).items())

    def clear(self, group_id: str) -> list[tuple[str, Entry]]:
        """Remove the whole group; return what it held (in insertion order)."""
        return list(self.groups.pop(group_id, {}).items())

    def group_ids(self) -> list[str]:
        """The non-empty groups, sorted."""
        return sorted(self.groups)

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())
