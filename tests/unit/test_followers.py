"""Follow streams (issue 10, item 5): what a shard sends its followers, and how a watcher reads it.

No Ray: the shard side is :class:`EventFollower` on a real :class:`WireServer` (loopback), the
reader side is :class:`ShardFollow` (the watcher's bookkeeping, without I/O).
"""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from shardstate._watch import ShardFollow
from shardstate.shards import commands as C
from shardstate.shards.engine import ShardEngine
from shardstate.shards.followers import SUBSCRIBER, WATCHER, EventFollower, FollowSpec, frame_of, ready_frame
from shardstate.shards.wire import (
    FollowStream,
    ShardConnection,
    WireServer,
    pack_follow,
    read_frame,
    write_frame,
)

pytestmark = pytest.mark.timeout(60)

SECRET = b"f" * 32


def engine_with(*cmds: C.Command) -> ShardEngine:
    engine = ShardEngine()
    assert all(ok for ok, _ in engine.execute_batch(list(cmds)))
    return engine


def big(i: int) -> bytes:
    return pickle.dumps({"doc": "d" * 3000, "i": i})


# -- the shard side ---------------------------------------------------------------------------------
def test_a_watcher_gets_its_group_and_a_subscriber_everything() -> None:
    engine = engine_with(
        C.command(C.SET, "a", "k", pickle.dumps(1)),
        C.command(C.SET, "b", "k", pickle.dumps(2)),
        C.command(C.SET, "__shardstate:triggers", "t", pickle.dumps(3), {"system": True}),
    )
    events = list(engine.events)
    frames: dict[str, list[bytes]] = {"a": [], "all": [], "sub": []}
    followers = {
        "a": EventFollower(FollowSpec(WATCHER, "a"), lambda b: frames["a"].append(b) is None, start=0),
        "all": EventFollower(FollowSpec(WATCHER), lambda b: frames["all"].append(b) is None, start=0),
        "sub": EventFollower(FollowSpec(SUBSCRIBER), lambda b: frames["sub"].append(b) is None, start=1),
    }
    for follower in followers.values():
        follower.push(events)
    groups = {name: [e.group_id for e in frame_of(f[0])[3]] for name, f in frames.items()}
    assert groups == {"a": ["a"], "all": ["a", "b"], "sub": ["b", "__shardstate:triggers"]}  # sub: after 1


def test_a_dropped_frame_shows_as_a_gap_and_values_are_sent_whole_again() -> None:
    engine = ShardEngine()
    sent: list[bytes] = []
    accept = [True]
    spec = FollowSpec(WATCHER, "g")
    follower = EventFollower(spec, lambda b: accept[0] and sent.append(b) is None, start=0)
    for i in range(3):
        engine.execute_batch([C.command(C.SET, "g", "k", big(i))])
        accept[0] = i != 1  # the second frame is dropped (the stream is too far behind)
        follower.push(engine.take_events())
    first, third = (frame_of(body) for body in sent)
    assert (first[1], first[2]) == (0, 1)
    assert (third[1], third[2]) == (2, 3)  # after 2, but the reader got only up to 1: a gap
    assert third[3][0].old is not None  # and nothing refers to what the reader did not get
    assert follower.dropped == 1


# -- the reader side ---------------------------------------------------------------------------------
def test_the_watcher_bookkeeping_fills_a_gap_from_the_log_and_yields_each_event_once() -> None:
    engine = ShardEngine()
    for i in range(6):
        engine.execute_batch([C.command(C.SET, "g", "k", big(i))])
    events = list(engine.events)
    follow = ShardFollow("c", 0, "g")
    assert follow.start(0) is None
    shipper_frames = EventFollower(FollowSpec(WATCHER, "g"), lambda b: True, start=0)
    shipped = shipper_frames.shipper.ship(events)
    out, rest = follow.take_frame(2, shipped[:2])
    assert [e.seq for e in out] == [1, 2]
    assert rest is None
    # a frame after a gap: events 3..4 are missing; the watcher reads the log up to 4 first
    upto = follow.gap_before(4, 6, shipped[4:])
    assert upto == 4
    logged, done = follow.take_log(engine.events_since(follow.mark, 10, full=True), upto)
    assert [e.seq for e in logged] == [3, 4]
    assert done
    out, rest = follow.take_frame(6, shipped[4:])  # refers to event 4, which came from the log
    assert [e.seq for e in out] == [5, 6]
    assert rest is None
    assert [e.new_value["i"] for e in out] == [4, 5]
    assert out[0].old_value["i"] == 3
    again, _ = follow.take_frame(6, shipped[4:])  # the same events again: nothing new
    assert again == []


def test_a_value_the_watcher_cannot_rebuild_is_read_from_the_log() -> None:
    engine = ShardEngine()
    for i in range(3):
        engine.execute_batch([C.command(C.SET, "g", "k", big(i))])
    follower = EventFollower(FollowSpec(WATCHER, "g"), lambda b: True, start=1)
    shipped = follower.shipper.ship(list(engine.events)[1:])
    follow = ShardFollow("c", 0, "g")
    follow.start(1)
    follow.resolver.forget()
    out, rest = follow.take_frame(3, [shipped[0]._replace(old=None)])  # refers to event 1: unknown here
    assert out == []
    assert rest == 3


# -- over a real connection ----------------------------------------------------------------------------
class Pusher:
    """What the shard does with a follow request, reduced: remember the stream, push on demand."""

    def __init__(self) -> None:
        self.streams: list[FollowStream] = []
        self.closed = threading.Event()
        self.specs: list[FollowSpec] = []

    def __call__(self, spec: bytes, stream: FollowStream) -> Any:
        self.specs.append(FollowSpec.from_bytes(spec))
        stream.send(ready_frame(41, 3))
        self.streams.append(stream)
        pusher = self

        class Following:
            def closed(self) -> None:
                pusher.closed.set()

        return Following()


@pytest.fixture
def served() -> Iterator[tuple[WireServer, Pusher]]:
    pusher = Pusher()
    srv = WireServer("127.0.0.1", SECRET, lambda p, lane, r: pickle.dumps("batch"), follow=pusher)
    yield srv, pusher
    srv.close()


def follow(srv: WireServer, spec: FollowSpec) -> ShardConnection:
    conn = ShardConnection(srv.address, SECRET)
    write_frame(conn.sock, pack_follow(spec.to_bytes()))
    return conn


def wait(check: Any) -> None:
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_follow_stream_carries_frames_in_order_and_closing_it_tells_the_shard(
    served: tuple[WireServer, Pusher],
) -> None:
    srv, pusher = served
    conn = follow(srv, FollowSpec(WATCHER, "g"))
    assert frame_of(read_frame(conn.sock)) == ("ready", 41, 3)
    wait(lambda: pusher.streams)
    stream = pusher.streams[0]
    for i in range(200):  # from another thread than the server's loop, as the notifier does
        assert stream.send(pickle.dumps(("events", i, i + 1, [])))
    assert [frame_of(read_frame(conn.sock))[2] for _ in range(200)] == list(range(1, 201))
    assert pusher.specs == [FollowSpec(WATCHER, "g")]
    with ShardConnection(srv.address, SECRET) as other:  # the connection's requests work beside it
        assert pickle.loads(other.call(pickle.dumps([1]))) == "batch"
    conn.close()
    wait(pusher.closed.is_set)
    assert not stream.send(b"late")  # nothing is queued for a closed stream


def test_a_follower_that_does_not_read_costs_the_shard_a_bounded_buffer(
    served: tuple[WireServer, Pusher],
) -> None:
    srv, pusher = served
    conn = follow(srv, FollowSpec(SUBSCRIBER))
    wait(lambda: pusher.streams)
    stream = pusher.streams[0]
    body = b"x" * (256 * 1024)
    accepted = 0
    for _ in range(200):  # 50 MiB offered to a reader that sleeps
        accepted += stream.send(body)
        time.sleep(0.001)  # the stream's thread writes what the socket's buffers take meanwhile
    assert stream.refused > 0
    assert accepted * len(body) <= stream.limit + 16 * 1024 * 1024  # the limit, and the socket's buffers
    assert frame_of(read_frame(conn.sock)) == ("ready", 41, 3)
    got = 0
    conn.sock.settimeout(2)
    try:
        while got < accepted:
            assert read_frame(conn.sock) == body
            got += 1
    finally:
        conn.close()
    assert got == accepted  # what was accepted arrives whole and in order


def test_a_bad_follow_spec_closes_that_connection_only(served: tuple[WireServer, Pusher]) -> None:
    srv, _pusher = served
    with pytest.raises(ValueError, match="follow spec"):
        FollowSpec.from_bytes(pickle.dumps({"kind": "everything"}))
    conn = ShardConnection(srv.address, SECRET)
    write_frame(conn.sock, pack_follow(pickle.dumps({"kind": "nope"})))
    conn.sock.settimeout(5)
    assert conn.sock.recv(10) == b""  # closed
    with ShardConnection(srv.address, SECRET) as other:
        assert pickle.loads(other.call(pickle.dumps([1]))) == "batch"


def test_a_dropped_tail_is_announced_once_the_stream_has_room() -> None:
    engine = ShardEngine()
    sent: list[bytes] = []
    accept = [True]
    follower = EventFollower(FollowSpec(SUBSCRIBER), lambda b: accept[0] and sent.append(b) is None, start=0)
    engine.execute_batch([C.command(C.SET, "g", "k", big(0))])
    follower.push(engine.take_events())
    accept[0] = False  # the stream is full: the last two frames are dropped, nothing follows them
    for i in (1, 2):
        engine.execute_batch([C.command(C.SET, "g", "k", big(i))])
        follower.push(engine.take_events())
    assert not follower.announce()  # still no room
    accept[0] = True
    assert follower.announce()
    assert follower.announce()  # nothing owed any more: no second notice
    notice = frame_of(sent[-1])
    assert len(sent) == 2
    follow = ShardFollow("c", 0, None)
    follow.start(0)
    follow.take_frame(*frame_of(sent[0])[2:])
    assert follow.gap_before(*notice[1:]) == 3  # the reader reads the log up to the dropped tail
