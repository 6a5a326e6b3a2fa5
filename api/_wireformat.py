"""How a batch of commands travels: packed into one pickle each way, bounded in bytes.

Shared by the client core, the lanes and the bulk calls (and by nothing on the shard's side but
the format itself: ``ShardActor.run`` unpickles what :func:`pack` makes and answers what
:func:`unpack` reads).
"""

from __future__ import annotations

import pickle
from collections.abc import Iterable, Sequence
from typing import Any

import cloudpickle

from shardstate._errors import InvalidInput
from shardstate._requests import Request, request_bytes

#: a batch carries at most about this many bytes of values (a larger queue leaves in several)
MAX_BATCH_BYTES = 32 * 1024 * 1024


def fits(sizes: Sequence[int], limit: int = MAX_BATCH_BYTES) -> int:
    """How many of the first calls (of these request sizes) go in one batch: at least one."""
    total = 0
    for count, size in enumerate(sizes):
        total += size
        if total > limit and count > 0:
            return count
    return len(sizes)


def request_sizes(reqs: Iterable[Request]) -> list[int]:
    """:func:`request_bytes` of each request."""
    return [request_bytes(r) for r in reqs]


def pack(cmds: Sequence[Any]) -> bytes:
    """A batch of commands as the bytes ``ShardActor.run`` takes.

    Plain ``pickle`` (fast); ``cloudpickle`` for what only it can pickle (a class defined in a
    function, say), as Ray itself would. Commands hold only checked, JSON-like values and bytes.
    """
    try:
        return pickle.dumps(cmds, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        try:
            return cloudpickle.dumps(cmds, protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return]
        except Exception as exc:
            raise InvalidInput(f"the call could not be pickled: {type(exc).__name__}: {exc}") from None


def unpack(packed: bytes) -> list[tuple[bool, Any]]:
    """The results ``ShardActor.run`` answered."""
    return pickle.loads(packed)  # type: ignore[no-any-return]
