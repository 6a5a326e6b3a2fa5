"""``watch()``: live events pushed by the shards over their own connections (a follow stream each).

A watcher opens one follow stream per shard it follows (the shard that owns its group, or every
shard), on the shard's authenticated connection (:mod:`shardstate.shards.wire`); the shard pushes
the events it commits from then on, right after each commit (see
:mod:`shardstate.shards.followers`). The first frame names the seq the stream starts after: that is
the watcher's starting point, taken before ``watch()`` returns.

A frame the shard had to drop (the watcher fell behind by more than the shard buffers for it), a
stream that broke (the shard restarted: it is opened again) or a value the watcher cannot
reconstruct is filled in from the shard's in-memory log (a Ray call), so a watcher sees every event
of its shards in order, as long as the shard still keeps it (the last 10,000 acknowledged events).
A shard whose connection cannot be reached (``transport="ray"`` clients, another node's port
closed) is polled instead, as before.

:class:`ShardFollow` is the per-shard bookkeeping without I/O; :class:`SyncWatcher` drives it with
blocking sockets and a selector, :class:`AsyncWatcher` with asyncio streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import time
from collections.abc import AsyncGenerator, Generator, Iterable
from typing import TYPE_CHECKING, Any

import ray

from shardstate._errors import StateError
from shardstate._models import StateEvent
from shardstate.cluster.delivery import to_state_event
from shardstate.cluster.slots import slot_of
from shardstate.shards.event_forms import Resolver, Unresolved
from shardstate.shards.followers import SYSTEM_PREFIX, WATCHER, FollowSpec, frame_of, stream_target
from shardstate.shards.records import Event
from shardstate.shards.wire import (
    ShardConnection,
    WireError,
    client_handshake_async,
    pack_follow,
    read_frame,
    read_frame_async,
    write_frame,
    write_frame_async,
)

if TYPE_CHECKING:
    from shardstate._client import ClusterLink

#: events read from a shard's log per call (gaps, polling)
LOG_BATCH = 1000
#: seconds between attempts to open a broken stream again
REOPEN_EVERY = 0.2
#: seconds a watcher waits for a shard's address or stream
OPEN_TIMEOUT = 10.0


class LogUnavailable(Exception):
    """A shard's log could not be read (it restarts, or is no longer its shard's primary)."""


class ShardFollow:
    """What a watcher has taken from one shard: everything up to ``mark`` is accounted for.

    Frames and log reads go through here; it yields the wanted events (``group_id``, or every user
    group) once each, in seq order, and says when the log must be read to fill a gap.
    """

    def __init__(self, cluster: str, shard: int, group_id: str | None) -> None:
        self.cluster = cluster
        self.shard = shard
        self.group_id = group_id
        self.mark: int | None = None
        self.resolver = Resolver()

    def wants(self, event: Event) -> bool:
        """Whether the watcher is given ``event``."""
        if self.group_id is not None:
            return event.group_id == self.group_id
        return not event.group_id.startswith(SYSTEM_PREFIX)

    def start(self, head: int) -> int | None:
        """The stream (re)opened after ``head``: returns the seq the log must be read up to (the
        events between the watcher's mark and ``head``), or None. A first start sets the mark."""
        if self.mark is None:
            self.mark = head
            return None
        return head if head > self.mark else None

    def gap_before(self, after: int, last: int, events: list[Event]) -> int | None:
        """A frame ``(after, last, events)``: the seq the log must be read up to first (what the
        shard dropped before it), or None."""
        assert self.mark is not None
        if after == self.mark:
            return None
        upto = events[0].seq - 1 if events else last
        return upto if upto > self.mark else None

    def take_frame(self, last: int, events: list[Event]) -> tuple[list[StateEvent], int | None]:
        """The wanted events of a frame; and, if one of its values cannot be reconstructed here,
        the seq the log must be read up to for the rest of it (else None)."""
        assert self.mark is not None
        out: list[StateEvent] = []
        for event in events:
            if event.seq <= self.mark:
                continue
            try:
                full = self.resolver.resolve(event)
            except Unresolved:
                return out, last
            self.mark = event.seq
            if self.wants(full):
                out.append(to_state_event(self.cluster, self.shard, full))
        self.mark = max(self.mark, last)
        return out, None

    def take_log(self, events: list[Event], upto: int | None) -> tuple[list[StateEvent], bool]:
        """The wanted events of a log read (full form) up to ``upto`` (None: all); and whether
        the gap is filled (the read reached ``upto``, or the log has nothing more)."""
        assert self.mark is not None
        out: list[StateEvent] = []
        for event in events:
            if upto is not None and event.seq > upto:
                self.mark = max(self.mark, upto)
                return out, True
            if event.seq <= self.mark:
                continue
            self.mark = event.seq
            self.resolver.remember((event.group_id, event.key), event.seq, event.new)
            if self.wants(event):
                out.append(to_state_event(self.cluster, self.shard, event))
        if not events:
            if upto is not None:
                self.mark = max(self.mark, upto)
            return out, True
        return out, upto is not None and self.mark >= upto


class _Shard:
    """One followed shard in a sync watcher: its stream (or polling), and its bookkeeping."""

    def __init__(self, follow: ShardFollow, handle: Any) -> None:
        self.follow = follow
        self.handle = handle
        self.conn: ShardConnection | None = None
        self.polling = False
        self.reopen_at = 0.0
        self.poll_at = 0.0


class SyncWatcher:
    """Follows shards' events for one ``watch()`` call with blocking sockets (see module docstring)."""

    def __init__(self, link: ClusterLink, group_id: str | None, shards: Iterable[int], poll: float) -> None:
        self.link = link
        self.group_id = group_id
        self.poll = poll
        self.spec = FollowSpec(WATCHER, group_id).to_bytes()
        self.selector = selectors.DefaultSelector()
        view = link.current()
        self.shards = [_Shard(ShardFollow(link.cluster, s, group_id), view.shards[s]) for s in shards]
        #: the cluster's secret (None: a ``transport="ray"`` client polls instead)
        self.secret: bytes | None = link.secret
        #: gaps to fill from the log before the next frame: (shard, up to seq)
        self._pending_fill: list[tuple[_Shard, int]] = []
        try:
            for shard in self.shards:  # the starting point of each shard, before watch() returns
                if not self._open(shard):
                    shard.polling = True
                    head = ray.get(shard.handle.event_state.remote(), timeout=link.timeout)[0]
                    shard.follow.start(head)
        except BaseException:
            self.close()
            raise

    def _open(self, shard: _Shard) -> bool:
        """Open the shard's stream; False if it has none or it cannot be reached."""
        if self.secret is None:
            return False
        try:
            found = ray.get(shard.handle.endpoint.remote(), timeout=OPEN_TIMEOUT)
            target = stream_target(found, self.link.my_ip)
            if target is None:
                return False
            conn = ShardConnection(target, self.secret, timeout=OPEN_TIMEOUT)
        except Exception:
            return False
        try:
            write_frame(conn.sock, pack_follow(self.spec))
            kind, head, index = frame_of(read_frame(conn.sock))
            if kind != "ready" or index != shard.follow.shard:  # another shard's port (another node's)
                raise ConnectionError(f"not shard {shard.follow.shard}'s stream")
        except Exception:
            conn.close()
            return False
        conn.sock.settimeout(30.0)  # a frame that has begun arrives whole
        shard.conn = conn
        self.selector.register(conn.sock, selectors.EVENT_READ, shard)
        upto = shard.follow.start(head)
        if upto is not None:
            self._pending_fill.append((shard, upto))
        return True

    def _handle(self, shard: _Shard) -> Any:
        """The shard's handle in the router's current map (a failover names another member)."""
        try:
            return self.link.refresh().shards[shard.follow.shard]
        except StateError:
            return shard.handle

    def _broken(self, shard: _Shard) -> None:
        if shard.conn is not None:
            self.selector.unregister(shard.conn.sock)
            shard.conn.close()
            shard.conn = None
        shard.reopen_at = time.monotonic() + REOPEN_EVERY

    def _log(self, shard: _Shard, upto: int | None) -> Generator[StateEvent, None, None]:
        """Read the shard's log from the mark (up to ``upto``; None: what there is now)."""
        while True:
            self.link.check_open()
            try:
                ref = shard.handle.events_since.remote(shard.follow.mark, LOG_BATCH, True)
                events = ray.get(ref, timeout=self.link.timeout)
            except ray.exceptions.RayError:  # restarting, or no longer the primary: reopen later
                if not shard.polling:
                    self._broken(shard)  # the reopened stream says again what to read
                return
            out, done = shard.follow.take_log(events, upto)
            yield from out
            if done or upto is None and len(events) < LOG_BATCH:
                return

    def _frame(self, shard: _Shard) -> Generator[StateEvent, None, None]:
        assert shard.conn is not None
        try:
            frame = frame_of(read_frame(shard.conn.sock))
        except (WireError, OSError, ValueError):
            self._broken(shard)
            return
        _kind, after, last, events = frame
        upto = shard.follow.gap_before(after, last, events)
        if upto is not None:
            yield from self._log(shard, upto)
            if shard.conn is None:  # the gap could not be read: the reopened stream fills it
                return
        out, rest = shard.follow.take_frame(last, events)
        yield from out
        if rest is not None:
            yield from self._log(shard, rest)

    def events(self, deadline: float | None) -> Generator[StateEvent, None, None]:
        """The events, until ``deadline`` (monotonic; None: until closed)."""
        try:
            for shard, upto in self._pending_fill:
                yield from self._log(shard, upto)
            self._pending_fill = []
            while deadline is None or time.monotonic() < deadline:
                self.link.check_open()
                now = time.monotonic()
                wait = 1.0 if deadline is None else max(0.0, min(1.0, deadline - now))
                for shard in self.shards:
                    if shard.polling:
                        wait = min(wait, max(0.0, shard.poll_at - now))
                    elif shard.conn is None:
                        wait = min(wait, max(0.0, shard.reopen_at - now))
                ready = self.selector.select(wait) if self.selector.get_map() else _sleep(wait)
                for key, _mask in ready:
                    yield from self._frame(key.data)
                now = time.monotonic()
                for shard in self.shards:
                    if shard.polling and now >= shard.poll_at:
                        shard.poll_at = now + self.poll
                        yield from self._log(shard, None)
                    elif not shard.polling and shard.conn is None and now >= shard.reopen_at:
                        shard.handle = self._handle(shard)  # the primary may have changed
                        if self._open(shard):
                            for pending, upto in self._pending_fill:
                                yield from self._log(pending, upto)
                            self._pending_fill = []
                        else:
                            shard.reopen_at = now + REOPEN_EVERY
        finally:
            self.close()

    def close(self) -> None:
        """Close every stream."""
        for shard in self.shards:
            if shard.conn is not None:
                shard.conn.close()
                shard.conn = None
        self.selector.close()


def _sleep(seconds: float) -> list[Any]:
    time.sleep(seconds)
    return []


def follow_events(
    link: ClusterLink, group_id: str | None, shards: list[int], poll: float, timeout: float | None
) -> Generator[StateEvent, None, None]:
    """Start following now (streams opened, starting points taken); return the events' iterator."""
    watcher = SyncWatcher(link, group_id, shards, poll)
    deadline = None if timeout is None else time.monotonic() + timeout
    return watcher.events(deadline)



# -- asyncio -----------------------------------------------------------------------------------------
#: events an async watcher holds for its consumer; past that its shards' streams wait (and the
#: shards drop frames, read back from their logs later)
ASYNC_QUEUE = 10_000
#: an open stream: (reader, writer, the seq its log must be read up to first, or None)
_Stream = tuple[Any, Any, "int | None"]


class AsyncWatcher:
    """Follows shards' events for one async ``watch()`` with asyncio streams: a task per shard
    (frames, gap fills and reconnections in order), all feeding one bounded queue."""

    def __init__(
        self, link: ClusterLink, group_id: str | None, poll: float, marks: dict[int, int] | None = None
    ) -> None:
        self.link = link
        self.group_id = group_id
        self.poll = poll
        #: shard -> the seq to resume after (events already seen); other shards start from now
        self.marks = marks or {}
        #: shard -> where the watcher started following it (set by :meth:`start`)
        self.starts: dict[int, int] = {}
        self.spec = FollowSpec(WATCHER, group_id).to_bytes()
        self.queue: asyncio.Queue[StateEvent] = asyncio.Queue(ASYNC_QUEUE)
        self.tasks: list[asyncio.Task[None]] = []
        self.secret: bytes | None = None

    async def start(self) -> None:
        """Open every stream (or take a polled shard's head): the starting point."""
        link = self.link
        view = await link.current_async()
        group = self.group_id
        shards = [view.owners[slot_of(group)]] if group is not None else list(range(len(view.shards)))
        self.secret = link.secret
        for index in shards:
            follow, handle = ShardFollow(link.cluster, index, self.group_id), view.shards[index]
            follow.mark = self.marks.get(index)
            stream = await self._open(follow, handle)
            if stream is None:
                head = (await asyncio.wait_for(handle.event_state.remote(), link.timeout))[0]
                follow.start(head)
            if follow.mark is not None:
                self.starts[index] = follow.mark
            self.tasks.append(asyncio.get_running_loop().create_task(self._run(follow, handle, stream)))

    async def _open(self, follow: ShardFollow, handle: Any) -> _Stream | None:
        """``(reader, writer, seq the log must be read up to first)``, or None (poll instead)."""
        if self.secret is None:
            return None
        writer = None
        try:
            found = await asyncio.wait_for(handle.endpoint.remote(), OPEN_TIMEOUT)
            target = stream_target(found, self.link.my_ip)
            if target is None:
                return None
            if isinstance(target, str):
                opening = asyncio.open_unix_connection(target, limit=1 << 20)
            else:
                opening = asyncio.open_connection(target[0], target[1], limit=1 << 20)
            reader, writer = await asyncio.wait_for(opening, OPEN_TIMEOUT)
            await asyncio.wait_for(client_handshake_async(reader, writer, self.secret), OPEN_TIMEOUT)
            await write_frame_async(writer, pack_follow(self.spec))
            kind, head, index = frame_of(await asyncio.wait_for(read_frame_async(reader), OPEN_TIMEOUT))
            if kind != "ready" or index != follow.shard:
                raise ConnectionError(f"not shard {follow.shard}'s stream")
        except Exception:
            if writer is not None:
                writer.close()
            return None
        return reader, writer, follow.start(head)

    async def _log(self, follow: ShardFollow, handle: Any, upto: int | None) -> None:
        """Read the shard's log from the mark (up to ``upto``; None: what there is now).
        :class:`LogUnavailable` if the shard cannot answer (restarting, or no longer the primary)."""
        while True:
            self.link.check_open()
            try:
                ref = handle.events_since.remote(follow.mark, LOG_BATCH, True)
                events = await asyncio.wait_for(ref, self.link.timeout)
            except (ray.exceptions.RayError, asyncio.TimeoutError) as exc:
                raise LogUnavailable(str(exc)) from exc
            out, done = follow.take_log(events, upto)
            for event in out:
                await self.queue.put(event)
            if done or upto is None and len(events) < LOG_BATCH:
                return

    async def _run(self, follow: ShardFollow, handle: Any, stream: _Stream | None) -> None:
        """One shard: its frames in order, its gaps filled, its stream opened again when it breaks."""
        while True:
            if stream is None:  # polled (no stream to be had), or broken: try again after a while
                await asyncio.sleep(self.poll if self.secret is None else REOPEN_EVERY)
                handle = await self._handle(follow.shard, handle)  # the primary may have changed
                if self.secret is None:
                    with contextlib.suppress(LogUnavailable):
                        await self._log(follow, handle, None)
                    continue
                stream = await self._open(follow, handle)
                continue
            reader, writer, upto = stream
            try:
                if upto is not None:
                    await self._log(follow, handle, upto)
                while True:
                    _kind, after, last, events = frame_of(await read_frame_async(reader))
                    gap = follow.gap_before(after, last, events)
                    if gap is not None:
                        await self._log(follow, handle, gap)
                    out, rest = follow.take_frame(last, events)
                    for event in out:
                        await self.queue.put(event)
                    if rest is not None:
                        await self._log(follow, handle, rest)
            except (WireError, OSError, ValueError, asyncio.IncompleteReadError, LogUnavailable):
                writer.close()
                stream = None

    async def _handle(self, shard: int, handle: Any) -> Any:
        """The shard's handle in the router's current map (a failover names another member)."""
        try:
            return (await self.link.refresh_async()).shards[shard]
        except StateError:
            return handle

    async def close(self) -> None:
        """Stop every shard's task and close its stream."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def follow_events_async(
    link: ClusterLink,
    group_id: str | None,
    poll: float,
    timeout: float | None,
    marks: dict[int, int] | None = None,
) -> AsyncGenerator[StateEvent, None]:
    """:func:`follow_events` for asyncio (the shard of ``group_id``, or every shard): the starting
    point is taken when iteration starts, except for the shards in ``marks`` (shard -> seq), which
    resume after that seq (as far back as the shard still keeps its events)."""
    watcher = AsyncWatcher(link, group_id, poll, marks)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        await watcher.start()
        while True:
            link.check_open()
            wait = 1.0 if deadline is None else deadline - time.monotonic()
            if wait <= 0:
                return
            try:
                event = await asyncio.wait_for(watcher.queue.get(), min(wait, 1.0))
            except asyncio.TimeoutError:
                continue
            yield event
    finally:
        await watcher.close()
