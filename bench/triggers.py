"""Trigger latency (commit → handler start) and events/s delivered to a no-op handler, one run.

- latency: 300 writes, one every 20 ms; the handler records ``time.time() - event.at`` (``event.at``
  is the shard's clock when it executed the write's batch, just before the commit);
- throughput: 20,000 events written through the bulk path to groups with a no-op trigger; measures
  how long until the subscriber has delivered them all.
Writes ``bench/results/triggers.json``.

    python -m bench.triggers [--writes 300] [--events 20000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Any

import ray

import shardstate
from bench._common import percentile, report
from shardstate._requests import set_request


@ray.remote(num_cpus=0)
class Latencies:
    def __init__(self) -> None:
        self.values: list[float] = []

    def add(self, value: float) -> None:
        self.values.append(value)

    def get(self) -> list[float]:
        return self.values

    def reset(self) -> list[float]:
        values, self.values = self.values, []
        return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--writes", type=int, default=300)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--out", default="bench/results/triggers.json")
    args = parser.parse_args(argv)
    ray.init(include_dashboard=False, log_to_driver=False)
    state = shardstate.connect(cluster="bench-triggers", shards=4, storage=tempfile.mkdtemp())
    sink = Latencies.options(name="bench-latencies", namespace="shardstate-bench").remote()

    def measure(event: shardstate.StateEvent) -> None:
        started = time.time()
        ray.get(ray.get_actor("bench-latencies", namespace="shardstate-bench").add.remote(started - event.at))

    state.on_change(measure, group_id="lat", name="latency")
    for i in range(20):  # warm-up: the first delivery starts a Ray worker process (reported apart)
        state.set("lat", "warm", i)
        time.sleep(0.05)
    deadline = time.monotonic() + 120
    while len(ray.get(sink.get.remote())) < 20 and time.monotonic() < deadline:
        time.sleep(0.1)
    cold = ray.get(sink.reset.remote())[0] * 1000
    for i in range(args.writes):
        state.set("lat", "k", i)
        time.sleep(0.02)
    deadline = time.monotonic() + 120
    while len(ray.get(sink.get.remote())) < args.writes and time.monotonic() < deadline:
        time.sleep(0.1)
    lat = [v * 1000 for v in ray.get(sink.get.remote())]

    def noop(event: shardstate.StateEvent) -> None:
        return None

    state.on_change(noop, condition=lambda e: e.group_id.startswith("tp-"), name="noop")
    base = sum(s["delivered"] for s in ray.get(state.router.subscriber_stats.remote()))
    limit = state.config["max_value_size"]
    reqs: list[Any] = [set_request(f"tp-{i % 64}", f"k{i}", i, limit) for i in range(args.events)]
    t0 = time.perf_counter()
    for start in range(0, len(reqs), 2000):
        state._run_many(reqs[start : start + 2000])
    written = time.perf_counter() - t0
    while True:
        stats = ray.get(state.router.subscriber_stats.remote())
        if sum(s["delivered"] for s in stats) - base >= args.events:
            break
        time.sleep(0.05)
    delivered = time.perf_counter() - t0
    rows = [
        {
            "cold first ms": round(cold, 1),
            "latency n": len(lat),
            "p50 ms": round(statistics.median(lat), 1),
            "p99 ms": round(percentile(lat, 0.99), 1),
            "events": args.events,
            "written s": round(written, 2),
            "all delivered s": round(delivered, 2),
            "events/s delivered": round(args.events / delivered),
        }
    ]
    report("state triggers: commit → handler start, and no-op delivery throughput", rows, args.out)
    shardstate.shutdown("bench-triggers")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
