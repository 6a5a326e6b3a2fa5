"""The chaos harness: seeded schedules of real faults under a write load, then a full check.

For every seed, on a fresh ``ray.cluster_utils.Cluster`` (head + 3 worker nodes) with a replicated
state cluster (``replicas=1``, 3 shards, durability ``os``), it starts

- driver threads writing with automatic op_ids (``bench.faultload.Load``: counters, per-thread
  ordered logs, one shared log per group),
- Ray tasks pinned to the head node incrementing counters (their acknowledgements are counted),
- a trigger that records every event of one group, while a writer increments a counter there,

then draws ``--faults`` faults from the seed, one after the other, each at a random moment:

- ``kill-primary`` / ``kill-backup``: SIGKILL a random shard's primary / backup process;
- ``pause-primary``: SIGSTOP a primary past the failure detection (2-4 s), then SIGCONT it;
- ``node``: remove the node of a random primary or backup (``allow_graceful=False``), add a new one;
- ``router``: SIGKILL the router; ``subscriber``: SIGKILL a subscriber.

A fault that takes a data member waits for the cluster to be healthy again first (``replicas=1``
survives one lost copy at a time: that is its guarantee); router and subscriber kills do not wait
(so they also land in the middle of failovers). At the end the load stops and everything is checked:
no acknowledged write lost, counters exact, every key's history consistent with one order of its
acknowledged writes, the trigger's recorded set equal to the committed set (at least once: repeats
allowed, gaps not), every group writable again. Each schedule prints one JSON line and its seed,
so a failure replays with ``--seed``.

    python -m bench.chaos --seeds 20             # make chaos
    python -m bench.chaos --seed 7 --faults 6    # replay one schedule
    python -m bench.chaos --seeds 5 --durability memory
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

import shardstate
from bench.faultload import Load, groups_per_shard, healthy, longest_stall, replication, task_writer, wait_for
from shardstate import ops

SHARDS = 3
WORKERS = 3
FAULTS = ("kill-primary", "kill-backup", "pause-primary", "node", "router", "subscriber")
DATA_FAULTS = ("kill-primary", "kill-backup", "pause-primary", "node")
CLUSTER = "chaos"


def members(state: shardstate.StateClient) -> list[dict[str, Any]]:
    """Every member's info (shard, member, role, pid, node)."""
    out = []
    for shard in state.shard_info():
        for m in shard.get("members", []):
            if "pid" in m:
                out.append({**m, "shard": shard["index"]})
    return out


class Schedule:
    """One seed's run: the cluster, the load, the faults, the check."""

    def __init__(self, seed: int, faults: int, cluster: Cluster, durability: str = "os") -> None:
        self.seed, self.faults, self.cluster = seed, faults, cluster
        self.durability = durability
        self.rng = random.Random(seed)
        self.log: list[str] = []
        self.stalls: list[float] = []

    def run(self) -> dict[str, Any]:
        state = shardstate.connect(
            cluster=CLUSTER,
            shards=SHARDS,
            storage=tempfile.mkdtemp(),
            replicas=1,
            durability=self.durability,
            retry_timeout=180,
        )
        self._healthy(state)
        groups = groups_per_shard(state, SHARDS, 2)
        watched = groups[0]

        def record_events(event: shardstate.StateEvent) -> None:  # pickled by value (a closure)
            import shardstate as ss
            from shardstate import ops as o

            version = (event.new_value or {}).get("n")
            ss.connect(cluster="chaos").update("seen", str(version), [o.increment("times")])

        state.on_change(record_events, group_id=watched, key="watched", name="recorder")
        load = Load(state, groups).start()
        pinned = task_writer.options(resources={"head": 0.01})
        tasks = [pinned.remote(state, groups, 300, f"task-{t}") for t in range(2)]
        written: list[int] = []
        stop = threading.Event()

        def watched_writer() -> None:
            while not stop.is_set():
                try:
                    written.append(state.update(watched, "watched", [ops.increment("n")]).new_value["n"])
                except Exception as exc:
                    load.errors.append(f"watched: {type(exc).__name__}: {exc}")

        writer = threading.Thread(target=watched_writer, daemon=True)
        writer.start()
        try:
            for _ in range(self.faults):
                time.sleep(self.rng.uniform(0.3, 1.5))
                self._fault(state, groups, self.rng.choice(FAULTS))
            self._healthy(state)
        finally:
            stop.set()
            writer.join(180)
            load.finish()
        result = load.check()
        counts = ray.get(tasks, timeout=600)
        for t, count in enumerate(counts):
            total = sum((state.get(g, f"task-{t}") or {"n": 0})["n"] for g in groups)
            if total != count:
                result["wrong"].append([f"task-{t}", count, total])
        final = (state.get(watched, "watched") or {"n": 0})["n"]
        committed = {str(n) for n in range(1, final + 1)}
        acknowledged = {str(n) for n in written}
        wait_for_seen = time.monotonic()
        seen: dict[str, int] = {}
        while time.monotonic() - wait_for_seen < 120:
            seen = {item.key: item.value["times"] for item in state.items("seen")}
            if committed <= set(seen):
                break
            time.sleep(0.5)
        writable = longest_stall(state, groups, time.monotonic(), window=0.5) >= 0
        state.remove_trigger("recorder")
        shardstate.shutdown(CLUSTER)
        problems = list(result["wrong"]) + result["errors"]
        if not acknowledged <= committed:
            problems.append(["watched: acknowledged versions missing", sorted(acknowledged - committed)[:5]])
        if set(seen) != committed:
            problems.append(["trigger", sorted(committed - set(seen))[:5], sorted(set(seen) - committed)[:5]])
        if not writable:
            problems.append("a group is not writable at the end")
        return {
            "seed": self.seed,
            "faults": self.log,
            "ok": not problems,
            "problems": problems[:10],
            "acked": result["acked"] + sum(counts) + len(written),
            "events": len(committed),
            "redelivered": sum(1 for times in seen.values() if times > 1),
            "stall_max_s": round(max(self.stalls), 2) if self.stalls else None,
        }

    def _healthy(self, state: shardstate.StateClient) -> None:
        """Wait until every shard has its backups in sync again; say what is missing if not."""
        try:
            wait_for(lambda: healthy(state), 120)
        except TimeoutError:
            sets = [
                {k: s[k] for k in ("shard", "term", "primary", "in_sync", "members", "warning", "heartbeats")}
                for s in replication(state)
            ]
            raise TimeoutError(f"not healthy after 120 s: {sets}") from None

    def _fault(self, state: shardstate.StateClient, groups: list[str], kind: str) -> None:
        if kind in DATA_FAULTS:
            self._healthy(state)  # one lost copy at a time
        print(f"chaos seed {self.seed}: {kind}", file=sys.stderr, flush=True)
        started = time.monotonic()
        if kind == "router":
            pid = state._link.ask("info")["pid"]
            os.kill(pid, signal.SIGKILL)
            self.log.append(f"router pid {pid}")
            return
        if kind == "subscriber":
            stats = state._link.ask("subscriber_stats")
            victim = self.rng.choice(stats)
            os.kill(victim["pid"], signal.SIGKILL)
            self.log.append(f"subscriber {victim['index']} pid {victim['pid']}")
            return
        everyone = members(state)
        role = "backup" if kind == "kill-backup" else "primary"
        if kind == "node":
            role = self.rng.choice(["primary", "backup"])
        chosen = [m for m in everyone if m["role"] == role]
        if kind == "node":
            workers = {n.node_id: n for n in self.cluster.worker_nodes}
            chosen = [m for m in chosen if m["node_id"] in workers]
        if not chosen:
            self.log.append(f"{kind}: no target")
            return
        victim = self.rng.choice(sorted(chosen, key=lambda m: (m["shard"], m["member"])))
        where = f"shard {victim['shard']} member {victim['member']} ({role})"
        if kind in ("kill-primary", "kill-backup"):
            os.kill(victim["pid"], signal.SIGKILL)
        elif kind == "pause-primary":
            os.kill(victim["pid"], signal.SIGSTOP)
            time.sleep(self.rng.uniform(2.0, 4.0))
            try:
                os.kill(victim["pid"], signal.SIGCONT)
            except ProcessLookupError:  # the router killed it meanwhile (deposed): also fine
                pass
        else:
            node = {n.node_id: n for n in self.cluster.worker_nodes}[victim["node_id"]]
            self.cluster.remove_node(node, allow_graceful=False)
            self.cluster.add_node(num_cpus=1)
        self.log.append(f"{kind} {where}")
        if role == "primary":
            self.stalls.append(longest_stall(state, groups, started, window=2.0))


def run_seeds(seeds: list[int], faults: int, durability: str = "os") -> list[dict[str, Any]]:
    """Run every seed's schedule on its own fresh Ray cluster; one JSON line each."""
    results = []
    for seed in seeds:
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"head": 1}})
        for _ in range(WORKERS):
            cluster.add_node(num_cpus=1)
        ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
        cluster.wait_for_nodes()
        started = time.monotonic()
        schedule = Schedule(seed, faults, cluster, durability)
        try:
            found = schedule.run()
        except Exception as exc:
            found = {
                "seed": seed,
                "faults": schedule.log,
                "ok": False,
                "problems": [f"{type(exc).__name__}: {exc}"],
            }
        found["seconds"] = round(time.monotonic() - started, 1)
        print(json.dumps(found), flush=True)
        results.append(found)
        ray.shutdown()
        cluster.shutdown()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20, help="run seeds 1..N (default 20)")
    parser.add_argument("--seed", type=int, action="append", help="run this seed (repeatable)")
    parser.add_argument("--faults", type=int, default=6, help="faults per schedule (default 6)")
    parser.add_argument("--durability", default="os", choices=("os", "fsync", "memory"))
    parser.add_argument("--out", default="bench/results/chaos.json")
    args = parser.parse_args()
    seeds = args.seed or list(range(1, args.seeds + 1))
    results = run_seeds(seeds, args.faults, args.durability)
    clean = sum(r["ok"] for r in results)
    stalls = [r["stall_max_s"] for r in results if r.get("stall_max_s") is not None]
    summary = {
        "schedules": len(results),
        "clean": clean,
        "faults_per_schedule": args.faults,
        "durability": args.durability,
        "failed_seeds": [r["seed"] for r in results if not r["ok"]],
        "worst_stall_s": max(stalls) if stalls else None,
    }
    print(json.dumps({"summary": summary}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    return 0 if clean == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
