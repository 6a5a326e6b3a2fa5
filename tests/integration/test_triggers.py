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
def stream(state: shardstate.StateClient, group: str, task: int, n: int) -> None:
    for i in range(n):
        state.update(group, f"k{task}", [ops.increment("n")], op_id=f"{group}/{task}/{i}")


def test_kill_subscriber_and_shard_during_a_stream(
    state: shardstate.StateClient, group: str, recorder: str
) -> None:
    state.on_change(recording_handler(recorder), group_id=group, name=f"faults-{group}")
    refs = [stream.remote(state, group, t, 500) for t in range(10)]  # 5,000 events
    rec = ray.get_actor(recorder, namespace="shardstate-tests")
    wait_for(lambda: len(ray.get(rec.get.remote())) > 500)
    sub = ray.get(state.router.subscriber_stats.remote())[0]
    os.kill(sub["pid"], signal.SIGKILL)  # really kill the subscriber ...
    time.sleep(0.5)
    index = state._link.current().owners[slot_of(group)]
    os.kill(state.shard_info()[index]["pid"], signal.SIGKILL)  # ... and the group's shard
    ray.get(refs)
    expected = {(f"k{t}", n) for t in range(10) for n in range(1, 501)}
    assert {(k, v["n"]) for k, v in ((it.key, it.value) for it in state.items(group))} == {
        (f"k{t}", 500) for t in range(10)
    }

    def delivered() -> set[tuple[str, int]]:
        return {(s[2], s[5]["n"]) for s in ray.get(rec.get.remote()) if s[1] == group}

    wait_for(lambda: delivered() >= expected, timeout=240)
    seen = ray.get(rec.get.remote())
    by_id: dict[str, tuple[str, int]] = {}
    for s in seen:
        assert by_id.setdefault(s[0], (s[2], s[5]["n"])) == (s[2], s[5]["n"])  # event_id is stable
    assert set(by_id.values()) == expected  # dedup'd delivered set == committed set, exactly
    print(f"delivered {len(seen)} calls for {len(expected)} events ({len(seen) - len(by_id)} redelivered)")
    state.remove_trigger(f"faults-{group}")


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
    assert ray.get(shard.event_state.remote())[0] == before
    state.delete(group, "k")
    assert ray.get(shard.event_state.remote())[0] == before + 1


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
