"""Retrying a dead letter: the handler runs again in the cluster; success removes the letter, failure
keeps it with the new error and more attempts; unknown letters and removed triggers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest

import shardstate
from shardstate import ops

pytestmark = pytest.mark.timeout(240)


def wait_for(check: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


def flagged_handler(cluster: str, group: str) -> Callable[[shardstate.StateEvent], None]:
    """Fails until ``<group>-ctl/flag`` is set; then counts one run per event (its side effect)."""

    def handler(event: shardstate.StateEvent) -> None:
        state = shardstate.connect(cluster=cluster)
        if not state.get(f"{group}-ctl", "flag"):
            raise RuntimeError(f"flag not set for {event.key}")
        state.update(f"{group}-ctl", "runs", [ops.increment(event.key)])

    return handler


def letters_of(state: shardstate.StateClient, name: str) -> list[shardstate.DeadLetter]:
    return [d for d in state.list_dead_letters() if d.trigger == name]


@pytest.fixture
def failed(state: shardstate.StateClient, group: str) -> Any:
    """A trigger whose handler failed on two events (``a`` and ``b``): two dead letters."""
    name = f"flagged-{group}"
    state.on_change(flagged_handler(state.cluster, group), group_id=group, name=name, timeout=30)
    state.set(group, "a", 1)
    state.set(group, "b", 2)
    wait_for(lambda: len(letters_of(state, name)) == 2)
    yield name
    state.remove_trigger(name)


def test_retry_after_the_cause_is_fixed_runs_once_more_and_removes_the_letter(
    state: shardstate.StateClient, group: str, failed: str
) -> None:
    letters = {d.event.key: d for d in letters_of(state, failed)}
    first = letters["a"]
    assert "flag not set for a" in first.error
    assert state.get(f"{group}-ctl", "runs") is None  # never succeeded

    state.set(f"{group}-ctl", "flag", True)
    assert state.retry_dead_letter(failed, first.event.event_id) is True
    assert state.get(f"{group}-ctl", "runs") == {"a": 1}  # the side effect happened exactly once
    remaining = letters_of(state, failed)
    assert [d.event.key for d in remaining] == ["b"]  # only the retried letter is gone
    # it is gone: a second retry finds nothing and runs nothing
    assert state.retry_dead_letter(failed, first.event.event_id) is False
    assert state.get(f"{group}-ctl", "runs") == {"a": 1}


def test_retry_of_a_still_failing_handler_keeps_the_letter_with_more_attempts(
    state: shardstate.StateClient, group: str, failed: str
) -> None:
    before = {d.event.key: d for d in letters_of(state, failed)}["b"]
    assert state.retry_dead_letter(failed, before.event.event_id) is False
    after = {d.event.key: d for d in letters_of(state, failed)}["b"]
    assert after.attempts > before.attempts
    assert after.at >= before.at
    assert "flag not set for b" in after.error
    assert after.event == before.event  # the same event, same event_id
    assert state.get(f"{group}-ctl", "runs") is None


def test_unknown_letters_answer_false_and_bad_input_raises(
    state: shardstate.StateClient, group: str, failed: str
) -> None:
    event_id = letters_of(state, failed)[0].event.event_id
    assert state.retry_dead_letter("no-such-trigger", event_id) is False
    assert state.retry_dead_letter(failed, "no/such/event") is False
    with pytest.raises(shardstate.InvalidInput):
        state.retry_dead_letter(failed, "")
    with pytest.raises(shardstate.InvalidInput):
        state.retry_dead_letter("", event_id)
    assert len(letters_of(state, failed)) == 2  # nothing changed


def test_a_removed_trigger_cannot_be_retried(state: shardstate.StateClient, group: str, failed: str) -> None:
    event_id = letters_of(state, failed)[0].event.event_id
    state.remove_trigger(failed)
    with pytest.raises(shardstate.InvalidInput, match="removed"):
        state.retry_dead_letter(failed, event_id)
    assert len(letters_of(state, failed)) == 2


def test_the_async_client_retries_too(state: shardstate.StateClient, group: str, failed: str) -> None:
    state.set(f"{group}-ctl", "flag", True)
    letters = letters_of(state, failed)

    async def retry_all() -> list[bool]:
        astate = await shardstate.connect_async(cluster=state.cluster)
        return [await astate.retry_dead_letter(failed, d.event.event_id) for d in letters]

    assert asyncio.run(retry_all()) == [True, True]
    assert letters_of(state, failed) == []
    assert state.get(f"{group}-ctl", "runs") == {"a": 1, "b": 1}


def test_a_trigger_registered_again_with_a_fixed_handler_retries_with_the_new_one(
    state: shardstate.StateClient, group: str, failed: str
) -> None:
    ctl = f"{group}-ctl"
    cluster = state.cluster

    def fixed(event: shardstate.StateEvent) -> None:  # no flag needed any more
        shardstate.connect(cluster=cluster).update(ctl, "fixed", [ops.increment(event.key)])

    state.on_change(fixed, group_id=group, name=failed, timeout=30)  # same name: replaces the handler
    letter = {d.event.key: d for d in letters_of(state, failed)}["a"]
    assert state.retry_dead_letter(failed, letter.event.event_id) is True
    assert state.get(ctl, "fixed") == {"a": 1}
    assert state.get(ctl, "runs") is None  # the old handler did not run


def test_retry_over_http_and_the_cluster_view(
    state: shardstate.StateClient, group: str, failed: str, http: Any
) -> None:
    """``POST /api/v1/dead-letters/retry``: failed again → retried false (the letter stays, updated);
    fixed → retried true and gone; unknown → 404. ``/api/v1/cluster`` lists the letters."""
    view = http.get("/api/v1/cluster").json()
    listed = {(d["trigger"], d["key"]) for d in view["dead_letters"]}
    assert {(failed, "a"), (failed, "b")} <= listed
    letter = next(d for d in view["dead_letters"] if d["trigger"] == failed and d["key"] == "a")
    body = {"trigger": failed, "event_id": letter["event_id"]}
    again = http.post("/api/v1/dead-letters/retry", json=body)
    assert again.status_code == 200
    assert again.json()["retried"] is False
    assert again.json()["attempts"] > letter["attempts"]
    state.set(f"{group}-ctl", "flag", True)
    fixed = http.post("/api/v1/dead-letters/retry", json=body)
    assert fixed.json() == {"retried": True}
    assert state.get(f"{group}-ctl", "runs") == {"a": 1}
    gone = http.post("/api/v1/dead-letters/retry", json=body)
    assert gone.status_code == 404
    assert gone.json()["error"]["type"] == "NotFound"
    assert state.get(f"{group}-ctl", "runs") == {"a": 1}
