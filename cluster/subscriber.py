"""Subscriber actors: deliver committed state events to trigger handlers, at least once, in order per group.

Every shard writes an event for each committed change into its event log in the same transaction as
the change (the outbox). A subscriber pulls each of its shards' logs in batches (woken by the shard
after a commit, and every second anyway), runs the matching handlers as Ray tasks (never inside a
shard), and acknowledges a batch to the shard only after all its handlers finished; the shard then
drops the acknowledged events. A killed subscriber or shard resumes from the last acknowledgement,
so an event can be delivered again (``event_id`` is stable) but is never lost.

Order: a group lives on one shard and a shard's batches are handled one after another; inside a batch
one task per (trigger, group) calls the handler for that group's events in commit order, so a handler
sees each group's events in order while different groups run in parallel. A handler that raises is
retried with backoff; after the last attempt the event is recorded as a dead letter and the next one
proceeds.
"""

from __future__ import annotations

import asyncio
import os
import pickle
import time
import traceback
from collections.abc import Sequence
from typing import Any

import cloudpickle
import ray
from ray.exceptions import RayActorError

from shardstate._models import StateEvent
from shardstate._requests import set_request
from shardstate.cluster.config import NAMESPACE, ClusterConfig
from shardstate.shards.records import Event

#: system groups (kept out of user triggers)
SYSTEM_PREFIX = "__shardstate:"
TRIGGERS_GROUP = SYSTEM_PREFIX + "triggers"
DEAD_LETTERS_GROUP = SYSTEM_PREFIX + "dead_letters"

BATCH = 1000
HANDLER_ATTEMPTS = 4
HANDLER_BACKOFF = 0.05
TRIGGER_RELOAD = 5.0
#: handled events are acknowledged to their shard at most this often while events keep coming
ACK_EVERY = 0.05


def to_state_event(cluster: str, shard: int, event: Event) -> StateEvent:
    """A log record as the public :class:`StateEvent` (values unpickled)."""
    return StateEvent(
        event_type=event.kind,  # type: ignore[arg-type]
        group_id=event.group_id,
        key=event.key,
        old_value=_decode(event.old),
        new_value=_decode(event.new),
        seq=event.seq,
        event_id=f"{cluster}/{shard}/{event.seq}",
        shard=shard,
        at=event.at,
    )


def _decode(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return pickle.loads(data)
    except Exception as exc:  # a class this process cannot import
        return f"<undecodable value: {type(exc).__name__}: {exc}>"


def matches(spec: dict[str, Any], event: StateEvent) -> bool:
    """Whether a trigger's group/key filters select ``event`` (conditions are checked by the task)."""
    if event.group_id.startswith(SYSTEM_PREFIX):
        return False
    group, key = spec.get("group_id"), spec.get("key")
    return (group is None or group == event.group_id) and (key is None or key == event.key)


def _selected(specs: list[dict[str, Any]], record: Event) -> bool:
    """Whether any trigger's group/key filters select ``record`` (checked before unpickling)."""
    if record.group_id.startswith(SYSTEM_PREFIX):
        return False
    return any(
        (s.get("group_id") is None or s["group_id"] == record.group_id)
        and (s.get("key") is None or s["key"] == record.key)
        for s in specs
    )


@ray.remote(num_cpus=0, max_retries=0)
def deliver(
    name: str, handler_blob: bytes, condition_blob: bytes | None, events: Sequence[StateEvent]
) -> list[dict[str, Any]]:
    """Run one trigger's handler for a group's events, in order; return the dead letters."""
    handler = cloudpickle.loads(handler_blob)
    condition = None if condition_blob is None else cloudpickle.loads(condition_blob)
    dead: list[dict[str, Any]] = []
    for event in events:
        for attempt in range(1, HANDLER_ATTEMPTS + 1):
            try:
                if condition is None or condition(event):
                    if hasattr(handler, "remote"):
                        ray.get(handler.remote(event))
                    else:
                        handler(event)
                break
            except Exception as exc:
                if attempt == HANDLER_ATTEMPTS:
                    dead.append(
                        {
                            "trigger": name,
                            "event": event,
                            "error": "".join(traceback.format_exception_only(type(exc), exc)).strip(),
                            "attempts": attempt,
                            "at": time.time(),
                        }
                    )
                else:
                    time.sleep(HANDLER_BACKOFF * 2 ** (attempt - 1))
    return dead


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
        self._reloaded = 0.0
        #: what each shard was last told: keep events durably (a trigger listens) or not
        self._durable: dict[int, bool] = {}
        #: per shard, the seq at which events became durable again: the pump starts after it
        self._resync: dict[int, int] = {}

    # -- control ------------------------------------------------------------------------------
    async def ensure_running(self) -> int:
        """Start the pumps (idempotent); returns how many shards this subscriber follows."""
        if self.state is None:
            from shardstate._connect import _reattach

            self.state = await asyncio.to_thread(_reattach, self.config.name, "async", 120.0)
            await self.reload_triggers()
        for shard in self.shard_ids:
            task = self.pumps.get(shard)
            if task is None or task.done():
                self.wake.setdefault(shard, asyncio.Event())
                self.pumps[shard] = asyncio.get_running_loop().create_task(self._pump(shard))
        return len(self.shard_ids)

    async def notify(self, shard: int, seq: int, events: list[Event] | bytes | None = None) -> None:
        """A shard committed events up to ``seq`` (and pushed them along, maybe pickled): wake its pump."""
        await self.ensure_running()
        if isinstance(events, bytes):
            events = pickle.loads(events)
        if events:
            self.inbox.setdefault(shard, []).extend(events)
        self.wake.setdefault(shard, asyncio.Event()).set()

    def _from_inbox(self, shard: int, cursor: int) -> list[Event] | None:
        """Pushed events right after ``cursor`` ([] if none arrived); None if some are missing."""
        inbox = [e for e in self.inbox.get(shard, ()) if e.seq > cursor]
        self.inbox[shard] = inbox
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

    async def reload_triggers(self) -> int:
        """Re-read the durable trigger registry; returns how many triggers are registered."""
        if self.state is None:
            await self.ensure_running()
            return len(self.triggers)
        items = await self.state.items(TRIGGERS_GROUP)
        self.triggers = {item.key: item.value for item in items}
        self._reloaded = time.monotonic()
        await asyncio.gather(*(self._tell_shard(shard) for shard in self.shard_ids))
        return len(self.triggers)

    async def _tell_shard(self, shard: int, handle: Any = None) -> None:
        """Tell a shard whether any trigger listens (only when that changed, or it restarted).

        While none does, shards keep events in memory only and acknowledge them themselves: writes
        nobody listens to cost no storage and no push. Before a registration returns
        (``subscribers_ready``), every shard keeps events durably again, from the seq it reports.
        """
        wanted = bool(self.triggers)
        if self._durable.get(shard) == wanted:
            return
        try:
            if handle is None:
                name = self.config.shard_name(shard)
                handle = await asyncio.to_thread(ray.get_actor, name, namespace=NAMESPACE)
            seq = await handle.set_events_durable.remote(wanted)
        except (RayActorError, ValueError):  # restarting: its pump tells it when it is back
            self._durable.pop(shard, None)
            return
        self._durable[shard] = wanted
        if wanted:
            self._resync[shard] = seq

    def stats(self) -> dict[str, Any]:
        """Counters for tests and operators."""
        return {
            "index": self.index,
            "pid": os.getpid(),
            "shards": self.shard_ids,
            "triggers": sorted(self.triggers),
            "delivered": self.delivered,
            "dead_letters": self.dead,
            "running": sorted(s for s, t in self.pumps.items() if not t.done()),
        }

    # -- the pump -----------------------------------------------------------------------------
    async def _pump(self, shard: int) -> None:
        """Handle shard ``shard``'s events in order; acknowledge them at most every ACK_EVERY seconds.

        In steady state the shard pushes each batch's events with its notification, so following
        the log costs the shard no extra calls; the log itself is read on start, after a gap, and
        once a second when idle (a safety net for lost pushes).
        """
        name = self.config.shard_name(shard)
        cursor: int | None = None
        acked = 0
        last_ack = time.monotonic()
        handle: Any = None
        while True:
            try:
                if handle is None:
                    handle = await asyncio.to_thread(ray.get_actor, name, namespace=NAMESPACE)
                    self._durable.pop(shard, None)  # a (re)started shard keeps events durably
                    await self._tell_shard(shard, handle)
                if not self.triggers:  # nothing listens: the shard acknowledges its own events
                    self.inbox[shard] = []
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
                if floor is not None and cursor is not None and cursor < floor:
                    cursor = acked = floor  # events before a registration are not delivered
                events: list[Event] | None = None
                if cursor is None:
                    _seq, cursor, _oldest = await handle.event_state.remote()
                    acked = cursor
                    events = await handle.events_since.remote(cursor, BATCH)
                else:
                    events = self._from_inbox(shard, cursor)
                    if events is None:
                        events = await handle.events_since.remote(cursor, BATCH)
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
                    pulled = await handle.events_since.remote(cursor, BATCH)
                    if pulled:
                        self.inbox.setdefault(shard, []).extend(pulled)
            except (RayActorError, ValueError):  # the shard is restarting (or not up yet)
                cursor = None
                handle = None
                self.inbox[shard] = []
                await asyncio.sleep(0.2)
            except Exception:  # keep pumping; the batch is not acknowledged and comes again
                traceback.print_exc()
                cursor = None
                self.inbox[shard] = []
                await asyncio.sleep(0.5)

    async def _handle(self, shard: int, records: list[Event]) -> None:
        if any(r.group_id == TRIGGERS_GROUP for r in records):
            await self.reload_triggers()
        specs = list(self.triggers.values())
        # unpickle only what some trigger's filters select (writes nobody listens to cost nothing here)
        events = [to_state_event(self.config.name, shard, r) for r in records if _selected(specs, r)]
        if not events:
            return
        jobs = []
        dead: list[dict[str, Any]] = []
        for name, spec in list(self.triggers.items()):
            condition = self._condition(name, spec)
            per_group: dict[str, list[StateEvent]] = {}
            for event in events:
                if matches(spec, event) and self._holds(name, condition, event, dead):
                    per_group.setdefault(event.group_id, []).append(event)
            for chunk in per_group.values():
                jobs.append(self._run(name, spec, chunk))
        for letters in await asyncio.gather(*jobs):
            dead.extend(letters)
        await self._record_dead(dead)

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
                    error = (
                        "condition raised " + "".join(traceback.format_exception_only(type(exc), exc)).strip()
                    )
                    dead.append(
                        {
                            "trigger": name,
                            "event": event,
                            "error": error,
                            "attempts": attempt,
                            "at": time.time(),
                        }
                    )
        return False

    async def _run(self, name: str, spec: dict[str, Any], events: list[StateEvent]) -> list[dict[str, Any]]:
        """One delivery task, retried if its worker dies (the events come again: at least once)."""
        delay = 0.1
        for attempt in range(1, 6):
            try:
                dead: list[dict[str, Any]] = await deliver.remote(name, spec["handler"], None, events)
                self.delivered += len(events)
                return dead
            except Exception as exc:
                if attempt == 5:
                    error = f"delivery task failed {attempt} times: {exc}"
                    return [
                        {"trigger": name, "event": e, "error": error, "attempts": attempt, "at": time.time()}
                        for e in events
                    ]
                await asyncio.sleep(delay)
                delay *= 2
        return []

    async def _record_dead(self, dead: list[dict[str, Any]]) -> None:
        for letter in dead:
            event: StateEvent = letter["event"]
            key = f"{letter['trigger']}|{event.event_id}"
            await self.state._run(
                set_request(
                    DEAD_LETTERS_GROUP,
                    key,
                    {**letter, "event": event.model_dump()},
                    self.config.max_value_size,
                    system=True,
                )
            )
            self.dead += 1


#: The Ray actor class (async: one pump per shard, handler tasks awaited concurrently).
subscriber_actor_class = ray.remote(num_cpus=0, max_restarts=-1)(SubscriberActor)
