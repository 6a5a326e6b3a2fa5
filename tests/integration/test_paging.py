"""``group_counts()`` and ``page()`` through both transports and the async client."""

from __future__ import annotations

import asyncio
import pickle

import pytest
import ray

import shardstate
from shardstate.cluster.slots import slot_of
from shardstate.shards import commands as C

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("state", ["socket", "ray"], indirect=True)
def test_counts_and_pages(state: shardstate.StateClient, group: str) -> None:
    state.set_many(group, {f"k{i:03}": i for i in range(250)})
    state.set(group + ":b", "x", None)
    counts = state.group_counts()
    assert counts[group] == 250
    assert counts[group + ":b"] == 1
    assert list(counts) == sorted(counts)
    keys, cursor, pages = [], None, 0
    while True:
        page = state.page(group, limit=100, cursor=cursor)
        pages += 1
        keys += [item.key for item in page.items]
        assert all(item.value == int(item.key[1:]) for item in page.items)
        cursor = page.next_cursor
        if cursor is None:
            break
    assert keys == [f"k{i:03}" for i in range(250)]
    assert pages == 3
    only = state.page(group, prefix="k24", limit=1000)
    assert [i.key for i in only.items] == [f"k{i}" for i in range(240, 250)]
    assert only.next_cursor is None
    versions = {i.key: i.version for i in state.page(group, limit=1000).items}
    assert versions["k007"] == state.get_entry(group, "k007").version


def test_async_client_counts_and_pages(state: shardstate.StateClient, group: str) -> None:
    async def main() -> tuple[dict[str, int], shardstate.ItemPage]:
        astate = await shardstate.connect_async(cluster=state.cluster)
        await astate.set(group, "b", 2)
        await astate.set(group, "a", 1)
        return await astate.group_counts(), await astate.page(group)

    counts, page = asyncio.run(main())
    assert counts[group] == 2
    assert [(i.key, i.value) for i in page.items] == [("a", 1), ("b", 2)]


@pytest.mark.parametrize(
    "kwargs",
    [{"limit": 0}, {"limit": 1001}, {"cursor": "%%%"}, {"cursor": ""}, {"prefix": 5}, {"limit": "9"}],
)
def test_bad_page_arguments(state: shardstate.StateClient, group: str, kwargs: dict[str, object]) -> None:
    with pytest.raises(shardstate.InvalidInput):
        state.page(group, **kwargs)  # type: ignore[arg-type]


def test_bad_page_command_sent_straight_to_a_shard_changes_nothing(
    state: shardstate.StateClient, group: str
) -> None:
    """Attack the shard, not the client: malformed page/counts commands answer InvalidInput."""
    state.set(group, "k", 1)
    view = state._link.current()
    shard = view.shards[view.owners[slot_of(group)]]
    bad = [
        C.command(C.PAGE, group, None, ("x", -5, None)),
        C.command(C.PAGE, group, None, [None, 10, ""]),
        C.command(C.PAGE, group, None, (None, 10, b"bytes")),
        C.command(C.COUNTS, None, None, None, "not a dict"),
    ]
    answer = pickle.loads(ray.get(shard.run.remote(pickle.dumps(bad))))
    assert [ok for ok, _ in answer] == [False] * len(bad)
    assert all(isinstance(err, shardstate.InvalidInput) for _, err in answer)
    assert state.get(group, "k") == 1
    assert state.group_counts()[group] == 1
