"""Event values kept once: compact forms read back whole, bytes grow linearly for a growing document.

Issue 10, item 6 (second half): an event stores a large old value by reference to the event that
wrote it and a large update's new value as its ops, in the engine's memory accounting, in SQLite
and in what is sent; what a reader rebuilds (and so what handlers get) is exactly the full event.
"""

from __future__ import annotations

import pickle
import sqlite3
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardstate.shards import commands as C
from shardstate.shards.engine import ShardEngine
from shardstate.shards.event_forms import (
    VALUE_REF_MIN,
    Resolver,
    Shipper,
    Unresolved,
    by_reference,
    ship_batch,
)
from shardstate.shards.records import Event
from shardstate.shards.storage import SqliteStorage

pytestmark = pytest.mark.timeout(120)

FIELD = "x" * 100


def merge(i: int) -> C.Command:
    """A fan-in step: merge one 100-byte field into the growing document."""
    ops = [{"type": "merge", "path": "fields", "value": {f"t{i}": FIELD}}]
    return C.command(C.UPDATE, "doc", "merged", ops)


def run(engine: ShardEngine, *cmds: C.Command) -> list[Any]:
    results = engine.execute_batch(list(cmds))
    assert all(ok for ok, _ in results), results
    return results


def fan_in(n: int, path: Path, ack_every: int = 0) -> tuple[ShardEngine, SqliteStorage]:
    """``n`` merges into one document, each its own batch committed to SQLite (a trigger listens,
    nothing acknowledged unless ``ack_every``)."""
    storage = SqliteStorage(path)
    engine = ShardEngine()
    engine.load(storage.load())
    for i in range(n):
        run(engine, merge(i))
        storage.commit(engine.take_changes())
        if ack_every and i % ack_every == ack_every - 1:
            engine.ack(engine.seq - 1)  # the last event stays: it refers to the one acknowledged now
            storage.commit(engine.take_changes())
    return engine, storage


def stored_bytes(path: Path) -> int:
    """Bytes of values in the events table, read from the file (whatever its columns)."""
    db = sqlite3.connect(path)
    columns = {row[1] for row in db.execute("PRAGMA table_info(events)")}
    parts = [f"coalesce(sum(length({c})), 0)" for c in ("old", "new", "ops") if c in columns]
    total = int(db.execute(f"SELECT {' + '.join(parts)} FROM events").fetchone()[0])
    db.close()
    return total


def test_a_growing_document_logs_bytes_linearly_not_quadratically() -> None:
    tmp = Path(tempfile.mkdtemp())
    sizes = {}
    for n in (150, 300):
        engine, storage = fan_in(n, tmp / f"shard-{n}.db")
        storage.close()
        sizes[n] = stored_bytes(tmp / f"shard-{n}.db")
        document = len(engine.store.get("doc", "merged").data)  # type: ignore[union-attr]
        full = sum(len(e.old or b"") + len(e.new or b"") for e in engine.events)
        assert full > 50 * document  # both values of every event: the sum of all the versions
        assert sizes[n] < 3 * document  # kept once: one version and the ops of each update
    # twice the updates: about twice the bytes (both values in full would be 4x)
    assert sizes[300] < 2.5 * sizes[150]


def test_the_memory_log_counts_each_version_once() -> None:
    engine = ShardEngine()
    value = pickle.dumps("v" * 50_000)
    for i in range(20):
        run(engine, C.command(C.SET, "g", "k", value[:-1] + bytes([i])))
    versions = sum(len(e.new or b"") for e in engine.events)
    assert engine._event_bytes < versions + 100 * len(engine.events) + 1  # not old + new per event
    assert engine._event_bytes >= versions


def test_a_reloaded_log_reads_back_every_value_whole(tmp_path: Path) -> None:
    engine, storage = fan_in(60, tmp_path / "shard.db", ack_every=25)
    live = [e for e in engine.events if e.seq > engine.acked_seq]
    storage.close()
    again = SqliteStorage(tmp_path / "shard.db")
    loaded = again.load()
    assert [e.seq for e in loaded.events] == [e.seq for e in live]
    for got, want in zip(loaded.events, live, strict=True):
        assert (got.kind, got.group_id, got.key, got.base) == (want.kind, want.group_id, want.key, want.base)
        assert pickle.loads(got.new) == pickle.loads(want.new)  # type: ignore[arg-type]
        assert pickle.loads(got.old) == pickle.loads(want.old)  # type: ignore[arg-type]
    # the first kept event's old value was written into its row when its base was acknowledged
    first = loaded.events[0]
    assert first.base <= loaded.acked_seq
    again.close()


def test_events_since_is_compact_and_self_contained() -> None:
    engine = ShardEngine()
    for i in range(30):
        run(engine, merge(i))
    compact = engine.events_since(10, 10)
    assert not by_reference(compact[0])  # its base is not in the answer: inline
    assert all(by_reference(e) for e in compact[1:])  # the rest refer to the one before
    assert all(e.new is None and e.ops is not None for e in compact)  # updates: their ops
    full = Resolver(limit=None).resolve_all(compact)
    assert full == list(engine.events)[10:20]
    assert engine.events_since(10, 10, full=True) == list(engine.events)[10:20]


def test_a_stream_refers_to_what_it_sent_and_a_reader_without_it_says_so() -> None:
    engine = ShardEngine()
    for i in range(30):
        run(engine, merge(i))
    events = list(engine.events)
    shipper = Shipper()
    first, second = shipper.ship(events[:15]), shipper.ship(events[15:])
    assert by_reference(second[0])  # refers to the last event of the previous frame
    reader = Resolver()
    assert reader.resolve_all(first) + reader.resolve_all(second) == events
    with pytest.raises(Unresolved):  # a reader that missed the first frame cannot read the second
        Resolver().resolve_all(second)
    shipper.reset()  # after a lost frame the sender refers to nothing it sent before
    assert not by_reference(shipper.ship(events[15:])[0])


def test_small_values_stay_inline() -> None:
    engine = ShardEngine()
    for _ in range(5):
        run(engine, C.command(C.UPDATE, "g", "k", [{"type": "increment", "path": "n"}]))
    compact = ship_batch(list(engine.events))
    assert all(e.old is not None or e.kind == "state:created" for e in compact)
    assert all(e.new is not None and e.ops is None for e in compact)


ACTIONS = st.lists(
    st.one_of(
        st.tuples(st.just("set"), st.sampled_from("ab"), st.integers(0, 3 * VALUE_REF_MIN)),
        st.tuples(st.just("merge"), st.sampled_from("ab"), st.integers(0, 40)),
        st.tuples(st.just("delete"), st.sampled_from("ab"), st.just(0)),
        st.tuples(st.just("ack"), st.just(""), st.integers(0, 3)),
        st.tuples(st.just("reload"), st.just(""), st.just(0)),
        st.tuples(st.just("ship"), st.just(""), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ACTIONS)
def test_what_is_stored_and_sent_reads_back_as_the_full_events(actions: list[tuple[str, str, int]]) -> None:
    """Random writes (large and small values, updates, deletes), acknowledgements, reloads: the
    reloaded log, every events_since answer and a stream all read back as the live full events."""
    path = Path(tempfile.mkdtemp()) / "shard.db"
    storage = SqliteStorage(path)
    engine = ShardEngine()
    engine.load(storage.load())
    shipper, reader, sent = Shipper(), Resolver(), 0
    for i, (kind, key, arg) in enumerate(actions):
        if kind == "set":
            run(engine, C.command(C.SET, "g", key, pickle.dumps("s" * arg + str(i))))
        elif kind == "merge":
            ops = [{"type": "merge", "value": {f"f{i}": "m" * (arg * 60)}}]
            engine.execute_batch([C.command(C.UPDATE, "g", key, ops)])  # may fail: the value is a str
        elif kind == "delete":
            run(engine, C.command(C.DELETE, "g", key))
        elif kind == "ack":
            engine.ack(engine.seq - arg)
        elif kind == "ship":
            fresh = [e for e in engine.events if e.seq > sent]
            assert reader.resolve_all(shipper.ship(fresh)) == fresh
            sent = engine.seq
        storage.commit(engine.take_changes())
        if kind == "reload":
            storage.close()
            storage = SqliteStorage(path)
            reloaded = ShardEngine()
            reloaded.load(storage.load())
            assert [_values(e) for e in reloaded.events] == [
                _values(e) for e in engine.events if e.seq > engine.acked_seq
            ]
        after = engine.acked_seq
        assert Resolver(limit=None).resolve_all(engine.events_since(after, 7)) == engine.events_since(
            after, 7, full=True
        )
    storage.close()


def _values(event: Event) -> tuple[Any, ...]:
    return (event.seq, event.kind, event.key, event.old, event.new)
