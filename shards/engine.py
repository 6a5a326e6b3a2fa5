"""The shard's operation engine: executes command batches against a :class:`GroupStore` (pure).

No Ray and no I/O here: the shard actor is a thin shell that hands each incoming batch to
:meth:`ShardEngine.execute_batch`. Commands run one at a time, in order; a bad command becomes that
command's error result and never disturbs the others or the engine.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Sequence
from typing import Any

import cloudpickle

from shardstate._errors import InvalidInput, StaleShardMap, StateError, UpdateError
from shardstate.shards import commands as C
from shardstate.shards.store import GroupStore
from shardstate.shards.update_ops import NOT_JSON, apply_ops
from shardstate.shards.validation import DEFAULT_MAX_VALUE_SIZE, check_name, check_size


class ShardEngine:
    """Executes commands for the groups this shard owns.

    ``owns(group_id)`` says whether this shard owns the group's slot; commands for other groups get
    a :class:`StaleShardMap` error so the caller refreshes its map. ``max_value_size`` bounds stored
    values, including the result of an update.
    """

    def __init__(
        self,
        store: GroupStore | None = None,
        *,
        owns: Callable[[str], bool] | None = None,
        max_value_size: int = DEFAULT_MAX_VALUE_SIZE,
    ) -> None:
        self.store = store if store is not None else GroupStore()
        self.owns = owns
        self.max_value_size = max_value_size
        self._handlers: dict[str, Callable[[Any, Any, Any, Any], Any]] = {
            C.SET: self._set,
            C.GET: self._get,
            C.DELETE: self._delete,
            C.LIST: self._list,
            C.ITEMS: self._items,
            C.CLEAR: self._clear,
            C.UPDATE: self._update,
            C.GROUPS: self._groups,
        }

    # -- entry points -------------------------------------------------------------------------
    def execute_batch(self, batch: Sequence[Any]) -> list[C.Result]:
        """Execute every command of ``batch`` in order; return one result per command."""
        return [self.execute(cmd) for cmd in batch]

    def execute(self, cmd: Any) -> C.Result:
        """Execute one command; any failure becomes ``(False, StateError)``."""
        try:
            if not isinstance(cmd, tuple) or len(cmd) != 5:
                raise InvalidInput(f"a command is a 5-tuple, got {type(cmd).__name__}")
            kind, group_id, key, arg, _opts = cmd
            handler = self._handlers.get(kind) if isinstance(kind, str) else None
            if handler is None:
                raise InvalidInput(f"unknown command {kind!r}")
            if kind in C.GROUPED:
                check_name(group_id, "group_id")
                if self.owns is not None and not self.owns(group_id):
                    raise StaleShardMap(f"this shard does not own group {group_id!r}")
                if kind in C.KEYED:
                    check_name(key, "key")
            return (True, handler(group_id, key, arg, _opts))
        except StateError as exc:
            return (False, exc)
        except Exception as exc:  # a bug or a hostile command: report it, keep serving
            return (False, InvalidInput(f"command failed: {type(exc).__name__}: {exc}"))

    # -- commands -----------------------------------------------------------------------------
    def _set(self, group_id: str, key: str, data: Any, _opts: Any) -> tuple[bytes | None, bytes]:
        if not isinstance(data, bytes):
            raise InvalidInput("set: the value must arrive pickled (bytes)")
        check_size(data, self.max_value_size)
        return (self.store.put(group_id, key, data), data)

    def _get(self, group_id: str, key: str, _arg: Any, _opts: Any) -> bytes | None:
        return self.store.get(group_id, key)

    def _delete(self, group_id: str, key: str, _arg: Any, _opts: Any) -> bytes | None:
        return self.store.delete(group_id, key)

    def _list(self, group_id: str, _key: Any, _arg: Any, _opts: Any) -> list[bytes]:
        return self.store.values(group_id)

    def _items(self, group_id: str, _key: Any, _arg: Any, _opts: Any) -> list[tuple[str, bytes]]:
        return self.store.items(group_id)

    def _clear(self, group_id: str, _key: Any, _arg: Any, _opts: Any) -> int:
        return len(self.store.clear(group_id))

    def _groups(self, _group: Any, _key: Any, _arg: Any, _opts: Any) -> list[str]:
        return self.store.group_ids()

    def _update(self, group_id: str, key: str, ops: Any, _opts: Any) -> tuple[bytes | None, bytes]:
        old = self.store.get(group_id, key)  # stored values are always bytes: None means absent
        exists = old is not None
        current: Any = None
        if old is not None:
            try:
                current = pickle.loads(old)
            except Exception as exc:  # a class the shard cannot import: not a JSON-like value
                raise UpdateError(f"the stored value cannot be updated: {exc}", 0, NOT_JSON) from None
        new_value = apply_ops(current, ops, exists=exists)
        new = check_size(_dumps(new_value), self.max_value_size)
        self.store.put(group_id, key, new)
        return (old, new)


def _dumps(value: Any) -> bytes:
    """Pickle an update's result: plain pickle (fast), cloudpickle for what only it can pickle."""
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except RecursionError:
        raise UpdateError("the updated value is nested too deeply to store", 0, NOT_JSON) from None
    except Exception:
        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)  # type: ignore[no-any-return]
