"""Running a trigger's handler for a group's events: the Ray task, its watchdog, and dead letters.

A subscriber hands one (trigger, group) chunk of events to :func:`run_delivery`, which runs them in a
:func:`deliver` task (a Ray streaming generator, never inside a shard). The task calls the handler
for each event in order and retries one that raises with backoff; after the last attempt the event
becomes a dead letter and the next one proceeds.

Each handler attempt has a time limit (the trigger's ``timeout``). The task reports where it is
("about to start attempt ``a`` of event ``i``") at least every ``tick`` seconds, so following it costs
about nothing while handlers are quick; the subscriber's watchdog cancels a task that stops
reporting (``ray.cancel(..., force=True)`` kills a stuck worker) and starts it again from the last
report, now reporting before every attempt, so the next timeout is charged to exactly the attempt
that hung: a timed-out attempt counts as failed and follows the same retry / dead-letter policy.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
import traceback
from collections.abc import Iterator, Sequence
from typing import Any

import cloudpickle
import ray
from ray.exceptions import GetTimeoutError

from shardstate._models import StateEvent
from shardstate.shards.validation import MAX_NAME_BYTES

HANDLER_ATTEMPTS = 4
HANDLER_BACKOFF = 0.05
#: seconds one handler attempt may take unless the trigger says otherwise
DEFAULT_HANDLER_TIMEOUT = 60.0
#: a delivery task that dies (its worker crashed, not its handler raising) is started again this often
TASK_ATTEMPTS = 5
#: seconds a delivery task may take to start (a new worker process) before it counts as crashed
START_TIMEOUT = 120.0
#: a quick task reports only when done: with no report after ``timeout + tick + START_GRACE`` it
#: is started again reporting before every attempt (which tells a slow start from a stuck handler)
START_GRACE = 5.0
#: a handler's error text is kept up to this many characters in a dead letter
ERROR_CHARS = 2000


def tick(timeout: float | None) -> float:
    """How often (seconds) a task running handlers of this ``timeout`` reports while they are quick."""
    return 1.0 if timeout is None else min(1.0, timeout / 4)


def letter(name: str, event: StateEvent, error: str, attempts: int) -> dict[str, Any]:
    """A dead letter: the trigger, the event, the last error, how many attempts were made."""
    return {"trigger": name, "event": event, "error": error, "attempts": attempts, "at": time.time()}


def describe(exc: BaseException) -> str:
    """An exception as the one line a dead letter keeps."""
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


@ray.remote(num_cpus=0, max_retries=0)
def deliver(
    name: str,
    handler_blob: bytes,
    events: Sequence[StateEvent],
    timeout: float | None,
    first_attempt: int = 1,
    eager: bool = False,
) -> Iterator[tuple[int, int, list[dict[str, Any]]]]:
    """Run one trigger's handler for a group's events, in order (a streaming generator).

    Yields ``(index, attempt, dead letters since the last yield)``: "about to start attempt
    ``attempt`` of ``events[index]``", before an attempt whenever ``tick`` seconds passed since the
    task started or last yielded (``eager``: before every attempt, the first one too); finally
    ``(len(events), 0, letters)``. A quick task yields once: following it costs one object.
    ``first_attempt`` is the attempt number of ``events[0]`` (a
    restart after a timed-out attempt continues its count).
    """
    handler = cloudpickle.loads(handler_blob)
    every = 0.0 if eager else tick(timeout)
    last = -math.inf if eager else time.monotonic()  # quick tasks: no report before the first tick
    letters: list[dict[str, Any]] = []
    for index, event in enumerate(events):
        attempt = first_attempt if index == 0 else 1
        while True:
            now = time.monotonic()
            if now - last >= every:
                yield index, attempt, letters
                letters, last = [], now
            try:
                _call(handler, event, timeout)
                break
            except Exception as exc:
                if attempt >= HANDLER_ATTEMPTS:
                    letters.append(letter(name, event, describe(exc), attempt))
                    break
                time.sleep(HANDLER_BACKOFF * 2 ** (attempt - 1))
                attempt += 1
    yield len(events), 0, letters


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


async def run_delivery(
    name: str, handler_blob: bytes, events: list[StateEvent], timeout: float | None
) -> list[dict[str, Any]]:
    """Deliver ``events`` (one trigger, one group, in order) through :func:`deliver` tasks.

    Returns the dead letters. Never raises for a handler's behaviour: a handler that raises, hangs
    past ``timeout`` or kills its worker ends, after its attempts, as a dead letter.
    """
    start, attempt, eager, crashes, failure = 0, 1, False, 0, ""
    letters: list[dict[str, Any]] = []
    while start < len(events):
        gen = deliver.remote(name, handler_blob, events[start:], timeout, attempt, eager)
        at, att, reported = 0, attempt, False
        try:
            while True:
                if not reported:
                    quiet = START_TIMEOUT
                    if timeout is not None:
                        quiet = min(quiet, timeout + tick(timeout) + START_GRACE)
                    limit: float | None = START_TIMEOUT if eager else quiet
                elif timeout is None:
                    limit = None
                else:
                    limit = timeout if eager else timeout + tick(timeout)
                ref = await asyncio.wait_for(gen.__anext__(), limit)
                at, att, new = await ref
                reported = True
                letters.extend(new)
                if at == len(events) - start:
                    return letters
        except asyncio.TimeoutError:
            ray.cancel(gen, force=True)
            start += at
            if not reported and eager:
                crashes += 1  # never started: counted like a crashed worker
                failure = f"it did not start within {START_TIMEOUT} s"
            elif not eager:  # slow to start, or stuck after the last report: find out exactly where
                eager, attempt = True, att
                continue
            elif att >= HANDLER_ATTEMPTS:
                letters.append(letter(name, events[start], f"handler timed out after {timeout} s", att))
                start, attempt = start + 1, 1
                continue
            else:
                attempt = att + 1
                await asyncio.sleep(HANDLER_BACKOFF * 2 ** (att - 1))
                continue
        except Exception as exc:  # the task died (its worker crashed or was killed): again from the report
            start += at
            attempt = max(att, 1)
            crashes += 1
            failure = describe(exc)[-ERROR_CHARS:]
        if crashes >= TASK_ATTEMPTS:
            error = f"delivery task failed {crashes} times; the last: {failure}"
            letters.extend(letter(name, e, error, crashes) for e in events[start:])
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
    error += " [dead letter truncated: the values did not fit max_value_size]"
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
