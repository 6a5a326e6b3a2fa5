"""Shard storage: MemoryStorage and SqliteStorage, driven by the engine's change sets (no Ray).

The stateful test runs the same commands on three engines that share a fake clock: one on
MemoryStorage, one on SqliteStorage (committing after every batch, as the shard actor does), and one
loaded afresh from a re-opened copy of that SQLite file now and then (a restart). All three must show
the same state at every step, and a write repeated with a remembered ``op_id`` must return its first
result. The direct tests below pin the edge cases of :class:`Changes` and of opening and committing.
"""

from __future__ import annotations

import os
import pickle
import shutil
import sqlite3
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import cloudpickle
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shardstate._errors import StateError
from shardstate.shards import commands as C
from shardstate.shards.commands import command
from shardstate.shards.engine import (
    AUTO_OP_PREFIX,
    AUTO_RESULT_LIMIT,
    ShardEngine,
    call_fingerprint,
    op_scope,
)
from shardstate.shards.records import Changes, Entry, Loaded, OpRecord
from shardstate.shards.storage import MemoryStorage, SqliteStorage, Storage, StorageError, open_storage

T0 = 1_000.0
INCR = [{"type": "increment", "path": "n"}]


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def enc(value: Any) -> bytes:
    return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def ok(result: tuple[bool, Any]) -> Any:
    assert result[0] is True, result
    return result[1]


def run(engine: ShardEngine, *cmds: Any) -> list[Any]:
    """Execute ``cmds`` as one batch; every command must succeed; return the payloads."""
    return [ok(r) for r in engine.execute_batch(list(cmds))]


def layout(rows: Iterable[tuple[Any, ...]]) -> dict[str, list[tuple[str, Entry]]]:
    """Per group, the ``(key, entry)`` pairs in order (groups sorted), from loaded entry rows."""
    out: dict[str, list[tuple[str, Entry]]] = {}
    for group, key, *entry in rows:
        out.setdefault(group, []).append((key, Entry(*entry)))
    return dict(sorted(out.items()))


def engine_layout(engine: ShardEngine) -> dict[str, list[tuple[str, Entry]]]:
    return {g: list(engine.store.groups[g].items()) for g in sorted(engine.store.groups)}


def materialize(loaded: Loaded) -> Loaded:
    """``loaded`` with its lazily read parts read (a cursor does not outlive its connection)."""
    return Loaded(
        list(loaded.entries), list(loaded.op_ids), list(loaded.events), loaded.seq, loaded.acked_seq
    )


def reopen(path: Path) -> Loaded:
    """What a restarted shard would load from ``path`` (through a new connection), as lists."""
    storage = SqliteStorage(path, must_exist=True)
    try:
        return materialize(storage.load())
    finally:
        storage.close()


def stored_result(path: Path, op_id: str) -> Any:
    """The unpickled stored result of ``op_id`` (through a new connection), or None."""
    storage = SqliteStorage(path, must_exist=True)
    try:
        blob = storage.fetch_op(op_id)
        return None if blob is None else pickle.loads(blob)
    finally:
        storage.close()


def keys_in_order(loaded: Loaded, group: str) -> list[str]:
    return [k for k, _ in layout(loaded.entries).get(group, [])]


# --------------------------------------------------------------------------------------------
# stateful: memory vs sqlite vs sqlite reloaded
# --------------------------------------------------------------------------------------------

GROUPS = ["g1", "g2"]
KEYS = ["a", "b", "c"]
OP_RETENTION = 60.0
AUTO_OP_RETENTION = 20.0
BIG = enc("x" * (AUTO_RESULT_LIMIT + 1))  # an automatic retry of a write of this forgets its result

GROUP = st.sampled_from(GROUPS)
KEY = st.sampled_from(KEYS)
OP_ID = st.sampled_from([None, None, "u1", "u2", "~a1", "~a2"])
TTL = st.sampled_from([None, 3.0, 3.0, 10, 25.5])
EXPECTED = st.sampled_from([None, None, None, None, 0, 1, 2])
VALUES = {"0": enc(0), "1": enc(1), "s": enc("s"), "dict": enc({"n": 1}), "big": BIG}


def _value(name: str) -> bytes:
    return VALUES[name]


VALUE = st.sampled_from(["0", "1", "s", "dict", "dict", "big"]).map(_value)
OPS = st.sampled_from([INCR, INCR, [{"type": "set", "path": "s", "value": "v"}], [{"type": "frob"}]])


def _opts(op_id: str | None = None, ttl: float | None = None, expected: int | None = None) -> Any:
    opts = {"op_id": op_id, "ttl": ttl, "expected_version": expected}
    return {k: v for k, v in opts.items() if v is not None} or None


def _set(g: str, k: str, v: bytes, o: str | None, t: float | None, e: int | None) -> C.Command:
    return command(C.SET, g, k, v, _opts(o, t, e))


def _update(g: str, k: str, ops: Any, o: str | None, t: float | None, e: int | None) -> C.Command:
    return command(C.UPDATE, g, k, ops, _opts(o, t, e))


def _delete(g: str, k: str, o: str | None, e: int | None) -> C.Command:
    return command(C.DELETE, g, k, None, _opts(o, None, e))


def _clear(g: str, o: str | None) -> C.Command:
    return command(C.CLEAR, g, None, None, _opts(o))


WRITE = st.one_of(
    st.builds(_set, GROUP, KEY, VALUE, OP_ID, TTL, EXPECTED),
    st.builds(_update, GROUP, KEY, OPS, OP_ID, TTL, EXPECTED),
    st.builds(_delete, GROUP, KEY, OP_ID, EXPECTED),
    st.builds(_clear, GROUP, OP_ID),
)
READ = st.one_of(
    st.builds(lambda g, k: command(C.GET, g, k), GROUP, KEY),
    st.builds(lambda g, k: command(C.ENTRY, g, k), GROUP, KEY),
    st.builds(lambda g: command(C.LIST, g), GROUP),
    st.builds(lambda g: command(C.ITEMS, g), GROUP),
    st.just(command(C.GROUPS)),
)
COMMAND = st.one_of(WRITE, WRITE, WRITE, READ)
#: everything visible: the groups, each group's items in order, and every key's entry
PROBE = [command(C.GROUPS)] + [
    cmd for g in GROUPS for cmd in [command(C.ITEMS, g)] + [command(C.ENTRY, g, k) for k in KEYS]
]


def norm(result: tuple[bool, Any]) -> Any:
    """A result in a comparable form (errors by type and arguments)."""
    good, payload = result
    return ("ok", payload) if good else ("error", type(payload).__name__, payload.args)


def result_size(payload: Any) -> int:
    """Bytes of value a write's result carries (old + new), as the AUTO_RESULT_LIMIT counts them."""
    parts = payload if isinstance(payload, tuple) else (payload,)
    return sum(len(p) for p in parts if isinstance(p, bytes))


def created(table: dict[str, tuple[float, Any, Any]]) -> dict[str, float]:
    """scoped op_id -> creation time, from an engine's op table (loaded results are fetched lazily)."""
    return {scoped: row[0] for scoped, row in table.items()}


def same_call(a: C.Command, b: C.Command) -> bool:
    """Whether two write commands are the same call (what an op_id's fingerprint compares)."""
    return call_fingerprint(a[0], a[3], a[4] or {}) == call_fingerprint(b[0], b[3], b[4] or {})


class Remembered(NamedTuple):
    created_at: float
    cmd: C.Command
    payload: Any
    forgotten: bool  # an automatic op whose result was too large to keep


class StorageMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="shardstate-storage-")
        self.path = Path(self.dir) / "shard-0.db"
        self.clock = FakeClock()
        self.memory_storage = MemoryStorage()
        self.memory = self.fresh(self.memory_storage)
        self.sqlite_storage = SqliteStorage(self.path, durability="os")
        self.sqlite = self.fresh(self.sqlite_storage)
        self.replica_storage = SqliteStorage(self.path, durability="os")
        self.reloaded = self.fresh(self.replica_storage)
        #: scoped op_id -> what its first successful write returned (until the engines forget it)
        self.remembered: dict[str, Remembered] = {}

    def teardown(self) -> None:
        self.sqlite_storage.close()
        self.replica_storage.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------------------
    def fresh(self, storage: Storage) -> ShardEngine:
        engine = ShardEngine(
            clock=self.clock,
            op_retention=OP_RETENTION,
            auto_op_retention=AUTO_OP_RETENTION,
            fetch_op=storage.fetch_op,
        )
        engine.load(storage.load())
        return engine

    @property
    def engines(self) -> list[ShardEngine]:
        return [self.memory, self.sqlite, self.reloaded]

    def commit(self) -> None:
        self.memory_storage.commit(self.memory.take_changes())
        self.sqlite_storage.commit(self.sqlite.take_changes())
        self.reloaded.take_changes()  # a read-only replica: it never writes the file

    def execute(self, batch: list[Any], *, expect_no_changes: bool = False) -> list[tuple[bool, Any]]:
        """Run ``batch`` on every engine, assert they agree, commit, check op_id repeats."""
        now = self.clock.now
        results = [engine.execute_batch(batch) for engine in self.engines]
        if expect_no_changes:
            for engine in self.engines:
                assert not engine.take_changes()
        self.commit()
        first = [norm(r) for r in results[0]]
        assert [norm(r) for r in results[1]] == first, "sqlite engine differs from memory engine"
        assert [norm(r) for r in results[2]] == first, "reloaded engine differs from memory engine"
        for cmd, result in zip(batch, results[0], strict=True):
            self.check_op_id(cmd, result, now)
        return results[0]

    def check_op_id(self, cmd: C.Command, result: tuple[bool, Any], now: float) -> None:
        kind, group, key, _arg, opts = cmd
        op_id = (opts or {}).get("op_id")
        if kind not in C.WRITES or op_id is None:
            return
        scoped = op_scope(group, key, op_id)
        seen = self.remembered.get(scoped)
        if seen is not None and not same_call(cmd, seen.cmd):
            if op_id.startswith(AUTO_OP_PREFIX) and kind == seen.cmd[0]:
                ok(result)  # clients never reuse an automatic op_id: only its kind is checked
            else:  # an op_id reused for another call on the same key: refused, nothing applied
                assert result[0] is False, result
                assert type(result[1]).__name__ == "InvalidInput", result
                assert "reused for a different call" in str(result[1])
            return
        if seen is None:
            if result[0]:
                # only set/update forget large auto results (a set's own argument is not counted:
                # a repeat has it); delete keeps them
                kept = result[1][:1] if kind == C.SET else result[1]
                forgotten = (
                    op_id.startswith(AUTO_OP_PREFIX)
                    and isinstance(result[1], tuple)
                    and result_size(kept) > AUTO_RESULT_LIMIT
                )
                self.remembered[scoped] = Remembered(now, cmd, result[1], forgotten)
            return
        payload = ok(result)  # a repeat never fails: it is answered from memory
        if seen.forgotten:
            assert isinstance(payload, tuple)
            assert payload[0] is None
        else:
            assert payload == seen.payload

    # -- rules --------------------------------------------------------------------------------
    @rule(cmd=COMMAND)
    def one(self, cmd: Any) -> None:
        self.execute([cmd])

    @rule(cmds=st.lists(COMMAND, min_size=2, max_size=5), seconds=st.sampled_from([0.0, 0.0, 1.0, 4.0]))
    def batch(self, cmds: list[Any], seconds: float) -> None:
        self.clock.now += seconds
        self.execute(cmds)

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.5, 7.0, 15.0, 30.0]), then_sweep=st.booleans())
    def advance(self, seconds: float, then_sweep: bool) -> None:
        """Time passes; maybe the shard's sweeper runs (otherwise the next batch expires entries)."""
        self.clock.now += seconds
        if then_sweep:
            self.sweep()

    def sweep(self) -> None:
        now = self.clock.now
        counts = [engine.sweep() for engine in self.engines]
        self.commit()
        assert counts[1] == counts[0]
        assert counts[2] == counts[0]
        for scoped, seen in list(self.remembered.items()):
            auto = scoped.rsplit("\x00", 1)[-1].startswith(AUTO_OP_PREFIX)
            retention = AUTO_OP_RETENTION if auto else OP_RETENTION
            if seen.created_at < now - retention:
                del self.remembered[scoped]

    @rule(replace_sqlite=st.booleans(), durability=st.sampled_from(["os", "fsync"]))
    def restart(self, replace_sqlite: bool, durability: str) -> None:
        """Reload the replica from a new connection to the file; maybe restart the sqlite engine too.

        The replica keeps its connection for the op results it fetches, but never writes.
        """
        if replace_sqlite:
            self.sqlite_storage.close()
            self.sqlite_storage = SqliteStorage(self.path, durability=durability, must_exist=True)
            self.sqlite = self.fresh(self.sqlite_storage)
        self.replica_storage.close()
        self.replica_storage = SqliteStorage(self.path, durability=durability, must_exist=True)
        self.reloaded = self.fresh(self.replica_storage)

    @precondition(lambda self: bool(self.remembered))
    @rule(data=st.data())
    def repeat(self, data: st.DataObject) -> None:
        """Send a remembered write again: its first result, no effect, nothing to commit."""
        op_id = data.draw(st.sampled_from(sorted(self.remembered)))
        self.execute([])  # let expiry happen first, so "no effect" is all that is left to check
        before = [engine_layout(engine) for engine in self.engines]
        self.execute([self.remembered[op_id].cmd], expect_no_changes=True)
        assert [engine_layout(engine) for engine in self.engines] == before

    # -- invariants ---------------------------------------------------------------------------
    @invariant()
    def all_agree(self) -> None:
        results = [ok(r) for r in self.execute(PROBE)]
        groups, probes = results[0], results[1:]
        per_group = len(KEYS) + 1
        for i, group in enumerate(GROUPS):
            items = probes[i * per_group]
            entries = probes[i * per_group + 1 : (i + 1) * per_group]
            by_key = {k: e for k, e in zip(KEYS, entries, strict=True) if e is not None}
            assert len(items) == len(by_key)
            assert dict(items) == {k: e[0] for k, e in by_key.items()}
            assert (group in groups) == bool(items)
        # underneath: the same entries in the same order, the same remembered op_ids
        first = self.engines[0]
        for engine in self.engines[1:]:
            assert engine_layout(engine) == engine_layout(first)
            assert created(engine.ops) == created(first.ops)
            assert created(engine.auto_ops) == created(first.auto_ops)
        assert set(first.ops) | set(first.auto_ops) == set(self.remembered)
        # the change events (the outbox) survive restarts too: nothing acknowledged them here
        for engine in self.engines[1:]:
            assert engine.seq == first.seq
            assert list(engine.events) == list(first.events)
        # and the file holds what the engines hold
        loaded = reopen(self.path)
        assert layout(loaded.entries) == engine_layout(first)
        assert dict(loaded.op_ids) == created(first.ops) | created(first.auto_ops)


TestStorageMachine = StorageMachine.TestCase
TestStorageMachine.settings = settings(max_examples=30, stateful_step_count=30, deadline=None)


# --------------------------------------------------------------------------------------------
# Changes: the change set of a batch
# --------------------------------------------------------------------------------------------


def _e(data: bytes, version: int = 1) -> Entry:
    return Entry(data, version, T0, None)


def test_changes_record_the_final_state_and_order() -> None:
    changes = Changes()
    assert not changes
    changes.put("g", "a", _e(b"1"), created=False)  # an existing key: keeps its place
    changes.put("g", "b", _e(b"2"), created=True)  # a new key: goes to the end
    changes.put("g", "a", _e(b"3", 2), created=False)
    assert changes.entries == {("g", "a"): (_e(b"3", 2), False), ("g", "b"): (_e(b"2"), False)}
    assert list(changes.entries) == [("g", "a"), ("g", "b")]
    changes.delete("g", "a")
    assert list(changes.entries.items()) == [(("g", "b"), (_e(b"2"), False)), (("g", "a"), (None, False))]
    changes.put("g", "a", _e(b"4"), created=True)  # deleted, then created again: recreate
    assert changes.entries[("g", "a")] == (_e(b"4"), True)
    changes.put("g", "a", _e(b"5", 2), created=False)  # a later write keeps the recreate mark
    assert changes.entries[("g", "a")] == (_e(b"5", 2), True)
    assert list(changes.entries) == [("g", "b"), ("g", "a")]
    assert changes


def test_changes_clear_drops_only_that_group() -> None:
    changes = Changes()
    changes.put("g", "a", _e(b"1"), created=True)
    changes.put("h", "x", _e(b"2"), created=True)
    changes.delete("g", "b")
    changes.clear("g")
    assert changes.entries == {("h", "x"): (_e(b"2"), False)}
    assert changes.cleared == {"g"}
    changes.put("g", "c", _e(b"3"), created=True)  # after the clear: a plain insert
    assert changes.entries[("g", "c")] == (_e(b"3"), False)
    assert list(changes.entries) == [("h", "x"), ("g", "c")]


@pytest.mark.parametrize("field", ["entries", "cleared", "op_records", "pruned_ops"])
def test_changes_is_true_when_any_part_is_set(field: str) -> None:
    changes = Changes()
    assert not changes
    if field == "entries":
        changes.delete("g", "k")
    elif field == "cleared":
        changes.clear("g")
    elif field == "op_records":
        changes.op_records.append(OpRecord("o", T0, pickle.dumps(None)))
    else:
        changes.pruned_ops.append("o")
    assert changes


# --------------------------------------------------------------------------------------------
# SqliteStorage: commit and load
# --------------------------------------------------------------------------------------------


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "shard-0.db"


@pytest.fixture
def storage(db_path: Path) -> Any:
    storage = SqliteStorage(db_path)
    yield storage
    storage.close()


def _engine(clock: FakeClock | None = None) -> ShardEngine:
    return ShardEngine(clock=clock or FakeClock())


def _commit(engine: ShardEngine, storage: SqliteStorage) -> Changes:
    changes = engine.take_changes()
    storage.commit(changes)
    return changes


def _setup(engine: ShardEngine, storage: SqliteStorage) -> None:
    run(
        engine,
        command(C.SET, "g", "a", enc("a")),
        command(C.SET, "h", "x", enc("x")),
        command(C.SET, "g", "b", enc("b")),
        command(C.SET, "g", "c", enc("c")),
    )
    _commit(engine, storage)
    assert keys_in_order(reopen(storage.path), "g") == ["a", "b", "c"]


def test_a_key_deleted_and_created_again_in_one_batch_moves_to_the_end(storage: SqliteStorage) -> None:
    engine = _engine()
    _setup(engine, storage)
    run(
        engine,
        command(C.DELETE, "g", "a"),
        command(C.SET, "g", "a", enc("a2")),
        command(C.SET, "g", "b", enc(2)),
    )
    changes = _commit(engine, storage)
    # versions are the shard's seqs: _setup wrote seqs 1-4, the delete took 5
    assert changes.entries[("g", "a")] == (Entry(enc("a2"), 6, T0, None), True)
    loaded = reopen(storage.path)
    assert keys_in_order(loaded, "g") == ["b", "c", "a"]
    assert layout(loaded.entries) == engine_layout(engine)
    assert layout(loaded.entries)["g"][2] == ("a", Entry(enc("a2"), 6, T0, None))
    assert layout(loaded.entries)["g"][0] == ("b", Entry(enc(2), 7, T0, None))


def test_clear_then_put_in_one_batch(storage: SqliteStorage) -> None:
    engine = _engine()
    _setup(engine, storage)
    run(
        engine,
        command(C.SET, "g", "d", enc("d")),
        command(C.CLEAR, "g"),
        command(C.SET, "g", "c", enc("c2")),
        command(C.SET, "g", "a", enc("a2")),
    )
    changes = _commit(engine, storage)
    assert changes.cleared == {"g"}
    loaded = reopen(storage.path)
    assert keys_in_order(loaded, "g") == ["c", "a"]
    assert keys_in_order(loaded, "h") == ["x"]
    assert layout(loaded.entries) == engine_layout(engine)
    # re-created keys get new versions, never their old ones (seqs: the clear took 6-9)
    assert [e.version for _, e in layout(loaded.entries)["g"]] == [10, 11]


def test_put_then_clear_in_one_batch_leaves_the_group_empty(storage: SqliteStorage) -> None:
    engine = _engine()
    _setup(engine, storage)
    run(engine, command(C.SET, "g", "d", enc("d")), command(C.SET, "g", "a", enc(1)), command(C.CLEAR, "g"))
    _commit(engine, storage)
    loaded = reopen(storage.path)
    assert keys_in_order(loaded, "g") == []
    assert layout(loaded.entries) == engine_layout(engine)


def test_create_delete_create_in_one_batch(storage: SqliteStorage) -> None:
    engine = _engine()
    _setup(engine, storage)
    run(
        engine,
        command(C.SET, "g", "n", enc(1)),
        command(C.SET, "g", "m", enc(2)),
        command(C.DELETE, "g", "n"),
        command(C.SET, "g", "n", enc(3)),
        command(C.SET, "g", "gone", enc(4)),
        command(C.DELETE, "g", "gone"),
    )
    _commit(engine, storage)
    loaded = reopen(storage.path)
    assert keys_in_order(loaded, "g") == ["a", "b", "c", "m", "n"]
    assert layout(loaded.entries) == engine_layout(engine)
    assert layout(loaded.entries)["g"][-1] == ("n", Entry(enc(3), 8, T0, None))


def test_insertion_order_survives_many_batches_and_a_restart(storage: SqliteStorage) -> None:
    clock = FakeClock()
    engine = _engine(clock)
    script = [
        [command(C.SET, "g", k, enc(k)) for k in "edcba"],
        [command(C.SET, "h", k, enc(k)) for k in "xyz"],
        [command(C.DELETE, "g", "c"), command(C.SET, "g", "e", enc(0)), command(C.SET, "g", "c", enc(1))],
        [command(C.UPDATE, "g", "f", INCR), command(C.DELETE, "h", "x")],
        [command(C.SET, "h", "x", enc(2)), command(C.DELETE, "g", "e")],
        [command(C.SET, "g", "e", enc(3))],
    ]
    for batch in script:
        clock.now += 1
        run(engine, *batch)
        _commit(engine, storage)
    expected = {"g": ["d", "b", "a", "c", "f", "e"], "h": ["y", "z", "x"]}
    assert {g: [k for k, _ in items] for g, items in engine_layout(engine).items()} == expected
    loaded = reopen(storage.path)
    assert layout(loaded.entries) == engine_layout(engine)
    restarted = _engine(clock)
    restarted.load(loaded)
    assert run(restarted, command(C.ITEMS, "g"), command(C.ITEMS, "h")) == run(
        engine, command(C.ITEMS, "g"), command(C.ITEMS, "h")
    )
    assert engine_layout(restarted) == engine_layout(engine)


def test_a_rewritten_key_keeps_its_row_and_takes_the_new_metadata(storage: SqliteStorage) -> None:
    clock = FakeClock()
    engine = _engine(clock)
    steps: list[tuple[Any, ...]] = [
        (command(C.SET, "g", "k", enc(1), {"ttl": 10}), (enc(1), 2, T0, T0 + 10)),
        (command(C.SET, "g", "k", enc(2)), (enc(2), 3, T0 + 1, None)),  # no ttl: the TTL is gone
        (command(C.UPDATE, "g", "k", [{"type": "set", "path": "", "value": 3}], {"ttl": 5}), None),
        (command(C.SET, "g", "k", enc(4), {"ttl": 50}), (enc(4), 5, T0 + 3, T0 + 53)),
        (command(C.UPDATE, "g", "k", [{"type": "set", "path": "", "value": 5}]), None),  # keeps the TTL
    ]
    run(engine, command(C.SET, "g", "first", enc(0)))
    for i, (cmd, expected) in enumerate(steps):
        clock.now = T0 + i
        run(engine, cmd)
        _commit(engine, storage)
        stored = layout(reopen(storage.path).entries)["g"]
        assert [k for k, _ in stored] == ["first", "k"]
        assert stored[1][1] == engine.store.get("g", "k")
        if expected is not None:
            assert tuple(stored[1][1]) == expected
    assert tuple(engine.store.get("g", "k") or ())[1:] == (6, T0 + 4, T0 + 53)
    assert tuple(layout(reopen(storage.path).entries)["g"][1][1])[1:] == (6, T0 + 4, T0 + 53)


def test_entries_and_op_records_round_trip_exactly(storage: SqliteStorage) -> None:
    clock = FakeClock(1_700_000_000.123456)
    engine = ShardEngine(clock=clock, op_retention=10.0)
    run(
        engine,
        command(C.SET, "g", "ttl", enc({"v": 1}), {"ttl": 0.1, "op_id": "o1"}),
        command(C.SET, "g", "none", enc(None)),
        command(C.UPDATE, "g", "none2", INCR, {"op_id": "~auto"}),
        command(C.SET, "g", "ttl", enc({"v": 2}), {"ttl": 1e-3}),
        command(C.SET, "g", "blob", b"\x00\xff" * 1000),
    )
    _commit(engine, storage)
    loaded = reopen(storage.path)
    assert layout(loaded.entries) == engine_layout(engine)
    ttl_entry = layout(loaded.entries)["g"][0][1]
    assert ttl_entry == Entry(enc({"v": 2}), 4, clock.now, clock.now + 1e-3)
    o1, auto = op_scope("g", "ttl", "o1"), op_scope("g", "none2", "~auto")
    assert sorted(loaded.op_ids) == sorted([(o1, clock.now), (auto, clock.now)])
    # a record holds the call's fingerprint and its result (a set's own value is not stored again)
    fingerprint, result = stored_result(storage.path, o1)
    assert fingerprint == call_fingerprint(C.SET, enc({"v": 1}), {"ttl": 0.1, "op_id": "o1"})
    assert result[0] is None
    assert pickle.loads(pickle.dumps(result)) == result
    kind, (old, new) = stored_result(storage.path, auto)
    assert (kind, old, pickle.loads(new)) == (C.UPDATE.encode(), None, {"n": 1})
    assert storage.fetch_op("o1") is None  # records are found by their scope
    assert storage.fetch_op("nope") is None
    # pruning removes the records from the file
    clock.now += 11
    engine.sweep()
    changes = _commit(engine, storage)
    assert changes.pruned_ops == [o1]
    assert reopen(storage.path).op_ids == [(auto, clock.now - 11)]
    assert storage.fetch_op(o1) is None


def test_a_restarted_engine_still_deduplicates_and_expires(storage: SqliteStorage) -> None:
    clock = FakeClock()
    engine = _engine(clock)
    first = run(
        engine,
        command(C.UPDATE, "g", "k", INCR, {"op_id": "job"}),
        command(C.SET, "g", "t", enc(1), {"ttl": 5}),
        command(C.SET, "g", "big", BIG, {"op_id": "~big"}),
        command(C.SET, "g", "big", enc("other")),
    )
    _commit(engine, storage)
    second = SqliteStorage(storage.path, must_exist=True)  # the restarted shard's own connection
    restarted = ShardEngine(clock=clock, fetch_op=second.fetch_op)
    restarted.load(second.load())
    clock.now += 1
    assert run(restarted, command(C.UPDATE, "g", "k", INCR, {"op_id": "job"}))[0] == first[0]
    assert first[2] == (None, BIG)
    # the set's own (large) value is not kept: the repeat has it; the first result comes back
    assert run(restarted, command(C.SET, "g", "big", BIG, {"op_id": "~big"}))[0] == (None, BIG)
    assert run(restarted, command(C.ENTRY, "g", "k"))[0] == (first[0][1], 1, T0, None)
    assert run(restarted, command(C.ENTRY, "g", "big"))[0] == (enc("other"), 4, T0, None)
    assert not restarted.take_changes()
    clock.now += 4
    assert restarted.sweep() == 1
    assert [k for k, _ in run(restarted, command(C.ITEMS, "g"))[0]] == ["k", "big"]
    second.close()


def test_an_op_id_pruned_and_reused_in_one_change_set_stays_remembered(storage: SqliteStorage) -> None:
    """take_changes() collects everything since the last call, a sweep and a batch alike."""
    clock = FakeClock()
    engine = ShardEngine(clock=clock, op_retention=10.0)
    run(engine, command(C.UPDATE, "g", "k", INCR, {"op_id": "job"}))
    _commit(engine, storage)
    clock.now += 11
    engine.sweep()  # forgets "job" ...
    run(engine, command(C.UPDATE, "g", "k", INCR, {"op_id": "job"}))  # ... which then applies again
    assert op_scope("g", "k", "job") in engine.ops
    _commit(engine, storage)  # one change set for both
    assert [op_id for op_id, _ in reopen(storage.path).op_ids] == [op_scope("g", "k", "job")]


def test_an_op_id_recorded_and_pruned_in_one_change_set_is_forgotten(storage: SqliteStorage) -> None:
    clock = FakeClock()
    engine = ShardEngine(clock=clock, op_retention=10.0)
    run(engine, command(C.UPDATE, "g", "k", INCR, {"op_id": "job"}))
    engine.sweep(now=T0 + 11)  # forgets "job" before its record was committed
    assert not engine.ops
    _commit(engine, storage)  # one change set for both
    assert reopen(storage.path).op_ids == []


# --------------------------------------------------------------------------------------------
# SqliteStorage: opening, durability, failed commits
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage", [os.urandom(4096), b"hello, not a database", b"SQLite format 3\x00" + b"\xff" * 200]
)
def test_a_file_of_garbage_is_unreadable(db_path: Path, garbage: bytes) -> None:
    db_path.write_bytes(garbage)
    for must_exist in (False, True):
        with pytest.raises(StorageError, match="unreadable") as info:
            SqliteStorage(db_path, must_exist=must_exist)
        assert str(db_path) in str(info.value)
        assert isinstance(info.value, StateError)
    assert db_path.read_bytes() == garbage  # left as it was, for a human to look at


def test_a_corrupted_page_is_refused(db_path: Path) -> None:
    storage = SqliteStorage(db_path)
    changes = Changes()
    for i in range(500):
        changes.put("g", f"k{i}", _e(os.urandom(300)), created=True)
    storage.commit(changes)
    storage.close()  # checkpoints the WAL into the file
    with db_path.open("r+b") as f:
        f.seek(4096 * 4)
        f.write(b"\xa5" * 4096 * 8)
    with pytest.raises(StorageError, match=str(db_path)):
        SqliteStorage(db_path).load()


def test_must_exist_on_a_missing_file(db_path: Path) -> None:
    with pytest.raises(StorageError, match="missing"):
        SqliteStorage(db_path, must_exist=True)
    assert not db_path.exists()
    with pytest.raises(StorageError, match="missing"):
        open_storage(db_path.parent, 7, "fsync", must_exist=True)
    assert not (db_path.parent / "shard-7.db").exists()
    SqliteStorage(db_path).close()  # created ...
    SqliteStorage(db_path, must_exist=True).close()  # ... then it may be required


def test_a_new_file_in_a_new_directory(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "shard-1.db"
    storage = SqliteStorage(path)
    assert path.exists()
    assert materialize(storage.load()) == Loaded([], [])
    storage.close()


@pytest.mark.parametrize(("durability", "synchronous"), [("fsync", 2), ("os", 1)])
def test_durability_sets_the_pragmas(db_path: Path, durability: str, synchronous: int) -> None:
    storage = SqliteStorage(db_path, durability=durability)
    try:
        assert storage.db.execute("PRAGMA synchronous").fetchone()[0] == synchronous
        assert storage.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        storage.close()


def test_default_durability_is_os(db_path: Path) -> None:
    storage = SqliteStorage(db_path)
    try:
        assert storage.db.execute("PRAGMA synchronous").fetchone()[0] == 1
    finally:
        storage.close()


@pytest.mark.parametrize("durability", ["memory", "FSYNC", "", None, "full"])
def test_sqlite_storage_refuses_other_durability(db_path: Path, durability: Any) -> None:
    with pytest.raises(StorageError, match="durability"):
        SqliteStorage(db_path, durability=durability)
    assert not db_path.exists()


def test_open_storage_picks_the_implementation(tmp_path: Path) -> None:
    assert isinstance(open_storage(tmp_path, 0, "memory"), MemoryStorage)
    assert isinstance(open_storage(None, 0, "os"), MemoryStorage)
    assert isinstance(open_storage(None, 0, "fsync", must_exist=True), MemoryStorage)
    assert list(tmp_path.iterdir()) == []
    for shard, durability, synchronous in [(0, "os", 1), (3, "fsync", 2)]:
        storage = open_storage(tmp_path, shard, durability)
        assert isinstance(storage, SqliteStorage)
        assert storage.path == tmp_path / f"shard-{shard}.db"
        assert storage.db.execute("PRAGMA synchronous").fetchone()[0] == synchronous
        storage.close()
    with pytest.raises(StorageError, match="durability"):
        open_storage(tmp_path, 0, "disk")


def test_memory_storage_keeps_nothing() -> None:
    storage = MemoryStorage()
    engine = _engine()
    run(engine, command(C.SET, "g", "k", enc(1), {"op_id": "o"}))
    changes = engine.take_changes()
    assert changes
    storage.commit(changes)
    assert storage.load() == Loaded([], [])
    assert storage.fetch_op("o") is None
    storage.close()


def test_op_ids_load_oldest_first_and_results_are_fetched_by_id(storage: SqliteStorage) -> None:
    changes = Changes()
    for op_id, created_at in [("m", 5.0), ("a", 9.0), ("z", 1.0), ("~q", 3.0)]:
        changes.op_records.append(OpRecord(op_id, created_at, pickle.dumps(op_id)))
    storage.commit(changes)
    later = Changes()
    later.op_records.append(OpRecord("b", 2.0, pickle.dumps("b")))
    later.op_records.append(OpRecord("m", 7.0, pickle.dumps("m2")))  # the same op_id again: replaced
    storage.commit(later)
    loaded = reopen(storage.path)
    assert loaded.op_ids == [("z", 1.0), ("b", 2.0), ("~q", 3.0), ("m", 7.0), ("a", 9.0)]
    results = [storage.fetch_op(op_id) for op_id, _ in loaded.op_ids]
    assert [pickle.loads(r) for r in results if r is not None] == ["z", "b", "~q", "m2", "a"]
    assert storage.fetch_op("missing") is None
    pruned = Changes()
    pruned.pruned_ops.extend(["z", "~q", "never-there"])
    storage.commit(pruned)
    assert reopen(storage.path).op_ids == [("b", 2.0), ("m", 7.0), ("a", 9.0)]
    assert storage.fetch_op("z") is None


class _FailingDb:
    """Wraps a connection; the ``fail_at``-th ``executemany`` raises (after the real earlier ones)."""

    def __init__(self, db: sqlite3.Connection, fail_at: int) -> None:
        self._db = db
        self._left = fail_at

    def execute(self, *args: Any) -> Any:
        return self._db.execute(*args)

    def executemany(self, *args: Any) -> Any:
        self._left -= 1
        if self._left == 0:
            raise sqlite3.OperationalError("disk I/O error (simulated)")
        return self._db.executemany(*args)

    @property
    def in_transaction(self) -> bool:
        return self._db.in_transaction


@pytest.mark.parametrize("fail_at", [1, 2, 3, 4])
def test_a_failed_commit_writes_nothing(storage: SqliteStorage, fail_at: int) -> None:
    clock = FakeClock()
    engine = ShardEngine(clock=clock, op_retention=10.0)
    _setup(engine, storage)
    run(engine, command(C.SET, "g", "a", enc(0), {"op_id": "old"}))
    _commit(engine, storage)
    before = reopen(storage.path)
    clock.now += 11
    engine.sweep()
    run(
        engine,
        command(C.DELETE, "g", "b"),  # executemany 1: deletes
        command(C.SET, "g", "a", enc("a2")),  # executemany 2: upserts
        command(C.SET, "g", "new", enc("n")),
        command(C.CLEAR, "h"),
        command(C.UPDATE, "g", "c", [{"type": "set", "path": "", "value": 1}], {"op_id": "op"}),  # 3: ops
    )  # 4: pruned ops ("old")
    changes = engine.take_changes()
    real = storage.db
    storage.db = _FailingDb(real, fail_at)  # type: ignore[assignment]
    with pytest.raises(sqlite3.OperationalError, match="simulated"):
        storage.commit(changes)
    storage.db = real
    after = reopen(storage.path)
    assert layout(after.entries) == layout(before.entries)
    assert after.op_ids == before.op_ids
    assert [op_id for op_id, _ in after.op_ids] == [op_scope("g", "a", "old")]
    # the transaction was rolled back, not left open: the same storage commits fine afterwards
    storage.commit(changes)
    final = reopen(storage.path)
    assert layout(final.entries) == engine_layout(engine)
    assert [op_id for op_id, _ in final.op_ids] == [op_scope("g", "c", "op")]


def test_a_commit_on_a_closed_connection_raises_and_writes_nothing(storage: SqliteStorage) -> None:
    engine = _engine()
    _setup(engine, storage)
    before = reopen(storage.path)
    run(engine, command(C.SET, "g", "z", enc(1)), command(C.DELETE, "g", "a"))
    storage.db.close()
    with pytest.raises((sqlite3.Error, StorageError)):
        storage.commit(engine.take_changes())
    assert reopen(storage.path) == before


def test_an_empty_change_set_commits_nothing(db_path: Path) -> None:
    storage = SqliteStorage(db_path)
    storage.db.close()
    storage.commit(Changes())  # would raise if it touched the closed connection


# -- a file belongs to one shard of one cluster (issue 9, item 15) ------------------------------
def test_claim_stamps_a_new_file_and_accepts_it_again(db_path: Path) -> None:
    storage = SqliteStorage(db_path)
    assert storage.claim("cid-a", 0, 0, stamped_before=False) == 1
    storage.close()
    again = SqliteStorage(db_path, must_exist=True)
    assert again.claim("cid-a", 0, 1, stamped_before=True) == 2  # each start counts one more
    again.close()


def test_claim_refuses_another_clusters_file(db_path: Path) -> None:
    storage = SqliteStorage(db_path)
    storage.claim("cid-a", 0, 0, stamped_before=False)
    storage.commit(_changes_setting("g", "k", b"a's data"))
    storage.close()
    other = SqliteStorage(db_path)
    with pytest.raises(StorageError) as err:
        other.claim("cid-b", 0, 0, stamped_before=False)
    assert str(db_path) in str(err.value)
    assert "cid-a" in str(err.value)
    assert "cid-b" in str(err.value)
    other.close()
    # nothing was changed by the refusal: the file still belongs to cluster a, with a's data
    owner = SqliteStorage(db_path)
    assert owner.claim("cid-a", 0, 1, stamped_before=True) == 2
    assert [row[:3] for row in owner.load().entries] == [("g", "k", b"a's data")]
    owner.close()


def test_claim_refuses_another_shards_file_an_unstamped_stranger_and_an_old_copy(tmp_path: Path) -> None:
    path = tmp_path / "shard-1.db"
    storage = SqliteStorage(path)
    storage.claim("cid", 1, 0, stamped_before=False)
    storage.close()
    saved = path.read_bytes()  # an old copy (start 1); WAL checkpointed on close
    storage = SqliteStorage(path)
    with pytest.raises(StorageError, match="shard 1's file"):
        storage.claim("cid", 2, 0, stamped_before=False)
    assert storage.claim("cid", 1, 1, stamped_before=True) == 2
    storage.close()
    old = tmp_path / "old" / "shard-1.db"
    old.parent.mkdir()
    old.write_bytes(saved)
    stale = SqliteStorage(old)
    with pytest.raises(StorageError, match="old copy"):
        stale.claim("cid", 1, 2, stamped_before=True)
    stale.close()
    stranger = SqliteStorage(tmp_path / "stranger.db")
    with pytest.raises(StorageError, match="carries no cluster id"):
        stranger.claim("cid", 1, 2, stamped_before=True)
    stranger.close()


def test_a_file_of_an_older_version_is_adopted(db_path: Path) -> None:
    storage = SqliteStorage(db_path)  # no ids in it: written before files were stamped
    storage.commit(_changes_setting("g", "k", b"v"))
    assert storage.claim("cid", 0, 0, stamped_before=False) == 1
    assert [row[:3] for row in storage.load().entries] == [("g", "k", b"v")]
    storage.close()


def test_memory_storage_starts_seqs_at_its_base() -> None:
    loaded = MemoryStorage(seq_base=3 << 40).load()
    assert (loaded.seq, loaded.acked_seq) == (3 << 40, 3 << 40)
    engine = ShardEngine()
    engine.load(loaded)
    run(engine, command(C.SET, "g", "k", enc(1)))
    assert engine.seq == (3 << 40) + 1
    memory = open_storage(None, 0, "memory", seq_base=7)
    assert memory.load().seq == 7


# -- a full disk (issue 9, item 13) ---------------------------------------------------------------
def test_a_full_disk_fails_the_commit_cleanly_and_recovers(db_path: Path) -> None:
    storage = SqliteStorage(db_path)
    storage.commit(_changes_setting("g", "kept", b"x" * 1000))
    storage.limit_pages(0)
    with pytest.raises(sqlite3.OperationalError, match="full"):
        storage.commit(_changes_setting("g", "big", b"y" * 100_000))
    with pytest.raises(sqlite3.OperationalError, match="full"):
        storage.probe()
    assert storage.count_entries() == 1  # reads still work on a full disk, nothing half-written
    assert [row[1] for row in storage.load().entries] == ["kept"]
    storage.limit_pages(None)
    storage.probe()
    storage.commit(_changes_setting("g", "big", b"y" * 100_000))
    assert [row[1] for row in storage.load().entries] == ["kept", "big"]
    storage.close()


def _changes_setting(group: str, key: str, data: bytes) -> Changes:
    changes = Changes()
    changes.put(group, key, Entry(data, 1, T0, None), created=True)
    return changes
