"""Replicated shards without Ray: two (or three) shard actors as plain objects, their control
messages sent straight to each other's ``_control`` (what the wire server calls)."""

from __future__ import annotations

import pickle
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from shardstate._errors import NotPrimary
from shardstate.shards import actor as actor_module
from shardstate.shards import commands as C
from shardstate.shards import replication as rep
from shardstate.shards.actor import READY, ShardActor
from shardstate.shards.update_ops import parse_ops

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """No subscriber, no pinger thread outside Ray; a short lease so promotions do not wait long."""
    monkeypatch.setattr(actor_module.ShardActor, "_notifier", lambda self: None)
    monkeypatch.setattr(actor_module.ShardActor, "_pinger", lambda self: None)
    monkeypatch.setattr(rep, "LEASE", 0.2)


class Direct:
    """A channel that hands messages straight to another member's ``_control`` (or fails)."""

    def __init__(self, member: ShardActor) -> None:
        self.member = member
        self.answers: deque[bytes] = deque()
        self.broken = False
        self.sent = 0

    def send(self, body: bytes) -> None:
        if self.broken:
            raise ConnectionError("broken")
        self.sent += 1
        self.answers.append(self.member._control(body))

    def receive(self, timeout: float) -> bytes:
        if self.broken or not self.answers:
            raise TimeoutError("no answer")
        return self.answers.popleft()

    def close(self) -> None:
        pass


def member(tmp_path: Path, number: int, durability: str = "os") -> ShardActor:
    actor = ShardActor(
        "unit",
        0,
        range(4096),
        0,
        directory=str(tmp_path),
        durability=durability,
        sweep_interval=0,
        member=number,
    )
    deadline = time.monotonic() + 30
    while actor.phase != READY:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return actor


def control(target: ShardActor, *message: Any) -> tuple[Any, ...]:
    return rep.unpack(target._control(rep.pack(message)))


def join(primary: ShardActor, backup: ShardActor) -> Direct:
    """Bring ``backup`` in sync with ``primary`` (snapshot, then attach a direct channel)."""
    assert primary._replicator is not None
    with primary._engine_lock:
        joiner = primary._replicator.join(backup.member or 0)
        data, lsn = primary._snapshot_data(), primary.lsn
    for message in rep.snapshot_messages(primary.term, lsn, data):
        assert rep.unpack(backup._control(message))[0] == rep.OK
    channel = Direct(backup)
    with primary._engine_lock:
        for body in rep.tail_messages(primary.term, primary._replicator.take_tail(joiner, limit=1 << 30)):
            assert rep.unpack(backup._control(body))[0] == rep.OK
        primary._replicator.admit(joiner, channel, primary.lsn)
    return channel


@pytest.fixture(params=["os", "memory"])
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[ShardActor, ShardActor, Direct]]:
    a, b = member(tmp_path, 0, request.param), member(tmp_path, 1, request.param)
    assert control(a, rep.PROMOTE, 1)[0] == rep.OK
    channel = join(a, b)
    yield a, b, channel
    for m in (a, b):
        m.storage.close()


def put(key: str, value: Any, op_id: str | None = None) -> Any:
    return C.command(C.SET, "g", key, pickle.dumps(value), {"op_id": op_id} if op_id else None)


def incr(key: str, op_id: str | None = None) -> Any:
    ops = parse_ops([{"type": "increment", "path": "n", "by": 1}])
    return C.command(C.UPDATE, "g", key, ops, {"op_id": op_id} if op_id else None)


def get(key: str) -> Any:
    return C.command(C.GET, "g", key)


def value(shard: ShardActor, key: str) -> Any:
    ((ok, raw),) = shard.execute([get(key)])
    assert ok, raw
    return None if raw is None else pickle.loads(raw)


def test_a_write_is_acknowledged_only_after_the_backup_committed_it(pair: Any) -> None:
    primary, backup, channel = pair
    before = channel.sent
    ((ok, _),) = primary.execute([put("a", 1)])
    assert ok
    assert channel.sent == before + 1  # shipped before the answer
    assert backup.lsn == primary.lsn
    loaded = backup.storage.load()
    assert [(g, k, pickle.loads(d)) for g, k, d, *_ in loaded.entries] == [("g", "a", 1)]
    # a backup serves no client batch
    ((ok, error),) = backup.execute([get("a")])
    assert not ok
    assert isinstance(error, NotPrimary)


def test_a_promoted_backup_has_every_acknowledged_write_and_its_op_ids(pair: Any) -> None:
    primary, backup, _channel = pair
    for i in range(20):
        assert primary.execute([incr("c", op_id=f"op{i}")])[0][0]
    primary.execute([put("x", {"deep": [1, 2]})])
    assert control(backup, rep.PROMOTE, 2)[0] == rep.OK
    assert backup.role == rep.PRIMARY
    assert backup.term == 2
    assert value(backup, "c") == {"n": 20}
    assert value(backup, "x") == {"deep": [1, 2]}
    # a retried write with its op_id applies once across the failover
    ((ok, result),) = backup.execute([incr("c", op_id="op7")])
    assert ok
    assert value(backup, "c") == {"n": 20}
    ((ok, _),) = backup.execute([incr("c", op_id="op-new")])
    assert value(backup, "c") == {"n": 21}


def test_a_deposed_primary_acknowledges_nothing_after_the_new_term(pair: Any) -> None:
    primary, backup, _channel = pair
    assert primary.execute([put("a", "before")])[0][0]
    assert control(backup, rep.PROMOTE, 2)[0] == rep.OK  # the old primary does not know yet
    ((ok, error),) = primary.execute([put("a", "after")])
    assert not ok
    assert isinstance(error, NotPrimary), error
    assert primary.role == rep.FENCED
    assert value(backup, "a") == "before"
    # and it stays fenced: reads and writes alike
    ((ok, error),) = primary.execute([get("a")])
    assert not ok
    assert isinstance(error, NotPrimary)


def test_a_primary_whose_lease_ran_out_checks_before_it_serves_a_read(pair: Any) -> None:
    primary, backup, channel = pair
    primary.execute([put("a", 1)])
    time.sleep(rep.LEASE * 1.2)  # no ping thread here: the lease has run out
    sent = channel.sent
    assert value(primary, "a") == 1  # renewed by a ping round first
    assert channel.sent == sent + 1
    assert control(backup, rep.PROMOTE, 2)[0] == rep.OK
    time.sleep(rep.LEASE * 1.2)
    ((ok, error),) = primary.execute([get("a")])
    assert not ok
    assert isinstance(error, NotPrimary)


def test_a_failing_backup_is_dropped_through_the_router_then_the_primary_serves_alone(
    pair: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    primary, _backup, channel = pair
    asked: list[tuple[int, int]] = []
    answer: list[Any] = [RuntimeError("router away")]

    def drop(term: int, member: int) -> bool:
        asked.append((term, member))
        if isinstance(answer[0], Exception):
            raise answer[0]
        return bool(answer[0])

    assert primary._replicator is not None
    primary._replicator.drop = drop
    channel.broken = True
    ((ok, error),) = primary.execute([incr("c", op_id="w1")])
    assert not ok
    assert isinstance(error, NotPrimary)  # retried by clients (with the same op_ids)
    assert "cannot confirm" in str(error)
    ((ok, error),) = primary.execute([get("c")])  # nothing is served while it is unconfirmed
    assert not ok
    assert isinstance(error, NotPrimary)
    answer[0] = True  # the router is back: the backup is dropped, the pending write confirmed
    ((ok, result),) = primary.execute([incr("c", op_id="w1")])  # the client's retry
    assert ok
    assert value(primary, "c") == {"n": 1}
    assert asked == [(1, 1), (1, 1), (1, 1)]
    assert primary._replicator.backups == {}
    assert primary.execute([incr("c")])[0][0]  # alone now: no more shipping
    assert value(primary, "c") == {"n": 2}


def test_the_router_refusing_a_drop_fences_the_primary(pair: Any) -> None:
    primary, _backup, channel = pair
    assert primary._replicator is not None
    primary._replicator.drop = lambda term, member: False
    channel.broken = True
    ((ok, error),) = primary.execute([put("a", 1)])
    assert not ok
    assert isinstance(error, NotPrimary)
    assert primary.role == rep.FENCED


@pytest.mark.parametrize(
    "message",
    [
        (rep.APPLY, 0, 1, b"x"),  # an old term
        (rep.APPLY, 9, 1, b"x"),  # a term it was never synced for
        (rep.APPLY, 1, 99, pickle.dumps(None)),  # a gap
        (rep.APPLY, 1, "one", b"x"),
        (rep.APPLY, "1", 1, b"x"),
        (rep.APPLY, 1, "NEXT", pickle.dumps("not changes")),
        (rep.APPLY, 1, "NEXT", b"\x80not a pickle"),
        (rep.APPLY,),
        (rep.APPLY_MANY, 1, "not a list"),
        (rep.APPLY_MANY, 1, [("x", b"")]),
        (rep.APPLY_MANY, 1, [("NEXT", b"\x80not a pickle")]),
        (rep.APPLY_MANY, 0, []),
        (rep.SNAPSHOT, 1, 5, 10, 20, b"x" * 10),  # a chunk out of order
        (rep.PROMOTE, "two"),
        (rep.PROMOTE, 0),
        ("format-disk", 1),
        ("",),
    ],
)
def test_bad_control_messages_change_nothing(pair: Any, message: tuple[Any, ...]) -> None:
    primary, backup, _channel = pair
    primary.execute([put("a", 1)])
    lsn, term, role = backup.lsn, backup.term, backup.role
    resolved = [
        [(lsn + 1, body) for _, body in part]
        if isinstance(part, list) and part and part[0][0] == "NEXT"
        else lsn + 1
        if part == "NEXT"
        else part
        for part in message
    ]
    answer = control(backup, *resolved)
    assert answer[0] in (rep.STALE, rep.GAP, rep.REFUSED), answer
    assert (backup.lsn, backup.term, backup.role) == (lsn, term, role)
    assert primary.execute([put("a", 2)])[0][0]  # replication goes on
    assert backup.lsn == primary.lsn


@pytest.mark.parametrize("body", [b"", b"\x80garbage", pickle.dumps([1, 2]), pickle.dumps(())])
def test_garbage_control_frames_are_refused(pair: Any, body: bytes) -> None:
    _primary, backup, _channel = pair
    assert rep.unpack(backup._control(body))[0] == rep.REFUSED


def test_a_shard_without_replicas_takes_no_control_message(tmp_path: Path) -> None:
    plain = ShardActor("unit", 0, range(4096), 0, directory=str(tmp_path), durability="os", sweep_interval=0)
    deadline = time.monotonic() + 30
    while plain.phase != READY:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert control(plain, rep.PROMOTE, 5)[0] == rep.REFUSED
    assert plain.role == rep.PRIMARY
    assert plain.term == 0
    plain.storage.close()


def test_a_third_member_catches_up_from_a_snapshot_and_the_tail(tmp_path: Path) -> None:
    a, b, c = (member(tmp_path, n) for n in range(3))
    assert control(a, rep.PROMOTE, 1)[0] == rep.OK
    join(a, b)
    for i in range(50):
        a.execute([incr(f"k{i % 5}")])
    assert a._replicator is not None
    with a._engine_lock:
        joiner = a._replicator.join(2)
        data, lsn = a._snapshot_data(), a.lsn
    for i in range(30):  # committed while the snapshot travels: the tail
        a.execute([incr(f"k{i % 5}")])
    for message in rep.snapshot_messages(a.term, lsn, data):
        assert control(c, *rep.unpack(message))[0] == rep.OK
    with a._engine_lock:
        tail = a._replicator.take_tail(joiner, limit=1 << 30)
        assert len(tail) == 30
        assert rep.unpack(c._control(rep.tail_messages(a.term, tail[:10])[0]))[0] == rep.OK
        assert rep.unpack(c._control(rep.tail_messages(a.term, tail[20:])[0]))[0] == rep.GAP  # a hole
        assert c.lsn == lsn + 10
        for body in rep.tail_messages(a.term, tail):  # the whole tail again: repeats are skipped
            assert rep.unpack(c._control(body))[0] == rep.OK
        a._replicator.admit(joiner, Direct(c), a.lsn)
    a.execute([incr("k0")])
    assert b.lsn == c.lsn == a.lsn
    assert control(c, rep.PROMOTE, 2)[0] == rep.OK
    assert [value(c, f"k{i}") for i in range(5)] == [{"n": 17}] + [{"n": 16}] * 4
    for m in (a, b, c):
        m.storage.close()


def test_the_primary_times_its_replication_rounds_for_the_metrics(pair: Any) -> None:
    primary, backup, _channel = pair
    primary.tally.drain()  # rounds before the backup joined (none timed: no backups then)
    for i in range(5):
        ((ok, _),) = primary.execute([put(f"k{i}", i)])
        assert ok
    figures = primary.info()["metrics"]
    assert figures["replication_lag_us"] is not None
    assert figures["replication_lag_us"] > 0
    rounds = primary.tally.drain().rounds
    assert len(rounds) == 5  # one round per write batch, each shipped and answered
    assert all(us > 0 for _t, us in rounds)
    assert backup.info()["metrics"]["replication_lag_us"] is None  # a backup runs no rounds
