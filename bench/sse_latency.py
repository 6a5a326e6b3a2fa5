"""SSE event latency of the console's ``GET /api/v1/events``: write → event on the stream. One run.

A Python client (``StateClient``, the default transport) writes ``--writes`` values (default 500)
to one group, one every ``--spacing`` ms (5), while an SSE reader (httpx, streaming, in a thread)
follows that group on the console. For each value it records

- ack → event: from the moment ``state.set`` returned (the write is committed and acknowledged)
  to the arrival of its event on the stream (negative: the event arrived before the
  acknowledgement did; both leave the shard at its commit);
- call → event: from the moment ``state.set`` was called.

The reader connects and sees a warm-up event before the first measured write; it stops when every
event arrived or ``--timeout`` seconds after the last write. Prints a table and writes
``bench/results/sse_latency.json``.

    python -m bench.sse_latency [--writes 500] [--spacing 5]
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import uuid
from typing import Any

import httpx
import ray

import shardstate
from bench._common import percentile, report

CLUSTER = "bench-sse"


class Reader:
    """Follows ``group`` on the console's SSE stream in a thread; records each key's arrival time."""

    def __init__(self, url: str, token: str, group: str) -> None:
        self.url = url.rstrip("/") + "/api/v1/events"
        self.headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
        self.group = group
        self.arrived: dict[str, float] = {}
        self.events = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True, name="sse-reader")

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            timeout = httpx.Timeout(10.0, read=2.0)
            with httpx.Client(timeout=timeout) as client, client.stream(
                "GET", self.url, params={"group": self.group}, headers=self.headers
            ) as response:
                response.raise_for_status()
                data: list[str] = []
                lines = response.iter_lines()
                while not self.stop.is_set():
                    try:
                        line = next(lines)
                    except httpx.ReadTimeout:
                        continue
                    except StopIteration:
                        return
                    if line.startswith("data:"):
                        data.append(line[5:].lstrip(" "))
                    elif line == "" and data:
                        now = time.perf_counter()
                        event = json.loads("\n".join(data))
                        data = []
                        with self.changed:
                            self.arrived.setdefault(event["key"], now)
                            self.events += 1
                            self.changed.notify_all()
        except BaseException as exc:  # reported by the bench
            self.error = exc
            with self.changed:
                self.changed.notify_all()

    def wait_for(self, keys: set[str], deadline: float) -> bool:
        """Wait until every key in ``keys`` arrived (True) or ``deadline`` (perf_counter) passed."""
        with self.changed:
            while not keys <= self.arrived.keys():
                left = deadline - time.perf_counter()
                if left <= 0 or self.error is not None:
                    return False
                self.changed.wait(min(left, 0.5))
            return True


def measure(
    state: shardstate.StateClient, url: str, token: str, writes: int, spacing: float, timeout: float
) -> dict[str, Any]:
    group = f"sse-{uuid.uuid4().hex[:8]}"
    reader = Reader(url, token, group)
    reader.start()
    # warm-up: the stream is open and following once a write's event comes through
    deadline = time.perf_counter() + 60
    while True:
        state.set(group, "warm-up", time.time())
        if reader.wait_for({"warm-up"}, min(deadline, time.perf_counter() + 1.0)):
            break
        if time.perf_counter() > deadline or reader.error is not None:
            raise RuntimeError(f"the SSE stream never delivered the warm-up event: {reader.error!r}")
    called: dict[str, float] = {}
    acked: dict[str, float] = {}
    next_at = time.perf_counter()
    for i in range(writes):
        key = f"k{i:05d}"
        next_at += spacing
        pause = next_at - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        called[key] = time.perf_counter()
        state.set(group, key, {"i": i})
        acked[key] = time.perf_counter()
    complete = reader.wait_for(set(acked), time.perf_counter() + timeout)
    reader.stop.set()
    reader.thread.join(5)
    arrived = reader.arrived
    got = [k for k in acked if k in arrived]
    from_ack = [1000 * (arrived[k] - acked[k]) for k in got]
    from_call = [1000 * (arrived[k] - called[k]) for k in got]
    write_ms = [1000 * (acked[k] - called[k]) for k in acked]
    return {
        "complete": complete,
        "writes": writes,
        "events": len(got),
        "missing": writes - len(got),
        "from_ack": from_ack,
        "from_call": from_call,
        "write_ms": write_ms,
    }


def row(name: str, samples: list[float], events: int) -> dict[str, Any]:
    return {
        "measure": name,
        "events": events,
        "p50 ms": percentile(samples, 0.50),
        "p90 ms": percentile(samples, 0.90),
        "p99 ms": percentile(samples, 0.99),
        "min ms": min(samples),
        "max ms": max(samples),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--writes", type=int, default=500)
    parser.add_argument("--spacing", type=float, default=5.0, help="ms between writes")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait after the last write")
    parser.add_argument("--out", default="bench/results/sse_latency.json")
    args = parser.parse_args(argv)
    ray.init(include_dashboard=False, log_to_driver=False)
    state = shardstate.connect(cluster=CLUSTER, shards=4)
    try:
        console = state.start_console(port=0)
        found = measure(state, console.url, console.token, args.writes, args.spacing / 1000, args.timeout)
    finally:
        shardstate.shutdown(CLUSTER)
        ray.shutdown()
    if not found["from_ack"]:
        print("no event arrived")
        return 1
    rows = [
        row("write acknowledged → event", found["from_ack"], found["events"]),
        row("write called → event", found["from_call"], found["events"]),
        row("write call (for scale)", found["write_ms"], found["writes"]),
    ]
    extra = {
        "writes": found["writes"],
        "spacing_ms": args.spacing,
        "missing": found["missing"],
        "complete": found["complete"],
    }
    title = f"SSE event latency ({found['writes']} writes, one every {args.spacing:g} ms)"
    report(title, rows, args.out, extra)
    return 0 if found["complete"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
