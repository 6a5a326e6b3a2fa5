"""How a client's batches reach a shard: its own authenticated connection, or a Ray actor call.

Both carry the same bytes (a packed batch out, packed results back; see ``ShardActor.run``) and fail
the same two ways, which is all the retry logic above them needs to know:

- :class:`ShardGone`: the shard went away mid-call (killed, restarting, moved; the connection broke
  or was refused). Send the batch again after a backoff: writes carry op_ids, so nothing applies
  twice.
- anything else (a timeout, an unknown Ray failure) is turned into ``Unavailable`` by the caller.

Connections (:mod:`shardstate.shards.wire`): for threads, a small pool per shard of blocking
connections, each used by one thread at a time (:class:`SyncConnections`); for asyncio, one
pipelined connection per shard and event loop (:class:`AsyncConnection`): requests go out in the
order they are submitted and answers come back in that order (the shard answers a connection's
requests one after another), so a lane keeps its batches in order on it.

A shard is reached over its connection when it has one this process can reach: an address on the
network, or a loopback address on this process's own node (a shard bound to 127.0.0.1 on another
node is reached through Ray). Everything else goes through Ray.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

from shardstate.shards.wire import (
    HANDSHAKE_TIMEOUT,
    AuthenticationError,
    ShardConnection,
    WireError,
    client_handshake_async,
    pack_request,
    read_frame_async,
)

#: the transports ``connect(transport=...)`` takes
TRANSPORTS = ("socket", "ray")
#: idle blocking connections kept per shard (more are opened when threads need them, and closed after)
POOL_SIZE = 8


class ShardGone(Exception):
    """The shard went away mid-call (died, restarting, moved): retry the batch after a backoff."""


#: what a client connects to: ``(host, port)``, or a Unix socket's path
Target = tuple[str, int] | str


class Endpoint(NamedTuple):
    """Where a shard's own connection listens, the IP of the node it runs on, and its Unix socket
    (for clients on the same machine)."""

    host: str
    port: int
    node_ip: str | None
    path: str | None = None

    def target(self, my_ip: str | None) -> Target:
        """What this process connects to: the Unix socket when it is on the shard's node (and the
        socket file is here), else ``(host, port)``."""
        here = my_ip is not None and self.node_ip == my_ip
        if self.path is not None and here and os.path.exists(self.path):
            return self.path
        return (self.host, self.port)


def reachable(endpoint: Endpoint | None, my_ip: str | None) -> bool:
    """Whether this process can open ``endpoint``: it exists, and it is not another node's loopback."""
    if endpoint is None:
        return False
    if _is_loopback(endpoint.host):
        return endpoint.node_ip is None or my_ip is None or endpoint.node_ip == my_ip
    return True


def _is_loopback(host: str) -> bool:
    return host.startswith("127.") or host in ("::1", "localhost")


def node_ip() -> str | None:
    """This process's Ray node IP (None outside Ray)."""
    try:
        import ray

        return ray.util.get_node_ip_address()  # type: ignore[no-any-return]
    except Exception:
        return None


# -- threads: a pool of blocking connections per shard --------------------------------------------
class SyncConnections:
    """Blocking connections to a cluster's shards, pooled per shard; thread-safe.

    ``call`` takes an idle connection (or opens one), sends, receives, and puts it back. A broken
    connection is closed and the call raises :class:`ShardGone`; a timeout closes it too and raises
    :class:`TimeoutError`.
    """

    def __init__(self, secret: bytes, timeout: float, my_ip: str | None = None) -> None:
        self.secret = secret
        self.timeout = timeout
        self.my_ip = my_ip
        self._idle: dict[int, list[ShardConnection]] = {}
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def _checkout(self, shard: int, target: Target) -> ShardConnection:
        with self._lock:
            if self._pid != os.getpid():  # a forked child must not share its parent's sockets
                self._idle, self._pid = {}, os.getpid()
            idle = self._idle.get(shard)
            while idle:
                conn = idle.pop()
                if conn.address == target:
                    return conn
                conn.close()  # the shard moved: a connection to its old address is no use
        try:
            return ShardConnection(target, self.secret, timeout=self.timeout)
        except AuthenticationError:
            raise
        except (OSError, WireError) as exc:
            where = target if isinstance(target, str) else f"{target[0]}:{target[1]}"
            raise ShardGone(f"cannot connect to shard {shard} at {where}: {exc}") from exc

    def _checkin(self, shard: int, conn: ShardConnection) -> None:
        with self._lock:
            idle = self._idle.setdefault(shard, [])
            if len(idle) < POOL_SIZE and self._pid == os.getpid():
                idle.append(conn)
                return
        conn.close()

    def call(self, shard: int, target: Target, packed: bytes, lane: str | None, resume: bool) -> bytes:
        """Send one packed batch to ``shard`` (at ``target``) and return its packed results."""
        conn = self._checkout(shard, target)
        try:
            answer = conn.call(packed, lane, resume)
        except TimeoutError as exc:
            raise TimeoutError(f"shard {shard} did not answer within {self.timeout}s") from exc
        except (OSError, WireError) as exc:
            raise ShardGone(f"the connection to shard {shard} broke: {exc}") from exc
        self._checkin(shard, conn)
        return answer

    def call_many(self, calls: Sequence[tuple[int, Target, bytes]]) -> list[bytes | BaseException]:
        """Send several batches (to different shards) at once, then collect every answer, in order.

        Each answer is the packed results, or the exception its call raised."""
        opened: list[tuple[ShardConnection | None, BaseException | None]] = []
        for shard, target, packed in calls:
            try:
                conn = self._checkout(shard, target)
            except BaseException as exc:
                opened.append((None, exc))
                continue
            try:
                conn.send(packed)
                opened.append((conn, None))
            except BaseException as exc:
                opened.append((None, _classify(shard, exc, self.timeout)))
        out: list[bytes | BaseException] = []
        for (shard, _, _), (conn, error) in zip(calls, opened, strict=True):
            if conn is None:
                out.append(error if error is not None else ShardGone("not sent"))
                continue
            try:
                out.append(conn.receive())
            except BaseException as exc:
                out.append(_classify(shard, exc, self.timeout))
                continue
            self._checkin(shard, conn)
        return out

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()


def _classify(shard: int, exc: BaseException, timeout: float) -> BaseException:
    if isinstance(exc, (socket.timeout, TimeoutError)):
        return TimeoutError(f"shard {shard} did not answer within {timeout}s")
    if isinstance(exc, (OSError, WireError)):
        return ShardGone(f"the connection to shard {shard} broke: {exc}")
    return exc


# -- asyncio: one pipelined connection per shard and loop -----------------------------------------
class AsyncConnection:
    """A pipelined connection to one shard, on one event loop.

    :meth:`submit` queues a request and returns a future for its answer at once (no await), so
    callers decide the order requests leave in; requests submitted while the connection opens are
    sent, in order, once it is authenticated. One reader task hands the answers to the futures in
    order. When the connection breaks (or cannot be opened), every pending future fails with
    :class:`ShardGone` and the connection is done: make a new one.
    """

    def __init__(self, shard: int, target: Target, secret: bytes) -> None:
        self.shard = shard
        self.target = target
        self.secret = secret
        self.broken: BaseException | None = None
        self._pending: collections.deque[asyncio.Future[bytes]] = collections.deque()
        self._unsent: list[bytes] | None = []  # frames submitted while opening (None once open)
        self._writer: asyncio.StreamWriter | None = None
        self._task = asyncio.get_running_loop().create_task(self._run())

    def submit(self, packed: bytes, lane: str | None = None, resume: bool = False) -> asyncio.Future[bytes]:
        """Queue one packed batch; the future resolves to its packed results."""
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        if self.broken is not None:
            fut.set_exception(ShardGone(f"the connection to shard {self.shard} broke: {self.broken}"))
            return fut
        body = pack_request(packed, lane, resume)
        self._pending.append(fut)
        if self._unsent is not None:
            self._unsent.append(body)
        else:
            assert self._writer is not None
            _write(self._writer, body)
        return fut

    async def _run(self) -> None:
        writer: asyncio.StreamWriter | None = None
        try:
            if isinstance(self.target, str):
                opening = asyncio.open_unix_connection(self.target, limit=1 << 20)
            else:
                opening = asyncio.open_connection(*self.target, limit=1 << 20)
            reader, writer = await asyncio.wait_for(opening, HANDSHAKE_TIMEOUT)
            sock = writer.get_extra_info("socket")  # type: ignore[union-attr]
            if sock is not None and isinstance(self.target, tuple):
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.wait_for(client_handshake_async(reader, writer, self.secret), HANDSHAKE_TIMEOUT)
            self._writer = writer
            for body in self._unsent or ():
                _write(writer, body)  # type: ignore[arg-type]
            self._unsent = None
            while True:
                answer = await read_frame_async(reader)
                if not self._pending:
                    raise WireError("an answer nobody asked for")
                fut = self._pending.popleft()
                if not fut.done():  # its caller may have stopped waiting (a timeout)
                    fut.set_result(answer)
        except asyncio.CancelledError:
            self._fail(ShardGone("the connection was closed"))
            raise
        except AuthenticationError as exc:
            self._fail(exc)
        except BaseException as exc:
            self._fail(ShardGone(f"the connection to shard {self.shard} broke: {type(exc).__name__}: {exc}"))
        finally:
            if writer is not None:
                writer.close()

    def _fail(self, error: BaseException) -> None:
        self.broken = error
        while self._pending:
            fut = self._pending.popleft()
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # a lane resends what was in flight: not every such future is awaited

    def close(self) -> None:
        """Close the connection; pending requests fail with :class:`ShardGone`."""
        self._task.cancel()


def _write(writer: asyncio.StreamWriter, body: bytes) -> None:
    writer.write(len(body).to_bytes(4, "big"))
    writer.write(body)


async def receive(fut: asyncio.Future[bytes] | Any, timeout: float) -> bytes:
    """Wait for a submitted request's answer (a connection's future, or a Ray ObjectRef)."""
    try:
        waited = asyncio.shield(fut) if isinstance(fut, asyncio.Future) else fut
        return await asyncio.wait_for(waited, timeout)  # type: ignore[no-any-return]
    except asyncio.TimeoutError:
        raise TimeoutError(f"no answer within {timeout}s") from None
