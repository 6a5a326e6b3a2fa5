"""ShardEngine versions, compare-and-set, TTL and op_id idempotency (pure: a fake clock, no storage).

Every test drives the engine only through command tuples and moves a hand-held clock; what reaches
storage is checked through :meth:`ShardEngine.take_changes`. Storage itself is in test_storage.py.
"""

from __future__ import annotations

import math
import pickle
from typing import Any

import cloudpickle
import pytest

from shardstate._errors import ConflictError, InvalidInput, StateError, UpdateError
from shardstate.shards import commands as C
from shardstate.shards.commands import command
from shardstate.shards.engine import (
    AUTO_OP_PREFIX,
    AUTO_RESULT_LIMIT,
    RESULT_RAM_ITEM,
    ShardEngine,
    canonical_dumps,
    op_scope,
)
from shardstate.shards.records import Entry, Loaded, OpRecord

T0 = 1_000.0
INCR = [{"type": "increment", "path": "n"}]


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(**kwargs: Any) -> tuple[ShardEngine, FakeClock]:
    clock = FakeClock()
    return ShardEngine(clock=clock, **kwargs), clock


def enc(value: Any) -> bytes:
    return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def ok(result: tuple[bool, Any]) -> Any:
    assert result[0] is True, result
    return result[1]


def err(result: tuple[bool, Any], cls: type[StateError]) -> Any:
    assert result[0] is False, result
    assert type(result[1]) is cls, result
    return result[1]


def do(
    engine: ShardEngine, kind: str, group: Any = None, key: Any = None, arg: Any = None, **opts: Any
) -> Any:
    """Execute one command (its own batch) with ``opts`` (None when empty)."""
    return engine.execute(command(kind, group, key, arg, opts or None))


def entry_of(engine: ShardEngine, group: str, key: str) -> Any:
    return ok(do(engine, C.ENTRY, group, key))


def snapshot(engine: ShardEngine) -> dict[str, dict[str, Entry]]:
    return {g: dict(keys) for g, keys in engine.store.groups.items()}


def op_snapshot(engine: ShardEngine) -> tuple[dict[str, Any], dict[str, Any]]:
    return dict(engine.ops), dict(engine.auto_ops)


def op_names(table: dict[str, Any]) -> set[str]:
    """The op_ids (without their scope) of an engine's op table."""
    return {scoped.rsplit("\x00", 1)[-1] for scoped in table}


class FakeOpStore:
    """Stands in for ``Storage.fetch_op``: the stored results of op records, and who asked for which."""

    def __init__(self, records: list[OpRecord]) -> None:
        self.results = {r.op_id: r.result for r in records}
        self.asked: list[str] = []

    def fetch(self, op_id: str) -> bytes | None:
        self.asked.append(op_id)
        return self.results.get(op_id)


def reload(engine: ShardEngine, records: list[OpRecord], **kwargs: Any) -> ShardEngine:
    """A fresh engine started from ``engine``'s entries (in order) and the given op records.

    Like storage, ``Loaded`` names the op_ids (oldest first) and the engine fetches a result when
    a repeat asks for it.
    """
    entries = [(g, k, *e) for g, keys in engine.store.groups.items() for k, e in keys.items()]
    op_ids = [(r.op_id, r.created_at) for r in sorted(records, key=lambda r: r.created_at)]
    kwargs.setdefault("fetch_op", FakeOpStore(records).fetch)
    fresh = ShardEngine(clock=engine.clock, **kwargs)
    fresh.load(Loaded(entries, op_ids))
    return fresh


# --------------------------------------------------------------------------------------------
# versions and get_entry
# --------------------------------------------------------------------------------------------


def test_versions_are_the_shard_seq_and_only_grow() -> None:
    """A write's version is the seq of the event it emits (like etcd's revisions)."""
    engine, clock = make()
    d1, d2 = enc({"n": 1}), enc({"n": 2})
    ok(do(engine, C.SET, "g", "k", d1))
    assert entry_of(engine, "g", "k") == (d1, 1, T0, None)
    clock.advance(2.5)
    ok(do(engine, C.SET, "g", "k", d2))
    assert entry_of(engine, "g", "k") == (d2, 2, T0 + 2.5, None)
    clock.advance(1)
    _old, new = ok(do(engine, C.UPDATE, "g", "k", INCR))
    assert entry_of(engine, "g", "k") == (new, 3, T0 + 3.5, None)
    assert pickle.loads(new) == {"n": 3}
    # reads and failed writes leave version and updated_at alone
    clock.advance(1)
    ok(do(engine, C.GET, "g", "k"))
    ok(do(engine, C.LIST, "g"))
    err(do(engine, C.UPDATE, "g", "k", [{"type": "frob"}]), UpdateError)
    err(do(engine, C.UPDATE, "g", "k", [{"type": "append", "path": "n", "value": 1}]), UpdateError)
    assert entry_of(engine, "g", "k") == (new, 3, T0 + 3.5, None)
    # another key takes the next seq; each version is the seq of its write's event
    ok(do(engine, C.UPDATE, "g", "other", INCR))
    assert entry_of(engine, "g", "other")[1:] == (4, T0 + 4.5, None)
    assert entry_of(engine, "g", "k")[1] == 3
    assert [e.seq for e in engine.events] == [1, 2, 3, 4]


@pytest.mark.parametrize("remove", ["delete", "clear", "expire"])
def test_a_recreated_key_never_gets_an_old_version(remove: str) -> None:
    """Item 11 (CAS ABA): expected_version=v never matches another incarnation of the key."""
    engine, clock = make()
    ok(do(engine, C.SET, "g", "k", enc(1), ttl=50))
    ok(do(engine, C.SET, "g", "k", enc(2), ttl=50))
    ok(do(engine, C.UPDATE, "g", "k2", INCR))
    old_version = entry_of(engine, "g", "k")[1]
    assert old_version == 2
    if remove == "delete":
        ok(do(engine, C.DELETE, "g", "k"))
    elif remove == "clear":
        assert ok(do(engine, C.CLEAR, "g")) == 2
    else:
        clock.advance(50)
    assert entry_of(engine, "g", "k") is None
    clock.advance(1)
    seen: list[int] = []
    for _ in range(3):  # re-create it as often as it had versions: none comes back
        ok(do(engine, C.SET, "g", "k", enc(3)))
        seen.append(entry_of(engine, "g", "k")[1])
        err(do(engine, C.SET, "g", "k", enc(4), expected_version=old_version), ConflictError)
        err(do(engine, C.UPDATE, "g", "k", INCR, expected_version=1), ConflictError)
        ok(do(engine, C.DELETE, "g", "k"))
    assert seen == sorted(seen)
    assert min(seen) > old_version
    assert len(set(seen)) == 3
    ok(do(engine, C.UPDATE, "g", "k", INCR))
    assert entry_of(engine, "g", "k")[1] == engine.seq


def test_versions_keep_growing_after_a_reload() -> None:
    """A reloaded shard continues from the highest version it holds, even if it lost its seq."""
    engine, _clock = make()
    for i in range(5):
        ok(do(engine, C.SET, "g", "k", enc(i)))
    entries = [(g, k, *e) for g, keys in engine.store.groups.items() for k, e in keys.items()]
    fresh = ShardEngine(clock=engine.clock)
    fresh.load(Loaded(entries, [], seq=0))  # a file from before versions were seqs
    ok(do(fresh, C.SET, "g", "k", enc("again")))
    assert entry_of(fresh, "g", "k")[1] == 6


def test_entry_payload_shape_and_missing_keys() -> None:
    engine, _clock = make()
    assert entry_of(engine, "g", "k") is None
    assert entry_of(engine, "never", "seen") is None
    data = enc(None)
    ok(do(engine, C.SET, "g", "k", data, ttl=7))
    got = entry_of(engine, "g", "k")
    assert type(got) is tuple
    assert got == (data, 1, T0, T0 + 7)
    assert pickle.loads(got[0]) is None
    err(do(engine, C.ENTRY, "g", ""), InvalidInput)
    err(do(engine, C.ENTRY, "", "k"), InvalidInput)
    # entry is a read: it records nothing
    engine.take_changes()
    entry_of(engine, "g", "k")
    assert not engine.take_changes()


def test_updated_at_is_the_batch_time_even_when_passed_explicitly() -> None:
    engine, clock = make()
    engine.execute_batch([command(C.SET, "g", "a", enc(1)), command(C.SET, "g", "b", enc(2))])
    clock.advance(100)  # the clock is read once per batch
    assert entry_of(engine, "g", "a")[2] == T0
    assert entry_of(engine, "g", "b")[2] == T0
    ok(engine.execute(command(C.SET, "g", "a", enc(3), {"ttl": 4}), now=5_000.0))
    assert entry_of(engine, "g", "a")[1:] == (3, 5_000.0, 5_004.0)


# --------------------------------------------------------------------------------------------
# compare-and-set (expected_version)
# --------------------------------------------------------------------------------------------


def test_expected_version_that_matches_writes() -> None:
    engine, _clock = make()
    ok(do(engine, C.SET, "g", "k", enc({"n": 0})))
    assert ok(do(engine, C.SET, "g", "k", enc({"n": 5}), expected_version=1))[1] == enc({"n": 5})
    _old, new = ok(do(engine, C.UPDATE, "g", "k", INCR, expected_version=2))
    assert pickle.loads(new) == {"n": 6}
    assert entry_of(engine, "g", "k")[1] == 3
    assert ok(do(engine, C.DELETE, "g", "k", expected_version=3)) == new
    assert entry_of(engine, "g", "k") is None


@pytest.mark.parametrize(
    ("kind", "arg", "expected"),
    [
        (C.SET, enc("x"), 1),
        (C.SET, enc("x"), 3),
        (C.SET, enc("x"), 0),
        (C.UPDATE, INCR, 1),
        (C.UPDATE, INCR, 0),
        (C.UPDATE, INCR, 99),
        (C.DELETE, None, 1),
        (C.DELETE, None, 0),
    ],
)
def test_expected_version_mismatch_is_a_conflict_and_changes_nothing(
    kind: str, arg: Any, expected: int
) -> None:
    engine, clock = make()
    ok(do(engine, C.SET, "g", "k", enc({"n": 1}), ttl=30))
    ok(do(engine, C.UPDATE, "g", "k", INCR))
    engine.take_changes()
    before, ops_before = snapshot(engine), op_snapshot(engine)
    clock.advance(1)
    conflict = err(do(engine, kind, "g", "k", arg, expected_version=expected, op_id="cas-1"), ConflictError)
    assert (conflict.expected, conflict.actual) == (expected, 2)
    assert conflict.retriable is False
    assert snapshot(engine) == before
    assert op_snapshot(engine) == ops_before  # not remembered under its op_id either
    assert not engine.take_changes()
    assert pickle.loads(ok(do(engine, C.GET, "g", "k"))) == {"n": 2}


def test_expected_version_on_an_absent_key() -> None:
    engine, _clock = make()
    conflict = err(do(engine, C.SET, "g", "k", enc(1), expected_version=1), ConflictError)
    assert (conflict.expected, conflict.actual) == (1, 0)
    conflict = err(do(engine, C.UPDATE, "g", "k", INCR, expected_version=2), ConflictError)
    assert (conflict.expected, conflict.actual) == (2, 0)
    assert ok(do(engine, C.GROUPS)) == []
    assert not engine.take_changes()
    # 0: must not exist. Absent -> the write happens; present -> conflict
    assert ok(do(engine, C.DELETE, "g", "k", expected_version=0)) is None
    assert ok(do(engine, C.SET, "g", "k", enc(1), expected_version=0)) == (None, enc(1))
    conflict = err(do(engine, C.SET, "g", "k", enc(2), expected_version=0), ConflictError)
    assert (conflict.expected, conflict.actual) == (0, 1)
    assert pickle.loads(ok(do(engine, C.UPDATE, "g", "u", INCR, expected_version=0))[1]) == {"n": 1}
    err(do(engine, C.UPDATE, "g", "u", INCR, expected_version=0), ConflictError)
    err(do(engine, C.DELETE, "g", "u", expected_version=0), ConflictError)
    assert ok(do(engine, C.GET, "g", "k")) == enc(1)
    assert pickle.loads(ok(do(engine, C.GET, "g", "u"))) == {"n": 1}


def test_expected_version_after_expiry_counts_the_key_as_absent() -> None:
    engine, clock = make()
    ok(do(engine, C.SET, "g", "k", enc(1), ttl=5))
    clock.advance(5)
    conflict = err(do(engine, C.SET, "g", "k", enc(2), expected_version=1), ConflictError)
    assert conflict.actual == 0
    ok(do(engine, C.SET, "g", "k", enc(2), expected_version=0))
    assert entry_of(engine, "g", "k") == (enc(2), 3, T0 + 5, None)  # seq 2 was the expiry


def test_a_conflict_in_a_batch_leaves_the_other_commands_alone() -> None:
    engine, _clock = make()
    results = engine.execute_batch(
        [
            command(C.SET, "g", "k", enc(1)),
            command(C.SET, "g", "k", enc(2), {"expected_version": 2}),
            command(C.SET, "g", "k", enc(3), {"expected_version": 1}),
            command(C.SET, "g", "k", enc(4), {"expected_version": 1}),
            command(C.ENTRY, "g", "k"),
        ]
    )
    ok(results[0])
    assert err(results[1], ConflictError).actual == 1
    ok(results[2])
    assert (err(results[3], ConflictError).expected, err(results[3], ConflictError).actual) == (1, 2)
    assert ok(results[4]) == (enc(3), 2, T0, None)


@pytest.mark.parametrize("bad", [-1, -(2**70), True, False, "1", 1.0, [1]])
@pytest.mark.parametrize("kind", [C.SET, C.UPDATE, C.DELETE])
def test_bad_expected_version_is_invalid_input(kind: str, bad: Any) -> None:
    engine, _clock = make()
    ok(do(engine, C.SET, "g", "k", enc({"n": 1})))
    engine.take_changes()
    before = snapshot(engine)
    arg = enc(2) if kind == C.SET else INCR if kind == C.UPDATE else None
    for key in ("k", "absent"):
        err(do(engine, kind, "g", key, arg, expected_version=bad), InvalidInput)
        err(do(engine, kind, "g", key, arg, expected_version=bad, op_id="x"), InvalidInput)
    assert snapshot(engine) == before
    assert not engine.take_changes()
    assert op_snapshot(engine) == ({}, {})


# --------------------------------------------------------------------------------------------
# TTL
# --------------------------------------------------------------------------------------------


def _reads(group: str, key: str) -> list[C.Command]:
    return [
        command(C.GET, group, key),
        command(C.ENTRY, group, key),
        command(C.LIST, group),
        command(C.ITEMS, group),
        command(C.GROUPS),
    ]


def test_an_entry_is_visible_until_its_expiry_time_then_gone_and_deleted() -> None:
    engine, clock = make()
    ok(do(engine, C.SET, "g", "keep", enc("stay")))
    ok(do(engine, C.SET, "g", "k", enc("v"), ttl=10))
    ok(do(engine, C.SET, "h", "k", enc("w"), ttl=10.5))
    engine.take_changes()
    clock.now = T0 + 9.999
    got = [ok(r) for r in engine.execute_batch(_reads("g", "k"))]
    assert got == [
        enc("v"),
        (enc("v"), 2, T0, T0 + 10),
        [enc("stay"), enc("v")],
        [("keep", enc("stay")), ("k", enc("v"))],
        ["g", "h"],
    ]
    assert not engine.take_changes()
    clock.now = T0 + 10  # exactly the expiry time: gone
    got = [ok(r) for r in engine.execute_batch(_reads("g", "k"))]
    assert got == [None, None, [enc("stay")], [("keep", enc("stay"))], ["g", "h"]]
    changes = engine.take_changes()
    assert changes.entries == {("g", "k"): (None, False)}
    assert changes.cleared == set()
    assert engine.store.get("g", "k") is None
    clock.now = T0 + 10.5
    got = [ok(r) for r in engine.execute_batch(_reads("h", "k"))]
    assert got == [None, None, [], [], ["g"]]
    assert engine.take_changes().entries == {("h", "k"): (None, False)}
    assert engine.store.group_ids() == ["g"]


def test_expired_entries_go_at_the_start_of_any_batch() -> None:
    engine, clock = make()
    ok(do(engine, C.SET, "g", "k", enc(1), ttl=1))
    engine.take_changes()
    clock.advance(1)
    # an unrelated command in another group: the expired entry is deleted anyway
    assert ok(do(engine, C.GET, "other", "x")) is None
    assert engine.take_changes().entries == {("g", "k"): (None, False)}
    assert engine.store.groups == {}
    assert engine.sweep() == 0
    assert not engine.take_changes()


def test_an_empty_batch_still_expires() -> None:
    engine, clock = make()
    ok(do(engine, C.SET, "g", "k", enc(1), ttl=1))
    engine.take_changes()
    clock.advance(2)
    assert engine.execute_batch([]) == []
    assert engine.take_changes().entries == {("g", "k"): (None, False)}


def test_sweep_deletes_what_expired_and_counts_it() -> None:
    engine, clock = make()
    ok(do(engine, C.SET, "g", "a", enc(1), ttl=5))
    ok(do(engine, C.SET, "g", "b", enc(2), ttl=6))
    ok(do(engine, C.SET, "h", "c", enc(3), ttl=50))
    ok(do(engine, C.SET, "h", "d", enc(4)))
    engine.take_changes()
    assert engine.sweep() == 0
    assert not engine.take_changes()
    clock.advance(6)
    assert engine.sweep() == 2
    changes = engine.take_changes()
    assert changes.entries == {("g", "a"): (None, False), ("g", "b"): (None, False)}
    assert engine.store.group_ids() == ["h"]
    assert engine.sweep() == 0
    assert engine.sweep(now=T0 + 49.9) == 0
    assert engine.sweep(now=T0 + 50) == 1
    assert engine.take_changes().entries == {("h", "c"): (None, False)}
    assert [k for k, _ in engine.store.entries("h")] == ["d"]


def test_set_without_ttl_clears_the_ttl() -> None:
    engine, clock = make()
    ok(do(engine, C.SET, "g", "k", enc(1), ttl=10))
    clock.advance(5)
    ok(do(engine, C.SET, "g", "k", enc(2)))
    assert entry_of(engine, "g", "k") == (enc(2), 2, T0 + 5, None)
    clock.advance(100)
    assert engine.sweep() == 0
    assert ok(do(engine, C.GET, "g", "k")) == enc(2)


def test_update_without_ttl_keeps_it_and_with_ttl_sets_it() -> None:
    engine, clock = make()
    ok(do(engine, C.SET, "g", "k", enc({"n": 0}), ttl=10))
    clock.advance(3)
    ok(do(engine, C.UPDATE, "g", "k", INCR))
    assert entry_of(engine, "g", "k")[1:] == (2, T0 + 3, T0 + 10)
    clock.advance(3)
    ok(do(engine, C.UPDATE, "g", "k", INCR, ttl=20))  # from now, not from the first set
    assert entry_of(engine, "g", "k")[1:] == (3, T0 + 6, T0 + 26)
    clock.advance(5)  # T0 + 11: past the first expiry, not the new one
    assert pickle.loads(ok(do(engine, C.GET, "g", "k"))) == {"n": 2}
    ok(do(engine, C.UPDATE, "g", "plain", INCR))
    ok(do(engine, C.UPDATE, "g", "plain", INCR, ttl=1))
    assert entry_of(engine, "g", "plain")[3] == T0 + 12
    ok(do(engine, C.UPDATE, "g", "new", INCR, ttl=2.5))
    assert entry_of(engine, "g", "new") == (canonical_dumps({"n": 1}), 6, T0 + 11, T0 + 13.5)
    clock.advance(15)  # T0 + 26
    assert ok(do(engine, C.ITEMS, "g")) == []
    assert ok(do(engine, C.GROUPS)) == []


@pytest.mark.parametrize("kind", [C.UPDATE, C.SET])
def test_the_ttl_heap_keeps_one_live_entry_per_key(kind: str) -> None:
    """Item 8: 10,000 writes of one key with a TTL leave a bounded heap, and expiry still works."""
    engine, clock = make()
    ok(do(engine, C.SET, "g", "k", enc({"n": 0}), ttl=1000))
    for i in range(10_000):
        if kind == C.UPDATE:  # keeps its expiry time
            ok(do(engine, C.UPDATE, "g", "k", INCR))
        else:  # a new expiry time every time
            clock.advance(0.001)
            ok(do(engine, C.SET, "g", "k", enc({"n": i}), ttl=1000))
    assert engine.expiry_heap_size <= 2 * 1 + 64
    for i in range(100):  # other keys with a TTL each: one entry per key
        ok(do(engine, C.SET, "g", f"o{i}", enc(i), ttl=5000))
    assert engine.expiry_heap_size <= 2 * 101 + 64
    expires_at = entry_of(engine, "g", "k")[3]
    clock.now = expires_at
    assert engine.sweep() == 1
    assert entry_of(engine, "g", "k") is None
    clock.now = T0 + 10_000
    assert engine.sweep() == 100
    assert engine.expiry_heap_size == 0


def test_a_later_ttl_is_not_cut_short_by_the_earlier_one() -> None:
    engine, clock = make()
    ok(do(engine, C.SET, "g", "k", enc(1), ttl=10))
    clock.advance(5)
    ok(do(engine, C.SET, "g", "k", enc(2), ttl=100))
    clock.advance(5)  # T0 + 10: the first expiry time
    assert engine.sweep() == 0
    assert ok(do(engine, C.GET, "g", "k")) == enc(2)
    assert entry_of(engine, "g", "k")[1:] == (2, T0 + 5, T0 + 105)
    clock.now = T0 + 104.99
    assert ok(do(engine, C.GET, "g", "k")) == enc(2)
    clock.now = T0 + 105
    assert ok(do(engine, C.GET, "g", "k")) is None


def test_a_recreated_key_is_not_deleted_by_the_old_key_s_expiry() -> None:
    engine, clock = make()
    ok(do(engine, C.SET, "g", "a", enc(1), ttl=10))
    ok(do(engine, C.SET, "g", "b", enc(1), ttl=10))
    ok(do(engine, C.SET, "g", "c", enc(1), ttl=10))
    ok(do(engine, C.DELETE, "g", "a"))
    ok(do(engine, C.SET, "g", "a", enc(2)))  # no TTL now
    assert ok(do(engine, C.CLEAR, "g")) == 3
    ok(do(engine, C.SET, "g", "b", enc(3), ttl=20))
    ok(do(engine, C.UPDATE, "g", "c", INCR))
    clock.advance(10)
    assert engine.sweep() == 0
    assert ok(do(engine, C.ITEMS, "g")) == [("b", enc(3)), ("c", canonical_dumps({"n": 1}))]
    clock.advance(10)
    assert engine.sweep() == 1
    assert ok(do(engine, C.ITEMS, "g")) == [("c", canonical_dumps({"n": 1}))]


def test_the_same_expiry_time_twice_deletes_once() -> None:
    engine, clock = make()
    ok(do(engine, C.SET, "g", "k", enc(1), ttl=10))
    clock.advance(4)
    ok(do(engine, C.DELETE, "g", "k"))
    ok(do(engine, C.SET, "g", "k", enc(2), ttl=6))  # expires at the same time as the first one
    engine.take_changes()
    clock.advance(6)
    assert engine.sweep() == 1
    assert engine.take_changes().entries == {("g", "k"): (None, False)}


@pytest.mark.parametrize(
    "ttl", [0, 0.0, -1, -0.5, math.nan, math.inf, -math.inf, True, False, "5", [5], b"5"]
)
@pytest.mark.parametrize("kind", [C.SET, C.UPDATE])
def test_bad_ttl_is_invalid_input_and_changes_nothing(kind: str, ttl: Any) -> None:
    engine, _clock = make()
    ok(do(engine, C.SET, "g", "k", enc({"n": 1}), ttl=30))
    engine.take_changes()
    before = snapshot(engine)
    arg = enc(2) if kind == C.SET else INCR
    for key in ("k", "absent"):
        err(do(engine, kind, "g", key, arg, ttl=ttl), InvalidInput)
        err(do(engine, kind, "g", key, arg, ttl=ttl, op_id="t"), InvalidInput)
    assert snapshot(engine) == before
    assert not engine.take_changes()
    assert op_snapshot(engine) == ({}, {})


def test_good_ttl_forms() -> None:
    engine, _clock = make()
    for i, ttl in enumerate([1, 0.001, 1e9, 2**40]):
        ok(do(engine, C.SET, "g", f"k{i}", enc(i), ttl=ttl))
        assert entry_of(engine, "g", f"k{i}")[3] == T0 + ttl


# --------------------------------------------------------------------------------------------
# op_id: idempotent writes, scoped to (group_id, key) and bound to their call
# --------------------------------------------------------------------------------------------


def test_same_op_id_twice_applies_once() -> None:
    engine, clock = make()
    first = ok(do(engine, C.UPDATE, "g", "k", INCR, op_id="job-1"))
    clock.advance(1)
    again = ok(do(engine, C.UPDATE, "g", "k", INCR, op_id="job-1"))
    assert again == first
    assert pickle.loads(ok(do(engine, C.GET, "g", "k"))) == {"n": 1}
    assert entry_of(engine, "g", "k")[1:3] == (1, T0)
    changes = engine.take_changes()
    assert [r.op_id for r in changes.op_records] == [op_scope("g", "k", "job-1")]
    record = changes.op_records[0]
    assert record.created_at == T0
    fingerprint, result = pickle.loads(record.result)
    assert result == first
    assert len(fingerprint) == 16
    assert list(changes.entries) == [("g", "k")]


def test_same_op_id_twice_in_one_batch() -> None:
    engine, _clock = make()
    cmd = command(C.UPDATE, "g", "k", INCR, {"op_id": "~auto-1"})
    results = engine.execute_batch([cmd, cmd, command(C.GET, "g", "k")])
    assert ok(results[0]) == ok(results[1])
    assert pickle.loads(ok(results[2])) == {"n": 1}
    assert [r.op_id for r in engine.take_changes().op_records] == [op_scope("g", "k", "~auto-1")]


def test_repeated_set_returns_the_first_result_even_after_other_writes() -> None:
    engine, clock = make()
    ok(do(engine, C.SET, "g", "k", enc("a")))
    first = ok(do(engine, C.SET, "g", "k", enc("b"), op_id="s1", ttl=10))
    assert first == (enc("a"), enc("b"))
    ok(do(engine, C.SET, "g", "k", enc("c")))
    clock.advance(1)
    assert ok(do(engine, C.SET, "g", "k", enc("b"), op_id="s1", ttl=10)) == first
    assert entry_of(engine, "g", "k") == (enc("c"), 3, T0, None)
    # the remembered result does not hold the set's own value again: a repeat brings it along
    (record,) = [r for r in engine.take_changes().op_records if r.op_id == op_scope("g", "k", "s1")]
    assert enc("b") not in record.result


def test_repeated_delete_and_clear_apply_once() -> None:
    engine, _clock = make()
    ok(do(engine, C.SET, "g", "k", enc(1)))
    ok(do(engine, C.SET, "g", "x", enc(2)))
    assert ok(do(engine, C.DELETE, "g", "k", op_id="d1")) == enc(1)
    ok(do(engine, C.SET, "g", "k", enc(3)))
    assert ok(do(engine, C.DELETE, "g", "k", op_id="d1")) == enc(1)
    assert ok(do(engine, C.GET, "g", "k")) == enc(3)
    assert ok(do(engine, C.CLEAR, "g", op_id="c1")) == 2
    ok(do(engine, C.SET, "g", "y", enc(4)))
    assert ok(do(engine, C.CLEAR, "g", op_id="c1")) == 2
    assert ok(do(engine, C.ITEMS, "g")) == [("y", enc(4))]
    # a delete of a missing key is remembered too
    assert ok(do(engine, C.DELETE, "g", "z", op_id="d2")) is None
    ok(do(engine, C.SET, "g", "z", enc(5)))
    assert ok(do(engine, C.DELETE, "g", "z", op_id="d2")) is None
    assert ok(do(engine, C.GET, "g", "z")) == enc(5)
    records = engine.take_changes().op_records
    scopes = [("g", "k", "d1"), ("g", None, "c1"), ("g", "z", "d2")]
    assert [r.op_id for r in records] == [op_scope(*scope) for scope in scopes]
    assert [pickle.loads(r.result)[1] for r in records] == [enc(1), 2, None]


def test_an_op_id_is_scoped_to_its_group_and_key() -> None:
    """Item 1: the same op_id on another key (or group) is another write, and it applies."""
    engine, _clock = make()
    assert ok(do(engine, C.SET, "g", "a", enc(1), op_id="evt-1")) == (None, enc(1))
    assert ok(do(engine, C.SET, "g", "b", enc(2), op_id="evt-1")) == (None, enc(2))
    _old, new = ok(do(engine, C.UPDATE, "other", "a", INCR, op_id="evt-1"))
    assert pickle.loads(new) == {"n": 1}
    assert ok(do(engine, C.DELETE, "g", "c", op_id="evt-1")) is None
    assert ok(do(engine, C.CLEAR, "h", op_id="evt-1")) == 0
    assert ok(do(engine, C.GET, "g", "a")) == enc(1)
    assert ok(do(engine, C.GET, "g", "b")) == enc(2)
    assert pickle.loads(ok(do(engine, C.GET, "other", "a"))) == {"n": 1}
    # and each is still a once-only write on its own key
    assert ok(do(engine, C.SET, "g", "b", enc(2), op_id="evt-1")) == (None, enc(2))
    assert pickle.loads(ok(do(engine, C.UPDATE, "other", "a", INCR, op_id="evt-1"))[1]) == {"n": 1}
    assert len(engine.take_changes().op_records) == 5


@pytest.mark.parametrize(
    ("again", "opts"),
    [
        ((C.SET, "k", "x"), {}),  # another value
        ((C.SET, "k", 1), {"ttl": 5}),  # the same value with another ttl
        ((C.SET, "k", 1), {"expected_version": 1}),  # ... or another expected version
        ((C.UPDATE, "k", INCR), {}),  # another command
        ((C.DELETE, "k", None), {}),
    ],
)
@pytest.mark.parametrize("reloaded", [False, True])
def test_an_op_id_reused_for_a_different_call_is_invalid_input(
    again: tuple[str, str, Any], opts: dict[str, Any], reloaded: bool
) -> None:
    """Item 1: the same op_id on the same key with another call changes nothing and says so."""
    engine, _clock = make()
    first = ok(do(engine, C.SET, "g", "k", enc(1), op_id="evt-1"))
    if reloaded:  # the fingerprint comes back from storage after a restart
        engine = reload(engine, engine.take_changes().op_records)
    engine.take_changes()
    before, ops_before = snapshot(engine), op_snapshot(engine)
    kind, key, value = again
    arg = enc(value) if kind == C.SET else value
    failed = err(do(engine, kind, "g", key, arg, op_id="evt-1", **opts), InvalidInput)
    assert "reused for a different call" in str(failed)
    assert snapshot(engine) == before
    assert not engine.take_changes()
    assert op_snapshot(engine).__len__() == len(ops_before)
    # the same call still gets its first result
    assert ok(do(engine, C.SET, "g", "k", enc(1), op_id="evt-1")) == first


def test_an_automatic_op_id_reused_by_another_kind_of_command_is_refused() -> None:
    engine, _clock = make()
    assert ok(do(engine, C.DELETE, "g", "k", op_id="~p1:1")) is None
    failed = err(do(engine, C.SET, "g", "k", enc(1), op_id="~p1:1"), InvalidInput)
    assert "reused" in str(failed)
    assert ok(do(engine, C.GET, "g", "k")) is None


def test_remembered_results_are_bounded_in_ram_by_bytes() -> None:
    """Item 1: a large result is kept in storage only (read back on a repeat), not in RAM."""
    store: dict[str, bytes] = {}
    engine, _clock = make(fetch_op=store.get)
    big = b"B" * (RESULT_RAM_ITEM + 1)
    ok(do(engine, C.SET, "g", "k", big))
    first = ok(do(engine, C.SET, "g", "k", enc(2), op_id="replace-big"))  # old value: 64 KiB + 1
    assert first == (big, enc(2))
    assert engine.result_bytes == 0  # not kept in RAM
    for record in engine.take_changes().op_records:
        store[record.op_id] = record.result  # what storage would commit
    ok(do(engine, C.SET, "g", "k", enc(3)))
    assert ok(do(engine, C.SET, "g", "k", enc(2), op_id="replace-big")) == first  # read back from storage
    assert engine.result_bytes == 0
    # small results are kept, and counted
    ok(do(engine, C.UPDATE, "g", "s", INCR, op_id="small"))
    assert 0 < engine.result_bytes < 100
    # without storage for results (memory durability) a large one is forgotten: a repeat reports the
    # key's current value and applies nothing
    volatile, _ = make(fetch_op=None)
    ok(do(volatile, C.SET, "g", "k", big))
    ok(do(volatile, C.SET, "g", "k", enc(2), op_id="replace-big"))
    ok(do(volatile, C.SET, "g", "k", enc(3)))
    assert ok(do(volatile, C.SET, "g", "k", enc(2), op_id="replace-big")) == (None, enc(3))
    assert ok(do(volatile, C.GET, "g", "k")) == enc(3)


def test_a_failed_write_is_not_remembered() -> None:
    engine, _clock = make()
    ok(do(engine, C.SET, "g", "k", enc({"n": "text"})))
    engine.take_changes()
    failed = err(do(engine, C.UPDATE, "g", "k", INCR, op_id="u1"), UpdateError)
    assert failed.code == "not_number"
    err(do(engine, C.SET, "g", "k", enc(1), op_id="u2", expected_version=7), ConflictError)
    err(do(engine, C.DELETE, "g", "k", op_id="u3", expected_version=7), ConflictError)
    err(do(engine, C.SET, "g", "k", "not bytes", op_id="u4"), InvalidInput)
    assert not engine.take_changes()
    assert op_snapshot(engine) == ({}, {})
    # the cause is fixed: the same op_ids now apply
    ok(do(engine, C.SET, "g", "k", enc({"n": 1})))
    assert pickle.loads(ok(do(engine, C.UPDATE, "g", "k", INCR, op_id="u1"))[1]) == {"n": 2}
    assert pickle.loads(ok(do(engine, C.UPDATE, "g", "k", INCR, op_id="u1"))[1]) == {"n": 2}
    assert ok(do(engine, C.SET, "g", "k", enc(9), op_id="u2", expected_version=3))[1] == enc(9)
    assert ok(do(engine, C.DELETE, "g", "k", op_id="u3", expected_version=4)) == enc(9)
    records = engine.take_changes().op_records
    assert [r.op_id for r in records] == [op_scope("g", "k", o) for o in ("u1", "u2", "u3")]


def test_sweep_forgets_op_results_after_their_retention() -> None:
    engine, clock = make(op_retention=100.0, auto_op_retention=10.0)
    ok(do(engine, C.UPDATE, "g", "k", INCR, op_id="user-1"))
    ok(do(engine, C.UPDATE, "g", "k", INCR, op_id="~auto-1"))
    clock.advance(5)
    ok(do(engine, C.UPDATE, "g", "k", INCR, op_id="~auto-2"))
    ok(do(engine, C.UPDATE, "g", "k", INCR, op_id="user-2"))
    engine.take_changes()
    clock.now = T0 + 10  # exactly the retention: still kept
    assert engine.sweep() == 0
    assert not engine.take_changes()
    clock.now = T0 + 10.5
    engine.sweep()
    changes = engine.take_changes()
    assert changes.pruned_ops == [op_scope("g", "k", "~auto-1")]
    assert not changes.entries
    assert op_names(engine.auto_ops) == {"~auto-2"}
    assert op_names(engine.ops) == {"user-1", "user-2"}
    # the forgotten op applies again; the kept ones do not
    assert pickle.loads(ok(do(engine, C.UPDATE, "g", "k", INCR, op_id="~auto-1"))[1]) == {"n": 5}
    assert pickle.loads(ok(do(engine, C.UPDATE, "g", "k", INCR, op_id="~auto-2"))[1]) == {"n": 3}
    assert pickle.loads(ok(do(engine, C.UPDATE, "g", "k", INCR, op_id="user-1"))[1]) == {"n": 1}
    engine.take_changes()
    clock.now = T0 + 100.5
    engine.sweep()
    pruned = engine.take_changes().pruned_ops
    assert pruned == [op_scope("g", "k", o) for o in ("user-1", "~auto-2", "~auto-1")]
    assert op_names(engine.ops) == {"user-2"}
    clock.now = T0 + 105.5
    engine.sweep()
    assert engine.take_changes().pruned_ops == [op_scope("g", "k", "user-2")]
    assert op_snapshot(engine) == ({}, {})
    assert engine.result_bytes == 0  # what was kept in RAM is given back


def test_sweep_with_an_explicit_time_prunes_against_it() -> None:
    engine, _clock = make(op_retention=50.0)
    ok(do(engine, C.SET, "g", "k", enc(1), op_id="o"))
    engine.take_changes()
    engine.sweep(now=T0 + 50)
    assert not engine.take_changes()
    engine.sweep(now=T0 + 50.01)
    assert engine.take_changes().pruned_ops == [op_scope("g", "k", "o")]


def test_repeats_are_deduplicated_after_load() -> None:
    engine, clock = make(op_retention=100.0, auto_op_retention=10.0)
    first_set = ok(do(engine, C.SET, "g", "k", enc({"n": 10}), op_id="set-1"))
    clock.advance(1)
    first_update = ok(do(engine, C.UPDATE, "g", "k", INCR, op_id="~up-1"))
    first_clear = ok(do(engine, C.CLEAR, "h", op_id="clr"))
    records = engine.take_changes().op_records
    assert len(records) == 3
    clock.advance(1)
    fresh = reload(engine, records, op_retention=100.0, auto_op_retention=10.0)
    assert ok(do(fresh, C.SET, "g", "k", enc({"n": 10}), op_id="set-1")) == first_set
    assert ok(do(fresh, C.UPDATE, "g", "k", INCR, op_id="~up-1")) == first_update
    assert ok(do(fresh, C.CLEAR, "h", op_id="clr")) == first_clear
    assert pickle.loads(ok(do(fresh, C.GET, "g", "k"))) == {"n": 11}
    assert entry_of(fresh, "g", "k")[1:] == (2, T0 + 1, None)
    assert not fresh.take_changes()
    # the loaded records keep their creation times: pruned on the original schedule
    clock.now = T0 + 11.5
    fresh.sweep()
    assert fresh.take_changes().pruned_ops == [op_scope("g", "k", "~up-1")]
    clock.now = T0 + 100.5
    fresh.sweep()
    assert fresh.take_changes().pruned_ops == [op_scope("g", "k", "set-1")]


def test_a_loaded_op_result_is_fetched_once_and_only_when_repeated() -> None:
    engine, clock = make()
    calls = [(C.UPDATE, INCR, "a"), (C.UPDATE, INCR, "~b"), (C.SET, enc(0), "c")]
    first = [ok(do(engine, kind, "g", "k", arg, op_id=op_id)) for kind, arg, op_id in calls]
    records = engine.take_changes().op_records
    ops = FakeOpStore(records)
    fresh = reload(engine, records, fetch_op=ops.fetch)
    assert op_names(fresh.ops) == {"a", "c"}
    assert op_names(fresh.auto_ops) == {"~b"}
    assert ops.asked == []  # a restart reads no results
    clock.advance(1)
    assert ok(do(fresh, C.UPDATE, "g", "k", INCR, op_id="~b")) == first[1]
    assert ok(do(fresh, C.UPDATE, "g", "k", INCR, op_id="~b")) == first[1]
    assert ok(do(fresh, C.SET, "g", "k", enc(0), op_id="c")) == first[2]
    assert ops.asked == [op_scope("g", "k", "~b"), op_scope("g", "k", "c")]  # each fetched once, then kept
    assert pickle.loads(ok(do(fresh, C.GET, "g", "k"))) == 0
    assert not fresh.take_changes()
    # a new op_id is a new write, not a fetch
    assert pickle.loads(ok(do(fresh, C.UPDATE, "g", "j", INCR, op_id="d"))[1]) == {"n": 1}
    assert len(ops.asked) == 2


@pytest.mark.parametrize("fetch", ["none", "missing"])
def test_a_loaded_op_whose_result_cannot_be_fetched_is_an_error_not_a_second_write(fetch: str) -> None:
    engine, _clock = make()
    ok(do(engine, C.UPDATE, "g", "k", INCR, op_id="job"))
    records = engine.take_changes().op_records
    fetch_op = None if fetch == "none" else FakeOpStore([]).fetch
    fresh = reload(engine, records, fetch_op=fetch_op)
    failed = do(fresh, C.UPDATE, "g", "k", INCR, op_id="job")
    assert failed[0] is False
    assert isinstance(failed[1], StateError)
    assert "job" in str(failed[1])
    assert pickle.loads(ok(do(fresh, C.GET, "g", "k"))) == {"n": 1}
    assert not fresh.take_changes()


def test_load_restores_entries_and_their_expiry() -> None:
    engine, clock = make()
    ok(do(engine, C.SET, "g", "a", enc(1), ttl=5))
    ok(do(engine, C.SET, "g", "b", enc(2)))
    ok(do(engine, C.SET, "g", "c", enc(3), ttl=50))
    fresh = reload(engine, [])
    assert ok(do(fresh, C.ITEMS, "g")) == [("a", enc(1)), ("b", enc(2)), ("c", enc(3))]
    assert entry_of(fresh, "g", "c") == (enc(3), 3, T0, T0 + 50)
    clock.advance(5)
    assert fresh.sweep() == 1
    assert ok(do(fresh, C.ITEMS, "g")) == [("b", enc(2)), ("c", enc(3))]
    clock.advance(45)
    assert ok(do(fresh, C.LIST, "g")) == [enc(2)]
    assert fresh.take_changes().entries == {("g", "a"): (None, False), ("g", "c"): (None, False)}


def test_load_of_already_expired_entries_hides_and_deletes_them() -> None:
    engine, clock = make()
    loaded = Loaded(
        [("g", "old", enc(1), 4, T0 - 20, T0 - 10), ("g", "live", enc(2), 2, T0 - 20, T0 + 10)],
        [],
        seq=4,
    )
    engine.load(loaded)
    assert ok(do(engine, C.ITEMS, "g")) == [("live", enc(2))]
    assert engine.take_changes().entries == {("g", "old"): (None, False)}
    assert entry_of(engine, "g", "live") == (enc(2), 2, T0 - 20, T0 + 10)
    ok(do(engine, C.SET, "g", "live", enc(3)))
    assert entry_of(engine, "g", "live")[1] == 6  # seq 5 was the expiry of "old"


def _big(n: int) -> bytes:
    return b"B" * n


def test_an_auto_update_with_a_large_result_repeats_as_the_current_value() -> None:
    engine, _clock = make()
    small = enc({"s": ""})
    ok(do(engine, C.SET, "g", "k", small))
    arg = [{"type": "set", "path": "s", "value": "x" * AUTO_RESULT_LIMIT}]
    first = ok(do(engine, C.UPDATE, "g", "k", arg, op_id="~big"))
    assert first[0] == small
    assert len(first[0]) + len(first[1]) > AUTO_RESULT_LIMIT
    record = engine.take_changes().op_records[0]
    assert len(record.result) < 1024  # the result itself was not kept
    ok(do(engine, C.SET, "g", "k", enc("later")))
    again = ok(do(engine, C.UPDATE, "g", "k", arg, op_id="~big"))
    assert again == (None, enc("later"))
    assert ok(do(engine, C.GET, "g", "k")) == enc("later")  # and nothing applied again
    assert entry_of(engine, "g", "k")[1] == 3
    ok(do(engine, C.DELETE, "g", "k"))
    assert ok(do(engine, C.UPDATE, "g", "k", arg, op_id="~big")) == (None, None)
    assert ok(do(engine, C.GET, "g", "k")) is None
    # the marker survives a restart
    fresh = reload(engine, [record])
    ok(do(fresh, C.SET, "g", "k", enc("after restart")))
    assert ok(do(fresh, C.UPDATE, "g", "k", arg, op_id="~big")) == (None, enc("after restart"))


def test_an_auto_set_keeps_its_result_without_its_own_value() -> None:
    """A set's new value is its argument: even a large one costs nothing to remember."""
    engine, _clock = make()
    ok(do(engine, C.SET, "g", "k", b"o" * 100))
    big = _big(AUTO_RESULT_LIMIT * 4)
    first = ok(do(engine, C.SET, "g", "k", big, op_id="~s"))
    record = engine.take_changes().op_records[0]
    assert len(record.result) < 1024
    ok(do(engine, C.SET, "g", "k", enc("next")))
    assert ok(do(engine, C.SET, "g", "k", big, op_id="~s")) == first == (b"o" * 100, big)
    assert ok(do(engine, C.GET, "g", "k")) == enc("next")


def test_auto_result_limit_boundary_and_user_ops_kept_whole() -> None:
    engine, _clock = make()
    ok(do(engine, C.SET, "g", "k", enc({"s": ""})))
    at_limit = {"s": "x" * (AUTO_RESULT_LIMIT // 2 - 40)}
    arg = [{"type": "set", "path": "s", "value": at_limit["s"]}]
    exact = ok(do(engine, C.UPDATE, "g", "k", arg, op_id="~exact"))
    assert len(exact[0] or b"") + len(exact[1]) <= AUTO_RESULT_LIMIT
    ok(do(engine, C.SET, "g", "k", enc("next")))
    assert ok(do(engine, C.UPDATE, "g", "k", arg, op_id="~exact")) == exact  # within the limit: kept
    big = [{"type": "set", "path": "s", "value": "y" * AUTO_RESULT_LIMIT}]
    ok(do(engine, C.SET, "g", "j", enc({"s": ""})))
    over = ok(do(engine, C.UPDATE, "g", "j", big, op_id="user-big"))
    ok(do(engine, C.SET, "g", "j", enc("next2")))
    assert ok(do(engine, C.UPDATE, "g", "j", big, op_id="user-big")) == over  # user op_ids: always whole
    assert ok(do(engine, C.GET, "g", "j")) == enc("next2")


def test_a_repeated_auto_delete_of_a_large_value_keeps_the_delete_payload_shape() -> None:
    engine, _clock = make()
    big = enc("x" * (AUTO_RESULT_LIMIT + 10))
    ok(do(engine, C.SET, "g", "k", big))
    assert ok(do(engine, C.DELETE, "g", "k", op_id=f"{AUTO_OP_PREFIX}del")) == big
    ok(do(engine, C.SET, "g", "k", enc("new")))
    again = ok(do(engine, C.DELETE, "g", "k", op_id=f"{AUTO_OP_PREFIX}del"))
    assert again == big  # a delete's result is kept whole (shape: bytes, not (None, current))
    assert ok(do(engine, C.GET, "g", "k")) == enc("new")


@pytest.mark.parametrize("op_id", [5, 0, "", b"op", ["op"], True, 1.5])
@pytest.mark.parametrize("kind", [C.SET, C.UPDATE, C.DELETE, C.CLEAR])
def test_bad_op_id_on_a_write_is_invalid_input(kind: str, op_id: Any) -> None:
    engine, _clock = make()
    ok(do(engine, C.SET, "g", "k", enc({"n": 1})))
    engine.take_changes()
    before = snapshot(engine)
    arg = enc(2) if kind == C.SET else INCR if kind == C.UPDATE else None
    err(do(engine, kind, "g", "k", arg, op_id=op_id), InvalidInput)
    assert snapshot(engine) == before
    assert not engine.take_changes()
    assert op_snapshot(engine) == ({}, {})


@pytest.mark.parametrize("op_id", ["r1", 5, ""])
def test_op_id_on_reads_is_ignored(op_id: Any) -> None:
    engine, _clock = make()
    ok(do(engine, C.SET, "g", "k", enc(1)))
    engine.take_changes()
    reads = [
        (C.GET, "k", enc(1)),
        (C.ENTRY, "k", (enc(1), 1, T0, None)),
        (C.LIST, None, [enc(1)]),
        (C.ITEMS, None, [("k", enc(1))]),
    ]
    for kind, key, expected in reads:
        assert ok(do(engine, kind, "g", key, op_id=op_id)) == expected
    assert ok(do(engine, C.GROUPS, op_id=op_id)) == ["g"]
    assert not engine.take_changes()
    assert op_snapshot(engine) == ({}, {})
    ok(do(engine, C.SET, "g", "k", enc(2)))
    assert ok(do(engine, C.GET, "g", "k", op_id=op_id)) == enc(2)  # not a remembered result
    if isinstance(op_id, str) and op_id:
        # a read's op_id does not make a later write with it a repeat
        assert ok(do(engine, C.SET, "g", "k", enc(3), op_id=op_id)) == (enc(2), enc(3))
