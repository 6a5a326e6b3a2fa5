"""Starting, finding and stopping a state cluster on Ray.

``ensure_ray`` joins the running Ray cluster or starts a local one; ``open_cluster`` creates the named
cluster's router (which creates the shards) or attaches to the existing one, atomically through Ray's
``get_if_exists``; ``stop_cluster`` kills its actors. All actors live in the :data:`NAMESPACE`
namespace, detached, so they outlive the driver that created them.
"""

from __future__ import annotations

import time
import uuid
import warnings
from typing import Any

import ray
from ray.exceptions import ActorUnavailableError

from shardstate._errors import Unavailable
from shardstate.cluster.config import HEAD_RESOURCE, HEAD_SLIVER, NAMESPACE, ClusterConfig, router_name
from shardstate.cluster.router import router_actor_class, subscriber_count


class ClusterMismatchWarning(UserWarning):
    """``connect()`` asked for settings that differ from the existing cluster's (which win)."""


class DegradedWarning(UserWarning):
    """The cluster serves, but some shard has fewer backups in sync than its ``replicas`` (too few
    nodes, or a backup still catching up): losing a node now could lose acknowledged writes."""


def ensure_ray(address: str | None = None) -> None:
    """Make sure this process is connected to Ray.

    With ``address=None``: join the cluster named by ``RAY_ADDRESS`` or the latest local one, else
    start a local Ray instance (the embedded default). Raises :class:`Unavailable` if it cannot.
    """
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, ignore_reinit_error=True)
    except Exception as exc:  # ConnectionError, RuntimeError, TimeoutError...
        raise Unavailable(f"cannot reach or start Ray (address={address!r}): {exc}") from exc


def find_router(cluster: str) -> Any | None:
    """The router handle of ``cluster``, or None if no such cluster is running."""
    try:
        return ray.get_actor(router_name(cluster), namespace=NAMESPACE)
    except ValueError:
        return None


def open_cluster(requested: dict[str, Any], *, timeout: float = 120.0) -> tuple[Any, dict[str, Any]]:
    """Create-or-attach the cluster described by ``requested`` (its ``name`` plus explicit settings).

    Returns ``(router handle, the cluster's actual settings)``. Settings the caller gave that differ
    from an existing cluster's are reported with a :class:`ClusterMismatchWarning`; the existing
    cluster keeps its own.

    Only the call that created the cluster (its random token reached the router first) cleans up
    a failed start (kills the router and shards it made); a call that attaches to a running
    cluster never kills anything: it raises :class:`Unavailable` and the cluster keeps running.
    Shards still loading their storage are no failure (they answer "loading, N%" meanwhile).
    """
    config = ClusterConfig(**requested)  # checks the values even when attaching
    token = uuid.uuid4().hex
    try:
        router = router_actor_class.options(
            name=config.router_name(),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            max_restarts=-1,
            resources={HEAD_RESOURCE: HEAD_SLIVER},  # on the head: a lost worker node never takes it
        ).remote(config.to_dict(), token)
        answer: dict[str, Any] = ray.get(
            router.ready.remote(token, limit=max(timeout * 0.8, 1.0)), timeout=timeout
        )
    except Exception as exc:  # no answer: leave the cluster alone (it may be restarting)
        raise Unavailable(f"state cluster {config.name!r} did not answer: {_reason(exc)}") from exc
    if answer["errors"]:
        problems = "; ".join(answer["errors"])
        if answer["created"]:
            _discard(ClusterConfig(**answer["settings"]))  # our own half-start: nobody else may attach to it
            raise Unavailable(f"state cluster {config.name!r} did not start: {problems}")
        raise Unavailable(
            f"state cluster {config.name!r} is running but cannot serve: {problems} (it keeps running; "
            f"after fixing the cause, shardstate.shutdown({config.name!r}) and connect again)"
        )
    for problem in answer.get("warnings", []):
        warnings.warn(f"state cluster {config.name!r} is degraded: {problem}", DegradedWarning, stacklevel=3)
    actual: dict[str, Any] = answer["settings"]
    for field, value in requested.items():
        if actual.get(field) != value:
            warnings.warn(
                f"state cluster {config.name!r} already exists with {field}={actual.get(field)!r}; "
                f"ignoring {field}={value!r}",
                ClusterMismatchWarning,
                stacklevel=3,
            )
    return router, actual


def stop_cluster(cluster: str, *, timeout: float = 60.0) -> bool:
    """Kill ``cluster``'s shard actors and router. Returns False if it was not running."""
    if not ray.is_initialized():
        return False
    router = find_router(cluster)
    if router is None:
        return False
    from shardstate.cluster.console import stop_console

    stop_console(cluster)
    try:
        ray.get(router.shutdown.remote(), timeout=timeout)
    finally:
        ray.kill(router, no_restart=True)
    return True


def cluster_settings(router: Any, timeout: float = 120.0) -> dict[str, Any]:
    """The settings of the cluster behind ``router``."""
    started = time.monotonic()
    while True:
        try:
            return ray.get(router.settings.remote(), timeout=timeout)  # type: ignore[no-any-return]
        except ActorUnavailableError as exc:  # restarting (its node was lost): it comes back
            if time.monotonic() - started > timeout:
                raise Unavailable(f"state cluster did not answer: {exc}") from exc
            time.sleep(0.1)
        except Exception as exc:
            raise Unavailable(f"state cluster did not answer: {exc}") from exc


def _discard(config: ClusterConfig) -> None:
    """Kill whatever actors a failed start left behind (router and shards), ignoring errors."""
    names = [config.router_name()]
    names += [config.subscriber_name(i) for i in range(subscriber_count(config.shards))]
    names += [config.shard_name(i) for i in range(config.shards)]
    try:  # a replicated cluster's members (numbered as they were made)
        prefix = f"{config.name}:shard:"
        listed = ray.util.list_named_actors(all_namespaces=True)
        names += [
            a["name"] for a in listed if a.get("namespace") == NAMESPACE and a["name"].startswith(prefix)
        ]
    except Exception:
        pass
    for name in names:
        try:
            ray.kill(ray.get_actor(name, namespace=NAMESPACE), no_restart=True)
        except Exception:
            pass


def _reason(exc: BaseException) -> str:
    """The most useful line of a start-up failure (Ray wraps the actor's own error in a long text)."""
    text = str(exc)
    for marker in ("StorageError: ", "InvalidInput: "):
        if marker in text:
            return text[text.rindex(marker) :].splitlines()[0]
    return text
