"""Pydantic models returned by the clients: :class:`SetResult` and :class:`StateItem`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class SetResult(BaseModel):
    """What a ``set`` or ``update`` did: the value before and after.

    Unpacks like a pair (``old, new = state.set(...)``) and indexes like a dict
    (``result["new_value"]``), for Motia-style code.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    old_value: Any = None
    new_value: Any = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        yield self.old_value
        yield self.new_value

    def __getitem__(self, name: str | int) -> Any:
        if name in ("old_value", 0):
            return self.old_value
        if name in ("new_value", 1):
            return self.new_value
        raise KeyError(name)

    def __len__(self) -> int:
        return 2


class StateItem(BaseModel):
    """One entry of a group: its ``key`` and ``value`` (what ``items()`` returns)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    key: str
    value: Any = None


class VersionedItem(BaseModel):
    """One entry of a page of a group: its ``key``, ``value`` and ``version`` (see :class:`ItemPage`)."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    key: str
    value: Any = None
    version: int


class ItemPage(BaseModel):
    """A page of a group's items in key order (what ``page()`` returns).

    ``next_cursor`` continues after this page (None: this was the last). Cursors stay valid while
    others write: across the pages of one scan, every key that existed for the whole scan is
    returned exactly once.
    """

    model_config = ConfigDict(frozen=True)

    items: list[VersionedItem]
    next_cursor: str | None = None


class ConsoleInfo(BaseModel):
    """Where the cluster's console (web console and HTTP API v1) listens, and its bearer token."""

    model_config = ConfigDict(frozen=True)

    url: str
    token: str


class Entry(BaseModel):
    """A value with its metadata (what ``get_entry`` returns).

    ``version`` is 1 when the key is created and grows by one per write; ``updated_at`` and
    ``expires_at`` are Unix times (``expires_at`` None: no TTL).
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    value: Any = None
    version: int
    updated_at: float
    expires_at: float | None = None


class StateEvent(BaseModel):
    """One committed change of state, as triggers, ``watch`` and ``wait_until`` see it.

    ``seq`` grows by one per event on the shard that owns the group; ``event_id`` (cluster, shard,
    seq) is the same every time the event is delivered again, so handlers can deduplicate.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    event_type: Literal["state:created", "state:updated", "state:deleted"]
    group_id: str
    key: str
    old_value: Any = None
    new_value: Any = None
    seq: int
    event_id: str
    shard: int = 0
    at: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        """The iii engine payload (``type``, ``event_type``, ``scope``, ``key``, ``old/new_value``)."""
        return {
            "type": "state",
            "event_type": self.event_type,
            "scope": self.group_id,
            "key": self.key,
            "old_value": self.old_value,
            "new_value": self.new_value,
        }


class DeadLetter(BaseModel):
    """An event whose handler kept failing: the trigger, the event, the last error, the attempts."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    trigger: str
    event: StateEvent
    error: str
    attempts: int
    at: float


class TriggerInfo(BaseModel):
    """A registered trigger (what ``list_triggers`` returns)."""

    model_config = ConfigDict(frozen=True)

    name: str
    group_id: str | None = None
    key: str | None = None
    has_condition: bool = False
    handler: str = ""
