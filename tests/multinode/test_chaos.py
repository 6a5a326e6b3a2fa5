"""A short seeded chaos run (``bench/chaos.py``; ``make chaos`` runs 20 schedules): a fault schedule
drawn from a fixed seed under a write load, then the full check. Runs in a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[2]


def test_a_seeded_chaos_schedule_loses_nothing() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.chaos", "--seed", "11", "--faults", "5", "--out", "/dev/null"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=840,
        check=False,
    )
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    runs = [row for row in rows if "seed" in row]
    assert len(runs) == 1, (done.stdout[-2000:], done.stderr[-4000:])
    run = runs[0]
    assert len(run["faults"]) == 5, run  # every fault of the schedule was applied
    assert run["ok"], run  # nothing lost, counters exact, histories in order, triggers complete
    assert run["acked"] > 0
    assert done.returncode == 0
