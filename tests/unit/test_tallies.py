"""The metric tallies: what shards and subscribers count per batch, and the figures they show."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardstate.cluster import tallies
from shardstate.cluster.tallies import DeliveryTally, ShardTally, Window, count_kinds, percentile, recent
from shardstate.shards.commands import command

pytestmark = pytest.mark.timeout(60)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=200))
def test_percentiles_lie_within_the_samples(values: list[float]) -> None:
    ordered = sorted(values)
    p50, p99 = percentile(ordered, 50), percentile(ordered, 99)
    assert p50 is not None
    assert p99 is not None
    assert ordered[0] <= p50 <= p99 <= ordered[-1]
    assert sum(v <= p50 for v in ordered) >= len(ordered) / 2


def test_ops_are_counted_by_command_cumulatively() -> None:
    tally = ShardTally(Clock())
    sets = [command("set", "g", "a", b"x"), command("set", "g", "b", b"y")]
    tally.batch([*sets, command("get", "g", "a")], 0.001)
    tally.batch([command("update", "g", "a", [])], 0.002)
    assert tally.ops() == {"get": 1, "set": 2, "update": 1}
    drained = tally.drain()
    assert drained.ops == {"get": 1, "set": 2, "update": 1}
    tally.batch([command("set", "g", "c", b"z")], 0.001)
    assert tally.drain().ops == {"set": 1}  # a drain hands over what is new only
    assert tally.drain().ops == {}
    assert tally.ops() == {"get": 1, "set": 3, "update": 1}  # info() shows every op since start


@pytest.mark.parametrize(
    "batch",
    [
        ["not a command", command("get", "g", "a")],
        [{"kind": "set"}, command("get", "g", "a")],
        [(), command("get", "g", "a")],
        [(["unhashable"], "g", "a", None, None), command("get", "g", "a")],
        [("x" * 500, "g", "a", None, None), command("get", "g", "a")],
    ],
)
def test_a_malformed_entry_counts_as_invalid(batch: list[Any]) -> None:
    tally = ShardTally(Clock())
    tally.batch(batch, 0.001)
    assert tally.ops() == {"get": 1, "invalid": 1}
    assert tally.drain().ops == {"get": 1, "invalid": 1}


def test_count_kinds_counts_every_entry() -> None:
    assert count_kinds([command("set"), command("set"), command("clear", "g")]) == {"set": 2, "clear": 1}
    assert sum(count_kinds([1, 2, command("get")]).values()) == 3


def test_summary_shows_recent_latency_and_batch_size() -> None:
    clock = Clock()
    tally = ShardTally(clock)
    for i in range(1, 101):  # 1..100 ms, batches of 1..100 commands
        tally.batch([command("get", "g", "k")] * i, i / 1000)
    figures = tally.summary()  # before any drain: pending samples count too
    assert figures["latency_ms"] == {"p50": 50.0, "p99": 99.0}
    assert figures["batch_size_mean"] == 50.5
    assert figures["batches"] == 100
    assert figures["ops"] == {"get": 5050}
    assert figures["replication_lag_us"] is None
    drained = tally.drain()
    assert len(drained.batches) == 100
    assert [n for _t, _ms, n in drained.batches] == list(range(1, 101))
    assert tally.summary()["latency_ms"] == {"p50": 50.0, "p99": 99.0}  # drained samples stay recent
    clock.now += tallies.WINDOW_SECONDS + 1
    old = tally.summary()
    assert old["latency_ms"] == {"p50": None, "p99": None}  # the window moved past them
    assert old["batch_size_mean"] is None
    assert old["ops"] == {"get": 5050}


def test_replication_rounds_are_kept_in_microseconds() -> None:
    tally = ShardTally(Clock())
    tally.replication_round(0.000_200)
    tally.replication_round(0.000_400)
    assert tally.summary()["replication_lag_us"] == 300.0
    assert [us for _t, us in tally.drain().rounds] == pytest.approx([200.0, 400.0])
    assert tally.drain().rounds == []


def test_pending_samples_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tallies, "MAX_PENDING", 10)
    tally = ShardTally(Clock())
    for _ in range(15):
        tally.batch([command("get", "g", "k")], 0.001)
    assert len(tally.drain().batches) == 10
    assert tally.dropped == 5
    assert tally.ops() == {"get": 15}  # the counts stay exact
    tally.batch([command("get", "g", "k")], 0.001)
    assert len(tally.drain().batches) == 1


def test_window_keeps_the_latest_samples() -> None:
    window = Window(seconds=10, size=3)
    window.extend([(1.0, 1.0), (2.0, 2.0), (3.0, 3.0), (4.0, 4.0)])
    assert recent(window.samples(), 0.0) == [2.0, 3.0, 4.0]
    assert recent(window.samples(), 3.0) == [3.0, 4.0]


def test_event_lag_from_commit_to_delivery() -> None:
    clock, wall = Clock(), Clock(5000.0)
    tally = DeliveryTally(clock, wall)
    tally.delivered(2, [4999.0, 4999.5, 4999.9])  # 1 s, 0.5 s, 0.1 s ago
    tally.delivered(3, [5000.5])  # the shard's clock runs ahead: no lag, never a negative one
    figures = tally.summary()
    assert figures == {"p50": 0.1, "max": 1.0, "count": 4}
    drained = tally.drain()
    assert [(shard, round(lag, 3)) for shard, lag in drained.lags] == [(2, 1.0), (2, 0.5), (2, 0.1), (3, 0.0)]
    assert tally.drain().lags == []
    assert tally.summary()["count"] == 4
    clock.now += tallies.WINDOW_SECONDS + 1
    assert tally.summary() == {"p50": None, "max": None, "count": 0}


def test_dead_letters_by_shard_and_trigger() -> None:
    tally = DeliveryTally(Clock(), Clock())
    tally.dead_letter(1, "audit")
    tally.dead_letter(1, "audit")
    tally.dead_letter(2, "mail")
    assert tally.dead_letters == 3
    assert tally.drain().dead == {(1, "audit"): 2, (2, "mail"): 1}
    assert tally.drain().dead == {}
    assert tally.dead_letters == 3


class Recorder:
    """Stands in for a Ray metric object: keeps every (value, tags) recorded."""

    def __init__(self) -> None:
        self.points: list[tuple[float, dict[str, str]]] = []

    def inc(self, value: float, tags: dict[str, str]) -> None:
        self.points.append((value, tags))

    observe = inc


def test_drained_figures_go_to_the_metric_objects_with_their_tags(monkeypatch: pytest.MonkeyPatch) -> None:
    from shardstate.cluster import metrics

    # the real objects accept every kind of point (outside Ray they record nothing)
    shard_tally = ShardTally(Clock())
    shard_tally.batch([command("set", "g", "a", b"x"), command("get", "g", "a")], 0.002)
    shard_tally.replication_round(0.0005)
    delivery = DeliveryTally(Clock(), Clock(10.0))
    delivery.delivered(1, [9.5])
    delivery.dead_letter(1, "audit")
    metrics.record_shard("unit", 3, shard_tally.drain())
    metrics.record_delivery("unit", delivery.drain())

    fakes = {name: Recorder() for name in metrics.metrics()}
    monkeypatch.setattr(metrics, "metrics", lambda: fakes)
    shard_tally.batch([command("set", "g", "a", b"x"), command("set", "g", "b", b"x")], 0.004)
    shard_tally.replication_round(0.0005)
    metrics.record_shard("unit", 3, shard_tally.drain())
    delivery.delivered(1, [9.75])
    delivery.dead_letter(1, "audit")
    metrics.record_delivery("unit", delivery.drain())
    tags = {"cluster": "unit", "shard": "3"}
    assert fakes[metrics.OPS].points == [(2, {**tags, "command": "set"})]
    assert fakes[metrics.BATCH_LATENCY].points == [(pytest.approx(4.0), tags)]
    assert fakes[metrics.BATCH_SIZE].points == [(2, tags)]
    assert fakes[metrics.REPLICATION_ROUND].points == [(pytest.approx(500.0), tags)]
    assert fakes[metrics.EVENT_LAG].points == [(0.25, {"cluster": "unit", "shard": "1"})]
    assert fakes[metrics.DEAD_LETTERS].points == [(1, {"cluster": "unit", "shard": "1", "trigger": "audit"})]


def test_a_flusher_that_fails_logs_once_and_goes_on(capsys: pytest.CaptureFixture[str]) -> None:
    from shardstate.cluster.metrics import Flusher

    calls: list[int] = []

    def flush() -> None:
        calls.append(1)
        raise RuntimeError("no metrics agent")

    flusher = Flusher(flush, every=3600)
    flusher.flush_now()
    flusher.flush_now()
    flusher.stop()
    assert len(calls) == 2
    assert capsys.readouterr().err.count("no metrics agent") == 1


_entries = st.one_of(
    st.sampled_from(["set", "get", "update", "delete"]).map(lambda k: command(k, "g", "k")),
    st.just("text"),
    st.just(()),
    st.just({"kind": "set"}),
    st.just((["unhashable"], "g", "k", None, None)),
    st.integers(),
)


@given(st.lists(_entries, max_size=30))
def test_count_kinds_counts_each_entry_once_whatever_the_batch_holds(batch: list[Any]) -> None:
    def reference(entry: Any) -> str:
        if isinstance(entry, tuple) and entry and isinstance(entry[0], str):
            return entry[0]
        return "t" if entry == "text" else "invalid"

    counted = count_kinds(batch)
    assert sum(counted.values()) == len(batch)
    assert {tallies.command_of(k): n for k, n in counted.items() if tallies.command_of(k) != "invalid"} == {
        k: n for k, n in Counter(map(reference, batch)).items() if k not in ("invalid", "t")
    }


def test_batches_drains_and_summaries_may_run_at_once() -> None:
    import threading

    tally = ShardTally()
    drained_ops: Counter[str] = Counter()
    drained_batches = 0
    done = threading.Event()
    errors: list[BaseException] = []

    def drain_and_summarize() -> None:
        nonlocal drained_batches
        try:
            while not done.is_set():
                drained = tally.drain()
                drained_ops.update(drained.ops)
                drained_batches += len(drained.batches)
                tally.summary()
        except BaseException as exc:
            errors.append(exc)

    def run_batches() -> None:
        for _ in range(3000):
            tally.batch([command("set", "g", "k"), command("get", "g", "k")], 0.0001)

    flusher = threading.Thread(target=drain_and_summarize)
    flusher.start()
    writers = [threading.Thread(target=run_batches) for _ in range(3)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    done.set()
    flusher.join()
    final = tally.drain()
    drained_ops.update(final.ops)
    drained_batches += len(final.batches)
    assert errors == []
    assert drained_ops == {"get": 9000, "set": 9000}  # every op handed over exactly once
    assert drained_batches == 9000
    assert tally.summary()["batches"] == 4096  # the window keeps the latest WINDOW_SAMPLES
