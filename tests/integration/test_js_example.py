"""The JavaScript example step (examples/js/example_step.mjs) against a live console, with node."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import shardstate
from shardstate import ops

pytestmark = pytest.mark.timeout(240)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "js"
STEPS = 5
PY_WRITES = 10


def node() -> str:
    found = shutil.which("node")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("node is missing (the CI set-up installs nodejs)")
        pytest.skip("node is not installed")
    return found


def lines(output: str, tag: str) -> list[Any]:
    return [json.loads(line[len(tag) + 1 :]) for line in output.splitlines() if line.startswith(tag + " ")]


def test_the_example_step_reads_updates_and_watches_while_python_writes(
    state: shardstate.StateClient,
) -> None:
    binary = node()
    console = state.start_console(port=0)
    group = f"js-{uuid.uuid4().hex[:8]}"
    state.set(group, "counter", {"count": 0, "log": []})
    env = {
        **os.environ,
        "SHARDSTATE_URL": console.url,
        "SHARDSTATE_TOKEN": console.token,
        "SHARDSTATE_GROUP": group,
        "SHARDSTATE_STEPS": str(STEPS),
        "SHARDSTATE_TIMEOUT": "60",
    }
    script = subprocess.Popen(
        [binary, str(EXAMPLES / "example_step.mjs")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )

    def python_writes() -> None:  # concurrently with the script, on the same key
        for i in range(PY_WRITES):
            state.update(group, "counter", [ops.increment("count"), ops.append("log", f"py-{i}")])
            time.sleep(0.02)

    writer = threading.Thread(target=python_writes)
    printed: list[str] = []

    def read_stdout() -> None:  # Python starts writing once the script has read the value
        assert script.stdout is not None
        for line in script.stdout:
            printed.append(line)
            if line.startswith("READ ") and not writer.is_alive():
                writer.start()

    reader = threading.Thread(target=read_stdout)
    reader.start()
    try:
        script.wait(timeout=150)
    finally:
        if script.poll() is None:
            script.kill()
        reader.join(30)
        writer.join(60)
    out = "".join(printed)
    assert script.stderr is not None
    err = script.stderr.read()
    assert script.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    (read,) = lines(out, "READ")
    assert read["value"] == {"count": 0, "log": []}

    # every op applied exactly once: both writers' increments and appends, each writer's in order
    final = state.get(group, "counter")
    assert final["count"] == STEPS + PY_WRITES
    expected = [f"js-{i}" for i in range(STEPS)] + [f"py-{i}" for i in range(PY_WRITES)]
    assert sorted(final["log"]) == sorted(expected)
    assert [e for e in final["log"] if e.startswith("js-")] == [f"js-{i}" for i in range(STEPS)]
    assert [e for e in final["log"] if e.startswith("py-")] == [f"py-{i}" for i in range(PY_WRITES)]
    assert final["meta"] == {"last_writer": "js", "step": STEPS - 1}

    (done,) = lines(out, "DONE")
    assert done["complete"] is True
    assert done["missing"] == []
    updated = lines(out, "UPDATED")
    assert len(updated) == STEPS
    versions = [u["version"] for u in updated]
    assert versions == sorted(versions)
    assert len(set(versions)) == STEPS

    events = lines(out, "EVENT")
    assert events, out
    assert all(e["scope"] == group and e["type"] == "state" for e in events)
    assert len({e["id"] for e in events}) == len(events)  # each event once
    seqs = [e["version"] for e in events]
    assert seqs == sorted(seqs)  # one group lives on one shard: its events come in commit order
    logs = [e["new_value"]["log"] for e in events if e["key"] == "counter"]
    assert any(all(f"js-{i}" in log for i in range(STEPS)) for log in logs)  # its own last update
    assert all(e["event_type"] in {"state:created", "state:updated"} for e in events)


def test_the_example_step_fails_with_a_typed_error_on_a_bad_token(state: shardstate.StateClient) -> None:
    binary = node()
    console = state.start_console(port=0)
    env = {**os.environ, "SHARDSTATE_URL": console.url, "SHARDSTATE_TOKEN": "not-the-token"}
    done = subprocess.run(
        [binary, str(EXAMPLES / "example_step.mjs")], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert "Unauthorized" in done.stderr
