"""One process's link to one state cluster: router, settings, shard map, and the transport.

The link performs what the client core (:mod:`shardstate._core`) asks for: send a packed batch to
shard N (over the shard's own connection when it has one this process can reach, else as a Ray
actor call), fetch the shard map. It turns transport failures into the two kinds the core knows:
:class:`ShardGone` (retry) and :class:`Unavailable` (give up).
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Sequence
from typing import Any, NamedTuple

import ray
from ray.exceptions import (
    ActorUnavailableError,
    ActorUnschedulableError,
    GetTimeoutError,
    RayActorError,
    RayError,
)

from shardstate._errors import ShardLoading, StateError, Unavailable
from shardstate._transport import (
    TRANSPORTS,
    AsyncConnection,
    Endpoint,
    ShardGone,
    SyncConnections,
    Target,
    node_ip,
    reachable,
    receive,
)
from shardstate.cluster.slots import slot_of
from shardstate.shards.wire import AuthenticationError

#: Seconds after which a map in which some shard has no connection yet (it was loading) is
#: fetched again, so that shard's calls move to its connection once it has one.
RECHECK = 1.0
#: Seconds between tries to reach a restarting router
ROUTER_RETRY = 0.1


class ShardView(NamedTuple):
    """A snapshot of the router's shard map: slot owners, shard handles, and where each shard's
    own connection listens (None: reach it through Ray)."""

    epoch: int
    owners: tuple[int, ...]
    shards: list[Any]
    endpoints: tuple[Endpoint | None, ...] = ()
    fetched: float = 0.0
    #: per shard what this process connects to (None: its Ray handle)
    targets: tuple[Target | None, ...] = ()
    #: every shard has a connection this process can use
    complete: bool = False

    def shard_for(self, group_id: str) -> Any:
        """The handle of the shard owning ``group_id``."""
        return self.shards[self.owners[slot_of(group_id)]]

    def endpoint(self, shard: int) -> Endpoint | None:
        """Where ``shard``'s connection listens, or None (use its Ray handle)."""
        return self.endpoints[shard] if shard < len(self.endpoints) else None

    def target(self, shard: int) -> Target | None:
        """What this process connects to for ``shard``, or None (use its Ray handle)."""
        return self.targets[shard] if shard < len(self.targets) else None


class ClusterLink:
    """One process's connection to one state cluster: router handle, settings, cached shard map.

    ``transport``: ``"socket"`` (default: each shard's own authenticated connection, Ray calls for
    a shard without one) or ``"ray"`` (Ray actor calls only).
    """

    def __init__(
        self,
        cluster: str,
        router: Any,
        config: dict[str, Any],
        timeout: float,
        retry_timeout: float = 60.0,
        transport: str = "socket",
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"transport is one of {TRANSPORTS}, got {transport!r}")
        self.cluster = cluster
        self.router = router
        self.config = config
        self.timeout = timeout
        self.retry_timeout = retry_timeout
        self.transport = transport
        self.max_value_size: int = config["max_value_size"]
        #: the Ray errors that mean "this shard actor is gone: refresh the map, send again": a dead
        #: or restarting actor; in a replicated cluster also one pinned to a lost node (its shard
        #: fails over to another member)
        self.gone: tuple[type[BaseException], ...] = (RayActorError,)
        if config.get("replicas"):
            self.gone = (RayActorError, ActorUnschedulableError)
        self.closed = False
        self._lock = threading.Lock()
        self.view: ShardView | None = None
        #: shard -> when it was first found loading (cleared by its next answer)
        self.loading_since: dict[int, float] = {}
        self.secret: bytes | None = None
        self.connections: SyncConnections | None = None
        self.my_ip = node_ip() if transport == "socket" else None
        #: per event loop, its connections to the shards
        self._async: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, AsyncConnection]] = (
            weakref.WeakKeyDictionary()
        )
        self._refreshing = False
        self._tasks: set[asyncio.Task[None]] = set()
        #: the first fetch of the map on an event loop, shared by every call made meanwhile
        self._first_fetch: asyncio.Task[ShardView] | None = None
        #: the lanes that coalesce concurrent calls (``_coalesce`` sets them up)
        self.lanes: Any = None
        self.async_lanes: Any = None

    # -- the shard map ---------------------------------------------------------------------------
    def check_open(self) -> None:
        """Raise :class:`Unavailable` if this link was closed (e.g. by ``shutdown()``)."""
        if self.closed:
            raise Unavailable(f"state cluster {self.cluster!r} was shut down (or this client was closed)")

    def close(self) -> None:
        """Stop using the link: later calls raise ``Unavailable``; idle connections are closed."""
        self.closed = True
        if self.connections is not None:
            self.connections.close()

    def _asks(self) -> list[Any]:
        if self.transport == "ray":
            return [self.router.shard_map.remote()]
        asks = [self.router.routes.remote()]
        if self.secret is None:
            asks.append(self.router.wire_secret.remote())
        return asks

    def _adopt(self, answers: list[Any]) -> ShardView:
        snapshot = answers[0]
        if len(answers) > 1 and self.secret is None:
            self.secret = answers[1]
            self.connections = SyncConnections(answers[1], self.timeout, self.my_ip)
        if isinstance(snapshot, dict):
            endpoints = tuple(
                found if reachable(found, self.my_ip) else None
                for found in (None if e is None else Endpoint(*e) for e in snapshot["endpoints"])
            )
            targets = tuple(None if e is None else e.target(self.my_ip) for e in endpoints)
            complete = None not in endpoints and len(endpoints) == len(snapshot["handles"])
            view = ShardView(
                snapshot["epoch"],
                tuple(snapshot["owners"]),
                snapshot["handles"],
                endpoints,
                time.monotonic(),
                targets,
                complete,
            )
        else:
            epoch, owners, handles = snapshot
            view = ShardView(epoch, owners, handles, (), time.monotonic())
        with self._lock:
            if self.view is None or view.epoch >= self.view.epoch:
                self.view = view
            return self.view

    def _stale(self, view: ShardView) -> bool:
        """A socket map in which some shard had no connection, fetched more than :data:`RECHECK` ago."""
        return not view.complete and self.transport == "socket" and time.monotonic() - view.fetched > RECHECK

    def current(self) -> ShardView:
        """The cached map, fetched (blocking) on first use."""
        view = self.view
        if view is None:
            return self.refresh()
        if self._stale(view):
            try:
                return self.refresh()
            except StateError:
                return self._touch(view)
        return view

    async def current_async(self) -> ShardView:
        """The cached map, fetched (awaitable) on first use."""
        view = self.view
        if view is None:
            return await self.refresh_async()
        if self._stale(view):
            try:
                return await self.refresh_async()
            except StateError:
                return self._touch(view)
        return view

    async def first_view(self) -> ShardView:
        """The map without waiting once known; before that, one fetch shared by every caller.

        Callers that wait for the same fetch resume in the order they began to wait (asyncio wakes
        a future's awaiters in order), so calls made before the map arrived still queue in the
        order they were made. (Each awaiting its own fetch would resume in the order the router's
        answers came back: one caller's un-awaited calls could then overtake each other.)
        """
        view = self.view_now()
        if view is not None:
            return view
        loop = asyncio.get_running_loop()
        fetch = self._first_fetch
        if fetch is None or fetch.done() or fetch.get_loop() is not loop:
            fetch = self._first_fetch = loop.create_task(self.refresh_async())
        return await asyncio.shield(fetch)  # a cancelled caller does not cancel the others' fetch

    def view_now(self) -> ShardView | None:
        """The cached map without waiting (asyncio callers that must not yield before they queue);
        a stale one is refreshed in the background."""
        view = self.view
        if view is not None and self._stale(view) and not self._refreshing:
            self._refreshing = True
            task = asyncio.get_running_loop().create_task(self._refresh_quietly(view))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return view

    async def _refresh_quietly(self, view: ShardView) -> None:
        try:
            await self.refresh_async()
        except StateError:
            self._touch(view)
        finally:
            self._refreshing = False

    def _touch(self, view: ShardView) -> ShardView:
        with self._lock:
            if self.view is view:
                self.view = view._replace(fetched=time.monotonic())
            return self.view or view

    def refresh(self) -> ShardView:
        """Fetch the map from the router (blocking; waits for a restarting router, see :meth:`ask`)."""
        self.check_open()
        return self._adopt(self._patiently(lambda: ray.get(self._asks(), timeout=self.timeout)))

    async def refresh_async(self) -> ShardView:
        """Fetch the map from the router (awaitable; waits for a restarting router like :meth:`refresh`)."""
        self.check_open()
        answers = await self._patiently_async(lambda: asyncio.gather(*self._asks()))
        return self._adopt(list(answers))

    def ask(self, method: str, *args: Any) -> Any:
        """Call the router's ``method``. While the router restarts (it rebuilds from the GCS in a
        second or two) wait for it, within ``retry_timeout``; any other failure is ``Unavailable``."""
        self.check_open()
        return self._patiently(
            lambda: ray.get(getattr(self.router, method).remote(*args), timeout=self.timeout)
        )

    async def ask_async(self, method: str, *args: Any) -> Any:
        """:meth:`ask`, awaitable."""
        self.check_open()
        return await self._patiently_async(lambda: getattr(self.router, method).remote(*args))

    def _patiently(self, call: Any) -> Any:
        started = time.monotonic()
        while True:
            try:
                return call()
            except ActorUnavailableError as exc:  # the router is restarting
                if time.monotonic() - started > self.retry_timeout:
                    raise self.unavailable(exc) from exc
                time.sleep(ROUTER_RETRY)
            except (RayError, GetTimeoutError) as exc:
                raise self.unavailable(exc) from exc

    async def _patiently_async(self, call: Any) -> Any:
        started = time.monotonic()
        while True:
            try:
                return await asyncio.wait_for(call(), self.timeout)
            except ActorUnavailableError as exc:
                if time.monotonic() - started > self.retry_timeout:
                    raise self.unavailable(exc) from exc
                await asyncio.sleep(ROUTER_RETRY)
            except (RayError, asyncio.TimeoutError) as exc:
                raise self.unavailable(exc) from exc

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

    def unavailable(self, exc: BaseException) -> Unavailable:
        """Translate a transport failure into :class:`Unavailable`."""
        if isinstance(exc, Unavailable):
            return exc
        if isinstance(exc, (GetTimeoutError, asyncio.TimeoutError, TimeoutError)):
            return Unavailable(f"state cluster {self.cluster!r} did not answer within {self.timeout}s")
        if isinstance(exc, RayActorError):
            return Unavailable(f"a shard of state cluster {self.cluster!r} is unavailable: {exc}")
        if isinstance(exc, AuthenticationError):
            return Unavailable(f"a shard of state cluster {self.cluster!r} refused this client: {exc}")
        return Unavailable(f"state cluster {self.cluster!r} is unavailable: {type(exc).__name__}: {exc}")

    # -- sending (blocking) ----------------------------------------------------------------------
    def send(self, shard: int, packed: bytes, lane: str | None = None, resume: bool = False) -> bytes:
        """Send one packed batch to ``shard``; its packed answer. Raises :class:`ShardGone` or
        :class:`Unavailable`."""
        if self.closed:
            self.check_open()
        view = self.view or self.refresh()
        target = view.target(shard)
        if target is not None and self.connections is not None:
            try:
                return self.connections.call(shard, target, packed, lane, resume)
            except ShardGone:
                raise
            except Exception as exc:
                self.check_open()
                raise self.unavailable(exc) from exc
        try:
            return ray.get(_ray_call(view.shards[shard], packed, lane, resume), timeout=self.timeout)  # type: ignore[no-any-return]
        except self.gone as exc:
            raise ShardGone(str(exc)) from exc
        except (RayError, GetTimeoutError) as exc:
            self.check_open()
            raise self.unavailable(exc) from exc

    def send_many(self, calls: Sequence[tuple[int, bytes]]) -> list[bytes | BaseException]:
        """Send batches to several shards at once; each one's answer or exception, in order."""
        self.check_open()
        view = self.view or self.refresh()
        out: list[bytes | BaseException | None] = [None] * len(calls)
        refs: dict[int, Any] = {}
        sockets: list[tuple[int, tuple[int, Target, bytes]]] = []
        for i, (shard, packed) in enumerate(calls):
            target = view.target(shard) if self.connections is not None else None
            if target is not None:
                sockets.append((i, (shard, target, packed)))
            else:
                refs[i] = _ray_call(view.shards[shard], packed, None, False)
        if sockets and self.connections is not None:
            answers = self.connections.call_many([c for _, c in sockets])
            for (i, _), answer in zip(sockets, answers, strict=True):
                out[i] = answer if isinstance(answer, (bytes, ShardGone)) else self.unavailable(answer)
        for i, ref in refs.items():
            try:
                out[i] = ray.get(ref, timeout=self.timeout)
            except self.gone as exc:
                out[i] = ShardGone(str(exc))
            except (RayError, GetTimeoutError) as exc:
                out[i] = self.unavailable(exc)
        return out  # type: ignore[return-value]

    # -- sending (asyncio) -----------------------------------------------------------------------
    def submit(self, shard: int, packed: bytes, lane: str | None = None, resume: bool = False) -> Any:
        """Send one packed batch to ``shard`` now, from the running event loop; returns what
        :meth:`receive` awaits. Batches submitted to one shard from one loop arrive in order."""
        self.check_open()
        view = self.view
        if view is None:
            raise RuntimeError("submit() before the shard map was fetched")
        target = view.target(shard) if self.secret is not None else None
        if target is None:
            return _ray_call(view.shards[shard], packed, lane, resume)
        loop = asyncio.get_running_loop()
        conns = self._async.get(loop)
        if conns is None:
            conns = self._async[loop] = {}
        conn = conns.get(shard)
        if conn is None or conn.broken is not None or conn.target != target:
            if conn is not None:
                conn.close()
            assert self.secret is not None
            conn = conns[shard] = AsyncConnection(shard, target, self.secret)
        return conn.submit(packed, lane, resume)

    async def receive(self, pending: Any) -> bytes:
        """The answer to a batch :meth:`submit` sent. Raises :class:`ShardGone` or :class:`Unavailable`."""
        try:
            return await receive(pending, self.timeout)
        except ShardGone:
            raise
        except self.gone as exc:
            raise ShardGone(str(exc)) from exc
        except (RayError, TimeoutError, asyncio.TimeoutError, AuthenticationError) as exc:
            self.check_open()
            raise self.unavailable(exc) from exc


def _ray_call(handle: Any, packed: bytes, lane: str | None, resume: bool) -> Any:
    return handle.run.remote(packed) if lane is None else handle.run.remote(packed, lane, resume)
