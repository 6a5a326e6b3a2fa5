"""The shard's own authenticated connection, against real shard actors (issue 10, items 1 and 2)."""

from __future__ import annotations

import os
import pickle
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import ray

import shardstate
from shardstate import ops
from shardstate._requests import update_request
from shardstate.cluster import metadata
from shardstate.cluster.slots import slot_of
from shardstate.shards import commands as C
from shardstate.shards import wire
from shardstate.shards.wire import AuthenticationError, ShardConnection, WireError

pytestmark = pytest.mark.timeout(180)


class WritesAFile:
    """A pickle that, when loaded, creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def secret_of(state: shardstate.StateClient) -> bytes:
    return ray.get(state.router.wire_secret.remote(), timeout=30)  # type: ignore[no-any-return]


def owner(state: shardstate.StateClient, group: str) -> tuple[int, Any]:
    """``(index, handle)`` of the shard owning ``group``."""
    view = state._link.current()
    index = view.owners[slot_of(group)]
    return index, view.shards[index]


def address_of(state: shardstate.StateClient, index: int) -> tuple[str, int]:
    _epoch, addresses = ray.get(state.router.shard_addresses.remote(), timeout=30)
    assert addresses[index] is not None
    return addresses[index]  # type: ignore[no-any-return]


def call(conn: ShardConnection, *cmds: C.Command) -> list[tuple[bool, Any]]:
    return pickle.loads(conn.call(pickle.dumps(list(cmds))))  # type: ignore[no-any-return]


def put(group: str, key: str, value: Any) -> C.Command:
    return C.command(C.SET, group, key, pickle.dumps(value), None)


def increment(group: str, key: str) -> C.Command:
    return update_request(group, key, [ops.increment("n")]).cmd


def pid_of(state: shardstate.StateClient, index: int) -> int:
    return state.shard_info()[index]["pid"]  # type: ignore[no-any-return]


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the shard closed ``sock`` (EOF after anything pending)."""
    sock.settimeout(30)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    return True


def test_the_router_hands_out_addresses_epoch_and_the_secret(state: shardstate.StateClient) -> None:
    epoch, addresses = ray.get(state.router.shard_addresses.remote(), timeout=30)
    view = state._link.refresh()
    assert epoch == view.epoch
    infos = state.shard_info()
    assert addresses == [tuple(info["address"]) for info in infos]
    for host, port in addresses:
        assert host == "127.0.0.1"  # loopback unless SHARDSTATE_WIRE_HOST says otherwise
        assert 0 < port < 65536
    assert len({a[1] for a in addresses}) == len(addresses)
    secret = secret_of(state)
    assert len(secret) == 32
    assert secret == metadata.secret(state.config["name"]) == secret_of(state)  # made once, kept
    assert len(ray.get(state.router.shard_map.remote())) == 3  # what existing clients unpack


def test_an_authenticated_connection_runs_real_batches(state: shardstate.StateClient, group: str) -> None:
    index, _shard = owner(state, group)
    with ShardConnection(address_of(state, index), secret_of(state)) as conn:
        (ok, (old, new)), (ok2, got) = call(conn, put(group, "doc", {"n": 1}), C.command(C.GET, group, "doc"))
        assert ok
        assert ok2
        assert old is None
        assert pickle.loads(new) == {"n": 1}
        assert pickle.loads(got) == {"n": 1}
        ((ok, (old, new)),) = call(conn, increment(group, "doc"))
        assert ok
        assert (pickle.loads(old), pickle.loads(new)) == ({"n": 1}, {"n": 2})
        ((ok, error),) = call(conn, C.command(C.SET, "", "k", b"x", None))  # bad input: a typed error
        assert not ok
        assert isinstance(error, shardstate.InvalidInput)
        ((ok, error),) = pickle.loads(conn.call(b"not a pickle"))  # answered as the Ray path does
        assert not ok
        assert isinstance(error, shardstate.InvalidInput)
        assert call(conn, C.command(C.GET, group, "doc"))[0][0] is True  # the connection still serves
    assert state.get(group, "doc") == {"n": 2}  # the Ray path sees the socket's writes
    state.update(group, "doc", [ops.increment("n")])
    with ShardConnection(address_of(state, index), secret_of(state)) as conn:
        assert pickle.loads(call(conn, C.command(C.GET, group, "doc"))[0][1]) == {"n": 3}


def test_a_pickle_sent_without_the_secret_never_runs(
    state: shardstate.StateClient, group: str, tmp_path: Path
) -> None:
    index, shard = owner(state, group)
    address = address_of(state, index)
    pid = pid_of(state, index)
    target = tmp_path / "pwned"
    evil = pickle.dumps([WritesAFile(target)])
    # without a handshake: the pickle as the first frame, as a request frame, and the raw bytes
    for payload in [
        struct.pack(">I", len(evil)) + evil,
        struct.pack(">I", len(evil) + 3) + wire.pack_request(evil),
        evil,
    ]:
        with socket.create_connection(address, timeout=30) as sock:
            sock.sendall(payload)
            assert closed_by_peer(sock)
    # with the wrong secret, then the request anyway
    with socket.create_connection(address, timeout=30) as sock, pytest.raises(AuthenticationError):
        wire.client_handshake(sock, os.urandom(32))
    with socket.create_connection(address, timeout=30) as sock:
        wire.read_frame(sock)
        wire.write_frame(sock, os.urandom(64))
        sock.sendall(struct.pack(">I", len(evil) + 3) + wire.pack_request(evil))
        assert wire.read_frame(sock) == wire.FAILURE
        assert closed_by_peer(sock)
    with pytest.raises(AuthenticationError):
        ShardConnection(address, b"wrong secret")
    time.sleep(0.5)  # anything the shard did with those bytes has happened by now
    assert not target.exists()
    assert pid_of(state, index) == pid  # the same process serves on
    state.set(group, "k", 1)
    ((ok, got),) = pickle.loads(ray.get(shard.run.remote(pickle.dumps([C.command(C.GET, group, "k")]))))
    assert ok
    assert pickle.loads(got) == 1
    with ShardConnection(address, secret_of(state)) as conn:
        assert pickle.loads(call(conn, C.command(C.GET, group, "k"))[0][1]) == 1


BROKEN: list[tuple[str, Callable[[socket.socket], Any]]] = [
    ("oversized", lambda s: s.sendall(struct.pack(">I", 0xFFFFFFFF) + b"x" * 100)),
    ("truncated", lambda s: (s.sendall(struct.pack(">I", 1000) + b"abc"), s.shutdown(socket.SHUT_WR))),
    ("garbage-header", lambda s: wire.write_frame(s, b"\xfe\xff\xff" + os.urandom(40))),
    # random bytes, then EOF: whatever length they announce, the connection ends closed (a random
    # length under the limit would otherwise wait for the rest of its body)
    ("garbage-bytes", lambda s: (s.sendall(os.urandom(256)), s.shutdown(socket.SHUT_WR))),
]


@pytest.mark.parametrize("send", [b[1] for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_a_broken_frame_closes_only_its_connection(
    state: shardstate.StateClient, group: str, send: Callable[[socket.socket], Any]
) -> None:
    index, shard = owner(state, group)
    address = address_of(state, index)
    secret = secret_of(state)
    pid = pid_of(state, index)
    with ShardConnection(address, secret) as other:
        call(other, put(group, "k", 1))
        with socket.create_connection(address, timeout=30) as bad:
            wire.client_handshake(bad, secret)
            send(bad)
            assert closed_by_peer(bad)
        assert pickle.loads(call(other, C.command(C.GET, group, "k"))[0][1]) == 1  # unaffected
    assert pid_of(state, index) == pid
    assert ray.get(shard.ping.remote(), timeout=30) == index
    assert state.get(group, "k") == 1


def test_socket_and_ray_writers_are_serialized(state: shardstate.StateClient, group: str) -> None:
    """The one-engine invariant: 4 socket writers and 4 Ray-call writers increment one key."""
    threads_per_path, rounds = 4, 500
    index, shard = owner(state, group)
    address, secret = address_of(state, index), secret_of(state)
    state.set(group, "counter", {"n": 0})
    errors: list[BaseException] = []
    deadline = time.monotonic() + 150

    def over_socket() -> None:
        try:
            with ShardConnection(address, secret) as conn:
                for _ in range(rounds):
                    assert time.monotonic() < deadline
                    ((ok, answer),) = pickle.loads(conn.call(pickle.dumps([increment(group, "counter")])))
                    assert ok, answer
        except BaseException as exc:
            errors.append(exc)

    def over_ray() -> None:
        try:
            for _ in range(rounds):
                assert time.monotonic() < deadline
                packed = pickle.dumps([increment(group, "counter")])  # each its own op_id
                ((ok, answer),) = pickle.loads(ray.get(shard.run.remote(packed), timeout=60))
                assert ok, answer
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=f) for f in [over_socket, over_ray] * threads_per_path]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(170)
    assert not errors, errors[:3]
    assert state.get(group, "counter") == {"n": 2 * threads_per_path * rounds}


def test_a_restarted_shard_serves_on_a_new_address(new_cluster: dict[str, str]) -> None:
    small = shardstate.connect(**new_cluster, shards=1)
    small.set("g", "k", 1)
    secret = secret_of(small)
    old = address_of(small, 0)
    conn = ShardConnection(old, secret)
    assert pickle.loads(call(conn, C.command(C.GET, "g", "k"))[0][1]) == 1
    os.kill(small.shard_info()[0]["pid"], signal.SIGKILL)
    with pytest.raises((WireError, OSError)):
        call(conn, C.command(C.GET, "g", "k"))
    deadline = time.monotonic() + 90
    while True:
        _epoch, (new,) = ray.get(small.router.shard_addresses.remote(), timeout=60)
        if new is not None and new != old:
            break
        assert time.monotonic() < deadline, "the restarted shard has no address"
        time.sleep(0.2)
    assert secret_of(small) == secret  # one secret per cluster, across restarts
    with ShardConnection(new, secret) as fresh:
        assert pickle.loads(call(fresh, C.command(C.GET, "g", "k"))[0][1]) == 1
