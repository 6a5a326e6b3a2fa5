"""The shardstate error family.

Every error a caller can see derives from :class:`StateError`::

    StateError                    anything shardstate raises on purpose
    ├── InvalidInput              *your* call was malformed: bad group/key, bad op, unpicklable value
    │   └── ValueTooLarge         a value (or an update's result) exceeds the cluster's max value size
    ├── UpdateError               an update's op could not apply; carries ``op_index`` and ``code``
    ├── ConflictError             compare-and-set saw another version than expected
    │   └── ReadOnly              the HTTP API may not change a stored value that has no JSON form
    ├── NotFound                  the HTTP API and the CLI: the key (or dead letter) does not exist
    ├── DecodeError               a value cannot be unpickled in *this* process (its class's module
    │                             is missing here); the call itself was executed
    └── Unavailable               the cluster cannot be reached, was shut down, or a shard did not
        │                         come back in time (``retriable`` is True)
        ├── StaleShardMap         internal: a shard no longer owns the group's slot; the client
        │                         refreshes its map and retries, callers normally never see it
        ├── NotPrimary            internal: the member asked is not its shard's primary (a backup,
        │                         or a primary deposed by a failover); nothing was executed, the
        │                         client refreshes its map and sends the batch to the new primary
        └── Deferred              internal: the shard did not run the command (its batch's answer
            │                     was already large); the client sends it again, in order
            └── ShardLoading      internal: the shard is still loading its storage ("loading, N%");
                                  the client waits and sends it again within its retry timeout

A bad call never changes state and never kills an actor: the shard turns it into this call's error.
Errors cross actor boundaries pickled, so each class keeps its constructor arguments in ``args``
and rebuilds from them (see ``__reduce__``).
"""

from __future__ import annotations

from typing import Any


class StateError(Exception):
    """Base class of every error shardstate raises on purpose.

    ``retriable`` tells whether repeating the same call later can succeed (the cluster was busy or
    restarting) or not (the call itself is wrong).
    """

    retriable: bool = False

    def __init__(self, message: str = "") -> None:
        super().__init__(message)

    @property
    def message(self) -> str:
        """The human-readable message."""
        return str(self.args[0]) if self.args else ""

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, self.args)


class InvalidInput(StateError, ValueError):
    """The caller passed something shardstate cannot accept (a bad name, op, or value)."""


class ValueTooLarge(InvalidInput):
    """A value, pickled, is larger than the cluster's ``max_value_size``; nothing was stored."""

    def __init__(self, message: str = "", size: int = 0, limit: int = 0) -> None:
        StateError.__init__(self, message)
        self.args = (message, size, limit)
        self.size = size
        self.limit = limit

    def __str__(self) -> str:
        return self.message


class UpdateError(StateError):
    """An ``update`` op failed; nothing was written.

    ``op_index`` is the position of the failing op in the list, ``code`` one of ``bad_op``,
    ``not_number``, ``not_object``, ``type_mismatch``, ``not_json``.
    """

    def __init__(self, message: str = "", op_index: int = 0, code: str = "bad_op") -> None:
        StateError.__init__(self, message)
        self.args = (message, op_index, code)
        self.op_index = op_index
        self.code = code

    def __str__(self) -> str:
        return f"op {self.op_index} ({self.code}): {self.message}"


class ConflictError(StateError):
    """A compare-and-set write found a different version than ``expected_version``; nothing was written.

    ``expected`` is the version the caller named, ``actual`` the one found (0: the key is absent).
    """

    def __init__(self, message: str = "", expected: int = 0, actual: int = 0) -> None:
        StateError.__init__(self, message)
        self.args = (message, expected, actual)
        self.expected = expected
        self.actual = actual

    def __str__(self) -> str:
        return self.message


class ReadOnly(ConflictError):
    """A write over the HTTP API found a stored value with no JSON form (a Python object): such a
    value is shown, not changed, over HTTP; nothing was written. Change it from Python."""

    def __init__(self, message: str = "", expected: int = 0, actual: int = 0) -> None:
        ConflictError.__init__(self, message, expected, actual)


class NotFound(StateError):
    """What was asked for does not exist: the HTTP API's 404 and the CLI's exit code 1."""


class DecodeError(StateError):
    """A value the shard returned cannot be unpickled in this process (e.g. ``No module named 'x'``).

    Only the call whose value it is fails; a write was applied all the same (do not retry it with
    a new op_id). Install the module, or read the value where it can be imported.
    """


class Unavailable(StateError):
    """The state cluster cannot serve the call: unreachable, shut down, or a shard did not recover."""

    retriable = True


class StaleShardMap(Unavailable):
    """A shard answered that it does not own the group's slot (the caller's shard map is old)."""


class NotPrimary(Unavailable):
    """The shard member asked cannot serve as its shard's primary now: a backup, a primary deposed
    by a failover, or a primary that cannot yet confirm earlier writes with its backups. Clients
    find the (new) primary and send the batch again with its op_ids (applied at most once)."""


class Deferred(Unavailable):
    """The shard did not run this command: its batch's answer had reached the size budget.

    Nothing was executed; clients send the deferred commands again, in their order.
    """


class ShardLoading(Deferred):
    """A shard is still loading its storage (the message says how far); nothing was executed.

    Clients wait and send the same commands again, in order (within their ``retry_timeout``), so
    a slow load delays callers instead of failing them.
    """


#: Every public error class, for tests and ``__all__``.
ERROR_CLASSES: tuple[type[StateError], ...] = (
    StateError,
    InvalidInput,
    ValueTooLarge,
    UpdateError,
    ConflictError,
    DecodeError,
    Unavailable,
    StaleShardMap,
    NotPrimary,
    ShardLoading,
    Deferred,
)
