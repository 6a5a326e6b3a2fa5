"""Property tests of ``apply_ops`` / ``parse_op(s)`` against an independent reference model.

The reference model below is a deliberately plain re-reading of CONTRACT.md "Atomic updates":
it checks every op first (all or nothing), then applies them one by one on a deep copy, rebuilding
each container it changes, and reports a failure as ``RefError(op_index, code)``. The source must
agree with it on every result, every failing ``op_index`` and every ``code``, and must never change
the caller's value or ops.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from shardstate import UpdateError, ops
from shardstate.shards.update_ops import OP_TYPES, apply_ops, parse_op, parse_ops

# --------------------------------------------------------------------------------------------
# reference model
# --------------------------------------------------------------------------------------------

KINDS = ("set", "merge", "increment", "decrement", "append", "remove")
PATH_REQUIRED = {"set", "increment", "decrement", "remove"}
EXTRA_FIELDS = {
    "set": {"value"},
    "merge": {"value"},
    "append": {"value"},
    "increment": {"by"},
    "decrement": {"by"},
    "remove": set(),
}


class RefError(Exception):
    """The model's failure: which op and why."""

    def __init__(self, index: int, code: str) -> None:
        super().__init__(index, code)
        self.index = index
        self.code = code


class _Absent:
    """A missing key or field (the model's own sentinel)."""

    def __repr__(self) -> str:
        return "<absent>"


ABSENT = _Absent()

#: Kept as a switch for the model: True would model a ``remove`` on a missing key leaving the key
#: "missing" (an old bug, see ``test_remove_on_a_missing_key_is_like_two_updates``); the contract says
#: a missing key starts as {}, so it is False.
REMOVE_KEEPS_A_MISSING_KEY_MISSING = False


def json_like(x: Any) -> bool:
    if x is None or type(x) in (bool, int, float, str):
        return True
    if type(x) is list:
        return all(json_like(v) for v in x)
    if type(x) is dict:
        return all(type(k) is str and json_like(v) for k, v in x.items())
    return False


def is_num(x: Any) -> bool:
    return type(x) in (int, float)


def finite_num(x: Any) -> bool:
    if type(x) is int:
        return True
    return type(x) is float and x == x and x not in (math.inf, -math.inf)


def tree_copy(x: Any) -> Any:
    """A copy that shares no mutable container with ``x``."""
    if isinstance(x, dict):
        return {k: tree_copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [tree_copy(v) for v in x]
    return x


def ref_check(raw: Any, i: int) -> tuple[str, list[str], Any]:
    """Validate one wire op; return (kind, steps, operand)."""
    if not isinstance(raw, dict):
        raise RefError(i, "bad_op")
    kind = raw.get("type")
    if not isinstance(kind, str) or kind not in KINDS:
        raise RefError(i, "bad_op")
    allowed = {"type", "path"} | EXTRA_FIELDS[kind]
    if any(name not in allowed for name in raw):
        raise RefError(i, "bad_op")
    path = raw.get("path")
    if path is None:
        if kind in PATH_REQUIRED:
            raise RefError(i, "bad_op")
        steps: list[str] = []
    elif isinstance(path, str):
        steps = [] if path == "" else [path]
    elif isinstance(path, (list, tuple)) and all(isinstance(s, str) for s in path):
        steps = list(path)
    else:
        raise RefError(i, "bad_op")
    if kind in ("increment", "decrement"):
        by = raw["by"] if "by" in raw else 1
        if not finite_num(by):
            raise RefError(i, "bad_op")
        return kind, steps, by
    if kind == "remove":
        return kind, steps, None
    if "value" not in raw:
        raise RefError(i, "bad_op")
    value = raw["value"]
    if not json_like(value):
        raise RefError(i, "not_json")
    if kind == "merge" and type(value) is not dict:
        raise RefError(i, "not_object")
    return kind, steps, value


def ref_leaf(kind: str, cur: Any, arg: Any, i: int, path_len: int) -> Any:
    """The new value of a target that currently is ``cur`` (maybe ABSENT); ``path_len`` 0: the whole value."""
    if kind == "set":
        return tree_copy(arg)
    if kind == "remove":  # a remove at "" / []: the value becomes None
        assert path_len == 0
        return None
    if kind in ("increment", "decrement"):
        base = 0 if cur is ABSENT else cur
        if not is_num(base):
            raise RefError(i, "not_number")
        return base + arg if kind == "increment" else base - arg
    if kind == "merge":
        if cur is ABSENT:
            base = {}
        elif isinstance(cur, dict):
            base = cur
        elif path_len > 0:  # iii's walk_or_create: a non-dict target at a path becomes {}
            base = {}
        else:
            raise RefError(i, "not_object")
        return {**base, **tree_copy(arg)}
    assert kind == "append"
    if cur is ABSENT and path_len >= 2:  # a nested path: a missing leaf always starts a list
        return [tree_copy(arg)]
    if cur is ABSENT or cur is None:
        return arg if isinstance(arg, str) else [tree_copy(arg)]
    if isinstance(cur, list):
        return [*cur, tree_copy(arg)]
    if isinstance(cur, str) and isinstance(arg, str):
        return cur + arg
    raise RefError(i, "type_mismatch")


def ref_step(node: Any, kind: str, steps: list[str], arg: Any, i: int, path_len: int) -> Any:
    """Apply one op at ``steps`` below ``node``; return the new node (``node`` is not touched).

    ``path_len`` is the length of the op's whole path, so ``path_len - len(steps)`` is the depth.
    """
    if not steps:
        return ref_leaf(kind, node, arg, i, path_len)
    if node is ABSENT and kind == "remove" and REMOVE_KEEPS_A_MISSING_KEY_MISSING:
        return ABSENT
    if node is ABSENT:
        node = {}
    at_root = len(steps) == path_len
    if not isinstance(node, dict):
        # merge and append walk like iii's walk_or_create: a non-dict step becomes {}; append
        # still needs the value itself to be a dict
        if kind == "merge" or (kind == "append" and not at_root):
            node = {}
        else:
            raise RefError(i, "not_object")
    head, rest = steps[0], steps[1:]
    out = dict(node)
    if kind == "remove" and not rest:
        out.pop(head, None)
        return out
    child = node.get(head, ABSENT)
    if kind == "remove" and child is ABSENT:
        return out  # removing below a missing field: nothing to do, nothing created
    out[head] = ref_step(child, kind, rest, arg, i, path_len)
    return out


def ref_apply(value: Any, raw_ops: Any, exists: bool = True) -> Any:
    """The contract's update semantics, all or nothing."""
    if not isinstance(raw_ops, (list, tuple)) or len(raw_ops) == 0:
        raise RefError(0, "bad_op")
    checked = [ref_check(op, i) for i, op in enumerate(raw_ops)]
    state = tree_copy(value) if exists else ABSENT
    for i, (kind, steps, arg) in enumerate(checked):
        state = ref_step(state, kind, steps, arg, i, len(steps))
    return {} if state is ABSENT else state


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def canon(x: Any) -> Any:
    """A type- and order-sensitive form for comparisons (``1 != 1.0 != True``, key order counts)."""
    if isinstance(x, dict):
        return ("dict", [(canon(k), canon(v)) for k, v in x.items()])
    if isinstance(x, list):
        return ("list", [canon(v) for v in x])
    if isinstance(x, tuple):
        return ("tuple", [canon(v) for v in x])
    return (type(x).__name__, x)


def run_both(value: Any, raw_ops: Any, exists: bool = True) -> tuple[Any, Any]:
    """Run model and source; return (model outcome, source outcome), each a value or an error."""
    try:
        expected: Any = ref_apply(value, raw_ops, exists)
    except RefError as exc:
        expected = exc
    try:
        actual: Any = apply_ops(value, raw_ops, exists=exists)
    except UpdateError as exc:
        actual = exc
    return expected, actual


def assert_agree(expected: Any, actual: Any) -> None:
    if isinstance(expected, RefError):
        assert isinstance(actual, UpdateError), f"model failed with {expected.args}, source gave {actual!r}"
        assert (actual.op_index, actual.code) == (expected.index, expected.code), actual
    else:
        assert not isinstance(actual, UpdateError), f"source failed ({actual}), model gave {expected!r}"
        assert canon(actual) == canon(expected)


# --------------------------------------------------------------------------------------------
# strategies
# --------------------------------------------------------------------------------------------

KEY = st.sampled_from(["a", "b", "a.b", "n", ""])
NONEMPTY_KEY = st.sampled_from(["a", "b", "a.b", "n"])
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-1000, 1000)
    | st.floats(-1e6, 1e6, allow_nan=False)
    | st.text("xyz", max_size=3)
)
# st.recursive alone seldom yields a bare scalar, so offer scalars (and strings) directly too
NESTED = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(KEY, kids, max_size=3),
    max_leaves=10,
)
JSON = st.sampled_from([SCALARS, NESTED, NESTED]).flatmap(lambda strategy: strategy)
TEXT = st.text("xyz", max_size=3)
JSON_DICT = st.dictionaries(KEY, JSON, max_size=4)
STORED = JSON_DICT | JSON | st.dictionaries(KEY, TEXT, max_size=3)
PATH = KEY | st.lists(KEY, max_size=3) | st.lists(KEY, max_size=2).map(tuple)
NONEMPTY_PATH = NONEMPTY_KEY | st.lists(KEY, min_size=1, max_size=3)
# a remove at "" / [] ends most op lists' interest (the value becomes None): keep it rare
REMOVE_PATH = st.sampled_from([NONEMPTY_PATH] * 4 + [PATH]).flatmap(lambda strategy: strategy)
BY = st.integers(-5, 5) | st.floats(-10, 10, allow_nan=False)
BAD_PATH = (
    st.integers(-2, 2)
    | st.lists(st.integers(0, 2), min_size=1, max_size=2)
    | st.builds(lambda k: {k: 1}, KEY)
    | st.binary(min_size=1, max_size=2)
    | st.lists(KEY, max_size=2).map(lambda steps: [*steps, 1])
    | st.builds(lambda k: [k, None], KEY)
)
BAD_BY = st.sampled_from([True, False, None, "1", math.nan, math.inf, -math.inf]) | st.builds(lambda: [1])
NOT_JSON = (
    st.builds(set, st.lists(st.integers(0, 3), max_size=2))
    | st.builds(tuple, st.lists(st.integers(0, 3), max_size=2))
    | st.builds(object)
    | st.builds(lambda x: {"a": (x,)}, st.integers(0, 3))
    | st.builds(lambda k: [{1: k}], KEY)
    | st.binary(max_size=2)
    | st.builds(lambda: {"k": {frozenset()}})
    | st.builds(lambda: 1j)
)
NOT_A_MAPPING = (
    st.sampled_from([None, 1, "set", b"set"])
    | st.builds(lambda: ["set"])
    | st.builds(lambda: ("type", "set"))
)
DEFECTS = (
    "unknown_type",
    "missing_type",
    "extra_field",
    "missing_path",
    "none_path",
    "bad_path",
    "bad_by",
    "missing_value",
    "not_json",
    "merge_non_dict",
    "not_mapping",
    "empty_path",
)


@st.composite
def wire_op(draw: st.DrawFn, bad: bool = False) -> Any:
    """One op in the wire shape; with ``bad``, sometimes with one defect."""
    kind = draw(st.sampled_from(KINDS))
    op: dict[str, Any] = {"type": kind}
    if kind in ("merge", "append"):
        shape = draw(st.sampled_from(["omit", "none", "path"]))
        if shape == "none":
            op["path"] = None
        elif shape == "path":
            op["path"] = draw(PATH)
    else:
        op["path"] = draw(REMOVE_PATH if kind == "remove" else PATH)
    if kind in ("increment", "decrement") and draw(st.booleans()):
        op["by"] = draw(BY)
    if kind == "set":
        op["value"] = draw(JSON)
    elif kind == "append":
        op["value"] = draw(TEXT | JSON)
    elif kind == "merge":
        op["value"] = draw(JSON_DICT)
    if not bad:
        return op
    defect = draw(st.sampled_from((None,) * 8 + DEFECTS))
    if defect is not None:
        event(f"defect: {defect}")
    if defect == "unknown_type":
        op["type"] = draw(
            st.sampled_from(["frob", "SET", "", "Set", None, 3, b"set"]) | st.builds(lambda: ["set"])
        )
    elif defect == "missing_type":
        del op["type"]
    elif defect == "extra_field":
        op[draw(st.sampled_from([n for n in ("x", "by", "value", "op") if n not in op]))] = 1
    elif defect == "missing_path":
        op.pop("path", None)
    elif defect == "none_path":
        op["path"] = None
    elif defect == "bad_path":
        op["path"] = draw(BAD_PATH)
    elif defect == "bad_by":
        op["by"] = draw(BAD_BY)
    elif defect == "missing_value":
        op.pop("value", None)
    elif defect == "not_json":
        op["value"] = draw(NOT_JSON)
    elif defect == "merge_non_dict":
        op["value"] = draw(SCALARS | st.lists(JSON, max_size=2))
    elif defect == "not_mapping":
        return draw(NOT_A_MAPPING)
    elif defect == "empty_path":
        op["path"] = draw(st.sampled_from(["", []]))
    return op


VALID_OPS = st.lists(wire_op(), min_size=1, max_size=6)
ANY_OPS = st.lists(wire_op(bad=True), min_size=1, max_size=6)


# --------------------------------------------------------------------------------------------
# property tests
# --------------------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(value=STORED, raw_ops=ANY_OPS, exists=st.booleans())
def test_apply_ops_agrees_with_model_and_is_all_or_nothing(
    value: Any, raw_ops: list[Any], exists: bool
) -> None:
    value_before = canon(value)
    ops_before = canon(raw_ops)
    expected, actual = run_both(value, raw_ops, exists=exists)
    event(f"outcome: {actual.code if isinstance(actual, UpdateError) else 'ok'}")
    assert_agree(expected, actual)
    # all or nothing, and never a mutation of the caller's value or ops
    assert canon(value) == value_before
    assert canon(raw_ops) == ops_before


@settings(max_examples=250, deadline=None)
@given(value=STORED, raw_ops=VALID_OPS, exists=st.booleans())
def test_valid_ops_agree_with_model(value: Any, raw_ops: list[Any], exists: bool) -> None:
    """Well-formed ops only: the interesting runtime outcomes (not_number, not_object, ...) and results."""
    value_before = canon(value)
    expected, actual = run_both(value, raw_ops, exists=exists)
    event(f"outcome: {actual.code if isinstance(actual, UpdateError) else 'ok'}")
    assert_agree(expected, actual)
    assert canon(value) == value_before


@settings(max_examples=150, deadline=None)
@given(
    value=STORED, raw_ops=st.lists(wire_op(), min_size=2, max_size=6), exists=st.booleans(), data=st.data()
)
def test_applying_in_two_steps_is_applying_at_once(
    value: Any, raw_ops: list[Any], exists: bool, data: st.DataObject
) -> None:
    """Results may share structure with their inputs, so updating a result must not disturb them."""
    cut = data.draw(st.integers(1, len(raw_ops) - 1))
    if REMOVE_KEEPS_A_MISSING_KEY_MISSING:  # the known split-dependence, tested on its own below
        assume(exists or any(op["type"] != "remove" for op in raw_ops[:cut]))
    value_before, ops_before = canon(value), canon(raw_ops)
    _expected, at_once = run_both(value, raw_ops, exists=exists)
    _expected, first = run_both(value, raw_ops[:cut], exists=exists)
    if isinstance(first, UpdateError):
        assert isinstance(at_once, UpdateError)
        assert (at_once.op_index, at_once.code) == (first.op_index, first.code)
        return
    first_before = canon(first)
    second = run_both(first, raw_ops[cut:])[1]
    if isinstance(second, UpdateError):
        assert isinstance(at_once, UpdateError)
        assert (at_once.op_index, at_once.code) == (second.op_index + cut, second.code)
    else:
        assert not isinstance(at_once, UpdateError), at_once
        assert canon(second) == canon(at_once)
    assert canon(first) == first_before
    assert canon(value) == value_before
    assert canon(raw_ops) == ops_before


AB = st.sampled_from(["a", "b"])
AB_TREE = st.recursive(
    SCALARS | st.lists(SCALARS, max_size=2), lambda kids: st.dictionaries(AB, kids, max_size=2), max_leaves=6
)
AB_PATH = st.lists(AB, min_size=1, max_size=3) | AB


@st.composite
def walking_op(draw: st.DrawFn) -> dict[str, Any]:
    """An op at a short path over two field names, so it often meets None, scalars and lists on the way."""
    kind = draw(st.sampled_from(["merge", "merge", "append", "append", "set", "increment", "remove"]))
    op: dict[str, Any] = {"type": kind, "path": draw(AB_PATH)}
    if kind == "merge":
        op["value"] = draw(st.dictionaries(AB, SCALARS, max_size=2))
    elif kind in ("append", "set"):
        op["value"] = draw(TEXT | SCALARS)
    return op


@settings(max_examples=300, deadline=None)
@given(value=AB_TREE, raw_ops=st.lists(walking_op(), min_size=1, max_size=4), exists=st.booleans())
def test_merge_and_append_walks_agree_with_model(value: Any, raw_ops: list[Any], exists: bool) -> None:
    """merge/append replace non-dict steps with {}, the other ops fail on them: dense in such paths."""
    value_before = canon(value)
    expected, actual = run_both(value, raw_ops, exists=exists)
    event(f"outcome: {actual.code if isinstance(actual, UpdateError) else 'ok'}")
    assert_agree(expected, actual)
    assert canon(value) == value_before


def _helper_for(op: dict[str, Any]) -> Any:
    """Build the same op with the public helpers of ``shardstate.ops``."""
    kind, path = op["type"], op.get("path")
    if kind == "set":
        return ops.set(path, op["value"])
    if kind == "merge":
        return ops.merge(path, op["value"])
    if kind == "append":
        return ops.append(path, op["value"])
    if kind == "remove":
        return ops.remove(path)
    helper = ops.increment if kind == "increment" else ops.decrement
    return helper(path, op["by"]) if "by" in op else helper(path)


@settings(max_examples=150, deadline=None)
@given(value=STORED, raw_ops=VALID_OPS, exists=st.booleans(), data=st.data())
def test_pydantic_ops_behave_like_dicts(
    value: Any, raw_ops: list[Any], exists: bool, data: st.DataObject
) -> None:
    as_dicts = run_both(value, raw_ops, exists=exists)[1]
    parsed = [ops.parse(op).to_wire() for op in raw_ops]
    helped = [_helper_for(op).to_wire() for op in raw_ops]
    # and freely mixed with plain dicts
    mixed = [data.draw(st.sampled_from([op, p, h])) for op, p, h in zip(raw_ops, parsed, helped, strict=True)]
    for variant in (parsed, helped, mixed):
        expected, actual = run_both(value, variant, exists=exists)
        if isinstance(as_dicts, UpdateError):
            assert isinstance(actual, UpdateError)
            assert (actual.op_index, actual.code) == (as_dicts.op_index, as_dicts.code)
        else:
            assert not isinstance(actual, UpdateError), actual
            assert canon(actual) == canon(as_dicts)
        assert_agree(expected, actual)


@settings(max_examples=150, deadline=None)
@given(raw=wire_op(bad=True), index=st.integers(0, 9))
def test_parse_op_agrees_with_model_check(raw: Any, index: int) -> None:
    try:
        kind, steps, arg = ref_check(raw, index)
    except RefError as exc:
        expected_code = exc.code
    else:
        expected_code = None
    if expected_code is not None:
        with pytest.raises(UpdateError) as info:
            parse_op(raw, index)
        assert (info.value.op_index, info.value.code) == (index, expected_code)
    else:
        op = parse_op(raw, index)
        assert op.kind == kind
        assert op.kind in OP_TYPES
        assert list(op.path) == steps
        assert canon(op.arg) == canon(arg)


# --------------------------------------------------------------------------------------------
# examples: each contract sentence, checked against both the source and the model
# --------------------------------------------------------------------------------------------

SUCCESS_CASES = [
    # (value, ops, exists, expected)
    ({"count": 1}, [{"type": "increment", "path": "count", "by": 1}], True, {"count": 2}),
    ({"count": 1}, [{"type": "increment", "path": "count"}], True, {"count": 2}),
    ({"count": 1}, [{"type": "decrement", "path": "count", "by": 3}], True, {"count": -2}),
    ({"count": 1}, [{"type": "increment", "path": "count", "by": 0.5}], True, {"count": 1.5}),
    ({}, [{"type": "increment", "path": "c"}], True, {"c": 1}),
    ({}, [{"type": "decrement", "path": "c"}], True, {"c": -1}),
    ({"x": 2.5}, [{"type": "decrement", "path": "x", "by": 2}], True, {"x": 0.5}),
    # a string path is one literal first-level field
    ({}, [{"type": "set", "path": "a.b", "value": 1}], True, {"a.b": 1}),
    ({"a": {"b": 1}}, [{"type": "increment", "path": "a.b"}], True, {"a": {"b": 1}, "a.b": 1}),
    # list paths are nested; missing intermediate dicts are created
    ({}, [{"type": "set", "path": ["a", "b", "c"], "value": 1}], True, {"a": {"b": {"c": 1}}}),
    ({"a": {"z": 0}}, [{"type": "increment", "path": ["a", "b"]}], True, {"a": {"z": 0, "b": 1}}),
    ({}, [{"type": "set", "path": ["a.b"], "value": 1}], True, {"a.b": 1}),
    # "" and [] are the whole value
    ({"x": 1}, [{"type": "set", "path": "", "value": 5}], True, 5),
    ({"x": 1}, [{"type": "set", "path": [], "value": [1]}], True, [1]),
    (3, [{"type": "increment", "path": ""}], True, 4),
    ([1], [{"type": "append", "value": 2}], True, [1, 2]),
    ("ab", [{"type": "append", "path": "", "value": "c"}], True, "abc"),
    # a missing key starts as {}
    (None, [{"type": "set", "path": "a", "value": 1}], False, {"a": 1}),
    ("ignored", [{"type": "merge", "value": {"k": 1}}], False, {"k": 1}),
    (None, [{"type": "remove", "path": "a"}], False, {}),
    (None, [{"type": "increment", "path": ""}], False, 1),
    (None, [{"type": "decrement", "path": [], "by": 2}], False, -2),
    (None, [{"type": "append", "value": 7}], False, [7]),
    (None, [{"type": "append", "value": "s"}], False, "s"),
    (None, [{"type": "append", "path": "", "value": [1]}], False, [[1]]),
    # append
    ({"l": [1]}, [{"type": "append", "path": "l", "value": {"x": 1}}], True, {"l": [1, {"x": 1}]}),
    ({"s": "ab"}, [{"type": "append", "path": "s", "value": "cd"}], True, {"s": "abcd"}),
    ({}, [{"type": "append", "path": "l", "value": 1}], True, {"l": [1]}),
    ({}, [{"type": "append", "path": "s", "value": "x"}], True, {"s": "x"}),
    ({}, [{"type": "append", "path": ["a", "l"], "value": None}], True, {"a": {"l": [None]}}),
    # append to a None field starts it like a missing one
    ({"n": None}, [{"type": "append", "path": "n", "value": 2}], True, {"n": [2]}),
    ({"n": None}, [{"type": "append", "path": ["n"], "value": "x"}], True, {"n": "x"}),
    (None, [{"type": "append", "value": [1]}], True, [[1]]),
    # at a nested path a missing leaf always starts a list; non-dict steps become {}
    ({}, [{"type": "append", "path": ["a", "s"], "value": "x"}], True, {"a": {"s": ["x"]}}),
    ({"a": 1}, [{"type": "append", "path": ["a", "b", "c"], "value": 2}], True, {"a": {"b": {"c": [2]}}}),
    # merge is shallow
    (
        {"a": {"x": 1}, "b": 1},
        [{"type": "merge", "value": {"a": {"y": 2}, "c": 3}}],
        True,
        {"a": {"y": 2}, "b": 1, "c": 3},
    ),
    ({"f": {"x": 1}}, [{"type": "merge", "path": "f", "value": {"y": 2}}], True, {"f": {"x": 1, "y": 2}}),
    ({}, [{"type": "merge", "path": ["f", "g"], "value": {"y": 2}}], True, {"f": {"g": {"y": 2}}}),
    ({"x": 1}, [{"type": "merge", "path": None, "value": {}}], True, {"x": 1}),
    # merge at a path: non-dict steps, the value itself and the target become {}
    ({"ok": 1}, [{"type": "merge", "path": "ok", "value": {"a": 1}}], True, {"ok": {"a": 1}}),
    ({"l": []}, [{"type": "merge", "path": "l", "value": {}}], True, {"l": {}}),
    ({"a": [1]}, [{"type": "merge", "path": ["a", "b"], "value": {"c": 1}}], True, {"a": {"b": {"c": 1}}}),
    ("s", [{"type": "merge", "path": ["a"], "value": {"c": 1}}], True, {"a": {"c": 1}}),
    # remove
    ({"a": 1, "b": 2}, [{"type": "remove", "path": "a"}], True, {"b": 2}),
    ({"a": 1}, [{"type": "remove", "path": "zz"}], True, {"a": 1}),
    ({"a": {"b": 1, "c": 2}}, [{"type": "remove", "path": ["a", "b"]}], True, {"a": {"c": 2}}),
    ({"a": 1}, [{"type": "remove", "path": ["x", "y", "z"]}], True, {"a": 1}),  # nothing created
    # remove at "" / []: the value becomes None
    ({"a": 1}, [{"type": "remove", "path": ""}], True, None),
    ({"a": 1}, [{"type": "remove", "path": []}], True, None),
    (None, [{"type": "remove", "path": ""}], False, None),
    ({"a": 1}, [{"type": "remove", "path": ""}, {"type": "append", "value": "s"}], True, "s"),
    # set replaces, keeps the key's position
    ({"a": 1, "b": 2}, [{"type": "set", "path": "a", "value": [3]}], True, {"a": [3], "b": 2}),
    # ops apply in order
    (
        {},
        [
            {"type": "set", "path": "n", "value": 1},
            {"type": "increment", "path": "n", "by": 10},
            {"type": "set", "path": "n", "value": "x"},
            {"type": "append", "path": "n", "value": "y"},
        ],
        True,
        {"n": "xy"},
    ),
    # a tuple of ops is accepted like a list
    ({}, ({"type": "increment", "path": "c"},), True, {"c": 1}),
]


@pytest.mark.parametrize(("value", "raw_ops", "exists", "expected"), SUCCESS_CASES)
def test_success_examples(value: Any, raw_ops: Any, exists: bool, expected: Any) -> None:
    assert canon(ref_apply(value, raw_ops, exists)) == canon(expected)  # the model reads the contract
    assert canon(apply_ops(value, raw_ops, exists=exists)) == canon(expected)


def _inc(path: Any = "n", **extra: Any) -> dict[str, Any]:
    return {"type": "increment", "path": path, **extra}


OK = {"type": "set", "path": "ok", "value": 1}

FAILURE_CASES = [
    # (value, ops, exists, op_index, code)
    # -- bad_op: the op itself is malformed
    ({}, [{"type": "frob", "path": "a"}], True, 0, "bad_op"),
    ({}, [{"path": "a", "value": 1}], True, 0, "bad_op"),
    ({}, [{"type": None, "path": "a"}], True, 0, "bad_op"),
    ({}, [{"type": "SET", "path": "a", "value": 1}], True, 0, "bad_op"),
    ({}, [{"type": "set", "path": "a", "value": 1, "by": 2}], True, 0, "bad_op"),
    ({}, [{"type": "remove", "path": "a", "value": 1}], True, 0, "bad_op"),
    ({}, [{"type": "increment", "path": "a", "value": 1}], True, 0, "bad_op"),
    ({}, [{"type": "set", "value": 1}], True, 0, "bad_op"),
    ({}, [{"type": "set", "path": None, "value": 1}], True, 0, "bad_op"),
    ({}, [{"type": "increment"}], True, 0, "bad_op"),
    ({}, [{"type": "remove"}], True, 0, "bad_op"),
    ({}, [{"type": "set", "path": "a"}], True, 0, "bad_op"),
    ({}, [{"type": "merge", "path": "a"}], True, 0, "bad_op"),
    ({}, [{"type": "append"}], True, 0, "bad_op"),
    ({}, [_inc(1)], True, 0, "bad_op"),
    ({}, [_inc(["a", 1])], True, 0, "bad_op"),
    ({}, [_inc({"a": 1})], True, 0, "bad_op"),
    ({}, [_inc(b"n")], True, 0, "bad_op"),
    ({}, [_inc(by="1")], True, 0, "bad_op"),
    ({}, [_inc(by=None)], True, 0, "bad_op"),
    ({}, [_inc(by=[1])], True, 0, "bad_op"),
    ({}, [_inc(by=math.nan)], True, 0, "bad_op"),
    ({}, [_inc(by=math.inf)], True, 0, "bad_op"),
    ({}, [{"type": "decrement", "path": "n", "by": -math.inf}], True, 0, "bad_op"),
    ({}, [_inc(by=True)], True, 0, "bad_op"),
    ({}, [_inc(by=False)], True, 0, "bad_op"),
    ({}, [None], True, 0, "bad_op"),
    ({}, ["increment"], True, 0, "bad_op"),
    ({}, [OK, OK, ("type", "set")], True, 2, "bad_op"),
    ({}, [OK, {"type": "frob"}], True, 1, "bad_op"),
    # a bad op anywhere fails the call even if an earlier op would fail at runtime
    ({"n": "s"}, [_inc(), {"type": "frob"}], True, 1, "bad_op"),
    # ops must be a non-empty list
    ({}, [], True, 0, "bad_op"),
    ({}, (), True, 0, "bad_op"),
    ({}, None, True, 0, "bad_op"),
    ({}, {"type": "increment", "path": "n"}, True, 0, "bad_op"),
    ({}, "increment", True, 0, "bad_op"),
    ({}, b"ops", True, 0, "bad_op"),
    ({}, 5, True, 0, "bad_op"),
    ({}, {OK["type"]}, True, 0, "bad_op"),
    # -- not_number
    ({"n": "1"}, [_inc()], True, 0, "not_number"),
    ({"n": True}, [_inc()], True, 0, "not_number"),
    ({"n": False}, [{"type": "decrement", "path": "n"}], True, 0, "not_number"),
    ({"n": {}}, [_inc()], True, 0, "not_number"),
    ({"n": [1]}, [_inc()], True, 0, "not_number"),
    ({"n": None}, [_inc()], True, 0, "not_number"),
    ({"n": 1}, [_inc(""), OK], True, 0, "not_number"),  # the root is a dict
    ("7", [_inc([])], True, 0, "not_number"),
    (None, [_inc("")], True, 0, "not_number"),  # an existing None is not a missing key
    (
        {},
        [OK, _inc("ok"), _inc("ok"), {"type": "set", "path": "ok", "value": "s"}, _inc("ok")],
        True,
        4,
        "not_number",
    ),
    # -- not_object
    ({"a": 1}, [_inc(["a", "b"])], True, 0, "not_object"),
    ({"a": [1]}, [_inc(["a", "b"])], True, 0, "not_object"),
    ({"a": "s"}, [{"type": "set", "path": ["a", "b", "c"], "value": 1}], True, 0, "not_object"),
    ({"a": {"b": 1}}, [{"type": "remove", "path": ["a", "b", "c"]}], True, 0, "not_object"),
    (5, [{"type": "set", "path": "a", "value": 1}], True, 0, "not_object"),
    ([], [{"type": "remove", "path": "a"}], True, 0, "not_object"),
    (None, [{"type": "set", "path": "a", "value": 1}], True, 0, "not_object"),
    ({}, [{"type": "merge", "value": [1]}], True, 0, "not_object"),
    ({}, [{"type": "merge", "value": 1}], True, 0, "not_object"),
    ({}, [{"type": "merge", "value": "s"}], True, 0, "not_object"),
    ({}, [{"type": "merge", "value": None}], True, 0, "not_object"),
    ([1], [{"type": "merge", "value": {"a": 1}}], True, 0, "not_object"),
    ("s", [{"type": "merge", "path": "", "value": {"a": 1}}], True, 0, "not_object"),
    (None, [{"type": "merge", "path": [], "value": {"a": 1}}], True, 0, "not_object"),
    # append at a path needs the value itself to be a dict
    ([1], [{"type": "append", "path": "a", "value": 1}], True, 0, "not_object"),
    (None, [{"type": "append", "path": ["a", "b"], "value": 1}], True, 0, "not_object"),
    # the other ops do not replace non-dict steps
    ({"a": None}, [{"type": "set", "path": ["a", "b"], "value": 1}], True, 0, "not_object"),
    ({"a": [1]}, [{"type": "decrement", "path": ["a", "b"]}], True, 0, "not_object"),
    ({"a": "s"}, [{"type": "remove", "path": ["a", "b"]}], True, 0, "not_object"),
    ({}, [{"type": "remove", "path": ""}, OK], True, 1, "not_object"),
    ({}, [OK, {"type": "set", "path": "", "value": 3}, OK], True, 2, "not_object"),
    # -- type_mismatch
    ({"n": 1}, [{"type": "append", "path": "n", "value": 2}], True, 0, "type_mismatch"),
    ({"n": {}}, [{"type": "append", "path": "n", "value": 2}], True, 0, "type_mismatch"),
    ({"n": 1.5}, [{"type": "append", "path": "n", "value": 2}], True, 0, "type_mismatch"),
    ({"n": True}, [{"type": "append", "path": "n", "value": "x"}], True, 0, "type_mismatch"),
    ({"s": "ab"}, [{"type": "append", "path": "s", "value": 1}], True, 0, "type_mismatch"),
    ({"s": "ab"}, [{"type": "append", "path": "s", "value": ["c"]}], True, 0, "type_mismatch"),
    ({"s": "ab"}, [{"type": "append", "path": "s", "value": None}], True, 0, "type_mismatch"),
    ({"a": 1}, [{"type": "append", "value": 1}], True, 0, "type_mismatch"),  # append to the dict root
    (3, [{"type": "append", "path": "", "value": 1}], True, 0, "type_mismatch"),
    # -- not_json: the op's value is not JSON-like
    ({}, [{"type": "set", "path": "a", "value": {1, 2}}], True, 0, "not_json"),
    ({}, [{"type": "set", "path": "a", "value": (1, 2)}], True, 0, "not_json"),
    ({}, [{"type": "set", "path": "a", "value": object()}], True, 0, "not_json"),
    ({}, [{"type": "set", "path": "a", "value": b"x"}], True, 0, "not_json"),
    ({}, [{"type": "set", "path": "a", "value": {"k": [1, (2,)]}}], True, 0, "not_json"),
    ({}, [{"type": "set", "path": "a", "value": {1: "x"}}], True, 0, "not_json"),
    ({}, [OK, {"type": "append", "path": "l", "value": {3}}], True, 1, "not_json"),
    ({}, [{"type": "merge", "value": {"a": {1}}}], True, 0, "not_json"),
    ({}, [{"type": "set", "path": "", "value": 1j}], True, 0, "not_json"),
]


@pytest.mark.parametrize(("value", "raw_ops", "exists", "index", "code"), FAILURE_CASES)
def test_failure_examples(value: Any, raw_ops: Any, exists: bool, index: int, code: str) -> None:
    with pytest.raises(RefError) as model:
        ref_apply(value, raw_ops, exists)
    assert (model.value.index, model.value.code) == (index, code)  # the model reads the contract
    before = canon(value)
    with pytest.raises(UpdateError) as info:
        apply_ops(value, raw_ops, exists=exists)
    assert (info.value.op_index, info.value.code) == (index, code)
    assert canon(value) == before


def test_parse_ops_errors_carry_index_and_code() -> None:
    with pytest.raises(UpdateError) as info:
        parse_ops([OK, OK, OK, {"type": "increment", "path": "x", "by": "2"}])
    assert info.value.op_index == 3
    assert info.value.code == "bad_op"
    assert "op 3 (bad_op)" in str(info.value)
    assert [op.kind for op in parse_ops([OK, _inc()])] == ["set", "increment"]
    assert parse_op(_inc(["a", "b"]), 0).path == ("a", "b")
    assert parse_op(_inc("a.b"), 0).path == ("a.b",)
    assert parse_op({"type": "merge", "value": {}}, 0).path == ()


def test_generated_generators_are_not_op_lists() -> None:
    with pytest.raises(UpdateError) as info:
        apply_ops({}, (op for op in [OK]))
    assert (info.value.op_index, info.value.code) == (0, "bad_op")


def test_input_value_is_not_mutated_on_success() -> None:
    value = {"l": [1], "d": {"x": 1}, "n": 1, "s": "a"}
    snapshot = canon(value)
    result = apply_ops(
        value,
        [
            {"type": "append", "path": "l", "value": 2},
            {"type": "merge", "path": "d", "value": {"y": 2}},
            _inc(),
            {"type": "set", "path": ["d", "z"], "value": 3},
            {"type": "remove", "path": "s"},
        ],
    )
    assert canon(value) == snapshot
    assert result == {"l": [1, 2], "d": {"x": 1, "y": 2, "z": 3}, "n": 2}


def test_op_values_are_copied_not_shared() -> None:
    shared = {"x": [1]}
    result = apply_ops(
        {},
        [
            {"type": "set", "path": "a", "value": shared},
            {"type": "set", "path": "b", "value": shared},
            {"type": "append", "path": ["a", "x"], "value": 2},
        ],
    )
    assert result == {"a": {"x": [1, 2]}, "b": {"x": [1]}}
    assert shared == {"x": [1]}


def test_exists_false_ignores_value() -> None:
    value = {"n": 41}
    assert apply_ops(value, [_inc()], exists=False) == {"n": 1}
    assert value == {"n": 41}


@pytest.mark.parametrize("kind", [["set"], {"a": 1}, {"set"}])
def test_unhashable_type_field_is_bad_op(kind: Any) -> None:
    with pytest.raises(UpdateError) as info:
        apply_ops({}, [OK, {"type": kind, "path": "a", "value": 1}])
    assert (info.value.op_index, info.value.code) == (1, "bad_op")


@pytest.mark.parametrize(("current", "by"), [(1.5, 10**400), (10**400, 1.5), (-1e308, -(10**400))])
def test_increment_overflow_is_an_update_error(current: Any, by: Any) -> None:
    value = {"n": current}
    with pytest.raises(UpdateError) as info:
        apply_ops(value, [OK, _inc(by=by)])
    assert (info.value.op_index, info.value.code) == (1, "not_number")
    assert value == {"n": current}


def test_shared_sub_objects_of_the_value_are_updated_independently() -> None:
    """JSON values are trees: two fields holding one Python list are still two fields."""
    shared = [1]
    value = {"x": shared, "y": shared}
    result = apply_ops(value, [{"type": "append", "path": "x", "value": 2}])
    assert result == {"x": [1, 2], "y": [1]}
    assert value == {"x": [1], "y": [1]}
    assert ref_apply(value, [{"type": "append", "path": "x", "value": 2}]) == result


# --------------------------------------------------------------------------------------------
# known bugs (see the unit-test report); strict, so a fix shows up as XPASS and fails the run
# --------------------------------------------------------------------------------------------


def test_extra_fields_of_mixed_key_types_are_bad_op() -> None:
    with pytest.raises(UpdateError) as info:
        apply_ops({}, [{"type": "set", "path": "a", "value": 1, 1: 2, "x": 3}])
    assert (info.value.op_index, info.value.code) == (0, "bad_op")


@pytest.mark.parametrize("root_op", [_inc(""), {"type": "append", "value": "x"}])
def test_remove_on_a_missing_key_is_like_two_updates(root_op: dict[str, Any]) -> None:
    """A missing key starts as {}: [remove, X] at once must equal [remove] then [X] as two updates."""
    stored = apply_ops(None, [{"type": "remove", "path": "a"}], exists=False)
    assert stored == {}
    with pytest.raises(UpdateError) as two_updates:
        apply_ops(stored, [root_op])
    with pytest.raises(UpdateError) as one_update:
        apply_ops(None, [{"type": "remove", "path": "a"}, root_op], exists=False)
    assert (one_update.value.op_index, one_update.value.code) == (1, two_updates.value.code)


# --------------------------------------------------------------------------------------------
# the iii engine's own update-op cases (Motia's runtime), one row each
# --------------------------------------------------------------------------------------------
#
# Taken from iii-hq/iii at commit bacffa0d3d14684d43c6f7c0796c79b62726172b:
#   U = engine/src/update_ops.rs (mod tests: apply_update_ops)
#   E = engine/tests/state_stream_update_e2e.rs (through BuiltinKvStore, several calls per test)
#   K = engine/src/builtins/kv.rs (mod tests: BuiltinKvStore::update)
#   R = engine/src/workers/state/adapters/redis_adapter.rs and engine/tests/state_stream_update_redis_e2e.rs
#       (the Redis Lua script of engine/src/workers/redis.rs)
#   I = no iii test: read from apply_update_ops in engine/src/update_ops.rs
# iii returns (new_value, errors) and skips each failing op; we are all or nothing, so where iii
# reports errors we expect UpdateError(first failing op, our code) and nothing written. The iii codes
# map to ours: *.not_number -> not_number, append.type_mismatch -> type_mismatch,
# *.target_not_object and merge.value.not_an_object -> not_object. `differs` says where the row's
# expectation is not iii's result and why (CONTRACT.md decides).

III_SOURCES = {
    "U": "iii-hq/iii engine/src/update_ops.rs",
    "E": "iii-hq/iii engine/tests/state_stream_update_e2e.rs",
    "K": "iii-hq/iii engine/src/builtins/kv.rs",
    "R": "iii-hq/iii engine/src/workers/state/adapters/redis_adapter.rs",
    "RE": "iii-hq/iii engine/tests/state_stream_update_redis_e2e.rs",
    "I": "iii-hq/iii engine/src/update_ops.rs (apply_update_ops; no test)",
}

MISSING_KEY = ABSENT  # the row's value: the key does not exist yet


class Fails:
    """The row's expected outcome when the update must fail: ``UpdateError(op_index, code)``."""

    def __init__(self, op_index: int, code: str) -> None:
        self.op_index, self.code = op_index, code

    def __repr__(self) -> str:
        return f"Fails({self.op_index}, {self.code!r})"


def _set(path: Any, value: Any) -> dict[str, Any]:
    return {"type": "set", "path": path, "value": value}


def _merge(path: Any, value: Any) -> dict[str, Any]:
    op = {"type": "merge", "value": value}
    return op if path is None else {**op, "path": path}


def _append(path: Any, value: Any) -> dict[str, Any]:
    op = {"type": "append", "value": value}
    return op if path is None else {**op, "path": path}


def _incr(path: Any, by: Any) -> dict[str, Any]:
    return {"type": "increment", "path": path, "by": by}


def _decr(path: Any, by: Any) -> dict[str, Any]:
    return {"type": "decrement", "path": path, "by": by}


def _remove(path: Any) -> dict[str, Any]:
    return {"type": "remove", "path": path}


def _nested(steps: list[str], leaf: Any) -> Any:
    for step in reversed(steps):
        leaf = {step: leaf}
    return leaf


_DEEP = [f"k{i}" for i in range(33)]  # iii's MAX_PATH_DEPTH is 32
_LONG = "a" * 257  # iii's MAX_SEGMENT_BYTES is 256
_SKIPS = "iii skips the failing op and writes the others; we write nothing"
_NO_SINKS = "iii rejects __proto__/constructor/prototype (a JS concern); CONTRACT.md reserves no field names"

# (source, iii test, stored value, calls (each a list of ops, applied as separate updates), expected
#  result of the last call or Fails, differs)
# fmt: off
III_CASES: list[tuple[str, str, Any, list[list[dict[str, Any]]], Any, str]] = [
    # ---- append
    ("U", "appends_to_array_field_as_single_element", {"events": [{"kind": "start"}]},
     [[_append("events", {"kind": "chunk"})]], {"events": [{"kind": "start"}, {"kind": "chunk"}]}, ""),
    ("U", "concatenates_string_fields", {"transcript": "hello"},
     [[_append("transcript", " world")]], {"transcript": "hello world"}, ""),
    ("U", "initializes_missing_fields_by_value_kind", {},
     [[_append("transcript", "hello"), _append("events", {"kind": "chunk"})]],
     {"transcript": "hello", "events": [{"kind": "chunk"}]}, ""),
    ("U", "initializes_missing_root_by_value_kind (str)", MISSING_KEY, [[_append("", "hello")]], "hello", ""),
    ("U", "initializes_missing_root_by_value_kind (dict)", MISSING_KEY,
     [[_append("", {"kind": "chunk"})]], [{"kind": "chunk"}], ""),
    ("U", "skips_incompatible_string_append_value", {"transcript": "hello"},
     [[_append("transcript", {"not": "string"})]], Fails(0, "type_mismatch"), ""),
    ("U", "skips_incompatible_object_append_target", {"events": {}},
     [[_append("events", "chunk")]], Fails(0, "type_mismatch"), ""),
    ("U", "dotted_paths_are_first_level_fields", {"user.name": ["A"], "user": {"name": ["B"]}},
     [[_append("user.name", "C")]], {"user.name": ["A", "C"], "user": {"name": ["B"]}}, ""),
    ("U", "preserves_order_across_multiple_append_ops", {"events": []},
     [[_append("events", "first"), _append("events", "second")]], {"events": ["first", "second"]}, ""),
    ("U", "append_array_value_to_array_target_as_single_element", {"events": []},
     [[_append("events", ["nested", "array"])]], {"events": [["nested", "array"]]}, ""),
    ("U", "append_to_null_field_initializes_by_value_kind", {"string": None, "array": None},
     [[_append("string", "chunk"), _append("array", {"kind": "chunk"})]],
     {"string": "chunk", "array": [{"kind": "chunk"}]}, ""),
    ("U", "append_segments_path_walks_and_pushes_to_existing_array", {"entityId": {"buffer": ["a"]}},
     [[_append(["entityId", "buffer"], "b")]], {"entityId": {"buffer": ["a", "b"]}}, ""),
    ("U", "append_segments_path_creates_intermediate_object", {},
     [[_append(["entityId", "buffer"], "a")]], {"entityId": {"buffer": ["a"]}}, ""),
    ("U", "append_segments_missing_leaf_string_value_becomes_array", {"entityId": {}},
     [[_append(["entityId", "buffer"], "x")]], {"entityId": {"buffer": ["x"]}}, ""),
    ("U", "append_segments_missing_leaf_string_value_becomes_array (one field)", {},
     [[_append("buffer", "x")]], {"buffer": "x"}, ""),
    ("U", "append_dotted_string_path_keeps_literal_segment_semantics", {"entityId": {"buffer": ["nested"]}},
     [[_append("entityId.buffer", "flat")]],
     {"entityId": {"buffer": ["nested"]}, "entityId.buffer": "flat"}, ""),
    ("U", "append_segments_path_object_leaf_returns_type_mismatch", {"entityId": {"buffer": {"x": "y"}}},
     [[_append(["entityId", "buffer"], "z")]], Fails(0, "type_mismatch"), ""),
    ("U", "append_segments_path_non_object_root_returns_target_not_object", [1, 2, 3],
     [[_append(["a", "b"], "x")]], Fails(0, "not_object"), ""),
    ("U", "append_proto_polluted_at_root_segment_rejected", {},
     [[_append(["__proto__"], "x")]], {"__proto__": "x"}, _NO_SINKS),
    ("U", "append_proto_polluted_at_intermediate_segment_rejected", {},
     [[_append(["a", "constructor", "b"], "x")]], {"a": {"constructor": {"b": ["x"]}}}, _NO_SINKS),
    ("U", "append_proto_polluted_at_leaf_segment_rejected", {"safe": {}},
     [[_append(["safe", "prototype"], "x")]], {"safe": {"prototype": ["x"]}}, _NO_SINKS),
    ("U", "multi_op_partial_failure_retains_prior_successes", {"buffer": []},
     [[_append("buffer", "first"), _append(["__proto__", "polluted"], True), _append("buffer", "third")]],
     {"buffer": ["first", "third"], "__proto__": {"polluted": [True]}}, _NO_SINKS),
    ("U", "validates_append_path_segments_with_op_specific_error_code", {},
     [[_append(_LONG, "x")]], {_LONG: "x"}, "iii limits a path segment to 256 bytes; CONTRACT.md does not"),
    ("I", "nested path, existing null leaf: append_to_target(Null) keeps a str", {"a": {"s": None}},
     [[_append(["a", "s"], "x")]], {"a": {"s": "x"}},
     "matches apply_update_ops; iii's Redis Lua (engine/src/workers/redis.rs) and its SDK docs give ['x']"),
    # ---- set / remove at the root
    ("U", "set_empty_path_replaces_root_even_with_null_value", {"": "empty-field", "keep": True},
     [[_set("", None)]], None, ""),
    ("U", "empty_path_remove_clears_root_value", {"": "empty-field", "keep": True},
     [[_remove("")]], None, ""),
    ("U", "validates_set_path_segments_with_op_specific_error_code", {},
     [[_set("__proto__", True)]], {"__proto__": True}, _NO_SINKS),
    # ---- increment / decrement
    ("U", "increments_existing_number_and_missing_fields", {"count": 2},
     [[_incr("count", 3), _incr("missing", 3)]], {"count": 5, "missing": 3}, ""),
    ("U", "increment_rejects_existing_non_number", {"count": 2, "bad": "value"},
     [[_incr("count", 3), _incr("bad", 3), _incr("missing", 3)]], Fails(1, "not_number"), _SKIPS),
    ("U", "decrements_existing_number_and_missing_fields", {"count": 5},
     [[_decr("count", 3), _decr("missing", 3)]], {"count": 2, "missing": -3}, ""),
    ("U", "decrement_rejects_existing_non_number", {"count": 5, "bad": "value"},
     [[_decr("count", 3), _decr("bad", 3), _decr("missing", 3)]], Fails(1, "not_number"), _SKIPS),
    ("U", "preserves_order_across_multiple_numeric_ops", {"count": 10},
     [[_incr("count", 5), _decr("count", 3)]], {"count": 12}, ""),
    ("U", "numeric_ops_accept_json_float_fields", {"count": 1.5},
     [[_incr("count", 2), _decr("count", 1)]], {"count": 2.5}, ""),
    ("U", "numeric_ops_reject_null_fields_instead_of_treating_them_as_missing", {"inc": None, "dec": None},
     [[_incr("inc", 1), _decr("dec", 1)]], Fails(0, "not_number"), _SKIPS),
    ("U", "numeric_ops_with_zero_still_validate_existing_type", {"bad": "value", "count": 2},
     [[_incr("bad", 0), _decr("count", 0)]], Fails(0, "not_number"), ""),
    ("U", "numeric_overflow_promotes_to_exact_unsigned_integer", {"count": 2**63 - 1},
     [[_incr("count", 1)]], {"count": 2**63}, ""),
    ("U", "numeric_ops_preserve_large_unsigned_integer_precision", {"inc": 2**63 + 10, "dec": 2**63 + 10},
     [[_incr("inc", 1), _decr("dec", 1)]], {"inc": 2**63 + 11, "dec": 2**63 + 9}, ""),
    ("U", "missing_decrement_by_i64_min_initializes_exact_unsigned_value", {},
     [[_decr("count", -(2**63))]], {"count": 2**63}, ""),
    ("U", "empty_path_numeric_ops_target_root_value (increment)", 2, [[_incr("", 3)]], 5, ""),
    ("U", "empty_path_numeric_ops_target_root_value (decrement)", 5, [[_decr("", 3)]], 2, ""),
    ("U", "failed_ops_continue_and_preserve_error_indexes", {"bad": "value", "events": {}},
     [[_incr("bad", 1), _set("__proto__", True), _append("events", "chunk"), _set("ok", True)]],
     Fails(0, "not_number"), _SKIPS),
    ("U", "rejects_all_proto_pollution_sinks_for_each_non_merge_op (increment)", {},
     [[_incr("constructor", 1)]], {"constructor": 1}, _NO_SINKS),
    ("U", "rejects_all_proto_pollution_sinks_for_each_non_merge_op (remove)", {},
     [[_remove("prototype")]], {}, _NO_SINKS),
    # ---- merge
    ("U", "merges_into_existing_first_level_object_field", {"session-1": {"ts1": "a"}},
     [[_merge("session-1", {"ts2": "b"})]], {"session-1": {"ts1": "a", "ts2": "b"}}, ""),
    ("U", "merges_into_missing_first_level_field_creates_object", {},
     [[_merge("session-1", {"author": "alice"})]], {"session-1": {"author": "alice"}}, ""),
    ("U", "merges_at_nested_path_replacing_non_object_intermediate", {"sessions": {"abc": "garbage"}},
     [[_merge(["sessions", "abc"], {"author": "alice"})]], {"sessions": {"abc": {"author": "alice"}}}, ""),
    ("U", "merges_at_nested_path_creating_missing_intermediates", {},
     [[_merge(["a", "b", "c"], {"x": 1})]], {"a": {"b": {"c": {"x": 1}}}}, ""),
    ("U", "merges_at_nested_target_shallowly_overwrites_keys",
     {"sessions": {"abc": {"author": "old", "topic": "preserved"}}},
     [[_merge(["sessions", "abc"], {"author": "new"})]],
     {"sessions": {"abc": {"author": "new", "topic": "preserved"}}}, ""),
    ("U", "merge_with_non_object_value_returns_error_and_no_ops", {"a": 1},
     [[_merge("foo", "not-an-object")]], Fails(0, "not_object"), ""),
    ("U", "root_level_merge_unchanged_for_none_empty_string_and_empty_array (None)", {"a": 1},
     [[_merge(None, {"b": 2})]], {"a": 1, "b": 2}, ""),
    ("U", "root_level_merge_unchanged_for_none_empty_string_and_empty_array ('')", {"a": 1},
     [[_merge("", {"b": 2})]], {"a": 1, "b": 2}, ""),
    ("U", "root_level_merge_unchanged_for_none_empty_string_and_empty_array ([])", {"a": 1},
     [[_merge([], {"b": 2})]], {"a": 1, "b": 2}, ""),
    ("U", "root_merge_on_non_object_current_value_remains_silent_noop", "leaf",
     [[_merge(None, {"a": 1})]], Fails(0, "not_object"),
     "iii leaves the value and reports no error; we fail the op like every op that does not apply"),
    ("U", "single_string_path_equivalent_to_single_segment_array ('foo')", {},
     [[_merge("foo", {"x": 1})]], {"foo": {"x": 1}}, ""),
    ("U", "single_string_path_equivalent_to_single_segment_array (['foo'])", {},
     [[_merge(["foo"], {"x": 1})]], {"foo": {"x": 1}}, ""),
    ("U", "literal_dotted_segment_treated_as_one_key", {"a": {"b": {"preserved": True}}},
     [[_merge(["a.b"], {"x": 1})]], {"a": {"b": {"preserved": True}}, "a.b": {"x": 1}}, ""),
    ("U", "rejects_path_too_deep", {}, [[_merge(_DEEP, {"x": 1})]], _nested(_DEEP, {"x": 1}),
     "iii allows 32 path fields, we allow 64 (MAX_PATH_DEPTH)"),
    ("U", "rejects_oversized_segment", {}, [[_merge([_LONG], {"x": 1})]], {_LONG: {"x": 1}},
     "iii limits a path segment to 256 bytes; CONTRACT.md does not"),
    ("U", "rejects_empty_segment", {}, [[_merge(["a", ""], {"x": 1})]], {"a": {"": {"x": 1}}},
     "iii rejects an empty field in a list path; CONTRACT.md allows any str field"),
    ("U", "rejects_proto_polluted_path_segment", {},
     [[_merge(["__proto__"], {"x": 1})]], {"__proto__": {"x": 1}}, _NO_SINKS),
    ("U", "rejects_proto_polluted_value_top_level_key", {},
     [[_merge("foo", {"__proto__": {"polluted": True}})]],
     {"foo": {"__proto__": {"polluted": True}}}, _NO_SINKS),
    ("U", "rejects_value_too_deep", {}, [[_merge("foo", _nested(["n"] * 17, {}))]],
     {"foo": _nested(["n"] * 17, {})}, "iii limits a merge value to 16 levels; we bound values by size"),
    ("I", "walk_or_create makes a non-object value itself {} for a merge at a path", [1, 2],
     [[_merge(["a"], {"x": 1})]], {"a": {"x": 1}}, ""),
    # ---- through the store, several calls
    ("E", "merge_first_level_path_accumulates_siblings_across_calls", MISSING_KEY,
     [[_merge("session-1", {"ts:0001": "first chunk"})], [_merge("session-1", {"ts:0002": "second chunk"})]],
     {"session-1": {"ts:0001": "first chunk", "ts:0002": "second chunk"}}, ""),
    ("E", "merge_replaces_null_intermediate_along_nested_path", MISSING_KEY,
     [[_set("sessions", None)], [_merge(["sessions", "abc"], {"author": "alice"})]],
     {"sessions": {"abc": {"author": "alice"}}}, ""),
    ("E", "merge_then_remove_then_merge_recreates_field_cleanly", MISSING_KEY,
     [[_merge("session-1", {"a": 1}), _remove("session-1"), _merge("session-1", {"b": 2})]],
     {"session-1": {"b": 2}}, ""),
    ("E", "merge_with_proto_polluted_segment_returns_structured_error", MISSING_KEY,
     [[_merge(["__proto__", "polluted"], {"x": 1})]], {"__proto__": {"polluted": {"x": 1}}}, _NO_SINKS),
    ("E", "non_merge_ops_with_proto_polluted_path_return_structured_errors (append)", MISSING_KEY,
     [[_append("__proto__", 1)]], {"__proto__": [1]}, _NO_SINKS),
    ("E", "set_on_non_object_target_returns_structured_error_and_skips", MISSING_KEY,
     [[_set("", "leaf")], [_set("field", 1)]], Fails(0, "not_object"), ""),
    ("E", "append_type_mismatch_returns_structured_error_and_skips", MISSING_KEY,
     [[_set("count", 1)], [_append("count", "chunk")]], Fails(0, "type_mismatch"), ""),
    ("E", "append_on_non_object_target_returns_structured_error_and_skips", MISSING_KEY,
     [[_set("", "leaf")], [_append("events", "chunk")]], Fails(0, "not_object"), ""),
    ("E", "failed_update_ops_continue_and_report_original_indexes", MISSING_KEY,
     [[_set("", {"bad": "value", "events": {}})],
      [_incr("bad", 1), _set("__proto__", True), _append("events", "chunk"), _set("ok", True)]],
     Fails(0, "not_number"), _SKIPS),
    ("E", "increment_non_number_returns_structured_error_and_skips", MISSING_KEY,
     [[_set("name", "Ada")], [_incr("name", 1)]], Fails(0, "not_number"), ""),
    ("E", "decrement_non_number_returns_structured_error_and_skips", MISSING_KEY,
     [[_set("name", "Ada")], [_decr("name", 1)]], Fails(0, "not_number"), ""),
    ("E", "numeric_ops_and_remove_on_non_object_target_return_structured_errors (increment)", MISSING_KEY,
     [[_set("", "leaf")], [_incr("count", 1)]], Fails(0, "not_object"), ""),
    ("E", "numeric_ops_and_remove_on_non_object_target_return_structured_errors (decrement)", MISSING_KEY,
     [[_set("", "leaf")], [_decr("count", 1)]], Fails(0, "not_object"), ""),
    ("E", "numeric_ops_and_remove_on_non_object_target_return_structured_errors (remove)", MISSING_KEY,
     [[_set("", "leaf")], [_remove("count")]], Fails(0, "not_object"), ""),
    ("E", "remove_missing_path_remains_idempotent_and_silent", MISSING_KEY, [[_remove("missing")]], {}, ""),
    ("E", "issue_1552_case1_dotted_string_keeps_literal_segment", MISSING_KEY,
     [[_set("entityId", {"buffer": ["nested"]})], [_append("entityId.buffer", "flat")]],
     {"entityId": {"buffer": ["nested"]}, "entityId.buffer": "flat"}, ""),
    ("E", "issue_1552_case2_object_value_returns_type_mismatch", MISSING_KEY,
     [[_set("entityId", {"buffer": {"x": "y"}})], [_append(["entityId", "buffer"], "z")]],
     Fails(0, "type_mismatch"), ""),
    ("E", "issue_1552_case3_array_path_appends_to_nested_array", MISSING_KEY,
     [[_set("entityId", {"buffer": ["a"]})], [_append(["entityId", "buffer"], "b")]],
     {"entityId": {"buffer": ["a", "b"]}}, ""),
    ("E", "nested_append_creates_intermediate_objects_through_kv_store", MISSING_KEY,
     [[_append(["session", "abc", "events"], "first")]], {"session": {"abc": {"events": ["first"]}}}, ""),
    ("E", "nested_append_proto_pollution_rejected_at_intermediate_segment", MISSING_KEY,
     [[_append(["safe", "__proto__", "x"], "never")]], {"safe": {"__proto__": {"x": ["never"]}}}, _NO_SINKS),
    ("E", "nested_append_multi_op_partial_failure_retains_prior_successes", MISSING_KEY,
     [[_append(["session", "abc", "events"], "first"), _append(["__proto__", "polluted"], True),
       _append(["session", "abc", "events"], "third")]],
     {"session": {"abc": {"events": ["first", "third"]}}, "__proto__": {"polluted": [True]}}, _NO_SINKS),
    ("E", "nested_append_segments_path_round_trips_via_merge_path_segments", MISSING_KEY,
     [[_append(["a", "b"], 42)]], {"a": {"b": [42]}}, ""),
    ("E", "append_existing_empty_array_at_single_segment_pushes_value", MISSING_KEY,
     [[_set("buffer", [])], [_append("buffer", "x")]], {"buffer": ["x"]}, ""),
    ("E", "append_root_when_state_is_empty_array_pushes_value", MISSING_KEY,
     [[_set("", [])], [_append(None, "x")]], ["x"], ""),
    ("E", "nested_append_replaces_array_intermediate_with_object", MISSING_KEY,
     [[_set("a", [1, 2, 3])], [_append(["a", "b"], 42)]], {"a": {"b": [42]}}, ""),
    ("K", "test_builtin_kv_store_update_basic_operations", {"name": "A", "counter": 0},
     [[_set("name", "B")], [_incr("counter", 5)], [_decr("counter", 2)], [_remove("name")],
      [_merge(None, {"name": "C", "extra": "field"})]],
     {"counter": 3, "name": "C", "extra": "field"}, ""),
    ("K", "test_builtin_kv_store_update_multiple_ops_in_single_call", {"name": "A", "counter": 0},
     [[_set("name", "Z"), _incr("counter", 10), _set("status", "active")]],
     {"name": "Z", "counter": 10, "status": "active"}, ""),
    ("K", "test_update_new_object_with_increment", MISSING_KEY, [[_incr("counter", 1)]], {"counter": 1}, ""),
    ("K", "test_builtin_kv_store_update_append_operations",
     {"events": [{"kind": "start"}], "transcript": "hello", "object": {"nested": True},
      "user.name": ["A"], "user": {"name": ["B"]}},
     [[_append("events", {"kind": "chunk"}), _append("transcript", " world"),
       _append("missing_string", "created"), _append("missing_array", {"kind": "created"}),
       _append("object", "ignored"), _append("user.name", "C")]],
     Fails(4, "type_mismatch"), _SKIPS),
    ("K", "test_builtin_kv_store_update_append_missing_root", MISSING_KEY,
     [[_append("", "hello")]], "hello", ""),
    ("R", "test_update_append_redis", {"events": [], "transcript": "hello"},
     [[_append("events", {"kind": "chunk"}), _append("transcript", " world")]],
     {"events": [{"kind": "chunk"}], "transcript": "hello world"}, ""),
    ("R", "test_update_root_null_and_numeric_null_errors_redis", {"inc": None, "dec": None},
     [[_incr("inc", 1), _decr("dec", 1)]], Fails(0, "not_number"), _SKIPS),
    ("R", "test_update_empty_path_numeric_and_remove_ops_target_root_redis", 2,
     [[_incr("", 3)], [_decr("", 2)], [_remove("")]], None, ""),
    ("RE", "redis_nested_append_happy_path_through_lua_script", MISSING_KEY,
     [[_append(["session", "abc", "events"], "first")]], {"session": {"abc": {"events": ["first"]}}}, ""),
]
# fmt: on


def _run_calls(apply: Any, value: Any, calls: list[list[dict[str, Any]]]) -> Any:
    """Apply each call as its own update (the last one's error propagates); return the last value."""
    exists = value is not MISSING_KEY
    for call in calls:
        value = apply(value if exists else None, call, exists)
        exists = True
    return value


def _source(value: Any, raw_ops: Any, exists: bool) -> Any:
    try:
        return apply_ops(value, raw_ops, exists=exists)
    except UpdateError as exc:  # the model's error type, so both sides are checked alike
        raise RefError(exc.op_index, exc.code) from exc


@pytest.mark.parametrize(
    ("source", "test_name", "value", "calls", "expected", "differs"),
    III_CASES,
    ids=[f"{source}:{name}" for source, name, *_ in III_CASES],
)
@pytest.mark.parametrize("apply", [_source, ref_apply], ids=["source", "model"])
def test_iii_engine_cases(
    apply: Any,
    source: str,
    test_name: str,
    value: Any,
    calls: list[list[dict[str, Any]]],
    expected: Any,
    differs: str,
) -> None:
    """Each of the iii engine's own update-op cases (see III_SOURCES), for the source and the model."""
    assert source in III_SOURCES
    assert test_name
    before = canon(value)
    if isinstance(expected, Fails):
        with pytest.raises(RefError) as info:
            _run_calls(apply, value, calls)
        assert (info.value.index, info.value.code) == (expected.op_index, expected.code)
    else:
        assert canon(_run_calls(apply, value, calls)) == canon(expected)
    assert canon(value) == before
