"""Subscriber actors: deliver committed state events to trigger handlers, at least once, in order per group.

Every shard writes an event for each committed change into its event log in the same transaction as
the change (the outbox). A subscriber follows each of its shards' events over the shard's own
connection (a follow stream: the shard pushes every commit's events as soon as it is committed;
see :mod:`shardstate.shards.followers`), runs the matching handlers in warm runner actors (never
inside a shard; see :mod:`shardstate.cluster.runners` and :mod:`shardstate.cluster.delivery`),
and acknowledges a batch to the shard only after all its handlers finished; the shard then drops
the acknowledged events. The shard's log is read on start, after a gap (a dropped frame, a
reconnection) and once a second when idle; a shard that cannot stream (or before the subscriber
connected) pushes by a Ray call instead. A killed subscriber or shard resumes from the last
acknowledgement, so an event can be delivered again (``event_id`` is stable) but is never lost.

Order: a group lives on one shard and a shard's batches are handled one after another; inside a batch
one chunk per (trigger, group) calls the handler for that group's events in commit order, so a
handler sees each group's events in order while different groups run in parallel. A handler that
raises or runs past its trigger's timeout is retried with backoff; after the last attempt the event
is recorded as a dead letter (always storable: see :func:`_record_dead`) and the next one proceeds.

Bounds: at most :data:`MAX_IN_FLIGHT` chunks run at once per subscriber (each in its own runner),
and the events shards push are kept in memory up to :data:`INBOX_EVENTS` / :data:`INBOX_BYTES` per
shard; beyond that the subscriber stops reading the shard's stream, the shard drops what it would
send (its buffer per stream is bounded too) and the pump reads those events from the shard's log
when it gets to them.

Trigger state: the subscriber records in the cluster metadata whether any trigger is registered
(before telling the shards), so a shard that restarts knows whether to keep its events durably.
A trigger registered while others exist starts from "now": events its shards had committed when the
subscriber loaded it are not delivered to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import pickle
import socket
import sys
import threading
import time
import traceback
from typing import Any

import cloudpickle
import ray
from ray.exceptions import ActorUnschedulableError, RayActorError

from shardstate._errors import ConflictError, NotPrimary, StateError, Unavailable
from shardstate._models import StateEvent
from shardstate._requests import delete_request, set_request
from shardstate.cluster import metadata
from shardstate.cluster.config import NAMESPACE, ClusterConfig
from shardstate.cluster.delivery import (
    DEFAULT_HANDLER_TIMEOUT,
    HANDLER_ATTEMPTS,
    TRUNCATED,
    Chunk,
    describe,
    handler_key,
    letter,
    letter_key,
    letter_value,
    run_delivery,
    to_record,
    to_state_event,
)
from shardstate.cluster.metrics import Flusher, record_delivery
from shardstate.cluster.runners import RunnerPool
from shardstate.cluster.tallies import DeliveryTally
from shardstate.shards.event_forms import Resolver, Unresolved
from shardstate.shards.followers import SUBSCRIBER, FollowSpec, frame_of, stream_target
from shardstate.shards.records import Event
from shardstate.shards.wire import (
    HANDSHAKE_TIMEOUT,
    client_handshake_async,
    pack_follow,
    read_frame_async,
    write_frame_async,
)

#: system groups (kept out of user triggers)
SYSTEM_PREFIX = "__shardstate:"
TRIGGERS_GROUP = SYSTEM_PREFIX + "triggers"
DEAD_LETTERS_GROUP = SYSTEM_PREFIX + "dead_letters"

BATCH = 1000
TRIGGER_RELOAD = 5.0
#: handled events are acknowledged to their shard at most this often while events keep coming
ACK_EVERY = 0.05
#: delivery chunks (one per trigger and group of a batch) running at once, per subscriber: also
#: the most runners it starts
MAX_IN_FLIGHT = 32
#: pushed events kept in memory per shard (count, and bytes of their values); the rest is read later
INBOX_EVENTS = 10_000
INBOX_BYTES = 64 * 1024 * 1024
#: seconds between attempts to (re)open a shard's follow stream, at most
STREAM_RETRY = 2.0

#: what :meth:`SubscriberActor.retry_dead_letter` answers: the handler succeeded (the letter is
#: gone), failed again (the letter keeps the new error), there is no such letter, its trigger was
#: removed, or the letter was stored without its event's values (nothing to run the handler on)
RETRIED, FAILED_AGAIN, NO_LETTER = "retried", "failed", "missing"
TRIGGER_GONE, NO_VALUES = "removed", "truncated"


def matches(spec: dict[str, Any], event: StateEvent) -> bool:
    """Whether a trigger's group/key filters select ``event`` (conditions are checked by the task)."""
    if event.group_id.startswith(SYSTEM_PREFIX):
        return False
    group, key = spec.get("group_id"), spec.get("key")
    return (group is None or group == event.group_id) and (key is None or key == event.key)


def record_matches(spec: dict[str, Any], record: Event) -> bool:
    """:func:`matches` for a log record (checked before unpickling anything)."""
    if record.group_id.startswith(SYSTEM_PREFIX):
        return False
    group, key = spec.get("group_id"), spec.get("key")
    return (group is None or group == record.group_id) and (key is None or key == record.key)


def _selected(specs: list[dict[str, Any]], record: Event) -> bool:
    """Whether any trigger's group/key filters select ``record`` (checked before unpickling)."""
    if record.group_id.startswith(SYSTEM_PREFIX):
        return False
    return any(
        (s.get("group_id") is None or s["group_id"] == record.group_id)
        and (s.get("key") is None or s["key"] == record.key)
        for s in specs
    )


async def system_set(
    state: Any, group_id: str, key: str, value: Any, expected_version: int | None = None
) -> None:
    """Every write the subscriber makes to a system group (dead letters) goes through here."""
    limit = state._link.max_value_size
    await state._run(set_request(group_id, key, value, limit, expected_version=expected_version, system=True))


def handler_timeout(spec: dict[str, Any]) -> float | None:
    """A trigger's per-attempt handler timeout in seconds (None: no limit)."""
    timeout = spec.get("timeout", DEFAULT_HANDLER_TIMEOUT)
    return None if timeout is None or math.isinf(timeout) else float(timeout)


def _size(event: Event) -> int:
    return len(event.old or b"") + len(event.new or b"") + 100


class SubscriberActor:
    """Pulls the event logs of shards ``index, index + count, ...`` and runs trigger handlers."""

    def __init__(self, config: dict[str, Any], index: int = 0, count: int = 1) -> None:
        self.config = ClusterConfig(**config)
        self.index = index
        self.shard_ids = [i for i in range(self.config.shards) if i % count == index]
        self.triggers: dict[str, dict[str, Any]] = {}
        self.wake: dict[int, asyncio.Event] = {}
        self.pumps: dict[int, asyncio.Task[None]] = {}
        self.inbox: dict[int, list[Event]] = {}
        self._conditions: dict[str, tuple[bytes, Any]] = {}
        self.state: Any = None
        self.delivered = 0
        self.dead = 0
        self.letters_dropped = 0
        self._reloaded = 0.0
        self._loaded = False
        #: what was last recorded in the cluster metadata: does any trigger listen
        self._active_recorded: bool | None = None
        #: what each shard was last told: keep events durably (a trigger listens) or not
        self._durable: dict[int, bool] = {}
        #: per shard, its acknowledgement when events became durable again: the pump starts after it
        self._resync: dict[int, int] = {}
        #: per trigger registered while the subscriber ran, per shard: its events up to here are
        #: not for it (it starts from "now"); dropped once the pump has passed them
        self._floors: dict[str, dict[int, int]] = {}
        self._handles: dict[int, Any] = {}
        #: per shard: the highest seq a push announced (a dropped push leaves it above the cursor)
        self._notified: dict[int, int] = {}
        self._inbox_bytes: dict[int, int] = {}
        self.inbox_peak = 0
        self.pushes_dropped = 0
        self._slots: asyncio.Semaphore | None = None
        self.in_flight = 0
        self.in_flight_peak = 0
        self._starting: asyncio.Lock | None = None
        #: per shard: its follow stream (task), whether it is open, and the values it sent (refs)
        self.feeds: dict[int, asyncio.Task[None]] = {}
        self.streaming: dict[int, bool] = {}
        self.stream_gaps = 0
        self._resolvers: dict[int, Resolver] = {}
        #: per shard: set when its inbox has room again (the stream reads on)
        self._room: dict[int, asyncio.Event] = {}
        self._secret: bytes | None = None
        self._my_ip: str | None = None
        #: per trigger: its handler's pickled form and the name runners keep it under
        self._handler_keys: dict[str, tuple[bytes, str]] = {}
        self.runners = RunnerPool(self.config.name, MAX_IN_FLIGHT)
        #: event lag and dead letters, recorded to Ray's metrics once a second by a flusher thread
        self.tally = DeliveryTally()
        self._flusher = Flusher(self._record_metrics, name=f"subscriber-{index}-metrics")
        threading.Thread(target=self._start_soon, daemon=True).start()

    def _start_soon(self) -> None:
        """Start the pumps once this actor runs: after a restart no shard may push again soon
        (its pushes failed while the subscriber was down), and unacknowledged events must not wait."""
        try:
            me = ray.get_runtime_context().current_actor
        except Exception:  # not inside an actor
            return
        delay = 0.5
        while True:
            try:
                ray.get(me.ensure_running.remote(), timeout=300)
                return
            except Exception:  # the cluster is not up yet, or going away
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    # -- control ------------------------------------------------------------------------------
    async def ensure_running(self) -> int:
        """Start the pumps (idempotent); returns how many shards this subscriber follows."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self.state is None:
                from shardstate._connect import _reattach

                state = await asyncio.to_thread(_reattach, self.config.name, "async", 120.0)
                self.state = state
                try:
                    await self.reload_triggers()
                except BaseException:
                    self.state = None  # the next call tries again
                    raise
        loop = asyncio.get_running_loop()
        for shard in self.shard_ids:
            self.wake.setdefault(shard, asyncio.Event())
            task = self.pumps.get(shard)
            if task is None or task.done():
                self.pumps[shard] = loop.create_task(self._pump(shard))
            feed = self.feeds.get(shard)
            if feed is None or feed.done():
                self.feeds[shard] = loop.create_task(self._feed(shard))
        return len(self.shard_ids)

    async def notify(self, shard: int, seq: int, events: list[Event] | bytes | None = None) -> None:
        """A shard committed events up to ``seq`` and pushed them by a Ray call (it has no stream
        to this subscriber yet; compact and self-contained, maybe pickled): wake its pump.

        The pushed events are kept for the pump while the shard's inbox has room (see
        :meth:`_accept`), and nothing is kept while no trigger listens.
        """
        await self.ensure_running()
        if isinstance(events, bytes):
            events = pickle.loads(events) if self.triggers else None
        self._accept(shard, seq, events or [], Resolver(limit=None))

    def _accept(self, shard: int, seq: int, events: list[Event], resolver: Resolver) -> None:
        """Keep pushed events (compact) for the pump, in full form, while the shard's inbox has
        room: past :data:`INBOX_EVENTS` / :data:`INBOX_BYTES` the rest is dropped (the pump reads
        the shard's log for them instead). Wakes the pump."""
        self._notified[shard] = max(self._notified.get(shard, 0), seq)
        if events and self.triggers:
            box = self.inbox.setdefault(shard, [])
            used = self._inbox_bytes.get(shard, 0)
            stream = self._resolvers.setdefault(shard, Resolver())
            room, dropped = True, False
            for event in events:
                try:
                    full = resolver.resolve(event)
                except Unresolved:  # refers to a version we do not have: the log has it whole
                    dropped = True
                    break
                if resolver is not stream:
                    stream.remember((full.group_id, full.key), full.seq, full.new)
                size = _size(full)
                room = room and len(box) < INBOX_EVENTS and used + size <= INBOX_BYTES
                if room:
                    box.append(full)
                    used += size
                else:
                    dropped = True
            self._inbox_bytes[shard] = used
            self.inbox_peak = max(self.inbox_peak, len(box))
            self.pushes_dropped += dropped
        self.wake.setdefault(shard, asyncio.Event()).set()

    def _has_room(self, shard: int) -> bool:
        return len(self.inbox.get(shard, ())) < INBOX_EVENTS and self._inbox_bytes.get(shard, 0) < INBOX_BYTES

    def _from_inbox(self, shard: int, cursor: int) -> list[Event] | None:
        """Pushed events right after ``cursor`` ([] if none arrived); None if some are missing."""
        inbox = self.inbox.get(shard, [])
        if inbox and inbox[0].seq <= cursor:
            inbox = [e for e in inbox if e.seq > cursor]
            self.inbox[shard] = inbox
            self._inbox_bytes[shard] = sum(_size(e) for e in inbox)
            if self._has_room(shard):
                self._room.setdefault(shard, asyncio.Event()).set()
        if not inbox:
            return []
        if inbox[0].seq != cursor + 1:
            return None  # a push was lost or came out of order: read the shard's log instead
        run = [inbox[0]]
        for event in inbox[1:BATCH]:
            if event.seq != run[-1].seq + 1:
                break
            run.append(event)
        return run

    def _empty_inbox(self, shard: int) -> None:
        self.inbox[shard] = []
        self._inbox_bytes[shard] = 0
        self._room.setdefault(shard, asyncio.Event()).set()

    # -- the follow streams ---------------------------------------------------------------------
    async def _feed(self, shard: int) -> None:
        """Follow shard ``shard``'s durable events over its own connection, into its inbox.

        Reads a frame only while the inbox has room (so a slow delivery makes the shard drop what
        it would send, and the pump reads the log). Opens the stream again after any failure (a
        restarted shard has a new address); the pump notices what it missed by the seqs.
        """
        delay = 0.1
        while True:
            writer: asyncio.StreamWriter | None = None
            try:
                reader, writer = await self._open_stream(shard)
                ready = frame_of(await asyncio.wait_for(read_frame_async(reader), HANDSHAKE_TIMEOUT))
                if ready[0] != "ready" or ready[2] != shard:  # another shard's port (another node's)
                    raise ConnectionError(f"reached {ready!r:.80}, not shard {shard}'s stream")
                mark = ready[1]
                self.streaming[shard] = True
                delay = 0.1
                resolver = self._resolvers.setdefault(shard, Resolver())
                room = self._room.setdefault(shard, asyncio.Event())
                while True:
                    while not self._has_room(shard):
                        room.clear()
                        await room.wait()
                    _kind, after, last, events = frame_of(await read_frame_async(reader))
                    if after != mark:  # the shard dropped a frame (we fell behind): the pump reads the log
                        self.stream_gaps += 1
                    mark = last
                    self._accept(shard, last, events, resolver)
            except asyncio.CancelledError:
                raise
            except Exception:  # no address yet, a restart, a closed stream: open it again
                pass
            finally:
                self.streaming[shard] = False
                if writer is not None:
                    with contextlib.suppress(Exception):
                        writer.close()
            await asyncio.sleep(delay)
            delay = min(delay * 2, STREAM_RETRY)

    async def _open_stream(self, shard: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        handle: Any = self._handles.get(shard)
        if handle is None:
            handle = await self._shard_handle(shard)
        if self._my_ip is None:
            self._my_ip = ray.util.get_node_ip_address()
        target = stream_target(await asyncio.wait_for(handle.endpoint.remote(), 10.0), self._my_ip)
        if target is None:  # no connection yet, or one we cannot reach: the shard pushes by Ray
            raise ConnectionError(f"shard {shard} has no connection we can reach (yet)")
        if self._secret is None:
            self._secret = await asyncio.to_thread(metadata.secret, self.config.name)
        if isinstance(target, str):
            opening = asyncio.open_unix_connection(target, limit=1 << 20)
        else:
            opening = asyncio.open_connection(target[0], target[1], limit=1 << 20)
        reader, writer = await asyncio.wait_for(opening, HANDSHAKE_TIMEOUT)
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None and sock.family != getattr(socket, "AF_UNIX", None):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.wait_for(client_handshake_async(reader, writer, self._secret), HANDSHAKE_TIMEOUT)
            await write_frame_async(writer, pack_follow(FollowSpec(SUBSCRIBER).to_bytes()))
        except BaseException:
            writer.close()
            raise
        return reader, writer

    async def _shard_handle(self, shard: int) -> Any:
        """Shard ``shard``'s actor: by its name, or (a replicated shard) its primary, asked of the
        router (``ValueError`` while there is none)."""
        if not self.config.replicas:
            name = self.config.shard_name(shard)
            return await asyncio.to_thread(ray.get_actor, name, namespace=NAMESPACE)
        router = await asyncio.to_thread(ray.get_actor, self.config.router_name(), namespace=NAMESPACE)
        handle = await router.shard_handle.remote(shard)
        if handle is None:
            raise ValueError(f"shard {shard} has no primary now")
        return handle

    async def reload_triggers(self) -> int:
        """Re-read the durable trigger registry; returns how many triggers are registered.

        Records in the cluster metadata whether any trigger is registered (when that changed),
        then tells every shard whether to keep its events durably. A trigger not seen before (while
        this subscriber runs) starts after the events its shards had committed by now.
        """
        if self.state is None:
            await self.ensure_running()
            return len(self.triggers)
        items = await self.state.items(TRIGGERS_GROUP)
        triggers = {item.key: item.value for item in items}
        new = [name for name in triggers if name not in self.triggers] if self._loaded else []
        if new:
            heads = await self._heads()
            for name in new:
                self._floors[name] = dict(heads)
        for name in [n for n in self._floors if n not in triggers]:
            del self._floors[name]
        self.triggers = triggers
        self._loaded = True
        self._reloaded = time.monotonic()
        active = bool(self.triggers)
        if active != self._active_recorded:
            await asyncio.to_thread(metadata.set_triggers_active, self.config.name, active)
            self._active_recorded = active
        await asyncio.gather(*(self._tell_shard(shard) for shard in self.shard_ids))
        if active:
            await self.runners.keep_warm()
        return len(self.triggers)

    async def _heads(self) -> dict[int, int]:
        """The last seq of every reachable shard this subscriber follows."""
        shards = [s for s in self.shard_ids if s in self._handles]
        states = await asyncio.gather(
            *(self._handles[s].event_state.remote() for s in shards), return_exceptions=True
        )
        return {s: st[0] for s, st in zip(shards, states, strict=True) if isinstance(st, tuple)}

    async def _tell_shard(self, shard: int, handle: Any = None) -> None:
        """Tell a shard whether any trigger listens (only when that changed, or it restarted).

        While none does, shards keep events in memory only and acknowledge them themselves: writes
        nobody listens to cost no storage and no push. Before a registration returns
        (``subscribers_ready``), every shard keeps events durably again; the pump skips what the
        shard acknowledged itself meanwhile (its acknowledgement after the switch: ``_resync``).
        A shard that restarts reads the same answer from the cluster metadata.
        """
        wanted = bool(self.triggers)
        if self._durable.get(shard) == wanted:
            return
        try:
            if handle is None:
                handle = await self._shard_handle(shard)
            await handle.set_events_durable.remote(wanted)
            if wanted:  # events up to its acknowledgement were for nobody (it acknowledged them)
                _head, floor, _oldest = await handle.event_state.remote()
        # restarting, failing over: its pump tells it later
        except (RayActorError, ActorUnschedulableError, ValueError, NotPrimary):
            self._durable.pop(shard, None)
            return
        self._durable[shard] = wanted
        if wanted:
            self._resync[shard] = floor

    def stats(self) -> dict[str, Any]:
        """Counters for tests and operators."""
        return {
            "index": self.index,
            "pid": os.getpid(),
            "shards": self.shard_ids,
            "triggers": sorted(self.triggers),
            "delivered": self.delivered,
            "dead_letters": self.dead,
            "dead_letters_dropped": self.letters_dropped,
            "running": sorted(s for s, t in self.pumps.items() if not t.done()),
            "in_flight": self.in_flight,
            "in_flight_peak": self.in_flight_peak,
            "max_in_flight": MAX_IN_FLIGHT,
            "inbox": sum(len(box) for box in self.inbox.values()),
            "inbox_peak": self.inbox_peak,
            "inbox_limit": INBOX_EVENTS,
            "pushes_dropped": self.pushes_dropped,
            "streaming": sorted(s for s, up in self.streaming.items() if up),
            "stream_gaps": self.stream_gaps,
            "event_lag_s": self.tally.summary(),
            **self.runners.stats(),
        }

    def _record_metrics(self) -> None:
        """Record what the tally gathered to Ray's metrics (the flusher thread, once a second)."""
        record_delivery(self.config.name, self.tally.drain())

    # -- the pump -----------------------------------------------------------------------------
    async def _pump(self, shard: int) -> None:
        """Handle shard ``shard``'s events in order; acknowledge them at most every ACK_EVERY seconds.

        In steady state the shard pushes each batch's events with its notification, so following
        the log costs the shard no extra calls; the log itself is read on start, after a gap or a
        dropped push, and once a second when idle (a safety net for lost pushes).
        """
        cursor: int | None = None
        acked = 0
        last_ack = time.monotonic()
        handle: Any = None
        while True:
            try:
                if handle is None:
                    handle = await self._shard_handle(shard)
                    self._handles[shard] = handle
                    self._durable.pop(shard, None)  # a (re)started shard: tell it again
                    await self._tell_shard(shard, handle)
                if not self.triggers:  # nothing listens: the shard acknowledges its own events
                    self._empty_inbox(shard)
                    wake = self.wake[shard]
                    wake.clear()
                    try:
                        await asyncio.wait_for(wake.wait(), 1.0)
                    except asyncio.TimeoutError:
                        pass
                    if time.monotonic() - self._reloaded > TRIGGER_RELOAD:
                        await self.reload_triggers()
                    continue
                floor = self._resync.pop(shard, None)
                events: list[Event] | None = None
                if cursor is None:  # (re)start from the shard's acknowledgement (it includes the floor)
                    head, cursor, _oldest = await handle.event_state.remote()
                    acked = cursor
                    self._forget_floors_above(shard, head)
                    events = await self._pull(shard, handle, cursor)
                else:
                    if floor is not None and cursor < floor:
                        cursor = acked = floor  # the shard acknowledged these itself: for nobody
                    events = self._from_inbox(shard, cursor)
                    if events is None or (not events and self._notified.get(shard, 0) > cursor):
                        events = await self._pull(shard, handle, cursor)
                        if not events:  # nothing there after all (the shard's seq restarted)
                            self._notified[shard] = cursor
                if time.monotonic() - self._reloaded > TRIGGER_RELOAD:
                    await self.reload_triggers()
                if events:
                    await self._handle(shard, events)
                    cursor = events[-1].seq
                    if time.monotonic() - last_ack > ACK_EVERY:
                        acked = await handle.ack.remote(cursor)
                        last_ack = time.monotonic()
                    continue
                if acked < cursor:  # idle: acknowledge what was handled
                    acked = await handle.ack.remote(cursor)
                    last_ack = time.monotonic()
                wake = self.wake[shard]
                wake.clear()
                if self.inbox.get(shard):
                    continue
                try:
                    await asyncio.wait_for(wake.wait(), 1.0)
                except asyncio.TimeoutError:  # nothing pushed for a second: read the log anyway
                    pulled = await handle.events_since.remote(cursor, 1)
                    if pulled:
                        self._notified[shard] = max(self._notified.get(shard, 0), pulled[-1].seq)
            # restarting, failing over, not up yet
            except (RayActorError, ActorUnschedulableError, ValueError, NotPrimary):
                cursor = None
                handle = None
                self._handles.pop(shard, None)
                self._empty_inbox(shard)
                await asyncio.sleep(0.2)
            except Exception:  # keep pumping; the batch is not acknowledged and comes again
                traceback.print_exc()
                cursor = None
                self._empty_inbox(shard)
                await asyncio.sleep(0.5)

    async def _pull(self, shard: int, handle: Any, cursor: int) -> list[Event]:
        """The shard's logged events after ``cursor`` (a batch), in full form."""
        compact = await handle.events_since.remote(cursor, BATCH)
        stream = self._resolvers.setdefault(shard, Resolver())
        try:
            events = Resolver(limit=None).resolve_all(compact)
        except Unresolved:  # an update's new value cannot be computed here: ask for it whole
            events = await handle.events_since.remote(cursor, BATCH, True)
        for event in events:
            stream.remember((event.group_id, event.key), event.seq, event.new)
        return events  # type: ignore[no-any-return]

    def _forget_floors_above(self, shard: int, head: int) -> None:
        """A shard whose log ends below a floor started its seq again (memory durability): drop it."""
        for floors in self._floors.values():
            if floors.get(shard, 0) > head:
                del floors[shard]

    def _passed(self, shard: int, seq: int) -> None:
        """The pump handled everything up to ``seq``: floors at or below it are done with."""
        for floors in self._floors.values():
            if floors.get(shard, seq + 1) <= seq:
                del floors[shard]

    async def _handle(self, shard: int, records: list[Event]) -> None:
        if any(r.group_id == TRIGGERS_GROUP for r in records):
            await self.reload_triggers()
        specs = list(self.triggers.values())
        # only what some trigger's filters select is looked at (writes nobody listens to cost nothing)
        selected = [r for r in records if _selected(specs, r)]
        if selected:
            decoded: dict[int, StateEvent] = {}  # unpickled once, for the conditions that need it
            jobs = []
            dead: list[dict[str, Any]] = []
            for name, spec in list(self.triggers.items()):
                floor = self._floors.get(name, {}).get(shard, 0)
                condition = self._condition(name, spec)
                per_group: dict[str, list[Event]] = {}
                for record in selected:
                    if record.seq <= floor or not record_matches(spec, record):
                        continue
                    if condition is not None:
                        event = decoded.get(record.seq)
                        if event is None:
                            event = decoded[record.seq] = to_state_event(self.config.name, shard, record)
                        if not self._holds(name, condition, event, dead):
                            continue
                    per_group.setdefault(record.group_id, []).append(record)
                if not per_group:
                    continue
                blob, key = self._handler_of(name, spec)
                timeout = handler_timeout(spec)
                for chunk in per_group.values():
                    jobs.append(self._run(Chunk(name, blob, key, self.config.name, shard, chunk, timeout)))
            for letters in await asyncio.gather(*jobs):
                dead.extend(letters)
            await self._record_dead(dead)
        self._passed(shard, records[-1].seq)

    def _handler_of(self, name: str, spec: dict[str, Any]) -> tuple[bytes, str]:
        """A trigger's pickled handler and the name runners keep it under (computed once)."""
        blob = spec["handler"]
        cached = self._handler_keys.get(name)
        if cached is None or cached[0] is not blob:
            cached = self._handler_keys[name] = (blob, handler_key(blob))
        return cached

    def _condition(self, name: str, spec: dict[str, Any]) -> Any:
        blob = spec.get("condition")
        if blob is None:
            return None
        cached = self._conditions.get(name)
        if cached is None or cached[0] is not blob:
            cached = self._conditions[name] = (blob, cloudpickle.loads(blob))
        return cached[1]

    def _holds(self, name: str, condition: Any, event: StateEvent, dead: list[dict[str, Any]]) -> bool:
        """Evaluate a trigger's condition here (cheap, in order); one that raises is a handler error."""
        if condition is None:
            return True
        for attempt in range(1, HANDLER_ATTEMPTS + 1):
            try:
                return bool(condition(event))
            except Exception as exc:
                if attempt == HANDLER_ATTEMPTS:
                    dead.append(letter(name, event, "condition raised " + describe(exc), attempt))
        return False

    async def _run(self, chunk: Chunk, measured: bool = True) -> list[dict[str, Any]]:
        """One (trigger, group) chunk, at most MAX_IN_FLIGHT at a time (each in a runner);
        ``measured``: its events' lag (commit to handler) counts in the event lag metric."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        async with self._slots:
            self.in_flight += 1
            self.in_flight_peak = max(self.in_flight_peak, self.in_flight)
            if measured:
                self.tally.delivered(chunk.shard, [r.at for r in chunk.records])
            try:
                dead = await run_delivery(self.runners, chunk)
            finally:
                self.in_flight -= 1
        self.delivered += len(chunk.records)
        return dead

    async def _record_dead(self, dead: list[dict[str, Any]]) -> None:
        """Store dead letters; one that does not fit is stored truncated, or logged and dropped.

        A letter's key is hashed when ``<trigger>|<event_id>`` is too long for a key; a letter too
        large for the cluster's ``max_value_size`` keeps only short descriptions of the values. Only
        a cluster that is unavailable makes this raise (the batch then comes again).
        """
        for item in dead:
            await self._store_letter(item)

    async def _store_letter(self, item: dict[str, Any], expected_version: int | None = None) -> None:
        """Store one dead letter (see :meth:`_record_dead`); ``expected_version``: only over that
        version of it (else :class:`ConflictError`)."""
        event: StateEvent = item["event"]
        key = letter_key(item["trigger"], event.event_id)
        reason: Exception | None = None
        for level in range(3):
            try:
                value = letter_value(item, level)
                await system_set(self.state, DEAD_LETTERS_GROUP, key, value, expected_version)
                break
            except (Unavailable, ConflictError):
                raise
            except StateError as exc:  # ValueTooLarge, InvalidInput: store less of it
                reason = exc
        else:
            self.letters_dropped += 1
            print(
                f"shardstate subscriber: dropped the dead letter of trigger {item['trigger']!r} for "
                f"event {event.event_id}: {reason!r}",
                file=sys.stderr,
            )
            return
        self.dead += 1
        self.tally.dead_letter(event.shard, item["trigger"])

    async def retry_dead_letter(self, name: str, event_id: str) -> str:
        """Run trigger ``name``'s handler again on its dead letter of event ``event_id``.

        The event goes through this subscriber's runners like any delivery: the trigger's
        condition, timeout, attempts and backoff apply. If the handler succeeds the dead letter is
        removed; if it fails again the letter is stored again with the new error and the attempts
        added to the earlier ones. A letter changed meanwhile (a concurrent retry) is left as it is
        then. Answers :data:`RETRIED`, :data:`FAILED_AGAIN`, :data:`NO_LETTER`,
        :data:`TRIGGER_GONE` or :data:`NO_VALUES` (the last three ran nothing).
        """
        await self.ensure_running()
        key = letter_key(name, event_id)
        entry = await self.state.get_entry(DEAD_LETTERS_GROUP, key)
        stored = None if entry is None else entry.value
        if (
            entry is None
            or not isinstance(stored, dict)
            or stored.get("trigger") != name
            or stored.get("event", {}).get("event_id") != event_id
        ):
            return NO_LETTER
        spec = await self.state.get(TRIGGERS_GROUP, name)
        if spec is None:
            return TRIGGER_GONE
        if str(stored.get("error", "")).endswith(TRUNCATED):
            return NO_VALUES
        event = StateEvent(**stored["event"])
        dead: list[dict[str, Any]] = []
        if self._holds(name, self._condition(name, spec), event, dead):
            blob, hkey = self._handler_of(name, spec)
            records = [to_record(event)]
            chunk = Chunk(name, blob, hkey, self.config.name, event.shard, records, handler_timeout(spec))
            dead.extend(await self._run(chunk, measured=False))  # no event lag: a retry
        if not dead:
            with contextlib.suppress(ConflictError):
                await self.state._run(
                    delete_request(DEAD_LETTERS_GROUP, key, expected_version=entry.version, system=True)
                )
            return RETRIED
        again = {**dead[0], "attempts": int(stored.get("attempts", 0)) + int(dead[0]["attempts"])}
        with contextlib.suppress(ConflictError):
            await self._store_letter(again, expected_version=entry.version)
        return FAILED_AGAIN


__all__ = ["DEAD_LETTERS_GROUP", "TRIGGERS_GROUP", "SubscriberActor", "matches", "to_state_event"]

#: The Ray actor class (async: one pump and one stream per shard, chunks awaited concurrently).
subscriber_actor_class = ray.remote(num_cpus=0, max_restarts=-1)(SubscriberActor)
