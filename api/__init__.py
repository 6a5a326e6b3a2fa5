"""shardstate: persistent, shared key-value state for parallel work on a Ray cluster.

Groups → keys → values, hash-partitioned over Ray shard actors that each serialize every operation on
their groups, so atomic updates need no locks::

    import shardstate
    from shardstate import ops

    state = shardstate.connect()
    state.set("orders", "o-1", {"total": 10})
    state.update("orders", "o-1", [ops.increment("total", 5)])
    state.get("orders", "o-1")   # {"total": 15}
"""

from __future__ import annotations

from shardstate import ops
from shardstate._client import AsyncStateClient, StateClient
from shardstate._connect import connect, connect_async, shutdown
from shardstate._errors import (
    ConflictError,
    DecodeError,
    InvalidInput,
    NotFound,
    ReadOnly,
    StateError,
    Unavailable,
    UpdateError,
    ValueTooLarge,
)
from shardstate._models import (
    ConsoleInfo,
    DeadLetter,
    Entry,
    ItemPage,
    SetResult,
    StateEvent,
    StateItem,
    TriggerInfo,
    VersionedItem,
)
from shardstate._pipeline import AsyncPipeline, Pipeline
from shardstate._transfer import export, import_
from shardstate._triggers import WaitTimeout
from shardstate.cluster.bootstrap import ClusterMismatchWarning
from shardstate.ops import UpdateOp

__version__ = "0.1.0"

__all__ = [
    "AsyncPipeline",
    "AsyncStateClient",
    "ClusterMismatchWarning",
    "ConflictError",
    "ConsoleInfo",
    "DeadLetter",
    "DecodeError",
    "Entry",
    "InvalidInput",
    "ItemPage",
    "NotFound",
    "Pipeline",
    "ReadOnly",
    "SetResult",
    "StateClient",
    "StateError",
    "StateEvent",
    "StateItem",
    "TriggerInfo",
    "Unavailable",
    "UpdateError",
    "UpdateOp",
    "ValueTooLarge",
    "VersionedItem",
    "WaitTimeout",
    "__version__",
    "connect",
    "connect_async",
    "export",
    "import_",
    "ops",
    "shutdown",
]
