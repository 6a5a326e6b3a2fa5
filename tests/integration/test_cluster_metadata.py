"""Cluster metadata in the GCS; start-up that never kills a running cluster (issue 9, items 4 and 15)."""

from __future__ import annotations

import os
import pickle
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import ray

import shardstate
from shardstate import Unavailable
from shardstate._errors import ShardLoading
from shardstate.cluster import metadata
from shardstate.cluster.bootstrap import find_router
from shardstate.cluster.config import NAMESPACE
from shardstate.cluster.slots import slot_of
from shardstate.shards import commands as C

pytestmark = pytest.mark.timeout(300)


def router_pid(cluster: str) -> int:
    router = find_router(cluster)
    assert router is not None
    return int(ray.get(router.__ray_call__.remote(lambda self: os.getpid()), timeout=60))


def shard_handle(cluster: str, index: int) -> Any:
    return ray.get_actor(f"{cluster}:shard:{index}", namespace=NAMESPACE)


def wait_for(check: Any, what: str, timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def restarted_info(state: shardstate.StateClient, index: int, old_pid: int) -> dict[str, Any] | None:
    try:
        info = state.shard_info()[index]
    except Unavailable:
        return None
    return info if info["pid"] != old_pid else None


# -- item 15: metadata in the GCS ----------------------------------------------------------------
def test_metadata_survives_a_whole_cluster_restart_without_cluster_json(new_cluster: dict[str, str]) -> None:
    state = shardstate.connect(**new_cluster, shards=3, max_value_size=4096)
    for g in range(12):
        state.set(f"grp-{g}", "k", g)
    infos = state.shard_info()
    assert shardstate.shutdown(new_cluster["cluster"])
    manifest = Path(new_cluster["storage"]) / new_cluster["cluster"] / "cluster.json"
    manifest.unlink()  # the GCS alone must know the cluster now

    again = shardstate.connect(cluster=new_cluster["cluster"])  # no settings, no storage given
    assert again.config["shards"] == 3
    assert again.config["max_value_size"] == 4096
    assert again.config["storage"] == new_cluster["storage"]
    assert sorted(again.get(f"grp-{g}", "k") for g in range(12)) == list(range(12))
    cluster_id = metadata.cluster_record(new_cluster["cluster"])["id"]  # type: ignore[index]
    for info in again.shard_info():
        record = metadata.shard_record(new_cluster["cluster"], info["index"])
        assert record is not None
        assert (record["node_id"], record["node_ip"]) == (info["node_id"], info["node_ip"])
        assert info["cluster_id"] == cluster_id
        assert info["incarnation"] == infos[info["index"]]["incarnation"] + 1


def test_a_file_from_another_cluster_is_refused(ray_session: None, storage_root: Path) -> None:
    names = [f"a-{os.getpid()}-{time.monotonic_ns()}", f"b-{os.getpid()}-{time.monotonic_ns()}"]
    try:
        for name in names:
            client = shardstate.connect(cluster=name, shards=2, storage=str(storage_root))
            for i in range(10):
                client.set(f"g{i}", "owner", name)
            assert shardstate.shutdown(name)
        a_dir, b_dir = (storage_root / n for n in names)
        saved = b_dir.parent / f"{names[1]}-saved"
        shutil.copytree(b_dir, saved)
        for suffix in ("", "-wal", "-shm"):
            (b_dir / f"shard-0.db{suffix}").unlink(missing_ok=True)
            if (a_dir / f"shard-0.db{suffix}").exists():
                shutil.copy(a_dir / f"shard-0.db{suffix}", b_dir / f"shard-0.db{suffix}")
        with pytest.raises(Unavailable) as err:
            shardstate.connect(cluster=names[1], storage=str(storage_root))
        a_id = metadata.cluster_record(names[0])["id"]  # type: ignore[index]
        b_id = metadata.cluster_record(names[1])["id"]  # type: ignore[index]
        message = str(err.value)
        assert str(b_dir / "shard-0.db") in message
        assert a_id in message
        assert b_id in message
        assert find_router(names[1]) is None  # the failed start was cleaned up by its creator
        for suffix in ("", "-wal", "-shm"):  # B's own shard-0 file back: B starts with B's data
            (b_dir / f"shard-0.db{suffix}").unlink(missing_ok=True)
            if (saved / f"shard-0.db{suffix}").exists():
                shutil.copy(saved / f"shard-0.db{suffix}", b_dir / f"shard-0.db{suffix}")
        b = shardstate.connect(cluster=names[1], storage=str(storage_root))
        assert {b.get(f"g{i}", "owner") for i in range(10)} == {names[1]}
    finally:
        for name in names:
            shardstate.shutdown(name)


def test_a_down_shards_node_is_named(new_cluster: dict[str, str]) -> None:
    state = shardstate.connect(**new_cluster, shards=2)
    for i in range(10):
        state.set(f"g{i}", "k", i)
    assert shardstate.shutdown(new_cluster["cluster"])
    name = new_cluster["cluster"]
    record = metadata.shard_record(name, 1)
    assert record is not None
    # the metadata says shard 1's file is on a node that is gone; here it is not
    metadata.record_shard(name, 1, "node-that-left", "10.254.0.9", record["path"])
    directory = Path(new_cluster["storage"]) / name
    (directory / "shard-1.db").rename(directory / "shard-1.db.elsewhere")
    with pytest.raises(Unavailable) as err:
        shardstate.connect(**new_cluster)
    message = str(err.value)
    assert "shard 1" in message
    assert "missing" in message
    assert "node-that-left" in message
    assert "10.254.0.9" in message


def test_forget_deletes_a_cluster_for_good(new_cluster: dict[str, str]) -> None:
    state = shardstate.connect(**new_cluster, shards=2)
    state.set("g", "k", 1)
    old_id = metadata.cluster_record(new_cluster["cluster"])["id"]  # type: ignore[index]
    assert shardstate.shutdown(new_cluster["cluster"])
    shutil.rmtree(Path(new_cluster["storage"]) / new_cluster["cluster"])
    assert metadata.forget(new_cluster["cluster"]) > 0
    fresh = shardstate.connect(**new_cluster, shards=3)  # a new cluster under the old name
    assert fresh.config["shards"] == 3
    assert fresh.get("g", "k") is None
    assert metadata.cluster_record(new_cluster["cluster"])["id"] != old_id  # type: ignore[index]


# -- item 4: loading, and attaching never kills --------------------------------------------------
def test_a_loading_shard_answers_loading_and_attaching_kills_nothing(new_cluster: dict[str, str]) -> None:
    name = new_cluster["cluster"]
    state = shardstate.connect(**new_cluster, shards=2)
    for i in range(20):
        state.set(f"g{i}", "k", i)
    before = state.shard_info()
    router_before = router_pid(name)
    metadata.hold_loading(name, 0, True)
    try:
        os.kill(before[0]["pid"], signal.SIGKILL)
        info = wait_for(lambda: restarted_info(state, 0, before[0]["pid"]), "shard 0 to restart")
        assert info["phase"] == "loading"
        shard = shard_handle(name, 0)
        get = C.command(C.GET, "g1", "k")
        ((ok, error),) = ray.get(shard.execute.remote([get]), timeout=60)
        assert not ok
        assert isinstance(error, ShardLoading)
        assert error.retriable
        assert str(error) == "shard 0 loading, 0%"
        results = pickle.loads(ray.get(shard.run.remote(pickle.dumps([get, get])), timeout=60))
        assert [type(e) for _ok, e in results] == [ShardLoading, ShardLoading]
        with pytest.raises(ShardLoading):
            ray.get(shard.event_state.remote(), timeout=60)
        # a client's call waits for the load (within its retry_timeout) instead of failing
        waited: list[Any] = []
        group_on_0 = next(f"g{i}" for i in range(20) if state._link.current().owners[slot_of(f"g{i}")] == 0)
        waiter = threading.Thread(target=lambda: waited.append(state.get(group_on_0, "k")))
        waiter.start()
        # a caller attaching now (with settings: it goes through the start-up check) kills nothing
        attached = shardstate.connect(**new_cluster, shards=2)
        assert attached.config["shards"] == 2
        assert router_pid(name) == router_before
        assert shard_handle(name, 0) is not None
        assert state.shard_info()[0]["pid"] == info["pid"]
        assert waiter.is_alive()  # it cannot have an answer: the shard still holds its load
        assert not waited
    finally:
        metadata.hold_loading(name, 0, False)
    waiter.join(timeout=120)
    assert waited == [int(group_on_0[1:])]
    wait_for(lambda: state.shard_info()[0]["phase"] == "ready", "shard 0 to load")
    assert sorted(state.get(f"g{i}", "k") for i in range(20)) == list(range(20))
    state.set("g1", "k", "after")
    assert state.get("g1", "k") == "after"


@ray.remote(max_retries=0)
def attach_repeatedly(spec: dict[str, str], seconds: float) -> tuple[int, int]:
    """Like a trigger handler that calls connect(): attach again and again (with settings, so each
    call runs the start-up check); returns (attached, refused)."""
    attached = refused = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            shardstate.connect(**spec, shards=2, timeout=30)
            attached += 1
        except Unavailable:
            refused += 1
    return attached, refused


def test_connect_while_shards_restart_never_kills_the_cluster(new_cluster: dict[str, str]) -> None:
    name = new_cluster["cluster"]
    state = shardstate.connect(**new_cluster, shards=2)
    state.set("g", "k", 0)
    router_before = router_pid(name)
    attachers = [attach_repeatedly.remote(new_cluster, 12.0) for _ in range(3)]
    time.sleep(1.0)  # the attachers are connecting
    for round_ in range(6):
        infos = state.shard_info()
        for info in infos:
            os.kill(info["pid"], signal.SIGKILL)
        for info in infos:
            wait_for(lambda info=info: restarted_info(state, info["index"], info["pid"]), "a restart")
        state.set("g", "k", round_ + 1)
    counts = ray.get(attachers, timeout=240)
    assert sum(a for a, _ in counts) > 0
    assert router_pid(name) == router_before  # nobody killed the router
    state.set("g", "k", "alive")  # nor the shards (a killed cluster answers "not running")
    assert state.get("g", "k") == "alive"
    for index in range(2):  # still restartable actors, not killed for good
        pid = state.shard_info()[index]["pid"]
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda index=index, pid=pid: restarted_info(state, index, pid), "a restart")
    assert state.get("g", "k") == "alive"


def test_a_memory_clusters_shutdown_forgets_its_settings_not_its_starts(new_cluster: dict[str, str]) -> None:
    name = new_cluster["cluster"]
    state = shardstate.connect(**new_cluster, shards=2, durability="memory")
    first = [info["incarnation"] for info in state.shard_info()]
    assert shardstate.shutdown(name)
    assert metadata.cluster_record(name) is None  # nothing on disk to come back to
    again = shardstate.connect(**new_cluster, shards=3, durability="memory")  # no mismatch: a new one
    assert again.config["shards"] == 3
    starts = [info["incarnation"] for info in again.shard_info()]
    assert starts[0] > first[0]
    assert starts[1] > first[1]  # seqs start above the old ones: event ids never repeat


def test_attaching_to_a_cluster_that_cannot_serve_raises_and_stops_nothing(
    new_cluster: dict[str, str],
) -> None:
    name = new_cluster["cluster"]
    state = shardstate.connect(**new_cluster, shards=2)
    for i in range(10):
        state.set(f"g{i}", "k", i)
    router_before = router_pid(name)
    broken = state.shard_info()[1]
    db = Path(new_cluster["storage"]) / name / "shard-1.db"
    moved = db.with_name("shard-1.db.away")
    db.rename(moved)  # shard 1's file is gone while it runs; its restart must not come up empty
    os.kill(broken["pid"], signal.SIGKILL)
    info = wait_for(lambda: restarted_info(state, 1, broken["pid"]), "shard 1 to restart")
    wait_for(lambda: state.shard_info()[1]["phase"] == "failed", "shard 1 to refuse its start")
    with pytest.raises(Unavailable, match="missing") as err:
        shardstate.connect(**new_cluster, shards=2)
    assert "keeps running" in str(err.value)
    assert router_pid(name) == router_before
    assert state.shard_info()[1]["pid"] == info["pid"]  # the refusing shard was not killed either
    served = [i for i in range(10) if state._link.current().owners[slot_of(f"g{i}")] == 0]
    assert served
    assert [state.get(f"g{i}", "k") for i in served] == served  # shard 0 keeps serving
    moved.rename(db)
    assert shardstate.shutdown(name)  # what the error says to do once the cause is fixed
    healed = shardstate.connect(**new_cluster)
    assert sorted(healed.get(f"g{i}", "k") for i in range(10)) == list(range(10))
