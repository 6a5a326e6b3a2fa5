"""Turning API calls into shard commands and shard results back into API values.

Shared by the sync client, the async client and the router actor, so all three check input the
same way and decode the same way. Every builder validates its arguments *before* anything is sent
(a bad call costs no round trip and changes nothing) and returns a :class:`Request`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from shardstate._errors import StateError
from shardstate._models import SetResult, StateItem
from shardstate.ops import _Op
from shardstate.shards import commands as C
from shardstate.shards.update_ops import parse_ops
from shardstate.shards.validation import check_name, decode_value, encode_value


class Request(NamedTuple):
    """One command for the shard that owns ``group_id``, and how to decode its ok payload."""

    group_id: str
    cmd: C.Command
    decode: Callable[[Any], Any]


def unwrap(result: C.Result) -> Any:
    """The payload of an ok result; raise the error of a failed one."""
    ok, payload = result
    if ok:
        return payload
    if isinstance(payload, StateError):
        raise payload
    raise StateError(f"shard returned a malformed error: {payload!r}")


def _decode_pair(payload: tuple[bytes | None, bytes]) -> SetResult:
    return SetResult(old_value=decode_value(payload[0]), new_value=decode_value(payload[1]))


def _decode_items(payload: list[tuple[str, bytes]]) -> list[StateItem]:
    return [StateItem(key=k, value=decode_value(v)) for k, v in payload]


def _decode_values(payload: list[bytes]) -> list[Any]:
    return [decode_value(v) for v in payload]


def _identity(payload: Any) -> Any:
    return payload


def wire_ops(ops: Any) -> list[Any]:
    """Ops as wire dicts (models converted), checked with the engine's own parser."""
    if isinstance(ops, (list, tuple)):
        wire = [op.to_wire() if isinstance(op, _Op) else op for op in ops]
    else:
        wire = ops  # parse_ops reports the type error
    parse_ops(wire)
    return wire  # type: ignore[no-any-return]


def set_request(group_id: str, key: str, value: Any, max_value_size: int) -> Request:
    """``set``: the value travels pickled; the result's ``new_value`` is the caller's own object."""
    check_name(group_id, "group_id")
    check_name(key, "key")
    data = encode_value(value, max_value_size)

    def decode(payload: tuple[bytes | None, bytes]) -> SetResult:
        return SetResult(old_value=decode_value(payload[0]), new_value=value)

    return Request(group_id, C.command(C.SET, group_id, key, data), decode)


def get_request(group_id: str, key: str) -> Request:
    """``get``: the value or None."""
    check_name(group_id, "group_id")
    check_name(key, "key")
    return Request(group_id, C.command(C.GET, group_id, key), decode_value)


def delete_request(group_id: str, key: str) -> Request:
    """``delete``: the old value or None."""
    check_name(group_id, "group_id")
    check_name(key, "key")
    return Request(group_id, C.command(C.DELETE, group_id, key), decode_value)


def list_request(group_id: str) -> Request:
    """``list``: the group's values in insertion order."""
    check_name(group_id, "group_id")
    return Request(group_id, C.command(C.LIST, group_id), _decode_values)


def items_request(group_id: str) -> Request:
    """``items``: the group's ``StateItem``s in insertion order."""
    check_name(group_id, "group_id")
    return Request(group_id, C.command(C.ITEMS, group_id), _decode_items)


def clear_request(group_id: str) -> Request:
    """``clear``: how many items were removed."""
    check_name(group_id, "group_id")
    return Request(group_id, C.command(C.CLEAR, group_id), _identity)


def update_request(group_id: str, key: str, ops: Sequence[Any]) -> Request:
    """``update``: ops checked here, applied atomically by the shard."""
    check_name(group_id, "group_id")
    check_name(key, "key")
    return Request(group_id, C.command(C.UPDATE, group_id, key, wire_ops(ops)), _decode_pair)


GROUPS_COMMAND: C.Command = C.command(C.GROUPS)


def merge_groups(per_shard: Sequence[C.Result]) -> list[str]:
    """Combine every shard's ``groups`` answer into one sorted list."""
    return sorted({g for result in per_shard for g in unwrap(result)})
