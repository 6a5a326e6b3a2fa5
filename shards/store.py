"""The in-memory state of one shard: groups of keys, each holding an :class:`Entry` (pure, no I/O)."""

from __future__ import annotations

from bisect import bisect_left, bisect_right, insort

from shardstate.shards.records import Entry


class GroupStore:
    """Groups → keys → entries (pickled value + version, times), in insertion order.

    Setting an existing key keeps its position; a deleted and re-set key moves to the end. Empty
    groups do not exist: the last delete of a group removes it. A group's item count is the length
    of its dict (kept by Python, so counting costs nothing).

    For paging in key order (:meth:`keys_after`), a group gets a sorted list of its keys the first
    time it is paged; from then on that list is kept up to date on every create and delete (a
    bisect each), so a page costs ``O(log n + page)``, not a sort of the group.
    """

    def __init__(self) -> None:
        self.groups: dict[str, dict[str, Entry]] = {}
        #: group -> its keys, sorted; only for groups that were paged (see :meth:`keys_after`)
        self._sorted: dict[str, list[str]] = {}

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
        if old is None:
            keys = self._sorted.get(group_id)
            if keys is not None:
                insort(keys, key)
        return old

    def delete(self, group_id: str, key: str) -> Entry | None:
        """Remove ``key``; return its entry, or None if it was absent."""
        group = self.groups.get(group_id)
        if group is None:
            return None
        old = group.pop(key, None)
        if not group:
            del self.groups[group_id]
            self._sorted.pop(group_id, None)
        elif old is not None:
            keys = self._sorted.get(group_id)
            if keys is not None:
                del keys[bisect_left(keys, key)]
        return old

    def entries(self, group_id: str) -> list[tuple[str, Entry]]:
        """Every ``(key, entry)`` of the group, in insertion order."""
        return list(self.groups.get(group_id, {}).items())

    def clear(self, group_id: str) -> list[tuple[str, Entry]]:
        """Remove the whole group; return what it held (in insertion order)."""
        self._sorted.pop(group_id, None)
        return list(self.groups.pop(group_id, {}).items())

    def count(self, group_id: str) -> int:
        """How many keys the group holds."""
        return len(self.groups.get(group_id, ()))

    def keys_after(self, group_id: str, after: str | None, prefix: str, limit: int) -> list[str]:
        """Up to ``limit`` keys of the group in sorted order: those greater than ``after`` (None: from
        the first) that start with ``prefix``.

        A key that exists for a whole scan (pages taken with each page's last key as the next
        ``after``) is returned exactly once, whatever else is created or deleted meanwhile.
        """
        group = self.groups.get(group_id)
        if not group or limit <= 0:
            return []
        keys = self._sorted.get(group_id)
        if keys is None:
            keys = self._sorted[group_id] = sorted(group)
        start = bisect_left(keys, prefix) if after is None or after < prefix else bisect_right(keys, after)
        out = keys[start : start + limit]
        if prefix and out and not out[-1].startswith(prefix):
            out = [k for k in out if k.startswith(prefix)]  # sorted: the matches come first
        return out

    def forget_order(self) -> None:
        """Drop the sorted key lists (after the groups were replaced wholesale)."""
        self._sorted.clear()

    def group_ids(self) -> list[str]:
        """The non-empty groups, sorted."""
        return sorted(self.groups)

    def __len__(self) -> int:
        return sum(len(g) for g in self.groups.values())
