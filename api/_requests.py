"""Turning API calls into shard commands and shard results back into API values.

Shared by the sync client, the async client and the router actor, so all three check input the
same way and decode the same way. Every builder validates its arguments *before* anything is sent
(a bad call costs no round trip and changes nothing) and returns a :class:`Request`.
"""

from __future__ import annotations

import base64
import itertools
import math
import os
import secrets
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from shardstate._errors import DecodeError, InvalidInput, StateError
from shardstate._models import Entry, ItemPage, SetResult, StateItem, VersionedItem
from shardstate.ops import _Op
from shardstate.shards import commands as C
from shardstate.shards.engine import AUTO_OP_PREFIX, MAX_PAGE_ITEMS, RETURNING
from shardstate.shards.update_ops import parse_ops
from shardstate.shards.validation import check_name, check_writable, decode_value, encode_value

#: automatic op_ids: ``~<pid>.<random>:<counter>``; the random part is made lazily in each process
#: (and again in a forked child), so no two processes share one even if forked from a parent that
#: had one, and the counter makes each call's unique
_token: tuple[int, str] | None = None
_op_counter = itertools.count()


def _reset_token() -> None:
    global _token
    _token = None


os.register_at_fork(after_in_child=_reset_token)


def auto_op_id() -> str:
    """A new automatic op_id, unique per process and per call."""
    global _token
    token = _token
    if token is None:  # first use in this process (a forked child starts without one)
        pid = os.getpid()
        token = _token = (pid, f"{AUTO_OP_PREFIX}{pid:x}.{secrets.token_hex(8)}:")
    return f"{token[1]}{next(_op_counter):x}"


class Request(NamedTuple):
    """One command for the shard that owns ``group_id``, and how to decode its ok payload."""

    group_id: str
    cmd: C.Command
    decode: Callable[[Any], Any]


def request_bytes(req: Request) -> int:
    """About how many bytes ``req`` adds to a batch (a set's pickled value, plus a little)."""
    arg = req.cmd[3]
    return 128 + (len(arg) if isinstance(arg, bytes) else 0)


def unwrap(result: C.Result) -> Any:
    """The payload of an ok result; raise the error of a failed one."""
    ok, payload = result
    if ok:
        return payload
    if isinstance(payload, StateError):
        raise payload
    raise StateError(f"shard returned a malformed error: {payload!r}")


def decode_payload(req: Request, payload: Any) -> Any:
    """``req``'s ok payload as an API value; a value this process cannot unpickle is a
    :class:`DecodeError` for this call alone (a write was applied all the same)."""
    try:
        return req.decode(payload)
    except StateError:
        raise
    except Exception as exc:  # ModuleNotFoundError, AttributeError, ... from unpickling
        kind, group_id, key = req.cmd[0], req.cmd[1], req.cmd[2]
        where = repr(group_id) if key is None else f"{group_id!r}/{key!r}"
        applied = " (the write itself was applied)" if kind in C.WRITES else ""
        raise DecodeError(
            f"the result of {kind} {where} cannot be decoded in this process{applied}: "
            f"{type(exc).__name__}: {exc}"
        ) from None


def _decode_pair(payload: tuple[bytes | None, bytes]) -> SetResult:
    return SetResult(old_value=decode_value(payload[0]), new_value=decode_value(payload[1]))


def _decode_items(payload: list[tuple[str, bytes]]) -> list[StateItem]:
    return [StateItem(key=k, value=decode_value(v)) for k, v in payload]


def _decode_values(payload: list[bytes]) -> list[Any]:
    return [decode_value(v) for v in payload]


class Page(NamedTuple):
    """One page of a ``list``/``items`` answer that goes on: the clients fetch the rest."""

    rows: list[Any]
    group_id: str
    kind: str
    next: int


def next_page(page: Page) -> Request:
    """The request for the page after ``page``."""
    build = items_request if page.kind == C.ITEMS else list_request
    return build(page.group_id, page.next)


def _pager(group_id: str, kind: str, rows: Callable[[Any], list[Any]]) -> Callable[[Any], Any]:
    def decode(payload: Any) -> Any:
        if isinstance(payload, tuple):  # (rows, where the next page starts): a large group
            return Page(rows(payload[0]), group_id, kind, payload[1])
        return rows(payload)

    return decode


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


def write_options(
    op_id: str | None = None,
    ttl: float | None = None,
    expected_version: int | None = None,
    *,
    group_id: str | None = None,
    system: bool = False,
) -> dict[str, Any]:
    """Check a write's options; give it an automatic op_id (for safe retries) if it has none.

    ``group_id``: the group written to; system groups are refused unless ``system`` (internal).
    """
    if system:
        opts: dict[str, Any] = {"system": True}
    else:
        opts = {}
        if group_id is not None:
            check_writable(group_id)
    if op_id is None:
        op_id = auto_op_id()
    elif not isinstance(op_id, str) or not op_id or len(op_id) > 256:
        raise InvalidInput(f"op_id must be a non-empty str of at most 256 characters, got {op_id!r}")
    elif op_id.startswith(AUTO_OP_PREFIX):
        raise InvalidInput(f"op_ids starting with {AUTO_OP_PREFIX!r} are reserved for automatic retries")
    opts["op_id"] = op_id
    if ttl is not None:
        if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not math.isfinite(ttl) or ttl <= 0:
            raise InvalidInput(f"ttl must be a positive number of seconds, got {ttl!r}")
        opts["ttl"] = ttl
    if expected_version is not None:
        if (
            not isinstance(expected_version, int)
            or isinstance(expected_version, bool)
            or expected_version < 0
        ):
            raise InvalidInput(f"expected_version must be an int >= 0, got {expected_version!r}")
        opts["expected_version"] = expected_version
    return opts


def set_request(
    group_id: str,
    key: str,
    value: Any,
    max_value_size: int,
    *,
    op_id: str | None = None,
    ttl: float | None = None,
    expected_version: int | None = None,
    returning: str = "both",
    system: bool = False,
) -> Request:
    """``set``: the value travels pickled; the result's ``new_value`` is the caller's own object.

    ``returning``: ``"both"`` (a :class:`SetResult` with both values), ``"new"`` / ``"old"`` (only
    that one; the other is None), ``"none"`` (the call returns None; the shard sends no value back).
    """
    check_name(group_id, "group_id")
    check_name(key, "key")
    opts = write_options(op_id, ttl, expected_version, group_id=group_id, system=system)
    _add_returning(opts, returning)
    data = encode_value(value, max_value_size)

    def decode(payload: tuple[bytes | None, bytes | None]) -> SetResult | None:
        if returning == "none":
            return None
        old = decode_value(payload[0]) if returning != "new" else None
        if returning == "old":
            return SetResult(old_value=old, new_value=None)
        # the caller's own object, unless a repeat found only the key's current value to report
        new = value if payload[1] is None or payload[1] == data else decode_value(payload[1])
        return SetResult(old_value=old, new_value=new)

    return Request(group_id, C.command(C.SET, group_id, key, data, opts), decode)


def _add_returning(opts: dict[str, Any], returning: str) -> None:
    """Check ``returning=`` and put it in a write's options (the default, "both", travels as nothing)."""
    if returning not in RETURNING:
        raise InvalidInput(f"returning must be one of {RETURNING}, got {returning!r}")
    if returning != "both":
        opts["returning"] = returning


def entry_request(group_id: str, key: str) -> Request:
    """``get_entry``: the value with its version and times, or None."""
    check_name(group_id, "group_id")
    check_name(key, "key")
    return Request(group_id, C.command(C.ENTRY, group_id, key), _decode_entry)


def _decode_entry(payload: tuple[bytes, int, float, float | None] | None) -> Entry | None:
    if payload is None:
        return None
    data, version, updated_at, expires_at = payload
    return Entry(value=decode_value(data), version=version, updated_at=updated_at, expires_at=expires_at)


def get_request(group_id: str, key: str) -> Request:
    """``get``: the value or None."""
    check_name(group_id, "group_id")
    check_name(key, "key")
    return Request(group_id, C.command(C.GET, group_id, key), decode_value)


def delete_request(
    group_id: str,
    key: str,
    *,
    op_id: str | None = None,
    expected_version: int | None = None,
    system: bool = False,
) -> Request:
    """``delete``: the old value or None."""
    check_name(group_id, "group_id")
    check_name(key, "key")
    opts = write_options(op_id, None, expected_version, group_id=group_id, system=system)
    return Request(group_id, C.command(C.DELETE, group_id, key, None, opts), decode_value)


def list_request(group_id: str, start: int | None = None) -> Request:
    """``list``: the group's values in insertion order (from position ``start``: a later page)."""
    check_name(group_id, "group_id")
    return Request(
        group_id, C.command(C.LIST, group_id, None, start), _pager(group_id, C.LIST, _decode_values)
    )


def items_request(group_id: str, start: int | None = None) -> Request:
    """``items``: the group's ``StateItem``s in insertion order (from ``start``: a later page)."""
    check_name(group_id, "group_id")
    return Request(
        group_id, C.command(C.ITEMS, group_id, None, start), _pager(group_id, C.ITEMS, _decode_items)
    )


def encode_cursor(key: str) -> str:
    """The opaque cursor that continues a page after ``key`` (URL-safe)."""
    return base64.urlsafe_b64encode(key.encode("utf-8", "surrogatepass")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The key a cursor continues after; InvalidInput if it is not one of ours."""
    if not isinstance(cursor, str) or not cursor or len(cursor) > 1024:
        raise InvalidInput(f"not a cursor: {cursor!r}")
    try:
        key = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("utf-8", "surrogatepass")
    except (ValueError, UnicodeDecodeError):
        raise InvalidInput(f"not a cursor: {cursor!r}") from None
    check_name(key, "cursor")
    return key


def page_request(
    group_id: str,
    *,
    limit: int = 100,
    cursor: str | None = None,
    prefix: str | None = None,
    decode: Callable[[bytes], Any] = decode_value,
) -> Request:
    """``page``: up to ``limit`` items of the group in key order, after ``cursor``, whose keys start
    with ``prefix``; ``decode`` turns each stored value into what the page holds."""
    check_name(group_id, "group_id")
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_PAGE_ITEMS:
        raise InvalidInput(f"limit must be an int from 1 to {MAX_PAGE_ITEMS}, got {limit!r}")
    if prefix is not None and (
        not isinstance(prefix, str) or len(prefix.encode("utf-8", "surrogatepass")) > 512
    ):
        raise InvalidInput(f"prefix must be a str of at most 512 bytes, got {prefix!r}")
    after = None if cursor is None else decode_cursor(cursor)

    def page(payload: tuple[list[tuple[str, bytes, int]], str | None]) -> ItemPage:
        rows, last = payload
        items = [VersionedItem(key=k, value=decode(v), version=n) for k, v, n in rows]
        return ItemPage(items=items, next_cursor=None if last is None else encode_cursor(last))

    return Request(group_id, C.command(C.PAGE, group_id, None, (after, limit, prefix or "")), page)


def clear_request(group_id: str) -> Request:
    """``clear``: how many items were removed."""
    check_name(group_id, "group_id")
    opts = write_options(group_id=group_id)
    return Request(group_id, C.command(C.CLEAR, group_id, None, None, opts), _identity)


def update_request(
    group_id: str,
    key: str,
    ops: Sequence[Any],
    *,
    op_id: str | None = None,
    ttl: float | None = None,
    expected_version: int | None = None,
    returning: str = "both",
) -> Request:
    """``update``: ops checked here, applied atomically by the shard (``returning`` as for ``set``)."""
    check_name(group_id, "group_id")
    check_name(key, "key")
    opts = write_options(op_id, ttl, expected_version, group_id=group_id)
    _add_returning(opts, returning)
    decode = _decode_pair if returning == "both" else _none if returning == "none" else _decode_pair_part
    return Request(group_id, C.command(C.UPDATE, group_id, key, wire_ops(ops), opts), decode)


def _none(_payload: Any) -> None:
    return None


def _decode_pair_part(payload: tuple[bytes | None, bytes | None]) -> SetResult:
    """``returning="new"`` or ``"old"``: the shard sent only that value (the other is None)."""
    return SetResult(old_value=decode_value(payload[0]), new_value=decode_value(payload[1]))


GROUPS_COMMAND: C.Command = C.command(C.GROUPS)
COUNTS_COMMAND: C.Command = C.command(C.COUNTS)


def merge_groups(per_shard: Sequence[C.Result]) -> list[str]:
    """Combine every shard's ``groups`` answer into one sorted list."""
    return sorted({g for result in per_shard for g in unwrap(result)})
