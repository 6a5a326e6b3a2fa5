"""Group counts and cursor pages (``counts`` / ``page`` commands), against a plain dict model.

The stateful test interleaves writes (sets, deletes, clears, expiries) with the pages of one scan
in progress and checks what the HTTP API promises: counts equal the model's group sizes at every
step; each page is in strictly increasing key order and matches the prefix; over a whole scan no
key is returned twice, and every key that existed (and matched) for the whole scan is returned.
"""

from __future__ import annotations

import pickle
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from shardstate import InvalidInput
from shardstate._requests import decode_cursor, encode_cursor, page_request
from shardstate.shards import commands as C
from shardstate.shards.commands import command
from shardstate.shards.engine import MAX_PAGE_ITEMS, ShardEngine
from shardstate.shards.store import GroupStore

GROUPS = ["g", "h"]
KEYS = [f"{p}{i}" for p in ("a", "ab", "b", "é") for i in range(6)]
PREFIXES = ["", "a", "ab", "b", "é", "z"]


def enc(value: Any) -> bytes:
    return pickle.dumps(value)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class PagingMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.engine = ShardEngine(GroupStore(), clock=self.clock)
        self.model: dict[str, dict[str, float | None]] = {}  # group -> key -> expires_at
        self.scan: dict[str, Any] | None = None

    def _live(self, group: str) -> set[str]:
        now = self.clock.now
        return {k for k, at in self.model.get(group, {}).items() if at is None or at > now}

    def _ok(self, cmd: Any) -> Any:
        ok, payload = self.engine.execute(cmd)
        assert ok, payload
        return payload

    def _note_change(self, group: str) -> None:
        """Keys of a scan in progress that stop existing are no longer owed to it."""
        if self.scan is not None and self.scan["group"] == group:
            self.scan["owed"] &= self._live(group)

    @rule(
        group=st.sampled_from(GROUPS), key=st.sampled_from(KEYS), ttl=st.none() | st.sampled_from([1.0, 5.0])
    )
    def set(self, group: str, key: str, ttl: float | None) -> None:
        opts = None if ttl is None else {"ttl": ttl}
        self._ok(command(C.SET, group, key, enc(key), opts))
        self.model.setdefault(group, {})[key] = None if ttl is None else self.clock.now + ttl

    @rule(group=st.sampled_from(GROUPS), key=st.sampled_from(KEYS))
    def delete(self, group: str, key: str) -> None:
        self._ok(command(C.DELETE, group, key))
        self.model.get(group, {}).pop(key, None)
        self._note_change(group)

    @rule(group=st.sampled_from(GROUPS))
    def clear(self, group: str) -> None:
        self._ok(command(C.CLEAR, group))
        self.model.pop(group, None)
        self._note_change(group)

    @rule(seconds=st.sampled_from([0.5, 2.0]))
    def tick(self, seconds: float) -> None:
        self.clock.now += seconds
        for group in GROUPS:
            self._note_change(group)

    @rule(group=st.sampled_from(GROUPS), prefix=st.sampled_from(PREFIXES))
    def start_scan(self, group: str, prefix: str) -> None:
        owed = {k for k in self._live(group) if k.startswith(prefix)}
        self.scan = {"group": group, "prefix": prefix, "after": None, "seen": [], "owed": owed}

    @rule(limit=st.integers(1, 7))
    def next_page(self, limit: int) -> None:
        scan = self.scan
        if scan is None:
            return
        rows, last = self._ok(command(C.PAGE, scan["group"], None, (scan["after"], limit, scan["prefix"])))
        keys = [k for k, _, _ in rows]
        assert len(keys) <= limit
        assert keys == sorted(set(keys)), keys
        assert all(k.startswith(scan["prefix"]) for k in keys)
        if scan["after"] is not None:
            assert all(k > scan["after"] for k in keys)
        live = self._live(scan["group"])
        for key, data, version in rows:
            assert key in live
            assert pickle.loads(data) == key
            assert version > 0
        assert not set(keys) & set(scan["seen"]), "a key came twice in one scan"
        scan["seen"] += keys
        if last is None:
            missing = scan["owed"] - set(scan["seen"])
            assert not missing, f"skipped keys that existed for the whole scan: {missing}"
            self.scan = None
        else:
            assert last >= (keys[-1] if keys else "")
            scan["after"] = last

    @invariant()
    def counts_match(self) -> None:
        counts = dict(self._ok(command(C.COUNTS)))
        # expiry happens at the start of a batch: the counts batch itself removed the expired keys
        expected = {g: len(self._live(g)) for g in GROUPS if self._live(g)}
        assert counts == expected


TestPaging = PagingMachine.TestCase
TestPaging.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_page_of_an_absent_group_is_empty() -> None:
    engine = ShardEngine()
    assert engine.execute(command(C.PAGE, "nope", None, (None, 10, ""))) == (True, ([], None))


def test_page_stops_at_limit_and_says_where_to_go_on() -> None:
    engine = ShardEngine()
    engine.execute_batch([command(C.SET, "g", f"k{i:02}", enc(i)) for i in range(25)])
    ok, (rows, last) = engine.execute(command(C.PAGE, "g", None, (None, 10, "")))
    assert ok
    assert [k for k, _, _ in rows] == [f"k{i:02}" for i in range(10)]
    assert last == "k09"
    ok, (rows, last) = engine.execute(command(C.PAGE, "g", None, ("k19", 10, "")))
    assert [k for k, _, _ in rows] == [f"k{i:02}" for i in range(20, 25)]
    assert last is None
    # exactly a full last page: no cursor pointing at an empty page
    ok, (rows, last) = engine.execute(command(C.PAGE, "g", None, ("k14", 10, "")))
    assert len(rows) == 10
    assert last is None


def test_versions_in_pages_are_the_entries_versions() -> None:
    engine = ShardEngine()
    engine.execute(command(C.SET, "g", "a", enc(1)))
    engine.execute(command(C.SET, "g", "a", enc(2)))
    ok, entry = engine.execute(command(C.ENTRY, "g", "a"))
    ok, (rows, _) = engine.execute(command(C.PAGE, "g", None, (None, 5, "")))
    assert rows == [("a", enc(2), entry[1])]


@pytest.mark.parametrize(
    "arg",
    [
        None,
        (None,),
        (None, 0, ""),
        (None, MAX_PAGE_ITEMS + 1, ""),
        (None, True, ""),
        (None, "5", ""),
        (5, 10, ""),
        ("", 10, ""),
        ("a\x00", 10, ""),
        (None, 10, 7),
        (None, 10, "x" * 513),
    ],
)
def test_bad_page_arguments_are_invalid_input_and_change_nothing(arg: Any) -> None:
    engine = ShardEngine()
    engine.execute(command(C.SET, "g", "a", enc(1)))
    ok, error = engine.execute(command(C.PAGE, "g", None, arg))
    assert not ok
    assert isinstance(error, InvalidInput)
    assert engine.execute(command(C.PAGE, "g", None, (None, 10, "")))[1][0][0][0] == "a"


def test_counts_leave_out_system_groups_unless_asked() -> None:
    engine = ShardEngine()
    engine.execute(command(C.SET, "__shardstate:x", "a", enc(1), {"system": True}))
    engine.execute(command(C.SET, "user", "a", enc(1)))
    engine.execute(command(C.SET, "user", "b", enc(1)))
    assert engine.execute(command(C.COUNTS)) == (True, [("user", 2)])
    assert engine.execute(command(C.COUNTS, None, None, None, {"system": True}))[1] == [
        ("__shardstate:x", 1),
        ("user", 2),
    ]


def test_write_with_version_option_returns_the_new_version_also_on_replay() -> None:
    engine = ShardEngine()
    opts = {"version": True, "op_id": "once"}
    ok, (old, new, version) = engine.execute(command(C.SET, "g", "a", enc(1), opts))
    assert ok
    assert old is None
    assert new == enc(1)
    assert engine.execute(command(C.ENTRY, "g", "a"))[1][1] == version
    assert engine.execute(command(C.SET, "g", "a", enc(1), opts)) == (True, (None, enc(1), version))
    ok, (old, new, v2) = engine.execute(
        command(C.UPDATE, "g", "b", [{"type": "set", "path": "x", "value": 1}], {"version": True})
    )
    assert ok
    assert v2 == version + 1
    assert pickle.loads(new) == {"x": 1}


@pytest.mark.parametrize("key", ["a", "a/b", "é:ü", "x" * 300, "💥"])
def test_cursor_round_trips(key: str) -> None:
    assert decode_cursor(encode_cursor(key)) == key


@pytest.mark.parametrize("cursor", ["", "!!!", "AA", "x" * 2000, "_w"])
def test_bad_cursors_are_invalid_input(cursor: str) -> None:
    with pytest.raises(InvalidInput):
        page_request("g", cursor=cursor)


@pytest.mark.parametrize("limit", [0, -1, MAX_PAGE_ITEMS + 1, True, 2.5])
def test_bad_limits_are_invalid_input(limit: Any) -> None:
    with pytest.raises(InvalidInput):
        page_request("g", limit=limit)
