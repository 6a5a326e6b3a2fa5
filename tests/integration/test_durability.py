"""Durable shards: real kills, whole-cluster restarts, idempotent retries, CAS, TTL, bad files."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import ray

import shardstate
from shardstate import ConflictError, InvalidInput, Unavailable, ops
from shardstate.cluster.slots import slot_of
from shardstate.shards import commands as C

pytestmark = pytest.mark.timeout(300)

#: the tests that also run on the Ray-call transport (the rest run on the default only)
BOTH_TRANSPORTS = pytest.mark.parametrize("state", ["socket", "ray"], indirect=True)


def owner_info(state: shardstate.StateClient, group: str) -> dict[str, object]:
    index = state._link.current().owners[slot_of(group)]
    return state.shard_info()[index]


@ray.remote
def stream_increments(state: shardstate.StateClient, group: str, task: int, calls: int) -> int:
    """Idempotent increments (op_id per call); returns how many calls were acknowledged."""
    acked = 0
    for i in range(calls):
        state.update(group, "counter", [ops.increment("n")], op_id=f"t{task}-c{i}")
        acked += 1
        time.sleep(0.002)
    return acked


@BOTH_TRANSPORTS
def test_sigkill_shard_while_tasks_stream_increments(state: shardstate.StateClient, group: str) -> None:
    before = owner_info(state, group)
    refs = [stream_increments.remote(state, group, t, 100) for t in range(20)]
    # wait until the stream is under way, then really kill the shard's worker process
    deadline = time.monotonic() + 60
    while (state.get(group, "counter") or {}).get("n", 0) < 200:
        assert time.monotonic() < deadline, "the stream did not start"
        time.sleep(0.02)
    os.kill(int(before["pid"]), signal.SIGKILL)  # type: ignore[call-overload]
    at_kill = state.get(group, "counter")["n"]
    acked = ray.get(refs)
    after = owner_info(state, group)
    assert after["pid"] != before["pid"]
    assert after["restarted"] is True
    assert at_kill < 2000, "the kill came too late to hit the stream"
    assert sum(acked) == 2000  # every call was eventually acknowledged (through retries)
    assert state.get(group, "counter") == {"n": 2000}  # none lost, none doubled


def test_ray_kill_with_restart_keeps_acknowledged_writes(state: shardstate.StateClient, group: str) -> None:
    for i in range(50):
        state.set(group, f"k{i}", {"i": i})
    before = state.get_entry(group, "k7")
    shard = state._link.current().shard_for(group)
    ray.kill(shard, no_restart=False)
    assert [it.key for it in state.items(group)] == [f"k{i}" for i in range(50)]  # retried until back
    assert state.get_entry(group, "k7") == before
    state.set(group, "k7", "after")  # versions keep growing across the restart
    assert state.get_entry(group, "k7").version > before.version


def test_whole_cluster_restart_keeps_everything(new_cluster: dict[str, str]) -> None:
    state = shardstate.connect(**new_cluster, shards=3)
    for g in range(10):
        for k in range(5):
            state.set(f"grp-{g}", f"key-{k}", {"g": g, "k": k, "blob": b"\x00\x01"})
    state.update("grp-3", "key-2", [ops.increment("hits", 3)])
    state.delete("grp-4", "key-0")
    state.set("grp-4", "key-0", "moved to the end")
    expected = {g: state.items(g) for g in state.list_groups()}
    versions = state.get_entry("grp-3", "key-2")
    assert shardstate.shutdown(new_cluster["cluster"]) is True

    again = shardstate.connect(cluster=new_cluster["cluster"], storage=new_cluster["storage"])
    assert again.config["shards"] == 3  # the stored settings win
    assert {g: again.items(g) for g in again.list_groups()} == expected
    assert [it.key for it in again.items("grp-4")][-1] == "key-0"
    assert again.get_entry("grp-3", "key-2") == versions


FRESH_RAY = textwrap.dedent(
    """
    import json, sys
    import ray
    import shardstate
    from shardstate import ops
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    state = shardstate.connect(cluster=sys.argv[2], storage=sys.argv[3], shards=2)
    if sys.argv[1] == "write":
        for i in range(20):
            state.update("fresh", "doc", [ops.increment("n"), ops.append("seen", i)])
        state.set("fresh", "other", [1, 2, 3])
        print(json.dumps("written"))
    else:
        print(json.dumps({"doc": state.get("fresh", "doc"), "other": state.get("fresh", "other")}))
    """
)


def test_fresh_ray_instance_finds_the_data(tmp_path: Path) -> None:
    script = tmp_path / "fresh.py"
    script.write_text(FRESH_RAY)
    name = f"fresh-{os.getpid()}"

    def run(mode: str) -> object:
        # a separate driver starts (and, on exit, tears down) its own Ray instance: nothing survives
        # between the two runs but the files
        out = subprocess.run(
            [sys.executable, str(script), mode, name, str(tmp_path / "store")],
            capture_output=True,
            text=True,
            timeout=240,
            check=False,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    assert run("write") == "written"
    got = run("read")
    assert got == {"doc": {"n": 20, "seen": list(range(20))}, "other": [1, 2, 3]}


@BOTH_TRANSPORTS
def test_same_op_id_applies_once(state: shardstate.StateClient, group: str) -> None:
    first = state.update(group, "k", [ops.increment("n", 5)], op_id="job-1/step-3")
    again = state.update(group, "k", [ops.increment("n", 5)], op_id="job-1/step-3")
    assert first == again
    assert state.get(group, "k") == {"n": 5}
    state.update(group, "k", [ops.increment("n", 5)], op_id="job-1/step-4")
    assert state.get(group, "k") == {"n": 10}
    s1 = state.set(group, "s", "a", op_id="set-1")
    state.set(group, "s", "b")
    assert state.set(group, "s", "a", op_id="set-1") == s1  # replayed, not re-applied
    assert state.get(group, "s") == "b"
    assert state.delete(group, "s", op_id="del-1") == "b"
    state.set(group, "s", "c")
    assert state.delete(group, "s", op_id="del-1") == "b"
    assert state.get(group, "s") == "c"
    with pytest.raises(InvalidInput):
        state.set(group, "s", 1, op_id="~reserved")


def test_an_op_id_is_scoped_to_its_key_and_bound_to_its_call(state: shardstate.StateClient) -> None:
    """Issue 9 item 1, as the review saw it: a handler writing two keys with one op_id loses none."""
    groups = [f"op-scope-{i}" for i in range(8)]  # several groups: some share a shard, some do not
    for g in groups:
        assert state.set(g, "a", 1, op_id="evt-1") == shardstate.SetResult(old_value=None, new_value=1)
        assert state.set(g, "b", 2, op_id="evt-1") == shardstate.SetResult(old_value=None, new_value=2)
        assert state.update(g, "c", [ops.increment("n")], op_id="evt-1").new_value == {"n": 1}
    for g in groups:
        assert [(i.key, i.value) for i in state.items(g)] == [("a", 1), ("b", 2), ("c", {"n": 1})]
        # a retry of the same call: its first result, applied once
        assert state.update(g, "c", [ops.increment("n")], op_id="evt-1").new_value == {"n": 1}
        # the same op_id on the same key for a different call: refused, nothing changes
        with pytest.raises(InvalidInput, match="reused for a different call"):
            state.set(g, "a", 99, op_id="evt-1")
        with pytest.raises(InvalidInput, match="reused for a different call"):
            state.update(g, "c", [ops.increment("n", 2)], op_id="evt-1")
        assert state.get(g, "a") == 1
        assert state.get(g, "c") == {"n": 1}
        state.clear(g)


@ray.remote
def cas_adder(state: shardstate.StateClient, group: str, times: int) -> int:
    conflicts = 0
    for _ in range(times):
        while True:
            entry = state.get_entry(group, "total")
            version = 0 if entry is None else entry.version
            value = 0 if entry is None else entry.value
            try:
                state.set(group, "total", value + 1, expected_version=version)
                break
            except ConflictError:
                conflicts += 1
    return conflicts


def test_cas_race_ends_exact(state: shardstate.StateClient, group: str) -> None:
    conflicts = ray.get([cas_adder.remote(state, group, 10) for _ in range(20)])
    assert state.get(group, "total") == 200
    version = state.get_entry(group, "total").version
    assert version >= 200  # versions are the shard's seqs: 200 writes of this key, maybe others between
    print(f"CAS race: {sum(conflicts)} conflicts retried")
    with pytest.raises(ConflictError) as err:
        state.set(group, "total", 0, expected_version=0)  # 0 = must not exist
    assert (err.value.expected, err.value.actual) == (0, version)
    assert state.get(group, "total") == 200


def test_ttl_expiry_everywhere_and_after_restart(new_cluster: dict[str, str]) -> None:
    state = shardstate.connect(**new_cluster, shards=2)
    state.set("ttl-g", "short", 1, ttl=1.0)
    state.set("ttl-g", "long", 2)
    state.set("ttl-only", "x", 3, ttl=1.0)
    state.update("ttl-g", "doc", [ops.increment("n")], ttl=1.0)
    entry = state.get_entry("ttl-g", "short")
    assert entry.expires_at is not None
    assert entry.expires_at - entry.updated_at == pytest.approx(1.0)
    assert state.list_groups() == ["ttl-g", "ttl-only"]
    assert [i.key for i in state.items("ttl-g")] == ["short", "long", "doc"]
    time.sleep(1.6)
    assert state.get("ttl-g", "short") is None
    assert state.get("ttl-g", "doc") is None
    assert state.list("ttl-g") == [2]
    assert [i.key for i in state.items("ttl-g")] == ["long"]
    assert state.list_groups() == ["ttl-g"]
    time.sleep(1.5)  # let the shards' own sweeps delete the rows
    assert shardstate.shutdown(new_cluster["cluster"])
    again = shardstate.connect(**new_cluster)
    assert again.list_groups() == ["ttl-g"]
    assert again.items("ttl-g") == [shardstate.StateItem(key="long", value=2)]


def test_corrupt_or_missing_file_is_a_clear_error(new_cluster: dict[str, str]) -> None:
    state = shardstate.connect(**new_cluster, shards=2)
    for i in range(20):
        state.set(f"g{i}", "k", i)
    assert shardstate.shutdown(new_cluster["cluster"])
    directory = Path(new_cluster["storage"]) / new_cluster["cluster"]
    db = directory / "shard-0.db"
    files = [db, Path(f"{db}-wal"), Path(f"{db}-shm")]
    saved = {f: f.read_bytes() for f in files if f.exists()}  # the WAL may hold the latest commits
    for f in files[1:]:
        f.unlink(missing_ok=True)
    db.write_bytes(b"this is not a database" * 100)
    with pytest.raises(Unavailable, match="unreadable|corrupt"):
        shardstate.connect(**new_cluster)
    for f, data in saved.items():
        f.write_bytes(data)
    (directory / "shard-1.db").rename(directory / "shard-1.db.moved")
    with pytest.raises(Unavailable, match="missing"):
        shardstate.connect(**new_cluster)
    (directory / "shard-1.db.moved").rename(directory / "shard-1.db")
    healed = shardstate.connect(**new_cluster)  # files restored: the cluster starts with all data
    assert sorted(healed.get(f"g{i}", "k") for i in range(20)) == list(range(20))


def test_export_and_import_roundtrip(state: shardstate.StateClient, group: str, tmp_path: Path) -> None:
    other = group + "-b"
    state.set(group, "a", {"n": 1, "tags": ["x", "y"]})
    state.set(group, "b", None)
    state.set(other, "c", "text é")
    path = tmp_path / "dump.jsonl"
    count = shardstate.export(path, groups=[group, other], state=state)
    assert count == 3
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines[0] == {"group_id": group, "key": "a", "value": {"n": 1, "tags": ["x", "y"]}}
    state.clear(group)
    state.clear(other)
    assert shardstate.import_(path, state=state) == 3
    assert state.items(group) == [
        shardstate.StateItem(key="a", value={"n": 1, "tags": ["x", "y"]}),
        shardstate.StateItem(key="b", value=None),
    ]
    assert state.get(other, "c") == "text é"
    state.set(group, "bad", {1, 2})
    with pytest.raises(InvalidInput, match="bad"):
        shardstate.export(tmp_path / "bad.jsonl", groups=[group], state=state)
    assert not (tmp_path / "bad.jsonl").exists()
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"group_id": "g", "key": "k", "value": 1}\n{"oops": 1}\n')
    with pytest.raises(InvalidInput, match=":2:"):
        shardstate.import_(broken, state=state)
    assert state.get("g", "k") is None  # nothing written


def shard_of(state: shardstate.StateClient, group: str) -> tuple[int, object]:
    view = state._link.current()
    index = view.owners[slot_of(group)]
    return index, view.shards[index]


def wait_restarted(state: shardstate.StateClient, index: int, old_pid: int) -> dict[str, object]:
    deadline = time.monotonic() + 120
    while True:
        try:
            info = state.shard_info()[index]
            if info["pid"] != old_pid and info.get("phase", "ready") == "ready":
                return info
        except Unavailable:
            pass
        assert time.monotonic() < deadline, "the shard did not come back"
        time.sleep(0.05)


def test_memory_shard_restart_never_repeats_seqs_or_event_ids(new_cluster: dict[str, str]) -> None:
    """Item 12: a memory shard's seqs (and the event ids made of them) go on after a restart."""
    name = new_cluster["cluster"]
    state = shardstate.connect(**new_cluster, shards=1, durability="memory")
    for i in range(5):
        state.set("g", f"k{i}", i)
    index, shard = shard_of(state, "g")
    seq_before = ray.get(shard.event_state.remote())[0]  # type: ignore[attr-defined]
    ids_before = {f"{name}/{index}/{e.seq}" for e in ray.get(shard.events_since.remote(0))}  # type: ignore[attr-defined]
    assert len(ids_before) == 5
    pid = state.shard_info()[index]["pid"]
    os.kill(int(pid), signal.SIGKILL)  # type: ignore[call-overload]
    wait_restarted(state, index, int(pid))  # type: ignore[call-overload]
    for i in range(5):
        state.set("g", f"k{i}", i)  # the same writes again: new events
    events_after = ray.get(shard.events_since.remote(0))  # type: ignore[attr-defined]
    assert len(events_after) == 5
    assert min(e.seq for e in events_after) > seq_before
    assert ray.get(shard.event_state.remote())[0] > seq_before  # type: ignore[attr-defined]
    assert not ids_before & {f"{name}/{index}/{e.seq}" for e in events_after}


def test_full_disk_makes_the_shard_read_only_until_it_recovers(new_cluster: dict[str, str]) -> None:
    """Item 13: a failing commit answers Unavailable, keeps the process, serves reads, recovers."""
    state = shardstate.connect(**new_cluster, shards=1)
    for i in range(10):
        state.set("g", f"k{i}", {"i": i})
    index, shard = shard_of(state, "g")
    before = state.shard_info()[index]
    assert before["storage_ok"] is True
    ray.get(shard.limit_storage_pages.remote(0))  # type: ignore[attr-defined]  # the disk is "full" now
    big = C.command(C.SET, "g", "big", pickle.dumps(b"x" * 200_000), None)
    read = C.command(C.GET, "g", "k3")
    results = ray.get(shard.execute.remote([read, big, read]))  # type: ignore[attr-defined]
    assert [ok for ok, _ in results] == [False, False, False]  # the whole failed batch
    assert all(isinstance(e, Unavailable) and e.retriable for _, e in results)
    assert "storage is failing" in str(results[1][1])
    info = state.shard_info()[index]
    assert info["storage_ok"] is False
    assert "full" in str(info["storage_error"])
    # read-only: reads are served, writes (even small ones) answered Unavailable
    small = C.command(C.SET, "g", "small", pickle.dumps(1), None)
    (ok, value), (ok2, error) = ray.get(shard.execute.remote([read, small]))  # type: ignore[attr-defined]
    assert ok
    assert pickle.loads(value) == {"i": 3}
    assert not ok2
    assert isinstance(error, Unavailable)
    assert "read-only" in str(error)
    assert state.get("g", "k7") == {"i": 7}
    assert [it.key for it in state.items("g")] == [f"k{i}" for i in range(10)]  # the failed write is gone
    assert state.shard_info()[index]["pid"] == before["pid"]  # no process restart

    ray.get(shard.limit_storage_pages.remote(None))  # type: ignore[attr-defined]  # space again
    deadline = time.monotonic() + 60
    while not state.shard_info()[index]["storage_ok"]:  # the shard's own probe finds it out
        assert time.monotonic() < deadline, "the shard did not notice its storage works again"
        time.sleep(0.1)
    state.set("g", "big", b"x" * 200_000)
    assert state.get("g", "big") == b"x" * 200_000
    after = state.shard_info()[index]
    assert after["pid"] == before["pid"]
    assert after["restarted"] is False
    assert shardstate.shutdown(new_cluster["cluster"])  # nothing acknowledged was lost, on disk either
    again = shardstate.connect(**new_cluster)
    assert [it.key for it in again.items("g")] == [*(f"k{i}" for i in range(10)), "big"]


@ray.remote
def stream_counted(state: shardstate.StateClient, group: str, task: int, calls: int) -> int:
    """Increments with automatic op_ids; marks its start; returns how many were acknowledged."""
    state.set(group, f"started-{task}", True)
    acked = 0
    for _ in range(calls):
        state.update(group, "counter", [ops.increment("n")])
        acked += 1
        time.sleep(0.005)
    return acked


def test_router_sigkill_under_load_clients_keep_working(new_cluster: dict[str, str]) -> None:
    """Tests that must exist: SIGKILL the router while tasks stream writes; nothing is lost."""
    new_cluster["cluster"]
    state = shardstate.connect(**new_cluster, shards=2)
    router = state._link.router
    pid = ray.get(router.__ray_call__.remote(lambda self: os.getpid()))
    tasks = 6
    refs = [stream_counted.remote(state, "routed", t, 150) for t in range(tasks)]
    deadline = time.monotonic() + 120
    while len(state.items("routed")) < tasks + 1 or state.get("routed", "counter")["n"] < 100:
        assert time.monotonic() < deadline, "the stream did not start"
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    at_kill = state.get("routed", "counter")["n"]
    acked = ray.get(refs, timeout=240)
    assert at_kill < tasks * 150, "the kill came too late to hit the stream"
    assert sum(acked) == tasks * 150
    assert state.get("routed", "counter") == {"n": tasks * 150}
    again = shardstate.connect(**new_cluster, shards=2)  # attaches through the restarted router
    infos = again.shard_info()
    assert [i["index"] for i in infos] == [0, 1]
    assert ray.get(router.__ray_call__.remote(lambda self: os.getpid())) != pid
    again.set("routed", "after", 1)
    assert state.get("routed", "after") == 1
