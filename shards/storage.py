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

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from shardstate._errors import StateError
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

    def close(self) -> None:
        """Release the storage."""
        ...


class MemoryStorage:
    """Keeps nothing: a shard on memory storage starts empty after every restart."""

    def load(self) -> Loaded:
        return Loaded([], [])

    def commit(self, changes: Changes) -> None:
        return None

    def fetch_op(self, op_id: str) -> bytes | None:
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
    """

    def __init__(
        self, path: str | os.PathLike[str], durability: str = "os", must_exist: bool = False
    ) -> None:
        if durability not in ("fsync", "os"):
            raise StorageError(f"SqliteStorage durability must be 'fsync' or 'os', got {durability!r}")
        self.path = Path(path)
        if must_exist and not self.path.exists():
            raise StorageError(
                f"shard database {self.path} is missing, but this shard stored data before; "
                "restore the file (or remove the cluster's directory to start empty)"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute(f"PRAGMA synchronous={'FULL' if durability == 'fsync' else 'NORMAL'}")
            check = self.db.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise StorageError(f"shard database {self.path} failed its integrity check: {check}")
            self.db.executescript(_SCHEMA)
            self.db.execute("INSERT OR IGNORE INTO meta (k, v) VALUES ('schema', ?)", (SCHEMA_VERSION,))
        except sqlite3.DatabaseError as exc:
            raise StorageError(f"shard database {self.path} is unreadable (corrupt?): {exc}") from None

    def load(self) -> Loaded:
        entries = self.db.execute(
            "SELECT grp, key, data, version, updated_at, expires_at FROM entries ORDER BY pos"
        )
        op_ids = self.db.execute("SELECT op_id, created_at FROM ops ORDER BY created_at").fetchall()
        meta = dict(self.db.execute("SELECT k, v FROM meta WHERE k IN ('seq', 'acked_seq')").fetchall())
        acked = int(meta.get("acked_seq", 0))
        rows = self.db.execute(
            "SELECT seq, kind, grp, key, old, new, at FROM events WHERE seq > ? ORDER BY seq", (acked,)
        )
        events = [Event(*row) for row in rows]
        # the last seq handed out: the newest stored event, or the acknowledgement that dropped it
        # (files written before this rule also kept it as 'seq')
        seq = max(int(meta.get("seq", 0)), acked, events[-1].seq if events else 0)
        return Loaded(entries, op_ids, events, seq, acked)

    def fetch_op(self, op_id: str) -> bytes | None:
        row = self.db.execute("SELECT result FROM ops WHERE op_id = ?", (op_id,)).fetchone()
        return None if row is None else bytes(row[0])

    def commit(self, changes: Changes) -> None:
        if not changes:
            return
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
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
                db.executemany("INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?, ?, ?, ?)", changes.events)
            if changes.acked_seq is not None:
                db.execute("DELETE FROM events WHERE seq <= ?", (changes.acked_seq,))
                db.execute(_SET_META, ("acked_seq", str(changes.acked_seq)))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        self.db.close()


def _upsert_rows(changes: Changes) -> Iterator[tuple[object, ...]]:
    for (group_id, key), (entry, _recreate) in changes.entries.items():
        if entry is not None:
            yield (group_id, key, entry.data, entry.version, entry.updated_at, entry.expires_at)


def open_storage(
    directory: str | os.PathLike[str] | None, shard: int, durability: str, must_exist: bool = False
) -> Storage:
    """The storage of shard ``shard``: ``<directory>/shard-<n>.db``, or memory for ``"memory"``."""
    if durability not in DURABILITY_LEVELS:
        raise StorageError(f"durability must be one of {DURABILITY_LEVELS}, got {durability!r}")
    if durability == "memory" or directory is None:
        return MemoryStorage()
    return SqliteStorage(Path(directory) / f"shard-{shard}.db", durability, must_exist)
