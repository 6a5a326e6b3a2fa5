"""What replicas cost, and how long a node loss stalls writes (one run, one machine).

On a ``ray.cluster_utils.Cluster`` (head + 3 worker nodes, all on this machine):

1. the price of ``replicas=1`` next to ``replicas=0`` (same cluster, same shards, durability ``os``):
   single-op ``update`` and ``get`` p50/p99 from the driver, and a fan-in of N Ray tasks each
   updating its own key plus a shared counter;
2. node loss: ``--runs`` times (default 10), under a write load, remove the node of a primary
   (``allow_graceful=False``), measure the longest time any group went without an acknowledged
   write and the time until every shard has a backup in sync again, check that no acknowledged
   write was lost, then add a node back.

Prints both tables and writes ``bench/results/failover.json``.

    python -m bench.failover [--runs 10] [--ops 2000] [--tasks 2000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import ray
from ray.cluster_utils import Cluster

import shardstate
from bench._common import percentile, report
from bench.faultload import Load, groups_per_shard, healthy, longest_stall, wait_for
from shardstate import ops

SHARDS = 3


@ray.remote  # one CPU each: workers are reused (not a new process per task)
def merge(state: shardstate.StateClient, group: str, i: int) -> None:
    """One fan-in task: its own result, and the shared counter."""
    with state.pipeline() as p:
        p.set(group, f"r{i}", {"i": i}, returning="none")
        p.update(group, "done", [ops.increment("n")], returning="none")


def price(state: shardstate.StateClient, label: str, n_ops: int, tasks: int) -> dict[str, Any]:
    """Single-op latency and fan-in throughput on ``state``."""
    group = groups_per_shard(state, SHARDS, 1)[0]
    state.set(group, "k", {"n": 0})
    updates, gets = [], []
    for _ in range(n_ops):
        t = time.perf_counter()
        state.update(group, "k", [ops.increment("n")], returning="none")
        updates.append(time.perf_counter() - t)
    for _ in range(n_ops):
        t = time.perf_counter()
        state.get(group, "k")
        gets.append(time.perf_counter() - t)
    fan = f"fan-{label}"
    ray.get([merge.remote(state, fan, i) for i in range(50)])  # warm the workers
    state.clear(fan)
    started = time.perf_counter()
    ray.get([merge.remote(state, fan, i) for i in range(tasks)], timeout=600)
    seconds = time.perf_counter() - started
    assert state.get(fan, "done") == {"n": tasks}
    return {
        "cluster": label,
        "update p50 µs": statistics.median(updates) * 1e6,
        "update p99 µs": percentile(updates, 0.99) * 1e6,
        "get p50 µs": statistics.median(gets) * 1e6,
        "fan-in tasks/s": tasks / seconds,
    }


def node_losses(state: shardstate.StateClient, cluster: Cluster, runs: int) -> list[dict[str, Any]]:
    """Remove a primary's node ``runs`` times under load; one row each."""
    groups = groups_per_shard(state, SHARDS, 2)
    rows = []
    for run in range(runs):
        wait_for(lambda: healthy(state), 180)
        load = Load(state, groups).start()
        time.sleep(1.0)
        workers = {n.node_id: n for n in cluster.worker_nodes}
        infos = state.shard_info()
        shard = next(i for i, info in enumerate(infos) if info["node_id"] in workers)
        removed = time.monotonic()
        cluster.remove_node(workers[infos[shard]["node_id"]], allow_graceful=False)
        stall = longest_stall(state, groups, removed, window=8.0)
        resynced = wait_for(lambda: healthy(state), 180) + (time.monotonic() - removed)
        load.finish()
        found = load.check()
        rows.append(
            {
                "run": run + 1,
                "shard": shard,
                "longest write stall s": stall,
                "backups in sync again s": resynced,
                "acked writes": found["acked"],
                "lost or wrong": len(found["wrong"]),
                "failed calls": len(found["errors"]),
            }
        )
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--ops", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=2000)
    args = parser.parse_args()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cluster.wait_for_nodes()
    storage = tempfile.mkdtemp()
    plain = shardstate.connect("bench-r0", shards=SHARDS, storage=storage, replicas=0)
    replicated = shardstate.connect("bench-r1", shards=SHARDS, storage=storage, replicas=1)
    wait_for(lambda: healthy(replicated), 120)
    cost = [
        price(plain, "replicas=0", args.ops, args.tasks),
        price(replicated, "replicas=1", args.ops, args.tasks),
    ]
    ratio = {
        "update p50": cost[1]["update p50 µs"] / cost[0]["update p50 µs"],
        "get p50": cost[1]["get p50 µs"] / cost[0]["get p50 µs"],
        "fan-in throughput": cost[1]["fan-in tasks/s"] / cost[0]["fan-in tasks/s"],
    }
    report(
        "replicas=1 vs replicas=0 (3 shards, durability os, 4 nodes on one machine)",
        cost,
        "bench/results/failover_cost.json",
        {"ratios": ratio},
    )
    print("replicas=1 / replicas=0:", {k: round(v, 2) for k, v in ratio.items()})
    shardstate.shutdown("bench-r0")
    rows = node_losses(replicated, cluster, args.runs)
    stalls = [r["longest write stall s"] for r in rows]
    summary = {
        "runs": len(rows),
        "stall median s": statistics.median(stalls),
        "stall max s": max(stalls),
        "lost or wrong": sum(r["lost or wrong"] for r in rows),
    }
    report(
        "node loss under load (replicas=1)",
        rows,
        "bench/results/failover.json",
        {"summary": summary, "cost": cost, "ratios": ratio},
    )
    print("summary:", summary)
    shardstate.shutdown("bench-r1")
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
