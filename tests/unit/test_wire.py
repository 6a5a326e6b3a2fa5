"""The shard connection's wire format and handshake, over socketpairs and a loopback server (no Ray)."""

from __future__ import annotations

import asyncio
import os
import pickle
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shardstate.shards import wire
from shardstate.shards.wire import (
    AuthenticationError,
    ConnectionClosed,
    FrameTooLarge,
    ShardConnection,
    WireError,
    WireServer,
)

pytestmark = pytest.mark.timeout(60)

SECRET = b"s" * 32


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    yield a, b
    a.close()
    b.close()


class WritesAFile:
    """A pickle that, when loaded, creates ``path`` (what an attacker would send)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Run ``fn`` on a thread; the returned callable joins it and returns (or raises) its outcome."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(20)
        assert outcome, "the thread did not finish"
        ok, value = outcome[0]
        if not ok:
            raise value
        return value

    return join


# -- frames ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("body", [b"", b"x", os.urandom(70_000), b"\x00" * 65535])
def test_frames_round_trip(pair: tuple[socket.socket, socket.socket], body: bytes) -> None:
    a, b = pair
    join = in_thread(lambda: wire.write_frame(a, body))
    assert wire.read_frame(b) == body
    join()


def test_an_oversized_announcement_is_refused_before_the_body_is_read(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    a, b = pair
    a.sendall(struct.pack(">I", 0xFFFFFFFF) + b"abc")  # the body never comes: reading it would hang
    with pytest.raises(FrameTooLarge):
        wire.read_frame(b)
    assert b.recv(3) == b"abc"  # not a byte of the body was consumed
    a.sendall(struct.pack(">I", 200))
    with pytest.raises(FrameTooLarge):
        wire.read_frame(b, max_size=199)


def test_a_truncated_frame_and_a_clean_close(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(struct.pack(">I", 10) + b"abc")
    a.shutdown(socket.SHUT_WR)
    with pytest.raises(WireError, match="3 of 10") as err:
        wire.read_frame(b)
    assert not isinstance(err.value, ConnectionClosed)
    c, d = socket.socketpair()
    with c, d:
        c.close()
        with pytest.raises(ConnectionClosed):
            wire.read_frame(d)


def test_async_frames(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.setblocking(False)
    b.setblocking(False)

    async def main() -> None:
        ra, wa = await asyncio.open_connection(sock=a)
        rb, wb = await asyncio.open_connection(sock=b)
        await wire.write_frame_async(wa, b"hello")
        assert await wire.read_frame_async(rb) == b"hello"
        wa.write(struct.pack(">I", wire.MAX_FRAME + 1))
        await wa.drain()
        with pytest.raises(FrameTooLarge):
            await wire.read_frame_async(rb)
        wa.write(struct.pack(">I", 5) + b"ab")
        wa.close()
        with pytest.raises(WireError, match="2 of 5"):
            await wire.read_frame_async(rb)
        wb.close()

    asyncio.run(main())


def test_requests_round_trip_and_garbage_headers_are_refused() -> None:
    for lane, resume in [(None, False), ("lane-é", True), ("", False)]:
        body = wire.pack_request(b"PACKED", lane, resume)
        assert wire.unpack_request(body) == (b"PACKED", lane, resume)
    for garbage in [
        b"",
        b"\x00",
        b"\xff\x00\x00x",
        b"\x02\x00\x09ab",
        b"\x00\x00\x02abPACKED",
        b"\x02\x00\x02\xff\xfe",
    ]:
        with pytest.raises(WireError):
            wire.unpack_request(garbage)


# -- the handshake --------------------------------------------------------------------------------
def test_the_handshake_proves_the_secret_both_ways(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    join = in_thread(lambda: wire.server_handshake(a, SECRET))
    wire.client_handshake(b, SECRET)
    join()
    wire.write_frame(b, b"after")  # the connection carries frames afterwards
    assert wire.read_frame(a) == b"after"


def test_a_wrong_secret_fails_on_both_sides(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    join = in_thread(lambda: wire.server_handshake(a, SECRET))
    with pytest.raises(AuthenticationError, match="refused"):
        wire.client_handshake(b, b"w" * 32)
    with pytest.raises(AuthenticationError, match="does not hold"):
        join()


def test_a_server_without_the_secret_is_not_trusted(pair: tuple[socket.socket, socket.socket]) -> None:
    """Mutual: an impostor that welcomes any client (without the secret) is refused by the client."""
    a, b = pair

    def impostor() -> None:
        wire.write_frame(a, wire.MAGIC + os.urandom(wire.NONCE_SIZE))
        wire.read_frame(a, wire.HANDSHAKE_MAX)
        wire.write_frame(a, wire.WELCOME + os.urandom(32))

    join = in_thread(impostor)
    with pytest.raises(AuthenticationError, match="shard does not hold"):
        wire.client_handshake(b, SECRET)
    join()
    c, d = socket.socketpair()
    with c, d:
        wire.write_frame(c, b"HTTP/1.1 200 OK")
        with pytest.raises(AuthenticationError, match="not a shardstate shard"):
            wire.client_handshake(d, SECRET)


def test_the_handshake_never_unpickles(pair: tuple[socket.socket, socket.socket], tmp_path: Path) -> None:
    a, b = pair
    target = tmp_path / "pwned"
    evil = pickle.dumps(WritesAFile(target))
    join = in_thread(lambda: wire.server_handshake(a, SECRET))
    wire.read_frame(b)  # the challenge
    wire.write_frame(b, evil[:64].ljust(64, b"."))  # the size of an answer, a pickle's bytes
    with pytest.raises(AuthenticationError):
        join()
    assert not target.exists()


# -- the server -----------------------------------------------------------------------------------
@pytest.fixture
def server() -> Iterator[WireServer]:
    """A loopback server whose handler unpickles whatever reaches it (as the shard does)."""
    calls: list[tuple[bytes, str | None, bool]] = []

    def handler(packed: bytes, lane: str | None, resume: bool) -> bytes:
        calls.append((packed, lane, resume))
        return pickle.dumps(("echo", repr(pickle.loads(packed)), lane, resume))

    srv = WireServer("127.0.0.1", SECRET, handler)
    srv.calls = calls  # type: ignore[attr-defined]
    yield srv
    srv.close()


def raw(srv: WireServer) -> socket.socket:
    sock = socket.create_connection(srv.address, timeout=10)
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (reads EOF, after any pending frames)."""
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


def test_an_authenticated_connection_carries_requests_in_order(server: WireServer) -> None:
    with ShardConnection(server.address, SECRET) as conn:
        for i in range(50):
            answer = pickle.loads(conn.call(pickle.dumps([i]), lane="L" if i % 2 else None, resume=i == 3))
            assert answer == ("echo", repr([i]), "L" if i % 2 else None, i == 3)


def test_a_pickle_sent_without_the_secret_never_runs(server: WireServer, tmp_path: Path) -> None:
    target = tmp_path / "pwned"
    evil = pickle.dumps(WritesAFile(target))
    # 1. straight away, no handshake at all
    with raw(server) as sock:
        sock.sendall(struct.pack(">I", len(evil)) + evil)
        assert closed_by_peer(sock)
    # 2. after a handshake with the wrong secret
    with raw(server) as sock, pytest.raises(AuthenticationError):
        wire.client_handshake(sock, b"w" * 32)
    with raw(server) as sock:
        wire.read_frame(sock)
        wire.write_frame(sock, b"\x00" * 64)  # a wrong answer, then the request anyway
        sock.sendall(struct.pack(">I", len(evil) + 3) + wire.pack_request(evil))
        assert wire.read_frame(sock) == wire.FAILURE
        assert closed_by_peer(sock)
    assert not target.exists()
    assert server.calls == []  # type: ignore[attr-defined]
    # the control: the same pickle over an authenticated connection does reach the handler
    with ShardConnection(server.address, SECRET) as conn:
        conn.call(evil)
    assert target.exists()


@pytest.mark.parametrize(
    "send",
    [
        pytest.param(lambda s: s.sendall(struct.pack(">I", 0xFFFFFFFF)), id="oversized"),
        pytest.param(
            lambda s: (s.sendall(struct.pack(">I", 100) + b"abc"), s.shutdown(socket.SHUT_WR)), id="truncated"
        ),
        pytest.param(lambda s: wire.write_frame(s, b"\xff\xff\xffgarbage"), id="garbage-header"),
    ],
)
def test_a_broken_frame_closes_only_its_connection(
    server: WireServer, send: Callable[[socket.socket], Any]
) -> None:
    with ShardConnection(server.address, SECRET) as other:
        assert pickle.loads(other.call(pickle.dumps("before")))[1] == "'before'"
        bad = raw(server)
        with bad:
            wire.client_handshake(bad, SECRET)
            send(bad)
            assert closed_by_peer(bad)
        assert pickle.loads(other.call(pickle.dumps("after")))[1] == "'after'"
    with ShardConnection(server.address, SECRET) as fresh:
        assert pickle.loads(fresh.call(pickle.dumps("new")))[1] == "'new'"


def test_a_frame_that_stalls_midway_closes_its_connection(
    server: WireServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wire, "FRAME_BODY_TIMEOUT", 0.2)
    with ShardConnection(server.address, SECRET) as other, raw(server) as sock:
        wire.client_handshake(sock, SECRET)
        sock.sendall(struct.pack(">I", 100) + b"abc")  # a length, part of a body, then nothing
        assert closed_by_peer(sock)
        assert pickle.loads(other.call(pickle.dumps("still")))[1] == "'still'"


def test_a_silent_connection_is_dropped_after_the_handshake_timeout(
    server: WireServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wire, "HANDSHAKE_TIMEOUT", 0.2)
    with raw(server) as sock:
        wire.read_frame(sock)  # the challenge; then say nothing
        assert closed_by_peer(sock)
    with ShardConnection(server.address, SECRET) as conn:
        assert pickle.loads(conn.call(pickle.dumps(1)))[1] == "1"


def test_a_connection_needs_a_secret() -> None:
    with pytest.raises(AuthenticationError):
        ShardConnection(("127.0.0.1", 1), b"")


def test_a_failing_handler_closes_that_connection_only() -> None:
    def handler(packed: bytes, lane: str | None, resume: bool) -> bytes:
        if packed == b"boom":
            raise RuntimeError("a bug")
        return packed

    srv = WireServer("127.0.0.1", SECRET, handler)
    try:
        with ShardConnection(srv.address, SECRET) as other, ShardConnection(srv.address, SECRET) as conn:
            with pytest.raises(WireError):
                conn.call(b"boom")
            assert other.call(b"fine") == b"fine"
    finally:
        srv.close()


def test_the_async_client_handshake_and_frames(server: WireServer) -> None:
    async def main() -> Any:
        reader, writer = await asyncio.open_connection(*server.address)
        try:
            await wire.client_handshake_async(reader, writer, SECRET)
            await wire.write_frame_async(writer, wire.pack_request(pickle.dumps("hi"), "lane", True))
            return pickle.loads(await wire.read_frame_async(reader))
        finally:
            writer.close()

    assert asyncio.run(main()) == ("echo", "'hi'", "lane", True)

    async def wrong() -> None:
        reader, writer = await asyncio.open_connection(*server.address)
        try:
            await wire.client_handshake_async(reader, writer, b"w" * 32)
        finally:
            writer.close()

    with pytest.raises(AuthenticationError):
        asyncio.run(wrong())


def test_a_shard_serializes_socket_and_direct_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The one-engine invariant without Ray: batches over the shard's socket and direct calls of
    ``execute`` (what a Ray call runs) increment one key; the counter is exact."""
    from shardstate._requests import update_request
    from shardstate.shards import actor as actor_module
    from shardstate.shards import commands as C
    from shardstate.shards.actor import READY, ShardActor

    monkeypatch.setattr(actor_module.ShardActor, "_notifier", lambda self: None)
    shard = ShardActor("unit", 0, range(4096), 0, directory=str(tmp_path), durability="os", sweep_interval=0)
    deadline = time.monotonic() + 30
    while shard.phase != READY:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    address = shard.serve_wire(SECRET, "127.0.0.1")
    assert shard.address() == address
    assert shard.info()["address"] == address
    shard.execute([C.command(C.SET, "g", "n", pickle.dumps({"n": 0}), None)])
    rounds, errors = 300, []

    def bump() -> list[Any]:
        return [update_request("g", "n", [{"type": "increment", "path": "n"}]).cmd]

    def over_socket() -> None:
        try:
            with ShardConnection(address, SECRET) as conn:
                for _ in range(rounds):
                    ((ok, answer),) = pickle.loads(conn.call(pickle.dumps(bump())))
                    assert ok, answer
        except BaseException as exc:
            errors.append(exc)

    def direct() -> None:
        try:
            for _ in range(rounds):
                ((ok, answer),) = shard.execute(bump())
                assert ok, answer
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=f) for f in [over_socket, direct] * 3]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(50)
        assert not errors, errors[:3]
        ((ok, value),) = shard.execute([C.command(C.GET, "g", "n")])
        assert pickle.loads(value) == {"n": 6 * rounds}
    finally:
        assert shard._wire is not None
        shard._wire.close()
        shard.storage.close()


def test_the_unix_socket_authenticates_too_and_is_private() -> None:
    def handler(packed: bytes, lane: str | None, resume: bool) -> bytes:
        return packed[::-1]

    srv = WireServer("127.0.0.1", SECRET, handler, unix=True)
    try:
        assert srv.path is not None
        assert os.stat(os.path.dirname(srv.path)).st_mode & 0o777 == 0o700  # only this user enters
        with ShardConnection(srv.path, SECRET) as conn:
            assert conn.call(b"abc") == b"cba"
        with pytest.raises(AuthenticationError):
            ShardConnection(srv.path, b"w" * 32)
        with socket.socket(socket.AF_UNIX) as bad:  # a frame without the handshake: closed, unread
            bad.connect(srv.path)
            bad.sendall(struct.pack(">I", 5) + b"hello")
            assert closed_by_peer(bad)
        assert srv.stats()["requests"] == 1
    finally:
        srv.close()
    assert not os.path.exists(srv.path)
