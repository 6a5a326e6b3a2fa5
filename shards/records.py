"""Plain data passed between the engine, the store and storage: entries, op records, change sets."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple


class Entry(NamedTuple):
    """One stored value with its metadata. ``expires_at`` is a Unix time or None (no TTL)."""

    data: bytes
    version: int
    updated_at: float
    expires_at: float | None


class OpRecord(NamedTuple):
    """The remembered result of an idempotent write (``op_id``), pickled, and when it was made."""

    op_id: str
    created_at: float
    result: bytes


class Event(NamedTuple):
    """One committed change, as the shard's event log (outbox) keeps it.

    ``kind`` is ``"state:created" | "state:updated" | "state:deleted"``; ``old``/``new`` are the
    pickled values (None where there is none); ``seq`` grows by one per event on this shard.

    Values are kept once (see :mod:`shardstate.shards.event_forms`): ``base`` is the seq of the
    event that wrote ``old`` (the key's previous version; 0: none or unknown) and ``ops`` the
    pickled update ops that turned ``old`` into ``new`` (None: not an update, or not worth it). In
    memory an event holds both values (``old`` is the very bytes object of the event ``base``, not
    a copy); stored and sent, it may leave ``old`` out (read it from event ``base``) and ``new``
    (apply ``ops`` to ``old``): its *compact* form.
    """

    seq: int
    kind: str
    group_id: str
    key: str
    old: bytes | None
    new: bytes | None
    at: float
    base: int = 0
    ops: bytes | None = None


@dataclass
class Changes:
    """What one batch changed, in a form storage can apply in one transaction.

    ``entries`` maps ``(group, key)`` to the key's final entry (None: deleted) and whether the key
    was deleted and created again in the batch (it then moves to the end of its group's order).
    ``cleared`` groups are removed before ``entries`` are applied.
    """

    entries: dict[tuple[str, str], tuple[Entry | None, bool]] = field(default_factory=dict)
    cleared: set[str] = field(default_factory=set)
    op_records: list[OpRecord] = field(default_factory=list)
    pruned_ops: list[str] = field(default_factory=list)
    #: events of this batch, written in the same transaction as the entries (the outbox)
    events: list[Event] = field(default_factory=list)
    #: the subscribers acknowledged every event up to this seq: storage may drop them
    acked_seq: int | None = None
    #: ``(seq, old value)`` of kept events whose stored old value referred to an event dropped now
    #: (by ``acked_seq``): storage writes the value into their row before it drops the other
    rebased: list[tuple[int, bytes]] = field(default_factory=list)
    #: the replication log position of this change set (a replicated shard numbers its commits;
    #: storage records it in the same transaction; None: not numbered)
    lsn: int | None = None

    def put(self, group_id: str, key: str, entry: Entry, created: bool) -> None:
        """Record that ``key`` now holds ``entry`` (``created``: it did not exist before this write).

        A key that existed keeps its place; a created key goes to the end of the insertion order,
        and one deleted earlier in the batch is deleted and inserted again (``recreate``).
        """
        gk = (group_id, key)
        if not created:
            _, recreate = self.entries.get(gk, (None, False))
            self.entries[gk] = (entry, recreate)  # assignment keeps the dict position
            return
        previous = self.entries.pop(gk, None)
        self.entries[gk] = (entry, previous is not None)

    def delete(self, group_id: str, key: str) -> None:
        """Record that ``key`` was deleted."""
        self.entries.pop((group_id, key), None)
        self.entries[(group_id, key)] = (None, False)

    def clear(self, group_id: str) -> None:
        """Record that the whole group was removed."""
        for gk in [gk for gk in self.entries if gk[0] == group_id]:
            del self.entries[gk]
        self.cleared.add(group_id)

    def prune_op(self, op_id: str) -> None:
        """Record that ``op_id`` is forgotten (also if it was recorded earlier in this change set)."""
        if any(r.op_id == op_id for r in self.op_records):
            self.op_records = [r for r in self.op_records if r.op_id != op_id]
        self.pruned_ops.append(op_id)

    def __bool__(self) -> bool:
        return bool(
            self.entries
            or self.cleared
            or self.op_records
            or self.pruned_ops
            or self.events
            or self.acked_seq is not None
        )


@dataclass
class Loaded:
    """What a shard starts from.

    ``entries``: rows ``(group, key, data, version, updated_at, expires_at)`` in insertion order.
    ``op_ids``: ``(op_id, created_at)`` of remembered writes, oldest first; their results stay in
    storage until a repeated call asks for one (``Storage.fetch_op``), so a restart reads no blobs.
    """

    entries: Iterable[tuple[str, str, bytes, int, float, float | None]]
    op_ids: list[tuple[str, float]]
    #: events not yet acknowledged by the subscribers, in seq order
    events: list[Event] = field(default_factory=list)
    #: the last seq this shard handed out, and the last one its subscribers acknowledged
    seq: int = 0
    acked_seq: int = 0
    #: the replication log position of the last commit (0: none numbered)
    lsn: int = 0
