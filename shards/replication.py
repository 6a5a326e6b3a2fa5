"""Replicated shards: the messages between a shard's members, and the primary's side of shipping.

A replicated shard is a set of *members* (shard actors on different nodes): one **primary**, which
serves clients, and backups, which apply the primary's commits. Every commit of the primary is a
numbered log record (its :class:`~shardstate.shards.records.Changes`, with ``lsn``): the primary
commits it to its own storage, ships it to every *in-sync* backup, and answers the batch only when
each of them has committed it too (at the cluster's durability level). A backup that does not
answer within :data:`SHIP_TIMEOUT` is dropped from the in-sync set by the router first (the
primary keeps serving); it catches up later from a snapshot plus the log tail, then counts again.

Terms (the shard's *epoch*): each promotion bumps the shard's term, recorded in the cluster
metadata before the promoted member hears of it. Every record and ping carries the sender's term;
a member that knows a newer term refuses it (``STALE``), and a primary that hears ``STALE`` is
deposed: it stops serving and never acknowledges anything again. Leases keep a deposed primary
from serving reads too: each successful round to the in-sync backups gives the primary
:data:`LEASE` seconds (counted from when the round was sent), and a backup asked to take over
first refuses its old primary, then waits until :data:`LEASE` has passed since it last heard from
it (so the two never serve at once, without synchronized clocks: each side uses its own monotonic
clock; only their rates must agree).

Messages are pickled tuples, sent over a member's own authenticated connection (a control frame,
see :mod:`shardstate.shards.wire`) or, where that is not reachable, as a Ray call; only members
of the cluster (peers that know its secret) can send them. This module has no Ray in it: the
actor passes in how to reach the router and the backups.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

#: Seconds a primary may serve after a round its in-sync backups all answered (sent at the start)
LEASE = 1.0
#: Seconds a primary waits for a backup's answer to a record before it drops the backup
SHIP_TIMEOUT = 1.0
#: Seconds between the primary's pings of its backups while it commits nothing (renews the lease)
PING_EVERY = LEASE / 4
#: Bytes of snapshot per control message while a backup catches up
SNAPSHOT_CHUNK = 8 * 1024 * 1024
#: A catching-up backup is abandoned (tried again later) when more than this many records wait for it
MAX_TAIL = 100_000
#: Records left in the tail when the primary stops writes briefly to hand the backup over
HANDOVER_TAIL = 64
#: Records per message (and per backup transaction) while a backup catches up
CATCH_UP_BATCH = 512

# message kinds
HEARTBEAT, APPLY, APPLY_MANY, PING, SNAPSHOT, PROMOTE, DEPOSE, SYNC = (
    "heartbeat",
    "apply",
    "apply-many",
    "ping",
    "snapshot",
    "promote",
    "depose",
    "sync",
)
# answers
OK, STALE, GAP, REFUSED = "ok", "stale", "gap", "refused"
# member roles
PRIMARY, BACKUP, FENCED = "primary", "backup", "fenced"


def pack(message: tuple[Any, ...]) -> bytes:
    """A control message (or answer) as bytes."""
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def unpack(body: bytes) -> tuple[Any, ...]:
    """A control message (or answer) from bytes; ``ValueError`` if it is not a tuple with a kind."""
    message = pickle.loads(body)
    if not isinstance(message, tuple) or not message or not isinstance(message[0], str):
        raise ValueError(f"a control message is a tuple (kind, ...), got {type(message).__name__}")
    return message


class Deposed(Exception):
    """A member that knows a newer term refused this primary: it must stop serving."""


class NotConfirmed(Exception):
    """A record could not be confirmed (a backup failed and the router could not drop it)."""


class Channel(Protocol):
    """A way to send control messages to one member (its connection, or a Ray call)."""

    def send(self, body: bytes) -> None:
        """Send one message (its answer is the next :meth:`receive`)."""
        ...

    def receive(self, timeout: float) -> bytes:
        """The answer to the oldest message sent and not yet answered; raises on a timeout."""
        ...

    def close(self) -> None:
        """Stop using the channel."""
        ...


@dataclass
class Backup:
    """One in-sync backup as its primary sees it."""

    member: int
    channel: Channel
    #: the last record it confirmed
    lsn: int


@dataclass
class Joiner:
    """A backup catching up: records committed since its snapshot wait here for it."""

    member: int
    #: ``(lsn, pickled changes)`` of the records committed since the snapshot
    tail: deque[tuple[int, bytes]] = field(default_factory=deque)
    abandoned: bool = False


@dataclass
class Pending:
    """A committed record not yet confirmed by every in-sync backup, and what it will notify."""

    lsn: int
    body: bytes
    notify: Any


class Replicator:
    """The primary's side of shipping, for one term (no Ray, no threads of its own).

    The actor calls :meth:`record` for every commit (under its engine lock), then :meth:`confirm`,
    which ships what is pending to every in-sync backup and waits for them (or has the failing ones
    dropped by ``drop``: a callable ``(term, member) -> bool`` that asks the router; False means the
    router knows a newer term). ``confirm`` returns the notifications of the records now confirmed,
    in order; it raises :class:`Deposed` or :class:`NotConfirmed`.
    """

    def __init__(self, term: int, lsn: int, drop: Callable[[int, int], bool]) -> None:
        self.term = term
        self.lsn = lsn
        self.drop = drop
        self.backups: dict[int, Backup] = {}
        self.joiners: dict[int, Joiner] = {}
        self.pending: deque[Pending] = deque()
        #: monotonic time until which this primary may serve (in-sync backups promised not to
        #: take over before); infinite while it has none
        self.lease_until = float("inf")
        self.lock = threading.Lock()  # guards joiners (the catch-up threads read their tails)
        self.dropped = 0
        self.rounds = 0
        #: seconds spent waiting for backups (all rounds): replication's share of write latency
        self.waited = 0.0

    # -- committing ----------------------------------------------------------------------------
    def record(self, lsn: int, changes_body: bytes, notify: Any) -> None:
        """A commit numbered ``lsn`` (its pickled changes): confirm it before answering its batch."""
        self.lsn = lsn
        body = pack((APPLY, self.term, lsn, changes_body))
        self.pending.append(Pending(lsn, body, notify))
        with self.lock:
            for joiner in self.joiners.values():
                if not joiner.abandoned:
                    joiner.tail.append((lsn, changes_body))
                    if len(joiner.tail) > MAX_TAIL:
                        joiner.abandoned = True
                        joiner.tail.clear()

    def needs_round(self, now: float) -> bool:
        """Whether :meth:`confirm` has work: records pending, or a lease about to run out."""
        return bool(self.pending) or (bool(self.backups) and now >= self.lease_until - LEASE / 2)

    def confirm(self) -> list[Any]:
        """Ship every pending record (or a ping) to the in-sync backups and wait for all of them."""
        if not self.backups:
            notes = [p.notify for p in self.pending]
            self.pending.clear()
            self.lease_until = float("inf")
            return notes
        started = time.monotonic()
        sent: dict[int, int] = {}
        failed: list[int] = []
        for member, backup in self.backups.items():
            try:
                count = 0
                for p in self.pending:
                    if p.lsn > backup.lsn:
                        backup.channel.send(p.body)
                        count += 1
                if not count:
                    backup.channel.send(pack((PING, self.term, self.lsn)))
                    count = 1
                sent[member] = count
            except Exception:
                failed.append(member)
        stale = False
        for member, count in sent.items():
            backup = self.backups[member]
            try:
                for _ in range(count):
                    answer = unpack(backup.channel.receive(SHIP_TIMEOUT))
                    if answer[0] == STALE:
                        stale = True
                        break
                    if answer[0] != OK:
                        raise ConnectionError(f"backup {member} answered {answer!r}")
                    backup.lsn = max(backup.lsn, int(answer[1]))
            except Exception:
                failed.append(member)
        if stale:
            raise Deposed(f"a backup knows a newer term than {self.term}")
        for member in failed:
            self._drop(member)
        self.rounds += 1
        self.waited += time.monotonic() - started
        self.lease_until = started + LEASE if self.backups else float("inf")
        notes = [p.notify for p in self.pending]
        self.pending.clear()
        return notes

    def _drop(self, member: int) -> None:
        """Drop a failing backup: the router first (it must never promote it), then here."""
        try:
            allowed = self.drop(self.term, member)
        except Exception as exc:
            raise NotConfirmed(f"backup {member} failed and the router could not drop it: {exc}") from exc
        if not allowed:
            raise Deposed(f"the router knows a newer term than {self.term}")
        backup = self.backups.pop(member, None)
        if backup is not None:
            backup.channel.close()
        self.dropped += 1

    # -- backups joining -----------------------------------------------------------------------
    def join(self, member: int) -> Joiner:
        """Start collecting the log tail for ``member`` (call under the engine lock, with the
        snapshot taken at :attr:`lsn`)."""
        joiner = Joiner(member)
        with self.lock:
            self.joiners[member] = joiner
        return joiner

    def take_tail(self, joiner: Joiner, limit: int = 1024) -> list[tuple[int, bytes]]:
        """Up to ``limit`` records of ``joiner``'s tail, oldest first (removed from it)."""
        with self.lock:
            out: list[tuple[int, bytes]] = []
            while joiner.tail and len(out) < limit:
                out.append(joiner.tail.popleft())
            return out

    def admit(self, joiner: Joiner, channel: Channel, lsn: int) -> None:
        """``joiner`` caught up to ``lsn`` (call under the engine lock, its tail empty): it is in sync."""
        with self.lock:
            self.joiners.pop(joiner.member, None)
        old = self.backups.pop(joiner.member, None)
        if old is not None:
            old.channel.close()
        self.backups[joiner.member] = Backup(joiner.member, channel, lsn)

    def forget_joiner(self, joiner: Joiner) -> None:
        """Stop collecting for a joiner that failed."""
        with self.lock:
            if self.joiners.get(joiner.member) is joiner:
                del self.joiners[joiner.member]

    def close(self) -> None:
        """Close every channel (a deposed or stopping primary)."""
        for backup in self.backups.values():
            backup.channel.close()
        self.backups.clear()
        with self.lock:
            for joiner in self.joiners.values():
                joiner.abandoned = True
            self.joiners.clear()

    def status(self) -> dict[str, Any]:
        """What ``info()`` shows of replication on a primary."""
        now = time.monotonic()
        return {
            "in_sync": sorted(self.backups),
            "backup_lsn": {m: b.lsn for m, b in self.backups.items()},
            "joining": sorted(self.joiners),
            "pending": len(self.pending),
            "lease_left": None if self.lease_until == float("inf") else round(self.lease_until - now, 3),
            "dropped": self.dropped,
            "rounds": self.rounds,
            "round_us": round(1e6 * self.waited / self.rounds, 1) if self.rounds else None,
        }


def tail_messages(term: int, records: list[tuple[int, bytes]]) -> list[bytes]:
    """Records of a catching-up backup's tail as ``APPLY_MANY`` messages (each one transaction)."""
    return [
        pack((APPLY_MANY, term, records[i : i + CATCH_UP_BATCH]))
        for i in range(0, len(records), CATCH_UP_BATCH)
    ]


def snapshot_messages(term: int, lsn: int, data: bytes) -> list[bytes]:
    """A snapshot of ``data`` (a database taken at log position ``lsn``) as control messages."""
    total = len(data)
    chunks = range(0, max(total, 1), SNAPSHOT_CHUNK)
    return [pack((SNAPSHOT, term, lsn, off, total, data[off : off + SNAPSHOT_CHUNK])) for off in chunks]
