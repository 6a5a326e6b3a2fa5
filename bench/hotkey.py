"""The hot key alone, repeated: 2,000 concurrent async increments of one key from one driver.

A quick check of the write path's per-update cost (engine, op_id memory, storage) between two
builds: run it on each and compare the medians (the machine is shared; read ratios).

    python -m bench.hotkey [--updates 50000] [--concurrency 2000] [--runs 3] [--transport ray]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid

import ray

import shardstate
from bench._common import report
from shardstate import ops


async def flood(
    cluster: str, total: int, concurrency: int, groups: int, transport: str | None = None
) -> float:
    """``total`` increments from ``concurrency`` concurrent callers on one loop, over ``groups``
    groups (1: one hot key); returns updates/s and checks the counts are exact."""
    astate = await shardstate.connect_async(cluster=cluster, transport=transport)
    tag = f"flood-{time.monotonic_ns()}"
    left = total

    async def worker(w: int) -> None:
        nonlocal left
        group = f"{tag}-{w % groups}"
        while left > 0:
            left -= 1
            await astate.update(group, "hot", [ops.increment("n")])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - t0
    counts = await asyncio.gather(*(astate.get(f"{tag}-{g}", "hot") for g in range(groups)))
    assert sum(c["n"] for c in counts if c) == total
    return total / elapsed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--updates", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--transport", default=None, help="socket (default) or ray")
    parser.add_argument("--out", default="bench/results/hotkey.json")
    args = parser.parse_args(argv)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = []
    for durability in ("memory", "os"):
        name = f"hot-{uuid.uuid4().hex[:6]}"
        shardstate.connect(cluster=name, shards=4, durability=durability, storage=tempfile.mkdtemp())
        asyncio.run(flood(name, 2000, 200, 1, args.transport))  # warm-up
        once = (name, args.updates, args.concurrency, 1, args.transport)
        rates = [asyncio.run(flood(*once)) for _ in range(args.runs)]
        shardstate.shutdown(name)
        rows.append(
            {
                "durability": durability,
                "median updates/s": round(statistics.median(rates)),
                "runs": ", ".join(f"{r:,.0f}" for r in rates),
            }
        )
    report("one hot key, concurrent async increments", rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
