"""The router actor: owns a cluster's shard map and exposes the whole API for handle-only callers.

Clients ask the router for the map once (``shard_map``) and then call shard actors directly: the
router is not on the data path. Callers that hold only the router's handle (another language's
worker, a quick script) can call ``set/get/...`` on it; it forwards each call to the owning shard.
It is an async actor, so forwarding many calls at once costs no threads.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from shardstate._models import SetResult, StateItem
from shardstate._requests import (
    GROUPS_COMMAND,
    Page,
    Request,
    clear_request,
    delete_request,
    get_request,
    items_request,
    list_request,
    merge_groups,
    next_page,
    set_request,
    unwrap,
    update_request,
)
from shardstate.cluster import metadata
from shardstate.cluster.config import HEAD_RESOURCE, HEAD_SLIVER, NAMESPACE, ClusterConfig, resolve_replicas
from shardstate.cluster.failover import Controller
from shardstate.cluster.placement import place_shard
from shardstate.cluster.slots import SlotMap
from shardstate.cluster.subscriber import subscriber_actor_class
from shardstate.shards.actor import SWEEP_INTERVAL, shard_actor_class
from shardstate.shards.storage import StorageError

MANIFEST = "cluster.json"
#: subscriber actors per cluster, at most (each follows every n-th shard; see subscriber_count).
#: One subscriber's event loop limits delivery to about 24,000 events/s on a 2-core machine; two
#: deliver about 60,000 (bench/triggers.py), more add processes but no speed there
SUBSCRIBERS = 2


def subscriber_count(shards: int) -> int:
    """How many subscriber actors a cluster of ``shards`` shards runs: one per shard, at most
    :data:`SUBSCRIBERS`."""
    return max(1, min(shards, SUBSCRIBERS))


#: seconds ``ready()`` waits for the shards to finish loading before it answers anyway (a shard
#: still loading then answers "loading, N%" and clients wait for it)
READY_WAIT = 5.0


class RouterActor:
    """Creates (or re-attaches to) a cluster's shard actors and holds the versioned slot map.

    The cluster's metadata lives in Ray's GCS (:mod:`shardstate.cluster.metadata`): its settings and
    id (made with the cluster), and per shard the node (id and IP) and file it keeps its data in. A
    re-created cluster reads it: its settings win over the requested ones, each shard is pinned to
    the node that has its file, and a shard whose file is gone, or is another cluster's, fails to
    start with a clear error instead of coming up empty or wrong. The router also mirrors the
    metadata to ``<storage>/<cluster>/cluster.json`` on its node, read only when the GCS knows
    nothing of the cluster (a cluster made by an older shardstate, or a fresh Ray instance without
    GCS fault tolerance).

    ``token``: the creating call's random token; ``ready(token)`` tells that caller it created
    the cluster (only it may clean up a failed start). The constructor never raises: a start-up
    error is kept and reported by ``ready()``.
    """

    def __init__(self, config: dict[str, Any], token: str | None = None) -> None:
        self.token = token
        self.config = ClusterConfig(**config)
        self.cluster_id: str | None = None
        self.map = SlotMap.initial(self.config.shards)
        self._plain: builtins.list[Any] = []
        #: a replicated cluster's failover controller (None: no replicas)
        self.controller: Controller | None = None
        #: per replicated shard the last primary handle seen (a client retries a dead one)
        self._last_primary: dict[int, Any] = {}
        self.subscribers: builtins.list[Any] = []
        self.start_error: str | None = None
        try:
            self._start(self.config)
        except Exception as exc:  # reported by ready(); the caller that created us cleans up
            self.start_error = f"{type(exc).__name__}: {exc}"

    @property
    def shards(self) -> builtins.list[Any]:
        """Per shard the actor that serves it: the shard, or a replicated shard's primary."""
        if self.controller is None:
            return self._plain
        out = []
        for i in range(self.config.shards):
            handle = self.controller.primary_handle(i)
            if handle is not None:
                self._last_primary[i] = handle
            out.append(self._last_primary.get(i))
        return out

    def _start(self, requested: ClusterConfig) -> None:
        if requested.replicas is None:  # a new cluster: chosen by the nodes there are now
            requested = replace(requested, replicas=resolve_replicas(None, len(_alive_nodes())))
        record, migrated = _cluster_record(requested)
        self.cluster_id = record["id"]
        metadata.secret(requested.name)  # made with the cluster, before any shard serves
        self.config = ClusterConfig(**{"replicas": 0, **record["config"], "name": requested.name})
        if self.config.replicas is None:  # recorded by a version without replicas
            self.config = replace(self.config, replicas=0)
        self.map = SlotMap.initial(self.config.shards)
        self.manifest_path: Path | None = None
        if self.config.durability != "memory":
            self.manifest_path = Path(os.path.expanduser(self.config.directory())) / MANIFEST
        if self.config.replicas:
            self.controller = Controller(
                self.config.name,
                self.config.shards,
                int(self.config.replicas),
                spawn=self._member,
                find=self._find_member,
                kill=_kill,
                alive_nodes=lambda: [node for node, _ip in _alive_nodes()],
                secret=metadata.secret(self.config.name),
                my_ip=ray.util.get_node_ip_address(),
                durable=self.config.durability != "memory",
            )
            self.controller.start()
        else:
            self._plain = [self._shard(i, migrated) for i in range(self.config.shards)]
        self.subscribers = [
            subscriber_actor_class.options(
                name=self.config.subscriber_name(i),
                namespace=NAMESPACE,
                lifetime="detached",
                get_if_exists=True,
                resources={HEAD_RESOURCE: HEAD_SLIVER},
            ).remote(self.config.to_dict(), i, subscriber_count(self.config.shards))
            for i in range(subscriber_count(self.config.shards))
        ]

    def _shard(self, index: int, migrated: dict[str, Any] | None) -> Any:
        """Shard ``index``'s actor: the running one (a restarted router), or a new one placed where
        its data is."""
        cfg = self.config
        try:
            return ray.get_actor(cfg.shard_name(index), namespace=NAMESPACE)
        except ValueError:
            pass
        durable = cfg.durability != "memory"
        known = metadata.shard_record(cfg.name, index) if durable else None
        if known is None and migrated is not None:
            ip = migrated.get("placement", {}).get(str(index))
            known = {"node_id": None, "node_ip": ip} if ip else None
        node_id, _ip = place_shard(index, known, _alive_nodes())
        return self._spawn(cfg.shard_name(index), index, node_id, not durable, migrated is not None, None)

    def _member(self, index: int, member: int, node_id: str) -> Any:
        """A new member actor of replicated shard ``index``, on node ``node_id`` (never elsewhere: a
        backup must not share its primary's node)."""
        return self._spawn(self.config.member_name(index, member), index, node_id, False, False, member)

    def _spawn(
        self, name: str, index: int, node_id: str, soft: bool, must_exist: bool, member: int | None
    ) -> Any:
        """A shard actor called ``name`` for shard ``index`` on node ``node_id`` (``soft``: or elsewhere;
        ``must_exist``: its file must be there; ``member``: its number in a replicated shard)."""
        cfg = self.config
        durable = cfg.durability != "memory"
        return shard_actor_class.options(
            name=name,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=soft),
        ).remote(
            cfg.name,
            index,
            self.map.slots_of(index),
            self.map.epoch,
            cfg.max_value_size,
            cfg.directory() if durable else None,
            cfg.durability,
            must_exist,
            cfg.op_retention,
            SWEEP_INTERVAL,
            cfg.subscriber_name(index % subscriber_count(cfg.shards)),
            self.cluster_id,
            cfg.wire_host,
            member,
        )

    def _find_member(self, index: int, member: int) -> Any:
        try:
            return ray.get_actor(self.config.member_name(index, member), namespace=NAMESPACE)
        except ValueError:
            return None

    # -- replication (the members' calls, and what operators see) ------------------------------
    def shard_handle(self, index: int) -> Any:
        """The actor serving shard ``index`` now (a replicated shard's primary; None: none yet)."""
        return self.shards[index]

    async def mark_in_sync(self, index: int, term: int, member: int) -> bool:
        """A primary of ``term`` brought ``member`` up to date (see ``Controller.mark_in_sync``; on
        a thread: the controller's lock must not stall the router's event loop)."""
        if self.controller is None:
            return False
        return await asyncio.to_thread(self.controller.mark_in_sync, index, term, member)

    async def drop_backup(self, index: int, term: int, member: int) -> bool:
        """A primary of ``term`` lost backup ``member`` (see ``Controller.drop_backup``)."""
        if self.controller is None:
            return False
        return await asyncio.to_thread(self.controller.drop_backup, index, term, member)

    async def replication(self) -> builtins.list[dict[str, Any]]:
        """Per shard its term (epoch), primary, in-sync backups, members and their last heartbeats
        (empty without replicas)."""
        return [] if self.controller is None else await asyncio.to_thread(self.controller.status)

    # -- cluster management -------------------------------------------------------------------
    async def ready(
        self, token: str | None = None, wait: float = READY_WAIT, limit: float = 100.0
    ) -> dict[str, Any]:
        """Wait until every shard opened its storage (and up to ``wait`` s until it loaded it).

        Returns ``{"settings", "created", "errors"}``: ``created`` is True only for the caller that
        created this cluster (``token`` matches); ``errors`` says which shards cannot start and why
        (also a shard that did not answer within ``limit`` s, e.g. pinned to a node that is gone).
        Shards still loading are no error: they answer "loading, N%" until they are done.
        """
        if self.start_error is not None:
            return self._answer(token, [f"state cluster {self.config.name!r}: {self.start_error}"])
        if self.controller is not None:
            return await self._ready_replicated(token, wait, limit)
        started = time.monotonic()
        pending = dict(enumerate(self.shards))
        errors: builtins.list[str] = []
        while pending:
            elapsed = time.monotonic() - started
            if elapsed > limit:
                late = (f"shard {i} did not answer within {limit:.0f}s{self._where(i)}" for i in pending)
                errors.extend(late)
                break
            statuses = await asyncio.gather(*(_status(s, limit - elapsed) for s in pending.values()))
            for index, status in zip(builtins.list(pending), statuses, strict=True):
                phase = status["phase"]
                if phase == "failed":
                    errors.append(f"shard {index}: {status['error']}")
                if phase in ("failed", "ready") or (phase == "loading" and elapsed > wait):
                    del pending[index]
            if pending:
                await asyncio.sleep(0.02)
        if not errors:
            self._write_manifest()
            for sub in self.subscribers:
                sub.ensure_running.remote()  # starts the pumps (they pick up unacknowledged events)
        return self._answer(token, errors)

    async def _ready_replicated(self, token: str | None, wait: float, limit: float) -> dict[str, Any]:
        """A replicated cluster is ready when every shard has a serving primary; its backups are
        waited for up to ``wait`` s more (until then, and with too few nodes, it runs degraded:
        the answer's ``warnings`` say so)."""
        assert self.controller is not None
        missing = await asyncio.to_thread(self.controller.wait_in_sync, max(wait, 1.0))
        errors: builtins.list[str] = []
        if any("no serving primary" in m for m in missing):
            more = await asyncio.to_thread(self.controller.wait_in_sync, limit)
            errors = [m for m in more if "no serving primary" in m]
            missing = more
        if not errors:
            for sub in self.subscribers:
                sub.ensure_running.remote()
        answer = self._answer(token, errors)
        answer["warnings"] = [m for m in missing if "no serving primary" not in m]
        return answer

    def _where(self, index: int) -> str:
        record = metadata.shard_record(self.config.name, index)
        if record is None:
            return ""
        return f" (its data is on node {record.get('node_id')} ({record.get('node_ip')}))"

    def _answer(self, token: str | None, errors: builtins.list[str]) -> dict[str, Any]:
        created = token is not None and token == self.token
        return {"settings": self.config.to_dict(), "created": created, "errors": errors}

    def _write_manifest(self) -> None:
        """Mirror the cluster's metadata to ``cluster.json`` on this node (for a GCS that lost it)."""
        if self.manifest_path is None:
            return
        placement = {str(i): metadata.shard_record(self.config.name, i) for i in range(self.config.shards)}
        body = {"id": self.cluster_id, "config": self.config.to_dict(), "placement": placement}
        try:
            self.manifest_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.manifest_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(body, indent=2))
            os.replace(tmp, self.manifest_path)
        except OSError:  # a mirror only: the GCS holds the truth
            pass

    def info(self) -> dict[str, Any]:
        """The router's process, the cluster's id and settings (for operators and tests)."""
        return {
            "pid": os.getpid(),
            "cluster_id": self.cluster_id,
            "settings": self.config.to_dict(),
            "start_error": self.start_error,
        }

    def settings(self) -> dict[str, Any]:
        """The cluster's settings (without waiting for the shards)."""
        return self.config.to_dict()

    def shard_map(self) -> tuple[int, tuple[int, ...], list[Any]]:
        """``(epoch, slot owners, shard handles)`` for clients that route by themselves."""
        return (self.map.epoch, self.map.owners, list(self.shards))

    async def shard_addresses(self, timeout: float = 10.0) -> tuple[int, list[tuple[str, int] | None]]:
        """``(epoch, per shard the (host, port) of its own connection)``, asked of each shard now
        (a restarted shard has a new port). None for a shard that has none (yet): loading,
        restarting, or not answering within ``timeout`` s; use its Ray handle meanwhile.

        Separate from :meth:`shard_map`, whose 3-tuple existing clients unpack."""
        epoch = self.map.epoch
        addresses = await asyncio.gather(*(_address(s, timeout) for s in self.shards))
        return (epoch, builtins.list(addresses))

    async def routes(self, timeout: float = 10.0) -> dict[str, Any]:
        """Everything a client routes by, in one call: ``epoch``, slot ``owners``, shard ``handles``
        and per shard its connection's ``endpoints`` ``(host, port, node IP, Unix socket
        path)`` (None while it has
        none: loading, restarting, not answering within ``timeout`` s; use its handle meanwhile)."""
        epoch, owners = self.map.epoch, self.map.owners
        if self.controller is not None:  # from the members' heartbeats: a lost primary costs no wait
            endpoints = [self.controller.primary_endpoint(i) for i in range(self.config.shards)]
        else:
            endpoints = await asyncio.gather(*(_endpoint(s, timeout) for s in self.shards))
        return {"epoch": epoch, "owners": owners, "handles": list(self.shards), "endpoints": endpoints}

    def wire_secret(self) -> bytes:
        """The cluster's secret, for clients opening shard connections. Handed out only through
        this Ray call (Ray's token authentication guards it) and kept only in the GCS."""
        return metadata.secret(self.config.name)

    async def shard_info(self) -> builtins.list[dict[str, Any]]:
        """Every shard's ``info()``, in shard order (a replicated shard: its primary's, with every
        member's under ``"members"``, and the shard's replica set under ``"replica_set"``)."""
        if self.controller is None:
            return list(await asyncio.gather(*(s.info.remote() for s in self.shards)))
        out = []
        for entry in await asyncio.to_thread(self.controller.status):
            index = entry["shard"]
            members = []
            for member in sorted(int(m) for m in entry["members"]):
                handle = self._find_member(index, member)
                info: dict[str, Any] = {"member": member, "error": "no actor"}
                if handle is not None:
                    try:
                        info = await asyncio.wait_for(handle.info.remote(), 5.0)
                    except Exception as exc:
                        info = {"member": member, "error": f"{type(exc).__name__}: {exc}"}
                members.append(info)
            primary = next((m for m in members if m.get("member") == entry["primary"]), {})
            out.append({**primary, "index": index, "members": members, "replica_set": entry})
        return out

    async def shutdown(self) -> int:
        """Stop every shard and subscriber actor; return how many shards were stopped.

        Shards first close their own connections (a client holding one gets ``Unavailable`` at
        once, as on the Ray path), then every actor is killed. The metadata stays (the cluster can
        be created again and finds its files), except a memory cluster's settings: it has no data
        to come back to (its incarnations stay, so event ids never repeat)."""
        members: builtins.list[Any] = []
        if self.controller is not None:
            self.controller.stop()
            for i in range(self.config.shards):
                members += [m.handle for m in self.controller.watches[i].members.values()]
        serving = [s for s in self.shards if s is not None]
        closing = [asyncio.ensure_future(_quietly(s.stop_serving.remote())) for s in serving]
        if closing:
            await asyncio.wait(closing, timeout=10)
        for actor in [*self.subscribers, *self._plain, *members]:
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
        if self.config.durability == "memory":
            metadata.forget_settings(self.config.name)
        return len(self.shards)

    async def subscribers_ready(self) -> list[int]:
        """Start (if needed) every subscriber's pumps and reload its triggers; wait for both."""
        await asyncio.gather(*(s.ensure_running.remote() for s in self.subscribers))
        return list(await asyncio.gather(*(s.reload_triggers.remote() for s in self.subscribers)))

    async def subscriber_stats(self) -> list[dict[str, Any]]:
        """Every subscriber's counters."""
        return list(await asyncio.gather(*(s.stats.remote() for s in self.subscribers)))

    # -- the API, forwarded -------------------------------------------------------------------
    async def _forward(self, req: Request) -> Any:
        value = await self._forward_page(req)
        if not isinstance(value, Page):
            return value
        rows = builtins.list(value.rows)  # a large group answers in pages: fetch the rest
        while isinstance(value, Page):
            value = await self._forward_page(next_page(value))
            rows.extend(value.rows if isinstance(value, Page) else value)
        return rows

    async def _forward_page(self, req: Request) -> Any:
        shard = self.shards[self.map.shard_of(req.group_id)]
        (result,) = await shard.execute.remote([req.cmd])
        return req.decode(unwrap(result))

    async def set(self, group_id: str, key: str, value: Any, returning: str = "both") -> SetResult | None:
        """See ``StateClient.set``."""
        req = set_request(group_id, key, value, self.config.max_value_size, returning=returning)
        return await self._forward(req)  # type: ignore[no-any-return]

    async def get(self, group_id: str, key: str) -> Any:
        """See ``StateClient.get``."""
        return await self._forward(get_request(group_id, key))

    async def delete(self, group_id: str, key: str) -> Any:
        """See ``StateClient.delete``."""
        return await self._forward(delete_request(group_id, key))

    async def list(self, group_id: str) -> builtins.list[Any]:
        """See ``StateClient.list``."""
        return await self._forward(list_request(group_id))  # type: ignore[no-any-return]

    async def items(self, group_id: str) -> builtins.list[StateItem]:
        """See ``StateClient.items``."""
        return await self._forward(items_request(group_id))  # type: ignore[no-any-return]

    async def clear(self, group_id: str) -> int:
        """See ``StateClient.clear``."""
        return await self._forward(clear_request(group_id))  # type: ignore[no-any-return]

    async def update(
        self, group_id: str, key: str, ops: Sequence[Any], returning: str = "both"
    ) -> SetResult | None:
        """See ``StateClient.update``."""
        return await self._forward(update_request(group_id, key, ops, returning=returning))  # type: ignore[no-any-return]

    async def list_groups(self) -> builtins.list[str]:
        """See ``StateClient.list_groups``."""
        results = await asyncio.gather(*(s.execute.remote([GROUPS_COMMAND]) for s in self.shards))
        return merge_groups([r[0] for r in results])


#: The Ray actor class (async: forwarding calls interleave while shards work).
router_actor_class = ray.remote(num_cpus=0)(RouterActor)


def _cluster_record(requested: ClusterConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The cluster's metadata record, made on first start; and the manifest it came from, if any.

    The GCS holds the truth. If it knows nothing of the cluster, a ``cluster.json`` in the storage
    directory (an older shardstate's manifest, or this one's mirror after a fresh Ray instance) is
    read once and moved into the GCS; else the cluster is new.
    """
    record = metadata.cluster_record(requested.name)
    if record is not None:
        return record, None
    manifest = None
    if requested.durability != "memory":
        manifest = _read_manifest(Path(os.path.expanduser(requested.directory())) / MANIFEST)
    if manifest is None:
        return metadata.create(requested.name, requested.to_dict())[0], None
    kept = {k: v for k, v in manifest["config"].items() if k not in ("name", "storage")}
    config = {**requested.to_dict(), **kept}
    record, created = metadata.create(requested.name, config, manifest.get("id"))
    if created and isinstance(manifest.get("placement"), dict):
        for index, where in manifest["placement"].items():
            if isinstance(where, dict) and where.get("path"):  # this version's mirror: files stamped
                metadata.record_shard(
                    requested.name, int(index), where.get("node_id"), where.get("node_ip"), where["path"]
                )
    if manifest.get("id") is not None:
        return record, None  # a mirror of this version: the shards' records say what must exist
    return record, manifest


def _read_manifest(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
        manifest["config"]["shards"]  # noqa: B018 - must be there
        return manifest
    except (ValueError, KeyError, TypeError) as exc:
        raise StorageError(f"cluster manifest {path} is unreadable: {exc}") from None


async def _status(shard: Any, timeout: float) -> dict[str, Any]:
    """A shard's ``status()``; ``{"phase": "restarting"}`` if it died meanwhile or did not answer."""
    try:
        return await asyncio.wait_for(shard.status.remote(), max(timeout, 0.01))  # type: ignore[no-any-return]
    except (asyncio.TimeoutError, RayActorError):
        return {"phase": "restarting"}


async def _address(shard: Any, timeout: float) -> tuple[str, int] | None:
    """A shard's ``address()``; None if it died meanwhile or did not answer."""
    try:
        address = await asyncio.wait_for(shard.address.remote(), timeout)
    except (asyncio.TimeoutError, RayActorError):
        return None
    return None if address is None else (str(address[0]), int(address[1]))


async def _quietly(ref: Any) -> None:
    try:
        await ref
    except Exception:
        pass


async def _endpoint(shard: Any, timeout: float) -> tuple[str, int, str | None, str | None] | None:
    """A shard's ``endpoint()``; None if it died meanwhile or did not answer."""
    try:
        found = await asyncio.wait_for(shard.endpoint.remote(), timeout)
    except (asyncio.TimeoutError, RayActorError):
        return None
    return None if found is None else (str(found[0]), int(found[1]), found[2], found[3])


def _kill(handle: Any) -> None:
    ray.kill(handle, no_restart=True)


def _alive_nodes() -> builtins.list[tuple[str, str]]:
    """``(node id, node IP)`` of every alive Ray node, sorted."""
    return sorted((n["NodeID"], n["NodeManagerAddress"]) for n in ray.nodes() if n.get("Alive"))
