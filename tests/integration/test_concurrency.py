"""Many Ray tasks racing on one group: every atomic update lands exactly once."""

from __future__ import annotations

import pytest
import ray

import shardstate
from shardstate import ops

pytestmark = pytest.mark.timeout(300)


@ray.remote
def hammer(client: shardstate.StateClient, group: str, times: int) -> int:
    for _ in range(times):
        client.update(group, "counter", [ops.increment("n")])
    return times


@ray.remote
def merge_one(group: str, cluster: str, i: int) -> None:
    state = shardstate.connect(cluster=cluster)  # attach by name inside the task
    state.update(group, "merged", [ops.merge("fields", {f"task-{i}": i * i}), ops.increment("done")])


def test_50_tasks_200_increments_each_is_exact(state: shardstate.StateClient, group: str) -> None:
    done = ray.get([hammer.remote(state, group, 200) for _ in range(50)])
    assert sum(done) == 10_000
    assert state.get(group, "counter") == {"n": 10_000}


def test_500_tasks_merge_distinct_fields(state: shardstate.StateClient, group: str) -> None:
    ray.get([merge_one.remote(group, state.cluster, i) for i in range(500)])
    value = state.get(group, "merged")
    assert value["done"] == 500
    assert value["fields"] == {f"task-{i}": i * i for i in range(500)}


def test_concurrent_threads_keep_per_caller_order(state: shardstate.StateClient, group: str) -> None:
    import threading

    def writer(name: str) -> None:
        for i in range(100):
            state.update(group, name, [ops.append("seen", i)])

    threads = [threading.Thread(target=writer, args=(f"w{t}",)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for t in range(4):
        assert state.get(group, f"w{t}") == {"seen": list(range(100))}
