"""Where a shard must run: by node id, else IP, else the one node; otherwise an error naming the node."""

from __future__ import annotations

import pytest

from shardstate.cluster.placement import place_shard
from shardstate.shards.storage import StorageError

ALIVE = [("node-a", "10.0.0.1"), ("node-b", "10.0.0.2")]


def test_new_shards_spread_over_the_alive_nodes() -> None:
    assert [place_shard(i, None, ALIVE) for i in range(3)] == [ALIVE[0], ALIVE[1], ALIVE[0]]


def test_a_known_shard_goes_to_its_node_by_id_then_by_ip() -> None:
    assert place_shard(0, {"node_id": "node-b", "node_ip": "10.9.9.9"}, ALIVE) == ALIVE[1]
    assert place_shard(0, {"node_id": "gone", "node_ip": "10.0.0.2"}, ALIVE) == ALIVE[1]


def test_a_one_node_cluster_takes_the_shard_whatever_its_address() -> None:
    assert place_shard(3, {"node_id": "gone", "node_ip": "10.9.9.9"}, ALIVE[:1]) == ALIVE[0]


def test_a_shard_whose_node_is_gone_names_that_node() -> None:
    with pytest.raises(StorageError) as err:
        place_shard(2, {"node_id": "node-gone", "node_ip": "10.0.0.77"}, ALIVE)
    message = str(err.value)
    assert "shard 2" in message
    assert "node-gone" in message
    assert "10.0.0.77" in message
    assert "not in the Ray cluster" in message


def test_no_alive_node_is_an_error() -> None:
    with pytest.raises(StorageError, match="no alive Ray node"):
        place_shard(0, None, [])
