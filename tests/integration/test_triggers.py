"""State triggers: exactly-once effects with event_id, order per group, real kills, filters, dead letters."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import ray

import shardstate
from shardstate import ops
from shardstate.cluster.slots import slot_of

pytestmark = pytest.mark.timeout(300)


@ray.remote(num_cpus=0)
class Recorder:
    """Collects what handlers saw, in arrival order."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def add(self, item: tuple[Any, ...]) -> None:
        self.seen.append(item)

    def get(self) -> list[tuple[Any, ...]]:
        return list(self.seen)


@pytest.fixture
def recorder() -> Any:
    name = f"rec-{uuid.uuid4().hex[:8]}"
    actor = Recorder.options(name=name, namespace="shardstate-tests").remote()
    ray.get(actor.get.remote())
    yield name
    ray.kill(actor)


def recording_handler(name: str) -> Callable[[shardstate.StateEvent], None]:
    def handler(event: shardstate.StateEvent) -> None:
        rec = ray.get_actor(name, namespace="shardstate-tests")
        ray.get(
            rec.add.remote(
                (event.event_id, event.group_id, event.key, event.seq, event.event_type, event.new_value)
            )
        )

    return handler


def wait_for(check: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


@ray.remote
def merge_step(state: shardstate.StateClient, group: str, i: int) -> None:
    state.update(group, "merged", [ops.merge("fields", {f"t{i}": i}), ops.increment("done")])


def test_completion_trigger_fires_once_with_the_final_value(
    state: shardstate.StateClient, group: str
) -> None:
    cluster = state.cluster

    def on_complete(event: shardstate.StateEvent) -> None:
        s = shardstate.connect(cluster=cluster)
        s.update(
            group + ":out",
            "fired",
            [ops.increment("runs"), ops.set("final", event.new_value)],
            op_id=event.event_id,  # dedup: a redelivered event takes effect once
        )

    name = state.on_change(
        on_complete,
        group_id=group,
        key="merged",
        condition=lambda e: e.new_value is not None and e.new_value.get("done") == 500,
    )
    ray.get([merge_step.remote(state, group, i) for i in range(500)])
    out = state.wait_until(group + ":out", "fired", lambda v: v is not None, timeout=120)
    time.sleep(1.0)  # room for a (wrong) second effect
    out = state.get(group + ":out", "fired")
    assert out["runs"] == 1
    assert out["final"]["done"] == 500
    assert out["final"]["fields"] == {f"t{i}": i for i in range(500)}
    assert state.remove_trigger(name) is True
    assert name not in [t.name for t in state.list_triggers()]


def test_handlers_see_each_groups_events_in_commit_order(
    state: shardstate.StateClient, group: str, recorder: str
) -> None:
    other = group + "-2"
    state.on_change(recording_handler(recorder), group_id=group, name=f"order-{group}")
    state.on_change(recording_handler(recorder), group_id=other, name=f"order-{other}")

    @ray.remote
    def writer(client: shardstate.StateClient, g: str, key: str, n: int) -> None:
        for _ in range(n):
            client.update(g, key, [ops.increment("n")])

    # 10,000 updates to one group from 8 racing tasks, plus a second group alongside
    refs = [writer.remote(state, group, f"k{t}", 1250) for t in range(8)]
    refs += [writer.remote(state, other, "k", 500)]
    ray.get(refs)
    rec = ray.get_actor(recorder, namespace="shardstate-tests")
    wait_for(lambda: len(ray.get(rec.get.remote())) >= 10_500, timeout=240)
    seen = ray.get(rec.get.remote())
    for g, expected in ((group, 10_000), (other, 500)):
        seqs = [s[3] for s in seen if s[1] == g]
        assert len(set(seqs)) == expected
        assert seqs == sorted(seqs), f"{g}: handler calls out of commit order"
    # within each key, values arrive as 1, 2, 3, ...
    for t in range(8):
        values = [s[5]["n"] for s in seen if s[1] == group and s[2] == f"k{t}"]
        assert values[:1250] == list(range(1, 1251))
    state.remove_trigger(f"order-{group}")
    state.remove_trigger(f"order-{other}")


@ray.remote
def counting_stream(state: shardstate.StateClient, group: str, task: int, n: int) -> None:
    """``n`` increments of one key, with automatic op_ids (the client's own retries apply once)."""
    for _ in range(n):
        state.update(group, f"k{task}", [ops.increment("n")])


def subscriber_of(state: shardstate.StateClient, shard: int) -> dict[str, Any]:
    """The stats of the subscriber that delivers shard ``shard``'s events (there are several)."""
    (sub,) = [s for s in ray.get(state.router.subscriber_stats.remote()) if shard in s["shards"]]
    return sub  # type: ignore[no-any-return]


def delivery_log(client: shardstate.StateClient, log: str) -> Callable[[shardstate.StateEvent], None]:
    """A handler that records EVERY delivery under its own key (no dedup: a redelivery adds a record).

    The record of the event keyed ``marker`` is followed by a 6 s pause, so a test can kill the
    subscriber while that delivery is running and not yet acknowledged.
    """

    def handler(event: shardstate.StateEvent) -> None:
        client.set(log, f"{event.event_id}|{uuid.uuid4().hex}", [event.key, event.new_value["n"]])
        if event.key == "marker":
            time.sleep(6.0)

    return handler


def deliveries(state: shardstate.StateClient, log: str) -> list[tuple[str, tuple[str, int]]]:
    """Every recorded delivery: ``(event_id, (key, n))``, one entry per handler call."""
    return [(item.key.split("|")[0], (item.value[0], item.value[1])) for item in state.items(log)]


def stream_with_trigger(
    state: shardstate.StateClient, group: str, kill: bool
) -> tuple[dict[str, int], str]:
    """Stream 1,200 counted updates plus a marker to ``group`` with a delivery-logging trigger.

    With ``kill``: SIGKILL the subscriber while it delivers the marker (so the marker is delivered
    again) and then the group's shard, mid-stream. Checks that the deduplicated delivered set is the
    committed set; returns the number of deliveries per event_id, and the marker's event_id.
    """
    log = group + ":log"
    tasks, n = 6, 200
    name = state.on_change(delivery_log(state, log), group_id=group, name=f"log-{group}")
    refs = [counting_stream.remote(state, group, t, n) for t in range(tasks)]
    wait_for(lambda: len(state.items(log)) > 100)
    state.set(group, "marker", {"n": 0})
    if kill:
        wait_for(lambda: any(value[0] == "marker" for _id, value in deliveries(state, log)))
        index = state._link.current().owners[slot_of(group)]
        sub = subscriber_of(state, index)
        os.kill(sub["pid"], signal.SIGKILL)  # during the marker's delivery: it was not acknowledged
        time.sleep(0.5)
        os.kill(state.shard_info()[index]["pid"], signal.SIGKILL)  # ... and the group's shard
    ray.get(refs)
    assert {it.key: it.value["n"] for it in state.items(group)} == {
        **{f"k{t}": n for t in range(tasks)},
        "marker": 0,
    }
    committed = {(f"k{t}", i) for t in range(tasks) for i in range(1, n + 1)} | {("marker", 0)}
    wait_for(lambda: {value for _id, value in deliveries(state, log)} >= committed, timeout=240)
    time.sleep(1.0)  # room for late (duplicate) deliveries to land
    seen = deliveries(state, log)
    by_id: dict[str, tuple[str, int]] = {}
    for event_id, value in seen:
        assert by_id.setdefault(event_id, value) == value  # event_id is stable across redeliveries
    assert set(by_id.values()) == committed  # dedup'd delivered set == committed set, nothing missing
    assert len(by_id) == len(committed)
    counts = {event_id: 0 for event_id in by_id}
    for event_id, _value in seen:
        counts[event_id] += 1
    print(f"kill={kill}: {len(seen)} deliveries of {len(committed)} events ({len(seen) - len(by_id)} again)")
    state.remove_trigger(name)
    (marker,) = [event_id for event_id, value in by_id.items() if value == ("marker", 0)]
    return counts, marker


def test_kill_subscriber_and_shard_during_a_stream(state: shardstate.StateClient, group: str) -> None:
    counts, marker = stream_with_trigger(state, group, kill=True)
    # the marker's delivery was running when the subscriber was killed, so it was delivered again,
    # and the handler's log shows it: this test can see duplicate deliveries
    assert counts[marker] >= 2


def test_no_duplicate_deliveries_without_a_crash(state: shardstate.StateClient, group: str) -> None:
    counts, _marker = stream_with_trigger(state, group, kill=False)
    assert set(counts.values()) == {1}  # each event delivered exactly once when nothing fails


def test_filters_conditions_and_dead_letters(
    state: shardstate.StateClient, group: str, recorder: str
) -> None:
    state.on_change(recording_handler(recorder), group_id=group, key="watched", name=f"key-{group}")
    state.on_change(
        recording_handler(recorder),
        group_id=group,
        condition=lambda e: e.key == "big" and e.new_value is not None and e.new_value > 10,
        name=f"cond-{group}",
    )

    def bad_condition(event: shardstate.StateEvent) -> bool:
        raise ValueError("condition exploded")

    def bad_handler(event: shardstate.StateEvent) -> None:
        raise RuntimeError("handler exploded")

    state.on_change(
        recording_handler(recorder), group_id=group, key="c", condition=bad_condition, name=f"bc-{group}"
    )
    state.on_change(bad_handler, group_id=group, key="h", name=f"bh-{group}")
    state.set(group, "watched", 1)
    state.set(group, "ignored", 2)
    state.set(group, "big", 5)
    state.set(group, "big", 50)
    state.set(group, "c", 1)
    state.set(group, "h", 1)
    state.set(group + "-other", "watched", 3)  # other group: no trigger fires
    wait_for(lambda: len([d for d in state.list_dead_letters() if d.event.group_id == group]) >= 2)
    time.sleep(0.5)
    seen = [
        (s[1], s[2], s[5])
        for s in ray.get(ray.get_actor(recorder, namespace="shardstate-tests").get.remote())
    ]
    assert sorted(seen) == [(group, "big", 50), (group, "watched", 1)]
    letters = {d.trigger: d for d in state.list_dead_letters() if d.event.group_id == group}
    assert "condition exploded" in letters[f"bc-{group}"].error
    assert "handler exploded" in letters[f"bh-{group}"].error
    assert letters[f"bh-{group}"].attempts > 1  # retried before giving up
    for name in ("key", "cond", "bc", "bh"):
        state.remove_trigger(f"{name}-{group}")


def test_no_events_for_reads_failed_updates_or_missing_deletes(
    state: shardstate.StateClient, group: str
) -> None:
    state.set(group, "k", {"n": 1})
    shard = state._link.current().shard_for(group)
    before = ray.get(shard.event_state.remote())[0]
    state.get(group, "k")
    state.items(group)
    state.list_groups()
    state.get_entry(group, "k")
    with pytest.raises(shardstate.UpdateError):
        state.update(group, "k", [ops.increment("n"), ops.append("n", 1)])
    with pytest.raises(shardstate.ConflictError):
        state.set(group, "k", 2, expected_version=7)
    assert state.delete(group, "missing") is None

    def mine() -> list[tuple[str, str]]:  # this group's events since ``before`` (the shard is shared)
        events = ray.get(shard.events_since.remote(before, 100_000, True))
        return [(e.kind, e.key) for e in events if e.group_id == group]

    assert mine() == []
    state.delete(group, "k")
    assert mine() == [("state:deleted", "k")]


def test_watch_and_wait_until(state: shardstate.StateClient, group: str) -> None:
    events = state.watch(group, timeout=3)
    state.set(group, "a", 1)
    state.update(group, "a", [ops.set("", 2)])
    state.delete(group, "a")
    got = []
    for event in events:
        got.append((event.event_type, event.key, event.old_value, event.new_value))
        if len(got) == 3:
            break
    assert got == [
        ("state:created", "a", None, 1),
        ("state:updated", "a", 1, 2),
        ("state:deleted", "a", 2, None),
    ]
    wire = shardstate.StateEvent(
        event_type="state:updated", group_id=group, key="a", old_value=1, new_value=2, seq=2, event_id="x"
    ).to_wire()
    assert wire == {
        "type": "state",
        "event_type": "state:updated",
        "scope": group,
        "key": "a",
        "old_value": 1,
        "new_value": 2,
    }
    threading.Timer(0.3, lambda: state.update(group, "gate", [ops.increment("n", 3)])).start()
    assert state.wait_until(group, "gate", lambda v: v is not None and v["n"] >= 3, timeout=30) == {"n": 3}
    with pytest.raises(shardstate.WaitTimeout):
        state.wait_until(group, "never", lambda v: v is not None, timeout=0.5)


def test_triggers_survive_a_cluster_restart(new_cluster: dict[str, str], recorder: str) -> None:
    state = shardstate.connect(**new_cluster, shards=2)
    state.on_change(recording_handler(recorder), group_id="jobs", name="durable")
    assert shardstate.shutdown(new_cluster["cluster"])
    again = shardstate.connect(**new_cluster)
    assert [t.name for t in again.list_triggers()] == ["durable"]
    again.set("jobs", "j1", "go")
    rec = ray.get_actor(recorder, namespace="shardstate-tests")
    wait_for(lambda: len(ray.get(rec.get.remote())) == 1, timeout=60)
    assert ray.get(rec.get.remote())[0][2:] == ("j1", 1, "state:created", "go")


def test_decorator_remote_function_handler_and_async_watch(
    state: shardstate.StateClient, group: str, recorder: str
) -> None:
    import asyncio

    @ray.remote(num_cpus=0)
    def remote_handler(event: shardstate.StateEvent) -> None:
        rec = ray.get_actor(recorder, namespace="shardstate-tests")
        ray.get(rec.add.remote(("remote", event.key, event.new_value)))

    state.on_change(remote_handler, group_id=group, key="r", name=f"remote-{group}")

    @state.trigger(group_id=group, key="d", name=f"deco-{group}")
    def decorated(event: shardstate.StateEvent) -> None:
        rec = ray.get_actor(recorder, namespace="shardstate-tests")
        ray.get(rec.add.remote(("deco", event.key, event.new_value)))

    assert callable(decorated)
    state.set(group, "r", 1)
    state.set(group, "d", 2)
    rec = ray.get_actor(recorder, namespace="shardstate-tests")
    wait_for(lambda: len(ray.get(rec.get.remote())) == 2)
    assert sorted(ray.get(rec.get.remote())) == [("deco", "d", 2), ("remote", "r", 1)]

    async def follow() -> list[tuple[str, Any]]:
        astate = await shardstate.connect_async(cluster=state.cluster)
        stream = astate.watch(group, timeout=5)
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.5)  # the watch has taken its starting point
        await astate.set(group, "w", "x")
        event = await first
        await stream.aclose()
        names = [t.name for t in await astate.list_triggers()]
        assert f"deco-{group}" in names
        return [(event.key, event.new_value)]

    assert asyncio.run(follow()) == [("w", "x")]
    state.remove_trigger(f"remote-{group}")
    state.remove_trigger(f"deco-{group}")


def test_events_are_kept_durably_only_while_a_trigger_listens(
    new_cluster: dict[str, str], recorder: str
) -> None:
    state = shardstate.connect(**new_cluster, shards=2)

    def durable() -> list[bool]:
        return [info["durable_events"] for info in state.shard_info()]

    wait_for(lambda: durable() == [False, False], timeout=60)  # no trigger: memory-only events
    state.set("quiet", "before", 0)
    state.on_change(recording_handler(recorder), group_id="loud", name="listen")
    assert durable() == [True, True]  # switched before on_change returned
    for _ in range(20):
        state.update("loud", "n", [ops.increment("v")])
    rec = ray.get_actor(recorder, namespace="shardstate-tests")
    wait_for(lambda: len(ray.get(rec.get.remote())) == 20, timeout=60)
    assert [r[5] for r in ray.get(rec.get.remote())] == [{"v": i} for i in range(1, 21)]
    assert state.remove_trigger("listen")
    assert durable() == [False, False]
    events = state.watch("loud", timeout=30)  # watchers still see memory-only events
    state.update("loud", "n", [ops.increment("v")])
    seen = next(events)
    assert (seen.event_type, seen.key, seen.new_value) == ("state:updated", "n", {"v": 21})


def groups_on(state: shardstate.StateClient, shard: int, count: int, prefix: str) -> list[str]:
    """``count`` group names that live on shard ``shard``."""
    owners = state._link.current().owners
    names = (f"{prefix}-{i}" for i in range(100_000))
    return [g for g in names if owners[slot_of(g)] == shard][:count]


def shard_info_when_up(state: shardstate.StateClient) -> list[dict[str, Any]]:
    for _ in range(600):
        try:
            return state.shard_info()
        except shardstate.StateError:
            time.sleep(0.1)
    raise AssertionError("the shards did not come back")


def test_a_shard_restarted_with_no_trigger_keeps_no_events_and_a_new_trigger_starts_from_now(
    new_cluster: dict[str, str], recorder: str
) -> None:
    state = shardstate.connect(**new_cluster, shards=2)
    wait_for(lambda: [i["durable_events"] for i in state.shard_info()] == [False, False], timeout=60)
    pid = state.shard_info()[0]["pid"]
    os.kill(pid, signal.SIGKILL)  # no trigger is registered: the restarted shard must know that
    wait_for(lambda: shard_info_when_up(state)[0]["pid"] != pid, timeout=60)
    (group,) = groups_on(state, 0, 1, "quiet")
    for i in range(2_000):
        state.set(group, f"k{i % 50}", i)
    info = state.shard_info()[0]
    assert info["restarted"] is True
    assert info["durable_events"] is False
    assert info["unacked"] == 0  # nothing piles up for a subscriber nobody runs
    state.on_change(recording_handler(recorder), group_id=group, name="late")
    state.set(group, "after", "new")
    rec = ray.get_actor(recorder, namespace="shardstate-tests")
    wait_for(lambda: len(ray.get(rec.get.remote())) >= 1, timeout=60)
    time.sleep(1.0)  # room for (wrong) old events to arrive
    assert [(r[2], r[5]) for r in ray.get(rec.get.remote())] == [("after", "new")]


def test_a_trigger_registered_while_another_listens_starts_from_now(
    state: shardstate.StateClient, group: str, recorder: str
) -> None:
    def slow(event: shardstate.StateEvent) -> None:
        if event.new_value == 0:
            time.sleep(3.0)  # holds the shard's delivery: the next events wait in a backlog

    first = state.on_change(slow, group_id=group, name=f"slow-{group}")
    for i in range(100):
        state.set(group, "k", i)
    second = state.on_change(recording_handler(recorder), group_id=group, name=f"late-{group}")
    state.set(group, "k", "new")
    rec = ray.get_actor(recorder, namespace="shardstate-tests")
    wait_for(lambda: len(ray.get(rec.get.remote())) >= 1, timeout=120)
    shard = state._link.current().shard_for(group)
    wait_for(lambda: len(set(ray.get(shard.event_state.remote())[:2])) == 1)  # all acknowledged
    assert [r[5] for r in ray.get(rec.get.remote())] == ["new"]  # none of the 100 older events
    state.remove_trigger(first)
    state.remove_trigger(second)


def test_a_hung_handler_times_out_into_a_dead_letter_and_the_group_moves_on(
    state: shardstate.StateClient, group: str, recorder: str
) -> None:
    record = recording_handler(recorder)

    def handler(event: shardstate.StateEvent) -> None:
        if event.key == "hang":
            rec = ray.get_actor(recorder, namespace="shardstate-tests")
            ray.get(rec.add.remote(("hung in", os.getpid())))
            time.sleep(3600)  # hangs (a deadlock, a stuck call): only the timeout ends it
        record(event)

    for bad in (0, -1.0, float("nan"), "1", True):
        with pytest.raises(shardstate.InvalidInput):
            state.on_change(handler, group_id=group, timeout=bad)  # type: ignore[arg-type]
    name = state.on_change(handler, group_id=group, name=f"hang-{group}", timeout=1.0)
    assert name in [t.name for t in state.list_triggers()]
    state.set(group, "hang", 1)
    state.set(group, "next", 2)
    rec = ray.get_actor(recorder, namespace="shardstate-tests")

    def delivered() -> list[tuple[Any, ...]]:
        return [r for r in ray.get(rec.get.remote()) if r[0] != "hung in"]

    wait_for(lambda: len(delivered()) >= 1, timeout=120)
    assert [(r[2], r[5]) for r in delivered()] == [("next", 2)]

    def letters() -> list[shardstate.DeadLetter]:
        return [d for d in state.list_dead_letters() if d.event.group_id == group]

    wait_for(lambda: len(letters()) >= 1, timeout=60)  # stored once its batch is done
    (letter,) = letters()
    assert (letter.trigger, letter.event.key, letter.attempts) == (name, "hang", 4)
    assert "timed out after 1.0 s" in letter.error
    hung = {r[1] for r in ray.get(rec.get.remote()) if r[0] == "hung in"}
    assert len(hung) == 4  # each attempt hung in a process of its own ...
    for pid in hung:  # ... which was killed: a process is what a hung handler is stopped by
        wait_for(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), timeout=30)  # type: ignore[misc]
    state.remove_trigger(name)


def test_a_flood_stays_within_the_inbox_and_in_flight_bounds(new_cluster: dict[str, str]) -> None:
    from shardstate.cluster.subscriber import INBOX_EVENTS, MAX_IN_FLIGHT

    state = shardstate.connect(**new_cluster, shards=2)
    gate, *groups = groups_on(state, 0, 41, "flood")

    def handler(event: shardstate.StateEvent) -> None:
        if event.key == "block":  # hold the shard's delivery until the test opens the gate
            state.set(gate, "blocked", True)
            while not state.get(gate, "open"):
                time.sleep(0.05)

    state.on_change(handler, name="flood", timeout=600)
    state.set(gate, "block", 1)
    wait_for(lambda: state.get(gate, "blocked") is True, timeout=120)
    total = 0
    for round_ in range(6):  # 12,000 events on the blocked shard, in 40 groups
        with state.pipeline() as pipe:
            for i in range(2_000):
                pipe.set(groups[i % 40], f"k{i}", round_)
        total += 2_000

    def stats() -> dict[str, Any]:
        return subscriber_of(state, 0)  # the groups live on shard 0

    wait_for(lambda: stats()["pushes_dropped"] > 0, timeout=60)
    assert stats()["inbox_peak"] <= INBOX_EVENTS  # pushes past the bound were dropped, not kept
    state.set(gate, "open", True)
    wait_for(lambda: stats()["delivered"] >= total + 3, timeout=240)  # read from the log instead
    wait_for(lambda: shard_info_when_up(state)[0]["unacked"] == 0, timeout=60)
    assert 1 < stats()["in_flight_peak"] <= MAX_IN_FLIGHT  # 40 groups per batch, 32 tasks at a time


def test_dead_letters_that_do_not_fit_are_stored_truncated(
    new_cluster: dict[str, str], recorder: str
) -> None:
    state = shardstate.connect(**new_cluster, shards=2, max_value_size=64 * 1024)
    record = recording_handler(recorder)

    def handler(event: shardstate.StateEvent) -> None:
        if event.key == "big":
            raise RuntimeError("no: " + "x" * 10_000)  # a long error text as well
        record(event)

    name = "n" * 500  # "<name>|<event_id>" is too long for a key
    state.on_change(handler, group_id="docs", name=name)
    state.set("docs", "big", "a" * 40_000)  # the letter fits max_value_size, its key does not
    state.set("docs", "big", "b" * 40_000)  # old + new values do not fit max_value_size
    state.set("docs", "after", 1)
    rec = ray.get_actor(recorder, namespace="shardstate-tests")
    wait_for(lambda: len(ray.get(rec.get.remote())) >= 1, timeout=120)  # delivery went on
    assert [(r[2], r[5]) for r in ray.get(rec.get.remote())] == [("after", 1)]
    wait_for(lambda: len(state.list_dead_letters()) >= 2, timeout=60)
    letters = sorted(state.list_dead_letters(), key=lambda d: d.event.seq)
    assert [(d.trigger, d.event.key, d.attempts) for d in letters] == [(name, "big", 4), (name, "big", 4)]
    first, second = letters
    assert first.event.new_value == "a" * 40_000  # stored whole under a hashed key
    assert "no: xxxx" in first.error
    assert len(first.error) > 10_000
    assert second.event.old_value.startswith("<str, 400")  # a short description with the size
    assert "bytes pickled: 'aaaa" in second.event.old_value
    assert second.event.new_value.startswith("<str, 400")
    assert len(second.event.new_value) < 300
    assert "no: xxxx" in second.error
    assert "dead letter truncated" in second.error
    assert len(second.error) < 3_000
    time.sleep(2.0)  # nothing is delivered again
    assert len(ray.get(rec.get.remote())) == 1
    assert len(state.list_dead_letters()) == 2


# -- issue 10: triggers at socket speed, values kept once ----------------------------------------------
def test_each_subscriber_streams_its_own_shards_and_a_killed_one_costs_only_those(
    new_cluster: dict[str, str], recorder: str
) -> None:
    state = shardstate.connect(**new_cluster, shards=4)
    state.on_change(recording_handler(recorder), name="all")
    stats = ray.get(state.router.subscriber_stats.remote())
    assert len(stats) >= 2  # several subscribers: one event loop is not the limit
    assert sorted(s for sub in stats for s in sub["shards"]) == [0, 1, 2, 3]


    def streaming() -> bool:  # every subscriber follows each of its shards over a stream
        subs = ray.get(state.router.subscriber_stats.remote())
        return all(sub["streaming"] == sub["shards"] for sub in subs)

    wait_for(streaming)
    victim = subscriber_of(state, 0)
    (first,) = groups_on(state, 0, 1, "a")
    spared = next(i for i in range(1, 4) if i not in victim["shards"])
    (other,) = groups_on(state, spared, 1, "b")
    os.kill(victim["pid"], signal.SIGKILL)
    for i in range(50):  # the other subscriber's shard delivers on while the victim restarts
        state.set(other, "k", i)
        state.set(first, "k", i)
    rec = ray.get_actor(recorder, namespace="shardstate-tests")
    wait_for(lambda: len({(r[1], r[5]) for r in ray.get(rec.get.remote())}) == 100, timeout=120)
    seen = ray.get(rec.get.remote())
    for g in (first, other):
        values = [r[5] for r in seen if r[1] == g]
        assert sorted(set(values)) == list(range(50))
        assert values == sorted(values)  # in commit order
    assert subscriber_of(state, 0)["pid"] != victim["pid"]  # restarted by Ray


def test_watch_is_pushed_not_polled(state: shardstate.StateClient, group: str) -> None:
    from shardstate import _triggers

    events = _triggers.watch(state, group, poll=3600, timeout=120)  # a poll would wait an hour
    got: list[shardstate.StateEvent] = []
    reader = threading.Thread(target=lambda: got.append(next(events)), daemon=True)
    reader.start()
    time.sleep(1.0)  # the watcher waits: nothing was written yet
    state.set(group, "k", "pushed")
    reader.join(60)
    assert [(e.key, e.new_value) for e in got] == [("k", "pushed")]
    assert "watcher" in state.shard_info()[state._link.current().owners[slot_of(group)]]["followers"]
    events.close()


def test_a_watcher_sees_every_event_in_order_while_writers_race_and_its_shard_is_killed(
    state: shardstate.StateClient, group: str
) -> None:
    events = state.watch(group, timeout=240)
    refs = [counting_stream.remote(state, group, t, 300) for t in range(4)]
    seen: dict[str, list[int]] = {f"k{t}": [] for t in range(4)}
    killed = False
    for event in events:
        seen[event.key].append(event.new_value["n"])
        if not killed and sum(map(len, seen.values())) > 400:
            index = state._link.current().owners[slot_of(group)]
            os.kill(state.shard_info()[index]["pid"], signal.SIGKILL)  # the stream breaks; reopened
            killed = True
        if all(v and v[-1] == 300 for v in seen.values()):
            break
    ray.get(refs)
    for key, values in seen.items():
        assert values == sorted(set(values)), key  # in order, each once, across the restart
        assert values[-1] == 300
        # no trigger listens, so events live in the shard's memory only: those committed just before
        # the kill that had not reached the watcher are gone (as with polling); nothing else is
        missing = sorted(set(range(1, 301)) - set(values))
        assert missing == list(range(missing[0], missing[0] + len(missing))) if missing else True, key


def test_a_slow_watcher_loses_nothing_when_its_shard_drops_frames(
    new_cluster: dict[str, str],
) -> None:
    state = shardstate.connect(**new_cluster, shards=1)
    events = state.watch("big", timeout=240)
    state.set("big", "k", "x" * 4096)
    first = next(events)  # the stream is up; now the watcher does not read for a while
    for i in range(3000):  # 12 MB of events: more than the shard buffers for one stream
        with state.pipeline() as pipe:
            pipe.set("big", f"k{i % 7}", f"{i:06d}" + "x" * 4090)
    values = [first.new_value[:6]]
    for event in events:
        values.append(event.new_value[:6])
        if len(values) == 3001:
            break
    assert values == ["xxxxxx"] + [f"{i:06d}" for i in range(3000)]
    assert state.shard_info()[0]["pushes_dropped"] > 0  # frames were dropped, and filled in from the log


@ray.remote(num_cpus=0)
class ValueLog:
    """What a handler saw of a growing document: (event_id, seq, done before, done after)."""

    def __init__(self) -> None:
        self.seen: list[tuple[Any, ...]] = []

    def add(self, item: tuple[Any, ...]) -> None:
        self.seen.append(item)

    def get(self) -> list[tuple[Any, ...]]:
        return list(self.seen)


def test_handlers_get_whole_values_of_a_growing_document_across_kills(
    state: shardstate.StateClient, group: str
) -> None:
    """Large values travel once (a reference to the previous version, an update's ops): what a
    handler gets is still both whole documents, through streams, log reads and a shard's reload."""
    log_name = f"values-{uuid.uuid4().hex[:8]}"
    log = ValueLog.options(name=log_name, namespace="shardstate-tests").remote()

    def handler(event: shardstate.StateEvent) -> None:
        old, new = event.old_value or {"fields": {}}, event.new_value
        sink = ray.get_actor(log_name, namespace="shardstate-tests")
        ray.get(sink.add.remote((event.event_id, event.seq, sorted(old["fields"]), sorted(new["fields"]))))

    name = state.on_change(handler, group_id=group, key="doc", name=f"values-{group}")
    field = "v" * 300
    index = state._link.current().owners[slot_of(group)]
    for i in range(240):
        state.update(group, "doc", [ops.merge("fields", {f"f{i:03d}": field})])
        if i == 80:
            os.kill(subscriber_of(state, index)["pid"], signal.SIGKILL)
        if i == 160:
            os.kill(state.shard_info()[index]["pid"], signal.SIGKILL)
    wait_for(lambda: len({r[0] for r in ray.get(log.get.remote())}) >= 240, timeout=240)
    by_id: dict[str, tuple[Any, ...]] = {}
    for event_id, seq, old, new in ray.get(log.get.remote()):
        assert by_id.setdefault(event_id, (seq, old, new)) == (seq, old, new)  # redelivered alike
    rows = sorted(by_id.values())
    assert len(rows) == 240
    for i, (_seq, old, new) in enumerate(rows):
        assert old == [f"f{j:03d}" for j in range(i)]  # the document before this update, whole
        assert new == [f"f{j:03d}" for j in range(i + 1)]  # and after it
    state.remove_trigger(name)
    ray.kill(log)


def test_a_runner_killed_mid_chunk_is_replaced_and_its_events_delivered_again_in_order(
    state: shardstate.StateClient, group: str
) -> None:
    log = group + ":log"
    pids = group + ":pids"

    def handler(event: shardstate.StateEvent) -> None:
        state.set(log, f"{event.event_id}|{uuid.uuid4().hex}", [event.key, event.new_value["n"]])
        if event.key == "marker":
            state.set(pids, "runner", os.getpid())
            time.sleep(6.0)  # the test kills this runner now

    name = state.on_change(handler, group_id=group, name=f"runner-{group}")
    state.set(group, "marker", {"n": 0})
    for i in range(1, 41):
        state.set(group, "k", {"n": i})
    wait_for(lambda: state.get(pids, "runner") is not None)
    pid = state.get(pids, "runner")
    os.kill(pid, signal.SIGKILL)  # the runner process, in the middle of its chunk
    committed = {("marker", 0)} | {("k", i) for i in range(1, 41)}
    wait_for(lambda: {value for _id, value in deliveries(state, log)} >= committed, timeout=120)
    seen = deliveries(state, log)
    assert sum(1 for _id, value in seen if value == ("marker", 0)) >= 2  # its delivery ran again
    firsts: dict[str, tuple[str, int]] = {}
    for event_id, value in seen:
        firsts.setdefault(event_id, value)
    assert {value for value in firsts.values()} == committed
    # the log keeps the handler's calls in the order they happened: the group's order held
    assert [n for _id, (key, n) in seen if key == "k"] == list(range(1, 41))
    stats = subscriber_of(state, state._link.current().owners[slot_of(group)])
    assert stats["runners_killed"] >= 1
    assert not os.path.exists(f"/proc/{pid}")
    state.remove_trigger(name)


def test_the_async_watcher_is_pushed_in_order_across_a_shard_kill(
    state: shardstate.StateClient, group: str
) -> None:
    """``_triggers.watch_async`` (asyncio streams, what the async client can call instead of running
    the sync watcher in threads): pushed (an hour's poll), in order, a shard's restart survived."""
    import asyncio

    from shardstate import _triggers

    async def follow() -> list[tuple[str, Any]]:
        astate = await shardstate.connect_async(cluster=state.cluster)
        stream = _triggers.watch_async(astate, group, poll=3600, timeout=120)
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(1.0)  # the watcher has taken its starting point and waits
        await astate.set(group, "k", 0)
        got = [await first]
        index = state._link.current().owners[slot_of(group)]
        for i in range(1, 60):
            await astate.set(group, "k", i)
            if i == 20:
                os.kill(state.shard_info()[index]["pid"], signal.SIGKILL)
        async for event in stream:
            got.append(event)
            if event.new_value == 59:
                break
        await stream.aclose()
        return [(e.event_type, e.new_value) for e in got]

    got = asyncio.run(follow())
    values = [v for _kind, v in got]
    assert values == sorted(set(values))  # in order, each once
    assert values[0] == 0
    assert set(range(21, 60)) <= set(values)  # everything written after the restart
    assert got[0][0] == "state:created"
