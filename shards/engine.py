"""The shard's operation engine: executes command batches against a :class:`GroupStore` (pure).

No Ray and no I/O here: the shard actor hands each incoming batch to :meth:`ShardEngine.execute_batch`,
takes the batch's :class:`Changes` with :meth:`ShardEngine.take_changes`, has storage commit them, and
only then answers. Commands run one at a time, in order; a bad command becomes that command's error
result and never disturbs the others or the engine. Time comes from an injected ``clock``.

Beyond plain reads and writes the engine keeps, per entry, a version and an optional expiry time
(TTL), and per write with an ``op_id`` a fingerprint of the call and its result, so a repeated call
returns the first result and applies nothing again.

- Versions are the shard's event sequence numbers: a write's version is the ``seq`` of the event it
  emits, so the versions of a key only grow, also across delete and re-create (no ABA for
  compare-and-set), like etcd's revisions.
- An op_id's scope is ``(group_id, key)``: the same op_id on another key is another write; on the same
  key with a different call (kind or arguments) it is :class:`InvalidInput` and changes nothing.
"""

from __future__ import annotations

import hashlib
import heapq
import io
import itertools
import math
import pickle
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

from shardstate._errors import (
    ConflictError,
    Deferred,
    InvalidInput,
    ReadOnly,
    StaleShardMap,
    StateError,
    UpdateError,
)
from shardstate.shards import commands as C
from shardstate.shards.event_forms import VALUE_REF_MIN, delta_ops, ship_batch
from shardstate.shards.records import Changes, Entry, Event, Loaded, OpRecord
from shardstate.shards.store import GroupStore
from shardstate.shards.update_ops import NOT_JSON, apply_ops, has_json_form
from shardstate.shards.validation import (
    DEFAULT_MAX_VALUE_SIZE,
    check_name,
    check_size,
    check_writable,
    is_reserved,
)

#: op_ids the clients generate for their own retries start with this; they are kept briefly.
AUTO_OP_PREFIX = "~"
DEFAULT_OP_RETENTION = 24 * 3600.0
DEFAULT_AUTO_OP_RETENTION = 120.0  # > the clients' default retry_timeout (60 s) + a restart
#: an automatic retry's remembered result is kept whole up to this size (bytes of old + new value)
AUTO_RESULT_LIMIT = 16 * 1024
#: a remembered result is kept in RAM (not only in storage) up to this size ...
RESULT_RAM_ITEM = 64 * 1024
#: ... while all results kept in RAM stay under this many bytes; the others are read back from
#: storage when their op_id repeats (with memory storage they are forgotten: see ``_replay``)
RESULT_RAM_BUDGET = 64 * 1024 * 1024
#: how many keys' decoded values the engine keeps between batches (for repeated updates), and the
#: stored size of what it decoded since it last dropped them all
DECODED_KEYS = 1024
DECODED_BYTES = 64 * 1024 * 1024
#: a batch's answers stop at about this many bytes of values: the rest of the batch is deferred
#: (not executed; the client sends it again), so no batch builds an answer the shard cannot hold
RESPONSE_BUDGET = 64 * 1024 * 1024
#: ``list``/``items`` of a larger group answer in pages of about this many bytes
PAGE_BYTES = 16 * 1024 * 1024
#: the most items one ``page`` command returns
MAX_PAGE_ITEMS = 1000
#: bytes counted per row of a page besides its value (key, tuple, pickling)
ROW_OVERHEAD = 64
#: lanes (a client's ordered stream of batches) remembered as fenced after a deferral
FENCED_LANES = 4096
#: acknowledged events kept in memory for live watchers
RECENT_EVENTS = 10_000
#: ... and at most this many bytes of their values
RECENT_EVENT_BYTES = 64 * 1024 * 1024

CREATED = "state:created"
UPDATED = "state:updated"
DELETED = "state:deleted"


class ShardEngine:
    """Executes commands for the groups this shard owns.

    ``owns(group_id)`` says whether this shard owns the group's slot; commands for other groups get
    a :class:`StaleShardMap` error so the caller refreshes its map. ``max_value_size`` bounds stored
    values, including the result of an update. ``op_retention`` is how long (seconds) the result of
    a write with a caller's ``op_id`` is remembered; ``auto_op_retention`` the same for op_ids a
    client generated for its own retries.
    """

    def __init__(
        self,
        store: GroupStore | None = None,
        *,
        owns: Callable[[str], bool] | None = None,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
        clock: Callable[[], float] = time.time,
        op_retention: float = DEFAULT_OP_RETENTION,
        auto_op_retention: float = DEFAULT_AUTO_OP_RETENTION,
        fetch_op: Callable[[str], bytes | None] | None = None,
    ) -> None:
        self.store = store if store is not None else GroupStore()
        self.owns = owns
        self.max_value_size = max_value_size
        self.clock = clock
        self.op_retention = op_retention
        self.auto_op_retention = auto_op_retention
        self.fetch_op = fetch_op
        #: scoped op_id (see :func:`op_scope`) -> (created_at, fingerprint, result): the result is the
        #: ok payload, or _STORED (in storage only) or _FORGOTTEN; dicts keep creation order, so
        #: pruning pops from the front
        self.ops: dict[str, tuple[float, bytes | None, Any]] = {}
        self.auto_ops: dict[str, tuple[float, bytes | None, Any]] = {}
        #: bytes of the results kept in RAM (bounded by RESULT_RAM_BUDGET)
        self.result_bytes = 0
        #: the live expiry time of every key that has one, and a heap of (time, group, key) over
        #: them (stale heap entries are skipped, and the heap is rebuilt when they pile up)
        self._deadlines: dict[tuple[str, str], float] = {}
        self._expiry: list[tuple[float, str, str]] = []
        #: the event log: every committed change, in seq order (unacknowledged ones + a recent tail)
        self.events: deque[Event] = deque()
        self.seq = 0
        self.acked_seq = 0
        #: bytes of values the log holds, each bytes object counted once (see :meth:`_log`)
        self._event_bytes = 0
        #: seq of an event -> seq of the next event of its key that refers to it (``Event.base``)
        self._successor: dict[int, int] = {}
        #: every event since the last :meth:`take_events` (durable or not: for the notifier)
        self._fresh: list[Event] = []
        #: False while no trigger listens: events then go to the in-memory log only (for watchers)
        #: and count as acknowledged at once, so storage writes and pushes none of them
        self.durable_events = True
        self._changes = Changes()
        self._now = 0.0
        #: lanes whose batches are all deferred until one comes with ``resume`` (see execute_batch)
        self._fenced: OrderedDict[str, None] = OrderedDict()
        #: batches whose answer reached the budget (the rest of them was deferred)
        self.deferrals = 0
        #: values recently decoded or produced by updates, by key, with the stored bytes they belong
        #: to: a hot key (a growing fan-in document) is not unpickled again for every update
        self._decoded: dict[tuple[str, str], tuple[bytes, Any]] = {}
        self._decoded_bytes = 0
        self._handlers: dict[str, Callable[[Any, Any, Any, dict[str, Any]], Any]] = {
            C.SET: self._set,
            C.GET: self._get,
            C.ENTRY: self._entry,
            C.DELETE: self._delete,
            C.LIST: self._list,
            C.ITEMS: self._items,
            C.CLEAR: self._clear,
            C.UPDATE: self._update,
            C.GROUPS: self._groups,
            C.COUNTS: self._counts,
            C.PAGE: self._key_page,
        }

    # -- start-up -----------------------------------------------------------------------------
    def load(self, loaded: Loaded) -> None:
        """Start from stored state (entry rows in insertion order, remembered op_ids)."""
        self.store.forget_order()
        groups, deadlines, make = self.store.groups, self._deadlines, tuple.__new__
        top = 0
        for group_id, key, data, version, updated_at, expires_at in loaded.entries:
            group = groups.get(group_id)
            if group is None:
                group = groups[group_id] = {}
            group[key] = make(Entry, (data, version, updated_at, expires_at))
            if expires_at is not None:
                deadlines[(group_id, key)] = expires_at
            if version > top:
                top = version
        self._expiry = [(at, g, k) for (g, k), at in deadlines.items()]
        heapq.heapify(self._expiry)
        # versions are seqs; files from before that rule counted versions per key
        self.seq, self.acked_seq = max(loaded.seq, top), loaded.acked_seq
        for event in loaded.events:
            self._log(event)
        for scoped, created_at in loaded.op_ids:
            table = self.auto_ops if _op_id_of(scoped).startswith(AUTO_OP_PREFIX) else self.ops
            table[scoped] = (created_at, None, _STORED)

    # -- entry points -------------------------------------------------------------------------
    def execute_batch(
        self, batch: Sequence[Any], now: float | None = None, *, lane: str | None = None, resume: bool = False
    ) -> list[C.Result]:
        """Execute the commands of ``batch`` in order; one result per command.

        Expired entries are removed first, so no command of the batch sees them. Once the answers
        hold more than :data:`RESPONSE_BUDGET` bytes of values, the rest of the batch is not
        executed: each of those commands is answered :class:`Deferred` (the first command always
        runs, so a client that sends the rest again makes progress).

        ``lane`` names a client's ordered stream of batches that may have several in flight. After a
        deferral the lane is *fenced*: its later batches, already on their way, are deferred whole,
        until the client sends the deferred commands again with ``resume=True``. So a caller's
        commands never run out of order.
        """
        if lane is not None:
            if resume:
                self._fenced.pop(lane, None)
            elif lane in self._fenced:
                return [_DEFERRED] * len(batch)
        self._now = self.clock() if now is None else now
        if len(self._decoded) > DECODED_KEYS or self._decoded_bytes > DECODED_BYTES:
            self._decoded.clear()
            self._decoded_bytes = 0
        self._expire(self._now)
        results: list[C.Result] = []
        append, execute, size_of = results.append, self._execute, _answer_size
        budget = RESPONSE_BUDGET
        for cmd in batch:
            result = execute(cmd)
            append(result)
            if result[0]:
                budget -= size_of(result[1])
                if budget < 0 and len(results) < len(batch):
                    results.extend([_DEFERRED] * (len(batch) - len(results)))
                    self.deferrals += 1
                    if lane is not None:
                        self.fence(lane)
                    break
        return results

    def fence(self, lane: str) -> None:
        """Defer every batch of ``lane`` until one arrives with ``resume`` (bounded memory)."""
        self._fenced[lane] = None
        self._fenced.move_to_end(lane)
        while len(self._fenced) > FENCED_LANES:
            self._fenced.popitem(last=False)

    def execute(self, cmd: Any, now: float | None = None) -> C.Result:
        """Execute one command (a batch of one)."""
        return self.execute_batch([cmd], now)[0]

    def take_changes(self) -> Changes:
        """What the commands since the last call changed (for storage); resets the record."""
        changes, self._changes = self._changes, Changes()
        return changes

    def take_events(self) -> list[Event]:
        """Every event emitted since the last call, durable or not, in order (full form)."""
        fresh, self._fresh = self._fresh, []
        return fresh

    def events_since(self, after: int, limit: int = 1000, full: bool = False) -> list[Event]:
        """Up to ``limit`` events with ``seq > after``, in order (from the in-memory log).

        Compact and self-contained (see :mod:`shardstate.shards.event_forms`): a large old value is
        left out only when the event that wrote it is earlier in the answer. ``full``: every value
        inline (for a reader that cannot compute an update's new value itself)."""
        log = self.events
        if not log or after >= log[-1].seq:
            return []
        start = max(0, after + 1 - log[0].seq)
        events = list(itertools.islice(log, start, start + limit))
        return events if full else ship_batch(events)

    def ack(self, seq: int) -> int:
        """The subscribers handled every event up to ``seq``: let storage drop them; keep a tail.

        A kept event whose stored old value refers to an event dropped now gets that value written
        into its own row (``Changes.rebased``), so what storage keeps always reads back whole."""
        seq = min(seq, self.seq)
        if seq > self.acked_seq:
            self._rebase(self.acked_seq, seq)
            self.acked_seq = seq
            self._changes.acked_seq = seq
        self._trim()
        return self.acked_seq

    def _rebase(self, before: int, upto: int) -> None:
        """Events after ``upto`` whose stored old value is a reference into ``(before, upto]``."""
        successor, log = self._successor, self.events
        if not successor or not log:
            return
        first = log[0].seq
        for seq in range(max(before + 1, first), upto + 1):
            nxt = successor.get(seq)
            if nxt is None or nxt <= upto:
                continue
            event = log[nxt - first]
            if event.old is not None and len(event.old) >= VALUE_REF_MIN:
                self._changes.rebased.append((nxt, event.old))

    def set_durable_events(self, durable: bool) -> int:
        """Make events durable (outbox) or memory-only; returns the last seq handed out so far.

        Turning them off acknowledges every event so far: nothing is left for a subscriber.
        """
        if not durable:
            self.ack(self.seq)
        self.durable_events = durable
        return self.seq

    def _trim(self) -> None:
        """Drop acknowledged events beyond the recent tail kept for watchers."""
        log, acked = self.events, self.acked_seq
        while (
            log
            and log[0].seq <= acked
            and (len(log) > RECENT_EVENTS or self._event_bytes > RECENT_EVENT_BYTES)
        ):
            event = log.popleft()
            self._event_bytes -= _event_size(event, event.old)
            nxt = self._successor.pop(event.seq, None)
            if nxt is not None and log and log[nxt - log[0].seq].old is event.new:
                self._event_bytes += len(event.new or b"")  # the next event now holds it alone

    def _log(self, event: Event) -> None:
        """Append ``event`` (from storage) to the in-memory log, linked as :meth:`_emit` links."""
        shared = self._link_base(event.group_id, event.key, event.base, event.old, event.seq)
        self.events.append(event)
        self._event_bytes += _event_size(event, None if shared else event.old)

    def _link_base(
        self, group_id: str, key: str, base: int, old: bytes | None, seq: int, link: bool = True
    ) -> bool | None:
        """Whether event ``base`` (the one that wrote event ``seq``'s old value) is still in the log
        and of the same key: True if ``old`` is its very bytes object, False if only equal; None if
        there is no such event. ``link``: remember the pair (see :meth:`_rebase`, :meth:`_trim`).

        Values of durable events are counted once: an old value that is the very object of a
        linked event still in the log is that event's until it is trimmed (then it is counted for
        the event that keeps it). Memory-only events (nobody listens) are not linked, a cost their
        writes do not pay: their old values are counted as if they were copies."""
        log = self.events
        if not base or not log:
            return None
        last = log[-1]
        if last.seq == base:  # the common case: the key's previous write was the shard's last
            prev = last
        else:
            first = log[0].seq
            if not first <= base < last.seq:
                return None
            prev = log[base - first]
        if prev.group_id != group_id or prev.key != key:
            return None
        if prev.new is old:
            shared = True
        elif prev.new == old:
            shared = False
        else:
            return None
        if link:
            self._successor[base] = seq
        return shared

    def _emit(
        self,
        kind: str,
        group_id: str,
        key: str,
        current: Entry | None,
        new: bytes | None,
        ops: bytes | None = None,
    ) -> None:
        """Log the event of a write (its old value is ``current``'s, its base the event that wrote
        it: versions are seqs; older files counted versions per key, so the log must confirm it)."""
        seq = self.seq = self.seq + 1
        durable = self.durable_events
        log = self.events
        if current is None:
            old, base, shared = None, 0, False
        else:
            old, base = current.data, current.version
            last = log[-1] if log else None
            if last is not None and last.seq == base and last.new is old and last.key == key:
                shared = durable  # the hot path: the key's previous write was the shard's last event
                if durable:
                    self._successor[base] = seq
            else:
                found = self._link_base(group_id, key, base, old, seq, durable)
                base = 0 if found is None else base
                shared = bool(found) and durable
        event = _new_event(Event, (seq, kind, group_id, key, old, new, self._now, base, ops))
        log.append(event)
        self._event_bytes += len(new or b"") + len(ops or b"") + 100 + (0 if shared else len(old or b""))
        self._fresh.append(event)
        if self.durable_events:
            self._changes.events.append(event)
        else:  # nobody listens: acknowledged as it happens (storage keeps only the seq)
            self.acked_seq = self._changes.acked_seq = seq
            if len(self.events) > RECENT_EVENTS or self._event_bytes > RECENT_EVENT_BYTES:
                self._trim()

    @property
    def expiry_heap_size(self) -> int:
        """Entries in the TTL heap (at most about twice the keys that have a TTL)."""
        return len(self._expiry)

    def sweep(self, now: float | None = None) -> int:
        """Remove expired entries and forget old op results; return how many entries expired."""
        now = self._now = self.clock() if now is None else now
        expired = self._expire(now)
        self._prune(self.ops, now - self.op_retention)
        self._prune(self.auto_ops, now - self.auto_op_retention)
        return expired

    # -- internals ----------------------------------------------------------------------------
    def _execute(self, cmd: Any) -> C.Result:
        try:
            if not isinstance(cmd, tuple) or len(cmd) != 5:
                raise InvalidInput(f"a command is a 5-tuple, got {type(cmd).__name__}")
            kind, group_id, key, arg, opts = cmd
            handler = self._handlers.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise InvalidInput(f"unknown command {kind!r}")
            if opts is None:
                opts = {}
            elif not isinstance(opts, dict):
                raise InvalidInput(f"command options must be a dict, got {type(opts).__name__}")
            if kind in C.GROUPED:
                check_name(group_id, "group_id")
                if self.owns is not None and not self.owns(group_id):
                    raise StaleShardMap(f"this shard does not own group {group_id!r}")
                if kind in C.KEYED:
                    check_name(key, "key")
                if kind in C.WRITES and opts.get("system") is not True:
                    check_writable(group_id)
            op_id = opts.get("op_id")
            if op_id is None or kind not in C.WRITES:
                return (True, handler(group_id, key, arg, opts))
            if not isinstance(op_id, str) or not op_id:
                raise InvalidInput(f"op_id must be a non-empty str, got {op_id!r}")
            return (True, self._once(op_id, kind, handler, group_id, key, arg, opts))
        except StateError as exc:
            return (False, exc)
        except Exception as exc:  # a bug or a hostile command: report it, keep serving
            return (False, InvalidInput(f"command failed: {type(exc).__name__}: {exc}"))

    def _once(
        self, op_id: str, kind: str, handler: Any, group_id: str, key: Any, arg: Any, opts: dict[str, Any]
    ) -> Any:
        """Run a write at most once per ``op_id`` and key: a repeat returns the first call's result."""
        auto = op_id.startswith(AUTO_OP_PREFIX)
        table = self.auto_ops if auto else self.ops
        scoped = f"{group_id}\x00{key or ''}\x00{op_id}"  # op_scope(), inlined: a hot path
        # automatic op_ids are unique per call (the client makes them): their fingerprint is only the
        # command's kind (cheap); a caller's op_id gets the full one that tells a retry from another call
        fingerprint = _KIND_PRINTS[kind] if auto else call_fingerprint(kind, arg, opts)
        seen = table.get(scoped)
        if seen is not None:
            return self._replay(table, scoped, seen, fingerprint, kind, group_id, key, arg)
        payload = handler(group_id, key, arg, opts)
        kept = (
            (payload[0], _ARG, *payload[2:]) if kind == C.SET else payload
        )  # a set's new value: its argument
        size = _payload_size(kept)
        if auto and size > AUTO_RESULT_LIMIT and kind in (C.SET, C.UPDATE):
            kept, size = _FORGOTTEN, 0  # a repeat reports the current value instead
        blob = pickle.dumps((fingerprint, kept), protocol=pickle.HIGHEST_PROTOCOL)
        self._changes.op_records.append(OpRecord(scoped, self._now, blob))
        # in RAM: the result itself while small and within the budget, else a marker
        if kept is _FORGOTTEN or (size <= RESULT_RAM_ITEM and self.result_bytes + size <= RESULT_RAM_BUDGET):
            self.result_bytes += size
        else:
            kept = _STORED if self.fetch_op is not None else _FORGOTTEN
        table[scoped] = (self._now, fingerprint, kept)
        return payload

    def _replay(
        self,
        table: dict[str, tuple[float, bytes | None, Any]],
        scoped: str,
        seen: tuple[float, bytes | None, Any],
        fingerprint: bytes | None,
        kind: str,
        group_id: str,
        key: Any,
        arg: Any,
    ) -> Any:
        """A repeated op_id's first result (nothing applies again); InvalidInput for a different call."""
        created_at, first, kept = seen
        if kept is _STORED:  # only in storage (not kept in RAM, or remembered from before a restart)
            blob = None if self.fetch_op is None else self.fetch_op(scoped)
            if blob is None:
                raise StateError(f"the result of op_id {_op_id_of(scoped)!r} is no longer available")
            first, kept = pickle.loads(blob)
            size = _payload_size(kept)
            if size <= RESULT_RAM_ITEM and self.result_bytes + size <= RESULT_RAM_BUDGET:
                self.result_bytes += size
                table[scoped] = (created_at, first, kept)
        if fingerprint is not None and first is not None and fingerprint != first:
            raise InvalidInput(
                f"op_id {_op_id_of(scoped)!r} reused for a different call on {group_id!r}/{key!r} "
                "(an op_id names one call: the same command with the same arguments)"
            )
        if kept is _FORGOTTEN:  # too large to keep: report what the key holds now
            if kind == C.DELETE:
                return None
            entry = self.store.get(group_id, key)
            return (None, None if entry is None else entry.data)
        if kind == C.SET:
            return (kept[0], arg, *kept[2:])  # the same call: its argument is the value it wrote
        return kept

    def _expire(self, now: float) -> int:
        """Delete every entry whose expiry time has come."""
        heap, count = self._expiry, 0
        while heap and heap[0][0] <= now:
            expires_at, group_id, key = heapq.heappop(heap)
            if self._deadlines.get((group_id, key)) != expires_at:
                continue  # a stale heap entry: the key got another expiry, or none
            entry = self.store.get(group_id, key)
            del self._deadlines[(group_id, key)]
            if entry is not None and entry.expires_at == expires_at:
                self.store.delete(group_id, key)
                self._changes.delete(group_id, key)
                self._emit(DELETED, group_id, key, entry, None)
                count += 1
        return count

    def _set_deadline(self, group_id: str, key: str, expires_at: float | None) -> None:
        """Record the key's expiry time (None: no TTL), keeping one live heap entry per key."""
        gk = (group_id, key)
        if expires_at is None:
            self._deadlines.pop(gk, None)
            return
        if self._deadlines.get(gk) == expires_at:
            return  # unchanged (an update that keeps its TTL): the heap already has it
        self._deadlines[gk] = expires_at
        heap = self._expiry
        heapq.heappush(heap, (expires_at, group_id, key))
        if len(heap) > 2 * len(self._deadlines) + 64:  # stale entries piled up: rebuild
            self._expiry = [(at, g, k) for (g, k), at in self._deadlines.items()]
            heapq.heapify(self._expiry)

    def _prune(self, table: dict[str, tuple[float, bytes | None, Any]], cutoff: float) -> None:
        while table:
            scoped, (created_at, _, kept) = next(iter(table.items()))
            if created_at >= cutoff:
                break
            del table[scoped]
            if kept is not _STORED and kept is not _FORGOTTEN:
                self.result_bytes -= _payload_size(kept)
            self._changes.prune_op(scoped)

    def _live(self, group_id: str, key: str) -> Entry | None:
        entry = self.store.get(group_id, key)
        if entry is not None and entry.expires_at is not None and entry.expires_at <= self._now:
            return None  # expired within this batch: invisible; the next batch deletes it
        return entry

    def _check_version(self, current: Entry | None, opts: dict[str, Any]) -> None:
        expected = opts.get("expected_version")
        if expected is None:
            return
        if not isinstance(expected, int) or isinstance(expected, bool) or expected < 0:
            raise InvalidInput(f"expected_version must be an int >= 0, got {expected!r}")
        actual = 0 if current is None else current.version
        if actual != expected:
            raise ConflictError(f"expected version {expected}, found {actual}", expected, actual)

    def _check_json_form(self, group_id: str, key: str, current: Entry | None, opts: dict[str, Any]) -> None:
        """With ``json_only`` (the HTTP API's writes): refuse to change a stored value that has no
        JSON form (:class:`ReadOnly`), since an HTTP client could not have seen it as it is."""
        if current is None or opts.get("json_only") is not True:
            return
        cached = self._decoded.get((group_id, key))
        if cached is not None and cached[0] is current.data:
            value = cached[1]
        else:
            try:
                value = pickle.loads(current.data)
            except Exception:  # a class the shard cannot import: certainly no JSON form
                value = _FORGOTTEN
        if not has_json_form(value):
            raise ReadOnly(
                f"{group_id!r}/{key!r} holds a Python object with no JSON form: read-only over HTTP"
            )

    def _expiry_time(self, current: Entry | None, opts: dict[str, Any], keep: bool) -> float | None:
        ttl = opts.get("ttl")
        if ttl is None:
            return current.expires_at if keep and current is not None else None
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not math.isfinite(ttl) or ttl <= 0:
            raise InvalidInput(f"ttl must be a positive number of seconds, got {ttl!r}")
        return self._now + ttl

    def _write(
        self,
        group_id: str,
        key: str,
        data: bytes,
        current: Entry | None,
        expires_at: float | None,
        ops: Any = None,
    ) -> None:
        """Store ``data`` under the key and emit its event (``ops``: the update's ops, kept with a
        large value instead of it where they are much smaller)."""
        entry = Entry(data, self.seq + 1, self._now, expires_at)  # its version: the seq _emit gives
        self.store.put(group_id, key, entry)
        self._changes.put(group_id, key, entry, created=current is None)
        kept_ops = None if ops is None or len(data) < VALUE_REF_MIN else delta_ops(data, ops)
        self._emit(CREATED if current is None else UPDATED, group_id, key, current, data, kept_ops)
        if expires_at is not None or self._deadlines:
            self._set_deadline(group_id, key, expires_at)

    # -- commands -----------------------------------------------------------------------------
    def _set(
        self, group_id: str, key: str, data: Any, opts: dict[str, Any]
    ) -> tuple[bytes | None, bytes | None]:
        if not isinstance(data, bytes):
            raise InvalidInput("set: the value must arrive pickled (bytes)")
        returning = _returning(opts)
        check_size(data, self.max_value_size)
        current = self._live(group_id, key)
        self._check_version(current, opts)
        self._check_json_form(group_id, key, current, opts)
        self._write(group_id, key, data, current, self._expiry_time(current, opts, keep=False))
        old = None if current is None or returning in ("new", "none") else current.data
        if opts.get("version") is True:  # the write's version too (the HTTP API's ETag)
            return (old, data if returning == "both" else None, self.seq)  # type: ignore[return-value]
        return (old, data if returning == "both" else None)  # the client has its own new value

    def _get(self, group_id: str, key: str, _arg: Any, _opts: dict[str, Any]) -> bytes | None:
        entry = self._live(group_id, key)
        return None if entry is None else entry.data

    def _entry(self, group_id: str, key: str, _arg: Any, _opts: dict[str, Any]) -> tuple[Any, ...] | None:
        entry = self._live(group_id, key)
        return None if entry is None else tuple(entry)

    def _delete(self, group_id: str, key: str, _arg: Any, opts: dict[str, Any]) -> bytes | None:
        current = self._live(group_id, key)
        self._check_version(current, opts)
        if current is None:
            return None
        self._check_json_form(group_id, key, current, opts)
        self.store.delete(group_id, key)
        self._deadlines.pop((group_id, key), None)
        self._changes.delete(group_id, key)
        self._emit(DELETED, group_id, key, current, None)
        return current.data

    def _list(self, group_id: str, _key: Any, start: Any, _opts: dict[str, Any]) -> Any:
        rows, more = self._page(group_id, start)
        values = [e.data for _, e in rows]
        return values if more is None else (values, more)

    def _items(self, group_id: str, _key: Any, start: Any, _opts: dict[str, Any]) -> Any:
        rows, more = self._page(group_id, start)
        items = [(k, e.data) for k, e in rows]
        return items if more is None else (items, more)

    def _page(self, group_id: str, start: Any) -> tuple[list[tuple[str, Entry]], int | None]:
        """The group's entries from position ``start`` on, at most about :data:`PAGE_BYTES` of them
        (at least one); and where the next page starts (None: this is the last)."""
        if start is None:
            start = 0
        elif not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise InvalidInput(f"a page starts at an int >= 0, got {start!r}")
        rows = self._visible(group_id)[start:]
        size = 0
        for count, (key, entry) in enumerate(rows, 1):
            size += len(entry.data) + len(key) + ROW_OVERHEAD
            if size > PAGE_BYTES and count < len(rows):
                return rows[:count], start + count
        return rows, None

    def _visible(self, group_id: str) -> list[tuple[str, Entry]]:
        now = self._now
        return [(k, e) for k, e in self.store.entries(group_id) if e.expires_at is None or e.expires_at > now]

    def _clear(self, group_id: str, _key: Any, _arg: Any, _opts: dict[str, Any]) -> int:
        removed = self._visible(group_id)
        held = self.store.clear(group_id)
        for key, entry in held:
            if entry.expires_at is not None:
                self._deadlines.pop((group_id, key), None)
        if held:
            self._changes.clear(group_id)
        for key, entry in removed:
            self._emit(DELETED, group_id, key, entry, None)
        return len(removed)

    def _groups(self, _group: Any, _key: Any, _arg: Any, opts: dict[str, Any]) -> list[str]:
        system = opts.get("system") is True  # system groups only when asked
        # expired entries were removed when the batch began, so every stored group is non-empty
        return [g for g in self.store.group_ids() if system or not is_reserved(g)]

    def _counts(self, _group: Any, _key: Any, _arg: Any, opts: dict[str, Any]) -> list[tuple[str, int]]:
        system, store = opts.get("system") is True, self.store
        return [(g, store.count(g)) for g in store.group_ids() if system or not is_reserved(g)]

    def _key_page(
        self, group_id: str, _key: Any, arg: Any, _opts: dict[str, Any]
    ) -> tuple[list[tuple[str, bytes, int]], str | None]:
        """A page of the group in key order: ``(rows, next)`` where ``next`` is the last key of a
        page that may have more after it (else None). Stops early at about :data:`PAGE_BYTES`."""
        if not isinstance(arg, tuple) or len(arg) != 3:
            raise InvalidInput("page: the argument is (after, limit, prefix)")
        after, limit, prefix = arg
        if after is not None:
            check_name(after, "cursor")
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE_ITEMS:
            raise InvalidInput(f"limit must be an int from 1 to {MAX_PAGE_ITEMS}, got {limit!r}")
        if prefix is None:
            prefix = ""
        elif not isinstance(prefix, str) or len(prefix.encode("utf-8", "surrogatepass")) > 512:
            raise InvalidInput("prefix must be a str of at most 512 bytes")
        keys = self.store.keys_after(group_id, after, prefix, limit + 1)
        rows: list[tuple[str, bytes, int]] = []
        size, seen = 0, 0
        for key in keys[:limit]:
            seen += 1
            entry = self._live(group_id, key)
            if entry is None:
                continue
            rows.append((key, entry.data, entry.version))
            size += len(entry.data) + len(key) + ROW_OVERHEAD
            if size > PAGE_BYTES:
                break
        more = len(keys) > seen
        return rows, (keys[seen - 1] if more else None)

    def _update(
        self, group_id: str, key: str, ops: Any, opts: dict[str, Any]
    ) -> tuple[bytes | None, bytes | None]:
        returning = _returning(opts)
        current = self._live(group_id, key)
        self._check_version(current, opts)
        self._check_json_form(group_id, key, current, opts)
        value: Any = None
        if current is not None:
            cached = self._decoded.get((group_id, key))
            if cached is not None and cached[0] is current.data:
                value = cached[1]  # still the stored value: apply_ops never mutates its input
            else:
                try:
                    value = pickle.loads(current.data)
                except Exception as exc:  # a class the shard cannot import: not a JSON-like value
                    raise UpdateError(f"the stored value cannot be updated: {exc}", 0, NOT_JSON) from None
        new_value = apply_ops(value, ops, exists=current is not None)
        new = check_size(canonical_dumps(new_value), self.max_value_size)
        self._decoded[(group_id, key)] = (new, new_value)
        self._decoded_bytes += len(new)
        self._write(group_id, key, new, current, self._expiry_time(current, opts, keep=True), ops)
        old = None if current is None or returning in ("new", "none") else current.data
        if opts.get("version") is True:  # the write's version too (the HTTP API's ETag)
            return (old, new if returning in ("both", "new") else None, self.seq)  # type: ignore[return-value]
        return (old, new if returning in ("both", "new") else None)


RETURNING = ("both", "new", "old", "none")


def _returning(opts: dict[str, Any]) -> str:
    """What a write answers (``returning=``): both values (default), the new, the old, or none."""
    returning = opts.get("returning", "both")
    if returning not in RETURNING:
        raise InvalidInput(f"returning must be one of {RETURNING}, got {returning!r}")
    return returning  # type: ignore[no-any-return]


def op_scope(group_id: str, key: str | None, op_id: str) -> str:
    """The stored name of an op_id: its scope ``(group_id, key)`` and the op_id itself.

    NUL cannot occur in a group id or key, so it separates the parts unambiguously.
    """
    return f"{group_id}\x00{key or ''}\x00{op_id}"


def _op_id_of(scoped: str) -> str:
    return scoped.rsplit("\x00", 1)[-1]


def call_fingerprint(kind: str, arg: Any, opts: dict[str, Any]) -> bytes:
    """16 bytes that tell one call from another: the command, its argument and its write options."""
    digest = hashlib.blake2b(kind.encode(), digest_size=16)
    if isinstance(arg, bytes):
        digest.update(b"\x00b")
        digest.update(arg)
    elif arg is not None:
        digest.update(b"\x00p")
        digest.update(pickle.dumps(arg, protocol=pickle.HIGHEST_PROTOCOL))
    digest.update(repr((opts.get("ttl"), opts.get("expected_version"), opts.get("returning"))).encode())
    return digest.digest()


_KIND_PRINTS = {kind: kind.encode() for kind in C.KINDS}


class _Arg:
    """Stands for a set's new value in a remembered result: the call's own argument."""

    def __reduce__(self) -> str:
        return "_ARG"


_ARG = _Arg()


class _Forgotten:
    """Marks an automatic-retry result too large to keep."""

    def __reduce__(self) -> str:
        return "_FORGOTTEN"


_FORGOTTEN = _Forgotten()
_STORED: Any = object()  # an op result that is in storage, not in memory


_new_event = tuple.__new__  # Event(...) without the namedtuple constructor's overhead


def _event_size(event: Event, old: bytes | None) -> int:
    """What an event holds in memory, counting ``old`` (None: its old value is counted elsewhere)."""
    return len(old or b"") + len(event.new or b"") + len(event.ops or b"") + 100


def _answer_size(payload: Any) -> int:
    """Bytes of values in an ok payload (what a batch's answer costs to hold and send)."""
    kind = type(payload)
    if kind is bytes:
        return len(payload)
    if kind is not tuple and kind is not list:
        return 0
    size = 0
    for part in payload:
        if type(part) is bytes:
            size += len(part)
        elif part is not None:
            size += _answer_size(part)
    return size


_DEFERRED: C.Result = (False, Deferred("not run: the batch's answer is already large; send it again"))


def _payload_size(payload: Any) -> int:
    if isinstance(payload, tuple):
        return sum(len(p) for p in payload if isinstance(p, bytes))
    return len(payload) if isinstance(payload, bytes) else 0


def canonical_dumps(value: Any) -> bytes:
    """Pickle an update's result the same way whatever objects it shares (deterministic size).

    A pickler without a memo ("fast" mode) writes every object in full, so the bytes (and the size
    checked against the limit) depend only on the value, not on which of its parts happen to be
    the same object; it is also faster on large documents. A value with a reference cycle, or
    that plain pickle cannot handle, falls back to cloudpickle.
    """
    pickler = getattr(_canonical, "pickler", None)
    if pickler is None:
        buffer = io.BytesIO()
        pickler = _canonical.pickler = (buffer, pickle.Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL))
        pickler[1].fast = True
    buffer, fast = pickler
    buffer.seek(0)
    buffer.truncate()
    try:
        fast.dump(value)
        return buffer.getvalue()
    except RecursionError:
        del _canonical.pickler
        raise UpdateError("the updated value is nested too deeply to store", 0, NOT_JSON) from None
    except Exception:  # a cycle, or something only cloudpickle can pickle
        del _canonical.pickler
        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return]


_canonical = threading.local()
