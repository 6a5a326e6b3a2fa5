"""Pydantic models returned by the clients: :class:`SetResult` and :class:`StateItem`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

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
