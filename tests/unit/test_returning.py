"""``returning=`` on set and update (issue 10, item 6): what a write answers (pure engine)."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from shardstate._errors import InvalidInput
from shardstate.shards import commands as C
from shardstate.shards.commands import command
from shardstate.shards.engine import ShardEngine

INCR = [{"type": "increment", "path": "n"}]


def enc(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def run(engine: ShardEngine, kind: str, arg: Any, **opts: Any) -> Any:
    ((ok, payload),) = engine.execute_batch([command(kind, "g", "k", arg, opts or None)])
    assert ok, payload
    return payload


@pytest.mark.parametrize(
    ("returning", "old", "new"),
    [("both", True, True), ("new", False, True), ("old", True, False), ("none", False, False)],
)
def test_update_answers_only_what_was_asked(returning: str, old: bool, new: bool) -> None:
    engine = ShardEngine()
    run(engine, C.SET, enc({"n": 1, "pad": "x" * 10_000}))
    answer = run(engine, C.UPDATE, INCR, returning=returning)
    assert (answer[0] is not None, answer[1] is not None) == (old, new)
    if old:
        assert pickle.loads(answer[0])["n"] == 1
    if new:
        assert pickle.loads(answer[1])["n"] == 2
    assert pickle.loads(run(engine, C.GET, None))["n"] == 2  # the write happened either way


@pytest.mark.parametrize(
    ("returning", "old"), [("both", True), ("new", False), ("old", True), ("none", False)]
)
def test_set_answers_only_what_was_asked(returning: str, old: bool) -> None:
    engine = ShardEngine()
    run(engine, C.SET, enc("first"))
    answer = run(engine, C.SET, enc("second"), returning=returning)
    assert (answer[0] is not None) == old
    # the new value is the caller's own: it travels back only for "both" (as before)
    assert (answer[1] is not None) == (returning == "both")
    assert run(engine, C.GET, None) == enc("second")


@pytest.mark.parametrize("bad", ["all", "", None, 1, ["new"]])  # None too: absent means "both"
def test_a_bad_returning_is_invalid_input_and_writes_nothing(bad: Any) -> None:
    engine = ShardEngine()
    run(engine, C.SET, enc({"n": 1}))
    engine.take_changes()
    for kind, arg in ((C.SET, enc(2)), (C.UPDATE, INCR)):
        ((ok, error),) = engine.execute_batch([command(kind, "g", "k", arg, {"returning": bad})])
        assert ok is False
        assert isinstance(error, InvalidInput)
    assert not engine.take_changes()
    assert pickle.loads(run(engine, C.GET, None)) == {"n": 1}


def test_returning_is_part_of_the_call_an_op_id_names() -> None:
    engine = ShardEngine()
    first = run(engine, C.UPDATE, INCR, op_id="job", returning="none")
    assert first == (None, None)
    assert run(engine, C.UPDATE, INCR, op_id="job", returning="none") == first  # a retry
    ((ok, error),) = engine.execute_batch([command(C.UPDATE, "g", "k", INCR, {"op_id": "job"})])
    assert ok is False
    assert "reused for a different call" in str(error)
    assert pickle.loads(run(engine, C.GET, None)) == {"n": 1}
