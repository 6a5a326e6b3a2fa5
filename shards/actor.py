"""The shard actor: a thin Ray shell around :class:`ShardEngine` and its :class:`Storage`.

Written as a plain class and made remote at the edge (``shard_actor_class``). It runs as a sync actor
with ``max_concurrency=1``: Ray then executes its calls one at a time and keeps each caller's order,
so the actor itself is the serialization point of every group it owns and needs no locks.

Per batch: the engine executes the commands, storage commits what they changed in one transaction,
and only then does the actor answer, so an acknowledged write is durable. If a commit fails the
process exits: memory would be ahead of disk, and Ray restarts the shard from its file instead.
"""

from __future__ import annotations

import os
import pickle
import sys
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import ray

from shardstate._errors import InvalidInput
from shardstate.cluster.config import NAMESPACE
from shardstate.cluster.slots import slot_of
from shardstate.shards.commands import Result
from shardstate.shards.engine import DEFAULT_OP_RETENTION, ShardEngine
from shardstate.shards.records import Event
from shardstate.shards.storage import open_storage
from shardstate.shards.validation import DEFAULT_MAX_VALUE_SIZE

#: Seconds between the shard's own sweeps of expired entries and old op results.
SWEEP_INTERVAL = 1.0
#: The largest packed batch a shard unpickles (clients split theirs far below this).
MAX_FRAME_BYTES = 512 * 1024 * 1024
#: Seconds the notifier waits after a commit before pushing its events to the subscriber.
NOTIFY_DELAY = 0.01


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
    ) -> None:
        started = time.perf_counter()
        self.cluster = cluster
        self.index = index
        self.epoch = epoch
        self.slots = frozenset(slots)
        restarted = _was_restarted()
        self.storage = open_storage(
            None if directory is None else os.path.expanduser(directory),
            index,
            durability,
            must_exist=must_exist or restarted,
        )
        self.engine = ShardEngine(
            owns=self._owns,
            max_value_size=max_value_size,
            op_retention=op_retention,
            fetch_op=None if durability == "memory" else self.storage.fetch_op,
        )
        self.engine.load(self.storage.load())
        self.engine.sweep()
        self._commit()
        self.durability = durability
        self.batches = 0
        self.commands = 0
        self.subscriber_name = subscriber_name or f"{cluster}:subscriber:0"
        self._subscriber: Any = None
        self._outbox: list[Event] = []
        self._outbox_lock = threading.Lock()
        threading.Thread(target=self._notifier, daemon=True).start()
        self.restarted = restarted
        self.load_seconds = time.perf_counter() - started
        if sweep_interval > 0:
            threading.Thread(target=self._sweeper, args=(sweep_interval,), daemon=True).start()

    def _owns(self, group_id: str) -> bool:
        return slot_of(group_id) in self.slots

    def _commit(self) -> None:
        """Commit what the engine changed; then push the new events to the subscriber."""
        changes = self.engine.take_changes()
        if not changes:
            return
        try:
            self.storage.commit(changes)
        except BaseException as exc:  # memory is now ahead of disk: restart from disk instead
            print(f"shardstate shard {self.index}: commit failed, restarting: {exc!r}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(70)
        if changes.events:
            self._notify(changes.events)

    def _sweeper(self, interval: float) -> None:
        """Ask this actor to sweep, through its own queue, so sweeps serialize with batches."""
        me = ray.get_runtime_context().current_actor
        while True:
            time.sleep(interval)
            try:
                ray.get(me.sweep.remote())
            except Exception:
                return  # the actor is going away

    def execute(self, batch: Sequence[Any], lane: str | None = None, resume: bool = False) -> list[Result]:
        """Execute a batch of commands in order, commit their changes, then answer (one result each).

        ``lane``/``resume``: a client stream with several batches in flight (see
        ``ShardEngine.execute_batch``: a deferral fences the lane until the rest comes back).
        """
        if not isinstance(batch, (list, tuple)):
            return [(False, InvalidInput(f"a batch is a list of commands, got {type(batch).__name__}"))]
        if lane is not None and not isinstance(lane, str):
            return [(False, InvalidInput(f"a lane is a str, got {type(lane).__name__}"))]
        self.batches += 1
        self.commands += len(batch)
        results = self.engine.execute_batch(batch, lane=lane, resume=bool(resume))
        self._commit()
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

    def _notify(self, events: list[Event]) -> None:
        """Queue newly committed events for the notifier thread (off the batch's critical path)."""
        with self._outbox_lock:
            self._outbox.extend(events)

    def _notifier(self) -> None:
        """Push queued events to this shard's subscriber, one push at a time.

        Each push waits until the subscriber has taken the previous one, and whatever committed
        meanwhile goes in the next: a quiet shard pushes each batch at once, a busy one pushes many
        batches per call instead of one call per batch. A push that is lost (no subscriber yet, a
        subscriber restart) costs only latency: the subscriber reads the shard's log for any gap.
        """
        while True:
            time.sleep(NOTIFY_DELAY)  # polls: a commit wakes no thread, so its answer leaves first
            with self._outbox_lock:
                events, self._outbox = self._outbox, []
            if not events:
                continue
            try:
                if self._subscriber is None:
                    self._subscriber = ray.get_actor(self.subscriber_name, namespace=NAMESPACE)
                packed = pickle.dumps(events, protocol=pickle.HIGHEST_PROTOCOL)
                ray.get(self._subscriber.notify.remote(self.index, events[-1].seq, packed), timeout=10)
            except Exception:  # no subscriber (yet), or the actor is going away: it polls on start
                self._subscriber = None
                time.sleep(0.05)

    def events_since(self, after: int, limit: int = 1000) -> list[Event]:
        """Committed events with ``seq > after`` (at most ``limit``), in order."""
        return self.engine.events_since(after, limit)

    def event_state(self) -> tuple[int, int, int]:
        """``(last seq, last acknowledged seq, oldest seq still in memory)`` of the event log."""
        log = self.engine.events
        return (self.engine.seq, self.engine.acked_seq, log[0].seq if log else self.engine.seq + 1)

    def ack(self, seq: int) -> int:
        """The subscriber handled every event up to ``seq``; storage drops them. Returns the ack."""
        acked = self.engine.ack(seq)
        self._commit()
        return acked

    def set_events_durable(self, durable: bool) -> int:
        """Whether a trigger listens (the subscriber says): keep events durably for it, or only in
        memory for watchers. Returns the last seq handed out before the switch."""
        seq = self.engine.set_durable_events(bool(durable))
        self._commit()
        return seq

    def sweep(self) -> int:
        """Delete expired entries and forget old op results now; return how many entries expired."""
        expired = self.engine.sweep()
        self._commit()
        return expired

    def set_slots(self, slots: Iterable[int], epoch: int) -> int:
        """Take a new slot assignment (from the router); return the new epoch."""
        if epoch > self.epoch:
            self.slots, self.epoch = frozenset(slots), epoch
        return self.epoch

    def info(self) -> dict[str, Any]:
        """Where this shard runs and what it holds (for tests, the console and the CLI)."""
        store = self.engine.store
        ctx = ray.get_runtime_context()
        return {
            "index": self.index,
            "epoch": self.epoch,
            "pid": os.getpid(),
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "groups": len(store.groups),
            "keys": len(store),
            "durability": self.durability,
            "durable_events": self.engine.durable_events,
            "restarted": self.restarted,
            "load_seconds": self.load_seconds,
            "batches": self.batches,
            "deferrals": self.engine.deferrals,
            "commands": self.commands,
        }

    def ping(self) -> int:
        """Liveness check: returns this shard's index."""
        return self.index


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
