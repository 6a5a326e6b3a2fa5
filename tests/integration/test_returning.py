"""``returning=`` through every front: sync, async, pipelines, bulk, the router (issue 10, item 6)."""

from __future__ import annotations

import asyncio

import pytest
import ray

import shardstate
from shardstate import InvalidInput, SetResult, ops

pytestmark = pytest.mark.timeout(120)


def test_set_and_update_return_what_was_asked(state: shardstate.StateClient, group: str) -> None:
    assert state.set(group, "k", {"n": 1}) == SetResult(old_value=None, new_value={"n": 1})
    assert state.set(group, "k", {"n": 2}, returning="old") == SetResult(old_value={"n": 1}, new_value=None)
    assert state.set(group, "k", {"n": 3}, returning="new") == SetResult(old_value=None, new_value={"n": 3})
    assert state.set(group, "k", {"n": 4}, returning="none") is None
    assert state.update(group, "k", [ops.increment("n")], returning="new") == SetResult(
        old_value=None, new_value={"n": 5}
    )
    assert state.update(group, "k", [ops.increment("n")], returning="old") == SetResult(
        old_value={"n": 5}, new_value=None
    )
    assert state.update(group, "k", [ops.increment("n")], returning="none") is None
    assert state.get(group, "k") == {"n": 7}
    with pytest.raises(InvalidInput, match="returning"):
        state.update(group, "k", [ops.increment("n")], returning="all")  # type: ignore[call-overload]
    assert state.get(group, "k") == {"n": 7}


def test_returning_in_pipelines_bulk_async_and_the_router(state: shardstate.StateClient, group: str) -> None:
    assert state.set_many(group, {"a": 1, "b": 2}, returning="none") == [None, None]
    with state.pipeline() as p:
        p.update(group, "doc", [ops.increment("n")], returning="none")
        p.set(group, "a", 10, returning="old")
        p.get(group, "doc")
    assert p.results == [None, SetResult(old_value=1, new_value=None), {"n": 1}]
    with pytest.raises(InvalidInput, match="unknown option"), state.pipeline() as q:
        q.set(group, "a", 1, system=True)  # internal flags are not options

    async def run() -> list[object]:
        astate = await shardstate.connect_async(state.cluster)
        return await asyncio.gather(
            astate.update(group, "doc", [ops.increment("n")], returning="new"),
            astate.set(group, "b", 20, returning="none"),
        )

    assert asyncio.run(run()) == [SetResult(old_value=None, new_value={"n": 2}), None]
    assert ray.get(state.router.update.remote(group, "doc", [ops.increment("n")], "none")) is None
    assert state.get(group, "doc") == {"n": 3}


@ray.remote
def merge_into_one_document(state: shardstate.StateClient, group: str, i: int) -> None:
    merge = [ops.merge("fields", {f"t{i}": i}), ops.increment("done")]
    assert state.update(group, "doc", merge, returning="none") is None


def test_fan_in_into_one_document_with_returning_none(state: shardstate.StateClient, group: str) -> None:
    ray.get([merge_into_one_document.remote(state, group, i) for i in range(200)])
    doc = state.get(group, "doc")
    assert doc["done"] == 200
    assert doc["fields"] == {f"t{i}": i for i in range(200)}
