"""Export a cluster's state to JSON Lines and import it back.

One line per entry: ``{"group_id": ..., "key": ..., "value": ...}``. Values must be JSON-like
(dict with str keys, list, str, int, float, bool, None); anything else is reported with its group
and key, and nothing is written. Import writes in batches, one actor call per shard per batch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from shardstate._client import StateClient
from shardstate._errors import InvalidInput
from shardstate._requests import set_request
from shardstate.cluster.config import DEFAULT_CLUSTER
from shardstate.shards.update_ops import has_json_form
from shardstate.shards.validation import check_name

BATCH = 2000
#: export reports its progress every this many entries
PROGRESS_EVERY = 1000

#: ``progress(done, total)``: how many entries were written of about how many
Progress = Callable[[int, int], None]


def _client(state: StateClient | None, cluster: str) -> StateClient:
    if state is not None:
        return state
    from shardstate._connect import connect

    return connect(cluster=cluster)


def export(
    path: str | os.PathLike[str],
    *,
    cluster: str = DEFAULT_CLUSTER,
    groups: Iterable[str] | None = None,
    state: StateClient | None = None,
    progress: Progress | None = None,
) -> int:
    """Write every entry (or those of ``groups``) to ``path`` as JSON Lines; return how many.

    Raises :class:`InvalidInput` naming the first value that is not JSON-like; the file is then
    not created (it is written to a temporary name and renamed at the end). ``progress(done,
    total)`` is called as entries are written (``total``: the groups' counts when the export began).
    """
    client = _client(state, cluster)
    chosen = None if groups is None else list(groups)
    total = 0
    if progress is not None:
        counts = client.group_counts()
        total = sum(counts.values()) if chosen is None else sum(counts.get(g, 0) for g in chosen)
        progress(0, total)
    target = Path(path)
    tmp = target.with_name(target.name + ".partial")
    count = 0
    try:
        with tmp.open("w", encoding="utf-8") as out:
            for group_id in client.list_groups() if chosen is None else chosen:
                for item in client.items(group_id):
                    if not has_json_form(item.value):
                        raise InvalidInput(
                            f"cannot export {group_id!r}/{item.key!r}: its value "
                            f"({type(item.value).__name__}) is not JSON (dict, list, str, number, bool, None)"
                        )
                    record = {"group_id": group_id, "key": item.key, "value": item.value}
                    out.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
                    count += 1
                    if progress is not None and count % PROGRESS_EVERY == 0:
                        progress(count, max(total, count))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    if progress is not None:
        progress(count, count)
    return count


def _records(path: Path) -> Iterator[tuple[str, str, Any]]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                group_id, key, value = record["group_id"], record["key"], record["value"]
                check_name(group_id, "group_id")
                check_name(key, "key")
            except (ValueError, KeyError, TypeError) as exc:
                raise InvalidInput(f"{path}:{number}: not a {{group_id, key, value}} record: {exc}") from None
            yield group_id, key, value


def import_(
    path: str | os.PathLike[str],
    *,
    cluster: str = DEFAULT_CLUSTER,
    state: StateClient | None = None,
    progress: Progress | None = None,
) -> int:
    """Set every entry of a JSON Lines file (as written by :func:`export`); return how many.

    The whole file is checked first: a bad line raises :class:`InvalidInput` and nothing is written.
    ``progress(done, total)`` is called after each batch written.
    """
    client = _client(state, cluster)
    source = Path(path)
    limit = client._link.max_value_size
    # check (and pickle) everything before writing anything
    requests = [set_request(g, k, v, limit) for g, k, v in _records(source)]
    total = len(requests)
    if progress is not None:
        progress(0, total)
    for start in range(0, total, BATCH):
        for ok, result in client._run_many(requests[start : start + BATCH]):
            if not ok:
                raise result
        if progress is not None:
            progress(min(start + BATCH, total), total)
    return total
