"""Warm runners: long-lived Ray actors of a subscriber's that run trigger handlers.

A Ray task per delivery costs a task submission, a worker lease and the handler's unpickling each
time. A runner is started once (a Ray actor owned by its subscriber, so it dies with it), keeps
every handler it unpickled, and takes its chunks of events over a connection of its own (the
shard connection's frames and HMAC handshake, :mod:`shardstate.shards.wire`, with the cluster's
secret): a delivery costs one frame each way. It runs one chunk at a time; its watchdog thread
reports where the chunk is and which attempt ran past its timeout (see
:mod:`shardstate.cluster.delivery`). A runner stuck in a handler is killed and replaced: a process
is the unit a hung handler can be stopped by.

:class:`RunnerPool` (in the subscriber) keeps :data:`WARM_RUNNERS` runners while triggers exist,
starts another when a chunk waited :data:`GROW_AFTER` seconds for one while a runner is held by a
chunk for that long, or chunks usually take :data:`SLOW_CHUNK` seconds or more (slow or blocking
handlers: more processes help), up to its limit; it stops runners idle for :data:`RUNNER_IDLE`
seconds beyond the warm ones. Quick chunks only queue: a new process would cost more CPU than it
saves.
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
from collections import OrderedDict, deque
from typing import Any

import cloudpickle
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shardstate.cluster import metadata
from shardstate.cluster.delivery import Attempts, Chunk, describe, run_handlers, tick, to_state_event
from shardstate.shards.event_forms import Resolver, compact
from shardstate.shards.wire import (
    HANDSHAKE_TIMEOUT,
    client_handshake_async,
    read_frame,
    read_frame_async,
    server_handshake,
    write_frame,
    write_frame_async,
)

#: runners a subscriber keeps while any trigger is registered
WARM_RUNNERS = 1
#: seconds a chunk waits for a free runner before the pool starts another (up to its limit), if a
#: runner has been held that long by its chunk, or the median of the last chunks' durations is at
#: least :data:`SLOW_CHUNK` seconds
GROW_AFTER = 0.05
SLOW_CHUNK = 0.01
RECENT_CHUNKS = 15
#: runners starting at once, per pool
MAX_STARTING = 2
#: seconds an idle runner beyond the warm ones lives
RUNNER_IDLE = 30.0
#: seconds a new runner may take to start and answer
START_TIMEOUT = 120.0
#: handlers a runner keeps unpickled (and what its subscriber remembers it sent)
RUNNER_HANDLERS = 1024


class RunnerActor:
    """Runs trigger handlers for one subscriber, one chunk at a time, on its own connection."""

    def __init__(self, cluster: str, subscriber_node: str | None = None) -> None:
        self.cluster = cluster
        secret = metadata.secret(cluster)
        host = "127.0.0.1"
        try:
            if subscriber_node is not None and ray.get_runtime_context().get_node_id() != subscriber_node:
                host = ray.util.get_node_ip_address()  # the subscriber runs on another node
        except Exception:  # not inside Ray (unit use)
            pass
        self._listener = socket.create_server((host, 0))
        bound = self._listener.getsockname()
        self._address = (str(bound[0]), int(bound[1]))
        self._handlers: OrderedDict[str, Any] = OrderedDict()
        self._watch = threading.Condition()
        self._attempts: Attempts | None = None
        self.chunks = 0
        threading.Thread(target=self._serve, args=(secret,), daemon=True, name="runner-serve").start()
        threading.Thread(target=self._watchdog, daemon=True, name="runner-watchdog").start()

    def address(self) -> tuple[str, int]:
        """``(host, port)`` of this runner's connection."""
        return self._address

    def info(self) -> dict[str, Any]:
        """The runner's process and how many chunks it ran (tests, operators)."""
        return {"pid": os.getpid(), "chunks": self.chunks, "handlers": len(self._handlers)}

    # -- the connection ---------------------------------------------------------------------
    def _serve(self, secret: bytes) -> None:
        while True:
            conn, _ = self._listener.accept()
            try:
                conn.settimeout(HANDSHAKE_TIMEOUT)
                server_handshake(conn, secret)
                conn.settimeout(None)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except Exception:
                conn.close()
                continue
            try:
                self._session(conn)
            except Exception:  # the subscriber went away (or broke the protocol): wait for the next
                pass
            finally:
                conn.close()

    def _session(self, conn: socket.socket) -> None:
        lock = threading.Lock()

        def send(message: tuple[Any, ...]) -> None:
            body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
            with lock:
                write_frame(conn, body)

        while True:
            job = pickle.loads(read_frame(conn))  # from the authenticated subscriber
            self._run(job, send)

    def _run(self, job: dict[str, Any], send: Any) -> None:
        attempts = Attempts(send, tick(job["timeout"]))
        try:
            handler = self._handler(job["key"], job.get("blob"))
            records = Resolver(limit=None).resolve_all(job["records"])
            events = [to_state_event(job["cluster"], job["shard"], record) for record in records]
        except Exception as exc:
            send(("failed", 0, 0, f"the chunk could not start: {describe(exc)}"))
            return
        self.chunks += 1
        with self._watch:
            self._attempts = attempts
            self._watch.notify_all()
        try:
            run_handlers(job["name"], handler, events, job["timeout"], job["first"], job["eager"], attempts)
        finally:
            with self._watch:
                if self._attempts is attempts:
                    self._attempts = None

    def _handler(self, key: str, blob: bytes | None) -> Any:
        handler = self._handlers.get(key)
        if handler is not None:
            self._handlers.move_to_end(key)
            return handler
        if blob is None:
            raise LookupError(f"handler {key} was not sent to this runner")
        handler = cloudpickle.loads(blob)
        self._handlers[key] = handler
        while len(self._handlers) > RUNNER_HANDLERS:
            self._handlers.popitem(last=False)
        return handler

    # -- the watchdog ------------------------------------------------------------------------
    def _watchdog(self) -> None:
        """Report where a running chunk is every tick, and an attempt that runs past its timeout."""
        last: Attempts | None = None
        while True:
            with self._watch:
                while self._attempts is None or self._attempts is last:
                    self._watch.wait()
                attempts = last = self._attempts
            _watch_chunk(attempts)


def _watch_chunk(attempts: Attempts) -> None:
    every = attempts.tick
    with attempts.lock:
        while not attempts.timed_out:
            current = attempts.current
            if current is None:
                if attempts.done:
                    return
                attempts.lock.wait(every)
                continue
            index, attempt, started, timeout = current
            now = time.monotonic()
            deadline = math.inf if timeout is None else started + timeout
            if now >= deadline:
                attempts.report("timeout", index, attempt)
                attempts.timed_out = True  # nothing more from this chunk: the subscriber kills us
                return
            beat = attempts.reported + every
            if now >= beat:
                attempts.report("at", index, attempt)
                continue
            attempts.lock.wait(min(deadline, beat) - now)


# -- in the subscriber -------------------------------------------------------------------------------
class Runner:
    """A subscriber's handle on one runner: its actor and connection, and which handlers it has."""

    def __init__(self, actor: Any, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.actor = actor
        self.reader = reader
        self.writer = writer
        self.loaded: OrderedDict[str, None] = OrderedDict()
        self.idle_since = time.monotonic()

    def alive(self) -> bool:
        """Whether its connection is still up (a runner killed while idle shows as EOF)."""
        return not self.reader.at_eof() and not self.writer.is_closing()

    async def send_job(self, chunk: Chunk, start: int, attempt: int, eager: bool) -> None:
        """Send ``chunk.records[start:]`` (its first event at attempt ``attempt``)."""
        key = chunk.key
        known = key in self.loaded
        records, have = [], set()
        for record in chunk.records[start:]:  # old values by reference within the chunk, no ops
            records.append(compact(record._replace(ops=None), record.base in have))
            have.add(record.seq)
        job = {
            "name": chunk.name,
            "key": key,
            "blob": None if known else chunk.handler_blob,
            "cluster": chunk.cluster,
            "shard": chunk.shard,
            "records": records,
            "timeout": chunk.timeout,
            "first": attempt,
            "eager": eager,
        }
        await write_frame_async(self.writer, pickle.dumps(job, protocol=pickle.HIGHEST_PROTOCOL))
        if known:
            self.loaded.move_to_end(key)
        else:
            self.loaded[key] = None
            while len(self.loaded) > RUNNER_HANDLERS // 2:
                self.loaded.popitem(last=False)

    async def receive(self) -> tuple[str, int, int, Any]:
        """The runner's next message (see :mod:`shardstate.cluster.delivery`)."""
        message = pickle.loads(await read_frame_async(self.reader))
        return message  # type: ignore[no-any-return]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class RunnerPool:
    """The runners of one subscriber (see the module docstring); ``limit``: at most this many."""

    def __init__(self, cluster: str, limit: int, warm: int = WARM_RUNNERS) -> None:
        self.cluster = cluster
        self.limit = limit
        self.warm = warm
        self._idle: list[Runner] = []
        self._cond: asyncio.Condition | None = None
        self.size = 0  # running and starting
        self.starting = 0
        self.started = 0
        self.killed = 0
        self.start_failures = 0
        self.peak = 0
        self._secret: bytes | None = None
        self._node: str | None = None
        self._reaper: asyncio.Task[None] | None = None
        #: how long the last chunks kept their runner; when each busy runner took its chunk
        self._durations: deque[float] = deque(maxlen=RECENT_CHUNKS)
        self._busy: dict[int, float] = {}

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    async def keep_warm(self) -> None:
        """Start runners up to the warm count (triggers exist)."""
        cond = self._condition()
        async with cond:
            while self.size < min(self.warm, self.limit):
                self._spawn()
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def acquire(self) -> Runner:
        """A free runner: an idle one, or (after :data:`GROW_AFTER` s of waiting) a new one."""
        cond = self._condition()
        waited = False
        async with cond:
            while True:
                while self._idle:
                    runner = self._idle.pop()
                    if runner.alive():
                        self._busy[id(runner)] = time.monotonic()
                        return runner
                    self._forget(runner)
                if self.size < self.limit and self.starting < MAX_STARTING and (self.size == 0 or waited):
                    self._spawn()
                    waited = False
                try:
                    await asyncio.wait_for(cond.wait(), GROW_AFTER if self.size < self.limit else None)
                except asyncio.TimeoutError:
                    waited = self._slow()

    def _slow(self) -> bool:
        """Whether chunks hold runners long enough that another runner would help."""
        now = time.monotonic()
        if any(now - since >= GROW_AFTER for since in self._busy.values()):
            return True
        recent = sorted(self._durations)
        return bool(recent) and recent[len(recent) // 2] >= SLOW_CHUNK

    async def release(self, runner: Runner, busy: float = 0.0) -> None:
        """``runner`` finished its chunk (in ``busy`` seconds) and is healthy."""
        runner.idle_since = time.monotonic()
        self._busy.pop(id(runner), None)
        self._durations.append(busy)
        cond = self._condition()
        async with cond:
            self._idle.append(runner)
            cond.notify()

    async def discard(self, runner: Runner) -> None:
        """Kill ``runner`` (stuck in a handler, silent, or dead) and forget it."""
        cond = self._condition()
        async with cond:
            self._forget(runner)
            cond.notify()

    def _forget(self, runner: Runner) -> None:
        self._busy.pop(id(runner), None)
        runner.close()
        with contextlib.suppress(Exception):
            ray.kill(runner.actor, no_restart=True)
        self.size -= 1
        self.killed += 1

    def _spawn(self) -> None:
        self.size += 1
        self.starting += 1
        self.peak = max(self.peak, self.size)
        asyncio.get_running_loop().create_task(self._start())

    async def _start(self) -> None:
        cond = self._condition()
        runner: Runner | None = None
        try:
            runner = await asyncio.wait_for(self._new_runner(), START_TIMEOUT)
        except Exception as exc:
            self.start_failures += 1
            print(f"shardstate subscriber: cannot start a runner: {describe(exc)}", file=sys.stderr)
            await asyncio.sleep(min(10.0, 0.5 * 2 ** min(self.start_failures, 5)))
        async with cond:
            self.starting -= 1
            if runner is None:
                self.size -= 1
            else:
                self.started += 1
                self._idle.append(runner)
            cond.notify_all()

    async def _new_runner(self) -> Runner:
        if self._secret is None:
            self._secret = await asyncio.to_thread(metadata.secret, self.cluster)
            with contextlib.suppress(Exception):
                self._node = ray.get_runtime_context().get_node_id()
        strategy = None if self._node is None else NodeAffinitySchedulingStrategy(self._node, soft=True)
        actor: Any = runner_actor_class.options(scheduling_strategy=strategy).remote(self.cluster, self._node)
        try:
            host, port = await actor.address.remote()
            reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await asyncio.wait_for(client_handshake_async(reader, writer, self._secret), HANDSHAKE_TIMEOUT)
        except BaseException:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
            raise
        return Runner(actor, reader, writer)

    async def _reap(self) -> None:
        """Stop runners idle for :data:`RUNNER_IDLE` seconds beyond the warm ones."""
        cond = self._condition()
        while True:
            await asyncio.sleep(min(5.0, RUNNER_IDLE))
            async with cond:
                now = time.monotonic()
                for runner in sorted(self._idle, key=lambda r: r.idle_since):
                    if self.size <= self.warm or now - runner.idle_since < RUNNER_IDLE:
                        break
                    self._idle.remove(runner)
                    self._forget(runner)
                    self.killed -= 1  # retired, not killed for cause

    def stats(self) -> dict[str, Any]:
        """Counters for the subscriber's stats."""
        return {
            "runners": self.size,
            "runners_idle": len(self._idle),
            "runners_started": self.started,
            "runners_killed": self.killed,
            "runners_peak": self.peak,
            "runner_start_failures": self.start_failures,
        }


#: The runner's Ray actor class: owned by its subscriber (it dies with it), never restarted by Ray
#: (the pool starts a new one), no CPU reserved (handlers ran as ``num_cpus=0`` tasks before).
runner_actor_class: Any = ray.remote(num_cpus=0, max_restarts=0)(RunnerActor)
