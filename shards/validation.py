"""Checks on names and values shared by the clients and the shard engine (pure functions)."""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle

from shardstate._errors import InvalidInput, ValueTooLarge

MAX_NAME_BYTES = 512
DEFAULT_MAX_VALUE_SIZE = 16 * 1024 * 1024
#: groups whose names start with this belong to the system (triggers, dead letters)
RESERVED_PREFIX = "__shardstate"


def check_name(name: Any, what: str) -> str:
    """Return ``name`` if it is a valid group id or key, else raise :class:`InvalidInput`.

    Valid: a non-empty ``str`` of at most 512 UTF-8 bytes without NUL characters.
    """
    if not isinstance(name, str):
        raise InvalidInput(f"{what} must be a str, got {type(name).__name__}")
    if not name:
        raise InvalidInput(f"{what} must not be empty")
    if "\x00" in name:
        raise InvalidInput(f"{what} must not contain NUL characters")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidInput(f"{what} is not valid Unicode (lone surrogate)") from None
    if size > MAX_NAME_BYTES:
        raise InvalidInput(f"{what} is longer than {MAX_NAME_BYTES} UTF-8 bytes")
    return name


def is_reserved(group_id: str) -> bool:
    """Whether ``group_id`` is a system group (its name starts with :data:`RESERVED_PREFIX`)."""
    return group_id.startswith(RESERVED_PREFIX)


def check_writable(group_id: str) -> None:
    """Raise :class:`InvalidInput` if ``group_id`` is reserved for the system (user writes only)."""
    if group_id.startswith(RESERVED_PREFIX):
        raise InvalidInput(
            f"group {group_id!r} is reserved: names starting with {RESERVED_PREFIX!r} belong to the system"
        )


def encode_value(value: Any, max_size: int = DEFAULT_MAX_VALUE_SIZE) -> bytes:
    """Pickle ``value`` with cloudpickle; raise :class:`InvalidInput` / :class:`ValueTooLarge`."""
    try:
        data = cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # cloudpickle raises many kinds (TypeError, PicklingError, ...)
        raise InvalidInput(f"value cannot be pickled: {type(exc).__name__}: {exc}") from None
    check_size(data, max_size)
    return data


def check_size(data: bytes, max_size: int) -> bytes:
    """Return ``data`` if it fits in ``max_size`` bytes, else raise :class:`ValueTooLarge`."""
    if len(data) > max_size:
        raise ValueTooLarge(
            f"value is {len(data)} bytes pickled, over the limit of {max_size}", len(data), max_size
        )
    return data


def decode_value(data: bytes | None) -> Any:
    """Unpickle a stored value (``None`` stands for an absent key)."""
    return None if data is None else pickle.loads(data)
