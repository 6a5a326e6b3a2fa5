"""The settings of one state cluster, fixed when it is created and shared by all its parts."""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass
from typing import Any

from shardstate._errors import InvalidInput
from shardstate.shards.engine import DEFAULT_OP_RETENTION
from shardstate.shards.storage import DURABILITY_LEVELS
from shardstate.shards.validation import DEFAULT_MAX_VALUE_SIZE

#: The Ray namespace every shardstate actor lives in, whatever the caller's namespace.
NAMESPACE = "shardstate"
DEFAULT_CLUSTER = "default"
DEFAULT_SHARDS = 4
DEFAULT_STORAGE = "~/.shardstate"
DEFAULT_DURABILITY = "os"
#: Where shards listen for clients' connections: loopback unless the cluster is told otherwise
DEFAULT_WIRE_HOST = "127.0.0.1"
#: A Ray resource only the head node has: the router and the subscribers ask for a sliver of it, so
#: the loss of a worker node never takes them (the head's loss is the GCS's: see deploy/README.md)
HEAD_RESOURCE = "node:__internal_head__"
#: How much of it each asks for
HEAD_SLIVER = 0.001
#: Backups per shard, at most (each on its own node)
MAX_REPLICAS = 4

_CLUSTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class ClusterConfig:
    """The settings of a state cluster.

    ``storage`` is the root directory (``~`` expands on each node); shard files live under
    ``<storage>/<name>/``. ``durability``: ``"os"`` (default; commit survives a process crash),
    ``"fsync"`` (survives power loss), ``"memory"`` (nothing on disk). ``op_retention``: seconds an
    idempotent write's result is remembered. ``wire_host``: where each shard listens for client
    connections: ``"127.0.0.1"`` (default: clients on the shard's own node use the connection,
    others the Ray path), ``"node"`` (the node's IP: every node's clients connect; for a multi-node
    cluster on a trusted network), or an explicit address. ``replicas``: backups per shard, each
    a shard actor on another node than its primary (``None``: chosen when the cluster is created,
    0 on a one-node Ray, 1 with more nodes; see :func:`resolve_replicas`).
    """

    name: str = DEFAULT_CLUSTER
    shards: int = DEFAULT_SHARDS
    storage: str = DEFAULT_STORAGE
    durability: str = DEFAULT_DURABILITY
    max_value_size: int = DEFAULT_MAX_VALUE_SIZE
    op_retention: float = DEFAULT_OP_RETENTION
    wire_host: str = DEFAULT_WIRE_HOST
    replicas: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _CLUSTER_NAME.match(self.name):
            raise InvalidInput(
                f"cluster name must match {_CLUSTER_NAME.pattern} (letters, digits, _ . -), got {self.name!r}"
            )
        if not isinstance(self.shards, int) or isinstance(self.shards, bool) or not 1 <= self.shards <= 1024:
            raise InvalidInput(f"shards must be an int from 1 to 1024, got {self.shards!r}")
        if not isinstance(self.storage, str) or not self.storage:
            raise InvalidInput(f"storage must be a non-empty str, got {self.storage!r}")
        if (
            not isinstance(self.max_value_size, int)
            or isinstance(self.max_value_size, bool)
            or self.max_value_size < 1
        ):
            raise InvalidInput(f"max_value_size must be a positive int, got {self.max_value_size!r}")
        if self.durability not in DURABILITY_LEVELS:
            raise InvalidInput(f"durability must be one of {DURABILITY_LEVELS}, got {self.durability!r}")
        if (
            not isinstance(self.op_retention, (int, float))
            or isinstance(self.op_retention, bool)
            or (not self.op_retention > 0)
        ):
            raise InvalidInput(
                f"op_retention must be a positive number of seconds, got {self.op_retention!r}"
            )

        if not isinstance(self.wire_host, str) or not self.wire_host or len(self.wire_host) > 255:
            raise InvalidInput(f"wire_host must be 'node' or an address, got {self.wire_host!r}")
        if self.replicas is not None and (
            not isinstance(self.replicas, int)
            or isinstance(self.replicas, bool)
            or not 0 <= self.replicas <= MAX_REPLICAS
        ):
            raise InvalidInput(f"replicas must be an int from 0 to {MAX_REPLICAS}, got {self.replicas!r}")

    def directory(self) -> str:
        """This cluster's storage directory (``~`` not yet expanded: each node expands its own)."""
        return os.path.join(self.storage, self.name)

    def router_name(self) -> str:
        """The Ray actor name of this cluster's router."""
        return router_name(self.name)

    def shard_name(self, index: int) -> str:
        """The Ray actor name of shard ``index`` (of a cluster without replicas)."""
        return f"{self.name}:shard:{index}"

    def member_name(self, index: int, member: int) -> str:
        """The Ray actor name of member ``member`` (a primary or a backup) of replicated shard ``index``."""
        return f"{self.name}:shard:{index}:{member}"

    def subscriber_name(self, index: int) -> str:
        """The Ray actor name of subscriber ``index``."""
        return f"{self.name}:subscriber:{index}"

    def to_dict(self) -> dict[str, Any]:
        """The settings as a plain dict."""
        return asdict(self)


def router_name(cluster: str) -> str:
    """The Ray actor name of cluster ``cluster``'s router."""
    return f"{cluster}:router"


def console_name(cluster: str) -> str:
    """The Ray actor name of cluster ``cluster``'s console (HTTP API and web console)."""
    return f"{cluster}:console"


def resolve_replicas(replicas: int | None, alive_nodes: int) -> int:
    """The replica count a new cluster gets: the one asked for, else 0 on a one-node Ray and 1 with
    more nodes (a lost node then costs no data)."""
    if replicas is not None:
        return replicas
    return 1 if alive_nodes > 1 else 0
