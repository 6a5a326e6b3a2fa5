"""Byte bounds on a shard's answers (issue 9, item 9): deferral, lane fences, pages (pure)."""

from __future__ import annotations

import pickle
from typing import Any

import pytest

from shardstate._errors import Deferred, InvalidInput
from shardstate.shards import commands as C
from shardstate.shards import engine as engine_module
from shardstate.shards.commands import command
from shardstate.shards.engine import ShardEngine


@pytest.fixture
def small_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Budgets small enough to reach with a handful of 1 KiB values."""
    monkeypatch.setattr(engine_module, "RESPONSE_BUDGET", 10 * 1024)
    monkeypatch.setattr(engine_module, "PAGE_BYTES", 4 * 1024)


def filled(n: int = 40, size: int = 1024) -> ShardEngine:
    engine = ShardEngine(clock=lambda: 1000.0)
    for i in range(n):  # one batch each: a batch of them would itself reach the answer budget
        ((ok, _),) = engine.execute_batch([command(C.SET, "g", f"k{i:03}", bytes([i % 250]) * size)])
        assert ok
    return engine


def deferred(result: tuple[bool, Any]) -> bool:
    return result[0] is False and isinstance(result[1], Deferred)


@pytest.mark.usefixtures("small_bounds")
def test_a_batch_stops_answering_at_its_budget_and_defers_the_rest_unexecuted() -> None:
    engine = filled()
    batch = [command(C.GET, "g", f"k{i:03}") for i in range(20)]
    batch.insert(15, command(C.SET, "g", "late", b"x"))  # a write after the budget: not applied
    results = engine.execute_batch(batch)
    head = [r for r in results if not deferred(r)]
    assert 10 <= len(head) <= 11  # the budget is 10 KiB of values, the command that crosses it runs
    assert all(deferred(r) for r in results[len(head) :])  # a tail, nothing after it ran
    assert engine.store.get("g", "late") is None
    # sent again, the tail runs (the first command of a batch always runs)
    again = engine.execute_batch(batch[len(head) :])
    assert not deferred(again[0])
    assert all(ok for ok, _ in engine.execute_batch([command(C.GET, "g", "k000")]))


@pytest.mark.usefixtures("small_bounds")
def test_a_deferral_fences_the_lane_until_it_resumes() -> None:
    engine = filled()
    gets = [command(C.GET, "g", f"k{i:03}") for i in range(20)]
    first = engine.execute_batch(gets, lane="L")
    cut = next(i for i, r in enumerate(first) if deferred(r))
    # the lane's next batch was already on its way: deferred whole, nothing executed
    later = engine.execute_batch([command(C.SET, "g", "after", b"1")], lane="L")
    assert deferred(later[0])
    assert engine.store.get("g", "after") is None
    # other lanes and lane-less callers are not held up
    assert engine.execute_batch([command(C.GET, "g", "k001")], lane="other")[0][0] is True
    assert engine.execute_batch([command(C.GET, "g", "k001")])[0][0] is True
    # the client sends the deferred calls first, with resume: the fence lifts
    resumed = engine.execute_batch(gets[cut:] + [command(C.SET, "g", "after", b"1")], lane="L", resume=True)
    assert resumed[0][0] is True
    tail = [r for r in resumed if deferred(r)]
    if not tail:
        assert engine.store.get("g", "after") is not None


def test_fenced_lanes_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(engine_module, "FENCED_LANES", 3)
    engine = ShardEngine()
    for lane in "abcde":
        engine.fence(lane)
    assert list(engine._fenced) == ["c", "d", "e"]


@pytest.mark.usefixtures("small_bounds")
@pytest.mark.parametrize("kind", [C.ITEMS, C.LIST])
def test_a_large_group_answers_in_pages(kind: str) -> None:
    engine = filled(40)
    rows: list[Any] = []
    start: int | None = None
    pages = 0
    while True:
        ((ok, payload),) = engine.execute_batch([command(kind, "g", None, start)])
        assert ok
        pages += 1
        if isinstance(payload, tuple):
            page, start = payload
            assert sum(len(r if kind == C.LIST else r[1]) for r in page) <= 4 * 1024 + 1024
            rows.extend(page)
            continue
        rows.extend(payload)
        break
    assert pages >= 10
    expected = [bytes([i % 250]) * 1024 for i in range(40)]
    assert rows == (expected if kind == C.LIST else [(f"k{i:03}", v) for i, v in enumerate(expected)])


@pytest.mark.parametrize("start", [-1, "0", 1.5, True, [0]])
def test_a_bad_page_start_is_invalid_input(start: Any) -> None:
    engine = filled(3, 8)
    ((ok, error),) = engine.execute_batch([command(C.ITEMS, "g", None, start)])
    assert ok is False
    assert isinstance(error, InvalidInput)


def test_a_small_group_answers_in_one_plain_list() -> None:
    engine = filled(3, 8)
    ((ok, payload),) = engine.execute_batch([command(C.ITEMS, "g")])
    assert ok
    assert isinstance(payload, list)
    assert len(payload) == 3
    assert pickle.loads(pickle.dumps(payload)) == payload
