"""Coalescing: concurrent calls from one process to the same shard travel in one actor call.

Each shard has a *lane* per process (threads) or per event loop (asyncio). A call that finds its lane
idle goes out at once, alone: no timer, so a lone call is as fast as before. Calls that arrive while
the lane has a call in flight queue up and leave together, as one batch, when it returns. One call
in flight per lane keeps each caller's order per shard; the shard executes a batch in order and
answers each command separately, so results and errors reach each caller individually.

A batch that fails because its shard died is retried whole (writes carry op_ids, so nothing applies
twice); a command answered "stale shard map" is re-sent on its own after the map is refreshed.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from shardstate._errors import StaleShardMap, StateError

if TYPE_CHECKING:
    from shardstate._client import ClusterLink
    from shardstate._requests import Request


class Slot:
    """One queued call: its request, and (once answered) its value or error."""

    __slots__ = ("req", "done", "ok", "value", "event", "lead")

    def __init__(self, req: Request) -> None:
        self.req = req
        self.done = False
        self.ok = False
        self.value: Any = None
        self.event = threading.Event()
        self.lead = False

    def result(self) -> Any:
        if self.ok:
            return self.value
        raise self.value


def settle(
    slots: Sequence[Slot], results: Sequence[tuple[bool, Any]], redo: Callable[[Request], Any]
) -> None:
    """Give each slot its decoded value or error; commands answered StaleShardMap go to ``redo``."""
    for slot, (ok, payload) in zip(slots, results, strict=True):
        try:
            if ok:
                slot.value, slot.ok = slot.req.decode(payload), True
            elif isinstance(payload, StaleShardMap):
                slot.value, slot.ok = redo(slot.req), True
            elif isinstance(payload, StateError):
                slot.value = payload
            else:
                slot.value = StateError(f"shard returned a malformed result: {payload!r}")
        except StateError as exc:
            slot.value, slot.ok = exc, False
        slot.done = True


class SyncLanes:
    """Per-shard lanes for threads. The caller that finds a lane idle sends the batch itself."""

    def __init__(self, link: ClusterLink) -> None:
        self.link = link
        self.lock = threading.Lock()
        self.queues: dict[int, list[Slot]] = {}
        self.busy: set[int] = set()

    def call(self, shard: int, req: Request, redo: Callable[[Request], Any]) -> Any:
        slot = Slot(req)
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
                    waiting[0].lead = True
                    waiting[0].event.set()  # the next waiter sends the next batch
                else:
                    self.busy.discard(shard)
        return slot.result()

    def _send(self, shard: int, batch: list[Slot], redo: Callable[[Request], Any]) -> None:
        from shardstate._client import Backoff

        link = self.link
        cmds = [s.req.cmd for s in batch]
        backoff: Backoff | None = None
        while True:
            handle = link.current().shards[shard]
            try:
                results = ray.get(handle.execute.remote(cmds), timeout=link.timeout)
                break
            except RayActorError as exc:  # the shard died mid-call: it restarts from storage
                backoff = backoff or Backoff(link)
                try:
                    time.sleep(backoff.next_delay(exc))
                except StateError as err:
                    _fail(batch, err)
                    return
            except (RayError, GetTimeoutError) as exc:
                _fail(batch, link.unavailable(exc))
                return
        settle(batch, results, redo)


class AsyncLanes:
    """Per-shard lanes for one event loop: a pump task per busy lane sends queued calls in batches."""

    def __init__(self, link: ClusterLink) -> None:
        self.link = link
        self.queues: dict[int, list[tuple[Slot, asyncio.Future[Any]]]] = {}
        self.busy: set[int] = set()

    async def call(self, shard: int, req: Request, redo: Callable[[Request], Any]) -> Any:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.queues.setdefault(shard, []).append((Slot(req), fut))
        if shard not in self.busy:
            self.busy.add(shard)
            asyncio.get_running_loop().create_task(self._pump(shard, redo))
        return await fut

    async def _pump(self, shard: int, redo: Callable[[Request], Any]) -> None:
        try:
            while self.queues.get(shard):
                batch, self.queues[shard] = self.queues[shard], []
                slots = [s for s, _ in batch]
                await self._send(shard, slots, redo)
                for slot, fut in batch:
                    if not fut.done():
                        if slot.ok:
                            fut.set_result(slot.value)
                        else:
                            fut.set_exception(slot.value)
        finally:
            self.busy.discard(shard)

    async def _send(self, shard: int, slots: list[Slot], redo: Callable[[Request], Any]) -> None:
        from shardstate._client import Backoff

        link = self.link
        cmds = [s.req.cmd for s in slots]
        backoff: Backoff | None = None
        view = link.view or await link.refresh_async()
        while True:
            handle = view.shards[shard]
            try:
                results = await asyncio.wait_for(handle.execute.remote(cmds), link.timeout)
                break
            except RayActorError as exc:
                backoff = backoff or Backoff(link)
                try:
                    await asyncio.sleep(await asyncio.to_thread(backoff.next_delay, exc))
                except StateError as err:
                    _fail(slots, err)
                    return
            except (RayError, asyncio.TimeoutError) as exc:
                _fail(slots, link.unavailable(exc))
                return
        stale = [
            s for s, (ok, p) in zip(slots, results, strict=True) if not ok and isinstance(p, StaleShardMap)
        ]
        settle(slots, results, _later)
        for slot in stale:  # re-route these after a map refresh (off the pump's batch)
            try:
                slot.value, slot.ok = await redo(slot.req), True
            except StateError as exc:
                slot.value, slot.ok = exc, False


def _later(req: Request) -> Any:
    raise StaleShardMap("re-routed after a map refresh")


def _fail(slots: Sequence[Slot], error: StateError) -> None:
    for slot in slots:
        slot.value, slot.ok, slot.done = error, False, True


_async_lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, AsyncLanes]] = (
    weakref.WeakKeyDictionary()
)


def async_lanes(link: ClusterLink) -> AsyncLanes:
    """The lanes of ``link`` on the running event loop."""
    per_loop = _async_lanes.setdefault(asyncio.get_running_loop(), {})
    lanes = per_loop.get(id(link))
    if lanes is None:
        lanes = per_loop[id(link)] = AsyncLanes(link)
    return lanes
