"""A fan-in merge workflow: N parallel Ray tasks merge their results into one group.

Each task computes something (here: a checksum over its own slice of numbers) and then, in ONE atomic
``update``, merges its result into a shared document and increments the document's ``done`` counter.
The driver watches the counter in state with a progress bar and prints a summary. The final count must
equal N exactly: no update is lost or applied twice, with no locks anywhere.

    python examples/fan_in.py              # 1000 tasks on a local, embedded Ray
    python examples/fan_in.py --tasks 5000 --shards 8
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
import uuid
from collections.abc import Callable

import ray
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

import shardstate
from shardstate import ops


@ray.remote(num_cpus=0.5)
def work(state: shardstate.StateClient, job: str, index: int) -> int:
    """One parallel step: compute a result, then merge it and count itself done, atomically."""
    digest = hashlib.sha256()
    for n in range(index * 200, (index + 1) * 200):
        digest.update(n.to_bytes(8, "little"))
    result = int.from_bytes(digest.digest()[:4], "little")
    state.update(
        job,
        "result",
        [ops.merge("fields", {f"task-{index:05d}": result}), ops.increment("done")],
    )
    return result


def finalizer(cluster: str, job: str) -> Callable[[shardstate.StateEvent], None]:
    """The merge step: runs (as a Ray task, via a state trigger) when the last task has landed."""

    def finalize(event: shardstate.StateEvent) -> None:
        started = time.time()
        fields = event.new_value["fields"]
        checksum = sum(fields.values()) % 2**32
        state = shardstate.connect(cluster=cluster)
        # every delivery counts itself (no op_id: a redelivery of the same event counts again) ...
        state.update(job, "deliveries", [ops.increment("runs")])
        # ... while the step's effect uses op_id = event_id: even if the event were delivered twice,
        # the step takes effect once
        state.update(
            job,
            "final",
            [
                ops.set("checksum", checksum),
                ops.set("last_write_at", event.at),
                ops.set("fired_at", started),
            ],
            op_id=event.event_id,
        )

    return finalize


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=1000, help="number of parallel tasks (default 1000)")
    parser.add_argument("--shards", type=int, default=4, help="shards of the demo cluster (default 4)")
    parser.add_argument("--cluster", default="fan-in-demo", help="state cluster name")
    parser.add_argument("--keep", action="store_true", help="leave the state cluster running at the end")
    parser.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="backups per shard on other nodes (default: 0 on a one-node Ray, 1 on more)",
    )
    args = parser.parse_args(argv)
    console = Console()

    with console.status("starting Ray and the state cluster..."):
        started = time.perf_counter()
        state = shardstate.connect(cluster=args.cluster, shards=args.shards, replicas=args.replicas)
        startup = time.perf_counter() - started
    job = f"merge:job-{uuid.uuid4().hex[:8]}"
    console.print(
        f"[bold]shardstate[/] cluster {state.cluster!r} ({state.config['shards']} shards) "
        f"ready in {startup:.1f}s; fan-in group [cyan]{job}[/]"
    )

    tasks = args.tasks
    state.on_change(
        finalizer(state.cluster, job),
        group_id=job,
        key="result",
        condition=lambda e: e.new_value is not None and e.new_value.get("done") == tasks,
        name=f"finalize:{job}",
    )

    began = time.perf_counter()
    refs = [work.remote(state, job, i) for i in range(args.tasks)]
    done = 0
    with Progress(
        TextColumn("[bold blue]merging"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("merge", total=args.tasks)
        while done < args.tasks:
            value = state.get(job, "result") or {}
            done = value.get("done", 0)
            progress.update(bar, completed=done)
            if done < args.tasks:
                time.sleep(0.05)
    elapsed = time.perf_counter() - began
    results = ray.get(refs)

    fired = state.wait_until(job, "final", lambda v: v is not None, timeout=60)
    runs = state.get(job, "deliveries")["runs"]
    final = state.get(job, "result")
    fields = final["fields"]
    expected_checksum = sum(results) % 2**32
    correct = (
        final["done"] == args.tasks
        and len(fields) == args.tasks
        and all(fields[f"task-{i:05d}"] == r for i, r in enumerate(results))
        and fired["checksum"] == expected_checksum
    )
    delay_ms = (fired["fired_at"] - fired["last_write_at"]) * 1000
    table = Table(title="fan-in summary", show_header=False)
    table.add_row("tasks", f"{args.tasks}")
    table.add_row("final count", f"{final['done']}")
    table.add_row("merged fields", f"{len(fields)}")
    table.add_row("elapsed", f"{elapsed:.2f}s")
    table.add_row("updates/s", f"{args.tasks / elapsed:,.0f}")
    table.add_row("merge trigger", f"ran {runs}x, {delay_ms:.0f} ms after the last write")
    table.add_row("exact", "[green]yes[/]" if correct else "[red]NO[/]")
    console.print(table)
    console.print(
        f"SUMMARY tasks={args.tasks} count={final['done']} fields={len(fields)} "
        f"elapsed={elapsed:.2f}s updates_per_s={args.tasks / elapsed:.0f} "
        f"trigger_runs={runs} trigger_after_ms={delay_ms:.0f} exact={correct}"
    )
    time.sleep(0.5)  # a duplicate delivery (at least once) would show up here as runs=2
    runs = state.get(job, "deliveries")["runs"]
    correct = correct and runs == 1
    state.remove_trigger(f"finalize:{job}")
    state.clear(job)
    if runs != 1:
        console.print(f"[red]the merge step ran {runs} times[/]")
    if not args.keep:
        shardstate.shutdown(args.cluster)
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
