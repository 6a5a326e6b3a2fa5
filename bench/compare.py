"""shardstate vs a naive Ray dict actor vs Redis (redis-py), all in one run on the same machine.

Cases:
1. one driver, many concurrent ``update(increment)`` calls through the async client (coalesced):
   one hot key, and 64 groups; with ``memory`` and ``os`` (default, durable) storage;
2. fan-in: N Ray tasks each doing one merge+increment ``update`` (into one growing document, and
   into 64 small ones) vs the same N no-op tasks, and vs N tasks making one raw actor call each
   (the floor: what any per-task actor round trip costs);
3. single-op sync latency p50/p99: ``state.update`` / ``state.get`` vs a raw Ray actor round trip;
4. baselines: a naive Ray dict actor (sync, and pipelined from one caller), and redis-server
   (started here on 127.0.0.1 if the binary exists, else skipped) via redis-py: sync INCR,
   pipelined INCR, and a WATCH/MULTI read-modify-write of a JSON document (the equivalent of update).

Prints one table and writes ``bench/results/compare.json``.

    python -m bench.compare [--updates 50000] [--concurrency 2000] [--tasks 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import ray

import shardstate
from bench._common import percentile, report
from bench.durability import merge_task, noop_task
from bench.latency import timed
from shardstate import ops


@ray.remote(max_concurrency=1, num_cpus=0)
class DictActor:
    """The naive baseline: a dict behind a sync actor, one call per op."""

    def __init__(self) -> None:
        self.data: dict[str, int] = {}

    def incr(self, key: str) -> int:
        self.data[key] = self.data.get(key, 0) + 1
        return self.data[key]


@ray.remote(num_cpus=0.5)
def raw_call_task(actor: Any, i: int) -> None:
    """One raw actor round trip per task: the floor under any per-task state call."""
    ray.get(actor.incr.remote("fan"))


@ray.remote(num_cpus=0.5)
def small_merge_task(state: shardstate.StateClient, job: str, i: int) -> None:
    """The merge+increment of ``merge_task``, spread over 64 small documents."""
    state.update(job, f"part-{i % 64}", [ops.merge("fields", {f"t{i}": i}), ops.increment("done")])


@ray.remote(num_cpus=0.5)
def keyed_merge_task(state: shardstate.StateClient, job: str, i: int) -> None:
    """Fan-in at scale: the task's result under its own key plus a counter, in one pipelined call."""
    with state.pipeline() as p:
        p.set(job, f"t{i}", i)
        p.update(job, "progress", [ops.increment("done")])


@ray.remote(num_cpus=0.5)
def quiet_merge_task(state: shardstate.StateClient, job: str, i: int) -> None:
    """``merge_task`` with ``returning="none"``: no document travels back to the task."""
    state.update(
        job, "result", [ops.merge("fields", {f"t{i}": i}), ops.increment("done")], returning="none"
    )


def timed_tasks(refs: Callable[[], list[Any]]) -> float:
    t0 = time.perf_counter()
    ray.get(refs())
    return time.perf_counter() - t0


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


async def flood(cluster: str, total: int, concurrency: int, groups: int) -> float:
    astate = await shardstate.connect_async(cluster=cluster)
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
    return rate(total, elapsed)


def start_redis() -> tuple[subprocess.Popen[bytes], int] | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    return proc, port


def redis_cases(n: int) -> dict[str, float] | str:
    try:
        import redis
    except ImportError:
        return "redis-py not installed (pip install redis)"
    started = start_redis()
    if started is None:
        return "redis-server not found (apt-get install -y redis-server)"
    proc, port = started
    try:
        r = redis.Redis(host="127.0.0.1", port=port)
        r.ping()
        t0 = time.perf_counter()
        for _ in range(n // 5):
            r.incr("sync")
        sync = rate(n // 5, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for start in range(0, n, 1000):
            pipe = r.pipeline(transaction=False)
            for _ in range(min(1000, n - start)):
                pipe.incr("piped")
            pipe.execute()
        piped = rate(n, time.perf_counter() - t0)
        r.set("doc", json.dumps({"n": 0, "fields": {}}))
        t0 = time.perf_counter()
        m = n // 10
        for i in range(m):
            with r.pipeline() as pipe:
                while True:
                    try:
                        pipe.watch("doc")
                        doc = json.loads(pipe.get("doc"))
                        doc["n"] += 1
                        doc["fields"][f"t{i % 100}"] = i
                        pipe.multi()
                        pipe.set("doc", json.dumps(doc))
                        pipe.execute()
                        break
                    except redis.WatchError:
                        continue
        rmw = rate(m, time.perf_counter() - t0)
        assert int(r.get("piped")) == n
        return {"sync INCR": sync, "pipelined INCR": piped, "WATCH/MULTI JSON update": rmw}
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--updates", type=int, default=50_000)
    parser.add_argument("--concurrency", type=int, default=2000)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--latency-ops", type=int, default=2000)
    parser.add_argument("--out", default="bench/results/compare.json")
    args = parser.parse_args(argv)
    ray.init(include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="shardstate-compare-")
    rows: list[dict[str, Any]] = []

    def row(case: str, system: str, ops_per_s: float | None = None, note: str = "") -> None:
        rows.append({"case": case, "system": system, "ops/s": round(ops_per_s or 0), "note": note})

    # 1. one driver, many concurrent updates
    for level in ("memory", "os"):
        name = f"cmp-{level}"
        shardstate.connect(cluster=name, shards=4, storage=storage, durability=level)
        asyncio.run(flood(name, 2000, 200, 1))  # warm-up
        hot = asyncio.run(flood(name, args.updates, args.concurrency, 1))
        spread = asyncio.run(flood(name, args.updates, args.concurrency, 64))
        row("1 concurrent updates, 1 hot key", f"shardstate async ({level})", hot)
        row("1 concurrent updates, 64 groups", f"shardstate async ({level})", spread)
        if level == "memory":
            shardstate.shutdown(name)

    state = shardstate.connect(cluster="cmp-os")
    # 2. fan-in vs no-op tasks and vs one raw actor call per task (warm workers)
    raw = DictActor.remote()
    n = args.tasks
    ray.get([noop_task.remote(state, "w", i) for i in range(200)])
    ray.get([raw_call_task.remote(raw, i) for i in range(200)])
    ray.get([small_merge_task.remote(state, "warm", i) for i in range(200)])
    noop = timed_tasks(lambda: [noop_task.remote(state, "noop", i) for i in range(n)])
    floor = timed_tasks(lambda: [raw_call_task.remote(raw, i) for i in range(n)])
    small_job, job = f"parts-{time.monotonic_ns()}", f"fan-{time.monotonic_ns()}"
    keyed_job = f"keyed-{time.monotonic_ns()}"
    small = timed_tasks(lambda: [small_merge_task.remote(state, small_job, i) for i in range(n)])
    keyed = timed_tasks(lambda: [keyed_merge_task.remote(state, keyed_job, i) for i in range(n)])
    fan = timed_tasks(lambda: [merge_task.remote(state, job, i) for i in range(n)])
    quiet_job = f"quiet-{time.monotonic_ns()}"
    quiet = timed_tasks(lambda: [quiet_merge_task.remote(state, quiet_job, i) for i in range(n)])
    assert state.get(job, "result")["done"] == n
    assert state.get(quiet_job, "result")["done"] == n
    assert sum(state.get(small_job, f"part-{p}")["done"] for p in range(64)) == n
    assert state.get(keyed_job, "progress") == {"done": n}
    assert len(state.items(keyed_job)) == n + 1

    def fan_row(system: str, seconds: float) -> None:
        note = f"{seconds:.2f}s, +{100 * (seconds / noop - 1):.0f}% vs no-op"
        if system != "raw actor call per task":
            note += f", {seconds / floor:.2f}x the raw-call floor"
        row(f"2 fan-in, N={n} tasks", system, rate(n, seconds), note)

    row(f"2 fan-in, N={n} tasks", "no-op Ray tasks", rate(n, noop), f"{noop:.2f}s")
    fan_row("raw actor call per task", floor)
    fan_row("shardstate (os), 64 small docs", small)
    fan_row("shardstate (os), key per task + counter", keyed)
    fan_row("shardstate (os), one document", fan)
    fan_row('shardstate (os), one document, returning="none"', quiet)

    # 3. single-op sync latency vs a raw actor round trip (interleaved rounds)
    ray.get(raw.incr.remote("k"))
    state.set("lat", "k", {"n": 0})
    cases: dict[str, Callable[[], Any]] = {
        "raw actor call": lambda: ray.get(raw.incr.remote("k")),
        "state.update": lambda: state.update("lat", "k", [ops.increment("n")]),
        "state.get": lambda: state.get("lat", "k"),
    }
    samples: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(4):
        for k, fn in cases.items():
            samples[k] += timed(fn, args.latency_ops // 4)
    base = statistics.median(samples["raw actor call"])
    for k, lat in samples.items():
        p50 = statistics.median(lat)
        row(
            "3 single-op sync latency",
            k,
            1e6 / p50,
            f"p50 {p50:.0f}us p99 {percentile(lat, 0.99):.0f}us ({p50 / base:.2f}x raw)",
        )

    # 4. baselines: naive dict actor, Redis
    n = 5000
    t0 = time.perf_counter()
    for _ in range(n):
        ray.get(raw.incr.remote("sync"))
    row("4 baseline", "naive Ray dict actor, sync", rate(n, time.perf_counter() - t0))
    t0 = time.perf_counter()
    ray.get([raw.incr.remote("piped") for _ in range(args.updates // 5)])
    row("4 baseline", "naive Ray dict actor, pipelined", rate(args.updates // 5, time.perf_counter() - t0))
    red = redis_cases(args.updates)
    if isinstance(red, str):
        row("4 baseline", "redis", None, f"skipped: {red}")
    else:
        for k, v in red.items():
            row("4 baseline", f"redis-py {k}", v)
    shardstate.shutdown("cmp-os")
    report("shardstate vs baselines (one run, same machine)", rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
