"""Multi-node: tasks on every node reach shards on every node over the shards' own connections.

Runs ``scenario.py`` in a process of its own (a ``ray.cluster_utils.Cluster`` cannot share a
process with the session's local Ray)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(600)


def test_tasks_on_every_node_reach_every_shard_over_its_connection() -> None:
    scenario = Path(__file__).with_name("scenario.py")
    done = subprocess.run(
        [sys.executable, str(scenario)], capture_output=True, text=True, timeout=540, check=False
    )
    assert done.returncode == 0, done.stderr[-4000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    nodes = 3
    assert len(set(found["shard_nodes"])) == nodes  # one shard per node
    assert len(set(found["task_nodes"])) == nodes  # one task per node
    assert set(found["task_nodes"]) == set(found["shard_nodes"])
    assert found["transports"] == ["socket"] * nodes
    # every shard answered every node's 20 updates over its connection, and no batch through Ray
    assert all(wire >= nodes * 20 for wire in found["wire"]), found
    assert found["batches"] == found["wire"], found
    assert found["values"] == [{f"node{n}": 20 for n in range(nodes)}] * nodes
