"""The shard actor: a thin Ray shell around :class:`ShardEngine` and its :class:`Storage`.

Written as a plain class and made remote at the edge (``shard_actor_class``). It runs as a sync actor
with ``max_concurrency=1``: Ray then executes its calls one at a time and keeps each caller's order.

Batches also arrive on the shard's own connection (:mod:`shardstate.shards.wire`): once loaded, the
shard serves authenticated connections on the node's IP, on an ephemeral port (``address()``,
``info()["address"]``), on a thread of its own. THE ONE-ENGINE INVARIANT: every batch, from the
socket or from a Ray call, and every other use of the engine (sweep, ack, events, slots), runs
under :attr:`ShardActor._engine_lock`, one at a time; so the shard stays the serialization point of
every group it owns, and an update is atomic without locks of its own.

Start-up: ``__init__`` returns at once (after at most :data:`INIT_GRACE` seconds) and the shard loads
its storage in a background thread; until it is done every command is answered with
:class:`ShardLoading` ("shard N loading, 42%"), so a big file delays callers (who wait and retry)
instead of failing them or the cluster's start. A storage file that does not belong to this shard
(another cluster's, another shard's, an older copy) or is missing is refused: the shard then answers
:class:`Unavailable` with the reason, and ``info()`` says it too.

Per batch: the engine executes the commands, storage commits what they changed in one transaction,
and only then does the actor answer, so an acknowledged write is durable. If a commit fails (a full
disk), the batch is answered :class:`Unavailable`, the engine is rebuilt from storage (memory never
runs ahead of disk) and the shard stays up read-only until a probe commit works again.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import ray

from shardstate._errors import InvalidInput, ShardLoading, Unavailable
from shardstate.cluster import metadata
from shardstate.cluster.config import NAMESPACE
from shardstate.cluster.slots import slot_of
from shardstate.shards.commands import WRITES, Result
from shardstate.shards.engine import DEFAULT_OP_RETENTION, ShardEngine
from shardstate.shards.event_forms import ship_batch
from shardstate.shards.followers import SUBSCRIBER, EventFollower, FollowSpec, ready_frame
from shardstate.shards.records import Event
from shardstate.shards.storage import MemoryStorage, SqliteStorage, Storage, open_storage, shard_path
from shardstate.shards.validation import DEFAULT_MAX_VALUE_SIZE
from shardstate.shards.wire import MAX_FRAME, FollowStream, WireServer, private_socket_path

#: Seconds between the shard's own sweeps of expired entries and old op results.
SWEEP_INTERVAL = 1.0
#: The largest packed batch a shard unpickles (clients split theirs far below this).
MAX_FRAME_BYTES = MAX_FRAME
#: Seconds between the Ray-call pushes to a subscriber that follows no stream of this shard.
NOTIFY_DELAY = 0.01
#: Follow streams a shard serves at once (subscribers and watchers); more are refused.
MAX_FOLLOWERS = 256
#: Seconds between tries to tell a follow stream that fell behind about the frames it lost.
ANNOUNCE_EVERY = 0.05
#: Seconds ``__init__`` waits for the background load (a small shard answers its first call loaded)
INIT_GRACE = 1.0
#: A memory shard's event seqs start at ``incarnation << SEQ_BITS`` (unique across restarts).
SEQ_BITS = 40
#: Set in a shard's environment to bind its connection elsewhere than loopback: ``node`` (the
#: node's IP, for clients on other nodes of a multi-node cluster) or an address
WIRE_HOST_ENV = "SHARDSTATE_WIRE_HOST"
#: The phases of a shard's start-up (``status()``, ``info()["phase"]``)
OPENING, LOADING, READY, FAILED = "opening", "loading", "ready", "failed"


class ShardActor:
    """Owns a set of slots, keeps their groups in memory and on storage, executes command batches."""

    def __init__(
        self,
        cluster: str,
        index: int,
        slots: Iterable[int],
        epoch: int,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        directory: str | None = None,
        durability: str = "memory",
        must_exist: bool = False,
        op_retention: float = DEFAULT_OP_RETENTION,
        sweep_interval: float = SWEEP_INTERVAL,
        subscriber_name: str | None = None,
        cluster_id: str | None = None,
        wire_host: str = "127.0.0.1",
    ) -> None:
        self._started = time.perf_counter()
        self.cluster = cluster
        self.index = index
        self.epoch = epoch
        self.slots = frozenset(slots)
        self.max_value_size = max_value_size
        self.op_retention = op_retention
        self.directory = None if directory is None else os.path.expanduser(directory)
        self.durability = durability
        self.must_exist = must_exist
        self.sweep_interval = sweep_interval
        #: the cluster's id in its metadata (None: a shard used on its own, no metadata checks)
        self.cluster_id = cluster_id
        self.incarnation = 0
        self.restarted = _was_restarted()
        self.batches = 0
        self.commands = 0
        self.subscriber_name = subscriber_name or f"{cluster}:subscriber:0"
        self._subscriber: Any = None
        #: committed events not yet handed to followers: per commit (durable events, every event)
        self._outbox: list[tuple[list[Event], list[Event]]] = []
        #: durable events for the subscriber over a Ray call (while it follows no stream of ours)
        self._ray_outbox: list[Event] = []
        self._outbox_lock = threading.Lock()
        #: set after a commit that queued events: wakes the notifier
        self._outbox_ready = threading.Event()
        self._ray_ready = threading.Event()
        #: the last seq queued in the outbox (where a new follow stream starts)
        self._outbox_head = 0
        self._followers: list[EventFollower] = []
        #: how many of them are watchers (they also take memory-only events)
        self._watchers = 0
        self.pushes_dropped = 0
        #: the one-engine invariant (module docstring): held by every use of the engine
        self._engine_lock = threading.Lock()
        #: the shard's own connection (started once loaded, in a cluster that has a secret)
        self._wire: WireServer | None = None
        self.wire_host = wire_host
        self.wire_error: str | None = None
        # -- loading (a background thread fills these; calls read them) ---------------------------
        self.phase = OPENING
        self.load_error: str | None = None
        self.load_seconds = 0.0
        self._rows_loaded = 0
        self._rows_total = 0
        self._seq_hint = 0
        #: what the subscriber asked for while the shard was loading (applied once loaded)
        self._durable_wish: bool | None = None
        self._wish_lock = threading.Lock()
        #: client lanes answered "loading": fenced in the engine once it is loaded
        self._loading_lanes: set[str] = set()
        self.storage: Storage = MemoryStorage()
        self.engine = self._new_engine(None)  # a placeholder until the stored state is loaded
        # -- storage health ---------------------------------------------------------------------
        self.storage_ok = True
        self.storage_error: str | None = None
        loader = threading.Thread(target=self._load, daemon=True, name=f"shard-{index}-load")
        loader.start()
        loader.join(INIT_GRACE)  # a small shard is ready before its first call; a big one loads on

    # -- loading ------------------------------------------------------------------------------
    def _new_engine(self, storage: Storage | None) -> ShardEngine:
        return ShardEngine(
            owns=self._owns,
            max_value_size=self.max_value_size,
            op_retention=self.op_retention,
            fetch_op=None if storage is None or self.durability == "memory" else storage.fetch_op,
        )

    def _load(self) -> None:
        """Open and check the storage, then load it into a new engine (the background thread)."""
        try:
            self.storage = self._open_storage()
            self.phase = LOADING
            self._hold_if_asked()
            if isinstance(self.storage, SqliteStorage):
                self.storage.check()
            self._rows_total = self.storage.count_entries()
            engine = self._engine_from_storage()
            engine.set_durable_events(self._initial_durable_events())
            engine.sweep()
            with self._wish_lock:  # a wish sent while loading is applied here, or sees READY
                if self._durable_wish is not None:
                    engine.set_durable_events(self._durable_wish)
                self.engine = engine
                self._commit()
                self.load_seconds = time.perf_counter() - self._started
                self.phase = READY
        except BaseException as exc:  # the shard stays up and says why (info(), every answer)
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.phase = FAILED
            print(f"shardstate shard {self.index}: cannot load: {self.load_error}", file=sys.stderr)
            return
        self._outbox_head = self.engine.seq
        threading.Thread(target=self._notifier, daemon=True, name=f"shard-{self.index}-notify").start()
        threading.Thread(target=self._ray_pusher, daemon=True, name=f"shard-{self.index}-push").start()
        if self.cluster_id is not None:
            self._start_wire()
        if self.sweep_interval > 0:
            threading.Thread(target=self._sweeper, args=(self.sweep_interval,), daemon=True).start()

    def _start_wire(self) -> None:
        """Serve batches on the shard's own connection (the node's IP, an ephemeral port). Without
        it (no secret, no port) the shard serves Ray calls only, and ``info()`` says why."""
        try:
            self.serve_wire(metadata.secret(self.cluster), _wire_host(self.wire_host))
        except Exception as exc:
            self.wire_error = f"{type(exc).__name__}: {exc}"
            print(f"shardstate shard {self.index}: no own connection: {self.wire_error}", file=sys.stderr)

    def serve_wire(self, secret: bytes, host: str) -> tuple[str, int]:
        """Start the shard's connection on ``host`` with ``secret`` (once); return its address.

        Every request runs :meth:`run`, under the same engine lock as the Ray calls; a follow
        request opens a stream of events (:meth:`_follow`)."""
        if self._wire is None:
            # one socket file per shard of a cluster: a restarted shard replaces its predecessor's
            name = hashlib.sha1(f"{self.cluster}/{self.cluster_id}".encode()).hexdigest()[:16]
            unix = private_socket_path(f"{name}-{self.index}.sock")
            self._wire = WireServer(host, secret, self.run, unix=unix, follow=self._follow)
        return self._wire.address

    def stop_serving(self) -> None:
        """Close the shard's own connection (no new ones, open ones dropped): ``shutdown()`` calls
        it before killing the shard, so clients holding a connection see the cluster gone at once."""
        wire, self._wire = self._wire, None
        if wire is not None:
            wire.close()

    def address(self) -> tuple[str, int] | None:
        """``(host, port)`` of the shard's own connection; None while loading or without one."""
        return None if self._wire is None else self._wire.address

    def endpoint(self) -> tuple[str, int, str | None, str | None] | None:
        """``(host, port, node IP, Unix socket path)``: :meth:`address`, the node it is on (a client
        elsewhere cannot reach a loopback address) and the Unix socket clients on this machine use;
        None while loading or without a connection."""
        if self._wire is None:
            return None
        host, port = self._wire.address
        return (host, port, _node()[1], self._wire.path)

    def _initial_durable_events(self) -> bool:
        """Whether the loaded engine keeps events durably at first: a trigger is registered (the
        cluster metadata, kept current by the subscriber), or that is unknown (not recorded yet,
        metadata unreachable). Without a trigger the loaded events count as acknowledged."""
        try:
            return metadata.read(self.cluster, "triggers") is not False
        except Exception:
            return True

    def _open_storage(self) -> Storage:
        """Open this shard's storage and check it belongs here (cluster id, shard, start count)."""
        known = self.cluster_id is not None
        if self.durability == "memory" or self.directory is None:
            # event seqs start above every earlier start's: event ids never repeat
            self.incarnation = metadata.next_incarnation(self.cluster, self.index) if known else 0
            storage: Storage = open_storage(None, self.index, "memory", seq_base=self.incarnation << SEQ_BITS)
            self._record_placement(None)
            return storage
        record = metadata.shard_record(self.cluster, self.index) if known else None
        stamped = record is not None and record.get("path") is not None
        sqlite = SqliteStorage(
            shard_path(self.directory, self.index),
            self.durability,
            self.must_exist or self.restarted or stamped,
            check=False,
            missing_hint=_where_it_was(record, self.index),
        )
        if self.cluster_id is not None:
            known_count = metadata.incarnation(self.cluster, self.index)
            self.incarnation = sqlite.claim(self.cluster_id, self.index, known_count, stamped)
            metadata.record_incarnation(self.cluster, self.index, self.incarnation)
        self._record_placement(str(sqlite.path))
        return sqlite

    def _record_placement(self, path: str | None) -> None:
        if self.cluster_id is None:
            return
        node_id, node_ip = _node()
        metadata.record_shard(self.cluster, self.index, node_id, node_ip, path)

    def _hold_if_asked(self) -> None:
        """Wait while the cluster metadata asks this shard to hold its load (tests, operators)."""
        while self.cluster_id is not None and metadata.load_held(self.cluster, self.index):
            time.sleep(0.05)

    def _engine_from_storage(self) -> ShardEngine:
        """A new engine holding exactly what storage holds (counts rows for the load progress)."""
        loaded = self.storage.load()
        self._seq_hint = loaded.seq
        self._rows_loaded = 0
        loaded.entries = self._counted(loaded.entries)
        engine = self._new_engine(self.storage)
        engine.load(loaded)
        return engine

    def _counted(self, rows: Iterable[Any]) -> Iterator[Any]:
        for n, row in enumerate(rows, 1):
            if not n & 4095:
                self._rows_loaded = n
            yield row

    def _not_ready(self) -> Unavailable:
        """The answer to every command while the shard cannot serve (loading, or failed to)."""
        if self.phase == FAILED:
            return Unavailable(f"shard {self.index} cannot load its storage: {self.load_error}")
        total = self._rows_total
        percent = 100 * self._rows_loaded // total if total else 0
        return ShardLoading(f"shard {self.index} loading, {min(percent, 99)}%")

    def status(self) -> dict[str, Any]:
        """``{"phase", "error"}``: opening, loading, ready or failed (the router waits on this)."""
        return {"index": self.index, "phase": self.phase, "error": self.load_error}

    def _owns(self, group_id: str) -> bool:
        return slot_of(group_id) in self.slots

    # -- committing, and a failing storage ----------------------------------------------------
    def _commit(self) -> bool:
        """Commit what the engine changed, then hand the new events to the notifier.

        Returns False if storage failed (the shard is then read-only; see :meth:`_storage_failed`)
        or is failing (changes stay pending in the engine until a probe commit works).
        """
        if not self.storage_ok:
            return False
        changes = self.engine.take_changes()
        if not changes:
            return True
        try:
            self.storage.commit(changes)
        except Exception as exc:
            self._storage_failed(exc)
            return False
        fresh = self.engine.take_events()
        if fresh:
            self._notify(changes.events, fresh)
        return True

    def _storage_failed(self, exc: BaseException) -> None:
        """A commit failed: rebuild the engine from storage (memory must not run ahead of disk) and
        stay read-only until a probe commit works. If storage cannot even be read, restart from it."""
        self.storage_ok = False
        self.storage_error = f"{type(exc).__name__}: {exc}"
        print(f"shardstate shard {self.index}: commit failed: {self.storage_error}", file=sys.stderr)
        durable = self.engine.durable_events
        try:
            engine = self._engine_from_storage()
        except BaseException as again:
            print(f"shardstate shard {self.index}: cannot reload, restarting: {again!r}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(70)
        engine.durable_events = durable
        self.engine = engine

    def _read_only_error(self) -> Unavailable:
        return Unavailable(
            f"shard {self.index} storage is failing: {self.storage_error} (read-only until it recovers)"
        )

    def _probe_storage(self) -> None:
        """Read-only: try a small commit; if it works, writes are accepted again."""
        try:
            self.storage.probe()
        except Exception as exc:
            self.storage_error = f"{type(exc).__name__}: {exc}"
            return
        self.storage_ok = True
        print(f"shardstate shard {self.index}: storage works again", file=sys.stderr)

    def limit_storage_pages(self, extra: int | None) -> int:
        """Test hook (shardstate never calls it): make the shard's SQLite file "full" after ``extra``
        more pages (None lifts the cap), to exercise a failing storage for real."""
        if not isinstance(self.storage, SqliteStorage):
            raise InvalidInput("only a SQLite shard has pages to limit")
        with self._engine_lock:
            return self.storage.limit_pages(extra)

    def _sweeper(self, interval: float) -> None:
        """Ask this actor to sweep, through its own queue, so sweeps serialize with batches."""
        me = ray.get_runtime_context().current_actor
        while True:
            time.sleep(interval)
            try:
                ray.get(me.sweep.remote())
            except Exception:
                return  # the actor is going away

    # -- commands -----------------------------------------------------------------------------
    def execute(self, batch: Sequence[Any], lane: str | None = None, resume: bool = False) -> list[Result]:
        """Execute a batch of commands in order, commit their changes, then answer (one result each).

        Holds the engine lock throughout (the one-engine invariant: socket and Ray batches alike).

        ``lane``/``resume``: a client stream with several batches in flight (see
        ``ShardEngine.execute_batch``: a deferral fences the lane until the rest comes back). A lane
        answered "loading" is fenced the same way, so none of its batches that arrive after the
        load can overtake the ones refused during it.
        """
        if not isinstance(batch, (list, tuple)):
            return [(False, InvalidInput(f"a batch is a list of commands, got {type(batch).__name__}"))]
        if lane is not None and not isinstance(lane, str):
            return [(False, InvalidInput(f"a lane is a str, got {type(lane).__name__}"))]
        with self._engine_lock:
            return self._execute_locked(batch, lane, resume)

    def _execute_locked(self, batch: Sequence[Any], lane: str | None, resume: bool) -> list[Result]:
        if self.phase != READY:
            if lane is not None and len(self._loading_lanes) < 4096:
                self._loading_lanes.add(lane)
            error = self._not_ready()
            return [(False, error)] * len(batch)
        if self._loading_lanes:  # lanes refused while loading: their next batch must resume
            for held in self._loading_lanes:
                self.engine.fence(held)
            self._loading_lanes.clear()
        self.batches += 1
        self.commands += len(batch)
        if not self.storage_ok:
            return self._execute_read_only(batch)
        results = self.engine.execute_batch(batch, lane=lane, resume=bool(resume))
        if not self._commit():  # nothing of this batch is on disk, nor (rebuilt) in memory
            error = self._read_only_error()
            return [(False, error)] * len(results)
        return results

    def _execute_read_only(self, batch: Sequence[Any]) -> list[Result]:
        """Serve the batch's reads; answer its writes :class:`Unavailable` (storage is failing)."""
        error = self._read_only_error()
        reads = [i for i, cmd in enumerate(batch) if not _is_write(cmd)]
        results: list[Result] = [(False, error)] * len(batch)
        for i, result in zip(reads, self.engine.execute_batch([batch[i] for i in reads]), strict=True):
            results[i] = result
        self._commit()  # a no-op while read-only: expiries stay pending until storage works
        return results

    def run(self, packed: bytes, lane: str | None = None, resume: bool = False) -> bytes:
        """:meth:`execute` with the batch and its results pickled by the caller and by the shard.

        The clients' data path: one ``pickle`` of a plain list each way costs about half of what
        Ray's per-object serialization of the same list does. A batch that cannot be unpickled is
        answered with one error result (the caller fails every command of it).
        """
        if not isinstance(packed, bytes) or len(packed) > MAX_FRAME_BYTES:
            size = len(packed) if isinstance(packed, bytes) else type(packed).__name__
            error = InvalidInput(f"a packed batch is bytes of at most {MAX_FRAME_BYTES}, got {size}")
            return pickle.dumps([(False, error)], protocol=pickle.HIGHEST_PROTOCOL)
        try:
            batch = pickle.loads(packed)
        except Exception as exc:
            error = InvalidInput(f"a packed batch could not be unpickled: {type(exc).__name__}: {exc}")
            return pickle.dumps([(False, error)], protocol=pickle.HIGHEST_PROTOCOL)
        return pickle.dumps(self.execute(batch, lane, resume), protocol=pickle.HIGHEST_PROTOCOL)

    # -- events -------------------------------------------------------------------------------
    def _notify(self, durable: list[Event], fresh: list[Event]) -> None:
        """Queue newly committed events and wake the notifier (after the commit; it costs the
        batch an append and a wake-up, not the push itself). Events nobody follows (memory-only,
        and no watcher's stream open: subscribers only take durable ones) are not queued: writes
        nobody listens to wake no thread."""
        with self._outbox_lock:
            self._outbox_head = fresh[-1].seq
            if not durable and not self._watchers:
                return
            self._outbox.append((durable, fresh))
        self._outbox_ready.set()

    def _notifier(self) -> None:
        """Hand queued events to every follow stream, woken by each commit that queued some.

        Whatever commits while a round is sent goes in the next one, so a busy shard sends many
        commits per frame. Durable events go to the subscriber's stream; while it has none (not
        connected yet, restarting, or the cluster has no streams) they go by a Ray call instead.
        """
        owing = False
        while True:
            self._outbox_ready.wait(ANNOUNCE_EVERY if owing else None)
            self._outbox_ready.clear()
            with self._outbox_lock:
                rounds, self._outbox = self._outbox, []
                followers = list(self._followers)
            owing = not all(f.announce() for f in followers if f.owed is not None and not f.gone)
            if not rounds:
                continue
            durable = [e for events, _ in rounds for e in events]
            every = [e for _, events in rounds for e in events]
            streamed = False
            for follower in followers:
                if follower.gone:
                    continue
                subscriber = follower.spec.kind == SUBSCRIBER
                try:
                    if not follower.push(durable if subscriber else every):
                        self.pushes_dropped += 1
                except Exception as exc:  # a follower that cannot be sent to is dropped, not the shard
                    print(f"shardstate shard {self.index}: dropping a follower: {exc!r}", file=sys.stderr)
                    self._unfollow(follower)
                    continue
                streamed = streamed or subscriber
                owing = owing or follower.owed is not None
            if durable and not streamed:
                with self._outbox_lock:
                    self._ray_outbox.extend(durable)
                self._ray_ready.set()

    def _ray_pusher(self) -> None:
        """Push durable events to this shard's subscriber by Ray calls, one push at a time, while it
        follows no stream of this shard. A push that is lost (no subscriber yet, a subscriber
        restart) costs only latency: the subscriber reads the shard's log for any gap."""
        while True:
            self._ray_ready.wait()
            time.sleep(NOTIFY_DELAY)  # what commits meanwhile goes in the same push
            self._ray_ready.clear()
            with self._outbox_lock:
                events, self._ray_outbox = self._ray_outbox, []
            if not events:
                continue
            try:
                if self._subscriber is None:
                    self._subscriber = ray.get_actor(self.subscriber_name, namespace=NAMESPACE)
                packed = pickle.dumps(ship_batch(events), protocol=pickle.HIGHEST_PROTOCOL)
                ray.get(self._subscriber.notify.remote(self.index, events[-1].seq, packed), timeout=10)
            except Exception:  # no subscriber (yet), or the actor is going away: it polls on start
                self._subscriber = None
                time.sleep(0.05)

    def _follow(self, raw_spec: bytes, stream: FollowStream) -> _Following:
        """Open a follow stream (on its connection's thread): events committed from now on."""
        spec = FollowSpec.from_bytes(raw_spec)
        with self._outbox_lock:
            live = [f for f in self._followers if not f.gone]
            if len(live) >= MAX_FOLLOWERS:
                raise ConnectionRefusedError(f"shard {self.index} serves {MAX_FOLLOWERS} follow streams")
            follower = EventFollower(spec, stream.send, start=self._outbox_head)
            stream.send(ready_frame(follower.start, self.index))  # before any frame the notifier sends
            self._followers = [*live, follower]
            self._watchers = sum(f.spec.kind != SUBSCRIBER for f in self._followers)
        return _Following(self, follower)

    def _unfollow(self, follower: EventFollower) -> None:
        follower.gone = True
        with self._outbox_lock:
            self._followers = [f for f in self._followers if f is not follower]
            self._watchers = sum(f.spec.kind != SUBSCRIBER for f in self._followers)

    def _require_ready(self) -> None:
        if self.phase != READY:
            raise self._not_ready()

    def events_since(self, after: int, limit: int = 1000, full: bool = False) -> list[Event]:
        """Committed events with ``seq > after`` (at most ``limit``), in order: compact and
        self-contained (``full``: every value inline; see ``ShardEngine.events_since``)."""
        self._require_ready()
        with self._engine_lock:
            return self.engine.events_since(after, limit, bool(full))

    def event_state(self) -> tuple[int, int, int]:
        """``(last seq, last acknowledged seq, oldest seq still in memory)`` of the event log."""
        self._require_ready()
        with self._engine_lock:
            log = self.engine.events
            return (self.engine.seq, self.engine.acked_seq, log[0].seq if log else self.engine.seq + 1)

    def ack(self, seq: int) -> int:
        """The subscriber handled every event up to ``seq``; storage drops them. Returns the ack."""
        self._require_ready()
        with self._engine_lock:
            acked = self.engine.ack(seq)
            self._commit()
            return acked

    def set_events_durable(self, durable: bool) -> int:
        """Whether a trigger listens (the subscriber says): keep events durably for it, or only in
        memory for watchers. Returns the last seq handed out before the switch (while loading: the
        stored one; the switch applies once loaded)."""
        with self._wish_lock:
            if self.phase != READY:
                self._durable_wish = bool(durable)
                return self._seq_hint
        with self._engine_lock:
            seq = self.engine.set_durable_events(bool(durable))
            self._commit()
            return seq

    def sweep(self) -> int:
        """Delete expired entries and forget old op results now; return how many entries expired.

        While storage is failing, first try whether it works again (a probe commit)."""
        if self.phase != READY:
            return 0
        with self._engine_lock:
            if not self.storage_ok:
                self._probe_storage()
            expired = self.engine.sweep()
            self._commit()
            return expired

    def set_slots(self, slots: Iterable[int], epoch: int) -> int:
        """Take a new slot assignment (from the router); return the new epoch."""
        with self._engine_lock:  # a batch sees one slot set from start to end
            if epoch > self.epoch:
                self.slots, self.epoch = frozenset(slots), epoch
            return self.epoch

    def info(self) -> dict[str, Any]:
        """Where this shard runs and what it holds (for tests, the console and the CLI)."""
        node_id, node_ip = _node()
        with self._engine_lock:
            return self._info(node_id, node_ip)

    def _info(self, node_id: str | None, node_ip: str | None) -> dict[str, Any]:
        store = self.engine.store
        total = self._rows_total
        return {
            "index": self.index,
            "epoch": self.epoch,
            "pid": os.getpid(),
            "node_id": node_id,
            "node_ip": node_ip,
            "cluster_id": self.cluster_id,
            "incarnation": self.incarnation,
            "phase": self.phase,
            "load_progress": 1.0 if self.phase == READY else (self._rows_loaded / total if total else 0.0),
            "load_error": self.load_error,
            "storage_ok": self.storage_ok,
            "storage_error": self.storage_error,
            "groups": len(store.groups),
            "keys": len(store),
            "durability": self.durability,
            "durable_events": self.engine.durable_events,
            "events": len(self.engine.events),
            "unacked": self.engine.seq - self.engine.acked_seq,
            "restarted": self.restarted,
            "load_seconds": self.load_seconds,
            "batches": self.batches,
            "deferrals": self.engine.deferrals,
            "commands": self.commands,
            "address": self.address(),
            "wire_error": self.wire_error,
            "wire": None if self._wire is None else self._wire.stats(),
            "followers": [f.spec.kind for f in self._followers],
            "pushes_dropped": self.pushes_dropped,
        }

    def ping(self) -> int:
        """Liveness check: returns this shard's index."""
        return self.index


class _Following:
    """A follow stream's follower as the wire server sees it."""

    def __init__(self, shard: ShardActor, follower: EventFollower) -> None:
        self._shard = shard
        self._follower = follower

    def closed(self) -> None:
        self._shard._unfollow(self._follower)


def _is_write(cmd: Any) -> bool:
    return isinstance(cmd, tuple) and len(cmd) == 5 and cmd[0] in WRITES


def _node() -> tuple[str | None, str | None]:
    """``(node id, node IP)`` of this process."""
    try:
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()
    except Exception:  # not inside Ray (unit use)
        return None, None


def _where_it_was(record: dict[str, Any] | None, index: int) -> str:
    """For a missing file: where the cluster metadata says shard ``index`` kept it, and where we are."""
    if record is None:
        return ""
    node_id, node_ip = _node()
    return (
        f" (the cluster metadata says shard {index} kept it on node {record.get('node_id')} "
        f"({record.get('node_ip')}) at {record.get('path')}; this is node {node_id} ({node_ip}))"
    )


def _wire_host(configured: str = "127.0.0.1") -> str:
    """Where the shard's connection listens: the cluster's ``wire_host`` (default 127.0.0.1), or
    what :data:`WIRE_HOST_ENV` says on this node (``node``: the node's IP)."""
    told = os.environ.get(WIRE_HOST_ENV, "").strip() or configured
    if told == "node":
        _node_id, node_ip = _node()
        return node_ip or "127.0.0.1"
    return told or "127.0.0.1"


def _was_restarted() -> bool:
    try:
        with warnings.catch_warnings():  # Ray warns about its own use of a deprecated accessor
            warnings.simplefilter("ignore")
            return bool(ray.get_runtime_context().was_current_actor_reconstructed)
    except Exception:  # not inside an actor (unit use)
        return False


#: The Ray actor class: sync, one call at a time (the serialization point), restarted from storage
#: when its process dies; calls are not retried by Ray (the client retries them with op_ids).
shard_actor_class = ray.remote(max_concurrency=1, num_cpus=0, max_restarts=-1, max_task_retries=0)(  # type: ignore[call-overload]
    ShardActor
)
