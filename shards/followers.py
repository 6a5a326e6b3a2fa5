"""Who follows a shard's events over its own connection, and what each of them is sent (no Ray).

A follower is a subscriber (every durable event: what triggers are delivered from) or a watcher
(every event of one group, or of every user group, durable or not). The shard's notifier hands
each round of committed events to every follower; a follower sends the ones it wants as one frame:

    pickle(("events", after, last, [compact events]))

``last`` is the seq of the frame's last event, ``after`` the ``last`` of the frame before it on
this stream (or the starting point, for the first). A reader that sees ``after`` differ from the
``last`` it got before knows a frame was dropped (the shard's buffer for it was full) and reads
what it missed from the shard's log, up to the frame's first event (or its ``last``, for a frame
without events). Once a stream that dropped frames has room again, the shard sends such an empty
frame, ``("events", last dropped, last dropped, [])``, so a dropped tail is noticed even when
nothing is committed after it. The first frame of a stream is ``pickle(("ready", head, shard))``:
the stream carries the events after ``head``, the last seq committed when it was opened, of shard
number ``shard`` (a reader checks it reached the shard it meant: an address on another node's
loopback could be another shard's port).

Values are sent once (:class:`shardstate.shards.event_forms.Shipper`): a large old value refers
to the previous frame's event of that key, a large update's new value is its ops.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from shardstate.shards.event_forms import Shipper
from shardstate.shards.records import Event

SUBSCRIBER, WATCHER = "subscriber", "watcher"
#: groups of the system (trigger registry, dead letters): a watcher of all groups leaves them out
SYSTEM_PREFIX = "__shardstate"


class SpecError(ValueError):
    """A follow request's spec is not one this shard serves."""


@dataclass(frozen=True)
class FollowSpec:
    """What a follower asks for: ``kind`` (subscriber or watcher), and a watcher's ``group``."""

    kind: str
    group: str | None = None

    def to_bytes(self) -> bytes:
        """The spec as sent in a follow request (a plain dict, pickled)."""
        return pickle.dumps({"kind": self.kind, "group": self.group}, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def from_bytes(cls, raw: bytes) -> FollowSpec:
        """Parse a follow request's spec (sent by an authenticated peer); :class:`SpecError` if bad."""
        try:
            spec = pickle.loads(raw)
        except Exception as exc:
            raise SpecError(f"a follow spec that does not unpickle: {exc!r}") from None
        if not isinstance(spec, dict) or spec.get("kind") not in (SUBSCRIBER, WATCHER):
            raise SpecError(f"a follow spec is a dict with kind subscriber or watcher, got {spec!r:.200}")
        group = spec.get("group")
        if group is not None and not isinstance(group, str):
            raise SpecError(f"a follow spec's group is a str or None, got {type(group).__name__}")
        return cls(spec["kind"], group)


def stream_target(endpoint: Sequence[Any] | None, my_ip: str | None) -> str | tuple[str, int] | None:
    """Where a reader on node ``my_ip`` opens a shard's follow stream, from the shard's
    ``endpoint()`` ``(host, port, node IP, Unix socket path)``: its Unix socket when on the same node
    (and the file is here), else ``(host, port)``; None when it cannot be reached (no connection
    yet, or a loopback address on another node): the reader uses Ray calls instead."""
    if endpoint is None:
        return None
    host, port, node_ip, path = endpoint
    here = my_ip is not None and node_ip == my_ip
    if path is not None and here and os.path.exists(path):
        return str(path)
    loopback = host.startswith("127.") or host in ("::1", "localhost")
    if loopback and not here and node_ip is not None and my_ip is not None:
        return None
    return (str(host), int(port))


def ready_frame(head: int, shard: int) -> bytes:
    """The first frame of every stream: shard ``shard`` sends the events after ``head``."""
    return pickle.dumps(("ready", head, shard), protocol=pickle.HIGHEST_PROTOCOL)


@dataclass
class EventFollower:
    """One follow stream: what it wants, what it was sent, and how to send it a frame.

    ``send(frame) -> bool`` queues a frame (False: dropped, the stream is too far behind or gone).
    Used by one notifier thread at a time.
    """

    spec: FollowSpec
    send: Callable[[bytes], bool]
    start: int
    prev: int = 0
    frames: int = 0
    dropped: int = 0
    gone: bool = False
    #: the ``last`` of a dropped frame not announced yet (see :meth:`announce`)
    owed: int | None = None
    shipper: Shipper = field(default_factory=Shipper)

    def __post_init__(self) -> None:
        self.prev = self.start

    def wants(self, event: Event) -> bool:
        """Whether this follower is sent ``event`` (the seq filter aside)."""
        group = self.spec.group
        if group is not None:
            return event.group_id == group
        return self.spec.kind == SUBSCRIBER or not event.group_id.startswith(SYSTEM_PREFIX)

    def push(self, events: Sequence[Event]) -> bool:
        """Send the events of one round this follower wants (newer than its start) as one frame.

        Returns False if the frame was dropped (the reader will see the gap)."""
        picked = [e for e in events if e.seq > self.start and self.wants(e)]
        if not picked:
            return True
        last = picked[-1].seq
        body = pickle.dumps(("events", self.prev, last, self.shipper.ship(picked)), protocol=5)
        self.prev = last
        if self.send(body):
            self.frames += 1
            self.owed = None  # this frame's ``after`` shows the reader the gap
            return True
        self.dropped += 1
        self.owed = last
        self.shipper.reset()  # the reader lost what we sent last: refer to nothing before
        return False

    def announce(self) -> bool:
        """Tell the reader about dropped frames nothing was sent after (an empty frame); True if
        nothing is owed any more."""
        if self.owed is None:
            return True
        body = pickle.dumps(("events", self.owed, self.owed, []), protocol=5)
        if self.send(body):
            self.owed = None
            return True
        return False


def frame_of(body: bytes) -> tuple[Any, ...]:
    """A frame a follower received (from the authenticated shard), unpickled."""
    frame = pickle.loads(body)
    if not isinstance(frame, tuple) or not frame or frame[0] not in ("ready", "events"):
        raise ValueError(f"not a follow frame: {frame!r:.200}")
    return frame
