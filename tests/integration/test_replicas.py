"""``replicas=`` on the session's one-node Ray: settings, a degraded start, and a member that dies
(its replacement cannot go elsewhere: one node) while its shard keeps serving. Failover across
nodes is in ``tests/multinode/test_failover.py``."""

from __future__ import annotations

import os
import signal
import time
import warnings
from typing import Any

import pytest

import shardstate
from shardstate import InvalidInput, ops
from shardstate.cluster.bootstrap import DegradedWarning, find_router

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("bad", [-1, 5, "1", 1.0, True])
def test_a_bad_replica_count_is_invalid_input_and_creates_nothing(
    new_cluster: dict[str, str], bad: Any
) -> None:
    with pytest.raises(InvalidInput, match="replicas"):
        shardstate.connect(**new_cluster, replicas=bad)
    assert find_router(new_cluster["cluster"]) is None


def test_the_default_on_one_node_is_no_replicas(new_cluster: dict[str, str]) -> None:
    state = shardstate.connect(**new_cluster, shards=1)
    assert state._link.config["replicas"] == 0
    info = state.shard_info()[0]
    assert info["member"] is None
    assert info["role"] == "primary"


def test_more_replicas_than_nodes_start_degraded_and_say_so(new_cluster: dict[str, str]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = shardstate.connect(**new_cluster, shards=2, replicas=1)
    degraded = [w for w in caught if issubclass(w.category, DegradedWarning)]
    assert len(degraded) == 2, [str(w.message) for w in caught]  # one per shard
    assert "0 of 1 backups in sync" in str(degraded[0].message)
    for i in range(50):
        state.update(f"g{i % 4}", "n", [ops.increment("c")])
    assert [state.get(f"g{i}", "n") for i in range(4)] == [{"c": 13}, {"c": 13}, {"c": 12}, {"c": 12}]
    info = state.shard_info()
    for shard in info:
        assert shard["role"] == "primary"
        assert shard["term"] == 1
        assert shard["replica_set"]["degraded"]
        assert len(shard["members"]) == 1  # no second node to put a backup on
        assert shard["replication"]["in_sync"] == []


def test_a_killed_lone_primary_of_a_durable_cluster_comes_back_from_its_file(
    new_cluster: dict[str, str],
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegradedWarning)
        state = shardstate.connect(**new_cluster, shards=1, replicas=1)
    for _ in range(20):
        state.update("g", "n", [ops.increment("c")])
    before = state.shard_info()[0]
    os.kill(before["pid"], signal.SIGKILL)
    for _ in range(20):  # clients wait while Ray restarts it and the router promotes it again
        state.update("g", "n", [ops.increment("c")])
    assert state.get("g", "n") == {"c": 40}
    deadline = time.monotonic() + 60
    while True:
        after = state.shard_info()[0]
        if after.get("term", 0) > before["term"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert after["pid"] != before["pid"]
    assert after["term"] == before["term"] + 1  # a new term, same member, from its own file
    assert after["member"] == before["member"]


def test_a_replicated_durable_cluster_comes_back_after_shutdown(new_cluster: dict[str, str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegradedWarning)
        state = shardstate.connect(**new_cluster, shards=2, replicas=1)
        for i in range(30):
            state.update(f"g{i % 3}", "n", [ops.increment("c")])
        term = state.shard_info()[0]["term"]
        assert shardstate.shutdown(new_cluster["cluster"])
        again = shardstate.connect(cluster=new_cluster["cluster"], storage=new_cluster["storage"])
    assert [again.get(f"g{i}", "n") for i in range(3)] == [{"c": 10}] * 3
    assert again.shard_info()[0]["term"] == term + 1  # the same member, from its file, a new term
