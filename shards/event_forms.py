"""Event values kept once: the compact form events are stored and sent in, and how to read it back.

A fan-in into one growing document writes a new version of it per update. Keeping both values of
every event in full copies each version twice into the event log (SQLite) and into every push, so
N updates cost O(N²) bytes. Instead:

- An event's *old* value is the *new* value of the key's previous event (``Event.base``). Where the
  reader has that event (earlier in the same stored log, the same batch, or earlier on the same
  stream), a large old value is left out and read from there.
- An update's *new* value is ``apply_ops(old, ops)``: a large one whose ops are much smaller is left
  out and computed again by the reader (update ops are deterministic).

So each version of a large value is stored and sent once at most, and an update that changes a
little of it costs the size of its ops: bytes grow linearly with the updates, not with their sum
of document sizes. Values under :data:`VALUE_REF_MIN` bytes stay inline (a reference saves nothing).

The *full* form (what the engine keeps in memory, and what handlers are built from) has both
values; :func:`compact` makes the compact form for a reader, :class:`Resolver` turns it back.
"""

from __future__ import annotations

import pickle
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from shardstate.shards.records import Event
from shardstate.shards.update_ops import apply_ops

#: values at least this large are kept once (by reference, or as the update's ops)
VALUE_REF_MIN = 1024
#: an update's new value is left out for its ops only when they are at most this share of its size
OPS_RATIO = 0.5
#: bytes of values a stream's reader remembers (the latest large value of each key)
RESOLVER_BYTES = 64 * 1024 * 1024
#: keys a stream's sender remembers having sent a large value of
SHIPPER_KEYS = 100_000

CREATED = "state:created"

_MISSING: Any = object()


def delta_ops(new: bytes, ops: Any) -> bytes | None:
    """The pickled ``ops`` of an update whose new value is ``new``, when worth keeping instead of
    ``new`` (a large value, much larger than its ops); else None (``new`` stays inline)."""
    if len(new) < VALUE_REF_MIN:
        return None
    try:
        blob = pickle.dumps(ops, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # an operand only cloudpickle can write: keep the value itself
        return None
    return blob if len(blob) <= len(new) * OPS_RATIO else None


def compact(event: Event, has_base: bool) -> Event:
    """``event`` (full form) for a reader: its old value left out when it is large and the reader
    has event ``event.base`` of the same key (``has_base``), its new value left out when the
    event keeps its update's ops."""
    old, new = event.old, event.new
    if has_base and old is not None and event.base and len(old) >= VALUE_REF_MIN:
        old = None
    if event.ops is not None:
        new = None
    if old is event.old and new is event.new:
        return event
    return event._replace(old=old, new=new)


def by_reference(event: Event) -> bool:
    """Whether a compact event's old value was left out (it is event ``base``'s new value)."""
    return event.old is None and event.base > 0 and event.kind != CREATED


def full(event: Event) -> bool:
    """Whether ``event`` has both its values (nothing to resolve)."""
    return not by_reference(event) and (event.new is not None or event.ops is None)


class Unresolved(Exception):
    """A compact event refers to a version its reader does not have (or cannot compute): read the
    events again from the shard's log, self-contained."""


class Resolver:
    """Turns compact events back into full ones, in seq order, remembering the latest large value
    of each key (at most ``limit`` bytes of them, the least recently written forgotten first; None:
    no limit). A reference to a version it does not have raises :class:`Unresolved`.

    Resolved events share value objects: an event's old value is the very bytes object of its base
    event's new value (held once in memory too).
    """

    def __init__(self, limit: int | None = RESOLVER_BYTES) -> None:
        self.limit = limit
        self._values: OrderedDict[tuple[str, str], tuple[int, bytes]] = OrderedDict()
        self._bytes = 0
        #: the decoded value of the last update computed (a growing document's next update starts
        #: from it instead of unpickling the previous version again)
        self._last: tuple[tuple[str, str], int, Any] | None = None

    def resolve(self, event: Event) -> Event:
        """The full form of ``event`` (compact or full)."""
        gk = (event.group_id, event.key)
        old, new = event.old, event.new
        if by_reference(event):
            known = self._values.get(gk)
            if known is None or known[0] != event.base:
                raise Unresolved(f"event {event.seq} refers to version {event.base} of {gk!r}, unknown here")
            old = known[1]
        if new is None and event.ops is not None:
            new = self._replay(gk, event, old)
        self.remember(gk, event.seq, new)
        if old is event.old and new is event.new:
            return event
        return event._replace(old=old, new=new)

    def resolve_all(self, events: Iterable[Event]) -> list[Event]:
        """:meth:`resolve` each event, in order."""
        return [self.resolve(e) for e in events]

    def _replay(self, gk: tuple[str, str], event: Event, old: bytes | None) -> bytes:
        from shardstate.shards.engine import canonical_dumps  # the engine's own pickling of a result

        exists = event.kind != CREATED
        try:
            value: Any = None
            if exists:
                last = self._last
                value = last[2] if last is not None and last[0] == gk and last[1] == event.base else _MISSING
                if value is _MISSING:
                    if old is None:
                        raise Unresolved(f"event {event.seq} has ops but no old value")
                    value = pickle.loads(old)
            assert event.ops is not None
            result = apply_ops(value, pickle.loads(event.ops), exists=exists)
            new = canonical_dumps(result)
        except Unresolved:
            raise
        except Exception as exc:  # a class this process cannot import: ask for the values themselves
            raise Unresolved(f"event {event.seq}: its new value cannot be computed here: {exc!r}") from None
        self._last = (gk, event.seq, result)
        return new

    def remember(self, gk: tuple[str, str], seq: int, new: bytes | None) -> None:
        """Key ``gk`` holds ``new`` at version ``seq`` (kept if large; never replaces a newer one)."""
        known = self._values.get(gk)
        if known is not None:
            if known[0] >= seq:
                return
            del self._values[gk]
            self._bytes -= len(known[1])
        if new is None or len(new) < VALUE_REF_MIN:
            return
        self._values[gk] = (seq, new)
        self._bytes += len(new)
        if self.limit is not None:
            while self._bytes > self.limit and self._values:
                _gk, (_seq, dropped) = self._values.popitem(last=False)
                self._bytes -= len(dropped)

    def forget(self) -> None:
        """Drop every remembered value (a reader that lost its place)."""
        self._values.clear()
        self._bytes = 0
        self._last = None


class Shipper:
    """The sending end of a stream: remembers which version of each key it sent a large value of
    (at most ``keys`` keys), so the next event of that key may refer to it. :meth:`reset` after a
    send was lost."""

    def __init__(self, keys: int = SHIPPER_KEYS) -> None:
        self.keys = keys
        self._sent: OrderedDict[tuple[str, str], int] = OrderedDict()

    def ship(self, events: Iterable[Event]) -> list[Event]:
        """``events`` (full form, in seq order) in compact form for this stream's reader."""
        sent, out = self._sent, []
        for event in events:
            gk = (event.group_id, event.key)
            out.append(compact(event, event.base > 0 and sent.get(gk) == event.base))
            if event.new is not None and len(event.new) >= VALUE_REF_MIN:
                sent[gk] = event.seq
                sent.move_to_end(gk)
                if len(sent) > self.keys:
                    sent.popitem(last=False)
            else:
                sent.pop(gk, None)
        return out

    def reset(self) -> None:
        """Forget what was sent: the next events carry their values (after a lost send)."""
        self._sent.clear()


def ship_batch(events: Iterable[Event]) -> list[Event]:
    """``events`` in compact form, self-contained: references only to earlier events of the batch."""
    return Shipper(keys=1 << 62).ship(events)


def compact_size(event: Event) -> int:
    """Bytes of values a compact (or full) event carries."""
    return len(event.old or b"") + len(event.new or b"") + len(event.ops or b"")
