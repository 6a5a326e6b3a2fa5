"""Clients on the shards' own connections (the default) and on Ray calls: what each really sends,
connection reuse across tasks, and exact results while shards are SIGKILLed under both transports."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from typing import Any

import pytest
import ray

import shardstate
from shardstate import ops
from shardstate.cluster.slots import slot_of

pytestmark = pytest.mark.timeout(300)


def wire_requests(state: shardstate.StateClient, index: int) -> tuple[int, int]:
    """``(requests over the connection, batches in all)`` shard ``index`` has answered."""
    info = state.shard_info()[index]
    return info["wire"]["requests"], info["batches"]


def owner(state: shardstate.StateClient, group: str) -> int:
    return state._link.current().owners[slot_of(group)]


def test_the_default_transport_is_the_shards_connection(state: shardstate.StateClient, group: str) -> None:
    assert state.transport == "socket"
    index = owner(state, group)
    wire_before, batches_before = wire_requests(state, index)
    for i in range(50):
        state.update(group, "n", [ops.increment("v")])
        assert state.get(group, "n") == {"v": i + 1}
    wire_after, batches_after = wire_requests(state, index)
    assert wire_after - wire_before >= 100  # every call went over the connection ...
    assert wire_after - wire_before == batches_after - batches_before  # ... and none as a Ray call
    # on the shard's own machine, over its Unix socket (in a directory only this user can enter)
    endpoint = state._link.current().endpoint(index)
    assert endpoint is not None
    assert endpoint.path is not None
    assert endpoint.target(state._link.my_ip) == endpoint.path
    assert os.stat(os.path.dirname(endpoint.path)).st_mode & 0o777 == 0o700
    assert state._link.connections is not None
    assert [c.address for c in state._link.connections._idle[index]] == [endpoint.path]


def test_the_ray_transport_sends_nothing_over_the_connection(
    state: shardstate.StateClient, group: str
) -> None:
    via_ray = shardstate.connect(cluster=state.cluster, transport="ray")
    assert via_ray.transport == "ray"
    index = owner(state, group)
    wire_before, batches_before = wire_requests(state, index)
    for _ in range(30):
        via_ray.update(group, "n", [ops.increment("v")])
    assert via_ray.get(group, "n") == {"v": 30}
    wire_after, batches_after = wire_requests(state, index)
    assert wire_after == wire_before
    assert batches_after - batches_before >= 31


def test_a_bad_transport_is_invalid_input(ray_session: None) -> None:
    with pytest.raises(shardstate.InvalidInput, match="transport"):
        shardstate.connect(cluster="anything", transport="carrier-pigeon")


@ray.remote(num_cpus=0.25)
def merge_one(state: shardstate.StateClient, group: str, i: int) -> int:
    state.update(group, "doc", [ops.set(f"r{i}", i), ops.increment("count")], returning="none")
    return os.getpid()


def test_tasks_reuse_one_connection_per_worker_process(state: shardstate.StateClient, group: str) -> None:
    index = owner(state, group)
    before = state.shard_info()[index]["wire"]["accepted"]
    pids = ray.get([merge_one.remote(state, group, i) for i in range(300)])
    accepted = state.shard_info()[index]["wire"]["accepted"] - before
    doc = state.get(group, "doc")
    assert doc["count"] == 300
    assert all(doc[f"r{i}"] == i for i in range(300))
    workers = len(set(pids))
    assert 1 <= accepted <= workers + 1  # one connection per worker process (+ this driver's), not per task


def kill_owner(state: shardstate.StateClient, group: str) -> int:
    pid = int(state.shard_info()[owner(state, group)]["pid"])
    os.kill(pid, signal.SIGKILL)
    return pid


def wait_for(predicate: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.parametrize("transport", ["socket", "ray"])
def test_threads_stay_exact_while_the_shard_is_sigkilled(
    state: shardstate.StateClient, group: str, transport: str
) -> None:
    """8 threads x 150 increments with automatic op_ids; the shard is SIGKILLed twice meanwhile.
    Every call is acknowledged once, none applied twice, and each thread's own log is in order."""
    client = shardstate.connect(cluster=state.cluster, transport=transport)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(150):
                client.update(group, "n", [ops.increment("v")])
                client.update(group, f"log{t}", [ops.append("seen", i)])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for goal in (150, 600):
        wait_for(lambda g=goal: (state.get(group, "n") or {}).get("v", 0) >= g, "traffic did not start")
        kill_owner(state, group)
    for thread in threads:
        thread.join(240)
    assert not errors, errors[:3]
    assert state.get(group, "n") == {"v": 8 * 150}
    for t in range(8):
        assert state.get(group, f"log{t}") == {"seen": list(range(150))}
    assert state.shard_info()[owner(state, group)]["restarted"] is True


@pytest.mark.parametrize("transport", ["socket", "ray"])
def test_asyncio_calls_keep_their_order_through_a_sigkill(
    state: shardstate.StateClient, group: str, transport: str
) -> None:
    """3,000 appends fired in order from one event loop without awaiting each (so three batches are
    in flight at a time); the shard is SIGKILLed in the middle. The list ends exactly 0..2999:
    nothing lost, nothing doubled, nothing reordered by the resend."""

    async def run() -> None:
        client = await shardstate.connect_async(cluster=state.cluster, transport=transport)
        await client.set(group, "list", {"seen": []})
        calls = []
        for i in range(3000):
            calls.append(asyncio.ensure_future(client.update(group, "list", [ops.append("seen", i)])))
            if i == 1500:
                await asyncio.to_thread(kill_owner, state, group)
            if i % 100 == 0:
                await asyncio.sleep(0)  # let batches leave while calls keep coming
        await asyncio.gather(*calls)

    asyncio.run(run())
    assert state.get(group, "list") == {"seen": list(range(3000))}


def test_a_shard_that_cannot_be_reached_over_its_connection_is_reached_through_ray(
    state: shardstate.StateClient, group: str
) -> None:
    """A loopback address of another node cannot be opened from here: such a shard is called
    through Ray (the map says so), and the calls still work."""
    from shardstate._link import ClusterLink
    from shardstate._transport import Endpoint

    link = ClusterLink(state.cluster, state.router, state.config, 60.0)
    view = link.refresh()
    index = owner(state, group)
    assert view.endpoint(index) is not None
    elsewhere = [Endpoint(e.host, e.port, "10.255.0.1") if e else None for e in view.endpoints]
    routes = {"epoch": view.epoch, "owners": view.owners, "handles": view.shards, "endpoints": elsewhere}
    link._adopt([routes])
    assert link.view is not None
    assert link.view.endpoint(index) is None
    client = shardstate.StateClient(link)
    wire_before, batches_before = wire_requests(state, index)
    client.set(group, "k", 1)
    assert client.get(group, "k") == 1
    wire_after, batches_after = wire_requests(state, index)
    assert wire_after == wire_before
    assert batches_after - batches_before >= 2
