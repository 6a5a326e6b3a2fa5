"""Automatic op_ids: unique per process (also across fork) and per call (issue 9, item 2)."""

from __future__ import annotations

import os

import pytest

from shardstate._requests import write_options
from shardstate.shards.engine import AUTO_OP_PREFIX


def _ids(n: int) -> list[str]:
    return [write_options()["op_id"] for _ in range(n)]


def _prefix(op_id: str) -> str:
    return op_id.rsplit(":", 1)[0]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_automatic_op_ids_differ_across_forked_processes() -> None:
    before = _ids(5)  # the parent made its token before forking (as a Ray worker would)
    children: list[list[str]] = []
    for _ in range(3):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: the same counter position as the parent, a fresh token
            os.close(read)
            os.write(write, "\n".join(_ids(50)).encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            children.append(pipe.read().split("\n"))
        os.waitpid(pid, 0)
    after = _ids(50)
    everyone = before + after + [i for ids in children for i in ids]
    assert len(set(everyone)) == len(everyone)  # no two calls, in any process, share an op_id
    prefixes = {_prefix(ids[0]) for ids in children} | {_prefix(after[0])}
    assert len(prefixes) == 4  # one token per process
    assert _prefix(before[0]) == _prefix(after[0])  # ... kept within a process
    assert all(i.startswith(AUTO_OP_PREFIX) for i in everyone)
    assert all(f"{os.getpid():x}." in i for i in after)


def test_automatic_op_ids_are_unique_per_call() -> None:
    ids = _ids(10_000)
    assert len(set(ids)) == len(ids)
