"""The command vocabulary between clients and shard actors.

A command is a plain tuple ``(kind, group_id, key, arg, opts)`` so a batch of thousands pickles
cheaply (``opts``: None or a dict of ``op_id``, ``ttl``, ``expected_version`` for writes); a result
is ``(True, payload)`` or ``(False, StateError)``. Payloads carry values as the
pickled bytes the client sent, so a shard never needs to unpickle a value it only stores.

====== ========= ========= =================== =========================================
kind   group_id  key       arg                 ok payload
====== ========= ========= =================== =========================================
set    str       str       pickled value       (old bytes | None, new bytes)
get    str       str       -                   bytes | None
entry  str       str       -                   (bytes, version, updated_at, expires_at) | None
delete str       str       -                   old bytes | None
list   str       -         -                   list[bytes]
items  str       -         -                   list[(key, bytes)]
clear  str       -         -                   int (items removed)
update str       str       list of wire ops    (old bytes | None, new bytes)
groups -         -         -                   sorted list[str] (this shard's groups)
counts -         -         -                   sorted list[(group, item count)]
page   str       -         (after, limit,      (list[(key, bytes, version)], next after | None):
                           prefix)             keys in sorted order, after ``after`` (None: first)
====== ========= ========= =================== =========================================
"""

from __future__ import annotations

from typing import Any

Command = tuple[str, Any, Any, Any, Any]
Result = tuple[bool, Any]

SET = "set"
GET = "get"
ENTRY = "entry"
DELETE = "delete"
LIST = "list"
ITEMS = "items"
CLEAR = "clear"
UPDATE = "update"
GROUPS = "groups"
COUNTS = "counts"
PAGE = "page"

#: kinds that name a key as well as a group
KEYED = frozenset({SET, GET, ENTRY, DELETE, UPDATE})
#: kinds that name a group
GROUPED = KEYED | {LIST, ITEMS, CLEAR, PAGE}
#: kinds that may change state
WRITES = frozenset({SET, DELETE, CLEAR, UPDATE})
KINDS = GROUPED | {GROUPS, COUNTS}


def command(
    kind: str,
    group_id: str | None = None,
    key: str | None = None,
    arg: Any = None,
    opts: dict[str, Any] | None = None,
) -> Command:
    """Build a command tuple."""
    return (kind, group_id, key, arg, opts)
