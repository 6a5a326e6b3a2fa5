"""ShardEngine + GroupStore, driven only through command tuples (no Ray).

The stateful test compares the engine with a plain ``dict[group, dict[key, bytes]]``. For ``update``
the model uses ``apply_ops`` on its own decoded copy: that pure function is checked against an
independent reference model in test_update_ops.py, so here it only serves as the oracle for what the
engine must store (and whether the pickled result still fits).
"""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shardstate import InvalidInput, StateError, UpdateError, ValueTooLarge
from shardstate._errors import StaleShardMap
from shardstate.shards import commands as C
from shardstate.shards.commands import command
from shardstate.shards.engine import ShardEngine, canonical_dumps
from shardstate.shards.records import Entry
from shardstate.shards.store import GroupStore
from shardstate.shards.update_ops import apply_ops
from shardstate.shards.validation import DEFAULT_MAX_VALUE_SIZE


def enc(value: Any) -> bytes:
    return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def run(engine: ShardEngine, *cmds: Any) -> list[tuple[bool, Any]]:
    results = engine.execute_batch(list(cmds))
    assert len(results) == len(cmds)
    return results


def ok(result: tuple[bool, Any]) -> Any:
    assert result[0] is True, result
    return result[1]


def err(result: tuple[bool, Any], cls: type[StateError]) -> Any:
    assert result[0] is False, result
    assert type(result[1]) is cls, result
    return result[1]


def canon(x: Any) -> Any:
    """Type- and order-sensitive comparison form."""
    if isinstance(x, dict):
        return ("dict", [(k, canon(v)) for k, v in x.items()])
    if isinstance(x, (list, tuple)):
        return (type(x).__name__, [canon(v) for v in x])
    return (type(x).__name__, x)


# --------------------------------------------------------------------------------------------
# examples
# --------------------------------------------------------------------------------------------


def test_set_get_delete() -> None:
    engine = ShardEngine()
    data = enc({"total": 10})
    old, new = ok(engine.execute(command(C.SET, "orders", "o-1", data)))
    assert old is None
    assert new == data
    assert ok(engine.execute(command(C.GET, "orders", "o-1"))) == data
    data2 = enc([1, 2])
    assert ok(engine.execute(command(C.SET, "orders", "o-1", data2))) == (data, data2)
    assert ok(engine.execute(command(C.DELETE, "orders", "o-1"))) == data2
    assert ok(engine.execute(command(C.GET, "orders", "o-1"))) is None
    assert ok(engine.execute(command(C.DELETE, "orders", "o-1"))) is None
    assert ok(engine.execute(command(C.GET, "never", "seen"))) is None


def test_none_is_a_stored_value_not_absence() -> None:
    engine = ShardEngine()
    ok(engine.execute(command(C.SET, "g", "k", enc(None))))
    stored = ok(engine.execute(command(C.GET, "g", "k")))
    assert stored is not None
    assert pickle.loads(stored) is None
    assert ok(engine.execute(command(C.LIST, "g"))) == [stored]
    # an existing None is not a missing key: a path op cannot start from {}
    failed = err(
        engine.execute(command(C.UPDATE, "g", "k", [{"type": "set", "path": "a", "value": 1}])), UpdateError
    )
    assert failed.code == "not_object"
    assert ok(engine.execute(command(C.DELETE, "g", "k"))) == stored


def test_items_and_list_keep_insertion_order() -> None:
    engine = ShardEngine()
    for key, value in [("a", 1), ("b", 2), ("c", 3)]:
        ok(engine.execute(command(C.SET, "g", key, enc(value))))
    ok(engine.execute(command(C.SET, "g", "a", enc(10))))  # re-set keeps its position
    ok(engine.execute(command(C.UPDATE, "g", "b", [{"type": "set", "path": "", "value": 20}])))
    assert [(k, pickle.loads(v)) for k, v in ok(engine.execute(command(C.ITEMS, "g")))] == [
        ("a", 10),
        ("b", 20),
        ("c", 3),
    ]
    ok(engine.execute(command(C.DELETE, "g", "a")))
    ok(engine.execute(command(C.SET, "g", "a", enc(11))))  # delete + set moves it to the end
    ok(engine.execute(command(C.UPDATE, "g", "d", [{"type": "increment", "path": "n"}])))  # new key: at end
    items = ok(engine.execute(command(C.ITEMS, "g")))
    assert [k for k, _ in items] == ["b", "c", "a", "d"]
    assert [pickle.loads(v) for v in ok(engine.execute(command(C.LIST, "g")))] == [20, 3, 11, {"n": 1}]
    assert ok(engine.execute(command(C.ITEMS, "empty"))) == []
    assert ok(engine.execute(command(C.LIST, "empty"))) == []


def test_clear_returns_count_and_removes_group() -> None:
    engine = ShardEngine()
    for key, value in [("a", None), ("b", 0), ("c", ""), ("d", {})]:  # every item, whatever its value
        ok(engine.execute(command(C.SET, "g", key, enc(value))))
    ok(engine.execute(command(C.SET, "other", "x", enc(1))))
    assert ok(engine.execute(command(C.CLEAR, "g"))) == 4
    assert ok(engine.execute(command(C.GROUPS))) == ["other"]
    assert ok(engine.execute(command(C.LIST, "g"))) == []
    assert ok(engine.execute(command(C.CLEAR, "g"))) == 0
    assert ok(engine.execute(command(C.CLEAR, "never"))) == 0
    assert ok(engine.execute(command(C.GET, "other", "x"))) == enc(1)


def test_groups_sorted_and_empty_groups_vanish() -> None:
    engine = ShardEngine()
    for group in ["b", "a:1", "c", "a", "B"]:
        ok(engine.execute(command(C.SET, group, "k", enc(group))))
    assert ok(engine.execute(command(C.GROUPS))) == ["B", "a", "a:1", "b", "c"]
    ok(engine.execute(command(C.DELETE, "a", "k")))
    ok(engine.execute(command(C.DELETE, "c", "missing")))
    assert ok(engine.execute(command(C.GROUPS))) == ["B", "a:1", "b", "c"]
    # a failed update on a missing key creates no group
    err(engine.execute(command(C.UPDATE, "z", "k", [{"type": "frob"}])), UpdateError)
    assert ok(engine.execute(command(C.GROUPS))) == ["B", "a:1", "b", "c"]


def test_update_returns_old_and_new_bytes() -> None:
    engine = ShardEngine()
    before = enc({"count": 1, "log": []})
    ok(engine.execute(command(C.SET, "g", "k", before)))
    old, new = ok(
        engine.execute(
            command(
                C.UPDATE,
                "g",
                "k",
                [
                    {"type": "increment", "path": "count", "by": 2},
                    {"type": "append", "path": "log", "value": "x"},
                ],
            )
        )
    )
    assert old == before
    assert isinstance(new, bytes)
    assert pickle.loads(new) == {"count": 3, "log": ["x"]}
    assert ok(engine.execute(command(C.GET, "g", "k"))) == new


def test_update_of_missing_key_starts_from_empty_dict() -> None:
    engine = ShardEngine()
    old, new = ok(engine.execute(command(C.UPDATE, "g", "k", [{"type": "increment", "path": "n"}])))
    assert old is None
    assert pickle.loads(new) == {"n": 1}
    old, new = ok(engine.execute(command(C.UPDATE, "g", "root", [{"type": "append", "value": "s"}])))
    assert old is None
    assert pickle.loads(new) == "s"


@pytest.mark.parametrize(
    ("stored", "raw_ops", "code", "index"),
    [
        (
            {"s": "x", "n": 1},
            [{"type": "increment", "path": "n"}, {"type": "increment", "path": "s"}],
            "not_number",
            1,
        ),
        ({"s": "x"}, [{"type": "set", "path": ["s", "t"], "value": 1}], "not_object", 0),
        ({"n": 1}, [{"type": "append", "path": "n", "value": 1}], "type_mismatch", 0),
        ({"n": 1}, [{"type": "set", "path": "n", "value": {1, 2}}], "not_json", 0),
        ({"n": 1}, [{"type": "increment", "path": "n"}, {"type": "frob"}], "bad_op", 1),
        ({"n": 1}, [], "bad_op", 0),
        ({"n": 1}, "increment", "bad_op", 0),
        ({"n": 1}, None, "bad_op", 0),
    ],
)
def test_failed_update_leaves_stored_bytes_identical(
    stored: Any, raw_ops: Any, code: str, index: int
) -> None:
    engine = ShardEngine()
    data = enc(stored)
    ok(engine.execute(command(C.SET, "g", "k", data)))
    snapshot = {g: dict(keys) for g, keys in engine.store.groups.items()}
    failed = err(engine.execute(command(C.UPDATE, "g", "k", raw_ops)), UpdateError)
    assert (failed.op_index, failed.code) == (index, code)
    assert engine.store.groups == snapshot
    assert ok(engine.execute(command(C.GET, "g", "k"))) == data


def test_update_of_unreadable_stored_bytes_is_not_json() -> None:
    engine = ShardEngine()
    ok(engine.execute(command(C.SET, "g", "k", b"not a pickle")))
    failed = err(
        engine.execute(command(C.UPDATE, "g", "k", [{"type": "increment", "path": "n"}])), UpdateError
    )
    assert (failed.op_index, failed.code) == (0, "not_json")
    assert ok(engine.execute(command(C.GET, "g", "k"))) == b"not a pickle"


def test_value_size_limit_on_set() -> None:
    engine = ShardEngine(max_value_size=100)
    assert ok(engine.execute(command(C.SET, "g", "k", b"x" * 100)))[1] == b"x" * 100  # exactly the limit
    too_big = err(engine.execute(command(C.SET, "g", "k", b"y" * 101)), ValueTooLarge)
    assert (too_big.size, too_big.limit) == (101, 100)
    assert ok(engine.execute(command(C.GET, "g", "k"))) == b"x" * 100
    err(engine.execute(command(C.SET, "g", "new", b"y" * 101)), ValueTooLarge)
    assert ok(engine.execute(command(C.GET, "g", "new"))) is None
    assert ShardEngine().max_value_size == DEFAULT_MAX_VALUE_SIZE


def test_value_size_limit_on_update_result() -> None:
    engine = ShardEngine(max_value_size=200)
    data = enc({"s": "a" * 100})
    ok(engine.execute(command(C.SET, "g", "k", data)))
    grow = [{"type": "append", "path": "s", "value": "b" * 100}]
    too_big = err(engine.execute(command(C.UPDATE, "g", "k", grow)), ValueTooLarge)
    assert too_big.limit == 200
    assert too_big.size == len(canonical_dumps({"s": "a" * 100 + "b" * 100}))
    assert ok(engine.execute(command(C.GET, "g", "k"))) == data
    err(
        engine.execute(command(C.UPDATE, "g", "fresh", [{"type": "set", "path": "s", "value": "c" * 300}])),
        ValueTooLarge,
    )
    assert ok(engine.execute(command(C.GROUPS))) == ["g"]
    assert [k for k, _ in ok(engine.execute(command(C.ITEMS, "g")))] == ["k"]


LONG = "é" * 257  # 257 characters, 514 UTF-8 bytes
EDGE = "é" * 256  # 512 UTF-8 bytes: still valid

BAD_COMMANDS = [
    # (command, expected class)
    (["get", "g", "k", None, None], InvalidInput),
    (None, InvalidInput),
    ("get", InvalidInput),
    (("get", "g", "k"), InvalidInput),
    (("get", "g", "k", None, None, None), InvalidInput),
    ((), InvalidInput),
    (("frob", "g", "k", None, None), InvalidInput),
    (("GET", "g", "k", None, None), InvalidInput),
    ((None, "g", "k", None, None), InvalidInput),
    ((3, "g", "k", None, None), InvalidInput),
    ((["get"], "g", "k", None, None), InvalidInput),
    (command(C.GET, None, "k"), InvalidInput),
    (command(C.GET, 1, "k"), InvalidInput),
    (command(C.LIST, b"g"), InvalidInput),
    (command(C.ITEMS, ""), InvalidInput),
    (command(C.CLEAR, "g\x00"), InvalidInput),
    (command(C.SET, LONG, "k", b"v"), InvalidInput),
    (command(C.UPDATE, "\ud800", "k", [{"type": "increment", "path": "n"}]), InvalidInput),
    (command(C.GET, "g", None), InvalidInput),
    (command(C.DELETE, "g", 7), InvalidInput),
    (command(C.SET, "g", "", b"v"), InvalidInput),
    (command(C.SET, "g", "k\x00", b"v"), InvalidInput),
    (command(C.SET, "g", LONG, b"v"), InvalidInput),
    (command(C.UPDATE, "g", "a" * 513, [{"type": "increment", "path": "n"}]), InvalidInput),
    (command(C.GET, "g", "\udfff"), InvalidInput),
    (command(C.SET, "g", "k", "not bytes"), InvalidInput),
    (command(C.SET, "g", "k", bytearray(b"v")), InvalidInput),
    (command(C.SET, "g", "k", memoryview(b"v")), InvalidInput),
    (command(C.SET, "g", "k", None), InvalidInput),
    (command(C.SET, "g", "k", {"a": 1}), InvalidInput),
    (command(C.SET, "g", "k", b"x" * 65), ValueTooLarge),
    (command(C.UPDATE, "g", "k", [{"type": "set", "path": "s", "value": "x" * 100}]), ValueTooLarge),
    (command(C.UPDATE, "g", "k", [{"type": "frob"}]), UpdateError),
]


@pytest.mark.parametrize(("bad", "cls"), BAD_COMMANDS)
def test_bad_command_is_its_own_error_and_the_batch_goes_on(bad: Any, cls: type[StateError]) -> None:
    engine = ShardEngine(max_value_size=64)
    ok(engine.execute(command(C.SET, "g", "k", enc({"n": 1}))))
    results = run(
        engine,
        bad,
        command(C.SET, "g", "after", enc(1)),
        bad,
        command(C.GET, "g", "after"),
        command(C.UPDATE, "g", "k", [{"type": "increment", "path": "n"}]),
    )
    first = err(results[0], cls)
    err(results[2], cls)
    assert isinstance(first, StateError)
    assert first.retriable is False
    ok(results[1])
    assert ok(results[3]) == enc(1)
    assert pickle.loads(ok(results[4])[1]) == {"n": 2}
    assert list(engine.store.groups) == ["g"]
    assert list(engine.store.groups["g"]) == ["k", "after"]


def test_name_boundaries_in_commands() -> None:
    engine = ShardEngine()
    for name in [EDGE, "a" * 512, "😀" * 128, "x"]:
        ok(engine.execute(command(C.SET, name, name, enc(name))))
        assert pickle.loads(ok(engine.execute(command(C.GET, name, name)))) == name
    err(engine.execute(command(C.SET, "😀" * 128 + "a", "k", enc(1))), InvalidInput)


def test_owns_false_gives_stale_shard_map() -> None:
    asked: list[str] = []

    def owns(group_id: str) -> bool:
        asked.append(group_id)
        return group_id.startswith("mine")

    engine = ShardEngine(owns=owns)
    ok(engine.execute(command(C.SET, "mine", "k", enc(1))))
    for kind in [C.SET, C.GET, C.DELETE, C.LIST, C.ITEMS, C.CLEAR, C.UPDATE]:
        arg = enc(2) if kind == C.SET else [{"type": "increment", "path": "n"}] if kind == C.UPDATE else None
        stale = err(engine.execute(command(kind, "theirs", "k", arg)), StaleShardMap)
        assert stale.retriable is True
    assert "theirs" in asked
    assert "mine" in asked
    asked.clear()
    assert ok(engine.execute(command(C.GROUPS))) == ["mine"]  # not a grouped command: no owner check
    assert asked == []
    # an invalid name is reported as such before ownership is asked
    err(engine.execute(command(C.GET, "", "k")), InvalidInput)
    assert asked == []
    assert ok(engine.execute(command(C.GET, "mine", "k"))) == enc(1)


def test_an_exception_in_a_command_becomes_invalid_input() -> None:
    def owns(group_id: str) -> bool:
        if group_id == "boom":
            raise RuntimeError("owner lookup failed")
        return True

    engine = ShardEngine(owns=owns)
    results = run(engine, command(C.GET, "boom", "k"), command(C.SET, "fine", "k", enc(1)))
    assert "RuntimeError" in err(results[0], InvalidInput).message
    ok(results[1])


def test_a_very_deep_update_path_fails_cleanly() -> None:
    """Deep enough to exhaust Python's recursion: an error for this call, nothing stored, engine fine."""
    engine = ShardEngine()
    ok(engine.execute(command(C.SET, "g", "k", enc({"n": 1}))))
    for depth in (600, 3000):
        results = run(
            engine,
            command(C.UPDATE, "g", "k", [{"type": "set", "path": ["a"] * depth, "value": 1}]),
            command(C.UPDATE, "g", "k", [{"type": "increment", "path": "n"}]),
        )
        assert results[0][0] is False
        assert isinstance(results[0][1], StateError)
        assert pickle.loads(ok(results[1])[1])["n"] == (2 if depth == 600 else 3)


def test_group_store_directly() -> None:
    store = GroupStore()
    e1, e2, e3 = (Entry(d, 1, 0.0, None) for d in (b"1", b"2", b"3"))
    assert len(store) == 0
    assert store.group_ids() == []
    assert store.put("g", "a", e1) is None
    assert store.put("g", "b", e2) is None
    assert store.put("g", "a", e3) == e1
    assert store.get("g", "a") == e3
    assert store.get("g", "z") is None
    assert store.get("h", "a") is None
    assert store.entries("g") == [("a", e3), ("b", e2)]
    assert len(store) == 2
    assert store.delete("g", "z") is None
    assert store.delete("h", "z") is None
    assert store.delete("g", "a") == e3
    assert store.delete("g", "b") == e2
    assert store.group_ids() == []
    assert store.groups == {}
    store.put("g", "a", e1)
    assert store.clear("g") == [("a", e1)]
    assert store.clear("g") == []


def test_update_treats_shared_sub_objects_as_separate_json_fields() -> None:
    engine = ShardEngine()
    shared = [1]
    ok(engine.execute(command(C.SET, "g", "k", enc({"x": shared, "y": shared}))))
    _old, new = ok(engine.execute(command(C.UPDATE, "g", "k", [{"type": "append", "path": "x", "value": 2}])))
    assert pickle.loads(new) == {"x": [1, 2], "y": [1]}


# --------------------------------------------------------------------------------------------
# known bugs (see the unit-test report); strict, so a fix shows up as XPASS and fails the run
# --------------------------------------------------------------------------------------------


def test_update_keeps_untouched_fields_that_only_cloudpickle_can_pickle() -> None:
    engine = ShardEngine()
    ok(engine.execute(command(C.SET, "g", "k", enc({"fn": lambda x: x + 1, "n": 0}))))
    _old, new = ok(engine.execute(command(C.UPDATE, "g", "k", [{"type": "increment", "path": "n"}])))
    value = pickle.loads(new)
    assert value["n"] == 1
    assert value["fn"](1) == 2


# --------------------------------------------------------------------------------------------
# stateful: the engine against a dict-of-dicts model
# --------------------------------------------------------------------------------------------

LIMIT = 300
GROUP = st.sampled_from(["g1", "g2", "g3"])
ANY_GROUP = st.sampled_from(["g1", "g2", "g3", "foreign"])  # "foreign" is owned by another shard
KEY = st.sampled_from(["k1", "k2", "k3"])
FIELD = st.sampled_from(["a", "b", "s"])
SCALAR = (
    st.none()
    | st.booleans()
    | st.integers(-50, 50)
    | st.floats(-10, 10, allow_nan=False)
    | st.text("xy", max_size=3)
)
NESTED = st.recursive(
    SCALAR, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(FIELD, kids, max_size=3), max_leaves=6
)
JSON = st.sampled_from([SCALAR, NESTED, NESTED]).flatmap(lambda strategy: strategy)
DICT = st.dictionaries(FIELD, JSON, max_size=3)
VALUE = (
    DICT
    | DICT
    | DICT
    | DICT
    | JSON
    | st.tuples(st.integers(0, 3))
    | st.integers(LIMIT - 40, LIMIT + 10).map(lambda n: "v" * n)
)
PATH = FIELD | st.lists(FIELD, max_size=2)
GOOD_OP = st.one_of(
    st.builds(lambda p, v: {"type": "set", "path": p, "value": v}, PATH, JSON),
    st.builds(
        lambda p, v: {"type": "merge", "path": p, "value": v},
        PATH | st.none(),
        st.dictionaries(FIELD, JSON, max_size=2),
    ),
    st.builds(lambda p, b: {"type": "increment", "path": p, "by": b}, PATH, st.integers(-3, 3)),
    st.builds(lambda p: {"type": "decrement", "path": p}, PATH),
    st.builds(lambda p, v: {"type": "append", "path": p, "value": v}, PATH | st.just(""), JSON),
    st.builds(
        lambda p, n: {"type": "append", "path": p, "value": "w" * n}, PATH | st.just(""), st.integers(40, 120)
    ),
    st.builds(lambda p, n: {"type": "set", "path": p, "value": "z" * n}, PATH, st.integers(100, LIMIT)),
    st.builds(lambda p: {"type": "remove", "path": p}, FIELD | st.lists(FIELD, min_size=1, max_size=2)),
)
BAD_OP = st.builds(lambda: {"type": "frob"}) | st.builds(
    lambda: {"type": "set", "path": "a", "value": {1, 2}}
)
OPS = st.one_of(
    st.lists(GOOD_OP, min_size=1, max_size=3),
    st.lists(GOOD_OP, min_size=1, max_size=2),
    st.lists(GOOD_OP | BAD_OP, min_size=1, max_size=4),
    st.sampled_from([[], "ops", None]),
)
BAD = st.sampled_from([cmd for cmd, cls in BAD_COMMANDS if cls is InvalidInput])


def _good_command() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.builds(lambda g, k, v: command(C.SET, g, k, enc(v)), ANY_GROUP, KEY, VALUE),
        st.builds(lambda g, k: command(C.GET, g, k), ANY_GROUP, KEY),
        st.builds(lambda g, k: command(C.DELETE, g, k), ANY_GROUP, KEY),
        st.builds(lambda g, k, o: command(C.UPDATE, g, k, o), ANY_GROUP, KEY, OPS),
        st.builds(lambda g: command(C.LIST, g), ANY_GROUP),
        st.builds(lambda g: command(C.ITEMS, g), ANY_GROUP),
        st.builds(lambda g: command(C.CLEAR, g), ANY_GROUP),
        st.just(command(C.GROUPS)),
    )


COMMAND = _good_command() | BAD


class EngineMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.engine = ShardEngine(owns=lambda g: g != "foreign", max_value_size=LIMIT)
        self.model: dict[str, dict[str, bytes]] = {}

    # -- the model ----------------------------------------------------------------------------
    def check(self, cmd: Any, result: tuple[bool, Any]) -> None:
        """Assert ``result`` is what the model says ``cmd`` gives, and advance the model."""
        if any(cmd is bad for bad, _cls in BAD_COMMANDS):
            err(result, InvalidInput)
            return
        kind, group, key, arg, _opts = cmd
        if kind != C.GROUPS and group == "foreign":
            err(result, StaleShardMap)
            return
        keys = self.model.get(group, {})
        if kind == C.SET:
            if len(arg) > LIMIT:
                too_big = err(result, ValueTooLarge)
                assert (too_big.size, too_big.limit) == (len(arg), LIMIT)
                return
            assert ok(result) == (keys.get(key), arg)
            self.model.setdefault(group, {})[key] = arg
        elif kind == C.GET:
            assert ok(result) == keys.get(key)
        elif kind == C.DELETE:
            assert ok(result) == keys.pop(key, None)
            if group in self.model and not keys:
                del self.model[group]
        elif kind == C.LIST:
            assert ok(result) == list(keys.values())
        elif kind == C.ITEMS:
            assert ok(result) == list(keys.items())
        elif kind == C.CLEAR:
            assert ok(result) == len(self.model.pop(group, {}))
        elif kind == C.GROUPS:
            assert ok(result) == sorted(self.model)
        else:
            assert kind == C.UPDATE
            self.check_update(group, key, arg, result)

    def check_update(self, group: str, key: str, raw_ops: Any, result: tuple[bool, Any]) -> None:
        old = self.model.get(group, {}).get(key)
        current = None if old is None else pickle.loads(old)
        try:
            expected = apply_ops(current, raw_ops, exists=old is not None)
        except UpdateError as exc:
            expected = exc
        if isinstance(expected, UpdateError):
            failed = err(result, UpdateError)
            assert (failed.op_index, failed.code) == (expected.op_index, expected.code)
            return
        size = len(canonical_dumps(expected))
        if size > LIMIT:
            too_big = err(result, ValueTooLarge)
            assert (too_big.size, too_big.limit) == (size, LIMIT)
            return
        got_old, got_new = ok(result)
        assert got_old == old
        assert got_new == canonical_dumps(expected)
        assert canon(pickle.loads(got_new)) == canon(expected)
        self.model.setdefault(group, {})[key] = got_new

    # -- rules --------------------------------------------------------------------------------
    @rule(cmd=COMMAND)
    def one(self, cmd: Any) -> None:
        self.check(cmd, self.engine.execute(cmd))

    @rule(cmds=st.lists(COMMAND, min_size=2, max_size=5))
    def batch(self, cmds: list[Any]) -> None:
        for cmd, result in zip(cmds, run(self.engine, *cmds), strict=True):
            self.check(cmd, result)

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def update_existing(self, data: st.DataObject) -> None:
        group = data.draw(st.sampled_from(sorted(self.model)))
        key = data.draw(st.sampled_from(list(self.model[group])))
        cmd = command(C.UPDATE, group, key, data.draw(OPS))
        self.check(cmd, self.engine.execute(cmd))

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data(), size=st.integers(60, 200))
    def grow_existing(self, data: st.DataObject, size: int) -> None:
        """Push an existing value towards (and past) the size limit."""
        group = data.draw(st.sampled_from(sorted(self.model)))
        key = data.draw(st.sampled_from(list(self.model[group])))
        path = data.draw(st.sampled_from(["s", "", ["a", "s"]]))
        cmd = command(C.UPDATE, group, key, [{"type": "append", "path": path, "value": "w" * size}])
        self.check(cmd, self.engine.execute(cmd))

    @invariant()
    def same_contents(self) -> None:
        groups = self.engine.store.groups
        assert all(groups.values())  # no empty groups
        assert sorted(groups) == sorted(self.model)
        for group, keys in self.model.items():
            assert [(k, e.data) for k, e in groups[group].items()] == list(keys.items())


TestEngineMachine = EngineMachine.TestCase
TestEngineMachine.settings = settings(max_examples=60, stateful_step_count=25, deadline=None)


def test_canonical_dumps_depends_on_the_value_only_and_handles_cycles() -> None:
    text = "".join(["x"] * 50)
    shared = {"a": text, "b": text}
    separate = {"a": "".join(["x"] * 50), "b": "".join(["x"] * 50)}
    assert pickle.dumps(shared) != pickle.dumps(separate)  # plain pickle writes a shared str once
    assert canonical_dumps(shared) == canonical_dumps(separate)
    assert pickle.loads(canonical_dumps(shared)) == shared
    cycle: list[Any] = []
    cycle.append(cycle)
    back = pickle.loads(canonical_dumps({"c": cycle}))
    assert back["c"][0] is back["c"]
    assert canonical_dumps({"n": 1}) == canonical_dumps({"n": 1})  # the pickler is reusable after a fallback


def fan_in_op(i: int) -> list[dict[str, Any]]:
    return [{"type": "merge", "path": "fields", "value": {f"t{i}": i}}, {"type": "increment", "path": "done"}]


def test_repeated_updates_reuse_the_decoded_value_and_store_what_a_fresh_decode_would(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    decoded: list[int] = []
    real_loads = pickle.loads

    def counting_loads(data: bytes, /, **kwargs: Any) -> Any:
        decoded.append(len(data))
        return real_loads(data, **kwargs)

    engine = ShardEngine()
    ok(engine.execute(command(C.SET, "g", "doc", enc({"fields": {}, "done": 0}))))
    monkeypatch.setattr("shardstate.shards.engine.pickle.loads", counting_loads)
    for i in range(50):  # one update per batch, as in a fan-in
        _old, new = ok(engine.execute(command(C.UPDATE, "g", "doc", fan_in_op(i))))
    assert len(decoded) == 1  # only the value the set stored was unpickled
    assert new == canonical_dumps({"fields": {f"t{i}": i for i in range(50)}, "done": 50})
    fresh = ShardEngine()  # decodes the stored bytes before every update
    ok(fresh.execute(command(C.SET, "g", "doc", enc({"fields": {}, "done": 0}))))
    for i in range(50):
        fresh._decoded.clear()
        _old, again = ok(fresh.execute(command(C.UPDATE, "g", "doc", fan_in_op(i))))
    assert len(decoded) == 51
    assert again == new
