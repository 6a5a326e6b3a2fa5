"""Coalescing: concurrent calls from one process to the same shard travel in one actor call.

Each shard has a *lane* per process (threads) or per event loop (asyncio). A call that finds its lane
idle goes out at once, alone: no timer, so a lone call is as fast as before. Calls that arrive while
the lane is busy queue up and leave together, as one batch. The shard executes a batch in order and
answers each command separately, so results and errors reach each caller individually.

- Threads (:class:`SyncLanes`): one batch in flight per lane; the caller that finds the lane idle
  sends, the others wait for their answer or their turn to send the next batch.
- Asyncio (:class:`AsyncLanes`): up to :data:`MAX_IN_FLIGHT` batches in flight per lane, so the shard
  executes one batch while the client decodes the previous one and its callers queue the next:
  client and shard work at the same time instead of taking turns. Ray runs one caller's calls to a
  sync actor in submission order, so a lane's batches execute in the order they were sent.

Batches travel packed (:func:`pack`/:func:`unpack`): one ``pickle`` of the command list each way,
about half the cost of Ray serializing the list object by object.

A batch that fails because its shard died is retried whole, in order (writes carry op_ids, so nothing
applies twice); a command answered "stale shard map" is re-sent on its own after the map is refreshed.
"""

from __future__ import annotations

import asyncio
import collections
import pickle
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import cloudpickle
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from shardstate._errors import Deferred, InvalidInput, ShardLoading, StaleShardMap, StateError
from shardstate._requests import decode_payload, request_bytes
from shardstate._retry import Backoff

if TYPE_CHECKING:
    from shardstate._client import ClusterLink
    from shardstate._requests import Request

#: batches one asyncio lane keeps in flight to its shard
MAX_IN_FLIGHT = 3
#: most commands per batch; a long queue is split so that every free in-flight place gets a part
MAX_BATCH = 2048
#: ... but parts are not made smaller than this
MIN_PART = 64
#: a batch carries at most about this many bytes of values (a larger queue leaves in several)
MAX_BATCH_BYTES = 32 * 1024 * 1024


def fits(sizes: Sequence[int], limit: int = MAX_BATCH_BYTES) -> int:
    """How many of the first calls (of these request sizes) go in one batch: at least one."""
    total = 0
    for count, size in enumerate(sizes):
        total += size
        if total > limit and count > 0:
            return count
    return len(sizes)


def pack(cmds: Sequence[Any]) -> bytes:
    """A batch of commands as the bytes ``ShardActor.run`` takes.

    Plain ``pickle`` (fast); ``cloudpickle`` for what only it can pickle (a class defined in a
    function, say), as Ray itself would. Commands hold only checked, JSON-like values and bytes.
    """
    try:
        return pickle.dumps(cmds, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        try:
            return cloudpickle.dumps(cmds, protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return]
        except Exception as exc:
            raise InvalidInput(f"the call could not be pickled: {type(exc).__name__}: {exc}") from None


def unpack(packed: bytes) -> list[tuple[bool, Any]]:
    """The results ``ShardActor.run`` answered."""
    return pickle.loads(packed)  # type: ignore[no-any-return]


class Slot:
    """One queued call: its request, and (once answered) its value or error."""

    __slots__ = ("req", "done", "ok", "value")

    def __init__(self, req: Request) -> None:
        self.req = req
        self.done = False
        self.ok = False
        self.value: Any = None

    def result(self) -> Any:
        if self.ok:
            return self.value
        raise self.value


def settle(
    slots: Sequence[Slot], results: Sequence[tuple[bool, Any]], redo: Callable[[Request], Any]
) -> None:
    """Give each slot its own decoded value or error; commands the shard did not run (it no longer
    owns the group, or it is still loading) go to ``redo``.

    If the shard could not take the batch as a whole (it answered one error for many commands, e.g.
    a value it cannot unpickle), each command is sent again on its own, so only the bad one fails.
    Every slot gets its own outcome: a value this process cannot decode fails that call alone
    (:class:`DecodeError`), and the others (committed writes among them) report success.
    """
    if len(results) != len(slots):
        for slot in slots:
            _outcome(slot, redo, None)
        return
    for slot, result in zip(slots, results, strict=True):
        _outcome(slot, redo, result)


def _outcome(slot: Slot, redo: Callable[[Request], Any], result: tuple[bool, Any] | None) -> None:
    """Settle one slot from its result (None: send it again on its own)."""
    try:
        if result is None:
            slot.value, slot.ok = redo(slot.req), True
        elif result[0]:
            slot.value, slot.ok = decode_payload(slot.req, result[1]), True
        elif isinstance(result[1], (StaleShardMap, ShardLoading, Deferred)):
            slot.value, slot.ok = redo(slot.req), True
        elif isinstance(result[1], StateError):
            slot.value, slot.ok = result[1], False
        else:
            slot.value, slot.ok = StateError(f"shard returned a malformed result: {result[1]!r}"), False
    except StateError as exc:
        slot.value, slot.ok = exc, False
    except Exception as exc:  # a bug must not leave this call (or another caller's) without an answer
        slot.value, slot.ok = StateError(f"internal error: {type(exc).__name__}: {exc}"), False
    slot.done = True


class _Waiter(Slot):
    """A thread's slot: an event to wait on for its answer (or for its turn to send)."""

    __slots__ = ("event",)

    def __init__(self, req: Request) -> None:
        super().__init__(req)
        self.event = threading.Event()


class SyncLanes:
    """Per-shard lanes for threads. The caller that finds a lane idle sends the batch itself."""

    def __init__(self, link: ClusterLink) -> None:
        self.link = link
        self.lock = threading.Lock()
        self.queues: dict[int, list[_Waiter]] = {}
        self.busy: set[int] = set()

    def call(self, shard: int, req: Request, redo: Callable[[Request], Any]) -> Any:
        slot = _Waiter(req)
        with self.lock:
            self.queues.setdefault(shard, []).append(slot)
            lead = shard not in self.busy
            self.busy.add(shard)
        if not lead:
            slot.event.wait()
            if slot.done:
                return slot.result()
        # this thread leads: send one batch (its own call is in it), then pass the lane on
        with self.lock:
            batch, self.queues[shard] = self.queues[shard], []
        try:
            self._send(shard, batch, redo)
        finally:
            for s in batch:
                if not s.done:  # only on a bug in _send: never leave a caller hanging
                    s.value, s.ok, s.done = StateError("internal error while sending a batch"), False, True
                if s is not slot:
                    s.event.set()
            with self.lock:
                waiting = self.queues.get(shard)
                if waiting:
                    waiting[0].event.set()  # the next waiter sends the next batch
                else:
                    self.busy.discard(shard)
        return slot.result()

    def _send(self, shard: int, batch: Sequence[Slot], redo: Callable[[Request], Any]) -> None:
        """Send the queued calls, in batches of at most :data:`MAX_BATCH_BYTES`, one after another."""
        while batch:
            count = fits([request_bytes(s.req) for s in batch])
            self._send_one(shard, batch[:count], redo)
            batch = batch[count:]

    def _send_one(self, shard: int, batch: Sequence[Slot], redo: Callable[[Request], Any]) -> None:
        link = self.link
        try:
            packed = pack([s.req.cmd for s in batch])
        except InvalidInput:  # an operand nothing can pickle: fail that call, send the others
            batch = [s for s in batch if _packs(s)]
            if not batch:
                return
            packed = pack([s.req.cmd for s in batch])
        backoff: Backoff | None = None
        while True:
            handle = link.current().shards[shard]
            try:
                results = unpack(ray.get(handle.run.remote(packed), timeout=link.timeout))
            except RayActorError as exc:  # the shard died mid-call: it restarts from storage
                backoff = backoff or Backoff(link)
                try:
                    time.sleep(backoff.next_delay(exc))
                except StateError as err:
                    _fail(batch, err)
                    return
                continue
            except (RayError, GetTimeoutError) as exc:
                _fail(batch, link.unavailable(exc))
                return
            cut = _deferred_from(results, len(batch))
            settle(batch[:cut], results[:cut], redo)
            if cut == len(batch):
                link.loading_since.pop(shard, None)
                return
            if isinstance(results[cut][1], ShardLoading):
                try:
                    time.sleep(link.wait_for_load(shard, results[cut][1]))
                except StateError as err:
                    _fail(batch[cut:], err)
                    return
            # the answer grew large: the shard ran a head of the batch; send the rest, in order (this
            # thread still holds the lane, so nothing of this process overtakes it)
            batch = batch[cut:]
            packed = pack([s.req.cmd for s in batch])


class _Lane:
    """One shard's queue and in-flight batches on one event loop."""

    __slots__ = ("shard", "queue", "in_flight", "receiver", "flush_due", "name", "fenced", "held", "resume")

    def __init__(self, shard: int) -> None:
        self.shard = shard
        #: this lane's name for the shard: after deferring part of a batch the shard defers the
        #: lane's later batches too (they are already on their way) until the rest comes back
        #: with ``resume``, so a deferral never lets a caller's later call overtake an earlier one
        self.name = secrets.token_hex(8)
        self.fenced = False
        self.held: list[tuple[Slot, asyncio.Future[Any]]] = []
        self.resume = False
        self.queue: list[tuple[Slot, asyncio.Future[Any]]] = []
        #: sent batches in send order: (calls, packed commands, the call's ObjectRef)
        self.in_flight: collections.deque[tuple[list[tuple[Slot, asyncio.Future[Any]]], bytes, Any]] = (
            collections.deque()
        )
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

    async def call(self, shard: int, req: Request, redo: Callable[[Request], Any]) -> Any:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        lane = self.lanes.get(shard)
        if lane is None:
            lane = self.lanes[shard] = _Lane(shard)
        lane.queue.append((Slot(req), fut))
        if not lane.flush_due and len(lane.in_flight) < MAX_IN_FLIGHT:
            lane.flush_due = True
            loop.call_soon(self._flush, lane, redo)
        return await fut

    def _flush(self, lane: _Lane, redo: Callable[[Request], Any]) -> None:
        """Send what is queued, split over the free in-flight places."""
        lane.flush_due = False
        if lane.fenced:  # calls were deferred: nothing leaves until they are queued first again
            return
        link = self.link
        view = link.view
        while lane.queue and len(lane.in_flight) < MAX_IN_FLIGHT:
            if view is None or link.closed:  # a receiver refreshes the map, or fails the calls
                break
            free = MAX_IN_FLIGHT - len(lane.in_flight)
            size = min(MAX_BATCH, max(MIN_PART, -(-len(lane.queue) // free)))
            size = fits([request_bytes(slot.req) for slot, _ in lane.queue[:size]])
            batch, lane.queue = lane.queue[:size], lane.queue[size:]
            try:
                packed = pack([slot.req.cmd for slot, _ in batch])
            except InvalidInput:  # an operand nothing can pickle: fail that call, send the others
                batch = _picklable(batch)
                if not batch:
                    continue
                packed = pack([slot.req.cmd for slot, _ in batch])
            args = (packed, lane.name, lane.resume)
            lane.resume = False
            lane.in_flight.append((batch, packed, view.shards[lane.shard].run.remote(*args)))
        if lane.receiver is None and (lane.in_flight or lane.queue):
            lane.receiver = asyncio.get_running_loop().create_task(self._receive(lane, redo))

    async def _receive(self, lane: _Lane, redo: Callable[[Request], Any]) -> None:
        try:
            while lane.in_flight or lane.queue:
                if not lane.in_flight:  # queued calls that _flush could not send (no map yet)
                    await self._prepare(lane)
                    self._flush(lane, redo)
                    continue
                batch, packed, ref = lane.in_flight[0]
                slots = [slot for slot, _ in batch]
                deferred = await self._await(lane.shard, slots, packed, ref, redo, (lane.name, True))
                lane.in_flight.popleft()
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
                    self._flush(lane, redo)
        except BaseException as exc:  # cancelled with its loop, or a bug: never leave a caller hanging
            error = exc if isinstance(exc, StateError) else StateError(f"internal error: {exc!r}")
            for batch, _, _ in lane.in_flight:
                _resolve_all(batch, error)
            _resolve_all(lane.queue, error)
            _resolve_all(lane.held, error)
            lane.in_flight.clear()
            lane.queue.clear()
            lane.held.clear()
            lane.fenced = False
            raise
        finally:
            lane.receiver = None

    async def _prepare(self, lane: _Lane) -> None:
        """Before a first send: fetch the map; on a closed link, fail what is queued."""
        link = self.link
        try:
            link.check_open()
            if link.view is None:
                await link.refresh_async()
        except StateError as exc:
            _resolve_all(lane.queue, exc)
            lane.queue.clear()

    async def send(
        self, shard: int, slots: list[Slot], packed: bytes, redo: Callable[[Request], Any]
    ) -> None:
        """Send ``slots`` (``packed``) as one batch now, outside the lanes (bulk calls); settle them."""
        while slots:
            view = self.link.view or await self.link.refresh_async()
            slots = await self._await(shard, slots, packed, view.shards[shard].run.remote(packed), redo)
            packed = pack([slot.req.cmd for slot in slots])  # a deferred tail: send it again

    async def _await(
        self,
        shard: int,
        slots: list[Slot],
        packed: bytes,
        ref: Any,
        redo: Callable[[Request], Any],
        lane: tuple[str, bool] | None = None,
    ) -> list[Slot]:
        """Wait for one batch's answer (resending it while its shard restarts) and settle its slots.

        Returns the slots the shard deferred (a tail of the batch, not settled), to be sent again.
        """
        link = self.link
        backoff: Backoff | None = None
        while True:
            try:
                results = unpack(await asyncio.wait_for(ref, link.timeout))
                break
            except RayActorError as exc:
                backoff = backoff or Backoff(link)
                try:
                    await asyncio.sleep(await asyncio.to_thread(backoff.next_delay, exc))
                except StateError as err:
                    _fail(slots, err)
                    return []
                view = link.view or await link.refresh_async()
                ref = view.shards[shard].run.remote(packed, *(lane or ()))
            except (RayError, asyncio.TimeoutError) as exc:
                _fail(slots, link.unavailable(exc))
                return []
        cut = _deferred_from(results, len(slots))
        reason = results[cut][1] if cut < len(slots) else None
        deferred, slots, results = slots[cut:], slots[:cut], results[:cut]
        if isinstance(reason, ShardLoading):  # wait a little before the deferred calls go again
            try:
                await asyncio.sleep(link.wait_for_load(shard, reason))
            except StateError as err:
                _fail(deferred, err)
                deferred = []
        elif not deferred:
            link.loading_since.pop(shard, None)
        stale = [
            s
            for s, (ok, p) in zip(slots, results, strict=False)
            if not ok and isinstance(p, (StaleShardMap, ShardLoading))
        ]
        if len(results) != len(slots):
            stale = list(slots)  # the shard could not take the batch whole: each goes on its own
            results = [(False, StaleShardMap("resent on its own"))] * len(slots)
        settle(slots, results, _later)
        for slot in stale:  # re-route these after a map refresh (off the lane's batch)
            try:
                slot.value, slot.ok = await redo(slot.req), True
            except StateError as exc:
                slot.value, slot.ok = exc, False
            except Exception as exc:  # never let one call's failure reach the lane's other callers
                slot.value, slot.ok = StateError(f"internal error: {type(exc).__name__}: {exc}"), False
        return deferred


def _deferred_from(results: Sequence[tuple[bool, Any]], count: int) -> int:
    """Where the deferred tail of a batch's answer starts (``count``: nothing was deferred)."""
    if len(results) != count:
        return count  # one answer for the whole batch: settle() sends each call on its own
    for index, (ok, payload) in enumerate(results):
        if not ok and isinstance(payload, Deferred):
            return index
    return count


def _packs(slot: Slot) -> bool:
    """Whether ``slot``'s command can be pickled; if not, the slot fails with :class:`InvalidInput`."""
    try:
        pack([slot.req.cmd])
        return True
    except InvalidInput as exc:
        slot.value, slot.ok, slot.done = exc, False, True
        return False


def _picklable(
    calls: list[tuple[Slot, asyncio.Future[Any]]],
) -> list[tuple[Slot, asyncio.Future[Any]]]:
    """The calls whose command can be pickled; the others fail with :class:`InvalidInput`."""
    kept = []
    for slot, fut in calls:
        if _packs(slot):
            kept.append((slot, fut))
        else:
            fut.set_exception(slot.value)
    return kept


def _later(req: Request) -> Any:
    raise StaleShardMap("re-routed after a map refresh")


def _fail(slots: Sequence[Slot], error: StateError) -> None:
    for slot in slots:
        slot.value, slot.ok, slot.done = error, False, True


def _resolve_all(calls: Sequence[tuple[Slot, asyncio.Future[Any]]], error: BaseException) -> None:
    for _, fut in calls:
        if not fut.done():
            fut.set_exception(error)


_async_lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, AsyncLanes]] = (
    weakref.WeakKeyDictionary()
)


def async_lanes(link: ClusterLink) -> AsyncLanes:
    """The lanes of ``link`` on the running event loop (the last loop's are cached on the link)."""
    loop = asyncio.get_running_loop()
    cached = link.async_lanes
    if cached is not None and cached[0]() is loop:
        return cached[1]
    per_loop = _async_lanes.setdefault(loop, {})
    lanes = per_loop.get(id(link))
    if lanes is None:
        lanes = per_loop[id(link)] = AsyncLanes(link)
    link.async_lanes = (weakref.ref(loop), lanes)
    return lanes
