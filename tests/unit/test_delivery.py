"""Delivery through warm runners (issue 10, item 5), without Ray: the runner's watchdog and the
subscriber's accounting of timeouts, silent and dying runners, retries and dead letters."""

from __future__ import annotations

import asyncio
import pickle
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from shardstate import StateEvent
from shardstate.cluster import delivery
from shardstate.cluster.delivery import Attempts, Chunk, run_delivery, run_handlers
from shardstate.cluster.runners import _watch_chunk
from shardstate.shards.records import Event

pytestmark = pytest.mark.timeout(60)


def events(n: int) -> list[StateEvent]:
    return [
        StateEvent(event_type="state:created", group_id="g", key=f"k{i}", new_value=i, seq=i, event_id=f"{i}")
        for i in range(n)
    ]


def run_watched(
    handler: Callable[[StateEvent], None], n: int, timeout: float | None, eager: bool = False
) -> tuple[list[tuple[Any, ...]], threading.Thread]:
    """Run ``handler`` over ``n`` events as a runner does (job thread + watchdog); the messages."""
    messages: list[tuple[Any, ...]] = []
    attempts = Attempts(messages.append, delivery.tick(timeout))
    job = threading.Thread(
        target=run_handlers, args=("t", handler, events(n), timeout, 1, eager, attempts), daemon=True
    )
    dog = threading.Thread(target=_watch_chunk, args=(attempts,), daemon=True)
    job.start()
    dog.start()
    dog.join(30)
    return messages, job


def test_quick_handlers_cost_one_message() -> None:
    seen: list[int] = []
    messages, job = run_watched(lambda e: seen.append(e.new_value), 50, timeout=60.0)
    job.join(10)
    assert seen == list(range(50))
    assert messages == [("done", 50, 0, [])]


def test_a_hung_attempt_is_reported_with_its_number_and_nothing_runs_after_it() -> None:
    release = threading.Event()
    seen: list[tuple[int, int]] = []
    calls: dict[int, int] = {}

    def handler(event: StateEvent) -> None:
        calls[event.new_value] = calls.get(event.new_value, 0) + 1
        seen.append((event.new_value, calls[event.new_value]))
        if event.new_value == 1 and calls[1] == 2:
            release.wait()  # the second attempt of event 1 hangs
        if event.new_value == 1 and calls[1] == 1:
            raise RuntimeError("first attempt fails")

    messages, job = run_watched(handler, 3, timeout=0.2)
    kinds = [m[0] for m in messages]
    assert kinds[-1] == "timeout"
    assert messages[-1][1:3] == (1, 2)  # event 1, attempt 2: the one that hung
    release.set()  # the hung handler returns after all: the runner runs nothing more of the chunk
    job.join(10)
    assert seen == [(0, 1), (1, 1), (1, 2)]


def test_a_slow_chunk_reports_where_it_is_and_failed_events_become_letters() -> None:
    def handler(event: StateEvent) -> None:
        if event.new_value == 0:
            raise ValueError("always")
        time.sleep(0.3)

    messages, job = run_watched(handler, 3, timeout=0.8)  # a tick of 0.2 s; each event takes 0.3 s
    job.join(10)
    assert any(m[0] == "at" for m in messages)  # reported while it ran (every tick)
    assert messages[-1][:2] == ("done", 3)
    letters = [letter for m in messages for letter in m[3]]
    assert [(x["event"].new_value, x["attempts"]) for x in letters] == [(0, delivery.HANDLER_ATTEMPTS)]
    assert "ValueError: always" in letters[0]["error"]


# -- the subscriber's side, with scripted runners ----------------------------------------------------
class FakeRunner:
    """Plays back a script: each item is a message tuple, "die" (EOF), or "hang" (never answers)."""

    def __init__(self, script: list[Any]) -> None:
        self.script = list(script)
        self.jobs: list[tuple[int, int, bool]] = []
        self.loaded: dict[str, None] = {}

    async def send_job(self, chunk: Chunk, start: int, attempt: int, eager: bool) -> None:
        self.jobs.append((start, attempt, eager))

    async def receive(self) -> tuple[Any, ...]:
        step = self.script.pop(0) if self.script else "hang"
        if step == "die":
            raise asyncio.IncompleteReadError(b"", 4)
        if step == "hang":
            await asyncio.sleep(3600)
        return step  # type: ignore[no-any-return]


class FakePool:
    def __init__(self, scripts: list[list[Any]]) -> None:
        self.runners = [FakeRunner(s) for s in scripts]
        self.handed = 0
        self.released: list[FakeRunner] = []
        self.discarded: list[FakeRunner] = []

    async def acquire(self) -> FakeRunner:
        runner = self.runners[self.handed]
        self.handed += 1
        return runner

    async def release(self, runner: FakeRunner, busy: float = 0.0) -> None:
        self.released.append(runner)

    async def discard(self, runner: FakeRunner) -> None:
        self.discarded.append(runner)


def chunk(n: int, timeout: float | None = 0.05) -> Chunk:
    records = [Event(i + 1, "state:created", "g", f"k{i}", None, pickle.dumps(i), 0.0) for i in range(n)]
    return Chunk("t", b"blob", "key", "c", 0, records, timeout)


def deliver(pool: FakePool, c: Chunk) -> list[dict[str, Any]]:
    return asyncio.run(run_delivery(pool, c))  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _short_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(delivery, "STALL_GRACE", 0.05)
    monkeypatch.setattr(delivery, "HANDLER_BACKOFF", 0.001)
    monkeypatch.setattr(asyncio, "sleep", _fast_sleep(asyncio.sleep))


def _fast_sleep(real: Any) -> Any:
    async def sleep(seconds: float, *args: Any) -> Any:
        return await real(seconds if seconds >= 3600 else 0, *args)

    return sleep


def test_each_timed_out_attempt_counts_and_the_last_makes_a_dead_letter() -> None:
    first = [("timeout", 1, 1, [])]  # event 1 (of the chunk) times out ...
    again = [[("timeout", 0, a, [])] for a in (2, 3, 4)]  # ... and again, each time on a new runner
    pool = FakePool([first, *again, [("done", 1, 0, [])]])
    letters = deliver(pool, chunk(3))
    assert [(x["event"].key, x["attempts"]) for x in letters] == [("k1", delivery.HANDLER_ATTEMPTS)]
    assert "timed out" in letters[0]["error"]
    jobs = [r.jobs[0] for r in pool.runners]
    assert jobs == [(0, 1, False), (1, 2, False), (1, 3, False), (1, 4, False), (2, 1, False)]
    assert len(pool.discarded) == 4  # every runner stuck in a handler was killed
    assert pool.released == [pool.runners[-1]]


def test_a_silent_runner_is_killed_and_the_chunk_runs_again_reporting_every_attempt() -> None:
    pool = FakePool(
        [
            [("at", 1, 1, []), "hang"],  # heartbeat at event 1, then silence
            [("at", 0, 1, []), "hang"],  # eager: event 1's first attempt reported, then silence
            [("done", 2, 0, [])],
        ]
    )
    letters = deliver(pool, chunk(3))
    assert letters == []
    assert [r.jobs[0] for r in pool.runners] == [(0, 1, False), (1, 1, True), (1, 2, True)]
    assert len(pool.discarded) == 2


def test_a_dying_runner_is_replaced_and_after_too_many_deaths_the_rest_are_letters() -> None:
    pool = FakePool([[("at", 2, 1, []), "die"]] + [["die"]] * 4)
    letters = deliver(pool, chunk(4))
    assert [x["event"].key for x in letters] == ["k2", "k3"]  # from the last report on
    assert all("delivery failed 5 times" in x["error"] for x in letters)
    assert [r.jobs[0][0] for r in pool.runners] == [0, 2, 2, 2, 2]
