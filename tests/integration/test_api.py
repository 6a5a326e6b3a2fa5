"""The public API end to end on a real 4-shard cluster (sync and async clients, router)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import ray

import shardstate
from shardstate import StateItem, ops

pytestmark = pytest.mark.timeout(120)

#: the tests that also run on the Ray-call transport (the rest run on the default only)
BOTH_TRANSPORTS = pytest.mark.parametrize("state", ["socket", "ray"], indirect=True)


@BOTH_TRANSPORTS
def test_set_get_delete_roundtrip(state: shardstate.StateClient, group: str) -> None:
    assert state.get(group, "a") is None
    first = state.set(group, "a", {"n": 1})
    assert (first.old_value, first.new_value) == (None, {"n": 1})
    old, new = state.set(group, "a", [1, 2])
    assert (old, new) == ({"n": 1}, [1, 2])
    assert state.get(group, "a") == [1, 2]
    assert state.set(group, "none", None)["new_value"] is None
    assert state.items(group) == [StateItem(key="a", value=[1, 2]), StateItem(key="none", value=None)]
    assert state.delete(group, "a") == [1, 2]
    assert state.delete(group, "a") is None
    assert state.get(group, "a") is None


def test_values_keep_python_types(state: shardstate.StateClient, group: str) -> None:
    class Point:  # defined here: cloudpickle carries it by value
        def __init__(self, x: int) -> None:
            self.x = x

    state.set(group, "p", Point(3))
    state.set(group, "t", (1, b"raw", {2, 3}))
    assert state.get(group, "p").x == 3
    assert state.get(group, "t") == (1, b"raw", {2, 3})


def test_items_in_insertion_order(state: shardstate.StateClient, group: str) -> None:
    keys = [f"k{i}" for i in (5, 3, 9, 1, 7)]
    for i, key in enumerate(keys):
        state.set(group, key, i)
    state.set(group, "k3", "again")  # re-set keeps its place
    state.delete(group, "k9")
    state.set(group, "k9", "moved")  # deleted and re-set moves to the end
    assert [item.key for item in state.items(group)] == ["k5", "k3", "k1", "k7", "k9"]
    assert state.list(group) == [0, "again", 3, 4, "moved"]


@BOTH_TRANSPORTS
def test_update_ops_and_errors(state: shardstate.StateClient, group: str) -> None:
    result = state.update(
        group,
        "job",
        [
            ops.merge(None, {"status": "running"}),
            {"type": "increment", "path": ["stats", "done"], "by": 2},
            ops.append("log", {"task": "a"}),
            ops.set("a.b", 1),
        ],
    )
    assert result.old_value is None
    assert result.new_value == {"status": "running", "stats": {"done": 2}, "log": [{"task": "a"}], "a.b": 1}
    before = state.get(group, "job")
    with pytest.raises(shardstate.UpdateError) as err:
        state.update(group, "job", [ops.increment(["stats", "done"]), ops.increment("status")])
    assert (err.value.op_index, err.value.code) == (1, "not_number")
    assert state.get(group, "job") == before  # all or nothing


@BOTH_TRANSPORTS
def test_clear_returns_count_and_list_groups(state: shardstate.StateClient) -> None:
    prefix = f"lg-{uuid.uuid4().hex[:6]}"
    groups = [f"{prefix}-{i:02d}" for i in range(30)]
    for i, g in enumerate(groups):
        for k in range(i % 3 + 1):
            state.set(g, f"k{k}", None if k == 0 else k)  # None values count too
    listed = [g for g in state.list_groups() if g.startswith(prefix)]
    assert listed == sorted(groups)
    assert state.list_groups() == sorted(state.list_groups())
    assert state.clear(groups[5]) == 3
    assert state.clear(groups[5]) == 0
    assert state.items(groups[5]) == []
    assert groups[5] not in state.list_groups()


def test_groups_spread_over_all_shards(state: shardstate.StateClient) -> None:
    before = {info["index"]: info["groups"] for info in state.shard_info()}
    names = [f"spread-{uuid.uuid4().hex}" for _ in range(1000)]

    @ray.remote
    def fill(client: shardstate.StateClient, chunk: list[str]) -> None:
        for name in chunk:
            client.set(name, "k", 1)

    ray.get([fill.remote(state, names[i::8]) for i in range(8)])
    after = {info["index"]: info["groups"] for info in state.shard_info()}
    added = [after[i] - before[i] for i in sorted(after)]
    assert sum(added) == 1000
    assert len(added) == 4
    assert all(0 < n <= 2 * 1000 / 4 for n in added), added


@BOTH_TRANSPORTS
def test_async_client(state: shardstate.StateClient, group: str) -> None:
    async def main() -> None:
        astate = await shardstate.connect_async(cluster=state.cluster, transport=state.transport)
        await astate.set(group, "x", {"n": 0})
        results = await asyncio.gather(*(astate.update(group, "x", [ops.increment("n")]) for _ in range(200)))
        assert sorted(r.new_value["n"] for r in results) == list(range(1, 201))
        assert await astate.get(group, "x") == {"n": 200}
        assert [i.key for i in await astate.items(group)] == ["x"]
        assert group in await astate.list_groups()
        with pytest.raises(shardstate.UpdateError):
            await astate.update(group, "x", [ops.append("n", 1)])
        assert await astate.clear(group) == 1

    asyncio.run(main())


def test_router_exposes_the_api(state: shardstate.StateClient, group: str) -> None:
    router = state.router
    ray.get(router.set.remote(group, "k", {"v": 1}))
    result = ray.get(router.update.remote(group, "k", [{"type": "increment", "path": "v"}]))
    assert result.new_value == {"v": 2}
    assert state.get(group, "k") == {"v": 2}  # same data the direct path sees
    assert ray.get(router.list_groups.remote()) == state.list_groups()
    with pytest.raises(shardstate.UpdateError):
        ray.get(router.update.remote(group, "k", [{"type": "nope"}]))
    assert ray.get(router.get.remote(group, "k")) == {"v": 2}


def test_attach_by_name_reports_mismatch(state: shardstate.StateClient) -> None:
    with pytest.warns(shardstate.ClusterMismatchWarning, match="shards=4"):
        other = shardstate.connect(cluster=state.cluster, shards=7)
    assert other.config["shards"] == 4
