"""The cluster's console: one Ray actor per cluster serving the HTTP API v1 and the web console.

The actor (named ``<cluster>:console``, detached, restarted by Ray if its process dies, on the head
node) binds its socket in its constructor, so a port that is taken fails the start at once, then
runs uvicorn with the FastAPI app of :mod:`shardstate.cluster.http_api` on an event loop thread of
its own. That loop holds one async state client of the cluster: the console is a client like any
other (coalesced lanes to each shard's own connection, pushed events for the SSE stream).

The bearer token is made once per cluster and kept in the cluster's metadata (GCS), so a restarted
console, the CLI and ``start_console()`` all see the same one. The console binds ``127.0.0.1``
unless told otherwise; another address is logged as a warning.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import threading
import warnings
from typing import Any

import ray

from shardstate._errors import InvalidInput, Unavailable
from shardstate._models import ConsoleInfo
from shardstate.cluster import metadata
from shardstate.cluster.config import HEAD_RESOURCE, HEAD_SLIVER, NAMESPACE, console_name

log = logging.getLogger("shardstate.console")

#: seconds the console has to start serving
START_TIMEOUT = 60.0
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class ConsoleWarning(UserWarning):
    """The console was asked to listen on an address other machines can reach."""


def check_address(host: Any, port: Any) -> None:
    """InvalidInput unless ``host`` is a host name or IP address and ``port`` an int in 0..65535."""
    if not isinstance(host, str) or not host or len(host) > 255 or any(c.isspace() for c in host):
        raise InvalidInput(f"host must be a host name or IP address, got {host!r}")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise InvalidInput(f"port must be an int from 0 to 65535 (0: any free port), got {port!r}")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable only from this machine."""
    if host in LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


class ConsoleActor:
    """Serves the cluster's HTTP API and web console (see the module's docstring)."""

    def __init__(self, cluster: str, host: str, port: int) -> None:
        import uvicorn

        from shardstate._connect import connect_async
        from shardstate.cluster.http_api import build_app

        check_address(host, port)
        if not is_loopback(host):
            log.warning("the shardstate console listens on %s:%s, reachable from other machines", host, port)
        self.cluster = cluster
        self.host = host
        self.token = metadata.console_token(cluster)
        self.sock = _bind(host, port)
        self.port = self.sock.getsockname()[1]
        self._started = threading.Event()
        self._error: BaseException | None = None

        async def serve() -> None:
            client = await connect_async(cluster=cluster)
            max_value_size = int(client.config.get("max_value_size") or 16 * 1024 * 1024)
            app = build_app(client, self.token, max_value_size)
            config = uvicorn.Config(
                app,
                log_level="warning",
                lifespan="off",
                access_log=False,
                timeout_graceful_shutdown=1,
                limit_concurrency=1000,
                h11_max_incomplete_event_size=64 * 1024,
            )
            self.server = uvicorn.Server(config)
            waiter = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
            for _ in range(int(START_TIMEOUT * 100)):  # uvicorn offers a flag, not an event
                if self.server.started or waiter.done():
                    break
                await asyncio.sleep(0.01)
            self._started.set()
            await waiter

        def run() -> None:
            try:
                asyncio.run(serve())
            except BaseException as exc:  # reported by the constructor, or in info()
                self._error = exc
            finally:
                self._started.set()

        threading.Thread(target=run, name="console", daemon=True).start()
        if not self._started.wait(START_TIMEOUT) or self._error is not None:
            raise Unavailable(f"the console did not start: {self._error!r}")

    def info(self) -> dict[str, Any]:
        """``url``, ``token``, where it listens, and its process."""
        if self._error is not None:
            raise Unavailable(f"the console stopped: {self._error!r}")
        shown = self.host
        if not is_loopback(shown) and ipaddress_unspecified(shown):
            shown = ray.util.get_node_ip_address()
        if ":" in shown:
            shown = f"[{shown}]"
        return {
            "url": f"http://{shown}:{self.port}/",
            "token": self.token,
            "host": self.host,
            "port": self.port,
            "pid": os.getpid(),
        }


def ipaddress_unspecified(host: str) -> bool:
    """Whether ``host`` is a wildcard address (``0.0.0.0``, ``::``)."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def find_console(cluster: str) -> Any | None:
    """The console actor of ``cluster``, or None if it has none."""
    try:
        return ray.get_actor(console_name(cluster), namespace=NAMESPACE)
    except ValueError:
        return None


def start_console(cluster: str, host: str = "127.0.0.1", port: int = 8300) -> ConsoleInfo:
    """Start ``cluster``'s console unless it runs; return its URL and token (see the module).

    A console that runs already is returned as it is (its own host and port). ``InvalidInput`` for
    a bad host or port, ``Unavailable`` if it cannot listen there (e.g. the port is taken).
    """
    check_address(host, port)
    actor: Any = find_console(cluster)
    if actor is None:
        if not is_loopback(host):
            warnings.warn(
                f"the console will listen on {host}:{port}, reachable from other machines: anyone "
                "who can reach it needs only the token",
                ConsoleWarning,
                stacklevel=3,
            )
        actor = (
            ray.remote(ConsoleActor)
            .options(
                name=console_name(cluster),
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                max_restarts=-1,
                num_cpus=0,
                resources={HEAD_RESOURCE: HEAD_SLIVER},
            )
            .remote(cluster, host, port)
        )
    try:
        info: Any = ray.get(actor.info.remote(), timeout=START_TIMEOUT + 10)
    except Exception as exc:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:
            pass
        raise Unavailable(f"the console could not start on {host}:{port}: {_reason(exc)}") from exc
    return ConsoleInfo(url=info["url"], token=info["token"])


def stop_console(cluster: str) -> bool:
    """Kill ``cluster``'s console; False if it had none."""
    actor = find_console(cluster)
    if actor is None:
        return False
    ray.kill(actor, no_restart=True)
    return True


def _reason(exc: BaseException) -> str:
    text = str(exc)
    for marker in ("OSError: ", "Unavailable: ", "InvalidInput: "):
        if marker in text:
            return text[text.rindex(marker) :].splitlines()[0]
    return text.splitlines()[0] if text else type(exc).__name__
