"""Reaching another member of a replicated shard: its file name, and a control channel to it.

A :class:`MemberChannel` sends control messages (:mod:`shardstate.shards.replication`) over the
member's own authenticated connection when this process can reach it (its Unix socket on the same
machine, or its TCP address unless that is another node's loopback), else as Ray calls to its
``control`` method. Both keep order: one connection, or one caller's calls to a one-at-a-time actor.
"""

from __future__ import annotations

import os
import socket
from collections import deque
from pathlib import Path
from typing import Any

import ray

from shardstate.shards.wire import ShardConnection, pack_control, read_frame, write_frame

#: Seconds to open a member's connection (a member on a lost node must fail fast)
CONNECT_TIMEOUT = 2.0


def member_path(directory: str | os.PathLike[str], shard: int, member: int) -> Path:
    """Where member ``member`` of replicated shard ``shard`` keeps its file (each member has its own:
    nodes may share a file system)."""
    return Path(directory) / f"shard-{shard}-m{member}.db"


def target_of(endpoint: Any, my_ip: str | None) -> tuple[str, int] | str | None:
    """What this process connects to for a member's ``endpoint`` ``(host, port, node IP, Unix
    path)``: the Unix socket on its machine, its TCP address unless that is another node's
    loopback, else None (use Ray calls)."""
    if endpoint is None:
        return None
    host, port, node_ip, path = endpoint
    here = my_ip is not None and node_ip == my_ip
    if path and here and os.path.exists(path):
        return str(path)
    loopback = host.startswith("127.") or host in ("::1", "localhost")
    if loopback and node_ip is not None and my_ip is not None and node_ip != my_ip:
        return None
    return (host, int(port))


class MemberChannel:
    """An ordered control channel to one member: its connection, or Ray calls (see module doc)."""

    def __init__(self, handle: Any, endpoint: Any, secret: bytes | None, my_ip: str | None) -> None:
        self.handle = handle
        self.conn: ShardConnection | None = None
        self._calls: deque[Any] = deque()
        target = target_of(endpoint, my_ip) if secret is not None else None
        if target is not None:
            assert secret is not None
            self.conn = ShardConnection(target, secret, timeout=CONNECT_TIMEOUT)
            self.conn.sock.settimeout(None)
        elif handle is None:
            raise ConnectionError("a member with neither a reachable connection nor a handle")

    def send(self, body: bytes) -> None:
        """Send one message (its answer is the next :meth:`receive`)."""
        if self.conn is not None:
            try:
                write_frame(self.conn.sock, pack_control(body))
            except BaseException:
                self.conn.close()
                raise
        else:
            self._calls.append(self.handle.control.remote(body))

    def receive(self, timeout: float) -> bytes:
        """The answer to the oldest message not yet answered; raises on a timeout or a failure."""
        if self.conn is not None:
            self.conn.sock.settimeout(timeout)
            try:
                return read_frame(self.conn.sock)
            except BaseException:
                self.conn.close()
                raise
        if not self._calls:
            raise ConnectionError("nothing was sent")
        return ray.get(self._calls.popleft(), timeout=timeout)  # type: ignore[no-any-return]

    def call(self, body: bytes, timeout: float) -> bytes:
        """Send one message and return its answer."""
        self.send(body)
        return self.receive(timeout)

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self.conn is not None:
            try:
                self.conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.conn.close()
        self._calls.clear()
