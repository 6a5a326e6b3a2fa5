"""Failover scenarios on a ``ray.cluster_utils.Cluster`` of four nodes (run in a process of its own by
``test_failover.py``; prints one JSON line of findings per scenario).

Every scenario runs a write load with automatic op_ids (driver threads, and Ray tasks pinned to the
head node) while it really breaks something, then reads everything back:

- ``node``: removes the node of shard 0's primary (``remove_node(allow_graceful=False)``);
- ``twice``: SIGKILLs shard 0's primary, waits until its new backup is in sync, SIGKILLs again;
- ``paused``: SIGSTOPs shard 0's primary with a write sent to it on a raw connection, waits for the
  failover, SIGCONTs it: that write must never be acknowledged nor exist;
- ``router``: SIGKILLs shard 0's primary and at once the router;
- ``triggers``: SIGKILLs shard 0's primary while a trigger records every event it is handed;
- ``console``: SIGKILLs shard 0's primary while the console's SSE stream is read and writes go
  through the HTTP API too: every acknowledged HTTP write stays, every committed change is streamed.

Usage: ``python failover_scenario.py SCENARIO [SCENARIO ...]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: bench.faultload

import shardstate  # noqa: E402
from bench.faultload import Load, longest_stall, replication, task_writer, wait_for  # noqa: E402
from bench.faultload import groups_per_shard as groups_of_shards  # noqa: E402
from shardstate import ops  # noqa: E402
from shardstate.cluster import metadata  # noqa: E402
from shardstate.shards import commands as C  # noqa: E402
from shardstate.shards.wire import ShardConnection  # noqa: E402

GROUPS_PER_SHARD = 3
SHARDS = 3


def primary_info(state: shardstate.StateClient, shard: int) -> dict[str, Any]:
    return state.shard_info()[shard]


def in_sync(state: shardstate.StateClient) -> bool:
    return all(len(r["in_sync"]) >= 1 for r in replication(state))


def scenario_node(state: shardstate.StateClient, cluster: Cluster, groups: list[str]) -> dict[str, Any]:
    load = Load(state, groups).start()
    pinned = task_writer.options(resources={"head": 0.01})
    tasks = [pinned.remote(state, groups, 150, f"task-{t}") for t in range(2)]
    time.sleep(1.0)
    workers = {n.node_id: n for n in cluster.worker_nodes}
    infos = state.shard_info()  # a shard whose primary is on a worker node (the head must stay)
    shard = next(i for i, info in enumerate(infos) if info["node_id"] in workers)
    node = workers[infos[shard]["node_id"]]
    before = replication(state)[shard]["term"]
    removed = time.monotonic()
    cluster.remove_node(node, allow_graceful=False)
    writable = longest_stall(state, groups, removed)
    time.sleep(1.0)
    load.finish()
    task_counts = ray.get(tasks, timeout=300)
    result = load.check()
    for t, count in enumerate(task_counts):
        total = sum((state.get(g, f"task-{t}") or {"n": 0})["n"] for g in groups)
        if total != count:
            result["wrong"].append([f"task-{t}", count, total])
    wait_for(lambda: in_sync(state), 90)
    after = replication(state)[shard]
    cluster.add_node(num_cpus=1)  # back to four nodes for the next scenario
    return {**result, "writable_s": writable, "term_before": before, "term_after": after["term"]}


def scenario_twice(state: shardstate.StateClient, cluster: Cluster, groups: list[str]) -> dict[str, Any]:
    load = Load(state, groups).start()
    terms, times = [], []
    for _ in range(2):
        wait_for(lambda: in_sync(state), 90)
        info = primary_info(state, 0)
        killed = time.monotonic()
        os.kill(info["pid"], signal.SIGKILL)
        times.append(longest_stall(state, groups, killed))
        terms.append(replication(state)[0]["term"])
    time.sleep(0.5)
    load.finish()
    return {**load.check(), "terms": terms, "writable_s": times}


def scenario_paused(state: shardstate.StateClient, cluster: Cluster, groups: list[str]) -> dict[str, Any]:
    wait_for(lambda: in_sync(state), 90)
    load = Load(state, groups).start()
    time.sleep(0.5)
    info = primary_info(state, 0)
    group = groups[0]
    host, port = info["address"]
    conn = ShardConnection((host, port), metadata.secret(state.cluster))
    term = replication(state)[0]["term"]
    os.kill(info["pid"], signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        zombie = C.command(C.SET, group, "zombie", pickle.dumps("acknowledged by a deposed primary"), None)
        conn.send(pickle.dumps([zombie]))
        wait_for(lambda: replication(state)[0]["term"] > term, 60)

        def promoted() -> bool:  # the new term is recorded before the backup hears of it: wait for that
            now = primary_info(state, 0)
            return now["pid"] != info["pid"] and now["role"] == "primary" and (now["term"] or 0) > term

        wait_for(promoted, 60)
    finally:  # wakes up in the new term, before the router kills it
        with contextlib.suppress(ProcessLookupError):
            os.kill(info["pid"], signal.SIGCONT)
    writable = longest_stall(state, groups, stopped)
    try:
        conn.sock.settimeout(30)
        answer = pickle.loads(conn.receive())
        zombie_answer = "ok" if answer[0][0] else type(answer[0][1]).__name__
    except Exception as exc:  # the connection was closed: no acknowledgement either
        zombie_answer = f"closed ({type(exc).__name__})"
    time.sleep(0.5)
    load.finish()
    return {
        **load.check(),
        "zombie_answer": zombie_answer,
        "zombie_value": state.get(group, "zombie"),
        "writable_s": writable,
        "term_before": term,
        "term_after": replication(state)[0]["term"],
    }


def scenario_router(state: shardstate.StateClient, cluster: Cluster, groups: list[str]) -> dict[str, Any]:
    wait_for(lambda: in_sync(state), 90)
    load = Load(state, groups).start()
    time.sleep(0.5)
    router_pid = state._link.ask("info")["pid"]
    info = primary_info(state, 0)
    term = replication(state)[0]["term"]
    killed = time.monotonic()
    os.kill(info["pid"], signal.SIGKILL)
    os.kill(router_pid, signal.SIGKILL)
    writable = longest_stall(state, groups, killed)
    time.sleep(0.5)
    load.finish()
    new_pid = state._link.ask("info")["pid"]
    return {
        **load.check(),
        "writable_s": writable,
        "router_restarted": new_pid != router_pid,
        "term_before": term,
        "term_after": replication(state)[0]["term"],
    }


def scenario_triggers(state: shardstate.StateClient, cluster: Cluster, groups: list[str]) -> dict[str, Any]:
    wait_for(lambda: in_sync(state), 90)
    watched = groups[0]

    def record(event: shardstate.StateEvent) -> None:
        import shardstate as ss

        version = (event.new_value or {}).get("n")
        seen = ss.connect(cluster="failover")
        seen.update("seen", f"{event.group_id}:{event.key}:{version}", [ops.increment("times")])

    state.on_change(record, group_id=watched, name="recorder")
    written: list[int] = []
    stop = threading.Event()

    def writer() -> None:
        while not stop.is_set():
            result = state.update(watched, "counter", [ops.increment("n")])
            written.append(result.new_value["n"])

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    time.sleep(1.0)
    os.kill(primary_info(state, 0)["pid"], signal.SIGKILL)
    time.sleep(4.0)
    stop.set()
    thread.join(120)
    expected = {f"{watched}:counter:{n}" for n in written}

    def all_seen() -> bool:
        return expected <= {item.key for item in state.items("seen")}

    try:
        wait_for(all_seen, 120)
    except TimeoutError:
        pass
    seen = {item.key: item.value["times"] for item in state.items("seen")}
    state.remove_trigger("recorder")
    return {
        "written": len(written),
        "missing": sorted(expected - set(seen))[:10],
        "unexpected": sorted(set(seen) - expected)[:10],
        "redelivered": sum(1 for times in seen.values() if times > 1),
    }


def scenario_ordered(state: shardstate.StateClient, cluster: Cluster, groups: list[str]) -> dict[str, Any]:
    """3,000 un-awaited asyncio appends per transport from one event loop; shard 0's primary is
    SIGKILLed in the middle. Each list must end exactly 0..2999 (nothing lost, doubled, reordered)."""
    import asyncio

    found: dict[str, Any] = {}
    for transport in ("socket", "ray"):
        wait_for(lambda: in_sync(state), 90)
        group = groups[0]
        key = f"ordered-{transport}"

        async def run(key: str = key, transport: str = transport, group: str = group) -> None:
            client = await shardstate.connect_async(cluster=state.cluster, transport=transport)
            await client.set(group, key, {"seen": []})
            calls = []
            for i in range(3000):
                calls.append(asyncio.ensure_future(client.update(group, key, [ops.append("seen", i)])))
                if i == 1500:
                    pid = (await client.shard_info())[0]["pid"]
                    os.kill(pid, signal.SIGKILL)
                if i % 100 == 0:
                    await asyncio.sleep(0)
            await asyncio.gather(*calls)

        asyncio.run(run())
        found[transport] = (state.get(group, key) or {}).get("seen") == list(range(3000))
    return {"in_order": found, "term": replication(state)[0]["term"]}


def scenario_console(state: shardstate.StateClient, cluster: Cluster, groups: list[str]) -> dict[str, Any]:
    """The console through a failover: a Python writer and an HTTP writer (PATCH through the
    console) increment two counters of shard 0's group while an SSE reader follows that group;
    shard 0's primary is SIGKILLed in the middle."""
    import httpx

    wait_for(lambda: in_sync(state), 90)
    watched = groups[0]
    info = state.start_console(port=0)
    headers = {"Authorization": f"Bearer {info.token}"}
    streamed: set[tuple[str, int]] = set()
    stream_open = threading.Event()
    stop_stream = threading.Event()

    def reader() -> None:
        timeout = httpx.Timeout(60, read=None)
        with httpx.Client(base_url=info.url, headers=headers, timeout=timeout) as client:
            with client.stream("GET", "/api/v1/events", params={"group": watched}) as response:
                for line in response.iter_lines():
                    stream_open.set()
                    if stop_stream.is_set():
                        return
                    if line.startswith("data:"):
                        data = json.loads(line[5:])
                        if data["event_type"] != "state:deleted":
                            streamed.add((data["key"], data["new_value"]["n"]))

    threading.Thread(target=reader, daemon=True).start()
    stream_open.wait(60)
    written: list[tuple[str, int]] = []
    http_errors: list[str] = []
    stop = threading.Event()

    def python_writer() -> None:
        while not stop.is_set():
            written.append(("py", state.update(watched, "py", [ops.increment("n")]).new_value["n"]))

    def http_writer() -> None:
        body = {"ops": [{"type": "increment", "path": "n"}]}
        with httpx.Client(base_url=info.url, headers=headers, timeout=180) as client:
            while not stop.is_set():
                response = client.patch(f"/api/v1/groups/{watched}/items/http", json=body)
                if response.status_code == 200:
                    written.append(("http", response.json()["new_value"]["n"]))
                else:
                    http_errors.append(f"{response.status_code} {response.text[:200]}")

    writers = [threading.Thread(target=w, daemon=True) for w in (python_writer, http_writer)]
    for thread in writers:
        thread.start()
    time.sleep(1.0)
    os.kill(primary_info(state, 0)["pid"], signal.SIGKILL)
    at_kill = len(written)
    time.sleep(4.0)
    stop.set()
    for thread in writers:
        thread.join(180)
    expected = set(written)
    # acknowledged after the failover: each writer's later writes, past the one in flight at the kill
    in_flight = {next((w for w in written[at_kill:] if w[0] == key), None) for key in ("py", "http")}
    after_failover = set(written[at_kill:]) - in_flight
    try:
        wait_for(lambda: expected <= streamed, 60)
    except TimeoutError:
        pass
    stop_stream.set()
    http_acked = [n for key, n in written if key == "http"]
    return {
        "written": len(written),
        "http_acked": len(http_acked),
        "http_final": (state.get(watched, "http") or {}).get("n"),
        "http_errors": http_errors[:5],
        "not_streamed": sorted(expected - streamed)[:10],
        # how many acknowledged writes before the kill each missed one was (its event not pushed yet)
        "missed_before_kill": sorted(at_kill - written.index(w) for w in expected - streamed),
        "streamed_after_failover": len(after_failover & streamed),
        "after_failover_missing": sorted(after_failover - streamed)[:10],
        "term": replication(state)[0]["term"],
    }


SCENARIOS = {
    "node": scenario_node,
    "twice": scenario_twice,
    "paused": scenario_paused,
    "router": scenario_router,
    "triggers": scenario_triggers,
    "ordered": scenario_ordered,
    "console": scenario_console,
}


def main(names: list[str]) -> int:
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"head": 1}})
    for _ in range(3):
        cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    cluster.wait_for_nodes()
    storage = tempfile.mkdtemp()
    state = shardstate.connect(
        cluster="failover", shards=SHARDS, storage=storage, replicas=1, retry_timeout=120
    )
    groups = groups_of_shards(state, SHARDS, GROUPS_PER_SHARD)
    for name in names:
        started = time.monotonic()
        found = SCENARIOS[name](state, cluster, groups)
        found["scenario"] = name
        found["seconds"] = round(time.monotonic() - started, 1)
        print(json.dumps(found), flush=True)
    shardstate.shutdown("failover")
    ray.shutdown()
    cluster.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(SCENARIOS)))
