"""shardstate (both transports) vs Redis (redis-py) vs plain Ray, all in one run on the same machine.

Tables (the ones issue 10 asks for):

1. fan-in, N Ray tasks (default 5,000), each merging one result into shared state:
   no-op tasks (the floor); a plain Ray dict actor, one call per task; Redis from tasks (``MULTI``
   ``HSET`` + ``HINCRBY``, AOF ``everysec``, one client cached per worker process); shardstate key per
   task + counter (the README's recipe, one pipeline) and every task merging into one document
   (``returning="both"`` and ``"none"``), on the default socket transport and on ``transport="ray"``;
2. single op from one caller, p50/p99: redis-py ``INCR``/``GET`` and a ``WATCH``/``MULTI`` JSON
   read-modify-write vs ``state.update``/``state.get`` (both transports) vs a raw Ray actor call;
3. hot key: 2,000 concurrent async ``update(increment)`` calls on one key from one driver (both
   transports), next to redis-py pipelined ``INCR`` from one client.

redis-server is started here on 127.0.0.1 (an ephemeral port, AOF everysec in a temp dir); without
it (or redis-py) the Redis rows say "skipped". Prints the tables and writes
``bench/results/compare.json``.

    python -m bench.compare [--tasks 5000] [--rounds 3] [--latency-ops 2000] [--updates 50000]
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
from bench.latency import timed
from shardstate import ops

TRANSPORTS = ("socket", "ray")


@ray.remote(max_concurrency=1, num_cpus=0)
class DictActor:
    """The naive baseline: a dict behind a sync actor, one call per op."""

    def __init__(self) -> None:
        self.data: dict[str, int] = {}

    def incr(self, key: str) -> int:
        self.data[key] = self.data.get(key, 0) + 1
        return self.data[key]

    def merge(self, job: str, i: int) -> int:
        self.data[f"{job}:t{i}"] = i
        self.data[job] = self.data.get(job, 0) + 1
        return self.data[job]


@ray.remote(num_cpus=0.5)
def noop_task(i: int) -> None:
    return None


@ray.remote(num_cpus=0.5)
def dict_actor_task(actor: Any, job: str, i: int) -> None:
    """One plain actor call per task: the result and the counter in a dict actor."""
    ray.get(actor.merge.remote(job, i))


_redis_clients: dict[int, Any] = {}


@ray.remote(num_cpus=0.5)
def redis_task(port: int, job: str, i: int) -> None:
    """Redis from a task: the result under its own field and a counter, in one MULTI/EXEC; the
    client is cached per worker process (as shardstate's is)."""
    client = _redis_clients.get(port)
    if client is None:
        import redis

        client = _redis_clients[port] = redis.Redis(host="127.0.0.1", port=port)
    pipe = client.pipeline(transaction=True)
    pipe.hset(f"{job}:results", f"t{i}", i)
    pipe.hincrby(f"{job}:progress", "done", 1)
    pipe.execute()


@ray.remote(num_cpus=0.5)
def keyed_task(state: shardstate.StateClient, job: str, i: int) -> None:
    """The README's fan-in recipe: the task's result under its own key plus a counter, one pipeline."""
    with state.pipeline() as p:
        p.set(job, f"t{i}", i, returning="none")
        p.update(job, "progress", [ops.increment("done")], returning="none")


@ray.remote(num_cpus=0.5)
def document_task(state: shardstate.StateClient, job: str, i: int, returning: str) -> None:
    """Every task merges its result into one growing document (and counts)."""
    merge = [ops.merge("fields", {f"t{i}": i}), ops.increment("done")]
    state.update(job, "result", merge, returning=returning)  # type: ignore[call-overload]


def timed_tasks(refs: Callable[[], list[Any]]) -> float:
    t0 = time.perf_counter()
    ray.get(refs())
    return time.perf_counter() - t0


def rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("inf")


def start_redis(directory: str) -> tuple[subprocess.Popen[bytes], int] | None:
    """redis-server on 127.0.0.1 with AOF everysec (as a durable comparison), or None."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    try:
        import redis
    except ImportError:
        return None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", directory]
    args += ["--appendonly", "yes", "--appendfsync", "everysec"]
    proc = subprocess.Popen([binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            redis.Redis(host="127.0.0.1", port=port).ping()
            return proc, port
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                proc.kill()
                return None
            time.sleep(0.05)


async def hot_key(cluster: str, transport: str, total: int, concurrency: int) -> float:
    """``total`` increments of one key from ``concurrency`` concurrent callers on one loop."""
    astate = await shardstate.connect_async(cluster=cluster, transport=transport)
    group = f"hot-{transport}-{time.monotonic_ns()}"
    left = total

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await astate.update(group, "hot", [ops.increment("n")], returning="none")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    assert await astate.get(group, "hot") == {"n": total}
    return rate(total, elapsed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tasks", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3, help="fan-in rounds (the median is reported)")
    parser.add_argument("--latency-ops", type=int, default=2000)
    parser.add_argument("--updates", type=int, default=50_000, help="hot-key increments")
    parser.add_argument("--concurrency", type=int, default=2000)
    parser.add_argument("--out", default="bench/results/compare.json")
    args = parser.parse_args(argv)
    ray.init(include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="shardstate-compare-")
    redis_dir = tempfile.mkdtemp(prefix="shardstate-compare-redis-")
    rows: list[dict[str, Any]] = []
    figures: dict[str, float] = {}

    def row(table: str, system: str, value: str, note: str = "") -> None:
        rows.append({"table": table, "system": system, "figure": value, "note": note})

    cluster = "cmp"
    clients = {
        t: shardstate.connect(cluster=cluster, shards=4, storage=storage, transport=t) for t in TRANSPORTS
    }
    redis_started = start_redis(redis_dir)
    try:
        # 1. fan-in ------------------------------------------------------------------------------
        n = args.tasks
        table = f"1 fan-in, N={n} Ray tasks"
        actor = DictActor.remote()
        cases: dict[str, Callable[[str], list[Any]]] = {
            "no-op tasks (floor)": lambda job: [noop_task.remote(i) for i in range(n)],
            "plain Ray dict actor, one call per task": lambda job: [
                dict_actor_task.remote(actor, job, i) for i in range(n)
            ],
        }
        if redis_started is not None:
            port = redis_started[1]
            cases["Redis from tasks (MULTI HSET+HINCRBY, AOF everysec)"] = lambda job: [
                redis_task.remote(port, job, i) for i in range(n)
            ]
        for t in TRANSPORTS:
            st = clients[t]
            cases[f"shardstate {t}: key per task + counter"] = lambda job, st=st: [
                keyed_task.remote(st, job, i) for i in range(n)
            ]
            cases[f"shardstate {t}: one document"] = lambda job, st=st: [
                document_task.remote(st, job, i, "both") for i in range(n)
            ]
            cases[f'shardstate {t}: one document, returning="none"'] = lambda job, st=st: [
                document_task.remote(st, job, i, "none") for i in range(n)
            ]
        for make in cases.values():  # warm every worker and connection first
            ray.get(make(f"warm-{time.monotonic_ns()}")[:200])
        runs: dict[str, list[float]] = {name: [] for name in cases}
        jobs: dict[str, str] = {}
        for _ in range(args.rounds):  # interleaved rounds: the machine's noise hits every case alike
            for name, make in cases.items():
                jobs[name] = f"job-{time.monotonic_ns()}"
                runs[name].append(timed_tasks(lambda make=make, name=name: make(jobs[name])))
        seconds = {name: statistics.median(took) for name, took in runs.items()}
        floor = seconds["no-op tasks (floor)"]
        for name, took in seconds.items():
            figures[f"fan-in: {name}"] = rate(n, took)
            spread = f"{min(runs[name]):.2f}-{max(runs[name]):.2f}s"
            note = f"median {took:.2f}s ({spread}), {took / floor:.2f}x the floor"
            row(table, name, f"{rate(n, took):,.0f} tasks/s", note)
        state = clients["socket"]
        for t in TRANSPORTS:  # the results are exact
            keyed = jobs[f"shardstate {t}: key per task + counter"]
            assert state.get(keyed, "progress") == {"done": n}  # the last round's jobs
            assert len(state.items(keyed)) == n + 1
            assert state.get(jobs[f"shardstate {t}: one document"], "result")["done"] == n
            assert state.get(jobs[f'shardstate {t}: one document, returning="none"'], "result")["done"] == n
        if redis_started is not None:
            import redis

            r = redis.Redis(host="127.0.0.1", port=redis_started[1])
            redis_job = jobs["Redis from tasks (MULTI HSET+HINCRBY, AOF everysec)"]
            assert int(r.hget(f"{redis_job}:progress", "done")) == n
            redis_rate = figures["fan-in: Redis from tasks (MULTI HSET+HINCRBY, AOF everysec)"]
            for t in TRANSPORTS:
                keyed_rate = figures[f"fan-in: shardstate {t}: key per task + counter"]
                doc_rate = figures[f'fan-in: shardstate {t}: one document, returning="none"']
                note = f"one document: {doc_rate / keyed_rate:.2f}x key-per-task"
                row(table, f"ratio {t}", f"{keyed_rate / redis_rate:.2f}x Redis", note)

        # 2. single op ---------------------------------------------------------------------------
        table = "2 single op, one caller"
        ray.get(actor.incr.remote("k"))
        state.set("lat", "k", {"n": 0})
        ops_cases: dict[str, Callable[[], Any]] = {
            "raw Ray actor call": lambda: ray.get(actor.incr.remote("k"))
        }
        for t in TRANSPORTS:
            st = clients[t]
            ops_cases[f"shardstate {t}: state.update"] = lambda st=st: st.update(
                "lat", "k", [ops.increment("n")]
            )
            ops_cases[f"shardstate {t}: state.get"] = lambda st=st: st.get("lat", "k")
        if redis_started is not None:
            import redis

            r = redis.Redis(host="127.0.0.1", port=redis_started[1])
            r.set("doc", json.dumps({"n": 0}))

            def rmw() -> None:
                with r.pipeline() as pipe:
                    while True:
                        try:
                            pipe.watch("doc")
                            doc = json.loads(pipe.get("doc"))
                            doc["n"] += 1
                            pipe.multi()
                            pipe.set("doc", json.dumps(doc))
                            pipe.execute()
                            return
                        except redis.WatchError:
                            continue

            ops_cases["redis-py INCR"] = lambda: r.incr("n")
            ops_cases["redis-py GET"] = lambda: r.get("n")
            ops_cases["redis-py WATCH/MULTI JSON read-modify-write"] = rmw
        samples: dict[str, list[float]] = {k: [] for k in ops_cases}
        for _ in range(4):  # interleaved rounds: the machine's noise hits every case alike
            for k, fn in ops_cases.items():
                samples[k] += timed(fn, args.latency_ops // 4)
        for k, lat in samples.items():
            p50 = statistics.median(lat)
            figures[f"p50: {k}"] = p50
            row(table, k, f"p50 {p50:,.0f} us", f"p99 {percentile(lat, 0.99):,.0f} us")
        if redis_started is not None:
            for t in TRANSPORTS:
                up = figures[f"p50: shardstate {t}: state.update"] / figures["p50: redis-py INCR"]
                get = figures[f"p50: shardstate {t}: state.get"] / figures["p50: redis-py GET"]
                row(table, f"ratio {t}", f"update {up:.2f}x INCR", f"get {get:.2f}x GET")

        # 3. hot key -----------------------------------------------------------------------------
        table = f"3 hot key, {args.concurrency} concurrent async updates"
        for t in TRANSPORTS:
            asyncio.run(hot_key(cluster, t, 5000, 500))  # warm-up
            per_s = asyncio.run(hot_key(cluster, t, args.updates, args.concurrency))
            figures[f"hot key: {t}"] = per_s
            row(table, f"shardstate {t} (os)", f"{per_s:,.0f} updates/s")
        if redis_started is not None:
            import redis

            r = redis.Redis(host="127.0.0.1", port=redis_started[1])
            t0 = time.perf_counter()
            for start in range(0, args.updates, 1000):
                pipe = r.pipeline(transaction=False)
                for _ in range(min(1000, args.updates - start)):
                    pipe.incr("piped")
                pipe.execute()
            per_s = rate(args.updates, time.perf_counter() - t0)
            figures["hot key: redis pipelined INCR"] = per_s
            row(table, "redis-py pipelined INCR (1000 per pipeline)", f"{per_s:,.0f} INCR/s")
    finally:
        if redis_started is not None:
            redis_started[0].terminate()
            redis_started[0].wait(timeout=10)
        shardstate.shutdown(cluster)
    if redis_started is None:
        row("-", "redis", "skipped", "redis-server or redis-py missing (apt-get install -y redis-server)")
    report("shardstate vs Redis vs plain Ray (one run, same machine)", rows, args.out, {"figures": figures})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
