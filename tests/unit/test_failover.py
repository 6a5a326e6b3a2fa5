"""The failover controller's decisions, as plain functions (no Ray)."""

from __future__ import annotations

from typing import Any

import pytest

from shardstate.cluster.failover import (
    ReplicaSet,
    node_for,
    primary_valid,
    restarted_from_its_file,
    successor,
)
from shardstate.shards import replication as rep


def status(role: str = rep.BACKUP, term: int = 3, lsn: int = 10, phase: str = "ready") -> dict[str, Any]:
    return {"role": role, "term": term, "lsn": lsn, "phase": phase}


def test_the_successor_is_the_in_sync_backup_with_the_highest_log_position() -> None:
    rs = ReplicaSet(
        term=3, primary=0, in_sync=[1, 2, 3], members={0: "a", 1: "b", 2: "c", 3: "d"}, served=True
    )
    statuses = {0: None, 1: status(lsn=10), 2: status(lsn=12), 3: status(lsn=11)}
    assert successor(rs, statuses) == 2


@pytest.mark.parametrize(
    "backup",
    [
        None,  # silent
        status(phase="loading"),
        status(role=rep.PRIMARY),
        status(role=rep.FENCED),
        status(term=0),  # restarted: holds nothing it acknowledged
        status(term=1),  # an older term than the last one
        status(term=5),
    ],
)
def test_no_successor_unless_it_is_an_in_sync_backup_of_this_term(backup: Any) -> None:
    rs = ReplicaSet(term=3, primary=0, in_sync=[1], members={0: "a", 1: "b", 2: "c"}, served=True)
    assert successor(rs, {0: None, 1: backup, 2: status(lsn=99)}) is None  # 2 is not in sync


def test_mid_failover_the_other_backups_of_the_previous_term_stay_candidates() -> None:
    rs = ReplicaSet(term=4, primary=1, in_sync=[2], members={1: "b", 2: "c"}, served=True)
    assert successor(rs, {1: None, 2: status(term=3)}) == 2


def test_the_recorded_primary_is_judged_by_its_heartbeat() -> None:
    rs = ReplicaSet(term=3, primary=0, in_sync=[], members={0: "a"}, served=True)
    assert primary_valid(rs, status(role=rep.PRIMARY, term=3)) is True
    assert primary_valid(rs, None) is None  # silent: the caller counts the seconds
    assert primary_valid(rs, status(phase="loading", term=0)) is None
    assert primary_valid(rs, status(term=2)) is None  # chosen, not promoted yet
    assert primary_valid(rs, status(term=3)) is None  # promoting
    assert primary_valid(rs, status(role=rep.PRIMARY, term=2)) is False  # deposed
    assert primary_valid(rs, status(role=rep.FENCED)) is False
    assert primary_valid(rs, status(term=0)) is False  # restarted, the shard had served
    new = ReplicaSet(term=1, primary=0, members={0: "a"}, served=False)
    assert primary_valid(new, status(term=0)) is None  # a new shard's first primary


def test_a_restarted_primary_serves_again_only_from_its_file_after_serving() -> None:
    rs = ReplicaSet(term=3, primary=0, members={0: "a"}, served=True)
    assert restarted_from_its_file(rs, status(term=0))
    assert not restarted_from_its_file(rs, status(term=0, phase="loading"))
    assert not restarted_from_its_file(rs, status(term=3))
    assert not restarted_from_its_file(rs, None)
    assert not restarted_from_its_file(ReplicaSet(term=1, served=False), status(term=0))


def test_a_new_member_goes_to_the_least_loaded_node_without_one() -> None:
    assert node_for(["a"], ["a", "b", "c"], {"a": 3, "b": 2, "c": 1}) == "c"
    assert node_for(["a", "c"], ["a", "b", "c"], {"b": 9}) == "b"
    assert node_for(["a", "b"], ["a", "b"], {}) is None  # degraded: no node without a member


def test_a_replica_set_round_trips_through_json_form() -> None:
    rs = ReplicaSet(term=7, primary=4, in_sync=[5], members={4: "n1", 5: "n2"}, next_member=6, served=True)
    assert ReplicaSet.from_dict(rs.to_dict()) == rs
    assert ReplicaSet.from_dict({"term": 1, "primary": 0}) == ReplicaSet(term=1, primary=0)
