"""The shard actor's start-up and storage-failure logic, run as a plain object (no Ray)."""

from __future__ import annotations

import pickle
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardstate._errors import ShardLoading, Unavailable
from shardstate.shards import actor as actor_module
from shardstate.shards import commands as C
from shardstate.shards.actor import LOADING, READY, ShardActor


@pytest.fixture(autouse=True)
def no_pushes(monkeypatch: pytest.MonkeyPatch) -> None:
    """No subscriber outside Ray: the notifier thread does nothing."""
    monkeypatch.setattr(actor_module.ShardActor, "_notifier", lambda self: None)


@pytest.fixture
def shard(tmp_path: Path) -> Iterator[ShardActor]:
    actor = ShardActor("unit", 0, range(4096), 0, directory=str(tmp_path), durability="os", sweep_interval=0)
    deadline = time.monotonic() + 30
    while actor.phase != READY:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    yield actor
    actor.storage.close()


def put(key: str, value: Any) -> Any:
    return C.command(C.SET, "g", key, pickle.dumps(value), None)


def get(key: str) -> Any:
    return C.command(C.GET, "g", key)


def test_a_loading_shard_answers_loading_with_its_progress(shard: ShardActor) -> None:
    shard.phase, shard._rows_loaded, shard._rows_total = LOADING, 42, 100
    (ok, error), (ok2, _) = shard.execute([get("a"), put("a", 1)])
    assert not ok
    assert not ok2
    assert isinstance(error, ShardLoading)
    assert str(error) == "shard 0 loading, 42%"
    assert pickle.loads(shard.run(pickle.dumps([get("a")])))[0][1].message == "shard 0 loading, 42%"
    with pytest.raises(ShardLoading):
        shard.event_state()
    assert shard.sweep() == 0
    assert shard.set_events_durable(False) == shard._seq_hint  # kept for when it is loaded
    assert shard._durable_wish is False
    assert shard.info()["phase"] == LOADING
    assert shard.info()["load_progress"] == 0.42


def test_a_failed_commit_answers_unavailable_and_the_shard_stays_read_only(shard: ShardActor) -> None:
    assert shard.execute([put(f"k{i}", i) for i in range(5)]) == [
        (True, (None, pickle.dumps(i))) for i in range(5)
    ]
    shard.limit_storage_pages(0)
    results = shard.execute([put("k0", "changed"), put("big", b"x" * 100_000), get("k0")])
    assert all(not ok and isinstance(e, Unavailable) for ok, e in results)
    assert "storage is failing" in str(results[0][1])
    info = shard.info()
    assert info["storage_ok"] is False
    assert "full" in info["storage_error"]
    # memory was rebuilt from the file: the failed batch left nothing behind
    (ok, value), (ok2, error) = shard.execute([get("k0"), put("k1", "refused")])
    assert ok
    assert pickle.loads(value) == 0
    assert not ok2
    assert isinstance(error, Unavailable)
    assert "read-only" in str(error)
    assert shard.engine.store.get("g", "big") is None
    shard.sweep()  # the probe fails: still read-only
    assert shard.storage_ok is False
    shard.limit_storage_pages(None)
    shard.sweep()  # the probe works: writable again
    assert shard.storage_ok is True
    assert shard.execute([put("big", 1)])[0][0] is True
    reloaded = shard._engine_from_storage()
    assert sorted(k for k, _ in reloaded.store.entries("g")) == ["big", "k0", "k1", "k2", "k3", "k4"]


def test_a_file_that_fails_to_open_keeps_the_shard_up_and_says_why(tmp_path: Path) -> None:
    (tmp_path / "shard-0.db").write_bytes(b"not a database" * 100)
    actor = ShardActor("unit", 0, range(4096), 0, directory=str(tmp_path), durability="os", sweep_interval=0)
    deadline = time.monotonic() + 30
    while actor.phase != "failed":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    ((ok, error),) = actor.execute([get("a")])
    assert not ok
    assert isinstance(error, Unavailable)
    assert not isinstance(error, ShardLoading)
    assert "unreadable" in str(error)
    assert actor.status() == {"index": 0, "phase": "failed", "error": actor.load_error}


def test_info_shows_the_metrics_of_the_batches_it_ran(shard: ShardActor) -> None:
    shard.execute([put("a", 1), put("b", 2), get("a")])
    shard.execute([C.command(C.UPDATE, "g", "a", [{"type": "set", "path": "x", "value": 1}], None)])
    shard.execute(["no command"])
    shard.phase = LOADING  # batches refused while loading run nothing and are not counted
    shard.execute([get("a")])
    shard.phase = READY
    figures = shard.info()["metrics"]
    assert figures["ops"] == {"get": 1, "invalid": 1, "set": 2, "update": 1}
    assert figures["batches"] == 3
    assert figures["batch_size_mean"] == round(5 / 3, 1)
    assert 0 < figures["latency_ms"]["p50"] <= figures["latency_ms"]["p99"]
    assert figures["replication_lag_us"] is None  # no backups
    drained = shard.tally.drain()
    assert drained.ops == figures["ops"]
    assert [n for _t, _ms, n in drained.batches] == [3, 1, 1]
