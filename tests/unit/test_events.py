"""The shard's event log (outbox): what emits, in which order, and how it survives a reload."""

from __future__ import annotations

import pickle
import tempfile
from pathlib import Path
from typing import Any

import pytest

from shardstate.shards import commands as C
from shardstate.shards.engine import CREATED, DELETED, RECENT_EVENTS, UPDATED, ShardEngine
from shardstate.shards.storage import SqliteStorage


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def enc(value: Any) -> bytes:
    return pickle.dumps(value)


def run(engine: ShardEngine, *cmds: C.Command) -> list[C.Result]:
    return engine.execute_batch(list(cmds))


def kinds(engine: ShardEngine, after: int = 0) -> list[tuple[int, str, str, str]]:
    return [(e.seq, e.kind, e.group_id, e.key) for e in engine.events_since(after, 10_000)]


def test_every_committed_change_emits_one_event_in_order() -> None:
    clock = Clock()
    engine = ShardEngine(clock=clock)
    run(
        engine,
        C.command(C.SET, "g", "a", enc(1)),
        C.command(C.UPDATE, "g", "a", [{"type": "set", "path": "", "value": 2}]),
        C.command(C.SET, "g", "b", enc(3), {"ttl": 5}),
        C.command(C.DELETE, "g", "a"),
        C.command(C.SET, "h", "x", enc(4)),
        C.command(C.SET, "h", "y", enc(5)),
        C.command(C.CLEAR, "h"),
    )
    clock.now += 10
    engine.sweep()
    assert kinds(engine) == [
        (1, CREATED, "g", "a"),
        (2, UPDATED, "g", "a"),
        (3, CREATED, "g", "b"),
        (4, DELETED, "g", "a"),
        (5, CREATED, "h", "x"),
        (6, CREATED, "h", "y"),
        (7, DELETED, "h", "x"),
        (8, DELETED, "h", "y"),
        (9, DELETED, "g", "b"),  # TTL expiry
    ]
    update = engine.events_since(1, 1)[0]
    assert (pickle.loads(update.old), pickle.loads(update.new)) == (1, 2)
    assert engine.events_since(9) == []
    assert [e.seq for e in engine.events_since(3, 2)] == [4, 5]


def test_reads_failures_and_missing_deletes_emit_nothing() -> None:
    engine = ShardEngine()
    run(engine, C.command(C.SET, "g", "a", enc({"n": 1})))
    engine.take_changes()
    results = run(
        engine,
        C.command(C.GET, "g", "a"),
        C.command(C.ENTRY, "g", "a"),
        C.command(C.LIST, "g"),
        C.command(C.ITEMS, "g"),
        C.command(C.GROUPS),
        C.command(
            C.UPDATE,
            "g",
            "a",
            [{"type": "increment", "path": "n"}, {"type": "append", "path": "n", "value": 1}],
        ),
        C.command(C.SET, "g", "a", enc(0), {"expected_version": 9}),
        C.command(C.DELETE, "g", "missing"),
        C.command(C.CLEAR, "empty"),
    )
    assert [ok for ok, _ in results] == [True] * 5 + [False, False, True, True]
    assert engine.seq == 1
    assert engine.take_changes().events == []


def test_repeated_op_id_emits_once() -> None:
    engine = ShardEngine()
    for _ in range(3):
        run(engine, C.command(C.UPDATE, "g", "a", [{"type": "increment", "path": "n"}], {"op_id": "x"}))
    assert engine.seq == 1


def test_ack_drops_events_from_storage_but_keeps_a_recent_tail() -> None:
    engine = ShardEngine()
    for i in range(5):
        run(engine, C.command(C.SET, "g", f"k{i}", enc(i)))
    engine.take_changes()
    assert engine.ack(3) == 3
    assert engine.take_changes().acked_seq == 3
    assert engine.ack(2) == 3  # never goes back
    assert engine.ack(99) == 5  # never past the last event
    assert [e.seq for e in engine.events] == [1, 2, 3, 4, 5]  # tail kept for watchers (small log)
    assert len(engine.events) <= RECENT_EVENTS


@pytest.mark.parametrize("ack", [0, 2, 4])
def test_events_are_committed_with_their_change_and_reload_unacked(ack: int) -> None:
    path = Path(tempfile.mkdtemp()) / "shard.db"
    storage = SqliteStorage(path)
    engine = ShardEngine()
    engine.load(storage.load())
    for i in range(4):
        run(engine, C.command(C.SET, "g", f"k{i}", enc(i)))
        storage.commit(engine.take_changes())
    engine.ack(ack)
    storage.commit(engine.take_changes())
    storage.close()

    again = SqliteStorage(path)
    reloaded = ShardEngine()
    reloaded.load(again.load())
    assert reloaded.seq == 4
    assert reloaded.acked_seq == ack
    assert [e.seq for e in reloaded.events] == list(range(ack + 1, 5))
    run(reloaded, C.command(C.DELETE, "g", "k0"))
    assert reloaded.seq == 5  # numbering continues after a restart


def test_memory_only_events_are_logged_for_watchers_but_not_stored_and_seq_survives_reload() -> None:
    path = Path(tempfile.mkdtemp()) / "shard.db"
    storage = SqliteStorage(path)
    engine = ShardEngine()
    run(engine, C.command(C.SET, "g", "a", enc(1)))
    storage.commit(engine.take_changes())
    assert engine.set_durable_events(False) == 1  # nobody listens: everything so far is acknowledged
    changes = engine.take_changes()
    assert changes.acked_seq == 1
    storage.commit(changes)
    run(engine, C.command(C.SET, "g", "b", enc(2)), C.command(C.DELETE, "g", "a"))
    changes = engine.take_changes()
    assert changes.events == []  # no outbox rows, no push
    assert changes.acked_seq == engine.acked_seq == engine.seq == 3
    assert kinds(engine) == [(1, CREATED, "g", "a"), (2, CREATED, "g", "b"), (3, DELETED, "g", "a")]
    storage.commit(changes)
    storage.close()

    again = SqliteStorage(path)
    reloaded = ShardEngine()
    reloaded.load(again.load())
    assert (reloaded.seq, reloaded.acked_seq, list(reloaded.events)) == (3, 3, [])
    assert reloaded.durable_events  # a restarted shard keeps events until told otherwise
    run(reloaded, C.command(C.SET, "g", "c", enc(3)))
    assert [e.seq for e in reloaded.take_changes().events] == [4]  # numbering continues, stored again


def test_turning_durable_events_back_on_stores_what_follows() -> None:
    engine = ShardEngine()
    engine.set_durable_events(False)
    run(engine, C.command(C.SET, "g", "a", enc(1)))
    engine.take_changes()
    assert engine.set_durable_events(True) == 1
    run(engine, C.command(C.SET, "g", "b", enc(2)))
    changes = engine.take_changes()
    assert [e.seq for e in changes.events] == [2]
    assert changes.acked_seq is None
    assert engine.acked_seq == 1
