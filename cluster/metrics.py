"""shardstate's Ray metrics (``ray.util.metrics``), defined once, and the thread that records them.

Ray's metrics agent exports them in Prometheus format on each node (``ray start
--metrics-export-port=...`` / ``ray.init(_metrics_export_port=...)``; needs ``ray[default]``),
with Ray's ``ray_`` prefix (a counter also gets ``_total``):

=================================== ========= ======================== ==================================
name                                type      tags                     what
=================================== ========= ======================== ==================================
shardstate_ops                      counter   cluster, shard, command  commands executed by shards
shardstate_batch_latency_ms         histogram cluster, shard           a batch's execution and commit, ms
shardstate_batch_size               histogram cluster, shard           commands per batch
shardstate_replication_round_us     histogram cluster, shard           a primary's round with its backups
shardstate_event_lag_seconds        histogram cluster, shard           event commit to trigger handler
shardstate_dead_letters             counter   cluster, shard, trigger  dead letters recorded
=================================== ========= ======================== ==================================

The hot paths only count into a tally (:mod:`shardstate.cluster.tallies`); a :class:`Flusher`
thread drains it every :data:`FLUSH_EVERY` seconds and records here (Ray's calls cost
microseconds each).
"""

from __future__ import annotations

import functools
import sys
import threading
from collections.abc import Callable
from typing import Any

from ray.util.metrics import Counter, Histogram

from shardstate.cluster.tallies import DeliveryDrained, ShardDrained

#: seconds between two recordings to Ray's metrics (at most one a second)
FLUSH_EVERY = 1.0

OPS = "shardstate_ops"
BATCH_LATENCY = "shardstate_batch_latency_ms"
BATCH_SIZE = "shardstate_batch_size"
REPLICATION_ROUND = "shardstate_replication_round_us"
EVENT_LAG = "shardstate_event_lag_seconds"
DEAD_LETTERS = "shardstate_dead_letters"

TAGS = ("cluster", "shard")
#: histogram bucket boundaries
LATENCY_MS_BOUNDARIES: list[float] = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500]
BATCH_SIZE_BOUNDARIES: list[float] = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
REPLICATION_US_BOUNDARIES: list[float] = [50, 100, 250, 500, 1000, 2500, 5000, 10_000, 25_000, 50_000]
REPLICATION_US_BOUNDARIES += [100_000, 250_000, 1_000_000]
EVENT_LAG_S_BOUNDARIES: list[float] = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1]
EVENT_LAG_S_BOUNDARIES += [2.5, 5, 10, 30, 60, 300]


@functools.cache
def metrics() -> dict[str, Any]:
    """Every shardstate metric object of this process (created on first use, once)."""
    return {
        OPS: Counter(OPS, "Commands executed by shardstate shards", (*TAGS, "command")),
        BATCH_LATENCY: Histogram(
            BATCH_LATENCY, "A shard batch's execution and commit, ms", LATENCY_MS_BOUNDARIES, TAGS
        ),
        BATCH_SIZE: Histogram(BATCH_SIZE, "Commands per shard batch", BATCH_SIZE_BOUNDARIES, TAGS),
        REPLICATION_ROUND: Histogram(
            REPLICATION_ROUND,
            "A replicated primary's round with its in-sync backups, microseconds",
            REPLICATION_US_BOUNDARIES,
            TAGS,
        ),
        EVENT_LAG: Histogram(
            EVENT_LAG, "Seconds from an event's commit to its trigger handler", EVENT_LAG_S_BOUNDARIES, TAGS
        ),
        DEAD_LETTERS: Counter(DEAD_LETTERS, "Dead letters recorded by subscribers", (*TAGS, "trigger")),
    }


def record_shard(cluster: str, shard: int, drained: ShardDrained) -> None:
    """Record what a shard's tally gathered since its last drain."""
    m = metrics()
    tags = {"cluster": cluster, "shard": str(shard)}
    for command, n in drained.ops.items():
        m[OPS].inc(n, tags={**tags, "command": command})
    latency, size = m[BATCH_LATENCY], m[BATCH_SIZE]
    for _t, ms, commands in drained.batches:
        latency.observe(ms, tags=tags)
        size.observe(commands, tags=tags)
    for _t, us in drained.rounds:
        m[REPLICATION_ROUND].observe(us, tags=tags)


def record_delivery(cluster: str, drained: DeliveryDrained) -> None:
    """Record what a subscriber's tally gathered since its last drain."""
    m = metrics()
    lag = m[EVENT_LAG]
    tags: dict[int, dict[str, str]] = {}
    for shard, seconds in drained.lags:
        shard_tags = tags.get(shard)
        if shard_tags is None:
            shard_tags = tags[shard] = {"cluster": cluster, "shard": str(shard)}
        lag.observe(seconds, tags=shard_tags)
    for (shard, trigger), n in drained.dead.items():
        m[DEAD_LETTERS].inc(n, tags={"cluster": cluster, "shard": str(shard), "trigger": trigger})


class Flusher:
    """A daemon thread that calls ``flush`` every ``every`` seconds (errors logged once, not raised)."""

    def __init__(self, flush: Callable[[], None], every: float = FLUSH_EVERY, name: str = "metrics") -> None:
        self.flush = flush
        self.every = every
        self._stop = threading.Event()
        self._complained = False
        self.thread = threading.Thread(target=self._run, daemon=True, name=name)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.flush_now()

    def flush_now(self) -> None:
        """Flush once now (the thread does this every ``every`` seconds)."""
        try:
            self.flush()
        except Exception as exc:  # metrics never take a shard or a subscriber down
            if not self._complained:
                self._complained = True
                print(f"shardstate metrics: cannot record: {exc!r}", file=sys.stderr)

    def stop(self) -> None:
        """Stop the thread after its current flush."""
        self._stop.set()
