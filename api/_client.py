"""``StateClient`` (sync) and ``AsyncStateClient``: the public API, routed straight to shard actors.

A client fetches the cluster's shard map from the router once and then sends each call to the shard
that owns the group: the router is not on the data path. A shard that no longer owns a group answers
:class:`StaleShardMap`; the client refetches the map and retries. Both clients share one
:class:`ClusterLink` and the request builders of ``_requests``, so they check and decode identically.
"""

from __future__ import annotations

import asyncio
import builtins
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, NamedTuple, overload

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from shardstate import _triggers
from shardstate._coalesce import AsyncLanes, Slot, SyncLanes, async_lanes, fits, pack, unpack
from shardstate._errors import Deferred, ShardLoading, StaleShardMap, StateError, Unavailable
from shardstate._models import DeadLetter, Entry, SetResult, StateEvent, StateItem, TriggerInfo
from shardstate._pipeline import AsyncPipeline, Pipeline, first_error
from shardstate._requests import (
    GROUPS_COMMAND,
    Page,
    Request,
    clear_request,
    decode_payload,
    delete_request,
    entry_request,
    get_request,
    items_request,
    list_request,
    merge_groups,
    next_page,
    request_bytes,
    set_request,
    update_request,
)
from shardstate._retry import Backoff
from shardstate.cluster.slots import slot_of
from shardstate.shards.validation import check_name

#: What a write answers: both values (default), only the new or the old one, or nothing.
Returning = Literal["both", "new", "old", "none"]
_Values = Literal["both", "new", "old"]

#: How many times a call follows a "stale shard map" answer before giving up.
MAX_REDIRECTS = 5


class ShardView(NamedTuple):
    """A snapshot of the router's shard map."""

    epoch: int
    owners: tuple[int, ...]
    shards: list[Any]

    def shard_for(self, group_id: str) -> Any:
        """The handle of the shard owning ``group_id``."""
        return self.shards[self.owners[slot_of(group_id)]]


class ClusterLink:
    """One process's connection to one state cluster: router handle, settings, cached shard map."""

    def __init__(
        self, cluster: str, router: Any, config: dict[str, Any], timeout: float, retry_timeout: float = 60.0
    ) -> None:
        self.cluster = cluster
        self.router = router
        self.config = config
        self.timeout = timeout
        self.retry_timeout = retry_timeout
        self.max_value_size: int = config["max_value_size"]
        self.closed = False
        self._lock = threading.Lock()
        self.lanes = SyncLanes(self)
        #: the asyncio lanes last used, with their loop (see ``async_lanes``)
        self.async_lanes: tuple[weakref.ref[asyncio.AbstractEventLoop], AsyncLanes] | None = None
        self.view: ShardView | None = None
        #: shard -> when it was first found loading (cleared by its next answer)
        self.loading_since: dict[int, float] = {}

    def wait_for_load(self, shard: int, error: ShardLoading) -> float:
        """Seconds to wait before sending to a loading shard again; ``Unavailable`` once it has been
        loading for longer than ``retry_timeout``."""
        self.check_open()
        since = self.loading_since.setdefault(shard, time.monotonic())
        if time.monotonic() - since > self.retry_timeout:
            self.loading_since.pop(shard, None)
            raise Unavailable(
                f"a shard of state cluster {self.cluster!r} did not finish loading within "
                f"{self.retry_timeout}s: {error}"
            )
        return 0.05

    def check_open(self) -> None:
        """Raise :class:`Unavailable` if this link was closed (e.g. by ``shutdown()``)."""
        if self.closed:
            raise Unavailable(f"state cluster {self.cluster!r} was shut down (or this client was closed)")

    def _adopt(self, snapshot: tuple[int, tuple[int, ...], list[Any]]) -> ShardView:
        with self._lock:
            if self.view is None or snapshot[0] >= self.view.epoch:
                self.view = ShardView(*snapshot)
            return self.view

    def current(self) -> ShardView:
        """The cached map, fetched (sync) on first use."""
        view = self.view
        return view if view is not None else self.refresh()

    def refresh(self) -> ShardView:
        """Fetch the map from the router (blocking)."""
        self.check_open()
        try:
            return self._adopt(ray.get(self.router.shard_map.remote(), timeout=self.timeout))
        except (RayError, GetTimeoutError) as exc:
            raise self.unavailable(exc) from exc

    async def refresh_async(self) -> ShardView:
        """Fetch the map from the router (awaitable)."""
        self.check_open()
        try:
            snapshot = await asyncio.wait_for(self.router.shard_map.remote(), self.timeout)
        except (RayError, asyncio.TimeoutError) as exc:
            raise self.unavailable(exc) from exc
        return self._adopt(snapshot)

    def unavailable(self, exc: BaseException) -> Unavailable:
        """Translate a Ray failure into :class:`Unavailable`."""
        if isinstance(exc, (GetTimeoutError, asyncio.TimeoutError)):
            return Unavailable(f"state cluster {self.cluster!r} did not answer within {self.timeout}s")
        if isinstance(exc, RayActorError):
            return Unavailable(f"a shard of state cluster {self.cluster!r} is unavailable: {exc}")
        return Unavailable(f"state cluster {self.cluster!r} is unavailable: {type(exc).__name__}: {exc}")


def _follow(result: tuple[bool, Any], req: Request) -> tuple[bool, Any]:
    """``(done, value)``: decode an ok result, raise an error result, or ask to retry (a redirect,
    or a shard still loading: the value is then that error)."""
    ok, payload = result
    if ok:
        return True, decode_payload(req, payload)
    if isinstance(payload, (StaleShardMap, ShardLoading, Deferred)):
        return False, payload
    if isinstance(payload, StateError):
        raise payload
    raise StateError(f"shard returned a malformed result: {payload!r}")


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
        """The cluster's settings (name, shards, storage, max_value_size)."""
        return dict(self._link.config)

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
        self._link.closed = True

    def __reduce__(self) -> tuple[Any, ...]:
        from shardstate._connect import _reattach

        return (_reattach, (self._link.cluster, self._kind, self._link.timeout, self._link.retry_timeout))

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
        shard = link.current().owners[slot_of(req.group_id)]
        value = link.lanes.call(shard, req, self._run_direct)
        return self._rest(value) if isinstance(value, Page) else value

    def _rest(self, page: Page) -> builtins.list[Any]:
        """All rows of a paged ``list``/``items`` answer, from its first page on."""
        rows = builtins.list(page.rows)
        value: Any = page
        while isinstance(value, Page):
            link = self._link
            req = next_page(value)
            value = link.lanes.call(link.current().owners[slot_of(req.group_id)], req, self._run_direct)
            rows.extend(value.rows if isinstance(value, Page) else value)
        return rows

    def _run_direct(self, req: Request) -> Any:
        """Send ``req`` alone (following redirects, retrying while its shard restarts)."""
        link = self._link
        link.check_open()
        backoff: Backoff | None = None
        redirects = 0
        while True:
            shard = link.current().shard_for(req.group_id)
            try:
                (result,) = unpack(ray.get(shard.run.remote(pack([req.cmd])), timeout=link.timeout))
            except RayActorError as exc:  # the shard died mid-call: it restarts from storage
                backoff = backoff or Backoff(link)
                time.sleep(backoff.next_delay(exc))
                continue
            except (RayError, GetTimeoutError) as exc:
                link.check_open()
                raise link.unavailable(exc) from exc
            done, value = _follow(result, req)
            if done:
                return value
            if isinstance(value, (ShardLoading, Deferred)):  # wait (within retry_timeout), then again
                backoff = backoff or Backoff(link)
                time.sleep(backoff.next_delay(value))
                continue
            redirects += 1
            if redirects >= MAX_REDIRECTS:
                raise Unavailable(
                    f"shard map of {link.cluster!r} kept changing; gave up after {redirects} tries"
                )
            link.refresh()

    def _run_many(self, reqs: Sequence[Request]) -> builtins.list[tuple[bool, Any]]:
        """Send many requests, one call per shard; ``(True, value)`` or ``(False, error)`` each, in order.

        Requests larger together than a batch's byte budget leave in several rounds, in order.
        """
        out: builtins.list[tuple[bool, Any]] = []
        while len(out) < len(reqs):
            count = fits([request_bytes(r) for r in reqs[len(out) :]])
            out.extend(self._run_round(reqs[len(out) : len(out) + count]))
        return out

    def _run_round(self, reqs: Sequence[Request]) -> builtins.list[tuple[bool, Any]]:
        link = self._link
        link.check_open()
        view = link.current()
        by_shard: dict[int, builtins.list[int]] = {}
        for i, req in enumerate(reqs):
            by_shard.setdefault(view.owners[slot_of(req.group_id)], []).append(i)
        out: builtins.list[tuple[bool, Any]] = [(False, None)] * len(reqs)
        backoff: Backoff | None = None
        pending = by_shard
        packed = {s: pack([reqs[i].cmd for i in idx]) for s, idx in by_shard.items()}  # before any send
        while pending:
            refs = {s: view.shards[s].run.remote(packed[s]) for s in pending}
            failed: dict[int, builtins.list[int]] = {}
            for s, ref in refs.items():
                try:
                    results = unpack(ray.get(ref, timeout=link.timeout))
                except RayActorError as exc:
                    backoff = backoff or Backoff(link)
                    time.sleep(backoff.next_delay(exc))
                    failed[s] = pending[s]
                    continue
                except (RayError, GetTimeoutError) as exc:
                    raise link.unavailable(exc) from exc
                if len(results) != len(pending[s]):  # the shard could not take the batch whole
                    results = [(False, StaleShardMap("resent on its own"))] * len(pending[s])
                deferred = [i for i, r in zip(pending[s], results, strict=True) if isinstance(r[1], Deferred)]
                if deferred:  # the answer was large, or the shard is loading: send the rest again
                    failed[s] = deferred
                    packed[s] = pack([reqs[i].cmd for i in deferred])
                    loading = results[len(results) - len(deferred)][1]
                    if isinstance(loading, ShardLoading):
                        time.sleep(link.wait_for_load(s, loading))
                for i, result in zip(pending[s], results, strict=True):
                    if isinstance(result[1], Deferred):
                        continue
                    try:
                        done, value = _follow(result, reqs[i])
                        out[i] = (True, value) if done else (True, self._run_direct(reqs[i]))
                        if isinstance(out[i][1], Page):
                            out[i] = (True, self._rest(out[i][1]))
                    except StateError as exc:
                        out[i] = (False, exc)
            pending = failed
        return out

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
        link = self._link
        link.check_open()
        try:
            refs = [s.execute.remote([GROUPS_COMMAND]) for s in link.current().shards]
            return merge_groups([r[0] for r in ray.get(refs, timeout=link.timeout)])
        except (RayError, GetTimeoutError) as exc:
            raise link.unavailable(exc) from exc

    def shard_info(self) -> builtins.list[dict[str, Any]]:
        """Each shard's index, pid, node and size (for operators and tests)."""
        link = self._link
        link.check_open()
        try:
            return ray.get(link.router.shard_info.remote(), timeout=link.timeout)  # type: ignore[no-any-return]
        except (RayError, GetTimeoutError) as exc:
            raise link.unavailable(exc) from exc

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

    def watch(self, group_id: str | None = None, *, timeout: float | None = None) -> Iterator[StateEvent]:
        """Stream live events (of ``group_id``, or all) from now on; ends after ``timeout`` if given."""
        return _triggers.watch(self, group_id, timeout=timeout)

    def wait_until(
        self, group_id: str, key: str, predicate: Callable[[Any], bool], timeout: float | None = None
    ) -> Any:
        """Block until ``predicate(value)`` holds for ``key``; return the value (``WaitTimeout`` if not)."""
        return _triggers.wait_until(self, group_id, key, predicate, timeout)

    def _subscribers_ready(self) -> None:
        link = self._link
        try:
            ray.get(link.router.subscribers_ready.remote(), timeout=link.timeout)
        except (RayError, GetTimeoutError) as exc:
            raise link.unavailable(exc) from exc

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
        view = link.view or await link.refresh_async()
        shard = view.owners[slot_of(req.group_id)]
        value = await async_lanes(link).call(shard, req, self._run_direct)
        return await self._rest(value) if isinstance(value, Page) else value

    async def _rest(self, page: Page) -> builtins.list[Any]:
        """All rows of a paged ``list``/``items`` answer, from its first page on."""
        rows = builtins.list(page.rows)
        value: Any = page
        while isinstance(value, Page):
            link = self._link
            req = next_page(value)
            shard = (link.view or await link.refresh_async()).owners[slot_of(req.group_id)]
            value = await async_lanes(link).call(shard, req, self._run_direct)
            rows.extend(value.rows if isinstance(value, Page) else value)
        return rows

    async def _run_direct(self, req: Request) -> Any:
        """Send ``req`` alone (following redirects, retrying while its shard restarts)."""
        link = self._link
        link.check_open()
        view = link.view or await link.refresh_async()
        backoff: Backoff | None = None
        redirects = 0
        while True:
            shard = view.shard_for(req.group_id)
            try:
                (result,) = unpack(await asyncio.wait_for(shard.run.remote(pack([req.cmd])), link.timeout))
            except RayActorError as exc:  # the shard died mid-call: it restarts from storage
                backoff = backoff or Backoff(link)
                await asyncio.sleep(await asyncio.to_thread(backoff.next_delay, exc))
                continue
            except (RayError, asyncio.TimeoutError) as exc:
                link.check_open()
                raise link.unavailable(exc) from exc
            done, value = _follow(result, req)
            if done:
                return value
            if isinstance(value, (ShardLoading, Deferred)):  # wait (within retry_timeout), then again
                backoff = backoff or Backoff(link)
                await asyncio.sleep(await asyncio.to_thread(backoff.next_delay, value))
                continue
            redirects += 1
            if redirects >= MAX_REDIRECTS:
                raise Unavailable(
                    f"shard map of {link.cluster!r} kept changing; gave up after {redirects} tries"
                )
            view = await link.refresh_async()

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
        link = self._link
        link.check_open()
        view = link.view or await link.refresh_async()
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(s.execute.remote([GROUPS_COMMAND]) for s in view.shards)), link.timeout
            )
        except (RayError, asyncio.TimeoutError) as exc:
            raise link.unavailable(exc) from exc
        return merge_groups([r[0] for r in results])

    async def shard_info(self) -> builtins.list[dict[str, Any]]:
        """Each shard's index, pid, node and size (for operators and tests)."""
        link = self._link
        link.check_open()
        try:
            return await asyncio.wait_for(link.router.shard_info.remote(), link.timeout)  # type: ignore[no-any-return]
        except (RayError, asyncio.TimeoutError) as exc:
            raise link.unavailable(exc) from exc

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

    async def _run_many(self, reqs: Sequence[Request]) -> builtins.list[tuple[bool, Any]]:
        """Send many requests, one call per shard; ``(True, value)`` or ``(False, error)`` each, in order.

        Requests larger together than a batch's byte budget leave in several rounds, in order.
        """
        out: builtins.list[tuple[bool, Any]] = []
        while len(out) < len(reqs):
            count = fits([request_bytes(r) for r in reqs[len(out) :]])
            out.extend(await self._run_round(reqs[len(out) : len(out) + count]))
        return out

    async def _run_round(self, reqs: Sequence[Request]) -> builtins.list[tuple[bool, Any]]:
        link = self._link
        link.check_open()
        view = link.view or await link.refresh_async()
        lanes = AsyncLanes(link)  # a private lane set: one batch per shard, sent at once
        by_shard: dict[int, builtins.list[Slot]] = {}
        slots = [Slot(req) for req in reqs]
        for slot in slots:
            by_shard.setdefault(view.owners[slot_of(slot.req.group_id)], []).append(slot)
        # packed before any send: a call that cannot be pickled fails the whole bulk call, sending nothing
        packed = {s: pack([slot.req.cmd for slot in batch]) for s, batch in by_shard.items()}
        await asyncio.gather(
            *(lanes.send(s, batch, packed[s], self._run_direct) for s, batch in by_shard.items())
        )
        out = [(slot.ok, slot.value) for slot in slots]
        for i, (ok, value) in enumerate(out):
            if ok and isinstance(value, Page):
                try:
                    out[i] = (True, await self._rest(value))
                except StateError as exc:
                    out[i] = (False, exc)
        return out

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
