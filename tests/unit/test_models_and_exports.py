"""Result models, the public namespace, and the ``shardstate.ops`` helpers."""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle
import pydantic
import pytest
import ray

import shardstate
from shardstate import SetResult, StateItem, UpdateError, ops
from shardstate.shards.update_ops import apply_ops


def test_unit_layer_cannot_start_ray() -> None:
    with pytest.raises(RuntimeError, match="must not start Ray"):
        ray.init()


# -- SetResult / StateItem ----------------------------------------------------------------------


def test_set_result_unpacks_and_indexes() -> None:
    result = SetResult(old_value={"n": 1}, new_value={"n": 2})
    old, new = result
    assert (old, new) == ({"n": 1}, {"n": 2})
    assert result["new_value"] == {"n": 2}
    assert result["old_value"] == {"n": 1}
    assert result[0] == {"n": 1}
    assert result[1] == {"n": 2}
    assert len(result) == 2
    assert list(result) == [{"n": 1}, {"n": 2}]
    assert tuple(result) == ({"n": 1}, {"n": 2})
    for bad in ["value", 2, -1, "new"]:
        with pytest.raises(KeyError):
            result[bad]


def test_set_result_is_still_a_pydantic_model() -> None:
    result = SetResult(old_value=None, new_value=[1, {"a": 2}])
    assert result.model_dump() == {"old_value": None, "new_value": [1, {"a": 2}]}
    assert result.model_dump_json() == '{"old_value":null,"new_value":[1,{"a":2}]}'
    assert SetResult.model_validate({"old_value": 1, "new_value": 2}) == SetResult(old_value=1, new_value=2)
    assert SetResult(old_value=1, new_value=2) != SetResult(old_value=2, new_value=1)
    assert SetResult() == SetResult(old_value=None, new_value=None)
    assert "new_value" in repr(result)
    with pytest.raises(pydantic.ValidationError):
        result.new_value = 3  # frozen
    # any Python value is allowed (Python clients store anything cloudpickle can)
    odd = SetResult(old_value={1, 2}, new_value=(1, "x"))
    assert odd[0] == {1, 2}
    assert odd.new_value == (1, "x")


def test_results_pickle() -> None:
    result = SetResult(old_value=1, new_value={"a": [1]})
    item = StateItem(key="k", value=[1, 2])
    for dumps in (pickle.dumps, cloudpickle.dumps):
        assert pickle.loads(dumps(result)) == result
        assert pickle.loads(dumps(item)) == item


def test_state_item() -> None:
    item = StateItem(key="o-1", value={"total": 10})
    assert (item.key, item.value) == ("o-1", {"total": 10})
    assert item.model_dump() == {"key": "o-1", "value": {"total": 10}}
    assert StateItem(key="k").value is None
    with pytest.raises(pydantic.ValidationError):
        StateItem(value=1)  # type: ignore[call-arg]
    with pytest.raises(pydantic.ValidationError):
        StateItem(key=1, value=1)
    with pytest.raises(pydantic.ValidationError):
        item.key = "other"  # frozen


# -- the public namespace ---------------------------------------------------------------------


@pytest.mark.parametrize("module", [shardstate, shardstate.ops], ids=["shardstate", "shardstate.ops"])
def test_all_is_sorted_and_complete(module: Any) -> None:
    names = module.__all__
    assert names == sorted(names)
    assert len(set(names)) == len(names)
    missing = [name for name in names if not hasattr(module, name)]
    assert missing == []


def test_contract_names_are_exported() -> None:
    for name in [
        "connect",
        "connect_async",
        "shutdown",
        "StateClient",
        "AsyncStateClient",
        "SetResult",
        "StateItem",
        "StateError",
        "InvalidInput",
        "UpdateError",
        "ValueTooLarge",
        "ConflictError",
        "Unavailable",
        "ops",
        "UpdateOp",
    ]:
        assert name in shardstate.__all__, name
        assert getattr(shardstate, name) is not None
    assert isinstance(shardstate.__version__, str)


# -- shardstate.ops -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "wire"),
    [
        (ops.increment("count"), {"type": "increment", "path": "count", "by": 1}),
        (ops.increment(["stats", "done"], 2.5), {"type": "increment", "path": ["stats", "done"], "by": 2.5}),
        (ops.decrement("count"), {"type": "decrement", "path": "count", "by": 1}),
        (ops.decrement("count", by=3), {"type": "decrement", "path": "count", "by": 3}),
        (ops.set("a.b", {"x": 1}), {"type": "set", "path": "a.b", "value": {"x": 1}}),
        (ops.set("", None), {"type": "set", "path": "", "value": None}),
        (ops.set([], [1]), {"type": "set", "path": [], "value": [1]}),
        (ops.merge(None, {"k": 1}), {"type": "merge", "value": {"k": 1}}),
        (ops.merge("fields", {"task-7": 42}), {"type": "merge", "path": "fields", "value": {"task-7": 42}}),
        (ops.append(None, "x"), {"type": "append", "value": "x"}),
        (ops.append("log", "task-7"), {"type": "append", "path": "log", "value": "task-7"}),
        (ops.remove(["a", "b"]), {"type": "remove", "path": ["a", "b"]}),
        (ops.remove("a"), {"type": "remove", "path": "a"}),
    ],
)
def test_helpers_build_wire_dicts(op: Any, wire: dict[str, Any]) -> None:
    got = op.to_wire()
    assert got == wire
    assert list(got) == list(wire) or set(got) == set(wire)
    assert "path" in got or op.path is None
    assert type(got.get("by")) is type(wire.get("by"))
    assert ops.parse(wire) == op
    assert ops.parse(got).to_wire() == got


@pytest.mark.parametrize(
    ("wire", "cls"),
    [
        ({"type": "set", "path": "a", "value": 1}, ops.SetOp),
        ({"type": "merge", "value": {}}, ops.MergeOp),
        ({"type": "increment", "path": "c"}, ops.IncrementOp),
        ({"type": "decrement", "path": ["a", "b"], "by": 0.5}, ops.DecrementOp),
        ({"type": "append", "value": 1}, ops.AppendOp),
        ({"type": "remove", "path": "a"}, ops.RemoveOp),
    ],
)
def test_parse_dispatches_on_type(wire: dict[str, Any], cls: type) -> None:
    parsed = ops.parse(wire)
    assert type(parsed) is cls
    assert ops.update_op_adapter.validate_python(wire) == parsed
    assert parsed.type == wire["type"]


@pytest.mark.parametrize(
    "wire",
    [
        {"type": "frob", "path": "a"},
        {"path": "a", "value": 1},
        {"type": "set", "value": 1},  # path is required
        {"type": "increment"},
        {"type": "remove"},
        {"type": "merge", "value": [1]},  # merge needs a dict
        {"type": "merge", "value": {1: "x"}},  # with str keys
        {"type": "set", "path": "a", "value": 1, "by": 2},  # extra field
        {"type": "increment", "path": "a", "by": [1]},
        {"type": "increment", "path": 5},
        {"type": "increment", "path": ["a", 1]},
    ],
)
def test_parse_rejects_bad_wire_dicts(wire: dict[str, Any]) -> None:
    with pytest.raises(pydantic.ValidationError):
        ops.parse(wire)


def test_op_models_are_frozen() -> None:
    op = ops.increment("n")
    with pytest.raises(pydantic.ValidationError):
        op.by = 2  # type: ignore[misc]


@pytest.mark.parametrize("by", [True, False, "1", "2.5"])
def test_by_is_as_strict_as_the_wire_parser(by: Any) -> None:
    with pytest.raises(UpdateError):  # what the shard says about this wire dict
        apply_ops({}, [{"type": "increment", "path": "n", "by": by}])
    with pytest.raises(pydantic.ValidationError):
        ops.parse({"type": "increment", "path": "n", "by": by})
    with pytest.raises(pydantic.ValidationError):
        ops.increment("n", by)
