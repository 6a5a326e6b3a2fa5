"""Cheap running figures of a shard's batches and a subscriber's deliveries (pure: no Ray, no I/O).

The hot paths only count: a shard's batch adds its command kinds to a :class:`collections.Counter`
and appends one ``(time, latency, size)`` tuple (:meth:`ShardTally.batch`); a subscriber appends
one lag per event it hands to a handler (:meth:`DeliveryTally.delivered`). A flusher thread
(:mod:`shardstate.cluster.metrics`) drains the tallies at most once a second into Ray's metric
objects, and moves the drained samples into a :class:`Window` of recent ones, from which
``info()["metrics"]`` and the subscriber's ``stats()`` read their percentiles. Samples beyond
:data:`MAX_PENDING` per drain are counted as dropped (the counters stay exact).
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any

from shardstate.shards.commands import KINDS

try:  # Counter.update's C helper, without update's checks (0.2 µs a batch instead of 0.45)
    from collections import _count_elements  # type: ignore[attr-defined]
except ImportError:  # another Python: the same, in Python

    def _count_elements(mapping: Any, iterable: Iterable[Any]) -> None:
        for element in iterable:
            mapping[element] = mapping.get(element, 0) + 1

#: recent figures cover the last this many seconds ...
WINDOW_SECONDS = 60.0
#: ... and at most this many samples
WINDOW_SAMPLES = 4096
#: samples kept between two drains, at most (the rest only counted in ``dropped``)
MAX_PENDING = 20_000
#: the ``command`` tag of a batch entry that is no command (answered InvalidInput by the engine)
INVALID = "invalid"

_first = itemgetter(0)


def percentile(ordered: Sequence[float], q: float) -> float | None:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of ascending ``ordered``; None if empty."""
    return _rank(ordered, q) if ordered else None


def _rank(ordered: Sequence[float], q: float) -> float:
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


class Window:
    """The recent samples ``(time, value)``: those of the last ``seconds``, at most ``size``."""

    def __init__(self, seconds: float = WINDOW_SECONDS, size: int = WINDOW_SAMPLES) -> None:
        self.seconds = seconds
        self._samples: deque[tuple[float, float]] = deque(maxlen=size)

    def extend(self, samples: Iterable[tuple[float, float]]) -> None:
        """Add samples (oldest first)."""
        self._samples.extend(samples)

    def samples(self) -> list[tuple[float, float]]:
        """A copy of the samples (cheap: take it under the owner's lock, then :func:`recent`)."""
        return list(self._samples)


def recent(samples: Iterable[tuple[float, float]], since: float) -> list[float]:
    """The values of ``samples`` taken at ``since`` or later, ascending."""
    return sorted(v for t, v in samples if t >= since)


def summary(values: Sequence[float], digits: int = 3) -> dict[str, float | int | None]:
    """``{"p50", "p99", "mean", "max", "count"}`` of ascending ``values`` (None where empty)."""
    if not values:
        return {"p50": None, "p99": None, "mean": None, "max": None, "count": 0}
    return {
        "p50": round(_rank(values, 50), digits),
        "p99": round(_rank(values, 99), digits),
        "mean": round(sum(values) / len(values), digits),
        "max": round(values[-1], digits),
        "count": len(values),
    }


def command_of(kind: Any) -> str:
    """The ``command`` tag of a batch entry's kind: a known command, or ``"invalid"``."""
    return kind if isinstance(kind, str) and kind in KINDS else INVALID


def count_kinds(batch: Sequence[Any], into: Counter[Any] | None = None) -> Counter[Any]:
    """Add how many commands of each kind ``batch`` holds to ``into`` (a new Counter if None); the
    kinds as sent (see :func:`command_of`), an entry without a hashable kind as ``"invalid"``."""
    counts: Counter[Any] = Counter() if into is None else into
    try:
        _count_elements(counts, map(_first, batch))  # counted in C: the common case
    except Exception:  # an entry that is no command: the ones before it are counted already
        start = next(i for i, cmd in enumerate(batch) if _kind_of(cmd) is _BAD)
        counts.update(INVALID if (kind := _kind_of(cmd)) is _BAD else kind for cmd in batch[start:])
    return counts


_BAD: Any = object()


def _kind_of(cmd: Any) -> Any:
    try:
        kind = cmd[0]
        hash(kind)
    except Exception:
        return _BAD
    return kind


@dataclass
class ShardDrained:
    """What a shard's tally gathered since its last drain."""

    #: commands executed per command tag, since the last drain
    ops: dict[str, int] = field(default_factory=dict)
    #: per batch: (monotonic time, latency in ms, commands)
    batches: list[tuple[float, float, int]] = field(default_factory=list)
    #: per replication round with backups: (monotonic time, µs)
    rounds: list[tuple[float, float]] = field(default_factory=list)


class ShardTally:
    """A shard's running figures: ops by command (cumulative), batch latency and size, replication
    rounds. :meth:`batch` and :meth:`replication_round` are the hot path; :meth:`drain` and
    :meth:`summary` run off it (a flusher thread, ``info()``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._ops: Counter[Any] = Counter()
        self._exported: Counter[str] = Counter()
        self._batches: list[tuple[float, float, int]] = []
        self._rounds: list[tuple[float, float]] = []
        self.dropped = 0
        #: guards the windows (drained samples), apart from the batch path's lock
        self._window_lock = threading.Lock()
        self._latency = Window()
        self._sizes = Window()
        self._replication = Window()

    def batch(self, batch: Sequence[Any], seconds: float) -> None:
        """A batch of ``batch``'s commands ran in ``seconds`` (execution and commit)."""
        sample = (self.clock(), seconds * 1000.0, len(batch))
        with self._lock:
            count_kinds(batch, self._ops)
            if len(self._batches) < MAX_PENDING:
                self._batches.append(sample)
            else:
                self.dropped += 1

    def replication_round(self, seconds: float) -> None:
        """A replication round with backups took ``seconds`` (shipping and every backup's answer)."""
        sample = (self.clock(), seconds * 1e6)
        with self._lock:
            if len(self._rounds) < MAX_PENDING:
                self._rounds.append(sample)
            else:
                self.dropped += 1

    def ops(self) -> dict[str, int]:
        """Commands executed since start, per command tag (sorted)."""
        with self._lock:
            return _by_command(self._ops)

    def drain(self) -> ShardDrained:
        """Take what was gathered since the last drain (and keep its samples as recent ones)."""
        with self._lock:
            batches, self._batches = self._batches, []
            rounds, self._rounds = self._rounds, []
            ops = _by_command(self._ops)
        latencies = [(t, ms) for t, ms, _ in batches]
        sizes = [(t, float(n)) for t, _, n in batches]
        with self._window_lock:
            self._latency.extend(latencies)
            self._sizes.extend(sizes)
            self._replication.extend(rounds)
        delta = {k: n - self._exported[k] for k, n in ops.items() if n > self._exported[k]}
        self._exported.update(delta)
        return ShardDrained(delta, batches, rounds)

    def summary(self) -> dict[str, Any]:
        """What ``info()["metrics"]`` shows: ``{"ops", "latency_ms": {"p50", "p99"},
        "batch_size_mean", "replication_lag_us"}``, recent figures over :data:`WINDOW_SECONDS`."""
        since = self.clock() - self._latency.seconds
        with self._window_lock:
            latencies, sizes = self._latency.samples(), self._sizes.samples()
            rounds = self._replication.samples()
        with self._lock:  # copies only (the batch path waits for this lock)
            ops = self._ops.copy()
            batches = list(self._batches)
            rounds += self._rounds
        latencies += [(t, ms) for t, ms, _ in batches]
        sizes += [(t, float(n)) for t, _, n in batches]
        latency = summary(recent(latencies, since))
        size = summary(recent(sizes, since), 1)
        replication = summary(recent(rounds, since), 1)
        return {
            "ops": _by_command(ops),
            "latency_ms": {"p50": latency["p50"], "p99": latency["p99"]},
            "batch_size_mean": size["mean"],
            "batches": size["count"],
            "replication_lag_us": replication["mean"],
            "samples_dropped": self.dropped,
        }


def _by_command(counts: Counter[Any]) -> dict[str, int]:
    out: Counter[str] = Counter()
    for kind, n in counts.items():
        out[command_of(kind)] += n
    return dict(sorted(out.items()))


@dataclass
class DeliveryDrained:
    """What a subscriber's tally gathered since its last drain."""

    #: per event handed to a handler: (shard, seconds from its commit)
    lags: list[tuple[int, float]] = field(default_factory=list)
    #: dead letters per (shard, trigger)
    dead: dict[tuple[int, str], int] = field(default_factory=dict)


class DeliveryTally:
    """A subscriber's running figures: event lag (commit to handler) and dead letters."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time
    ) -> None:
        self.clock = clock
        self.wall = wall
        self._lock = threading.Lock()
        self._lags: list[tuple[int, float]] = []
        self._dead: Counter[tuple[int, str]] = Counter()
        self.dead_letters = 0
        self.dropped = 0
        self._window = Window()
        self._pending_window: list[tuple[float, float]] = []

    def delivered(self, shard: int, committed_at: Iterable[float]) -> None:
        """Events of ``shard`` committed at these Unix times are handed to a handler now (a
        clock behind the shard's counts as no lag, not a negative one)."""
        now = self.wall()
        lags = [max(0.0, now - at) for at in committed_at]
        t = self.clock()
        with self._lock:
            room = MAX_PENDING - len(self._lags)
            if room < len(lags):
                self.dropped += len(lags) - max(room, 0)
                lags = lags[: max(room, 0)]
            self._lags.extend((shard, lag) for lag in lags)
            self._pending_window.extend((t, lag) for lag in lags)

    def dead_letter(self, shard: int, trigger: str) -> None:
        """A dead letter of ``trigger`` for an event of ``shard`` was recorded."""
        with self._lock:
            self._dead[(shard, trigger)] += 1
            self.dead_letters += 1

    def drain(self) -> DeliveryDrained:
        """Take what was gathered since the last drain (and keep its lags as recent ones)."""
        with self._lock:
            lags, self._lags = self._lags, []
            dead, self._dead = self._dead, Counter()
            self._window.extend(self._pending_window)
            self._pending_window = []
        return DeliveryDrained(lags, dict(dead))

    def summary(self) -> dict[str, Any]:
        """``{"p50", "max", "count"}`` of the recent event lags in seconds (None where empty)."""
        since = self.clock() - self._window.seconds
        with self._lock:
            samples = self._window.samples() + self._pending_window
        figures = summary(recent(samples, since), 4)
        return {"p50": figures["p50"], "max": figures["max"], "count": figures["count"]}
