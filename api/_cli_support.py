"""What the ``shardstate`` command line needs besides its commands: reaching Ray and the state
cluster without starting anything by accident, turning errors into exit codes, and printing.

Exit codes: 0 ok, 1 not found, 2 bad input, 3 unavailable (:func:`exit_code`).

Reaching Ray: a process already connected (tests running the CLI in-process) keeps its connection.
Otherwise ``--address`` or ``RAY_ADDRESS`` names the Ray cluster, else the running local one is
found as ``ray.init(address="auto")`` would; the address is probed first (a bare TCP connect with
a short timeout), because ``ray.init`` waits minutes for a GCS that does not answer. No Ray found
is :class:`~shardstate.Unavailable`; only ``shardstate console`` may start a local Ray.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import ray
import typer
from rich.console import Console

from shardstate._errors import ConflictError, InvalidInput, StateError, Unavailable, UpdateError
from shardstate.cluster.http_values import json_form, parse_json

OK, NOT_FOUND, BAD_INPUT, UNAVAILABLE = 0, 1, 2, 3
#: seconds the probe of a Ray address waits for a TCP connection
PROBE_TIMEOUT = 5.0
#: the width tables may take on stdout when it is not a terminal
PIPE_WIDTH = 4096


class NotFound(StateError):
    """The key, group item or dead letter the command names does not exist (exit code 1)."""


@dataclass
class Options:
    """The options every command shares (given before the command)."""

    address: str | None
    cluster: str
    json: bool

    def out(self) -> Console:
        """Where results go (stdout). When it is not a terminal (a pipe, a file), nothing is wrapped
        or cut to fit a width: tables get as wide as their cells."""
        if sys.stdout.isatty():
            return Console(highlight=False)
        return Console(soft_wrap=True, width=PIPE_WIDTH, highlight=False)

    def err(self) -> Console:
        """Where messages go (stderr); not wrapped when it is not a terminal."""
        if sys.stderr.isatty():
            return Console(stderr=True, highlight=False)
        return Console(stderr=True, soft_wrap=True, width=PIPE_WIDTH, highlight=False)


def exit_code(exc: BaseException) -> int:
    """The exit code of a command that raised ``exc``."""
    if isinstance(exc, NotFound):
        return NOT_FOUND
    if isinstance(exc, Unavailable):
        return UNAVAILABLE
    if isinstance(exc, (InvalidInput, UpdateError, ConflictError, StateError)):
        return BAD_INPUT
    return BAD_INPUT


@contextmanager
def reported(opts: Options) -> Iterator[None]:
    """Run a command's body: a :class:`StateError` becomes its message (or, with ``--json``, the
    error document ``{"error": {"type", "message", ...}}`` on stdout) and its exit code."""
    try:
        yield
    except StateError as exc:
        fail(opts, exc)


def fail(opts: Options, exc: StateError) -> NoReturn:
    """Report ``exc`` and exit with its code."""
    kind = type(exc).__name__
    if opts.json:
        body: dict[str, Any] = {"type": kind, "message": exc.message}
        if isinstance(exc, UpdateError):
            body.update(op_index=exc.op_index, code=exc.code)
        emit({"error": body})
    else:
        opts.err().print(f"[bold red]{kind}[/]: {exc.message}", markup=True, highlight=False)
    raise typer.Exit(exit_code(exc))


def emit(document: Any) -> None:
    """Print one JSON document (one line) on stdout; values without a JSON form as
    ``{"$type": "python", "repr": ...}``."""
    sys.stdout.write(json.dumps(document, ensure_ascii=False, default=_fallback) + "\n")
    sys.stdout.flush()


def _fallback(value: Any) -> Any:
    return json_form(value)


def show(value: Any, indent: int | None = 2) -> str:
    """A value as JSON text for people (non-JSON values in their ``$type`` form)."""
    return json.dumps(json_form(value), ensure_ascii=False, indent=indent, default=_fallback)


def json_argument(text: str, what: str) -> Any:
    """A command-line argument parsed as strict JSON (:class:`InvalidInput` if it is not)."""
    return parse_json(text.encode("utf-8", "surrogatepass"), what)


# -- reaching Ray and the cluster -------------------------------------------------------------------
def ensure_ray(address: str | None, may_start: bool = False) -> bool:
    """Connect this process to Ray (see the module docstring); True if it started a local Ray."""
    if ray.is_initialized():
        return False
    target = address or os.environ.get("RAY_ADDRESS") or None
    resolved = _resolve(target)
    if resolved is None:
        if not may_start:
            raise Unavailable(
                "no running Ray found on this machine: start one (`ray start --head`), or pass "
                "--address (or set RAY_ADDRESS) to reach a Ray cluster"
            )
        _init(None)
        return True
    if not resolved.startswith("ray://"):
        _probe(resolved)
    _init(resolved)
    return False


def _resolve(target: str | None) -> str | None:
    """The GCS address ``host:port`` of ``target`` (None: the running local Ray's, or None if none)."""
    try:
        from ray._private import services
    except ImportError:  # another Ray layout: let ray.init find it
        return target or "auto"
    if target is not None and target.startswith("ray://"):
        return target
    try:
        if target is None or target == "auto":
            return str(services.canonicalize_bootstrap_address_or_die("auto"))
        resolved = services.canonicalize_bootstrap_address(target)
    except ConnectionError:  # none (or several) running here
        return None
    except Exception as exc:
        raise Unavailable(f"cannot use the Ray address {target!r}: {exc}") from None
    return None if resolved is None else str(resolved)


def _probe(address: str) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise Unavailable(f"{address!r} is not a Ray address (host:port)")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT):
            pass
    except OSError as exc:
        raise Unavailable(f"no Ray cluster answers at {address}: {exc}") from None


def _init(address: str | None) -> None:
    try:
        if address is None:
            ray.init(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        else:
            ray.init(address=address, logging_level=logging.ERROR, log_to_driver=False)
    except Exception as exc:
        raise Unavailable(f"cannot connect to Ray at {address or 'a new local instance'}: {exc}") from None


def attach(opts: Options) -> Any:
    """The running state cluster ``opts.cluster`` (a :class:`~shardstate.StateClient`); never
    creates one: a cluster that is not running is :class:`~shardstate.Unavailable`."""
    from shardstate._connect import connect
    from shardstate.cluster.bootstrap import find_router

    ensure_ray(opts.address)
    if find_router(opts.cluster) is None:
        raise Unavailable(
            f"state cluster {opts.cluster!r} is not running on this Ray cluster (start it with "
            f"shardstate.connect(cluster={opts.cluster!r}) or `shardstate --cluster {opts.cluster} console`)"
        )
    return connect(cluster=opts.cluster)


def check_positive(value: int | None, name: str) -> None:
    """InvalidInput unless ``value`` is None or a positive int."""
    if value is not None and value <= 0:
        raise InvalidInput(f"{name} must be a positive number, got {value}")
