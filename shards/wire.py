"""The shard's own connection: length-prefixed frames behind an HMAC challenge-response handshake.

Imported by the shard and by clients; it imports neither (a handler is handed to :func:`serve`).

Frames. Every message is ``4-byte big-endian length + body``. The length is checked against a
maximum *before* a byte of the body is read: a peer that announces more is cut off (its connection
only). While the handshake runs the maximum is :data:`HANDSHAKE_MAX` (a few dozen bytes), after it
:data:`MAX_FRAME`.

Handshake (the scheme of the stdlib's ``multiprocessing.connection``, made mutual). ``S`` is the
cluster's secret (32 random bytes in the cluster metadata, handed out only through Ray)::

    server -> client   MAGIC + server nonce Ns (32 random bytes)
    client -> server   HMAC-SHA256(S, "client" + Ns) + client nonce Nc
    server -> client   WELCOME + HMAC-SHA256(S, "server" + Nc)      (or FAILURE, then it closes)

Each side compares digests with :func:`hmac.compare_digest`. The role labels keep one side's
answer from being replayed as the other's. The handshake only proves that both ends hold the secret;
it does not encrypt (run clusters on a network you trust, as Ray itself asks). Nothing is unpickled
on either side before the peer has proven the secret: the handshake is raw bytes.

Requests after the handshake (client -> shard), one frame each, answered in order (FIFO)::

    flags (1 byte: bit 0 resume, bit 1 a lane follows) + lane length (2 bytes) + lane (UTF-8)
    + packed batch (what ``ShardActor.run`` takes)

and the answer frame's body is exactly the bytes ``ShardActor.run`` returns. A request whose
header does not parse closes the connection; a packed batch that does not unpickle is answered by
the shard with an error result, as on the Ray path.

Follow streams (state events pushed to a subscriber or a watcher): a request whose header is
exactly ``flags = 4 (follow), lane length 0`` turns its connection into a one-way stream. Its body
(after the header) is the follower's spec, handed to the server's ``follow`` callback, which
pushes frames with :meth:`FollowStream.send` (from any thread; the connection's own thread writes
them) until the connection closes. The peer sends nothing more: a byte from it closes the stream.
A server without a ``follow`` callback closes such a connection (its flags are unknown).

Control requests (between the members of a replicated shard, and the router's heartbeats): a
request whose header is exactly ``flags = 8 (control), lane length 0``; its body goes to the
server's ``control`` callback and the answer frame is what that returns. Only authenticated peers
get here, like batches (see :mod:`shardstate.shards.replication` for the messages).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import os
import select
import socket
import struct
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

#: The largest frame body a peer may announce after the handshake (a client splits its batches
#: far below this); a larger announcement closes the connection before its body is read.
MAX_FRAME = 512 * 1024 * 1024
#: The largest frame body accepted while the handshake runs.
HANDSHAKE_MAX = 128
#: Seconds a connection may take to complete its handshake.
HANDSHAKE_TIMEOUT = 10.0
#: once a frame's length has arrived, its body must follow within this many seconds, plus one
#: second per MiB: a peer that stalls in the middle of a frame does not hold a connection forever
FRAME_BODY_TIMEOUT = 30.0
#: Connections a shard keeps open at once (one per client process and shard, a few more for
#: threads); more are closed as they arrive.
MAX_CONNECTIONS = 4096
#: Bytes of each handshake nonce and of the cluster secret.
NONCE_SIZE = 32
SECRET_SIZE = 32

MAGIC = b"#SHARDSTATE-WIRE-1#"
WELCOME = b"#WELCOME#"
FAILURE = b"#FAILURE#"

_LENGTH = struct.Struct(">I")
_HEADER = struct.Struct(">BH")
_RESUME, _LANE, _FOLLOW, _CONTROL = 1, 2, 4, 8
#: the header of a follow request (flags = follow, no lane)
FOLLOW_HEADER = _HEADER.pack(_FOLLOW, 0)
#: the header of a control request (replication between a shard's members, heartbeats; no lane)
CONTROL_HEADER = _HEADER.pack(_CONTROL, 0)
#: bytes a follow stream may hold queued before the shard drops what it would push next (the
#: follower notices the gap and reads the shard's log); the socket's own buffers come on top
FOLLOW_BUFFER = 8 * 1024 * 1024
#: seconds between a quiet follow stream's checks that its peer is still there
FOLLOW_IDLE_CHECK = 1.0
_DIGEST_SIZE = hashlib.sha256().digest_size

#: A shard's handler: ``(packed batch, lane, resume) -> packed results`` (``ShardActor.run``).
Handler = Callable[[bytes, "str | None", bool], bytes]


class Follower(Protocol):
    """What a server's ``follow`` callback returns for one follow stream."""

    def closed(self) -> None:
        """The stream's connection closed (called once, on the stream's thread)."""
        ...


#: ``(spec, stream) -> Follower``: starts pushing frames to ``stream`` (raise to refuse: closes it)
FollowHandler = Callable[[bytes, "FollowStream"], Follower]


class WireError(ConnectionError):
    """The connection broke or its peer broke the protocol; the connection is closed."""


class ConnectionClosed(WireError):
    """The peer closed the connection cleanly, between two frames."""


class FrameTooLarge(WireError):
    """The peer announced a frame longer than allowed (its body was not read)."""


class AuthenticationError(WireError):
    """The peer did not prove it holds the cluster's secret (or we did not, to it)."""


# -- frames: sync (sockets) -----------------------------------------------------------------------
def write_frame(sock: socket.socket, body: bytes) -> None:
    """Send one frame (length prefix + ``body``)."""
    if len(body) > MAX_FRAME:
        raise FrameTooLarge(f"a frame is at most {MAX_FRAME} bytes, this one {len(body)}")
    if len(body) < 65536:
        sock.sendall(_LENGTH.pack(len(body)) + body)
    else:  # no copy of a large body
        sock.sendall(_LENGTH.pack(len(body)))
        sock.sendall(body)


def read_frame(sock: socket.socket, max_size: int = MAX_FRAME) -> bytes:
    """Receive one frame's body; :class:`FrameTooLarge` if it announces more than ``max_size``
    (checked before the body is read), :class:`WireError` if the peer closes mid-frame."""
    (size,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size, between_frames=True))
    if size > max_size:
        raise FrameTooLarge(f"peer announced a frame of {size} bytes (at most {max_size})")
    return _recv_exactly(sock, size)


def _recv_exactly(sock: socket.socket, size: int, between_frames: bool = False) -> bytes:
    first = sock.recv(min(size, 65536))  # the common case: one recv brings it all
    if len(first) == size:
        return first
    buf = bytearray(size)
    view = memoryview(buf)
    got = len(first)
    view[:got] = first
    if got == 0 and size:
        if between_frames:
            raise ConnectionClosed("the peer closed the connection")
        raise WireError(f"connection closed after 0 of {size} bytes")
    while got < size:
        n = sock.recv_into(view[got:], size - got)
        if n == 0:
            if between_frames and got == 0:
                raise ConnectionClosed("the peer closed the connection")
            raise WireError(f"connection closed after {got} of {size} bytes")
        got += n
    return bytes(buf)


# -- frames: asyncio (streams) --------------------------------------------------------------------
async def write_frame_async(writer: asyncio.StreamWriter, body: bytes) -> None:
    """Send one frame (length prefix + ``body``) and wait until it is flushed."""
    if len(body) > MAX_FRAME:
        raise FrameTooLarge(f"a frame is at most {MAX_FRAME} bytes, this one {len(body)}")
    writer.write(_LENGTH.pack(len(body)))
    writer.write(body)
    await writer.drain()


async def read_frame_async(
    reader: asyncio.StreamReader, max_size: int = MAX_FRAME, body_timeout: float | None = None
) -> bytes:
    """Receive one frame's body (see :func:`read_frame`); ``body_timeout``: seconds (plus one per
    MiB) the body may take once its length has arrived, else :class:`WireError`."""
    try:
        (size,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise ConnectionClosed("the peer closed the connection") from None
        raise WireError(f"connection closed after {len(exc.partial)} of {exc.expected} bytes") from None
    if size > max_size:
        raise FrameTooLarge(f"peer announced a frame of {size} bytes (at most {max_size})")
    try:
        if body_timeout is None:
            return await reader.readexactly(size)
        return await asyncio.wait_for(reader.readexactly(size), body_timeout + size / (1 << 20))
    except asyncio.IncompleteReadError as exc:
        raise WireError(f"connection closed after {len(exc.partial)} of {exc.expected} bytes") from None
    except asyncio.TimeoutError:
        raise WireError(f"a frame of {size} bytes did not arrive in time (the peer stalled)") from None


# -- the handshake (pure parts) ---------------------------------------------------------------------
def new_secret() -> bytes:
    """A fresh cluster secret."""
    return os.urandom(SECRET_SIZE)


def _digest(secret: bytes, role: bytes, nonce: bytes) -> bytes:
    return hmac.new(secret, role + nonce, hashlib.sha256).digest()


def _challenge() -> tuple[bytes, bytes]:
    """``(nonce, the server's first message)``."""
    nonce = os.urandom(NONCE_SIZE)
    return nonce, MAGIC + nonce


def _answer(secret: bytes, challenge: bytes) -> tuple[bytes, bytes]:
    """The client's reply to ``challenge``: ``(its own nonce, the message)``."""
    if len(challenge) != len(MAGIC) + NONCE_SIZE or not challenge.startswith(MAGIC):
        raise AuthenticationError("the peer is not a shardstate shard (unexpected greeting)")
    nonce = os.urandom(NONCE_SIZE)
    return nonce, _digest(secret, b"client", challenge[len(MAGIC) :]) + nonce


def _check_answer(secret: bytes, nonce: bytes, answer: bytes) -> bytes:
    """The server checks the client's answer; returns its welcome message (with its own proof)."""
    if len(answer) != _DIGEST_SIZE + NONCE_SIZE:
        raise AuthenticationError("malformed handshake answer")
    if not hmac.compare_digest(answer[:_DIGEST_SIZE], _digest(secret, b"client", nonce)):
        raise AuthenticationError("the client does not hold the cluster's secret")
    return WELCOME + _digest(secret, b"server", answer[_DIGEST_SIZE:])


def _check_welcome(secret: bytes, nonce: bytes, welcome: bytes) -> None:
    """The client checks the server's proof."""
    if welcome == FAILURE:
        raise AuthenticationError("the shard refused our secret (a wrong cluster secret)")
    if not welcome.startswith(WELCOME) or not hmac.compare_digest(
        welcome[len(WELCOME) :], _digest(secret, b"server", nonce)
    ):
        raise AuthenticationError("the shard does not hold the cluster's secret")


# -- the handshake: sync and async drivers ---------------------------------------------------------
def client_handshake(sock: socket.socket, secret: bytes) -> None:
    """Prove the secret to the server and check its proof (raises :class:`AuthenticationError`)."""
    nonce, message = _answer(secret, read_frame(sock, HANDSHAKE_MAX))
    write_frame(sock, message)
    _check_welcome(secret, nonce, read_frame(sock, HANDSHAKE_MAX))


def server_handshake(sock: socket.socket, secret: bytes) -> None:
    """Challenge the client; on a wrong answer send FAILURE and raise :class:`AuthenticationError`."""
    nonce, message = _challenge()
    write_frame(sock, message)
    try:
        welcome = _check_answer(secret, nonce, read_frame(sock, HANDSHAKE_MAX))
    except AuthenticationError:
        with contextlib.suppress(OSError):
            write_frame(sock, FAILURE)
        raise
    write_frame(sock, welcome)


async def client_handshake_async(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes
) -> None:
    """:func:`client_handshake` on asyncio streams."""
    nonce, message = _answer(secret, await read_frame_async(reader, HANDSHAKE_MAX))
    await write_frame_async(writer, message)
    _check_welcome(secret, nonce, await read_frame_async(reader, HANDSHAKE_MAX))


async def server_handshake_async(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes
) -> None:
    """:func:`server_handshake` on asyncio streams."""
    nonce, message = _challenge()
    await write_frame_async(writer, message)
    try:
        welcome = _check_answer(secret, nonce, await read_frame_async(reader, HANDSHAKE_MAX))
    except AuthenticationError:
        with contextlib.suppress(OSError):
            await write_frame_async(writer, FAILURE)
        raise
    await write_frame_async(writer, welcome)


# -- requests ---------------------------------------------------------------------------------------
def pack_follow(spec: bytes) -> bytes:
    """A follow request's body: the follow header and the follower's spec."""
    return FOLLOW_HEADER + spec


def pack_control(body: bytes) -> bytes:
    """A control request's body: the control header and the message."""
    return CONTROL_HEADER + body


def pack_request(packed: bytes, lane: str | None = None, resume: bool = False) -> bytes:
    """A request frame's body: the small header (flags, lane) and the packed batch."""
    raw = b"" if lane is None else lane.encode()
    flags = (_RESUME if resume else 0) | (0 if lane is None else _LANE)
    return _HEADER.pack(flags, len(raw)) + raw + packed


def unpack_request(body: bytes) -> tuple[bytes, str | None, bool]:
    """``(packed, lane, resume)`` of a request body; :class:`WireError` if its header is garbage."""
    if len(body) < _HEADER.size:
        raise WireError("a request frame shorter than its header")
    flags, size = _HEADER.unpack_from(body)
    end = _HEADER.size + size
    if flags & ~(_RESUME | _LANE) or len(body) < end or (size and not flags & _LANE):
        raise WireError("a request frame with a malformed header")
    try:
        lane = body[_HEADER.size : end].decode() if flags & _LANE else None
    except UnicodeDecodeError:
        raise WireError("a request frame whose lane is not UTF-8") from None
    return body[end:], lane, bool(flags & _RESUME)


# -- the server (inside the shard) ------------------------------------------------------------------
class FollowStream:
    """The sending side of a follow stream, inside the server: :meth:`send` from any thread; the
    connection's own thread (:meth:`run`) writes the frames, whole and in order.

    A frame that would take the queued bytes past ``limit`` is refused (``False``) unless nothing
    is queued: the caller then tells its follower about the gap. So a follower that does not read
    costs the shard at most ``limit`` bytes plus the socket's buffers.
    """

    def __init__(self, sock: socket.socket, limit: int = FOLLOW_BUFFER) -> None:
        self._sock = sock
        self.limit = limit
        self._cond = threading.Condition()
        self._frames: deque[bytes] = deque()
        self._queued = 0
        self.is_closed = False
        #: frames refused for being too far behind
        self.refused = 0

    def send(self, body: bytes) -> bool:
        """Queue one frame; False (nothing queued) if the stream is closed or too far behind."""
        size = _LENGTH.size + len(body)
        with self._cond:
            if self.is_closed:
                return False
            if self._queued and self._queued + size > self.limit:
                self.refused += 1
                return False
            self._frames.append(body)
            self._queued += size
            self._cond.notify()
        return True

    def run(self) -> None:
        """Write queued frames until the peer closes the connection (or sends anything, or stops
        reading for longer than a frame may take): the connection's thread."""
        sock = self._sock
        try:
            while True:
                with self._cond:
                    if not self._frames:
                        self._cond.wait(FOLLOW_IDLE_CHECK)
                    body = self._frames.popleft() if self._frames else None
                    if body is not None:
                        self._queued -= _LENGTH.size + len(body)
                if body is None:
                    readable, _, _ = select.select([sock], [], [], 0)
                    if readable:  # the peer closed (or broke the protocol by sending)
                        return
                    continue
                sock.settimeout(FRAME_BODY_TIMEOUT + len(body) / (1 << 20))
                write_frame(sock, body)
        except (BrokenPipeError, ConnectionResetError):
            return  # the peer went away mid-frame: a reader that closed, not a protocol error
        finally:
            with self._cond:
                self.is_closed = True
                self._frames.clear()
                self._queued = 0


class WireServer:
    """A server on daemon threads: an accept loop, and one thread per connection that authenticates
    it, then answers its request frames in order with ``handler`` (called on that connection's
    thread; the handler itself serializes with the shard's other callers). Blocking sockets: a
    request costs two system calls each way and no event loop.

    A connection that fails the handshake, sends a truncated, oversized or malformed frame, stalls
    in the middle of a frame, or goes away is closed; the server and every other connection carry
    on. At most :data:`MAX_CONNECTIONS` are open at once (more are closed at once).
    """

    def __init__(
        self,
        host: str,
        secret: bytes,
        handler: Handler,
        port: int = 0,
        unix: bool | str = False,
        follow: FollowHandler | None = None,
        control: Handler | None = None,
    ) -> None:
        self.secret = secret
        self.handler = handler
        #: answers a control request (None: this server has none; such a request closes its connection)
        self.control = control
        #: opens a follow stream (None: this server has none; a follow request closes its connection)
        self.follow = follow
        self.connections = 0  # currently open, authenticated or not
        self.refused = 0  # connections closed for failing the handshake or breaking the protocol
        self.accepted = 0  # connections opened since the start
        self.requests = 0  # request frames (batches) answered since the start
        self.controls = 0  # control frames answered since the start (replication, heartbeats)
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.create_server((host, port), family=family, backlog=128)
        bound = self._listener.getsockname()
        self.address: tuple[str, int] = (bound[0], bound[1])
        #: a Unix socket for clients on this machine (in a new directory only this user can enter)
        self.path: str | None = None
        self._unix: socket.socket | None = None
        self._own_directory = False
        if unix and hasattr(socket, "AF_UNIX"):
            if isinstance(unix, str):  # the caller's path, in a directory only its user can enter
                self.path = unix
            else:
                self.path = os.path.join(tempfile.mkdtemp(prefix="shardstate-wire-"), "shard.sock")
                self._own_directory = True
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # a socket file left behind by an earlier (killed) process
            self._unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self._unix.bind(self.path)
            self._unix.listen(128)
        self._threads = [
            threading.Thread(target=self._accept, args=(lst,), daemon=True, name="shardstate-wire")
            for lst in (self._listener, self._unix)
            if lst is not None
        ]
        for thread in self._threads:
            thread.start()

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                sock, _peer = listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                full = self._closed or len(self._open) >= MAX_CONNECTIONS
                if not full:
                    self._open.add(sock)
                    self.connections += 1
                    self.accepted += 1
                else:
                    self.refused += 1
            if full:
                sock.close()
                continue
            name = "shardstate-wire-conn"
            threading.Thread(target=self._serve, args=(sock,), daemon=True, name=name).start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(HANDSHAKE_TIMEOUT)
            server_handshake(sock, self.secret)
            while True:
                sock.settimeout(None)  # an idle connection may wait for its next request forever
                (size,) = _LENGTH.unpack(_recv_exactly(sock, _LENGTH.size, between_frames=True))
                if size > MAX_FRAME:
                    raise FrameTooLarge(f"peer announced a frame of {size} bytes (at most {MAX_FRAME})")
                sock.settimeout(FRAME_BODY_TIMEOUT + size / (1 << 20))
                body = _recv_exactly(sock, size)
                if self.follow is not None and body.startswith(FOLLOW_HEADER):
                    self._follow_stream(sock, body[len(FOLLOW_HEADER) :])
                    return
                if body.startswith(CONTROL_HEADER):
                    if self.control is None:
                        raise WireError("a control request on a connection that serves none")
                    answer = self.control(body[len(CONTROL_HEADER) :], None, False)
                    self.controls += 1
                else:
                    packed, lane, resume = unpack_request(body)
                    answer = self.handler(packed, lane, resume)
                    self.requests += 1
                sock.settimeout(FRAME_BODY_TIMEOUT + len(answer) / (1 << 20))
                write_frame(sock, answer)
        except ConnectionClosed:
            pass  # the client is done
        except (WireError, OSError) as exc:  # socket.timeout is an OSError
            with self._lock:
                self.refused += 1
            if not self._closed:
                print(f"shardstate wire: closing a connection: {type(exc).__name__}: {exc}", file=sys.stderr)
        except Exception as exc:  # the handler failed: the client sees a closed connection and retries
            print(f"shardstate wire: request failed, closing: {type(exc).__name__}: {exc}", file=sys.stderr)
        finally:
            with self._lock:
                self.connections -= 1
                self._open.discard(sock)
            sock.close()

    def _follow_stream(self, sock: socket.socket, spec: bytes) -> None:
        """Serve one follow stream on this connection's thread until it closes."""
        assert self.follow is not None
        stream = FollowStream(sock)
        follower = self.follow(spec, stream)
        try:
            stream.run()
        finally:
            follower.closed()

    def stats(self) -> dict[str, int]:
        """``connections`` open now, ``accepted`` and ``refused`` since the start, ``requests`` answered."""
        return {
            "connections": self.connections,
            "accepted": self.accepted,
            "refused": self.refused,
            "requests": self.requests,
            "controls": self.controls,
        }

    def close(self) -> None:
        """Stop accepting and drop every open connection (idempotent)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            open_now = list(self._open)
        for listener in (self._listener, self._unix):
            if listener is None:
                continue
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept() (Linux)
            with contextlib.suppress(OSError):
                listener.close()
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            if self._own_directory:
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(self.path))
        for sock in open_now:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)


def serve(
    host: str, secret: bytes, handler: Handler, port: int = 0, unix: bool | str = False
) -> WireServer:
    """Start a :class:`WireServer` on ``host`` (an ephemeral port unless ``port`` is given; and a
    Unix socket if ``unix``: at that path, or in a new private directory if True)."""
    return WireServer(host, secret, handler, port, unix)


# -- a client connection ------------------------------------------------------------------------
class ShardConnection:
    """One authenticated, blocking connection to a shard (not thread-safe: one caller at a time).

    ``address``: ``(host, port)``, or the path of the shard's Unix socket. ``call(packed, lane,
    resume)`` is ``ShardActor.run`` over the socket: it sends the packed batch
    and returns the packed results. Any :class:`WireError` or ``OSError`` leaves the connection
    closed; open a new one (the shard may have moved or restarted: ask the router).
    """

    def __init__(
        self, address: tuple[str, int] | str, secret: bytes, timeout: float | None = 30.0
    ) -> None:
        if not isinstance(secret, bytes) or not secret:
            raise AuthenticationError("the cluster secret is non-empty bytes")
        self.address: tuple[str, int] | str
        if isinstance(address, str):  # a Unix socket's path
            self.address = address
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                self.sock.settimeout(timeout)
                self.sock.connect(address)
            except BaseException:
                self.sock.close()
                raise
        else:
            self.address = (address[0], int(address[1]))
            self.sock = socket.create_connection(self.address, timeout=timeout)
        try:
            if self.sock.family != getattr(socket, "AF_UNIX", None):
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client_handshake(self.sock, secret)
        except BaseException:
            self.sock.close()
            raise

    def call(self, packed: bytes, lane: str | None = None, resume: bool = False) -> bytes:
        """Send one packed batch and return the shard's packed results."""
        self.send(packed, lane, resume)
        return self.receive()

    def send(self, packed: bytes, lane: str | None = None, resume: bool = False) -> None:
        """Send one packed batch (its answer is the next :meth:`receive`)."""
        try:
            write_frame(self.sock, pack_request(packed, lane, resume))
        except BaseException:
            self.close()
            raise

    def control(self, body: bytes) -> bytes:
        """Send one control message and return its answer."""
        try:
            write_frame(self.sock, pack_control(body))
        except BaseException:
            self.close()
            raise
        return self.receive()

    def receive(self) -> bytes:
        """The packed results of the oldest batch sent and not yet received."""
        try:
            return read_frame(self.sock)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self.sock.close()

    def __enter__(self) -> ShardConnection:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def private_socket_path(name: str) -> str | bool:
    """Where a process of this user keeps a Unix socket called ``name``: in
    ``<tmp>/shardstate-<uid>/`` (made with mode 0700, and used only if this user owns it and nobody
    else can enter). True (a new private directory) if that directory cannot be trusted."""
    base = os.path.join(tempfile.gettempdir(), f"shardstate-{os.getuid()}")
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
        info = os.lstat(base)
    except OSError:
        return True
    if not os.path.isdir(base) or os.path.islink(base) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        return True
    return os.path.join(base, name)
