"""Using state from inside Ray tasks and actors (Python remote calls)."""

from __future__ import annotations

import asyncio

import pytest
import ray

import shardstate
from shardstate import ops

pytestmark = pytest.mark.timeout(120)

#: the tests that also run on the Ray-call transport (the rest run on the default only)
BOTH_TRANSPORTS = pytest.mark.parametrize("state", ["socket", "ray"], indirect=True)


def test_connect_inside_a_task(state: shardstate.StateClient, group: str) -> None:
    @ray.remote
    def step(cluster: str) -> tuple[int, int]:
        first = shardstate.connect(cluster=cluster)
        second = shardstate.connect(cluster=cluster)
        first.set(group, "from-task", 42)
        # cached per worker process: the second connect reuses the first's link
        return id(first._link), id(second._link)

    a, b = ray.get(step.remote(state.cluster))
    assert a == b
    assert state.get(group, "from-task") == 42


@BOTH_TRANSPORTS
def test_client_passed_to_a_task(state: shardstate.StateClient, group: str) -> None:
    @ray.remote
    def step(client: shardstate.StateClient) -> object:
        return client.update(group, "k", [ops.increment("n", 5)]).new_value

    assert ray.get(step.remote(state)) == {"n": 5}
    assert state.get(group, "k") == {"n": 5}


def test_connect_inside_an_actor(state: shardstate.StateClient, group: str) -> None:
    @ray.remote
    class Step:
        def __init__(self, cluster: str) -> None:
            self.state = shardstate.connect(cluster=cluster)

        def run(self, n: int) -> list[object]:
            for i in range(n):
                self.state.update(group, "actor", [ops.append("items", i)])
            return self.state.list(group)

    actor = Step.remote(state.cluster)
    assert ray.get(actor.run.remote(3)) == [{"items": [0, 1, 2]}]
    ray.kill(actor)


@BOTH_TRANSPORTS
def test_async_client_inside_an_async_actor(state: shardstate.StateClient, group: str) -> None:
    @ray.remote
    class AsyncStep:
        async def run(self, cluster: str, n: int, transport: str) -> object:
            astate = await shardstate.connect_async(cluster=cluster, transport=transport)
            assert astate.transport == transport
            await asyncio.gather(*(astate.update(group, "a", [ops.increment("n")]) for _ in range(n)))
            return await astate.get(group, "a")

    actor = AsyncStep.remote()
    assert ray.get(actor.run.remote(state.cluster, 50, state.transport)) == {"n": 50}
    ray.kill(actor)


def test_client_pickles_small(state: shardstate.StateClient) -> None:
    import cloudpickle

    assert len(cloudpickle.dumps(state)) < 500
