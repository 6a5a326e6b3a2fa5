"""Coalescing: concurrent calls from one process to the same shard travel in one batch.

Each shard has a *lane* per process (threads) or per event loop (asyncio). A call that finds its lane
idle goes out at once, alone: no timer, so a lone call is as fast as it can be. Calls that arrive
while the lane is busy queue up and leave together, as one batch. The shard executes a batch in
order and answers each command separately, so results and errors reach each caller individually.

- Threads (:class:`SyncLanes`): one batch in flight per lane; the caller that finds the lane idle
  sends, the others wait for their answer or their turn to send the next batch.
- Asyncio (:class:`AsyncLanes`): up to :data:`MAX_IN_FLIGHT` batches in flight per lane, so the shard
  executes one batch while the client decodes the previous one and its callers queue the next:
  client and shard work at the same time instead of taking turns. A lane's batches travel in send
  order (one connection per shard and loop answers in order; Ray runs one caller's calls to a sync
  actor in submission order), so they execute in the order they were sent.

What happens to a batch once sent (retries, redirects, deferrals, decoding) is the client core's
:func:`shardstate._core.exchange`, the same for both kinds of lane and for bulk calls.
"""

from __future__ import annotations

import asyncio
import collections
import secrets
import threading
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from shardstate._core import Slot, deliver, exchange, packed_batch, run_async, run_sync
from shardstate._errors import StateError
from shardstate._wireformat import fits, request_sizes

if TYPE_CHECKING:
    from shardstate._link import ClusterLink
    from shardstate._requests import Request

#: batches one asyncio lane keeps in flight to its shard
MAX_IN_FLIGHT = 3
#: most commands per batch; a long queue is split so that every free in-flight place gets a part
MAX_BATCH = 2048
#: ... but parts are not made smaller than this
MIN_PART = 64


class _Waiter(Slot):
    """A thread's slot: an event to wait on for its answer (or for its turn to send); made only
    for a caller that has to wait (one that finds its lane idle sends at once)."""

    __slots__ = ("event",)

    def __init__(self, req: Request) -> None:
        super().__init__(req)
        self.event: threading.Event | None = None


class SyncLanes:
    """Per-shard lanes for threads. The caller that finds a lane idle sends the batch itself."""

    def __init__(self, link: ClusterLink) -> None:
        self.link = link
        self.lock = threading.Lock()
        self.queues: dict[int, list[_Waiter]] = {}
        self.busy: set[int] = set()

    def call(self, shard: int, req: Request) -> Any:
        """``req``'s decoded value (or its error), sent in a batch with concurrent calls."""
        slot = _Waiter(req)
        with self.lock:
            self.queues.setdefault(shard, []).append(slot)
            lead = shard not in self.busy
            if lead:
                self.busy.add(shard)
            else:
                slot.event = event = threading.Event()
        if not lead:
            event.wait()
            if slot.done:
                return slot.result()
        # this thread leads: send one batch (its own call is in it), then pass the lane on
        with self.lock:
            batch, self.queues[shard] = self.queues[shard], []
        try:
            run_sync(self.link, deliver(self.link, shard, list(batch)))
        finally:
            for s in batch:
                if not s.done:  # only on a bug: never leave a caller hanging
                    s.settle(False, StateError("internal error while sending a batch"))
                if s is not slot and s.event is not None:
                    s.event.set()
            with self.lock:
                waiting = self.queues.get(shard)
                if waiting:
                    assert waiting[0].event is not None  # it queued while the lane was busy
                    waiting[0].event.set()  # the next waiter sends the next batch
                else:
                    self.busy.discard(shard)
        return slot.result()


_Call = tuple[Slot, "asyncio.Future[Any]"]


class _Lane:
    """One shard's queue and in-flight batches on one event loop."""

    __slots__ = (
        "shard", "queue", "in_flight", "receiver", "flush_due", "name", "fenced", "held", "resume", "retrying"
    )

    def __init__(self, shard: int) -> None:
        self.shard = shard
        #: this lane's name for the shard: after deferring part of a batch the shard defers the
        #: lane's later batches too (they are already on their way) until the rest comes back
        #: with ``resume``, so a deferral never lets a caller's later call overtake an earlier one
        self.name = secrets.token_hex(8)
        self.fenced = False
        self.held: list[_Call] = []
        self.resume = False
        #: the oldest batch is being sent again (its shard went away): nothing new leaves meanwhile,
        #: and the batches behind it are sent again after it, in order
        self.retrying = False
        self.queue: list[_Call] = []
        #: sent batches in send order: (calls, packed commands, what ``link.receive`` awaits)
        self.in_flight: collections.deque[tuple[list[_Call], bytes, Any]] = collections.deque()
        self.receiver: asyncio.Task[None] | None = None
        self.flush_due = False


class AsyncLanes:
    """Per-shard lanes for one event loop, each with up to :data:`MAX_IN_FLIGHT` batches in flight.

    A call queues itself and, if its lane has room, schedules a flush with ``call_soon``: the flush
    runs once every caller that was ready on this turn of the loop has queued, so they all leave in
    one batch. One receiver task per lane awaits the lane's batches in send order and hands out the
    results; each answer frees a place, and what queued meanwhile is sent at once.
    """

    def __init__(self, link: ClusterLink) -> None:
        self.link = link
        self.lanes: dict[int, _Lane] = {}

    async def call(self, shard: int, req: Request) -> Any:
        """``req``'s decoded value (or its error), sent in a batch with concurrent calls."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        lane = self.lanes.get(shard)
        if lane is None:
            lane = self.lanes[shard] = _Lane(shard)
        lane.queue.append((Slot(req), fut))
        if not lane.flush_due and len(lane.in_flight) < MAX_IN_FLIGHT:
            lane.flush_due = True
            loop.call_soon(self._flush, lane)
        return await fut

    def _flush(self, lane: _Lane) -> None:
        """Send what is queued, split over the free in-flight places."""
        lane.flush_due = False
        if lane.fenced or lane.retrying:  # nothing leaves until the earlier calls went again
            return
        link = self.link
        view = link.view
        while lane.queue and len(lane.in_flight) < MAX_IN_FLIGHT:
            if view is None or link.closed:  # a receiver refreshes the map, or fails the calls
                break
            free = MAX_IN_FLIGHT - len(lane.in_flight)
            size = min(MAX_BATCH, max(MIN_PART, -(-len(lane.queue) // free)))
            size = fits(request_sizes(slot.req for slot, _ in lane.queue[:size]))
            batch, lane.queue = lane.queue[:size], lane.queue[size:]
            batch, packed = _packed(batch)
            if not batch:
                continue
            try:
                pending: Any = link.submit(lane.shard, packed, lane.name, lane.resume)
            except StateError as exc:
                pending = exc  # the receiver settles the batch with it
            lane.resume = False
            lane.in_flight.append((batch, packed, pending))
        if lane.receiver is None and (lane.in_flight or lane.queue):
            lane.receiver = asyncio.get_running_loop().create_task(self._receive(lane))

    async def _receive(self, lane: _Lane) -> None:
        link = self.link

        def hold() -> None:
            lane.retrying = True

        try:
            while lane.in_flight or lane.queue:
                if not lane.in_flight:  # queued calls that _flush could not send (no map yet)
                    await self._prepare(lane)
                    self._flush(lane)
                    continue
                batch, packed, pending = lane.in_flight[0]
                slots = [slot for slot, _ in batch]
                proc = exchange(link, lane.shard, slots, packed, lane.name, first=pending, on_retry=hold)
                deferred = await run_async(link, proc)
                lane.in_flight.popleft()
                if lane.retrying:  # the batches behind it went with the old connection: again, in order
                    lane.in_flight = collections.deque(
                        (b, p, _resubmit(link, lane.shard, p, lane.name)) for b, p, _ in lane.in_flight
                    )
                    lane.retrying = False
                if deferred:  # the shard fenced this lane: what follows comes back deferred too
                    lane.fenced = True
                    lane.held.extend(batch[len(batch) - len(deferred) :])
                for slot, fut in batch:
                    if slot.done and not fut.done():
                        if slot.ok:
                            fut.set_result(slot.value)
                        else:
                            fut.set_exception(slot.value)
                if lane.fenced and not lane.in_flight:  # every deferred call is back: resend, in order
                    lane.queue = lane.held + lane.queue
                    lane.held = []
                    lane.fenced = False
                    lane.resume = True
                if lane.queue and not lane.flush_due:
                    self._flush(lane)
        except BaseException as exc:  # cancelled with its loop, or a bug: never leave a caller hanging
            error = exc if isinstance(exc, StateError) else StateError(f"internal error: {exc!r}")
            for batch, _, _ in lane.in_flight:
                _resolve_all(batch, error)
            _resolve_all(lane.queue, error)
            _resolve_all(lane.held, error)
            lane.in_flight.clear()
            lane.queue.clear()
            lane.held.clear()
            lane.fenced = lane.retrying = False
            raise
        finally:
            lane.receiver = None

    async def _prepare(self, lane: _Lane) -> None:
        """Before a first send: fetch the map; on a closed link, fail what is queued."""
        link = self.link
        try:
            link.check_open()
            await link.current_async()
        except StateError as exc:
            _resolve_all(lane.queue, exc)
            lane.queue.clear()


def _resubmit(link: ClusterLink, shard: int, packed: bytes, lane: str) -> Any:
    try:
        return link.submit(shard, packed, lane, False)
    except StateError as exc:
        return exc


def _packed(calls: list[_Call]) -> tuple[list[_Call], bytes]:
    """``(the calls whose command can be pickled, their packed batch)``; the others fail with
    :class:`InvalidInput`."""
    kept, packed = packed_batch([slot for slot, _ in calls])
    if len(kept) == len(calls):
        return calls, packed
    out = []
    for slot, fut in calls:
        if slot.done:
            fut.set_exception(slot.value)
        else:
            out.append((slot, fut))
    return out, packed


def _resolve_all(calls: Sequence[_Call], error: BaseException) -> None:
    for _, fut in calls:
        if not fut.done():
            fut.set_exception(error)


_async_lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, AsyncLanes]] = (
    weakref.WeakKeyDictionary()
)


def sync_lanes(link: ClusterLink) -> SyncLanes:
    """The thread lanes of ``link`` (made on first use)."""
    lanes = link.lanes
    if lanes is None:
        with link._lock:
            lanes = link.lanes
            if lanes is None:
                lanes = link.lanes = SyncLanes(link)
    return lanes  # type: ignore[no-any-return]


def async_lanes(link: ClusterLink) -> AsyncLanes:
    """The lanes of ``link`` on the running event loop (the last loop's are cached on the link)."""
    loop = asyncio.get_running_loop()
    cached = link.async_lanes
    if cached is not None and cached[0]() is loop:
        return cached[1]  # type: ignore[no-any-return]
    per_loop = _async_lanes.setdefault(loop, {})
    lanes = per_loop.get(id(link))
    if lanes is None:
        lanes = per_loop[id(link)] = AsyncLanes(link)
    link.async_lanes = (weakref.ref(loop), lanes)
    return lanes
