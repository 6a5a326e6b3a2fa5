"""Recovery time of one shard holding N small entries (default 1,000,000), after a real SIGKILL.

Fills a 1-shard durable cluster through the bulk path, kills the shard's worker process, and
measures (a) wall time from the kill until a read answers again (Ray restart + load + first call)
and (b) the shard's own load time (open the SQLite file, read every row, rebuild the groups).
Writes ``bench/results/recovery.json``.

    python bench/recovery.py [--entries 1000000]
"""

from __future__ import annotations

import argparse
import os
import signal
import tempfile
import time

import ray

import shardstate
from bench._common import report
from shardstate._requests import set_request


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=int, default=1_000_000)
    parser.add_argument("--groups", type=int, default=1000)
    parser.add_argument("--out", default="bench/results/recovery.json")
    args = parser.parse_args(argv)
    ray.init(include_dashboard=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="shardstate-recovery-")
    state = shardstate.connect(cluster="bench-recovery", shards=1, storage=storage, retry_timeout=600)
    limit = state.config["max_value_size"]
    t0 = time.perf_counter()
    chunk = 20_000
    for start in range(0, args.entries, chunk):
        reqs = [
            set_request(f"group-{i % args.groups}", f"key-{i}", {"i": i}, limit)
            for i in range(start, min(args.entries, start + chunk))
        ]
        assert all(ok for ok, _ in state._run_many(reqs))
    fill = time.perf_counter() - t0
    info = state.shard_info()[0]
    assert info["keys"] == args.entries
    os.kill(info["pid"], signal.SIGKILL)
    killed = time.perf_counter()
    assert state.get("group-7", "key-7") == {"i": 7}  # retried until the shard is back
    back = time.perf_counter() - killed
    info = state.shard_info()[0]
    assert info["keys"] == args.entries
    assert info["restarted"]
    db = os.path.join(storage, "bench-recovery", "shard-0.db")
    rows = [
        {
            "entries": args.entries,
            "db MiB": round(os.path.getsize(db) / 2**20, 1),
            "fill s": round(fill, 1),
            "fill entries/s": round(args.entries / fill),
            "kill → first read s": round(back, 2),
            "shard load s": round(info["load_seconds"], 2),
        }
    ]
    report("shard recovery after SIGKILL", rows, args.out)
    shardstate.shutdown("bench-recovery")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
