"""``StateClient`` (sync) and ``AsyncStateClient``: the public API, two thin fronts on one core.

A client fetches the cluster's shard map from the router once and then sends each call to the shard
that owns the group, over the shard's own authenticated connection (or as a Ray actor call with
``transport="ray"``): the router is not on the data path. Everything between a call and its answer
(routing, coalescing into batches, retries while a shard restarts, redirects, deferrals, decoding)
is the client core in ``_core``, written once; the two fronts differ only in how they wait
(blocking, or awaiting). Request builders (``_requests``) check input before anything is sent.
"""

from __future__ import annotations

import asyncio
import builtins
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, overload

from shardstate import _core, _triggers
from shardstate._coalesce import async_lanes, sync_lanes
from shardstate._link import ClusterLink, ShardView
from shardstate._models import (
    ConsoleInfo,
    DeadLetter,
    Entry,
    ItemPage,
    SetResult,
    StateEvent,
    StateItem,
    TriggerInfo,
)
from shardstate._pipeline import AsyncPipeline, Pipeline, first_error
from shardstate._requests import (
    Page,
    Request,
    clear_request,
    delete_request,
    entry_request,
    get_request,
    items_request,
    list_request,
    page_request,
    set_request,
    update_request,
)
from shardstate.cluster.slots import slot_of
from shardstate.shards.validation import check_name

__all__ = ["AsyncStateClient", "ClusterLink", "ShardView", "StateClient"]

#: What a write answers: both values (default), only the new or the old one, or nothing.
Returning = Literal["both", "new", "old", "none"]
_Values = Literal["both", "new", "old"]


class _ClientBase:
    """What both clients share: the link, introspection, closing, and pickling to a small handle."""

    _kind = "sync"

    def __init__(self, link: ClusterLink) -> None:
        self._link = link

    @property
    def cluster(self) -> str:
        """The state cluster's name."""
        return self._link.cluster

    @property
    def config(self) -> dict[str, Any]:
        """The cluster's settings (name, shards, storage, max_value_size, ...)."""
        return dict(self._link.config)

    @property
    def transport(self) -> str:
        """How calls reach the shards: ``"socket"`` (their own connections) or ``"ray"``."""
        return self._link.transport

    @property
    def router(self) -> Any:
        """The router actor's handle (it exposes the same methods, for handle-only callers)."""
        return self._link.router

    @property
    def closed(self) -> bool:
        """True once the client was closed or its cluster shut down."""
        return self._link.closed

    def close(self) -> None:
        """Stop using this client (the cluster keeps running); later calls raise ``Unavailable``."""
        self._link.close()

    def __reduce__(self) -> tuple[Any, ...]:
        from shardstate._connect import _reattach

        link = self._link
        return (_reattach, (link.cluster, self._kind, link.timeout, link.retry_timeout, link.transport))

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self._link.config.get('shards')} shards"
        return f"<{type(self).__name__} cluster={self.cluster!r} {state}>"


class StateClient(_ClientBase):
    """Synchronous client: every method blocks until the owning shard has answered.

    Thread-safe. Obtain one with ``shardstate.connect()``; pass it to Ray tasks freely (it pickles to
    the cluster's name and re-attaches on the other side).
    """

    def _run(self, req: Request) -> Any:
        """Send ``req`` through its shard's lane (coalesced with concurrent calls of this process)."""
        link = self._link
        link.check_open()
        value = sync_lanes(link).call(link.current().owners[slot_of(req.group_id)], req)
        return _core.run_sync(link, _core.rest(link, value)) if isinstance(value, Page) else value

    def _run_many(self, reqs: Sequence[Request]) -> builtins.list[tuple[bool, Any]]:
        """Send many requests, one batch per shard; ``(True, value)`` or ``(False, error)`` each, in order."""
        self._link.check_open()
        return _core.run_sync(self._link, _core.call_many(self._link, reqs))  # type: ignore[no-any-return]

    @overload
    def set(
        self,
        group_id: str,
        key: str,
        value: Any,
        *,
        ttl: float | None = ...,
        expected_version: int | None = ...,
        op_id: str | None = ...,
        returning: _Values = ...,
    ) -> SetResult: ...

    @overload
    def set(
        self,
        group_id: str,
        key: str,
        value: Any,
        *,
        ttl: float | None = ...,
        expected_version: int | None = ...,
        op_id: str | None = ...,
        returning: Literal["none"],
    ) -> None: ...

    def set(
        self,
        group_id: str,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        expected_version: int | None = None,
        op_id: str | None = None,
        returning: Returning = "both",
    ) -> SetResult | None:
        """Store ``value`` under ``key`` in ``group_id``; return the old and new value.

        ``ttl``: seconds until the entry expires. ``expected_version``: write only if the entry's
        version is this (0: only if absent), else :class:`ConflictError`. ``op_id``: names this call
        on this key: a repeat of the same call returns the first call's result and writes nothing
        again; the same op_id on another key is another write; on this key with a different call it
        raises :class:`InvalidInput` and changes nothing. ``returning``: ``"both"`` (default),
        ``"new"`` or ``"old"`` (only that value; the other is None), ``"none"`` (returns None: no
        value travels back, so the call's cost does not grow with the value, e.g. fan-in into one
        large document).
        """
        req = set_request(
            group_id,
            key,
            value,
            self._link.max_value_size,
            op_id=op_id,
            ttl=ttl,
            expected_version=expected_version,
            returning=returning,
        )
        return self._run(req)  # type: ignore[no-any-return]

    def get(self, group_id: str, key: str) -> Any:
        """The value of ``key`` in ``group_id``, or None if absent."""
        return self._run(get_request(group_id, key))

    def get_entry(self, group_id: str, key: str) -> Entry | None:
        """The value of ``key`` with its version and times, or None if absent."""
        return self._run(entry_request(group_id, key))  # type: ignore[no-any-return]

    def delete(
        self, group_id: str, key: str, *, expected_version: int | None = None, op_id: str | None = None
    ) -> Any:
        """Remove ``key``; return its old value, or None if it was absent (options as for ``set``)."""
        return self._run(delete_request(group_id, key, op_id=op_id, expected_version=expected_version))

    def list(self, group_id: str) -> builtins.list[Any]:
        """Every value in ``group_id``, in insertion order."""
        return self._run(list_request(group_id))  # type: ignore[no-any-return]

    def items(self, group_id: str) -> builtins.list[StateItem]:
        """Every ``StateItem(key, value)`` in ``group_id``, in insertion order."""
        return self._run(items_request(group_id))  # type: ignore[no-any-return]

    def clear(self, group_id: str) -> int:
        """Remove every item of ``group_id``; return how many there were."""
        return self._run(clear_request(group_id))  # type: ignore[no-any-return]

    @overload
    def update(
        self,
        group_id: str,
        key: str,
        ops: Sequence[Any],
        *,
        ttl: float | None = ...,
        expected_version: int | None = ...,
        op_id: str | None = ...,
        returning: _Values = ...,
    ) -> SetResult: ...

    @overload
    def update(
        self,
        group_id: str,
        key: str,
        ops: Sequence[Any],
        *,
        ttl: float | None = ...,
        expected_version: int | None = ...,
        op_id: str | None = ...,
        returning: Literal["none"],
    ) -> None: ...

    def update(
        self,
        group_id: str,
        key: str,
        ops: Sequence[Any],
        *,
        ttl: float | None = None,
        expected_version: int | None = None,
        op_id: str | None = None,
        returning: Returning = "both",
    ) -> SetResult | None:
        """Apply ``ops`` to ``key`` atomically (all or nothing); return the old and new value.

        Options as for ``set``; without ``ttl`` an entry keeps the expiry it had.
        """
        req = update_request(
            group_id,
            key,
            ops,
            op_id=op_id,
            ttl=ttl,
            expected_version=expected_version,
            returning=returning,
        )
        return self._run(req)  # type: ignore[no-any-return]

    def list_groups(self) -> builtins.list[str]:
        """Every non-empty group of the cluster, sorted (asks every shard)."""
        self._link.check_open()
        return _core.run_sync(self._link, _core.list_groups(self._link))  # type: ignore[no-any-return]

    def group_counts(self) -> dict[str, int]:
        """Every non-empty user group with its item count, sorted by group (the shards keep the
        counts: no group is scanned)."""
        self._link.check_open()
        return _core.run_sync(self._link, _core.group_counts(self._link))  # type: ignore[no-any-return]

    def page(
        self, group_id: str, *, limit: int = 100, cursor: str | None = None, prefix: str | None = None
    ) -> ItemPage:
        """One page of ``group_id``'s items (key, value, version) in key order, whose keys start with
        ``prefix``; pass ``next_cursor`` back as ``cursor`` for the next page. A scan's cursors stay
        valid while others write: no key that exists for the whole scan is skipped or repeated."""
        return self._run(page_request(group_id, limit=limit, cursor=cursor, prefix=prefix))  # type: ignore[no-any-return]

    def start_console(self, host: str = "127.0.0.1", port: int = 8300) -> ConsoleInfo:
        """Start the cluster's console (web console and HTTP API v1) if it is not running; return
        its URL and bearer token (the running one's, if there is one). ``port=0`` picks a free port."""
        from shardstate.cluster.console import start_console

        return start_console(self.cluster, host, port)

    def shard_info(self) -> builtins.list[dict[str, Any]]:
        """Each shard's index, pid, node and size (for operators and tests)."""
        return self._link.ask("shard_info")  # type: ignore[no-any-return]

    # -- batches ------------------------------------------------------------------------------
    def pipeline(self) -> Pipeline:
        """Queue calls and send them together (one actor call per shard); see :class:`Pipeline`."""
        return Pipeline(self)

    def set_many(
        self, group_id: str, values: Mapping[str, Any], *, ttl: float | None = None, returning: str = "both"
    ) -> builtins.list[SetResult | None]:
        """Set many keys of one group in one call; raises the first error (the others still apply)."""
        limit = self._link.max_value_size
        reqs = [set_request(group_id, k, v, limit, ttl=ttl, returning=returning) for k, v in values.items()]
        return first_error(self._run_many(reqs))

    def get_many(self, group_id: str, keys: Sequence[str]) -> builtins.list[Any]:
        """The values of many keys of one group (None where absent), in one call."""
        return first_error(self._run_many([get_request(group_id, k) for k in keys]))

    # -- triggers, watching, waiting ----------------------------------------------------------
    def on_change(
        self,
        handler: Callable[..., Any],
        group_id: str | None = None,
        key: str | None = None,
        condition: Callable[[StateEvent], bool] | None = None,
        name: str | None = None,
        *,
        timeout: float = 60.0,
    ) -> str:
        """Register a durable trigger: run ``handler(event)`` (a Ray task) for every matching change.

        ``group_id``/``key`` are exact-match filters (None: any); ``condition(event)`` decides per
        event. Delivery is at least once, in commit order per group, of the changes committed from
        now on; ``event.event_id`` is stable across redeliveries. An attempt running longer than
        ``timeout`` seconds is cancelled and counts as failed (retried, then a dead letter).
        Re-registering a ``name`` replaces it. Returns the trigger's name.
        """
        name, record = _triggers.trigger_record(handler, group_id, key, condition, name, timeout)
        _triggers.system_set(self, _triggers.TRIGGERS_GROUP, name, record)
        self._subscribers_ready()
        return name

    def trigger(
        self,
        group_id: str | None = None,
        key: str | None = None,
        condition: Callable[[StateEvent], bool] | None = None,
        name: str | None = None,
        *,
        timeout: float = 60.0,
    ) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """Decorator form of :meth:`on_change`: ``@state.trigger(group_id="orders")``."""

        def register(handler: Callable[..., Any]) -> Callable[..., Any]:
            self.on_change(handler, group_id, key, condition, name, timeout=timeout)
            return handler

        return register

    def remove_trigger(self, name: str) -> bool:
        """Unregister trigger ``name``; False if there was none."""
        check_name(name, "name")
        removed = _triggers.system_delete(self, _triggers.TRIGGERS_GROUP, name) is not None
        self._subscribers_ready()
        return removed

    def list_triggers(self) -> builtins.list[TriggerInfo]:
        """The registered triggers."""
        return [_triggers.info(item.value) for item in self.items(_triggers.TRIGGERS_GROUP)]

    def list_dead_letters(self) -> builtins.list[DeadLetter]:
        """Events whose handler kept failing, with the last error."""
        return [_triggers.dead_letter(item.value) for item in self.items(_triggers.DEAD_LETTERS_GROUP)]

    def retry_dead_letter(self, trigger: str, event_id: str) -> bool:
        """Run trigger ``trigger``'s handler again on its dead-lettered event ``event_id``.

        It runs in the cluster as a delivery does (a subscriber's runner; the trigger's condition,
        timeout, attempts and backoff apply). If it succeeds the dead letter is removed and this
        returns True. If it fails again the dead letter stays, with the new error and its
        ``attempts`` increased by this retry's, and this returns False. Returns False too when there
        is no such dead letter (unknown trigger or event_id). Raises :class:`InvalidInput` if the
        trigger was removed since (or the letter was stored without its event's values).
        """
        return _triggers.retry_dead_letter(self, trigger, event_id)

    def watch(self, group_id: str | None = None, *, timeout: float | None = None) -> Iterator[StateEvent]:
        """Stream live events (of ``group_id``, or all) from now on; ends after ``timeout`` if given."""
        return _triggers.watch(self, group_id, timeout=timeout)

    def wait_until(
        self, group_id: str, key: str, predicate: Callable[[Any], bool], timeout: float | None = None
    ) -> Any:
        """Block until ``predicate(value)`` holds for ``key``; return the value (``WaitTimeout`` if not)."""
        return _triggers.wait_until(self, group_id, key, predicate, timeout)

    def _subscribers_ready(self) -> None:
        self._link.ask("subscribers_ready")

    def __enter__(self) -> StateClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStateClient(_ClientBase):
    """Asyncio client: the same methods as :class:`StateClient`, awaitable.

    Obtain one with ``await shardstate.connect_async()``. Many concurrent calls from one event loop
    are in flight at once; calls to one shard from one client keep their order.
    """

    _kind = "async"

    async def _run(self, req: Request) -> Any:
        """Send ``req`` through its shard's lane on this event loop (coalesced with concurrent calls)."""
        link = self._link
        link.check_open()
        view = await link.first_view()  # no wait once known; before that, queued in call order
        value = await async_lanes(link).call(view.owners[slot_of(req.group_id)], req)
        return await _core.run_async(link, _core.rest(link, value)) if isinstance(value, Page) else value

    async def _run_many(self, reqs: Sequence[Request]) -> builtins.list[tuple[bool, Any]]:
        """Send many requests, one batch per shard; ``(True, value)`` or ``(False, error)`` each, in order."""
        self._link.check_open()
        return await _core.run_async(self._link, _core.call_many(self._link, reqs))  # type: ignore[no-any-return]

    @overload
    async def set(
        self,
        group_id: str,
        key: str,
        value: Any,
        *,
        ttl: float | None = ...,
        expected_version: int | None = ...,
        op_id: str | None = ...,
        returning: _Values = ...,
    ) -> SetResult: ...

    @overload
    async def set(
        self,
        group_id: str,
        key: str,
        value: Any,
        *,
        ttl: float | None = ...,
        expected_version: int | None = ...,
        op_id: str | None = ...,
        returning: Literal["none"],
    ) -> None: ...

    async def set(
        self,
        group_id: str,
        key: str,
        value: Any,
        *,
        ttl: float | None = None,
        expected_version: int | None = None,
        op_id: str | None = None,
        returning: Returning = "both",
    ) -> SetResult | None:
        """Store ``value`` under ``key`` in ``group_id``; return the old and new value.

        ``ttl``: seconds until the entry expires. ``expected_version``: write only if the entry's
        version is this (0: only if absent), else :class:`ConflictError`. ``op_id``: names this call
        on this key: a repeat of the same call returns the first call's result and writes nothing
        again; the same op_id on another key is another write; on this key with a different call it
        raises :class:`InvalidInput` and changes nothing. ``returning``: ``"both"`` (default),
        ``"new"`` or ``"old"`` (only that value; the other is None), ``"none"`` (returns None: no
        value travels back, so the call's cost does not grow with the value, e.g. fan-in into one
        large document).
        """
        req = set_request(
            group_id,
            key,
            value,
            self._link.max_value_size,
            op_id=op_id,
            ttl=ttl,
            expected_version=expected_version,
            returning=returning,
        )
        return await self._run(req)  # type: ignore[no-any-return]

    async def get(self, group_id: str, key: str) -> Any:
        """The value of ``key`` in ``group_id``, or None if absent."""
        return await self._run(get_request(group_id, key))

    async def get_entry(self, group_id: str, key: str) -> Entry | None:
        """The value of ``key`` with its version and times, or None if absent."""
        return await self._run(entry_request(group_id, key))  # type: ignore[no-any-return]

    async def delete(
        self, group_id: str, key: str, *, expected_version: int | None = None, op_id: str | None = None
    ) -> Any:
        """Remove ``key``; return its old value, or None if it was absent (options as for ``set``)."""
        return await self._run(delete_request(group_id, key, op_id=op_id, expected_version=expected_version))

    async def list(self, group_id: str) -> builtins.list[Any]:
        """Every value in ``group_id``, in insertion order."""
        return await self._run(list_request(group_id))  # type: ignore[no-any-return]

    async def items(self, group_id: str) -> builtins.list[StateItem]:
        """Every ``StateItem(key, value)`` in ``group_id``, in insertion order."""
        return await self._run(items_request(group_id))  # type: ignore[no-any-return]

    async def clear(self, group_id: str) -> int:
        """Remove every item of ``group_id``; return how many there were."""
        return await self._run(clear_request(group_id))  # type: ignore[no-any-return]

    @overload
    async def update(
        self,
        group_id: str,
        key: str,
        ops: Sequence[Any],
        *,
        ttl: float | None = ...,
        expected_version: int | None = ...,
        op_id: str | None = ...,
        returning: _Values = ...,
    ) -> SetResult: ...

    @overload
    async def update(
        self,
        group_id: str,
        key: str,
        ops: Sequence[Any],
        *,
        ttl: float | None = ...,
        expected_version: int | None = ...,
        op_id: str | None = ...,
        returning: Literal["none"],
    ) -> None: ...

    async def update(
        self,
        group_id: str,
        key: str,
        ops: Sequence[Any],
        *,
        ttl: float | None = None,
        expected_version: int | None = None,
        op_id: str | None = None,
        returning: Returning = "both",
    ) -> SetResult | None:
        """Apply ``ops`` to ``key`` atomically (all or nothing); return the old and new value.

        Options as for ``set``; without ``ttl`` an entry keeps the expiry it had.
        """
        req = update_request(
            group_id,
            key,
            ops,
            op_id=op_id,
            ttl=ttl,
            expected_version=expected_version,
            returning=returning,
        )
        return await self._run(req)  # type: ignore[no-any-return]

    async def list_groups(self) -> builtins.list[str]:
        """Every non-empty group of the cluster, sorted (asks every shard)."""
        self._link.check_open()
        return await _core.run_async(self._link, _core.list_groups(self._link))  # type: ignore[no-any-return]

    async def group_counts(self) -> dict[str, int]:
        """Every non-empty user group with its item count, sorted by group."""
        self._link.check_open()
        return await _core.run_async(self._link, _core.group_counts(self._link))  # type: ignore[no-any-return]

    async def page(
        self, group_id: str, *, limit: int = 100, cursor: str | None = None, prefix: str | None = None
    ) -> ItemPage:
        """One page of ``group_id``'s items in key order (see ``StateClient.page``)."""
        return await self._run(page_request(group_id, limit=limit, cursor=cursor, prefix=prefix))  # type: ignore[no-any-return]

    async def start_console(self, host: str = "127.0.0.1", port: int = 8300) -> ConsoleInfo:
        """See ``StateClient.start_console``."""
        from shardstate.cluster.console import start_console

        return await asyncio.to_thread(start_console, self.cluster, host, port)

    async def shard_info(self) -> builtins.list[dict[str, Any]]:
        """Each shard's index, pid, node and size (for operators and tests)."""
        return await self._link.ask_async("shard_info")  # type: ignore[no-any-return]

    # -- batches ------------------------------------------------------------------------------
    def pipeline(self) -> AsyncPipeline:
        """Queue calls and send them together (one actor call per shard); ``async with`` it."""
        return AsyncPipeline(self)

    async def set_many(
        self, group_id: str, values: Mapping[str, Any], *, ttl: float | None = None, returning: str = "both"
    ) -> builtins.list[SetResult | None]:
        """Set many keys of one group in one call; raises the first error (the others still apply)."""
        limit = self._link.max_value_size
        reqs = [set_request(group_id, k, v, limit, ttl=ttl, returning=returning) for k, v in values.items()]
        return first_error(await self._run_many(reqs))

    async def get_many(self, group_id: str, keys: Sequence[str]) -> builtins.list[Any]:
        """The values of many keys of one group (None where absent), in one call."""
        return first_error(await self._run_many([get_request(group_id, k) for k in keys]))

    # -- triggers, watching, waiting (the sync implementation, off the event loop) ---------------
    def _sync(self) -> StateClient:
        return StateClient(self._link)

    async def on_change(
        self,
        handler: Callable[..., Any],
        group_id: str | None = None,
        key: str | None = None,
        condition: Callable[[StateEvent], bool] | None = None,
        name: str | None = None,
        *,
        timeout: float = 60.0,
    ) -> str:
        """See :meth:`StateClient.on_change`."""
        return await asyncio.to_thread(
            self._sync().on_change, handler, group_id, key, condition, name, timeout=timeout
        )

    async def remove_trigger(self, name: str) -> bool:
        """See :meth:`StateClient.remove_trigger`."""
        return await asyncio.to_thread(self._sync().remove_trigger, name)

    async def list_triggers(self) -> builtins.list[TriggerInfo]:
        """See :meth:`StateClient.list_triggers`."""
        return await asyncio.to_thread(self._sync().list_triggers)

    async def list_dead_letters(self) -> builtins.list[DeadLetter]:
        """See :meth:`StateClient.list_dead_letters`."""
        return await asyncio.to_thread(self._sync().list_dead_letters)

    async def retry_dead_letter(self, trigger: str, event_id: str) -> bool:
        """See :meth:`StateClient.retry_dead_letter`."""
        return await asyncio.to_thread(self._sync().retry_dead_letter, trigger, event_id)

    async def watch(
        self, group_id: str | None = None, *, timeout: float | None = None
    ) -> AsyncIterator[StateEvent]:
        """See :meth:`StateClient.watch` (an async iterator)."""
        events = await asyncio.to_thread(self._sync().watch, group_id, timeout=timeout)
        done = object()
        while True:
            event = await asyncio.to_thread(next, events, done)
            if event is done:
                return
            yield event  # type: ignore[misc]

    async def wait_until(
        self, group_id: str, key: str, predicate: Callable[[Any], bool], timeout: float | None = None
    ) -> Any:
        """See :meth:`StateClient.wait_until`."""
        return await asyncio.to_thread(self._sync().wait_until, group_id, key, predicate, timeout)

    async def __aenter__(self) -> AsyncStateClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
