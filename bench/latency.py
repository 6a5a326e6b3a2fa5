"""Single-op sync latency: shardstate's client vs a raw Ray actor round trip, on the same machine.

Runs the cases in interleaved rounds (so background noise hits all of them alike), prints a table of
p50/p99 per case and the ratio of each p50 to the raw actor's, and writes the figures as JSON.

    python -m bench.latency [--ops 2000] [--rounds 5] [--out bench/results/latency.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
from rich.console import Console
from rich.table import Table

import shardstate
from bench._common import percentile
from shardstate import ops


@ray.remote(max_concurrency=1, num_cpus=0)
class DictActor:
    """The baseline: a plain dict behind a sync Ray actor, one call per op."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def incr(self, key: str) -> int:
        self.data[key] = self.data.get(key, 0) + 1
        return int(self.data[key])


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    """Latencies in microseconds of ``n`` sequential calls of ``fn``."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=2000, help="calls per case per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="bench/results/latency.json")
    args = parser.parse_args(argv)

    ray.init(include_dashboard=False, log_to_driver=False)
    state = shardstate.connect(cluster="bench-latency", shards=4)
    raw = DictActor.remote()
    group = "bench"
    state.set(group, "k", {"n": 0})
    ray.get(raw.incr.remote("k"))

    cases: dict[str, Callable[[], Any]] = {
        "raw actor get": lambda: ray.get(raw.get.remote("k")),
        "raw actor incr": lambda: ray.get(raw.incr.remote("k")),
        "state.get": lambda: state.get(group, "k"),
        "state.update(increment)": lambda: state.update(group, "k", [ops.increment("n")]),
        "state.set": lambda: state.set(group, "s", 1),
        "router.get (handle only)": lambda: ray.get(state.router.get.remote(group, "k")),
    }
    for fn in cases.values():  # warm-up
        timed(fn, 200)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            samples[name] += timed(fn, args.ops)

    base = statistics.median(samples["raw actor get"])
    rows = []
    for name, lat in samples.items():
        p50 = statistics.median(lat)
        rows.append(
            {
                "case": name,
                "n": len(lat),
                "p50_us": round(p50, 1),
                "p99_us": round(percentile(lat, 0.99), 1),
                "ops_per_s": round(1e6 / p50),
                "p50_vs_raw_get": round(p50 / base, 2),
            }
        )
    table = Table(title=f"single-op sync latency ({args.rounds} rounds x {args.ops} calls, interleaved)")
    for col in ("case", "p50 µs", "p99 µs", "ops/s (1/p50)", "p50 / raw get"):
        table.add_column(col, justify="left" if col == "case" else "right")
    for r in rows:
        table.add_row(
            r["case"],
            f"{r['p50_us']:.0f}",
            f"{r['p99_us']:.0f}",
            f"{r['ops_per_s']:,}",
            f"{r['p50_vs_raw_get']:.2f}x",
        )
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "bench": "latency",
                "machine": platform.platform(),
                "cpus": ray.cluster_resources().get("CPU"),
                "rows": rows,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")
    shardstate.shutdown("bench-latency")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
