"""Case 1 of bench/compare.py alone, repeated: 2,000 concurrent async increments of one hot key.

A quick check of the write path's per-update cost (engine, op_id memory, storage) between two
builds: run it on each and compare the medians (the machine is shared; read ratios).

    python -m bench.hotkey [--updates 50000] [--concurrency 2000] [--runs 3] [--out bench/results/hotkey.json]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import uuid

import ray

import shardstate
from bench._common import report
from bench.compare import flood


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--updates", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default="bench/results/hotkey.json")
    args = parser.parse_args(argv)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    rows = []
    for durability in ("memory", "os"):
        name = f"hot-{uuid.uuid4().hex[:6]}"
        shardstate.connect(cluster=name, shards=4, durability=durability, storage=tempfile.mkdtemp())
        asyncio.run(flood(name, 2000, 200, 1))  # warm-up
        rates = [asyncio.run(flood(name, args.updates, args.concurrency, 1)) for _ in range(args.runs)]
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
