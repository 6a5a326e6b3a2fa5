"""Atomic update ops: pydantic models in the Motia/iii wire shape, and helpers to build them.

``state.update(group_id, key, ops)`` takes a list whose elements are these models or plain dicts
of the same shape, freely mixed::

    from shardstate import ops
    state.update("merge:job-42", "result", [
        ops.merge("fields", {"task-7": 42}),
        ops.increment("done"),
        {"type": "append", "path": "log", "value": "task-7"},
    ])

A path is a str (one literal first-level field: ``"a.b"`` is the field named ``a.b``; ``""`` is the
whole value) or a list of str (nested: ``["stats", "done"]``). Missing dicts on the way are created.
``merge`` and ``append`` walk a path as the iii engine does (a missing or non-dict field on the way
becomes ``{}``); the other ops raise ``UpdateError`` (``not_object``) on a path through a non-dict.
If any op fails, nothing is written.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, TypeAdapter

Path = StrictStr | list[StrictStr]


class _Op(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_wire(self) -> dict[str, Any]:
        """The op as a wire dict (``path`` omitted when None)."""
        return {k: v for k, v in self.__dict__.items() if not (k == "path" and v is None)}


class SetOp(_Op):
    """Set the field at ``path`` (``""``/``[]``: replace the whole value)."""

    type: Literal["set"] = "set"
    path: Path
    value: Any = None


class MergeOp(_Op):
    """Shallow-merge the dict ``value`` into the value, or into the field at ``path``.

    At a path, every missing or non-dict step (the value itself included) and the target become
    ``{}`` first, as in the iii engine; a root merge (no path) needs the value to be a dict.
    """

    type: Literal["merge"] = "merge"
    path: Path | None = None
    value: dict[str, Any]


class IncrementOp(_Op):
    """Add ``by`` to the number at ``path``; a missing field starts at 0."""

    type: Literal["increment"] = "increment"
    path: Path
    by: StrictInt | StrictFloat = 1


class DecrementOp(_Op):
    """Subtract ``by`` from the number at ``path``; a missing field starts at 0."""

    type: Literal["decrement"] = "decrement"
    path: Path
    by: StrictInt | StrictFloat = 1


class AppendOp(_Op):
    """Push ``value`` onto the list at ``path``, or concatenate a str to a str.

    A missing or ``None`` target starts as ``value`` itself if it is a str, else ``[value]``; at a
    nested path (two fields or more) a missing leaf always starts ``[value]``. Missing or non-dict
    fields on the way become ``{}``; the value itself must be a dict when ``path`` is not empty.
    """

    type: Literal["append"] = "append"
    path: Path | None = None
    value: Any = None


class RemoveOp(_Op):
    """Remove the field at ``path``; a missing field is a no-op; ``""``/``[]``: the value becomes None."""

    type: Literal["remove"] = "remove"
    path: Path


UpdateOp = Annotated[
    SetOp | MergeOp | IncrementOp | DecrementOp | AppendOp | RemoveOp, Field(discriminator="type")
]
"""Any one op, discriminated by its ``type`` field."""

update_op_adapter: TypeAdapter[Any] = TypeAdapter(UpdateOp)


def parse(data: dict[str, Any]) -> _Op:
    """Validate a wire dict into its op model (raises pydantic's ValidationError)."""
    return update_op_adapter.validate_python(data)  # type: ignore[no-any-return]


def set(path: Path, value: Any) -> SetOp:  # noqa: A001 - mirrors the wire name
    """``{"type": "set", "path": path, "value": value}``."""
    return SetOp(path=path, value=value)


def merge(path: Path | None, value: dict[str, Any]) -> MergeOp:
    """``{"type": "merge", "path": path, "value": value}`` (path None: the whole value); see MergeOp."""
    return MergeOp(path=path, value=value)


def increment(path: Path, by: int | float = 1) -> IncrementOp:
    """``{"type": "increment", "path": path, "by": by}``."""
    return IncrementOp(path=path, by=by)


def decrement(path: Path, by: int | float = 1) -> DecrementOp:
    """``{"type": "decrement", "path": path, "by": by}``."""
    return DecrementOp(path=path, by=by)


def append(path: Path | None, value: Any) -> AppendOp:
    """``{"type": "append", "path": path, "value": value}`` (path None: the whole value); see AppendOp."""
    return AppendOp(path=path, value=value)


def remove(path: Path) -> RemoveOp:
    """``{"type": "remove", "path": path}`` (``""``/``[]``: the value becomes None)."""
    return RemoveOp(path=path)


__all__ = [
    "AppendOp",
    "DecrementOp",
    "IncrementOp",
    "MergeOp",
    "Path",
    "RemoveOp",
    "SetOp",
    "UpdateOp",
    "append",
    "decrement",
    "increment",
    "merge",
    "parse",
    "remove",
    "set",
    "update_op_adapter",
]
