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

from shardstate._errors import InvalidInput, NotPrimary, ShardLoading, Unavailable
from shardstate.cluster import metadata
from shardstate.cluster.config import NAMESPACE, router_name
from shardstate.cluster.metrics import Flusher, record_shard
from shardstate.cluster.slots import slot_of
from shardstate.cluster.tallies import ShardTally
from shardstate.shards import replication as rep
from shardstate.shards.commands import WRITES, Result
from shardstate.shards.engine import DEFAULT_OP_RETENTION, ShardEngine
from shardstate.shards.event_forms import ship_batch
from shardstate.shards.followers import SUBSCRIBER, EventFollower, FollowSpec, ready_frame
from shardstate.shards.member import MemberChannel, member_path
from shardstate.shards.records import Changes, Event
from shardstate.shards.storage import (
    MemoryStorage,
    SqliteStorage,
    Storage,
    open_storage,
    restore_snapshot,
    shard_path,
)
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
        member: int | None = None,
    ) -> None:
        self._started = time.perf_counter()
        #: this actor's member number in a replicated shard (None: a shard without replicas, which
        #: is its own primary forever and restarts from its own file)
        self.member = member
        self.replicated = member is not None
        #: a replicated member's role and term (the shard's epoch), given by the router
        self.role = rep.BACKUP if self.replicated else rep.PRIMARY
        self.term = 0
        #: the replication log position of the last commit this member holds
        self.lsn = 0
        #: a backup: monotonic time it last accepted a record or ping of its primary
        self.last_contact = 0.0
        self._replicator: rep.Replicator | None = None
        self._router: Any = None
        #: a backup receiving a snapshot: (term, lsn, chunks so far)
        self._incoming: tuple[int, int, list[bytes]] | None = None
        self.promotions = 0
        self.fenced_reason: str | None = None
        #: a backup: records applied one at a time, and the seconds their commits took
        self.applied = 0
        self.apply_seconds = 0.0
        #: why the last confirmation failed (a primary whose backup failed while the router was away)
        self.unconfirmed: str | None = None
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
        #: ops by command, batch latency and size, replication rounds: counted per batch, recorded
        #: to Ray's metrics by a flusher thread once loaded (see shardstate.cluster.metrics)
        self.tally = ShardTally()
        self._flusher: Flusher | None = None
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
            fetch_op=storage.fetch_op if isinstance(storage, SqliteStorage) else None,
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
                if not self.replicated:
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
        if self.replicated:
            threading.Thread(target=self._pinger, daemon=True, name=f"shard-{self.index}-ping").start()
        if self.cluster_id is not None:
            self._start_wire()
        self._flusher = Flusher(self._record_metrics, name=f"shard-{self.index}-metrics")
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
            if self.member is not None:
                unix = private_socket_path(f"{name}-{self.index}-{self.member}.sock")
            self._wire = WireServer(
                host, secret, self.run, unix=unix, follow=self._follow, control=self._control
            )
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
        if self.member is not None:  # a replicated member: its own file (or memory), no claims
            path = None if self.durability == "memory" or self.directory is None else member_path(
                self.directory, self.index, self.member
            )
            if path is None:
                return SqliteStorage(":memory:", "memory", check=False)
            return SqliteStorage(path, self.durability, check=False)
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
        self.lsn = loaded.lsn
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
        or is failing (changes stay pending in the engine until a probe commit works); in a
        replicated shard also if the commit could not be confirmed by the in-sync backups
        (:meth:`_confirm`; :meth:`_refusal` says why).
        """
        if not self.storage_ok:
            return False
        changes = self.engine.take_changes()
        if not changes:
            return True
        if self._replicator is not None:
            self.lsn += 1
            changes.lsn = self.lsn
            body = pickle.dumps(changes, protocol=pickle.HIGHEST_PROTOCOL)
        try:
            self.storage.commit(changes)
        except Exception as exc:
            self._storage_failed(exc)
            return False
        fresh = self.engine.take_events()
        if self._replicator is not None:
            self._replicator.record(self.lsn, body, (changes.events, fresh))
            return self._confirm()
        if fresh:
            self._notify(changes.events, fresh)
        return True

    def _confirm(self) -> bool:
        """A replicated primary: have every in-sync backup confirm what is pending (or renew the
        lease with a ping); then notify the confirmed commits' events. False if it could not: the
        member was deposed (it is fenced now), or a backup failed and the router could not drop it
        (the records stay pending: the next batch tries again before it runs)."""
        replicator = self._replicator
        if replicator is None:
            return self.role == rep.PRIMARY
        timed = bool(replicator.backups)
        started = time.perf_counter()
        try:
            notes = replicator.confirm()
        except rep.Deposed as exc:
            self._fence(str(exc))
            return False
        except rep.NotConfirmed as exc:
            self.unconfirmed = str(exc)
            return False
        self.unconfirmed = None
        if timed:
            self.tally.replication_round(time.perf_counter() - started)
        for durable, fresh in notes:
            if fresh:
                self._notify(durable, fresh)
        return True

    def _refusal(self) -> Unavailable:
        """Why a replicated member answers no batch now (see :meth:`_commit`)."""
        if self.role == rep.FENCED:
            return NotPrimary(
                f"shard {self.index} member {self.member} was deposed ({self.fenced_reason}); "
                "the shard has a new primary"
            )
        if self.role != rep.PRIMARY:
            return NotPrimary(f"shard {self.index} member {self.member} is a backup (term {self.term})")
        if not self.storage_ok:
            return self._read_only_error()
        return NotPrimary(  # clients wait and send again (with their op_ids) until it can
            f"shard {self.index} cannot confirm its writes with its backups yet: {self.unconfirmed}"
        )

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
        replicator = self._replicator
        if self.replicated and (
            self.role != rep.PRIMARY
            or (replicator is not None and replicator.needs_round(time.monotonic()) and not self._confirm())
        ):  # a backup, a deposed primary, or earlier commits not confirmed yet: run nothing
            return [(False, self._refusal())] * len(batch)
        self.batches += 1
        self.commands += len(batch)
        started = time.perf_counter()
        try:
            return self._execute_counted(batch, lane, resume)
        finally:
            self.tally.batch(batch, time.perf_counter() - started)

    def _execute_counted(self, batch: Sequence[Any], lane: str | None, resume: bool) -> list[Result]:
        if not self.storage_ok:
            return self._execute_read_only(batch)
        results = self.engine.execute_batch(batch, lane=lane, resume=bool(resume))
        if not self._commit():  # nothing of this batch is on disk, nor (rebuilt) in memory
            error = self._read_only_error() if not self.replicated else self._refusal()
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

    # -- replication (a replicated shard's members; see shardstate.shards.replication) --------
    def control(self, body: bytes) -> bytes:
        """A control message sent as a Ray call (where this member's connection is not reachable)."""
        return self._control(body, None, False)

    def _control(self, body: bytes, _lane: str | None = None, _resume: bool = False) -> bytes:
        """Answer one control message (on a connection's thread, or a Ray call). A malformed or
        unknown message is answered ``REFUSED`` with the reason; nothing changes."""
        try:
            message = rep.unpack(body)
            handler = self._control_handlers().get(message[0])
            if handler is None or not self.replicated:
                return rep.pack((rep.REFUSED, f"shard {self.index} takes no {message[0]!r} message"))
            if self.phase != READY and message[0] != rep.HEARTBEAT:
                return rep.pack((rep.REFUSED, f"shard {self.index} is {self.phase}"))
            return rep.pack(handler(*message[1:]))
        except Exception as exc:
            return rep.pack((rep.REFUSED, f"{type(exc).__name__}: {exc}"))

    def _control_handlers(self) -> dict[str, Any]:
        return {
            rep.HEARTBEAT: self._on_heartbeat,
            rep.APPLY: self._on_apply,
            rep.APPLY_MANY: self._on_apply_many,
            rep.PING: self._on_ping,
            rep.SNAPSHOT: self._on_snapshot,
            rep.PROMOTE: self._on_promote,
            rep.DEPOSE: self._on_depose,
            rep.SYNC: self._on_sync,
        }

    def _on_heartbeat(self) -> tuple[str, dict[str, Any]]:
        """The router's heartbeat: this member's role, term and log position (no lock: it must answer
        while a batch runs)."""
        replicator = self._replicator
        return (
            rep.OK,
            {
                "member": self.member,
                "pid": os.getpid(),
                "phase": self.phase,
                "role": self.role,
                "term": self.term,
                "lsn": self.lsn,
                "in_sync": [] if replicator is None else sorted(replicator.backups),
                "joining": [] if replicator is None else sorted(replicator.joiners),
                "endpoint": self.endpoint(),
            },
        )

    def _check_term(self, term: int) -> tuple[str, Any] | None:
        """None if a message of ``term`` from this backup's primary may be applied, else the answer."""
        if not isinstance(term, int) or isinstance(term, bool):
            return (rep.REFUSED, f"a term is an int, got {type(term).__name__}")
        if term < self.term or (self.role != rep.BACKUP and term <= self.term):
            return (rep.STALE, self.term)
        if term > self.term or self.role != rep.BACKUP:
            return (rep.REFUSED, f"member {self.member} is no backup of term {term} (it has {self.term})")
        return None

    def _on_apply(self, term: int, lsn: int, changes_body: bytes) -> tuple[str, Any]:
        """A backup commits one of its primary's records (in order; a repeat is confirmed again)."""
        with self._engine_lock:
            refused = self._check_term(term)
            if refused is not None:
                return refused
            self.last_contact = time.monotonic()
            if lsn <= self.lsn:
                return (rep.OK, self.lsn)
            if lsn != self.lsn + 1:
                return (rep.GAP, self.lsn)
            changes = pickle.loads(changes_body)
            if not isinstance(changes, Changes):
                return (rep.REFUSED, f"a record holds Changes, got {type(changes).__name__}")
            changes.lsn = lsn
            started = time.perf_counter()
            self.storage.commit(changes)
            self.applied += 1
            self.apply_seconds += time.perf_counter() - started
            self.lsn = lsn
            return (rep.OK, lsn)

    def _on_apply_many(self, term: int, records: list[tuple[int, bytes]]) -> tuple[str, Any]:
        """A catching-up backup commits a run of records in one transaction (repeats skipped)."""
        with self._engine_lock:
            refused = self._check_term(term)
            if refused is not None:
                return refused
            if not isinstance(records, list):
                return (rep.REFUSED, f"records are a list, got {type(records).__name__}")
            self.last_contact = time.monotonic()
            batch: list[Changes] = []
            lsn = self.lsn
            for record_lsn, changes_body in records:
                if record_lsn <= lsn:
                    continue
                if record_lsn != lsn + 1:
                    return (rep.GAP, self.lsn)
                changes = pickle.loads(changes_body)
                if not isinstance(changes, Changes):
                    return (rep.REFUSED, f"a record holds Changes, got {type(changes).__name__}")
                changes.lsn = lsn = record_lsn
                batch.append(changes)
            if batch and isinstance(self.storage, SqliteStorage):
                self.storage.commit_many(batch)
            self.lsn = lsn
            return (rep.OK, lsn)

    def _on_ping(self, term: int, _lsn: int) -> tuple[str, Any]:
        """The primary renews its lease: this backup will not take over for LEASE seconds."""
        with self._engine_lock:
            refused = self._check_term(term)
            if refused is not None:
                return refused
            self.last_contact = time.monotonic()
            return (rep.OK, self.lsn)

    def _on_snapshot(self, term: int, lsn: int, offset: int, total: int, chunk: bytes) -> tuple[str, Any]:
        """Become a backup of ``term`` from the primary's database (in chunks, in order)."""
        with self._engine_lock:
            if term < self.term or (self.role == rep.PRIMARY and term <= self.term):
                return (rep.STALE, self.term)
            if offset == 0:
                self._incoming = (term, lsn, [])
            incoming = self._incoming
            if incoming is None or incoming[:2] != (term, lsn) or sum(map(len, incoming[2])) != offset:
                self._incoming = None
                return (rep.REFUSED, "a snapshot chunk out of order")
            incoming[2].append(bytes(chunk))
            if offset + len(chunk) < total:
                return (rep.OK, self.lsn)
            self._incoming = None
            if self.role == rep.PRIMARY:
                self._fence(f"a snapshot of term {term} arrived")
            self.storage.close()
            path = None
            if self.durability != "memory" and self.directory is not None and self.member is not None:
                path = member_path(self.directory, self.index, self.member)
            self.storage = restore_snapshot(b"".join(incoming[2]), path, self.durability)
            self.storage_ok = True
            self.lsn, self.term, self.role = lsn, term, rep.BACKUP
            self.fenced_reason = None
            self.last_contact = time.monotonic()
            return (rep.OK, lsn)

    def _on_promote(self, term: int) -> tuple[str, Any]:
        """Take over as the primary of ``term`` (the router recorded it first): refuse the old
        primary at once, wait until its lease has run out, load what storage holds, serve."""
        with self._engine_lock:
            if self.role == rep.PRIMARY and term == self.term:
                return (rep.OK, self.lsn)
            if not isinstance(term, int) or term <= self.term:
                return (rep.STALE, self.term)
            if self.role != rep.BACKUP:
                return (rep.REFUSED, f"a {self.role} member cannot be promoted")
            self.term = term
            wait = self.last_contact + rep.LEASE - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        with self._engine_lock:
            if self.term != term or self.role != rep.BACKUP:
                return (rep.STALE, self.term)
            engine = self._engine_from_storage()
            with self._wish_lock:
                durable = self._durable_wish
            engine.set_durable_events(self._initial_durable_events() if durable is None else durable)
            self.engine = engine
            self._outbox_head = engine.seq
            self._replicator = rep.Replicator(term, self.lsn, self._drop_backup)
            self.role = rep.PRIMARY
            self.promotions += 1
            engine.sweep()
            self._commit()
            return (rep.OK, self.lsn)

    def _on_depose(self, term: int) -> tuple[str, Any]:
        """The router made another member primary of ``term``: stop serving (if still primary)."""
        with self._engine_lock:
            if isinstance(term, int) and term > self.term:
                self.term = term
                if self.role == rep.PRIMARY:
                    self._fence(f"the router deposed it for term {term}")
            return (rep.OK, self.term)

    def _fence(self, reason: str) -> None:
        """Stop serving for good (a newer term exists): close the replication channels and the
        connection (clients holding one see it break and find the new primary)."""
        print(f"shardstate shard {self.index} member {self.member}: fenced: {reason}", file=sys.stderr)
        self.role = rep.FENCED
        self.fenced_reason = reason
        if self._replicator is not None:
            self._replicator.close()
            self._replicator = None
        threading.Thread(target=self.stop_serving, daemon=True).start()

    def _on_sync(self, term: int, member: int, endpoint: Any) -> tuple[str, Any]:
        """The router asks this primary to bring backup ``member`` up to date (a background thread)."""
        replicator: rep.Replicator | None = self._replicator
        if replicator is None or self.role != rep.PRIMARY or term != self.term:
            return (rep.STALE, self.term)
        if not isinstance(member, int) or member == self.member:
            return (rep.REFUSED, f"not a backup: {member!r}")
        if member in replicator.backups or member in replicator.joiners:
            return (rep.OK, "already")
        with self._engine_lock:
            if not self._is_current(replicator):
                return (rep.STALE, self.term)
            joiner = replicator.join(member)
            data, lsn = self._snapshot_data(), self.lsn
        name = f"shard-{self.index}-sync-{member}"
        args = (replicator, joiner, term, member, endpoint, data, lsn)
        threading.Thread(target=self._catch_up, args=args, daemon=True, name=name).start()
        return (rep.OK, "started")

    def _snapshot_data(self) -> bytes:
        if not isinstance(self.storage, SqliteStorage):
            raise RuntimeError("a replicated member keeps SQLite storage")
        return self.storage.snapshot()

    def _catch_up(
        self,
        replicator: rep.Replicator,
        joiner: rep.Joiner,
        term: int,
        member: int,
        endpoint: Any,
        data: bytes,
        lsn: int,
    ) -> None:
        """Send backup ``member`` the snapshot taken at ``lsn``, then the records committed since;
        when only a few are left, stop writes, send the rest and have the router count it in sync."""
        channel: MemberChannel | None = None
        admitted = False
        try:
            handle = ray.get_actor(f"{self.cluster}:shard:{self.index}:{member}", namespace=NAMESPACE)
            channel = MemberChannel(handle, endpoint, self._secret(), _node()[1])
            for message in rep.snapshot_messages(term, lsn, data):
                _expect_ok(channel.call(message, 60.0))
            del data
            while True:
                records = replicator.take_tail(joiner, limit=8 * rep.CATCH_UP_BATCH)
                if joiner.abandoned:
                    raise RuntimeError("its log tail grew too long")
                _ship(channel, term, records)
                if len(records) < rep.HANDOVER_TAIL:
                    break
            with self._engine_lock:
                if not self._is_current(replicator) or joiner.abandoned:
                    raise RuntimeError("the primary changed")
                _ship(channel, term, replicator.take_tail(joiner, limit=1 << 30))
                if not self._router_call("mark_in_sync", self.index, term, member):
                    raise RuntimeError("the router refused it")
                replicator.admit(joiner, channel, self.lsn)
                admitted = True
        except Exception as exc:
            print(f"shardstate shard {self.index}: backup {member} not caught up: {exc!r}", file=sys.stderr)
        finally:
            if not admitted:
                replicator.forget_joiner(joiner)
                if channel is not None:
                    channel.close()

    def _is_current(self, replicator: rep.Replicator) -> bool:
        return self._replicator is replicator

    def _secret(self) -> bytes | None:
        try:
            return metadata.secret(self.cluster) if self.cluster_id is not None else None
        except Exception:
            return None

    def _router_call(self, method: str, *args: Any) -> Any:
        """Call the cluster's router (found by name, cached) and wait a few seconds for its answer."""
        if self._router is None:
            self._router = ray.get_actor(router_name(self.cluster), namespace=NAMESPACE)
        try:
            return ray.get(getattr(self._router, method).remote(*args), timeout=5.0)
        except Exception:
            self._router = None
            raise

    def _drop_backup(self, term: int, member: int) -> bool:
        """Ask the router to drop a failing backup of ``term`` (False: it knows a newer term)."""
        return bool(self._router_call("drop_backup", self.index, term, member))

    def _pinger(self) -> None:
        """A replicated primary that commits nothing still renews its lease with its backups (and
        confirms what is pending)."""
        while True:
            time.sleep(rep.PING_EVERY)
            replicator = self._replicator
            if replicator is None or not replicator.needs_round(time.monotonic()):
                continue
            with self._engine_lock:
                if self._is_current(replicator) and self.role == rep.PRIMARY:
                    self._confirm()

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
        if self.replicated and self.role != rep.PRIMARY:  # a backup commits no events of its own
            raise ConnectionRefusedError(f"shard {self.index}'s member {self.member} is not its primary")
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
        if self.replicated and self.role != rep.PRIMARY:
            raise self._refusal()

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
            if self.phase != READY or (self.replicated and self.role != rep.PRIMARY):
                self._durable_wish = bool(durable)
                if self.replicated and self.phase == READY:
                    raise self._refusal()
                return self._seq_hint
        with self._engine_lock:
            seq = self.engine.set_durable_events(bool(durable))
            self._commit()
            return seq

    def sweep(self) -> int:
        """Delete expired entries and forget old op results now; return how many entries expired.

        While storage is failing, first try whether it works again (a probe commit)."""
        if self.phase != READY or (self.replicated and self.role != rep.PRIMARY):
            return 0
        with self._engine_lock:
            if self.replicated and self.role != rep.PRIMARY:
                return 0
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
        metrics = self.tally.summary()  # outside the engine lock: it sorts the recent samples
        with self._engine_lock:
            return {**self._info(node_id, node_ip), "metrics": metrics}

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
            "member": self.member,
            "role": self.role,
            "term": self.term,
            "lsn": self.lsn,
            "promotions": self.promotions,
            "applied": self.applied,
            "apply_us": round(1e6 * self.apply_seconds / self.applied, 1) if self.applied else None,
            "fenced_reason": self.fenced_reason,
            "replication": None if self._replicator is None else self._replicator.status(),
        }

    def _record_metrics(self) -> None:
        """Record what the tally gathered to Ray's metrics (the flusher thread, once a second)."""
        record_shard(self.cluster, self.index, self.tally.drain())

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


def _expect_ok(raw: bytes) -> tuple[Any, ...]:
    answer = rep.unpack(raw)
    if answer[0] != rep.OK:
        raise RuntimeError(f"the backup answered {answer!r}")
    return answer


def _ship(channel: MemberChannel, term: int, records: list[tuple[int, bytes]]) -> None:
    """Send tail records to a catching-up backup (batched, pipelined) and check every answer."""
    messages = rep.tail_messages(term, records)
    for body in messages:
        channel.send(body)
    for _ in messages:
        _expect_ok(channel.receive(rep.SHIP_TIMEOUT * 30))


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
