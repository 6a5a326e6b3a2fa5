"""A multi-node state cluster on ``ray.cluster_utils.Cluster`` (run in its own process by
``test_multinode.py``; prints one JSON line of findings).

Three Ray nodes (head + two workers, each with a marker resource), one shard per node. Tasks pinned
to each node update groups owned by every shard; each shard reports how many batches it answered
over its own connection and how many in all.
"""

from __future__ import annotations

import json
import sys
import tempfile

import ray
from ray.cluster_utils import Cluster

import shardstate
from shardstate import ops
from shardstate.cluster.slots import slot_of

NODES = 3
PER_TASK = 20


@ray.remote(num_cpus=0)
def work(state: shardstate.StateClient, node: int, groups: list[str]) -> dict[str, object]:
    for group in groups:
        for _ in range(PER_TASK):
            state.update(group, "hits", [ops.increment(f"node{node}")], returning="none")
    return {"node_id": ray.get_runtime_context().get_node_id(), "transport": state.transport}


def main() -> int:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"node0": 1}})
    for i in range(1, NODES):
        cluster.add_node(num_cpus=1, resources={f"node{i}": 1})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cluster.wait_for_nodes()
    state = shardstate.connect(cluster="multinode", shards=NODES, storage=tempfile.mkdtemp())
    infos = state.shard_info()
    owners = state._link.current().owners
    groups = [
        next(f"g{s}-{i}" for i in range(1000) if owners[slot_of(f"g{s}-{i}")] == s) for s in range(NODES)
    ]
    before = [(i["wire"]["requests"], i["batches"]) for i in state.shard_info()]
    pinned = [work.options(resources={f"node{n}": 0.01}) for n in range(NODES)]
    ran = ray.get([task.remote(state, n, groups) for n, task in enumerate(pinned)], timeout=300)
    after = [(i["wire"]["requests"], i["batches"]) for i in state.shard_info()]
    values = [state.get(g, "hits") for g in groups]
    print(
        json.dumps(
            {
                "shard_nodes": [i["node_id"] for i in infos],
                "task_nodes": [r["node_id"] for r in ran],
                "transports": [r["transport"] for r in ran],
                "wire": [a[0] - b[0] for a, b in zip(after, before, strict=True)],
                "batches": [a[1] - b[1] for a, b in zip(after, before, strict=True)],
                "values": values,
            }
        )
    )
    shardstate.shutdown("multinode")
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
