"""Where a shard's state lives between restarts: one small seam, two implementations.

The engine produces a :class:`Changes` set per batch (pure data); the shard actor hands it to
``Storage.commit`` *before* it acknowledges the batch, so an acknowledged write is on disk (group
commit: one transaction per batch). ``Storage.load`` returns what a restarted shard starts from.

- :class:`MemoryStorage`: keeps nothing (``durability="memory"``): fast, lost with the process.
- :class:`SqliteStorage`: one SQLite file per shard, WAL mode; ``durability="os"`` (synchronous=NORMAL,
  survives a process crash) or ``"fsync"`` (synchronous=FULL, survives a power loss as far as the
  disk keeps its promises).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from shardstate._errors import StateError
from shardstate.shards.event_forms import Resolver, Unresolved, compact
from shardstate.shards.records import Changes, Event, Loaded

DURABILITY_LEVELS = ("fsync", "os", "memory")


class StorageError(StateError):
    """A shard's storage cannot be opened or written (corrupt, missing or unwritable file)."""


class Storage(Protocol):
    """The storage seam every shard goes through."""

    def load(self) -> Loaded:
        """Everything stored, entries in insertion order."""
        ...

    def commit(self, changes: Changes) -> None:
        """Apply ``changes`` atomically and durably (per the durability level), or raise."""
        ...

    def fetch_op(self, op_id: str) -> bytes | None:
        """The stored (pickled) result of the write ``op_id``, or None."""
        ...

    def count_entries(self) -> int:
        """How many entry rows :meth:`load` will return (for load progress)."""
        ...

    def probe(self) -> None:
        """Write and remove a small record (is storage writable again?), or raise."""
        ...

    def close(self) -> None:
        """Release the storage."""
        ...


class MemoryStorage:
    """Keeps nothing: a shard on memory storage starts empty after every restart.

    ``seq_base`` is where its event seqs start (the shard passes its incarnation shifted left, so
    seqs, and the event ids made of them, never repeat across restarts).
    """

    def __init__(self, seq_base: int = 0) -> None:
        self.seq_base = seq_base

    def load(self) -> Loaded:
        return Loaded([], [], [], self.seq_base, self.seq_base)

    def commit(self, changes: Changes) -> None:
        return None

    def fetch_op(self, op_id: str) -> bytes | None:
        return None

    def count_entries(self) -> int:
        return 0

    def probe(self) -> None:
        return None

    def close(self) -> None:
        return None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS entries (
    pos INTEGER PRIMARY KEY,
    grp TEXT NOT NULL,
    key TEXT NOT NULL,
    data BLOB NOT NULL,
    version INTEGER NOT NULL,
    updated_at REAL NOT NULL,
    expires_at REAL,
    UNIQUE (grp, key)
);
CREATE TABLE IF NOT EXISTS ops (op_id TEXT PRIMARY KEY, created_at REAL NOT NULL, result BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS ops_by_age ON ops (created_at);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    grp TEXT NOT NULL,
    key TEXT NOT NULL,
    old BLOB,
    new BLOB,
    at REAL NOT NULL
);
"""
#: columns added to the events table by later versions (values kept once: Event.base, Event.ops);
#: a file without them gets them when opened
_EVENT_COLUMNS = (("base", "INTEGER"), ("ops", "BLOB"))
_UPSERT = (
    "INSERT INTO entries (grp, key, data, version, updated_at, expires_at) VALUES (?, ?, ?, ?, ?, ?) "
    "ON CONFLICT (grp, key) DO UPDATE SET data = excluded.data, version = excluded.version, "
    "updated_at = excluded.updated_at, expires_at = excluded.expires_at"
)
SCHEMA_VERSION = "1"
_SET_META = "INSERT INTO meta (k, v) VALUES (?, ?) ON CONFLICT (k) DO UPDATE SET v = excluded.v"


class SqliteStorage:
    """One SQLite database file per shard (WAL mode), committed once per batch.

    ``must_exist=True`` (the cluster existed before) turns a missing file into a :class:`StorageError`
    instead of a silent empty shard; a file that is not a healthy SQLite database is one too.
    ``check=False`` skips the integrity check here (it reads the whole file; the shard runs
    :meth:`check` in its background load instead). :meth:`claim` binds the file to its cluster.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        durability: str = "os",
        must_exist: bool = False,
        *,
        check: bool = True,
        missing_hint: str = "",
    ) -> None:
        #: ``":memory:"`` with ``durability="memory"``: an in-memory database (a replicated shard of
        #: a memory cluster: what it holds can be shipped to a backup and promoted from there)
        self.in_memory = str(path) == ":memory:" and durability == "memory"
        if durability not in ("fsync", "os") and not self.in_memory:
            raise StorageError(
                "SqliteStorage durability must be 'fsync' or 'os' (or 'memory' for ':memory:'), "
                f"got {durability!r}"
            )
        self.path = Path(path)
        if must_exist and not self.path.exists():
            raise StorageError(
                f"shard database {self.path} is missing, but this shard stored data before{missing_hint}; "
                "restore the file (or delete the cluster for good to start empty)"
            )
        if not self.in_memory:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.synchronous = {"fsync": "FULL", "os": "NORMAL", "memory": "OFF"}[durability]
            self.db.execute(f"PRAGMA synchronous={self.synchronous}")
            if check:
                self.check()
            self.db.executescript(_SCHEMA)
            self._add_event_columns()
            self.db.execute("INSERT OR IGNORE INTO meta (k, v) VALUES ('schema', ?)", (SCHEMA_VERSION,))
            row = self.db.execute("SELECT v FROM meta WHERE k = 'acked_seq'").fetchone()
            #: the acknowledgement storage holds: rows above it are kept (an event may refer to them)
            self.acked = 0 if row is None else int(row[0])
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"shard database {self.path} is unreadable (corrupt?): {exc}") from None

    def _add_event_columns(self) -> None:
        have = {row[1] for row in self.db.execute("PRAGMA table_info(events)")}
        for name, kind in _EVENT_COLUMNS:
            if name not in have:
                self.db.execute(f"ALTER TABLE events ADD COLUMN {name} {kind}")

    def load(self) -> Loaded:
        entries = self.db.execute(
            "SELECT grp, key, data, version, updated_at, expires_at FROM entries ORDER BY pos"
        )
        op_ids = self.db.execute("SELECT op_id, created_at FROM ops ORDER BY created_at").fetchall()
        wanted = "SELECT k, v FROM meta WHERE k IN ('seq', 'acked_seq', 'lsn')"
        meta = dict(self.db.execute(wanted).fetchall())
        acked = int(meta.get("acked_seq", 0))
        self.acked = acked
        rows = self.db.execute(
            "SELECT seq, kind, grp, key, old, new, at, base, ops FROM events WHERE seq > ? ORDER BY seq",
            (acked,),
        )
        events = _read_events(rows, self.path)
        # the last seq handed out: the newest stored event, or the acknowledgement that dropped it
        # (files written before this rule also kept it as 'seq')
        seq = max(int(meta.get("seq", 0)), acked, events[-1].seq if events else 0)
        return Loaded(entries, op_ids, events, seq, acked, int(meta.get("lsn", 0)))

    def fetch_op(self, op_id: str) -> bytes | None:
        row = self.db.execute("SELECT result FROM ops WHERE op_id = ?", (op_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def count_entries(self) -> int:
        return int(self.db.execute("SELECT count(*) FROM entries").fetchone()[0])

    def check(self) -> None:
        """Run SQLite's quick integrity check (reads the whole file): raise if it is damaged."""
        try:
            check = self.db.execute("PRAGMA quick_check").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"shard database {self.path} is unreadable (corrupt?): {exc}") from None
        if check is None or check[0] != "ok":
            raise StorageError(f"shard database {self.path} failed its integrity check: {check}")

    def claim(self, cluster_id: str, shard: int, known_incarnation: int, stamped_before: bool) -> int:
        """Check that this file is shard ``shard``'s of cluster ``cluster_id`` and not an old copy.

        ``known_incarnation``: the shard's start count in the cluster metadata (the file must carry
        at least that); ``stamped_before``: the metadata says this shard's file was stamped already
        (a file without an id is then a stranger too). Stamps the file with both ids and the next
        start count, durably (fsync, whatever the durability level), and returns that count.
        Raises :class:`StorageError` naming the file and both ids when it does not match.
        """
        rows = self.db.execute("SELECT k, v FROM meta WHERE k IN ('cluster_id', 'shard', 'incarnation')")
        meta = dict(rows.fetchall())
        found_id, found_shard = meta.get("cluster_id"), meta.get("shard")
        found_inc = int(meta.get("incarnation", 0))
        if found_id is None and stamped_before:
            raise StorageError(
                f"shard database {self.path} carries no cluster id, but shard {shard} of cluster id "
                f"{cluster_id} stamped its file before: this is not that file (restore the right one)"
            )
        if found_id is not None and found_id != cluster_id:
            raise StorageError(
                f"shard database {self.path} belongs to cluster id {found_id} (shard {found_shard}), "
                f"not to this cluster (id {cluster_id}, shard {shard}); refusing to open another "
                "cluster's data (move the file away, or point this cluster's storage elsewhere)"
            )
        if found_shard is not None and int(found_shard) != shard:
            raise StorageError(
                f"shard database {self.path} is shard {found_shard}'s file of cluster id {cluster_id}, "
                f"not shard {shard}'s; refusing to serve another shard's data"
            )
        if found_inc < known_incarnation:
            raise StorageError(
                f"shard database {self.path} is an old copy: it was last opened in start {found_inc} of "
                f"shard {shard} (cluster id {cluster_id}), but the shard has started {known_incarnation} "
                "times; refusing to serve stale data (restore the newest file; to serve this one anyway, "
                f"set its start count: shardstate.cluster.metadata.record_incarnation(<cluster>, {shard}, "
                f"{found_inc}))"
            )
        count = max(found_inc, known_incarnation) + 1
        db = self.db
        db.execute("PRAGMA synchronous=FULL")  # the stamp must be on disk before the metadata says so
        try:
            db.execute("BEGIN IMMEDIATE")
            for k, v in (("cluster_id", cluster_id), ("shard", str(shard)), ("incarnation", str(count))):
                db.execute(_SET_META, (k, v))
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.execute(f"PRAGMA synchronous={self.synchronous}")
        return count

    def probe(self) -> None:
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(_SET_META, ("probe", "x" * 16384))  # needs new pages: fails on a full disk
            db.execute("DELETE FROM meta WHERE k = 'probe'")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def limit_pages(self, extra: int | None) -> int:
        """Test hook (never called by shardstate): compact the file and cap it at its size + ``extra``
        pages, so commits that need more fail like on a full disk; None lifts the cap. Returns the cap."""
        if extra is None:
            return int(self.db.execute("PRAGMA max_page_count = 4294967294").fetchone()[0])
        self.db.execute("VACUUM")  # no free pages left inside the file either
        pages = int(self.db.execute("PRAGMA page_count").fetchone()[0])
        return int(self.db.execute(f"PRAGMA max_page_count = {pages + int(extra)}").fetchone()[0])

    def commit(self, changes: Changes) -> None:
        if not changes and changes.lsn is None:
            return
        self.commit_many([changes])

    def commit_many(self, batch: list[Changes]) -> None:
        """Apply several change sets, in order, in one transaction (a backup catching up)."""
        db = self.db
        acked = self.acked
        db.execute("BEGIN IMMEDIATE")
        try:
            for changes in batch:
                self._apply(changes)
            db.execute("COMMIT")
        except BaseException:
            self.acked = acked
            if db.in_transaction:  # SQLite already rolled back on some errors (SQLITE_FULL)
                db.execute("ROLLBACK")
            raise

    def _apply(self, changes: Changes) -> None:
        db = self.db
        for group_id in changes.cleared:
            db.execute("DELETE FROM entries WHERE grp = ?", (group_id,))
        deletes = [(g, k) for (g, k), (e, recreate) in changes.entries.items() if e is None or recreate]
        if deletes:
            db.executemany("DELETE FROM entries WHERE grp = ? AND key = ?", deletes)
        upserts = list(_upsert_rows(changes))
        if upserts:
            db.executemany(_UPSERT, upserts)
        if changes.pruned_ops:  # before the inserts: a pruned op_id may have been used again
            db.executemany("DELETE FROM ops WHERE op_id = ?", [(op,) for op in changes.pruned_ops])
        if changes.op_records:
            db.executemany("INSERT OR REPLACE INTO ops VALUES (?, ?, ?)", changes.op_records)
        if changes.events:
            db.executemany(_INSERT_EVENT, list(_event_rows(changes.events, self.acked)))
        if changes.rebased:  # before the rows they referred to go
            rows = [(old, seq) for seq, old in changes.rebased]
            db.executemany("UPDATE events SET old = ? WHERE seq = ?", rows)
        if changes.acked_seq is not None:
            db.execute("DELETE FROM events WHERE seq <= ?", (changes.acked_seq,))
            db.execute(_SET_META, ("acked_seq", str(changes.acked_seq)))
            self.acked = max(self.acked, changes.acked_seq)  # later sets of the batch compact by it
        if changes.lsn is not None:
            db.execute(_SET_META, ("lsn", str(changes.lsn)))

    def event_bytes(self) -> int:
        """Bytes of values the stored event log holds (old, new and ops of every row)."""
        row = self.db.execute(
            "SELECT coalesce(sum(length(old)), 0) + coalesce(sum(length(new)), 0) "
            "+ coalesce(sum(length(ops)), 0) FROM events"
        ).fetchone()
        return int(row[0])

    def snapshot(self) -> bytes:
        """The whole database as bytes (what a new backup starts from; see :func:`restore_snapshot`)."""
        return bytes(self.db.serialize())

    def close(self) -> None:
        self.db.close()


def restore_snapshot(
    data: bytes, path: str | os.PathLike[str] | None, durability: str
) -> SqliteStorage:
    """A storage holding exactly the database ``data`` (:meth:`SqliteStorage.snapshot`): in memory
    (``durability="memory"``), or written to ``path`` (replacing the file there and its WAL), made
    durable, then opened."""
    if durability == "memory" or path is None:
        storage = SqliteStorage(":memory:", "memory", check=False)
        storage.db.deserialize(data)
        storage.db.execute("PRAGMA synchronous=OFF")
        return storage
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for suffix in ("-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{target}{suffix}")
    tmp = target.with_name(target.name + ".snapshot")
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, target)
    _fsync_directory(target.parent)
    return SqliteStorage(target, durability, check=False)


def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_INSERT_EVENT = "INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"


def _event_rows(events: list[Event], acked: int) -> Iterator[Event]:
    """Events as stored: compact (a large old value refers to the kept row of the event that wrote
    it, a large update's new value is its ops; see :mod:`shardstate.shards.event_forms`)."""
    for event in events:
        yield compact(event, event.base > acked)


def _read_events(rows: Iterator[tuple[object, ...]], path: Path) -> list[Event]:
    """Stored rows (in seq order) back in full form: each value once in memory (an old value read
    by reference is the very bytes object of the event it refers to)."""
    resolver, events = Resolver(limit=None), []
    for row in rows:
        seq, kind, grp, key, old, new, at, base, ops = row
        event = Event(seq, kind, grp, key, old, new, at, base or 0, ops)  # type: ignore[arg-type]
        try:
            events.append(resolver.resolve(event))
        except Unresolved as exc:  # not written by this shardstate: keep the event, say what is missing
            print(f"shardstate: {path}: event {seq} cannot be read back whole: {exc}", file=sys.stderr)
            events.append(event._replace(ops=None))
    return events


def _upsert_rows(changes: Changes) -> Iterator[tuple[object, ...]]:
    for (group_id, key), (entry, _recreate) in changes.entries.items():
        if entry is not None:
            yield (group_id, key, entry.data, entry.version, entry.updated_at, entry.expires_at)


def shard_path(directory: str | os.PathLike[str], shard: int) -> Path:
    """Where shard ``shard`` of a cluster whose directory is ``directory`` keeps its file."""
    return Path(directory) / f"shard-{shard}.db"


def open_storage(
    directory: str | os.PathLike[str] | None,
    shard: int,
    durability: str,
    must_exist: bool = False,
    *,
    seq_base: int = 0,
    check: bool = True,
    missing_hint: str = "",
) -> Storage:
    """The storage of shard ``shard``: ``<directory>/shard-<n>.db``, or memory for ``"memory"``
    (whose event seqs start at ``seq_base``)."""
    if durability not in DURABILITY_LEVELS:
        raise StorageError(f"durability must be one of {DURABILITY_LEVELS}, got {durability!r}")
    if durability == "memory" or directory is None:
        return MemoryStorage(seq_base)
    return SqliteStorage(
        shard_path(directory, shard), durability, must_exist, check=check, missing_hint=missing_hint
    )
