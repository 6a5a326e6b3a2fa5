"""Metrics: the figures in ``shard_info()`` and the subscribers' stats, and Ray's Prometheus export."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import ray

import shardstate
from shardstate import ops

pytestmark = pytest.mark.timeout(300)


def total_ops(state: shardstate.StateClient) -> Counter[str]:
    out: Counter[str] = Counter()
    for shard in state.shard_info():
        out.update(shard["metrics"]["ops"])
    return out


def wait_for(check: Callable[[], Any], timeout: float = 120.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_shard_info_counts_ops_by_command_with_latency_and_batch_size(new_cluster: dict[str, str]) -> None:
    state = shardstate.connect(**new_cluster, shards=2)
    before = total_ops(state)
    for i in range(40):
        state.set("orders", f"o{i}", {"n": i})
    state.set_many("orders", {f"m{i}": i for i in range(10)})
    for _ in range(5):
        state.update("orders", "o1", [ops.increment("n")])
    for i in range(7):
        assert state.get("orders", f"o{i}") is not None
    assert state.delete("orders", "o39") == {"n": 39}
    delta = total_ops(state) - before
    assert delta["set"] == 50
    assert delta["update"] == 5
    assert delta["delete"] == 1
    assert delta["get"] >= 7  # the cluster's own reads count too
    assert delta["invalid"] == 0
    busy = max(state.shard_info(), key=lambda s: s["metrics"]["ops"].get("update", 0))["metrics"]
    assert busy["latency_ms"]["p50"] is not None
    assert 0 < busy["latency_ms"]["p50"] <= busy["latency_ms"]["p99"]
    assert busy["batch_size_mean"] >= 1
    assert busy["replication_lag_us"] is None  # no replicas on one node
    assert state.get("orders", "o1") == {"n": 6}

    # the console's cluster view shows the same figures
    console = state.start_console(port=0)
    view = httpx.get(
        console.url.rstrip("/") + "/api/v1/cluster",
        headers={"Authorization": f"Bearer {console.token}"},
        timeout=60,
    ).json()
    shown: Counter[str] = Counter()
    for shard in view["shards"]:
        shown.update(shard["metrics"]["ops"])
        assert set(shard["metrics"]) >= {"ops", "latency_ms", "batch_size_mean", "replication_lag_us"}
    assert shown["update"] - before["update"] == 5
    assert shown["set"] - before["set"] == 50


def test_subscriber_stats_show_event_lag_and_dead_letters(new_cluster: dict[str, str]) -> None:
    state = shardstate.connect(**new_cluster, shards=2)

    def handler(event: shardstate.StateEvent) -> None:
        if event.key.startswith("bad"):
            raise RuntimeError("this handler fails")

    state.on_change(handler, group_id="jobs", name="lagged", timeout=30)
    for i in range(12):
        state.set("jobs", f"j{i}", i)
    state.set("jobs", "bad1", 1)
    state.set("jobs", "bad2", 2)

    def settled() -> list[dict[str, Any]] | None:
        stats = ray.get(state.router.subscriber_stats.remote())
        lagged = sum(s["event_lag_s"]["count"] for s in stats)
        dead = sum(s["dead_letters"] for s in stats)
        return stats if lagged >= 14 and dead >= 2 else None

    stats = wait_for(settled)
    assert sum(s["dead_letters"] for s in stats) == 2
    assert {d.event.key for d in state.list_dead_letters()} == {"bad1", "bad2"}
    for sub in stats:
        lag = sub["event_lag_s"]
        if lag["count"]:
            assert 0 <= lag["p50"] <= lag["max"] < 120

    # a retried dead letter that fails again is a dead letter again, and no event lag
    lagged = sum(s["event_lag_s"]["count"] for s in stats)
    (letter,) = [d for d in state.list_dead_letters() if d.event.key == "bad1"]
    assert state.retry_dead_letter("lagged", letter.event.event_id) is False
    again = ray.get(state.router.subscriber_stats.remote())
    assert sum(s["dead_letters"] for s in again) == 3
    assert sum(s["event_lag_s"]["count"] for s in again) == lagged


def _has_metrics_export() -> bool:
    return importlib.util.find_spec("prometheus_client") is not None and (
        importlib.util.find_spec("ray.dashboard.modules.reporter") is not None
    )


@pytest.mark.timeout(400)
def test_the_metrics_reach_rays_prometheus_endpoint(tmp_path: Path) -> None:
    """A Ray of its own (a subprocess: the session Ray has no metrics export port) scraped over HTTP."""
    if not _has_metrics_export():
        if os.environ.get("CI"):
            pytest.fail("Ray's metrics export needs ray[default] (the dev extra installs it)")
        pytest.skip("Ray's metrics export needs ray[default]")
    cluster = f"m-{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    probe = Path(__file__).with_name("metrics_export_probe.py")
    done = subprocess.run(
        [sys.executable, str(probe), cluster],
        capture_output=True,
        text=True,
        timeout=360,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    series = [(name, labels) for name, labels in found["series"] if labels.get("cluster") == cluster]
    names = {name for name, _ in series}
    for wanted in (
        "ray_shardstate_ops_total",
        "ray_shardstate_batch_latency_ms_bucket",
        "ray_shardstate_batch_size_bucket",
        "ray_shardstate_event_lag_seconds_bucket",
        "ray_shardstate_dead_letters_total",
    ):
        assert wanted in names, sorted(names)
    commands = {labels["command"] for name, labels in series if name == "ray_shardstate_ops_total"}
    assert {"set", "update", "get"} <= commands
    shards = {labels["shard"] for name, labels in series if name == "ray_shardstate_batch_size_bucket"}
    assert shards <= {"0", "1"}
    (dead,) = [labels for name, labels in series if name == "ray_shardstate_dead_letters_total"]
    assert dead["trigger"] == "probe"
    assert dead["shard"] in {"0", "1"}
    # the cluster panel's figures come from the same tallies
    shown: Counter[str] = Counter()
    for figures in found["info"]:
        shown.update(figures["ops"])
    assert shown["set"] >= 22
    assert shown["update"] == 1
