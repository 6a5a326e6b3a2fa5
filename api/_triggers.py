"""State triggers, watching and waiting, for the sync client (the async client wraps these).

A trigger is stored durably in the cluster's own state (the system group ``__shardstate:triggers``),
so it survives restarts until ``remove_trigger``; the subscriber actors run it. ``watch`` and
``wait_until`` follow the events the shards push over their own connections (what the
subscribers are pushed too), from the moment they start (:mod:`shardstate._watch`).
"""

from __future__ import annotations

import math
import time
from collections.abc import AsyncGenerator, Callable, Generator
from typing import TYPE_CHECKING, Any

import cloudpickle
import ray
from ray.exceptions import RayError

from shardstate._errors import InvalidInput, StateError, Unavailable
from shardstate._models import DeadLetter, StateEvent, TriggerInfo
from shardstate._requests import delete_request, set_request
from shardstate._watch import follow_events, follow_events_async
from shardstate.cluster import subscriber as sub
from shardstate.cluster.config import NAMESPACE, ClusterConfig
from shardstate.cluster.delivery import DEFAULT_HANDLER_TIMEOUT
from shardstate.cluster.router import subscriber_count
from shardstate.cluster.slots import slot_of
from shardstate.cluster.subscriber import DEAD_LETTERS_GROUP, TRIGGERS_GROUP
from shardstate.shards.validation import check_name

if TYPE_CHECKING:
    from shardstate._client import StateClient

POLL = 0.02


class WaitTimeout(StateError, TimeoutError):
    """``wait_until`` ran out of time before the predicate held."""


def system_set(state: StateClient, group_id: str, key: str, value: Any) -> None:
    """Every write a client makes to a system group (the trigger registry) goes through here."""
    state._run(set_request(group_id, key, value, state._link.max_value_size, system=True))


def system_delete(state: StateClient, group_id: str, key: str) -> Any:
    """Every delete a client makes in a system group goes through here; returns the old value."""
    return state._run(delete_request(group_id, key, system=True))


def trigger_record(
    handler: Callable[..., Any],
    group_id: str | None,
    key: str | None,
    condition: Callable[[StateEvent], bool] | None,
    name: str | None,
    timeout: float = DEFAULT_HANDLER_TIMEOUT,
) -> tuple[str, dict[str, Any]]:
    """Check a trigger's arguments; return its name and the record stored for it.

    ``timeout``: seconds one handler attempt may run (a positive number; ``math.inf``: no limit).
    """
    if not callable(handler) and not hasattr(handler, "remote"):
        raise InvalidInput(f"handler must be callable or a Ray remote function, got {type(handler).__name__}")
    if condition is not None and not callable(condition):
        raise InvalidInput(f"condition must be callable, got {type(condition).__name__}")
    if (
        not isinstance(timeout, (int, float))
        or isinstance(timeout, bool)
        or math.isnan(timeout)
        or timeout <= 0
    ):
        raise InvalidInput(f"timeout must be a positive number of seconds, got {timeout!r}")
    if group_id is not None:
        check_name(group_id, "group_id")
    if key is not None:
        check_name(key, "key")
    if name is None:
        base = getattr(handler, "__qualname__", None) or getattr(
            getattr(handler, "_function", None), "__qualname__", type(handler).__name__
        )
        name = f"{base}:{group_id or '*'}:{key or '*'}"
    check_name(name, "name")
    try:
        handler_blob = cloudpickle.dumps(handler)
        condition_blob = None if condition is None else cloudpickle.dumps(condition)
    except Exception as exc:
        raise InvalidInput(f"trigger handler/condition cannot be pickled: {exc}") from None
    record = {
        "name": name,
        "group_id": group_id,
        "key": key,
        "handler": handler_blob,
        "condition": condition_blob,
        "handler_name": getattr(handler, "__qualname__", repr(handler)),
        "timeout": float(timeout),
    }
    return name, record


def info(record: dict[str, Any]) -> TriggerInfo:
    """The public view of a stored trigger record."""
    return TriggerInfo(
        name=record["name"],
        group_id=record.get("group_id"),
        key=record.get("key"),
        has_condition=record.get("condition") is not None,
        handler=record.get("handler_name", ""),
    )


def dead_letter(value: dict[str, Any]) -> DeadLetter:
    """A stored dead letter as the public model."""
    return DeadLetter(**{**value, "event": StateEvent(**value["event"])})


def retry_dead_letter(state: StateClient, trigger: str, event_id: str) -> bool:
    """Run ``trigger``'s handler again on its dead letter of ``event_id`` (see
    :meth:`StateClient.retry_dead_letter`); True if it succeeded and the letter is gone.

    The subscriber that delivers the event's shard runs it, in its runners, as a delivery.
    """
    check_name(trigger, "trigger")
    if not isinstance(event_id, str) or not event_id:
        raise InvalidInput(f"event_id must be a non-empty str, got {event_id!r}")
    link = state._link
    link.check_open()
    config = ClusterConfig(**link.config)
    shard = event_id.rsplit("/", 2)[-2] if event_id.count("/") >= 2 else "0"
    index = (int(shard) if shard.isdigit() else 0) % subscriber_count(config.shards)
    answer = _ask_subscriber(config.subscriber_name(index), trigger, event_id, link.retry_timeout)
    if answer == sub.TRIGGER_GONE:
        raise InvalidInput(f"trigger {trigger!r} was removed: its dead letter {event_id!r} cannot run again")
    if answer == sub.NO_VALUES:
        raise InvalidInput(
            f"the dead letter of {trigger!r} for {event_id!r} was stored without its event's values "
            "(they did not fit max_value_size): there is nothing to run the handler on"
        )
    return answer == sub.RETRIED


def _ask_subscriber(name: str, trigger: str, event_id: str, patience: float) -> str:
    """Call ``retry_dead_letter`` on subscriber ``name``; wait up to ``patience`` seconds for a
    restarting subscriber. The call itself has no time limit: the trigger's timeout bounds each
    attempt of the handler."""
    started = time.monotonic()
    while True:
        try:
            handle: Any = ray.get_actor(name, namespace=NAMESPACE)
            return str(ray.get(handle.retry_dead_letter.remote(trigger, event_id)))
        except (ValueError, RayError) as exc:  # not there (yet), restarting, or died meanwhile
            if time.monotonic() - started > patience:
                raise Unavailable(f"subscriber {name!r} cannot retry the dead letter: {exc}") from exc
            time.sleep(0.2)


def watch(
    state: StateClient, group_id: str | None = None, *, poll: float = POLL, timeout: float | None = None
) -> Generator[StateEvent, None, None]:
    """Live events (of ``group_id``, or all user groups) committed from now on, in order per shard.

    The starting point is taken at once (before this returns): each followed shard pushes its
    events over its own connection from then on (see :mod:`shardstate._watch`; ``poll``: seconds
    between log reads of a shard that cannot be reached that way). The iterator then ends after
    ``timeout`` seconds if given, else runs until closed.
    """
    if group_id is not None:
        check_name(group_id, "group_id")
    link = state._link
    view = link.current()
    shards = [view.owners[slot_of(group_id)]] if group_id is not None else list(range(len(view.shards)))
    return follow_events(link, group_id, shards, poll, timeout)


def watch_async(
    state: Any, group_id: str | None = None, *, poll: float = POLL, timeout: float | None = None
) -> AsyncGenerator[StateEvent, None]:
    """:func:`watch` for the async client (``state``: an ``AsyncStateClient``), on asyncio streams:
    ``async for event in watch_async(astate, "orders", timeout=10)``. The starting point is taken
    when iteration starts."""
    if group_id is not None:
        check_name(group_id, "group_id")
    return follow_events_async(state._link, group_id, poll, timeout)


def wait_until(
    state: StateClient,
    group_id: str,
    key: str,
    predicate: Callable[[Any], bool],
    timeout: float | None = None,
) -> Any:
    """Block until ``predicate(value of key)`` holds; return that value (``WaitTimeout`` otherwise).

    Reads the value once, then follows the group's events (no re-reading of the value).
    """
    check_name(key, "key")
    events = watch(state, group_id, timeout=timeout)  # follow first, so no change slips through
    value = state.get(group_id, key)
    if predicate(value):
        events.close()
        return value
    for event in events:
        if event.key == key and predicate(event.new_value):
            events.close()
            return event.new_value
    raise WaitTimeout(f"{group_id!r}/{key!r} did not satisfy the predicate within {timeout}s")


__all__ = [
    "DEAD_LETTERS_GROUP",
    "TRIGGERS_GROUP",
    "WaitTimeout",
    "retry_dead_letter",
    "wait_until",
    "watch",
    "watch_async",
]
