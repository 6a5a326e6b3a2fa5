"""Bad input gets a typed error, changes nothing, and kills no actor."""

from __future__ import annotations

import os
import pickle
import threading
from typing import Any

import pytest
import ray

import shardstate
from shardstate import InvalidInput, Unavailable, UpdateError, ValueTooLarge, ops
from shardstate.shards import commands as C

pytestmark = pytest.mark.timeout(120)


def shard_pids(state: shardstate.StateClient) -> list[int]:
    return [info["pid"] for info in state.shard_info()]


BAD_CALLS: list[tuple[str, Any, type[Exception]]] = [
    ("empty group", lambda s, g: s.set("", "k", 1), InvalidInput),
    ("int group", lambda s, g: s.get(7, "k"), InvalidInput),
    ("None key", lambda s, g: s.set(g, None, 1), InvalidInput),
    ("empty key", lambda s, g: s.delete(g, ""), InvalidInput),
    ("NUL key", lambda s, g: s.set(g, "a\x00b", 1), InvalidInput),
    ("oversized group", lambda s, g: s.list("g" * 513), InvalidInput),
    ("oversized key", lambda s, g: s.update(g, "é" * 257, [ops.increment("n")]), InvalidInput),
    ("unknown op", lambda s, g: s.update(g, "doc", [{"type": "explode", "path": "n"}]), UpdateError),
    ("ops not a list", lambda s, g: s.update(g, "doc", {"type": "increment", "path": "n"}), UpdateError),
    ("merge a non-dict", lambda s, g: s.update(g, "doc", [{"type": "merge", "value": [1]}]), UpdateError),
    ("increment a string", lambda s, g: s.update(g, "doc", [ops.increment("name")]), UpdateError),
    ("unpicklable value", lambda s, g: s.set(g, "doc", threading.Lock()), InvalidInput),
]


@pytest.mark.parametrize(("label", "call", "error"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_call_is_typed_and_harmless(
    state: shardstate.StateClient, group: str, label: str, call: Any, error: type[Exception]
) -> None:
    state.set(group, "doc", {"n": 1, "name": "x"})
    pids = shard_pids(state)
    with pytest.raises(error):
        call(state, group)
    assert state.items(group) == [shardstate.StateItem(key="doc", value={"n": 1, "name": "x"})]
    assert shard_pids(state) == pids  # no shard died or restarted
    assert state.update(group, "doc", [ops.increment("n")]).new_value["n"] == 2  # still serving


def test_too_large_value_and_update_result(new_cluster: dict[str, str]) -> None:
    small = shardstate.connect(**new_cluster, shards=1, max_value_size=1024)
    with pytest.raises(ValueTooLarge) as err:
        small.set("g", "big", "x" * 2000)
    assert err.value.limit == 1024
    assert err.value.size > 1024
    small.set("g", "doc", {"s": "x" * 600})
    with pytest.raises(ValueTooLarge):  # the update's result is too large: checked by the shard
        small.update("g", "doc", [ops.append("s", "y" * 600)])
    assert small.get("g", "doc") == {"s": "x" * 600}
    assert small.get("g", "big") is None


def test_garbage_sent_straight_to_a_shard(state: shardstate.StateClient, group: str) -> None:
    """Malformed commands and frames, bypassing every client check: typed errors, nothing changes,
    the same shard process keeps serving."""
    shard = state._link.current().shard_for(group)
    state.set(group, "k", 1)
    state.set(group, "doc", {"n": 1}, op_id="first")
    pids = shard_pids(state)
    before = state.items(group)
    entry = state.get_entry(group, "doc")
    huge_ops = [{"type": "increment", "path": "n"}] * 100_000 + [{"type": "explode"}]
    garbage = [
        "not a tuple",
        ("set",),
        ("nope", group, "k", None, None),
        (C.SET, group, "k", {"not": "bytes"}, None),
        (C.UPDATE, group, "k", "ops?", None),
        (C.GET, None, "k", None, None),
        (C.SET, group, "k", pickle.dumps(2), "opts not a dict"),
        (C.SET, group, "k", pickle.dumps(2), {"op_id": 7}),
        (C.SET, group, "k", pickle.dumps(2), {"ttl": -1}),
        (C.SET, group, "k", pickle.dumps(2), {"expected_version": "x"}),
        (C.UPDATE, group, "doc", huge_ops, None),  # fails at its last op: all or nothing
        (C.UPDATE, group, "doc", [{"type": "set", "path": ["a"] * 1000, "value": 1}], None),
        (C.SET, group, "doc", pickle.dumps("other"), {"op_id": "first"}),  # op_id reused: refused
        (C.SET, "__shardstate:triggers", "x", pickle.dumps("junk"), None),  # reserved group
        (C.CLEAR, "__shardstate:dead_letters", None, None, None),
        (C.SET, "g" * 600, "k", pickle.dumps(1), None),
        (C.GET, group, "k", None, None),
    ]
    results = ray.get(shard.execute.remote(garbage))
    assert [ok for ok, _ in results] == [False] * (len(garbage) - 1) + [True]
    assert all(isinstance(err, shardstate.StateError) for _, err in results[:-1])
    assert ray.get(shard.execute.remote("not a batch"))[0][0] is False
    # frames that are not a batch at all: truncated, garbage, the wrong shape
    frames = [b"", b"\x80\x05garbage", pickle.dumps([("get",)])[:-3], pickle.dumps({"a": 1}), os.urandom(64)]
    for frame in frames:
        answer = pickle.loads(ray.get(shard.run.remote(frame)))
        assert all(ok is False for ok, _ in answer)
    assert state.items(group) == before
    assert state.get_entry(group, "doc") == entry
    assert shard_pids(state) == pids  # no shard died or restarted
    assert state.update(group, "doc", [ops.increment("n")]).new_value == {"n": 2}


def test_router_survives_bad_calls(state: shardstate.StateClient, group: str) -> None:
    with pytest.raises(InvalidInput):
        ray.get(state.router.set.remote("", "k", 1))
    with pytest.raises(UpdateError):
        ray.get(state.router.update.remote(group, "k", "garbage"))
    assert ray.get(state.router.get.remote(group, "missing")) is None


def test_calls_after_shutdown_raise_unavailable(new_cluster: dict[str, str]) -> None:
    name = new_cluster["cluster"]
    doomed = shardstate.connect(**new_cluster, shards=2)
    doomed.set("g", "k", 1)
    shard = doomed._link.current().shards[0]
    assert shardstate.shutdown(name) is True
    with pytest.raises(Unavailable):
        doomed.get("g", "k")
    with pytest.raises(Unavailable):
        doomed.list_groups()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(shard.ping.remote(), timeout=30)  # the actors are really gone
    assert shardstate.shutdown(name) is False
    # a client whose link was not closed locally (e.g. in another process) also gets Unavailable
    again = shardstate.connect(**new_cluster)
    stale = shardstate.StateClient(again._link.__class__(name, again.router, again.config, 10.0))
    stale._link.refresh()
    assert shardstate.shutdown(name) is True
    with pytest.raises(Unavailable):
        stale.get("g", "k")
