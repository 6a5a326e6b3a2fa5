"""State triggers and watch: latency, delivery throughput, and the bytes a growing document logs. One run.

- latency: 300 writes, one every 20 ms; the handler records ``time.time() - event.at`` (``event.at``
  is the shard's clock when it executed the write's batch, just before the commit);
- watch latency: 300 writes, one every 10 ms, followed by ``state.watch()`` in a thread of the
  driver (``time.time() - event.at`` when the event comes out of the iterator);
- throughput, writes included: 20,000 events written through the bulk path to groups with a no-op
  trigger; how long from the first write until the subscribers delivered them all;
- throughput, backlog: the same, but the no-op trigger first holds every shard's delivery (a
  "gate" event per shard that waits until the bench opens it), so the 20,000 events are all
  committed before delivery starts: events / time from opening the gate until all are delivered
  (the delivery rate itself, whatever the write path costs);
- fan-in into one document: 1,000 updates merging a 100-byte field into one document while a
  trigger on it holds its delivery (so nothing is acknowledged): the bytes of values the shard's
  event log (SQLite) holds afterwards, read from the file, and the updates/s.

Writes ``bench/results/triggers.json``.

    python -m bench.triggers [--writes 300] [--events 20000] [--merges 1000]
"""

from __future__ import annotations

import argparse
import json
import platform
import sqlite3
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray
from rich.console import Console
from rich.table import Table

import shardstate
from bench._common import percentile
from shardstate import ops
from shardstate._requests import set_request
from shardstate.cluster.slots import slot_of

CLUSTER = "bench-triggers"
NAMESPACE = "shardstate-bench"


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


@ray.remote(num_cpus=0)
class Gate:
    """Holds handlers that call ``wait`` until ``open``; counts who waits."""

    def __init__(self) -> None:
        self.is_open = False
        self.waiting = 0

    def arrive(self) -> None:
        self.waiting += 1

    def opened(self) -> bool:
        return self.is_open

    def open(self) -> None:
        self.is_open = True

    def count(self) -> int:
        return self.waiting


def wait_for(check: Any, timeout: float = 300.0, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the bench waited too long")
        time.sleep(every)


def delivered(state: shardstate.StateClient) -> int:
    return sum(s["delivered"] for s in ray.get(state.router.subscriber_stats.remote()))


def trigger_latency(state: shardstate.StateClient, writes: int) -> tuple[float, list[float]]:
    sink = Latencies.options(name="bench-latencies", namespace=NAMESPACE).remote()

    def measure(event: shardstate.StateEvent) -> None:
        started = time.time()
        ray.get(ray.get_actor("bench-latencies", namespace=NAMESPACE).add.remote(started - event.at))

    state.on_change(measure, group_id="lat", name="latency")
    for i in range(20):  # warm-up: the first delivery starts a process (reported apart)
        state.set("lat", "warm", i)
        time.sleep(0.05)
    wait_for(lambda: len(ray.get(sink.get.remote())) >= 20, every=0.1)
    cold = ray.get(sink.reset.remote())[0] * 1000
    for i in range(writes):
        state.set("lat", "k", i)
        time.sleep(0.02)
    wait_for(lambda: len(ray.get(sink.get.remote())) >= writes, every=0.1)
    state.remove_trigger("latency")
    return cold, [v * 1000 for v in ray.get(sink.get.remote())]


def watch_latency(state: shardstate.StateClient, writes: int) -> list[float]:
    seen: list[float] = []
    events = state.watch("wlat", timeout=writes * 0.01 + 30)
    ready = threading.Event()

    def follow() -> None:
        ready.set()
        for event in events:
            seen.append((time.time() - event.at) * 1000)
            if len(seen) >= writes:
                return

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    ready.wait()
    for i in range(writes):
        state.set("wlat", "k", i)
        time.sleep(0.01)
    thread.join(60)
    return seen


def throughput(state: shardstate.StateClient, events: int) -> dict[str, Any]:
    gate = Gate.options(name="bench-gate", namespace=NAMESPACE).remote()

    def noop(event: shardstate.StateEvent) -> None:
        if event.key == "gate":  # holds its shard's delivery until the bench opens the gate
            g = ray.get_actor("bench-gate", namespace=NAMESPACE)
            ray.get(g.arrive.remote())
            while not ray.get(g.opened.remote()):
                time.sleep(0.01)

    state.on_change(noop, condition=lambda e: e.group_id.startswith("tp-"), name="noop")
    limit = state.config["max_value_size"]
    groups = [f"tp-{i}" for i in range(64)]

    def write_all() -> float:
        reqs: list[Any] = [set_request(groups[i % 64], f"k{i}", i, limit) for i in range(events)]
        t0 = time.perf_counter()
        for start in range(0, len(reqs), 2000):
            state._run_many(reqs[start : start + 2000])
        return t0

    # writes included: from the first write until all are delivered
    base = delivered(state)
    t0 = write_all()
    written = time.perf_counter() - t0
    wait_for(lambda: delivered(state) - base >= events)
    end_to_end = time.perf_counter() - t0
    # backlog: every shard's delivery held by a gate event while the events are written
    owners = state._link.current().owners
    shards = sorted({owners[slot_of(g)] for g in groups})
    gates = [next(g for g in groups if owners[slot_of(g)] == s) for s in shards]
    base = delivered(state)
    for g in gates:
        state.set(g, "gate", 0)
    wait_for(lambda: ray.get(gate.count.remote()) >= len(gates))
    write_all()
    ray.get(gate.open.remote())
    t1 = time.perf_counter()
    wait_for(lambda: delivered(state) - base >= events + len(gates), every=0.02)
    drained = time.perf_counter() - t1
    state.remove_trigger("noop")
    return {
        "events": events,
        "written s": round(written, 2),
        "all delivered s": round(end_to_end, 2),
        "events/s delivered (writes included)": round(events / end_to_end),
        "backlog delivered s": round(drained, 2),
        "events/s delivered (backlog)": round(events / drained),
    }


def fan_in_bytes(state: shardstate.StateClient, storage: str, merges: int) -> dict[str, Any]:
    gate = Gate.options(name="bench-gate-2", namespace=NAMESPACE).remote()

    def hold(event: shardstate.StateEvent) -> None:
        g = ray.get_actor("bench-gate-2", namespace=NAMESPACE)
        ray.get(g.arrive.remote())
        while not ray.get(g.opened.remote()):
            time.sleep(0.01)

    doc = "fanin-doc"
    state.on_change(hold, group_id=doc, name="hold")
    state.set(doc, "merged", {"fields": {}})
    wait_for(lambda: ray.get(gate.count.remote()) >= 1)
    field = "x" * 100
    t0 = time.perf_counter()
    for i in range(merges):
        state.update(doc, "merged", [ops.merge("fields", {f"t{i}": field})], returning="none")
    took = time.perf_counter() - t0
    shard = state._link.current().owners[slot_of(doc)]
    path = Path(storage) / CLUSTER / f"shard-{shard}.db"
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    columns = {row[1] for row in db.execute("PRAGMA table_info(events)")}
    parts = [f"coalesce(sum(length({c})), 0)" for c in ("old", "new", "ops") if c in columns]
    stored = int(db.execute(f"SELECT {' + '.join(parts)} FROM events WHERE grp = ?", (doc,)).fetchone()[0])
    db.close()
    size = len(ray.cloudpickle.dumps(state.get(doc, "merged")))
    ray.get(gate.open.remote())
    state.remove_trigger("hold")
    return {
        "merges": merges,
        "final document bytes": size,
        "event log bytes (SQLite)": stored,
        "log bytes / final document": round(stored / size, 1),
        "updates/s (trigger on)": round(merges / took),
    }


def report(title: str, sections: dict[str, list[dict[str, Any]]], out: str) -> None:
    """Print each section as a table (its rows share their columns) and write all to ``out`` (JSON)."""
    console = Console(width=max(Console().width, 140))
    for name, rows in sections.items():
        table = Table(title=f"{title}: {name}")
        for col in rows[0]:
            table.add_column(col, justify="right")
        for row in rows:
            table.add_row(*(f"{v:,.2f}" if isinstance(v, float) else str(v) for v in row.values()))
        console.print(table)
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = {"title": title, "machine": platform.platform(), "python": platform.python_version()}
    path.write_text(json.dumps({**body, "sections": sections}, indent=2))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--writes", type=int, default=300)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--merges", type=int, default=1000)
    parser.add_argument("--out", default="bench/results/triggers.json")
    args = parser.parse_args(argv)
    ray.init(include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp()
    state = shardstate.connect(cluster=CLUSTER, shards=4, storage=storage)
    subscribers = len(ray.get(state.router.subscriber_stats.remote()))
    cold, lat = trigger_latency(state, args.writes)
    watched = watch_latency(state, args.writes)
    latency = [
        {
            "what": "commit → handler start",
            "n": len(lat),
            "p50 ms": round(statistics.median(lat), 2),
            "p99 ms": round(percentile(lat, 0.99), 2),
            "cold first ms": round(cold, 1),
        },
        {
            "what": "commit → watch() yields",
            "n": len(watched),
            "p50 ms": round(statistics.median(watched), 2),
            "p99 ms": round(percentile(watched, 0.99), 2),
            "cold first ms": "",
        },
    ]
    sections = {
        "latency": latency,
        "throughput": [{"subscribers": subscribers, **throughput(state, args.events)}],
        "fan-in into one document": [fan_in_bytes(state, storage, args.merges)],
    }
    report("state triggers and watch", sections, args.out)
    shardstate.shutdown(CLUSTER)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
