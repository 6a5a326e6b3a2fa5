"""Run by ``test_metrics.py`` in a subprocess: its own Ray with the metrics export on, a small
cluster that runs ops and a trigger (one handler always fails: a dead letter), then the Prometheus
text of the node's metrics agent, reduced to shardstate's series. Prints one JSON line:
``{"series": [[name, labels], ...], "info": shard_info()[*]["metrics"]}``."""

from __future__ import annotations

import json
import re
import socket
import sys
import time
import urllib.request
from typing import Any

import ray

import shardstate
from shardstate import ops

SERIES = re.compile(r"^(ray_shardstate_[a-z_]+)\{([^}]*)\}\s")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')
WANTED = {
    "ray_shardstate_ops_total",
    "ray_shardstate_batch_latency_ms_count",
    "ray_shardstate_batch_size_count",
    "ray_shardstate_event_lag_seconds_count",
    "ray_shardstate_dead_letters_total",
}


def failing(event: Any) -> None:
    if event.key == "bad":
        raise RuntimeError("this handler fails")


def scrape(port: int) -> list[tuple[str, dict[str, str]]]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = []
    for line in text.splitlines():
        match = SERIES.match(line)
        if match:
            out.append((match[1], dict(LABEL.findall(match[2]))))
    return out


def main(cluster: str) -> None:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    ray.init(
        address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=port
    )
    state = shardstate.connect(cluster=cluster, shards=2)
    try:
        state.on_change(failing, group_id="m", name="probe", timeout=30)
        for i in range(20):
            state.set("m", f"k{i}", i)
        state.set("m", "counter", {"n": 0})
        state.update("m", "counter", [ops.increment("n")])
        state.set("m", "bad", 1)
        state.get("m", "k1")
        series: list[tuple[str, dict[str, str]]] = []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                series = scrape(port)
            except OSError:
                series = []
            if WANTED <= {name for name, _ in series}:
                break
            time.sleep(1)
        info = [shard["metrics"] for shard in state.shard_info()]
        print(json.dumps({"series": series, "info": info}))
    finally:
        shardstate.shutdown(cluster)
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
