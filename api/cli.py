"""``shardstate``: the command line for a state cluster (typer + rich).

``shardstate [--address A] [--cluster C] [--json] COMMAND``; see ``shardstate --help``. The shared
options may also follow the command (``shardstate get orders o-1 --json``). Values and ops are JSON
(a string value is quoted: ``'"hello"'``); ``--json`` prints one JSON document per result (one per
event for ``watch``), and errors as ``{"error": {"type", "message"}}``.

Exit codes: 0 ok, 1 not found (a missing key or dead letter; a retried handler that failed
again), 2 bad input (nothing was changed), 3 unavailable (no Ray, or the state cluster is not
running). Commands never start Ray or a state cluster, except ``console``.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from shardstate import _transfer
from shardstate._cli_support import (
    NotFound,
    Options,
    attach,
    check_positive,
    emit,
    ensure_ray,
    json_argument,
    reported,
    show,
)
from shardstate._errors import InvalidInput
from shardstate._models import StateEvent
from shardstate._requests import delete_request
from shardstate.cluster.config import DEFAULT_CLUSTER
from shardstate.shards.validation import check_name, check_writable, decode_value

app = typer.Typer(
    name="shardstate",
    help="Browse and manage a shardstate cluster's state from the shell.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
triggers_app = typer.Typer(
    help="List triggers and dead letters (no subcommand); `retry` a dead letter.",
    invoke_without_command=True,
)
app.add_typer(triggers_app, name="triggers")

#: characters of a value shown in a table cell
PREVIEW = 120
#: the options every command shares, and whether each takes a value (see :func:`hoist_options`)
SHARED_OPTIONS = {"--json": False, "--address": True, "--cluster": True}


@app.callback()
def _shared(
    ctx: typer.Context,
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray cluster address (host:port). Default: RAY_ADDRESS, else the running local Ray."
        ),
    ] = None,
    cluster: Annotated[
        str, typer.Option(envvar="SHARDSTATE_CLUSTER", help="The state cluster's name.")
    ] = DEFAULT_CLUSTER,
    json_output: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    ctx.obj = Options(address=address, cluster=cluster, json=json_output)


def _opts(ctx: typer.Context) -> Options:
    opts: Options = ctx.obj
    return opts


def _preview(value: Any) -> str:
    text = show(value, indent=None)
    return text if len(text) <= PREVIEW else text[: PREVIEW - 1] + "…"


# -- the cluster ------------------------------------------------------------------------------------
@app.command()
def status(ctx: typer.Context) -> None:
    """The cluster: its shards (role, keys, node), groups, keys, triggers and dead letters."""
    opts = _opts(ctx)
    with reported(opts):
        state = attach(opts)
        shards = state.shard_info()
        counts = state.group_counts()
        triggers = state.list_triggers()
        letters = state.list_dead_letters()
    rows = [
        {
            "index": s.get("index"),
            "role": s.get("role"),
            "phase": s.get("phase"),
            "keys": s.get("keys"),
            "node": s.get("node_ip") or s.get("node_id"),
        }
        for s in shards
    ]
    doc = {
        "cluster": opts.cluster,
        "shards": rows,
        "groups": len(counts),
        "keys": sum(counts.values()),
        "triggers": len(triggers),
        "dead_letters": len(letters),
    }
    if opts.json:
        emit(doc)
        return
    out = opts.out()
    out.print(
        f"cluster {opts.cluster}: {len(rows)} shards, {doc['groups']} groups, {doc['keys']} keys, "
        f"{doc['triggers']} triggers, {doc['dead_letters']} dead letters"
    )
    table = Table("shard", "role", "phase", "keys", "node")
    for row in rows:
        table.add_row(*(str(row[c]) for c in ("index", "role", "phase", "keys", "node")))
    out.print(table)


@app.command()
def groups(ctx: typer.Context) -> None:
    """Every non-empty group with its item count."""
    opts = _opts(ctx)
    with reported(opts):
        counts = attach(opts).group_counts()
    if opts.json:
        emit({"groups": [{"group": g, "count": n} for g, n in counts.items()]})
        return
    table = Table("group", "count")
    for group_id, count in counts.items():
        table.add_row(group_id, str(count))
    opts.out().print(table)


# -- items ------------------------------------------------------------------------------------------
@app.command()
def get(ctx: typer.Context, group: str, key: str) -> None:
    """Print the value of KEY in GROUP (exit 1 if there is none)."""
    opts = _opts(ctx)
    with reported(opts):
        entry = attach(opts).get_entry(group, key)
        if entry is None:
            raise NotFound(f"{group!r} has no key {key!r}")
    if opts.json:
        emit({"group": group, "key": key, "value": entry.value, "version": entry.version})
    else:
        opts.out().print(show(entry.value), markup=False)


@app.command("set")
def set_(
    ctx: typer.Context,
    group: str,
    key: str,
    value: Annotated[str, typer.Argument(help="The value as JSON (a string is quoted: '\"text\"').")],
) -> None:
    """Store VALUE (JSON) under KEY in GROUP."""
    opts = _opts(ctx)
    with reported(opts):
        parsed = json_argument(value, "the value")
        result = attach(opts).set(group, key, parsed)
    _written(opts, group, key, result)


def _written(opts: Any, group: str, key: str, result: Any) -> None:
    """What ``set`` and ``update`` print: both values as JSON, or the key and its new value."""
    if opts.json:
        emit({"old_value": result.old_value, "new_value": result.new_value})
    else:
        opts.out().print(f"{group}/{key} = {_preview(result.new_value)}", markup=False)


@app.command()
def update(
    ctx: typer.Context,
    group: str,
    key: str,
    ops: Annotated[
        str, typer.Argument(help='The ops as JSON: [{"type": "increment", "path": "n", "by": 1}, ...]')
    ],
) -> None:
    """Apply update OPS (JSON) to KEY atomically: all or nothing."""
    opts = _opts(ctx)
    with reported(opts):
        parsed = json_argument(ops, "the ops")
        if isinstance(parsed, dict):
            parsed = parsed["ops"] if set(parsed) == {"ops"} else [parsed]
        if not isinstance(parsed, list):
            raise InvalidInput(f"the ops must be a JSON list of ops, got {type(parsed).__name__}")
        result = attach(opts).update(group, key, parsed)
    _written(opts, group, key, result)


@app.command()
def delete(ctx: typer.Context, group: str, key: str) -> None:
    """Remove KEY from GROUP (exit 1 if there is none)."""
    opts = _opts(ctx)
    with reported(opts):
        state = attach(opts)
        req = delete_request(group, key)
        raw = state._run(req._replace(decode=lambda payload: payload))  # None: there was no key
        if raw is None:
            raise NotFound(f"{group!r} has no key {key!r}")
        old = decode_value(raw)
    if opts.json:
        emit({"old_value": old})
    else:
        opts.out().print(f"deleted {group}/{key} (was {_preview(old)})", markup=False)


@app.command()
def clear(
    ctx: typer.Context,
    group: str,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Remove every item of GROUP (asks first, unless --yes)."""
    opts = _opts(ctx)
    with reported(opts):
        check_writable(group)
        state = attach(opts)
        if not yes:
            count = state.group_counts().get(group, 0)
            if not typer.confirm(f"Remove all {count} items of {group!r}?", default=False, err=True):
                if opts.json:
                    emit({"removed": 0, "cleared": False})
                else:
                    opts.err().print("Nothing removed.")
                return
        removed = state.clear(group)
    if opts.json:
        emit({"removed": removed, "cleared": True})
    else:
        opts.out().print(f"removed {removed} items from {group}", markup=False)


@app.command()
def items(
    ctx: typer.Context,
    group: str,
    limit: Annotated[int, typer.Option(help="Items on this page.")] = 100,
    cursor: Annotated[
        str | None, typer.Option(help="Where to go on: the next cursor a page printed.")
    ] = None,
    prefix: Annotated[str | None, typer.Option(help="Only keys that start with this.")] = None,
) -> None:
    """One page of GROUP's items in key order; prints the cursor of the next page."""
    opts = _opts(ctx)
    with reported(opts):
        page = attach(opts).page(group, limit=limit, cursor=cursor, prefix=prefix)
    if opts.json:
        rows = [{"key": i.key, "value": i.value, "version": i.version} for i in page.items]
        emit({"items": rows, "next_cursor": page.next_cursor})
        return
    out = opts.out()
    table = Table("key", "version", "value")
    for item in page.items:
        table.add_row(item.key, str(item.version), _preview(item.value))
    out.print(table)
    if page.next_cursor is None:
        out.print("(last page)")
    else:
        out.print(f"next page: --cursor {page.next_cursor}", markup=False)


@app.command()
def watch(
    ctx: typer.Context,
    group: str,
    key: Annotated[str | None, typer.Argument(help="Only this key's events.")] = None,
    count: Annotated[int | None, typer.Option(help="Stop after this many events.")] = None,
    timeout: Annotated[float | None, typer.Option(help="Stop after this many seconds.")] = None,
) -> None:
    """Print GROUP's (or KEY's) changes live, one line each, until Ctrl-C."""
    opts = _opts(ctx)
    with reported(opts):
        check_name(group, "group")
        if key is not None:
            check_name(key, "key")
        check_positive(count, "--count")
        if timeout is not None and not timeout > 0:
            raise InvalidInput(f"--timeout must be a positive number of seconds, got {timeout}")
        state = attach(opts)
        events = state.watch(group, timeout=timeout)
        if not opts.json:
            opts.err().print(f"watching {group}{'' if key is None else '/' + key} (Ctrl-C to stop)")
        seen = 0
        try:
            for event in events:
                if key is not None and event.key != key:
                    continue
                _print_event(opts, event)
                seen += 1
                if count is not None and seen >= count:
                    break
        except KeyboardInterrupt:
            pass
        finally:
            events.close()


def _print_event(opts: Options, event: StateEvent) -> None:
    if opts.json:
        emit({**event.to_wire(), "event_id": event.event_id, "seq": event.seq, "at": event.at})
        return
    when = time.strftime("%H:%M:%S", time.localtime(event.at)) if event.at else "--:--:--"
    change = f"{_preview(event.old_value)} -> {_preview(event.new_value)}"
    opts.out().print(f"{when} {event.event_type:<13} {event.group_id}/{event.key}  {change}", markup=False)
    sys.stdout.flush()


# -- export / import ----------------------------------------------------------------------------------
@contextmanager
def _progress(opts: Options, what: str) -> Iterator[_transfer.Progress | None]:
    """A rich progress bar on stderr (none with --json), as a ``progress(done, total)`` callback."""
    if opts.json:
        yield None
        return
    columns = (TextColumn(what), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=opts.err(), transient=False) as bar:
        task = bar.add_task(what, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance


@app.command("export")
def export_(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="The JSON Lines file to write.", dir_okay=False)],
    group: Annotated[list[str] | None, typer.Option(help="Only this group (repeatable).")] = None,
) -> None:
    """Write every entry (or those of --group) to FILE as JSON Lines."""
    opts = _opts(ctx)
    with reported(opts):
        state = attach(opts)
        with _progress(opts, "exporting") as progress:
            count = _transfer.export(file, groups=group or None, state=state, progress=progress)
    if opts.json:
        emit({"exported": count, "file": str(file)})
    else:
        opts.out().print(f"exported {count} entries to {file}", markup=False)


@app.command("import")
def import_(
    ctx: typer.Context,
    file: Annotated[
        Path, typer.Argument(help="A JSON Lines file (as export writes).", exists=True, dir_okay=False)
    ],
) -> None:
    """Set every entry of FILE (JSON Lines); the whole file is checked before anything is written."""
    opts = _opts(ctx)
    with reported(opts):
        state = attach(opts)
        with _progress(opts, "importing") as progress:
            count = _transfer.import_(file, state=state, progress=progress)
    if opts.json:
        emit({"imported": count, "file": str(file)})
    else:
        opts.out().print(f"imported {count} entries from {file}", markup=False)


# -- the console -----------------------------------------------------------------------------------
@app.command()
def console(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option(help="Where to listen; other than loopback, any machine can reach it.")
    ] = ("127.0.0.1"),
    port: Annotated[int, typer.Option(help="The port (0: any free one).")] = 8300,
) -> None:
    """Start (or find) the cluster's web console and HTTP API; print its URL and token.

    Starts the state cluster if it is not running, and a local Ray if none runs (this command then
    keeps running: the console lives as long as that Ray, until Ctrl-C).
    """
    from shardstate._connect import connect
    from shardstate.cluster.console import ConsoleWarning, is_loopback

    opts = _opts(ctx)
    with reported(opts):
        started = ensure_ray(opts.address, may_start=True)
        state = connect(cluster=opts.cluster)
        if not is_loopback(host):
            opts.err().print(
                f"[bold yellow]warning[/]: the console listens on {host}:{port}, reachable from other "
                "machines: anyone who can reach it needs only the token"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConsoleWarning)
            info = state.start_console(host, port)
    login = f"{info.url.rstrip('/')}/?token={info.token}"
    if opts.json:
        emit({"url": info.url, "token": info.token, "login_url": login})
    else:
        out = opts.out()
        out.print(f"console: {info.url}", markup=False)
        out.print(f"token:   {info.token}", markup=False)
        out.print(f"open:    {login}", markup=False)
    if started:
        opts.err().print("This command started Ray: the console runs until you press Ctrl-C.")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


# -- triggers --------------------------------------------------------------------------------------
@triggers_app.callback()
def triggers(ctx: typer.Context) -> None:
    """The registered triggers and the dead letters (events whose handler kept failing)."""
    if ctx.invoked_subcommand is not None:
        return
    opts = _opts(ctx)
    with reported(opts):
        state = attach(opts)
        registered = state.list_triggers()
        letters = state.list_dead_letters()
    if opts.json:
        emit(
            {
                "triggers": [t.model_dump() for t in registered],
                "dead_letters": [_letter_doc(d) for d in letters],
            }
        )
        return
    out = opts.out()
    if not registered:
        out.print("no triggers")
    else:
        table = Table("trigger", "group", "key", "handler", "condition", title="triggers")
        for t in registered:
            table.add_row(
                t.name, t.group_id or "*", t.key or "*", t.handler, "yes" if t.has_condition else ""
            )
        out.print(table)
    if not letters:
        out.print("no dead letters")
        return
    table = Table("trigger", "event_id", "group/key", "attempts", "error", title="dead letters")
    for d in letters:
        error = d.error if len(d.error) <= PREVIEW else d.error[: PREVIEW - 1] + "…"
        table.add_row(
            d.trigger, d.event.event_id, f"{d.event.group_id}/{d.event.key}", str(d.attempts), error
        )
    out.print(table)


def _letter_doc(letter: Any) -> dict[str, Any]:
    return {
        "trigger": letter.trigger,
        "event_id": letter.event.event_id,
        "group_id": letter.event.group_id,
        "key": letter.event.key,
        "event_type": letter.event.event_type,
        "error": letter.error,
        "attempts": letter.attempts,
        "at": letter.at,
    }


@triggers_app.command("retry")
def retry(ctx: typer.Context, trigger: str, event_id: str) -> None:
    """Run TRIGGER's handler again on its dead letter of EVENT_ID (exit 1 if there is none, or if
    the handler failed again: the dead letter then keeps the new error)."""
    opts = _opts(ctx)
    with reported(opts):
        state = attach(opts)
        if state.retry_dead_letter(trigger, event_id):
            if opts.json:
                emit({"retried": True})
            else:
                opts.out().print(f"retried {event_id} of {trigger}: the handler succeeded", markup=False)
            return
        still = [
            d for d in state.list_dead_letters() if d.trigger == trigger and d.event.event_id == event_id
        ]
        if not still:
            raise NotFound(f"no dead letter of trigger {trigger!r} for event {event_id!r}")
    letter = still[0]
    if opts.json:
        emit({"retried": False, "dead_letter": _letter_doc(letter)})
    else:
        opts.err().print(
            f"the handler failed again (attempts: {letter.attempts}): {letter.error}", markup=False
        )
    raise typer.Exit(1)


# -- the entry point ---------------------------------------------------------------------------------
def hoist_options(args: list[str]) -> list[str]:
    """Move the shared options (``--json``, ``--address A``, ``--cluster C``) given after the
    command to the front, where typer expects them; ``--`` ends the options."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest.extend(args[i:])
            break
        name = arg.split("=", 1)[0]
        takes_value = SHARED_OPTIONS.get(name)
        if takes_value is None:
            rest.append(arg)
        elif takes_value and "=" not in arg and i + 1 < len(args):
            front.extend(args[i : i + 2])
            i += 1
        else:
            front.append(arg)
        i += 1
    return front + rest


def main(argv: list[str] | None = None) -> None:
    """The ``shardstate`` console script."""
    args = hoist_options(list(sys.argv[1:] if argv is None else argv))
    app(args=args, prog_name="shardstate")


__all__ = ["app", "hoist_options", "main"]
