"""Running a trigger's handler for a group's events: in a warm runner, watched, with dead letters.

A subscriber hands one (trigger, group) chunk of events to :func:`run_delivery`, which sends it to a
runner (:mod:`shardstate.cluster.runners`: a long-lived Ray actor of that subscriber's, which keeps
the handlers it unpickled) over the runner's own connection, never inside a shard. The runner calls
the handler for each event in order (:func:`run_handlers`) and retries one that raises with
backoff; after the last attempt the event becomes a dead letter and the next one proceeds.

Each handler attempt has a time limit (the trigger's ``timeout``). The runner's watchdog thread
knows when each attempt started: one that runs past the timeout is reported (``"timeout"``, with
the attempt) and the subscriber kills that runner, the only way to stop a hung handler, and goes on
with a fresh one; the attempt counts as failed and follows the retry / dead-letter policy. While a
chunk runs, the watchdog also reports where it is every ``tick`` seconds. A runner that falls
silent (its process frozen, or a handler holding the GIL) for ``timeout + tick + STALL_GRACE``
seconds is killed too, and the rest of its chunk runs again from its last report on a fresh runner,
now reporting before every attempt, so the next timeout is charged to exactly the attempt that
hung. A runner that dies (a handler that kills its process) is replaced and the chunk goes on from
its last report, :data:`TASK_ATTEMPTS` times at most.

Messages from a runner, one per frame: ``(kind, index, attempt, dead letters since the last)``
with ``kind`` ``"at"`` (about to run, or running, attempt ``attempt`` of ``events[index]``),
``"timeout"`` (that attempt ran past the timeout), ``"done"`` (``index`` = the number of events),
or ``"failed"`` (the chunk could not start, e.g. the handler does not unpickle; ``index`` 0).
"""

from __future__ import annotations

import asyncio
import hashlib
import pickle
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import cloudpickle
import ray
from ray.exceptions import GetTimeoutError

from shardstate._models import StateEvent
from shardstate.shards.records import Event
from shardstate.shards.validation import MAX_NAME_BYTES

if TYPE_CHECKING:
    from shardstate.cluster.runners import RunnerPool

HANDLER_ATTEMPTS = 4
HANDLER_BACKOFF = 0.05
#: seconds one handler attempt may take unless the trigger says otherwise
DEFAULT_HANDLER_TIMEOUT = 60.0
#: a chunk whose runner dies (its process crashed or was killed, not its handler raising) is
#: started again this often
TASK_ATTEMPTS = 5
#: a runner silent for ``timeout + tick + STALL_GRACE`` seconds while it runs a chunk is killed
STALL_GRACE = 5.0
#: a remote-function handler's own timeout (``ray.get``) fires this much before the runner's watchdog
REMOTE_GRACE = 2.0
#: a handler's error text is kept up to this many characters in a dead letter
ERROR_CHARS = 2000
#: what the error text of a dead letter stored without its values ends with
TRUNCATED = " [dead letter truncated: the values did not fit max_value_size]"


def tick(timeout: float | None) -> float:
    """How often (seconds) a runner running handlers of this ``timeout`` reports while they run."""
    return 1.0 if timeout is None else min(1.0, timeout / 4)


def letter(name: str, event: StateEvent, error: str, attempts: int) -> dict[str, Any]:
    """A dead letter: the trigger, the event, the last error, how many attempts were made."""
    return {"trigger": name, "event": event, "error": error, "attempts": attempts, "at": time.time()}


def describe(exc: BaseException) -> str:
    """An exception as the one line a dead letter keeps."""
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def to_state_event(cluster: str, shard: int, event: Event) -> StateEvent:
    """A log record (full form) as the public :class:`StateEvent` (values unpickled)."""
    return StateEvent.model_construct(
        event_type=event.kind,
        group_id=event.group_id,
        key=event.key,
        old_value=_decode(event.old),
        new_value=_decode(event.new),
        seq=event.seq,
        event_id=f"{cluster}/{shard}/{event.seq}",
        shard=shard,
        at=event.at,
    )


def to_record(event: StateEvent) -> Event:
    """A :class:`StateEvent` (a dead letter's) back as a full-form log record, for delivery again:
    the runner turns it into the same event (same ``event_id``)."""
    return Event(
        seq=event.seq,
        kind=event.event_type,
        group_id=event.group_id,
        key=event.key,
        old=None if event.old_value is None else cloudpickle.dumps(event.old_value),
        new=None if event.new_value is None else cloudpickle.dumps(event.new_value),
        at=event.at,
    )


def _decode(data: bytes | None) -> Any:
    if data is None:
        return None
    try:
        return pickle.loads(data)
    except Exception as exc:  # a class this process cannot import
        return f"<undecodable value: {type(exc).__name__}: {exc}>"


def handler_key(blob: bytes) -> str:
    """The name a runner keeps an unpickled handler under (its pickled form's digest)."""
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


# -- inside a runner ------------------------------------------------------------------------------
class Attempts:
    """Where a runner's chunk is, shared by the thread running handlers and the runner's watchdog:
    the attempt in progress (and when it started), and the dead letters not reported yet.

    ``send(message)`` writes one message to the subscriber (called under this object's lock)."""

    def __init__(self, send: Callable[[tuple[Any, ...]], None], every: float = 1.0) -> None:
        self.send = send
        #: seconds between reports while the chunk runs (see :func:`tick`)
        self.tick = every
        #: the chunk finished (its "done" was sent)
        self.done = False
        self.lock = threading.Condition()
        #: ``(index, attempt, started at (monotonic), timeout)`` of the attempt running, or None
        self.current: tuple[int, int, float, float | None] | None = None
        self.letters: list[dict[str, Any]] = []
        self.reported = time.monotonic()
        #: set by the watchdog once it reported the running attempt as timed out: nothing more is
        #: sent for this chunk (the subscriber kills the runner)
        self.timed_out = False

    def report(self, kind: str, index: int, attempt: int) -> None:
        """Send one message with the letters so far (call with the lock held)."""
        if self.timed_out:
            return
        letters, self.letters = self.letters, []
        self.reported = time.monotonic()
        self.send((kind, index, attempt, letters))

    def begin(self, index: int, attempt: int, timeout: float | None, eager: bool) -> None:
        """Attempt ``attempt`` of ``events[index]`` starts now (``eager``: report it first)."""
        with self.lock:
            if eager:
                self.report("at", index, attempt)
            first = self.current is None
            self.current = (index, attempt, time.monotonic(), timeout)
            if first:  # later attempts only move the deadline out: the watchdog finds it when it wakes
                self.lock.notify_all()

    def dead(self, item: dict[str, Any]) -> None:
        """An event became a dead letter."""
        with self.lock:
            self.letters.append(item)

    def finish(self, count: int) -> None:
        """The chunk's ``count`` events are done."""
        with self.lock:
            self.current = None
            self.done = True
            self.report("done", count, 0)
            self.lock.notify_all()


def run_handlers(
    name: str,
    handler: Any,
    events: Sequence[StateEvent],
    timeout: float | None,
    first_attempt: int,
    eager: bool,
    attempts: Attempts,
) -> None:
    """Call ``handler`` for each event in order, retrying one that raises (the runner's job).

    ``first_attempt`` is the attempt number of ``events[0]`` (a chunk started again after a
    timed-out attempt continues its count)."""
    watched = None if timeout is None or not hasattr(handler, "remote") else timeout + REMOTE_GRACE
    for index, event in enumerate(events):
        attempt = first_attempt if index == 0 else 1
        while True:
            if attempts.timed_out:  # a hung attempt came back after all: the chunk goes on elsewhere
                return
            attempts.begin(index, attempt, timeout if watched is None else watched, eager)
            try:
                _call(handler, event, timeout)
                break
            except Exception as exc:
                if attempt >= HANDLER_ATTEMPTS:
                    attempts.dead(letter(name, event, describe(exc), attempt))
                    break
                time.sleep(HANDLER_BACKOFF * 2 ** (attempt - 1))
                attempt += 1
    attempts.finish(len(events))


class HandlerTimeout(Exception):
    """A handler attempt ran past its trigger's timeout."""


def _call(handler: Any, event: StateEvent, timeout: float | None) -> None:
    if not hasattr(handler, "remote"):
        handler(event)
        return
    ref = handler.remote(event)  # a Ray remote function: its task is bounded (and cancelled) here
    try:
        ray.get(ref, timeout=timeout)
    except GetTimeoutError:
        ray.cancel(ref, force=True)
        raise HandlerTimeout(f"handler timed out after {timeout} s") from None


# -- in the subscriber ------------------------------------------------------------------------------
class Chunk:
    """One (trigger, group) chunk of events to deliver, in order (full-form records)."""

    def __init__(
        self,
        name: str,
        handler_blob: bytes,
        key: str,
        cluster: str,
        shard: int,
        records: list[Event],
        timeout: float | None,
    ) -> None:
        self.name = name
        self.handler_blob = handler_blob
        self.key = key
        self.cluster = cluster
        self.shard = shard
        self.records = records
        self.timeout = timeout

    def event(self, index: int) -> StateEvent:
        """``records[index]`` as the handler sees it (for dead letters written here)."""
        return to_state_event(self.cluster, self.shard, self.records[index])


async def run_delivery(pool: RunnerPool, chunk: Chunk) -> list[dict[str, Any]]:
    """Deliver ``chunk`` (one trigger, one group, in order) through the pool's runners.

    Returns the dead letters. Never raises for a handler's behaviour: a handler that raises, hangs
    past the timeout or kills its runner ends, after its attempts, as a dead letter.
    """
    timeout, count = chunk.timeout, len(chunk.records)
    start, attempt, eager, crashes, failure = 0, 1, False, 0, ""
    letters: list[dict[str, Any]] = []
    while start < count:
        runner = await pool.acquire()
        at, att, healthy, began = 0, attempt, False, time.monotonic()
        try:
            await runner.send_job(chunk, start, attempt, eager)
            while True:
                if timeout is None:
                    limit: float | None = None
                else:
                    limit = timeout + (STALL_GRACE if eager else tick(timeout) + STALL_GRACE)
                kind, index, number, new = await asyncio.wait_for(runner.receive(), limit)
                if kind == "failed":  # e.g. the handler does not unpickle there
                    failure = str(new)[-ERROR_CHARS:]
                    runner.loaded.clear()
                    break
                at, att = index, number
                letters.extend(new)
                if kind == "done":
                    healthy = True
                    return letters
                if kind == "timeout":
                    break
        except asyncio.TimeoutError:  # silent: frozen, or a handler holding the GIL
            kind = "silent"
        except (ConnectionError, OSError, EOFError, asyncio.IncompleteReadError) as exc:
            kind, failure = "died", describe(exc)[-ERROR_CHARS:]
        finally:
            if healthy or kind == "failed":
                await pool.release(runner, time.monotonic() - began)
            else:
                await pool.discard(runner)
        if kind == "timeout" or (kind == "silent" and eager):  # that attempt ran past the timeout
            start += at
            if att >= HANDLER_ATTEMPTS:
                error = f"handler timed out after {timeout} s"
                letters.append(letter(chunk.name, chunk.event(start), error, att))
                start, attempt = start + 1, 1
            else:
                attempt = att + 1
                await asyncio.sleep(HANDLER_BACKOFF * 2 ** (att - 1))
            continue
        if kind == "silent":  # find out exactly which attempt hangs: again from the last report
            start, attempt, eager = start + at, att, True
            continue
        start += at  # died or could not start: again from the last report
        attempt = max(att, 1)
        crashes += 1
        if crashes >= TASK_ATTEMPTS:
            error = f"delivery failed {crashes} times; the last: {failure}"
            letters.extend(letter(chunk.name, chunk.event(i), error, crashes) for i in range(start, count))
            return letters
        await asyncio.sleep(0.1 * 2 ** (crashes - 1))
    return letters


# -- dead letters that can always be stored ------------------------------------------------------
def letter_key(name: str, event_id: str) -> str:
    """The key of a dead letter: ``<trigger>|<event_id>``, or a hash of it when that is too long."""
    key = f"{name}|{event_id}"
    if len(key.encode()) <= MAX_NAME_BYTES:
        return key
    return "#" + hashlib.sha256(key.encode()).hexdigest()


def letter_value(letter: dict[str, Any], level: int) -> dict[str, Any]:
    """The stored form of a dead letter; higher ``level`` keeps less (0: everything).

    Level 1 replaces the event's values by a short description with their size and cuts the error
    text; level 2 keeps only the sizes. What was left out is said in the error text.
    """
    event: StateEvent = letter["event"]
    error = str(letter["error"])
    body = event.model_dump()
    if level == 0:
        return {**letter, "event": body, "error": error}
    keep = 200 if level == 1 else 0
    for field in ("old_value", "new_value"):
        body[field] = _summary(body[field], keep)
    error = error[: ERROR_CHARS if level == 1 else 200]
    error += TRUNCATED
    return {**letter, "event": body, "error": error}


def _summary(value: Any, keep: int) -> Any:
    if value is None or isinstance(value, (bool, int, float)):
        return value
    try:
        size = len(cloudpickle.dumps(value))
    except Exception:
        size = -1
    text = "" if keep == 0 else ": " + _repr(value)[:keep]
    return f"<{type(value).__name__}, {size} bytes pickled{text}>"


def _repr(value: Any) -> str:
    try:
        return repr(value)
    except Exception as exc:
        return f"<repr failed: {type(exc).__name__}>"

