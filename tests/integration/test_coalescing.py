"""Coalescing clients and pipelines: batched on the wire, exact and individually answered."""

from __future__ import annotations

import asyncio
import sys
import threading
import types
from typing import Any

import pytest

import shardstate
from shardstate import UpdateError, ops
from shardstate._requests import set_request, update_request
from shardstate.cluster.slots import slot_of

pytestmark = pytest.mark.timeout(300)

#: the tests that also run on the Ray-call transport (the rest run on the default only)
BOTH_TRANSPORTS = pytest.mark.parametrize("state", ["socket", "ray"], indirect=True)


def owner_counters(state: shardstate.StateClient, group: str) -> tuple[int, int]:
    info = state.shard_info()[state._link.current().owners[slot_of(group)]]
    return info["batches"], info["commands"]


@BOTH_TRANSPORTS
def test_threads_coalesce_and_stay_exact(state: shardstate.StateClient, group: str) -> None:
    b0, c0 = owner_counters(state, group)
    start = threading.Barrier(16)

    def worker(t: int) -> None:
        start.wait()
        for i in range(625):
            state.update(group, "hot", [ops.increment("n")])
            state.update(group, f"own-{t}", [ops.append("seen", i)])  # one caller's order on one key

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert state.get(group, "hot") == {"n": 10_000}
    for t in range(16):
        assert state.get(group, f"own-{t}") == {"seen": list(range(625))}
    b1, c1 = owner_counters(state, group)
    calls, commands = b1 - b0, c1 - c0
    assert commands >= 20_000
    assert calls < commands / 2, f"{commands} commands in {calls} actor calls: not coalesced"


@BOTH_TRANSPORTS
def test_asyncio_tasks_coalesce_keep_order_and_isolate_errors(
    state: shardstate.StateClient, group: str
) -> None:
    async def main() -> None:
        astate = await shardstate.connect_async(cluster=state.cluster, transport=state.transport)
        b0, c0 = owner_counters(state, group)
        results = await asyncio.gather(
            *(astate.update(group, "hot", [ops.increment("n")]) for _ in range(10_000))
        )
        assert sorted(r.new_value["n"] for r in results) == list(range(1, 10_001))
        b1, c1 = owner_counters(state, group)
        assert (c1 - c0) / (b1 - b0) > 10, "asyncio calls were not coalesced"
        # tasks created in order keep their order on one key
        await asyncio.gather(*(astate.update(group, "ordered", [ops.append("seen", i)]) for i in range(500)))
        assert (await astate.get(group, "ordered")) == {"seen": list(range(500))}
        # an error in one coalesced op fails only that op
        await astate.set(group, "mixed", {"n": 0, "s": "text"})
        calls = [
            astate.update(group, "mixed", [ops.increment("s" if i % 10 == 0 else "n")]) for i in range(200)
        ]
        outcomes: list[Any] = await asyncio.gather(*calls, return_exceptions=True)
        failed = [i for i, o in enumerate(outcomes) if isinstance(o, UpdateError)]
        assert failed == list(range(0, 200, 10))
        assert all(o.code == "not_number" for o in outcomes if isinstance(o, UpdateError))
        assert (await astate.get(group, "mixed"))["n"] == 180

    asyncio.run(main())


def test_pipeline_results_in_order_with_per_op_errors(state: shardstate.StateClient, group: str) -> None:
    other = group + "-other"
    with state.pipeline() as p:
        p.set(group, "a", 1)
        p.update(group, "a", [ops.increment("n")])  # fails: a is an int
        p.set(other, "b", {"x": 1})
        p.update(other, "b", [ops.increment("x", 2)])
        p.get(group, "a")
        p.get(other, "missing")
        p.delete(other, "b")
    r = p.results
    assert r is not None
    assert r[0] == shardstate.SetResult(old_value=None, new_value=1)
    assert isinstance(r[1], UpdateError)
    assert r[1].code == "not_object"
    assert r[3].new_value == {"x": 3}
    assert r[4:] == [1, None, {"x": 3}]
    with pytest.raises(shardstate.InvalidInput):  # a bad call is refused when it is queued
        state.pipeline().set("", "k", 1)


@BOTH_TRANSPORTS
def test_bulk_helpers_and_async_pipeline(state: shardstate.StateClient, group: str) -> None:
    results = state.set_many(group, {f"k{i}": i for i in range(100)})
    assert [r.new_value for r in results] == list(range(100))
    assert state.get_many(group, ["k3", "nope", "k99"]) == [3, None, 99]

    async def main() -> list[Any]:
        astate = await shardstate.connect_async(cluster=state.cluster, transport=state.transport)
        async with astate.pipeline() as p:
            for i in range(50):
                p.update(group, f"k{i}", [ops.set("", i * 10)])
            p.get(group, "k7")
        assert await astate.get_many(group, ["k1", "k2"]) == [10, 20]
        return p.results or []

    out = asyncio.run(main())
    assert out[-1] == 70
    assert [r.new_value for r in out[:50]] == [i * 10 for i in range(50)]


class Unimportable(str):
    """A str the shards cannot unpickle: its module exists in this process only."""


_HERE_ONLY = types.ModuleType("shardstate_test_here_only")
Unimportable.__module__ = _HERE_ONLY.__name__
_HERE_ONLY.Unimportable = Unimportable  # type: ignore[attr-defined]
sys.modules[_HERE_ONLY.__name__] = _HERE_ONLY


@BOTH_TRANSPORTS
def test_lanes_keep_several_batches_in_flight_in_order(state: shardstate.StateClient, group: str) -> None:
    from shardstate import _coalesce

    async def main() -> tuple[int, int]:
        astate = await shardstate.connect_async(cluster=state.cluster, transport=state.transport)
        b0, c0 = owner_counters(state, group)
        n = 3 * _coalesce.MAX_BATCH
        await asyncio.gather(*(astate.update(group, "seq", [ops.append("seen", i)]) for i in range(n)))
        assert (await astate.get(group, "seq")) == {"seen": list(range(n))}
        b1, c1 = owner_counters(state, group)
        return b1 - b0, c1 - c0

    calls, commands = asyncio.run(main())
    # every call queued on one turn of the loop: split over the in-flight places, not sent as one
    assert commands >= 3 * _coalesce.MAX_BATCH + 1
    assert _coalesce.MAX_IN_FLIGHT <= calls < 50


class Unpicklable(str):
    """A str no pickler can write."""

    def __reduce__(self) -> Any:
        raise TypeError("not today")

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("not today")


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (Unimportable("x"), "unpickled"),  # the client pickles it, the shard cannot unpickle it
        (Unpicklable("x"), "pickled"),  # nothing can pickle it: it never leaves the client
    ],
)
def test_a_call_that_cannot_travel_fails_alone(
    state: shardstate.StateClient, group: str, bad: str, message: str
) -> None:
    async def main() -> list[Any]:
        astate = await shardstate.connect_async(cluster=state.cluster, transport=state.transport)
        values = [bad if i == 7 else i for i in range(40)]
        calls = [astate.update(group, f"k{i}", [ops.set("v", v)]) for i, v in enumerate(values)]
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(main())
    assert isinstance(outcomes[7], shardstate.InvalidInput)
    assert message in str(outcomes[7])
    assert [o.new_value for i, o in enumerate(outcomes) if i != 7] == [{"v": i} for i in range(40) if i != 7]
    assert state.get(group, "k7") is None


def test_a_batch_the_shard_cannot_unpickle_fails_only_the_bad_call_in_a_pipeline(
    state: shardstate.StateClient, group: str
) -> None:
    with state.pipeline() as p:
        p.update(group, "s1", [ops.set("v", 1)])
        p.update(group, "s2", [ops.set("v", Unimportable("y"))])
        p.get(group, "s1")
    assert p.results is not None
    assert p.results[0].new_value == {"v": 1}
    assert isinstance(p.results[1], shardstate.InvalidInput)
    assert p.results[2] == {"v": 1}


def test_unpicklable_calls_fail_typed_from_threads_and_pipelines(
    state: shardstate.StateClient, group: str
) -> None:
    with pytest.raises(shardstate.InvalidInput):
        state.update(group, "u", [ops.set("v", Unpicklable("x"))])
    owners = state._link.current().owners
    mine = owners[slot_of(group)]
    other = next(g for g in (f"{group}-{i}" for i in range(100)) if owners[slot_of(g)] != mine)
    bad = update_request(group, "u", [ops.set("v", Unpicklable("x"))])
    reqs = [set_request(other, "before", 1, 1 << 20), bad]
    with pytest.raises(shardstate.InvalidInput):  # refused before anything is sent, on any shard
        state._run_many(reqs)
    assert state.get(other, "before") is None
    assert state.get(group, "before") is None
    assert state.get(group, "u") is None
