"""A single get over the shard's own connection vs the Ray ``run`` call vs ``state.get``.

All three send the same packed batch to the same shard (one ``get`` of a small value); they run in
interleaved rounds so background noise hits them alike. Prints p50/p99 per case and writes JSON.

    python -m bench.wire [--ops 2000] [--rounds 5] [--out bench/results/wire.json]
"""

from __future__ import annotations

import argparse
import pickle
import statistics
from collections.abc import Callable
from typing import Any

import ray

import shardstate
from bench._common import percentile, report
from bench.latency import timed
from shardstate.cluster.slots import slot_of
from shardstate.shards import commands as C
from shardstate.shards.wire import ShardConnection


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ops", type=int, default=2000, help="calls per case per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", default="bench/results/wire.json")
    args = parser.parse_args(argv)

    ray.init(include_dashboard=False, log_to_driver=False)
    state = shardstate.connect(cluster="bench-wire", shards=4)
    group = "bench"
    state.set(group, "k", {"n": 0})
    view = state._link.current()
    index = view.owners[slot_of(group)]
    shard = view.shards[index]
    secret = ray.get(state.router.wire_secret.remote())
    _epoch, addresses = ray.get(state.router.shard_addresses.remote())
    conn = ShardConnection(addresses[index], secret)
    packed = pickle.dumps([C.command(C.GET, group, "k")], protocol=pickle.HIGHEST_PROTOCOL)

    def over_socket() -> Any:
        ((ok, value),) = pickle.loads(conn.call(packed))
        assert ok
        return pickle.loads(value)

    def over_ray() -> Any:
        ((ok, value),) = pickle.loads(ray.get(shard.run.remote(packed)))
        assert ok
        return pickle.loads(value)

    cases: dict[str, Callable[[], Any]] = {
        "socket get (ShardConnection.call)": over_socket,
        "Ray run call get": over_ray,
        "state.get": lambda: state.get(group, "k"),
    }
    for fn in cases.values():
        assert fn() == {"n": 0}
        timed(fn, 200)  # warm-up
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, fn in cases.items():
            samples[name] += timed(fn, args.ops)
    conn.close()

    base = statistics.median(samples["Ray run call get"])
    rows = [
        {
            "case": name,
            "n": len(lat),
            "p50_us": round(statistics.median(lat), 1),
            "p99_us": round(percentile(lat, 0.99), 1),
            "p50_vs_ray_run": round(statistics.median(lat) / base, 2),
        }
        for name, lat in samples.items()
    ]
    title = f"single get: socket vs Ray call ({args.rounds} rounds x {args.ops} calls, interleaved)"
    report(title, rows, args.out, {"bench": "wire", "cpus": ray.cluster_resources().get("CPU")})
    shardstate.shutdown("bench-wire")
    ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
