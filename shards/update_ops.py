"""Atomic update ops as pure functions on Python values (no Ray, no I/O).

An op arrives in the Motia/iii wire shape (a dict such as ``{"type": "increment", "path": "count",
"by": 1}``). :func:`parse_op` checks it and turns it into an :class:`Op`; :func:`apply_ops` applies a
list of them to a value, all or nothing: it works on a private copy and raises
:class:`~shardstate.UpdateError` (with the failing op's index and a code) without touching the input.

Paths: a string is one literal first-level field (``"a.b"`` is the field named ``a.b``; ``""`` is
the whole value); a list of strings is a nested path (``["stats", "done"]``; ``[]`` is the whole value).
Missing intermediate dicts are created. A missing key starts as ``{}``.

The semantics are the iii engine's (Motia's runtime, ``engine/src/update_ops.rs``) case by case, except
that iii skips a failing op and writes the rest where we fail the whole update:

- ``merge`` and ``append`` walk a non-empty path the way iii's ``walk_or_create`` does: a missing or
  non-dict step becomes ``{}`` (for ``merge`` also the value itself and the target; ``append`` at a
  path needs the value itself to be a dict). The other ops raise ``not_object`` on a path through a
  non-dict.
- ``append`` to a missing or ``None`` target starts a str with a str value, else ``[value]``; at a
  nested path (two fields or more) a *missing* leaf always starts ``[value]``.
- ``remove`` at ``""`` / ``[]`` makes the whole value ``None``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from shardstate._errors import UpdateError

OP_TYPES = frozenset({"set", "merge", "increment", "decrement", "append", "remove"})

# Codes carried by UpdateError.code
BAD_OP = "bad_op"  # the op itself is malformed
NOT_NUMBER = "not_number"  # increment/decrement of something that is not a number
#: a dict was needed and not found: a step of a set/increment/decrement/remove path, the value itself
#: under an append path, the value itself for a root merge, or a merge operand
NOT_OBJECT = "not_object"
TYPE_MISMATCH = "type_mismatch"  # append to something not a list, str or None, or a non-str to a str
NOT_JSON = "not_json"  # a value the op writes is not JSON-like

#: The longest list path an op may have.
MAX_PATH_DEPTH = 64

_MISSING: Any = object()

#: the fields each op type may have
_FIELDS: dict[str, frozenset[str]] = {
    "set": frozenset({"type", "path", "value"}),
    "merge": frozenset({"type", "path", "value"}),
    "append": frozenset({"type", "path", "value"}),
    "increment": frozenset({"type", "path", "by"}),
    "decrement": frozenset({"type", "path", "by"}),
    "remove": frozenset({"type", "path"}),
}
_PATH_REQUIRED = frozenset({"set", "increment", "decrement", "remove"})
_new_op = tuple.__new__  # Op(...) without the namedtuple constructor's overhead


class Op(NamedTuple):
    """A checked op: ``kind`` in :data:`OP_TYPES`, ``path`` as a tuple of fields, ``arg`` its operand."""

    kind: str
    path: tuple[str, ...]
    arg: Any


def is_json_like(value: Any) -> bool:
    """True if ``value`` is built only of dict (str keys), list, str, int, float, bool and None."""
    return _json_walk(value, False, 0)


def has_json_form(value: Any) -> bool:
    """True if ``value`` is JSON-like (:func:`is_json_like`) with only finite floats: what JSON
    can carry as it is (the HTTP API shows anything else as a Python object, read-only)."""
    return _json_walk(value, True, 0)


def _json_walk(value: Any, finite: bool, depth: int) -> bool:
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return not finite or math.isfinite(value)
    if depth > 200:
        return False
    if isinstance(value, list):
        return all(_json_walk(v, finite, depth + 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _json_walk(v, finite, depth + 1) for k, v in value.items())
    return False


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _parse_path(raw: Any, index: int, required: bool) -> tuple[str, ...]:
    if raw is None:
        if required:
            raise UpdateError("missing 'path'", index, BAD_OP)
        return ()
    if isinstance(raw, str):
        return (raw,) if raw else ()
    if isinstance(raw, (list, tuple)) and all(isinstance(p, str) for p in raw):
        if len(raw) > MAX_PATH_DEPTH:
            raise UpdateError(f"'path' is deeper than {MAX_PATH_DEPTH} fields", index, BAD_OP)
        return tuple(raw)
    raise UpdateError(f"'path' must be a str or a list of str, got {raw!r}", index, BAD_OP)


def parse_op(raw: Any, index: int = 0) -> Op:
    """Check one wire-shape op (a mapping) and return it as an :class:`Op`.

    Raises :class:`UpdateError` with code ``bad_op`` (or ``not_json``/``not_object`` for its operand).
    """
    if isinstance(raw, Op):
        return raw
    if type(raw) is not dict and not isinstance(raw, Mapping):
        raise UpdateError(f"an op must be a dict or an UpdateOp, got {type(raw).__name__}", index, BAD_OP)
    kind = raw.get("type")
    allowed = _FIELDS.get(kind) if isinstance(kind, str) else None
    if allowed is None:
        raise UpdateError(f"unknown op type {kind!r} (one of {sorted(OP_TYPES)})", index, BAD_OP)
    if not allowed.issuperset(raw):
        extra = set(raw) - allowed
        raise UpdateError(f"unexpected field(s) {sorted(map(repr, extra))} for op {kind!r}", index, BAD_OP)
    raw_path = raw.get("path")
    if type(raw_path) is str and raw_path:  # the common case: one field
        path: tuple[str, ...] = (raw_path,)
    else:
        path = _parse_path(raw_path, index, required=kind in _PATH_REQUIRED)
    if kind in ("increment", "decrement"):
        by = raw.get("by", 1)
        if not _is_number(by) or (isinstance(by, float) and not math.isfinite(by)):
            raise UpdateError(f"'by' must be a finite int or float, got {by!r}", index, BAD_OP)
        return _new_op(Op, (kind, path, by))
    if kind == "remove":
        return _new_op(Op, (kind, path, None))
    if "value" not in raw:
        raise UpdateError(f"op {kind!r} needs a 'value'", index, BAD_OP)
    value = raw["value"]
    if not is_json_like(value):
        raise UpdateError(f"op {kind!r}: value is not JSON-like: {type(value).__name__}", index, NOT_JSON)
    if kind == "merge" and not isinstance(value, dict):
        raise UpdateError(f"'merge' needs a dict value, got {type(value).__name__}", index, NOT_OBJECT)
    return _new_op(Op, (kind, path, value))


def parse_ops(raw_ops: Any) -> list[Op]:
    """Check a whole op list (must be a non-empty list/tuple); see :func:`parse_op`."""
    if type(raw_ops) is not list and (
        isinstance(raw_ops, (str, bytes, Mapping)) or not isinstance(raw_ops, Sequence)
    ):
        raise UpdateError(f"ops must be a list of ops, got {type(raw_ops).__name__}", 0, BAD_OP)
    if not raw_ops:
        raise UpdateError("ops must not be empty", 0, BAD_OP)
    return [parse_op(op, i) for i, op in enumerate(raw_ops)]


def _combine(kind: str, current: Any, arg: Any, index: int, depth: int) -> Any:
    """The new value of one target: ``current`` (or ``_MISSING``) combined with the op's operand.

    ``depth`` is the length of the op's path (0: the target is the whole value). Never mutates
    ``current``: containers are rebuilt, so objects shared with the old value (or with each other)
    stay untouched.
    """
    if kind == "set":
        return arg
    if kind in ("increment", "decrement"):
        base = 0 if current is _MISSING else current
        if not _is_number(base):
            raise UpdateError(f"cannot {kind} a {type(base).__name__}", index, NOT_NUMBER)
        try:
            return base + arg if kind == "increment" else base - arg
        except OverflowError:  # float + an int too large for a float
            raise UpdateError(f"{kind} by {arg!r} overflows", index, NOT_NUMBER) from None
    if kind == "merge":
        if isinstance(current, dict):
            return {**current, **arg}
        if current is _MISSING or depth:  # a missing or non-dict target at a path becomes {}
            return dict(arg)
        raise UpdateError(f"cannot merge into a {type(current).__name__}", index, NOT_OBJECT)
    if kind == "remove":  # only the whole value gets here (path "" / []): it becomes None
        return None
    # append
    if isinstance(current, list):
        return [*current, arg]
    if current is _MISSING:
        return [arg] if depth > 1 or not isinstance(arg, str) else arg
    if current is None:
        return arg if isinstance(arg, str) else [arg]
    if isinstance(current, str):
        if not isinstance(arg, str):
            raise UpdateError(f"cannot append a {type(arg).__name__} to a str", index, TYPE_MISMATCH)
        return current + arg
    raise UpdateError(f"cannot append to a {type(current).__name__}", index, TYPE_MISMATCH)


def _rebuild(node: Any, op: Op, depth: int, index: int) -> Any:
    """``node`` with the op applied at ``op.path[depth:]``: dicts on the path are copied, not changed."""
    if depth == len(op.path):
        return _combine(op.kind, node, op.arg, index, depth)
    if node is _MISSING:
        if op.kind == "remove" and depth > 0:  # nothing to remove below a missing field
            return _MISSING
        node = {}  # a missing key (depth 0) or field starts as {}
    elif not isinstance(node, dict):
        # merge replaces any non-dict step (the value itself too), append any but the value itself
        if op.kind == "merge" or (op.kind == "append" and depth > 0):
            node = {}
        elif depth == 0:
            raise UpdateError(f"the value is a {type(node).__name__}, not a dict", index, NOT_OBJECT)
        else:
            where = ".".join(op.path[:depth])
            raise UpdateError(f"path goes through {where!r}, a {type(node).__name__}", index, NOT_OBJECT)
    field = op.path[depth]
    if op.kind == "remove" and depth == len(op.path) - 1:
        if field not in node:
            return node
        return {k: v for k, v in node.items() if k != field}
    child = _rebuild(node.get(field, _MISSING), op, depth + 1, index)
    if child is _MISSING:  # a remove below a missing field: nothing to do
        return node
    return {**node, field: child}


def apply_op(root: Any, op: Op, index: int = 0) -> Any:
    """Apply one op to ``root`` and return the new root (``root`` itself is never changed)."""
    return _rebuild(root, op, 0, index)


def apply_ops(value: Any, ops: Sequence[Any], *, exists: bool = True) -> Any:
    """Apply ``ops`` in order to ``value`` and return the new value, all or nothing.

    ``value`` is never changed (every op rebuilds the containers on its path), so a failing op
    leaves nothing behind: :class:`UpdateError` carries its index and code. ``exists=False`` means
    the key is missing (``value`` is ignored and the ops start from ``{}``; root-level
    ``increment``/``append`` then start from 0 / an empty list, like a missing field).
    """
    root: Any = value if exists else _MISSING
    for index, op in enumerate(parse_ops(ops)):
        root = apply_op(root, op, index)
    return {} if root is _MISSING else root
