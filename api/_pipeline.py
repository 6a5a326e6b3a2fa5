"""Explicit pipelines: queue many operations, send them in one actor call per shard.

::

    with state.pipeline() as p:
        p.update("orders", "o-1", [ops.increment("n")])
        p.get("orders", "o-2")
    p.results          # one entry per queued call, in order: its value, or its StateError

``async with state.pipeline() as p`` does the same with the async client. Bad arguments raise when
the call is queued; errors of the shard (an ``UpdateError``, a ``ConflictError``) come back in
``results`` for that call only.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from shardstate._errors import InvalidInput, StateError
from shardstate._requests import (
    Request,
    clear_request,
    delete_request,
    entry_request,
    get_request,
    items_request,
    list_request,
    set_request,
    update_request,
)

if TYPE_CHECKING:
    from shardstate._client import AsyncStateClient, StateClient


class _Queue:
    """The queueing half shared by both pipelines (each method returns the pipeline, for chaining)."""

    def __init__(self, max_value_size: int) -> None:
        self._max = max_value_size
        self._reqs: builtins.list[Request] = []
        self.results: builtins.list[Any] | None = None

    def _add(self, req: Request) -> Any:
        self._reqs.append(req)
        return self

    def set(self, group_id: str, key: str, value: Any, **options: Any) -> Any:
        """Queue a ``set`` (options: ttl, expected_version, op_id, returning)."""
        return self._add(set_request(group_id, key, value, self._max, **_options(options, _WRITE)))

    def get(self, group_id: str, key: str) -> Any:
        """Queue a ``get``."""
        return self._add(get_request(group_id, key))

    def get_entry(self, group_id: str, key: str) -> Any:
        """Queue a ``get_entry``."""
        return self._add(entry_request(group_id, key))

    def delete(self, group_id: str, key: str, **options: Any) -> Any:
        """Queue a ``delete`` (options: expected_version, op_id)."""
        return self._add(delete_request(group_id, key, **_options(options, _DELETE)))

    def list(self, group_id: str) -> Any:
        """Queue a ``list``."""
        return self._add(list_request(group_id))

    def items(self, group_id: str) -> Any:
        """Queue an ``items``."""
        return self._add(items_request(group_id))

    def clear(self, group_id: str) -> Any:
        """Queue a ``clear``."""
        return self._add(clear_request(group_id))

    def update(self, group_id: str, key: str, ops: Sequence[Any], **options: Any) -> Any:
        """Queue an ``update`` (options: ttl, expected_version, op_id, returning)."""
        return self._add(update_request(group_id, key, ops, **_options(options, _WRITE)))

    def __len__(self) -> int:
        return len(self._reqs)

    def _take(self) -> builtins.list[Request]:
        reqs, self._reqs = self._reqs, []
        return reqs


_WRITE = frozenset({"ttl", "expected_version", "op_id", "returning"})
_DELETE = frozenset({"expected_version", "op_id"})


def _options(options: dict[str, Any], allowed: frozenset[str]) -> dict[str, Any]:
    """The options of a queued write, checked: anything else is :class:`InvalidInput`."""
    unknown = set(options) - allowed
    if unknown:
        raise InvalidInput(f"unknown option(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    return options


def outcomes(pairs: Sequence[tuple[bool, Any]]) -> builtins.list[Any]:
    """``(ok, value)`` pairs as a results list: the value, or the StateError."""
    return [value for _ok, value in pairs]


def first_error(pairs: Sequence[tuple[bool, Any]]) -> builtins.list[Any]:
    """The values of ``pairs``; raise the first error if there is one (for the bulk helpers)."""
    for ok, value in pairs:
        if not ok and isinstance(value, StateError):
            raise value
    return [value for _ok, value in pairs]


class Pipeline(_Queue):
    """A batch of calls for :class:`StateClient`: ``execute()`` (or leaving the ``with``) sends them."""

    def __init__(self, client: StateClient) -> None:
        super().__init__(client._link.max_value_size)
        self._client = client

    def execute(self) -> builtins.list[Any]:
        """Send every queued call (one actor call per shard); return and keep the results, in order."""
        self.results = outcomes(self._client._run_many(self._take()))
        return self.results

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.execute()


class AsyncPipeline(_Queue):
    """A batch of calls for :class:`AsyncStateClient`: ``await execute()`` (or ``async with``)."""

    def __init__(self, client: AsyncStateClient) -> None:
        super().__init__(client._link.max_value_size)
        self._client = client

    async def execute(self) -> builtins.list[Any]:
        """Send every queued call (one actor call per shard); return and keep the results, in order."""
        self.results = outcomes(await self._client._run_many(self._take()))
        return self.results

    async def __aenter__(self) -> AsyncPipeline:
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            await self.execute()
