"""A write load that remembers what was acknowledged, and checks it all afterwards (fault tests,
the chaos harness, the failover bench).

Driver threads increment per-thread counters and append to per-thread ordered logs and to one
shared log per group, with automatic op_ids; every acknowledged call is counted. ``check()`` reads
everything back: a counter must equal its acknowledgements exactly, a thread's log must be exactly
its acknowledged appends in order, and the shared log must hold every acknowledged append of every
thread exactly once, each thread's in its own order (one total order of the acknowledged writes).
"""

from __future__ import annotations

import threading
import time
from typing import Any

import ray

import shardstate
from shardstate import ops
from shardstate.cluster.slots import slot_of


@ray.remote(num_cpus=0)
def task_writer(state: shardstate.StateClient, groups: list[str], rounds: int, key: str) -> int:
    """Increment ``key`` in the groups in turn, ``rounds`` times; return how many were acknowledged
    (a call that fails counts nothing: then the check allows nothing either, see ``Load.check``)."""
    done = 0
    for i in range(rounds):
        state.update(groups[i % len(groups)], key, [ops.increment("n")], returning="none")
        done += 1
    return done


class Load:
    """Driver threads writing to ``groups`` until :meth:`finish` (see the module docstring)."""

    def __init__(self, state: shardstate.StateClient, groups: list[str], threads: int = 2) -> None:
        self.state, self.groups = state, groups
        self.tag = f"{time.monotonic_ns()}"  # keys of their own for every load
        self.acked: dict[tuple[str, str], int] = {}
        self.logs: dict[tuple[str, str], list[int]] = {}
        self.shared: dict[str, list[list[int]]] = {}
        self.errors: list[str] = []
        self.calls = 0
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(t,), daemon=True) for t in range(threads)]

    def start(self) -> Load:
        """Start the threads."""
        for thread in self.threads:
            thread.start()
        return self

    def _run(self, t: int) -> None:
        i = 0
        count, log, shared = f"count-{self.tag}-{t}", f"log-{self.tag}-{t}", f"shared-{self.tag}"
        while not self.stop.is_set():
            group = self.groups[i % len(self.groups)]
            try:
                self.state.update(group, count, [ops.increment("n")], returning="none")
                with self.lock:
                    self.acked[(group, count)] = self.acked.get((group, count), 0) + 1
                n = len(self.logs.get((group, log), []))
                self.state.update(group, log, [ops.append("items", n)], returning="none")
                with self.lock:
                    self.logs.setdefault((group, log), []).append(n)
                self.state.update(group, shared, [ops.append("items", [t, n])], returning="none")
                with self.lock:
                    self.shared.setdefault(group, []).append([t, n])
                    self.calls += 3
            except Exception as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.1)
            i += 1

    def finish(self) -> None:
        """Stop the threads (each finishes its call)."""
        self.stop.set()
        for thread in self.threads:
            thread.join(180)

    def check(self) -> dict[str, Any]:
        """``{"acked", "wrong", "errors"}``: ``wrong`` lists every key whose stored value is not
        exactly what its acknowledged writes made."""
        wrong: list[Any] = []
        for (group, key), count in self.acked.items():
            got = self.state.get(group, key)
            if got != {"n": count}:
                wrong.append([group, key, count, got])
        for (group, key), items in self.logs.items():
            got = self.state.get(group, key)
            if got != {"items": items}:
                wrong.append([group, key, len(items), None if got is None else len(got.get("items", []))])
        for group, appended in self.shared.items():
            got = (self.state.get(group, f"shared-{self.tag}") or {}).get("items", [])
            if sorted(map(tuple, got)) != sorted(map(tuple, appended)):
                wrong.append([group, "shared", len(appended), len(got)])
                continue
            for t in {a[0] for a in appended}:  # each thread's appends in its own order
                if [n for tt, n in got if tt == t] != [n for tt, n in appended if tt == t]:
                    wrong.append([group, f"shared order of thread {t}"])
        acked = sum(self.acked.values())
        return {"acked": acked, "calls": self.calls, "wrong": wrong, "errors": self.errors[:5]}


def groups_per_shard(state: shardstate.StateClient, shards: int, per_shard: int) -> list[str]:
    """``per_shard`` group names owned by each of the ``shards`` shards."""
    owners = state._link.current().owners
    out = []
    for shard in range(shards):
        found = [f"g{shard}-{i}" for i in range(10_000) if owners[slot_of(f"g{shard}-{i}")] == shard]
        out += found[:per_shard]
    return out


def replication(state: shardstate.StateClient) -> list[dict[str, Any]]:
    """The router's view of every replicated shard (term, primary, in-sync backups, members)."""
    return state._link.ask("replication")  # type: ignore[no-any-return]


def healthy(state: shardstate.StateClient) -> bool:
    """Every shard serves with all its backups in sync (and none of its members missing)."""
    try:
        sets = replication(state)
    except Exception:
        return False
    return all(not s["degraded"] and s["heartbeats"].get(str(s["primary"])) for s in sets)


def wait_for(predicate: Any, timeout: float = 60.0) -> float:
    """Wait until ``predicate()``; seconds waited. ``TimeoutError`` after ``timeout``."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise TimeoutError("condition not met in time")
        time.sleep(0.05)
    return time.monotonic() - started


def longest_stall(
    state: shardstate.StateClient, groups: list[str], since: float, window: float = 6.0
) -> float:
    """The longest time any group went without an acknowledged write, from ``since`` on: one thread
    per group writes again and again for ``window`` seconds (and at least once). -1 if a write failed."""
    stalls: dict[str, float] = {}

    def probe(group: str) -> None:
        last, longest, i = since, 0.0, 0
        while True:
            state.set(group, "probe", i)
            now = time.monotonic()
            longest, last, i = max(longest, now - last), now, i + 1
            if now - since > window:
                break
            time.sleep(0.02)
        stalls[group] = longest

    threads = [threading.Thread(target=probe, args=(g,)) for g in groups]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    return max(stalls.values()) if len(stalls) == len(groups) else -1.0
