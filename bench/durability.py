"""Updates/s under each durability level: memory, os (default), fsync — on the same machine, one run.

Two workloads per level, each on a fresh 4-shard cluster:
- fan-in: N Ray tasks each do ONE merge+increment ``update`` of the same key (the demo's workload);
- driver flood: one driver, an async client with C concurrent ``update(increment)`` calls on one key.
Ratios are against ``memory``. Writes ``bench/results/durability.json``.

    python bench/durability.py [--tasks 2000] [--flood 5000] [--concurrency 64]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time

import ray

import shardstate
from bench._common import report
from shardstate import ops


@ray.remote(num_cpus=0.5)
def merge_task(state: shardstate.StateClient, job: str, i: int) -> None:
    state.update(job, "result", [ops.merge("fields", {f"t{i}": i}), ops.increment("done")])


@ray.remote(num_cpus=0.5)
def noop_task(state: shardstate.StateClient, job: str, i: int) -> None:
    return None


def fan_in(state: shardstate.StateClient, tasks: int) -> float:
    job = f"fan-{time.monotonic_ns()}"
    ray.get([merge_task.remote(state, job, i) for i in range(50)])  # warm the workers
    job = job + "-run"
    t0 = time.perf_counter()
    ray.get([merge_task.remote(state, job, i) for i in range(tasks)])
    elapsed = time.perf_counter() - t0
    assert state.get(job, "result")["done"] == tasks
    return tasks / elapsed


async def flood(cluster: str, total: int, concurrency: int) -> float:
    astate = await shardstate.connect_async(cluster=cluster)
    group = f"flood-{time.monotonic_ns()}"
    left = total

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await astate.update(group, "hot", [ops.increment("n")])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    assert (await astate.get(group, "hot"))["n"] == total
    return total / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--flood", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--out", default="bench/results/durability.json")
    args = parser.parse_args(argv)
    ray.init(include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="shardstate-bench-")
    measured = {}
    for level in ("memory", "os", "fsync"):
        name = f"bench-dur-{level}"
        state = shardstate.connect(cluster=name, shards=4, storage=storage, durability=level)
        measured[level] = (fan_in(state, args.tasks), asyncio.run(flood(name, args.flood, args.concurrency)))
        shardstate.shutdown(name)
    base_fan, base_flood = measured["memory"]
    rows = [
        {
            "durability": level,
            "fan-in updates/s": round(fan, 1),
            "fan-in vs memory": round(fan / base_fan, 2),
            "flood updates/s": round(fl, 1),
            "flood vs memory": round(fl / base_flood, 2),
        }
        for level, (fan, fl) in measured.items()
    ]
    report(
        f"durability: fan-in ({args.tasks} tasks) and driver flood ({args.flood} updates, "
        f"{args.concurrency} concurrent)",
        rows,
        args.out,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
