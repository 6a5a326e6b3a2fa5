"""The slot map: a stable group -> slot hash and the slot -> shard assignment."""

from __future__ import annotations

import random
import string
import zlib
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardstate.cluster.slots import NUM_SLOTS, SlotMap, round_robin, slot_of


def test_num_slots() -> None:
    assert NUM_SLOTS == 4096


@pytest.mark.parametrize(
    ("group", "slot"),
    [  # computed once with zlib.crc32(group.encode("utf-8")) % 4096; must never change
        ("orders", 3566),
        ("users", 1513),
        ("merge:job-42", 2068),
        ("é", 3390),
        ("a" * 512, 81),
    ],
)
def test_slot_of_known_values(group: str, slot: int) -> None:
    assert slot_of(group) == slot


@settings(max_examples=200, deadline=None)
@given(group=st.text(min_size=1, max_size=100))
def test_slot_of_is_crc32_mod_num_slots(group: str) -> None:
    slot = slot_of(group)
    assert 0 <= slot < NUM_SLOTS
    assert slot == zlib.crc32(group.encode("utf-8")) % NUM_SLOTS
    assert slot_of(group) == slot


@pytest.mark.parametrize("shards", [1, 2, 3, 4, 7, 8, 4096])
def test_initial_map_assigns_every_slot(shards: int) -> None:
    slot_map = SlotMap.initial(shards)
    assert slot_map.epoch == 1
    assert len(slot_map.owners) == NUM_SLOTS
    assert set(slot_map.owners) == set(range(shards))
    SlotMap.check(slot_map.owners, shards)
    per_shard = [slot_map.slots_of(s) for s in range(shards)]
    assert sum(len(slots) for slots in per_shard) == NUM_SLOTS
    assert frozenset().union(*per_shard) == frozenset(range(NUM_SLOTS))
    sizes = [len(slots) for slots in per_shard]
    assert max(sizes) - min(sizes) <= 1
    assert slot_map.owners == round_robin(shards)
    for group in ["orders", "users", "merge:job-42"]:
        assert slot_map.shard_of(group) == slot_map.owners[slot_of(group)]
        assert slot_of(group) in slot_map.slots_of(slot_map.shard_of(group))


def test_round_robin_needs_a_shard() -> None:
    with pytest.raises(ValueError, match="at least one shard"):
        round_robin(0)
    with pytest.raises(ValueError, match="at least one shard"):
        SlotMap.initial(-1)


@pytest.mark.parametrize(
    ("owners", "shards"),
    [
        ((0,) * (NUM_SLOTS - 1), 1),
        ((0,) * (NUM_SLOTS + 1), 1),
        ((0,) * (NUM_SLOTS - 1) + (2,), 2),
        ((-1,) + (0,) * (NUM_SLOTS - 1), 2),
    ],
)
def test_check_rejects_bad_maps(owners: tuple[int, ...], shards: int) -> None:
    with pytest.raises(ValueError, match="every slot"):
        SlotMap.check(owners, shards)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_groups_spread_over_shards(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + string.digits + ":-_"
    groups = {"".join(rng.choices(alphabet, k=rng.randint(1, 24))) for _ in range(1000)}
    slot_map = SlotMap.initial(4)
    counts = Counter(slot_map.shard_of(g) for g in groups)
    fair = len(groups) / 4
    assert set(counts) == {0, 1, 2, 3}
    assert max(counts.values()) <= 2 * fair, counts


def test_sequential_group_names_spread_over_shards() -> None:
    slot_map = SlotMap.initial(4)
    counts = Counter(slot_map.shard_of(f"merge:job-{i}") for i in range(1000))
    assert max(counts.values()) <= 2 * 250, counts
    assert min(counts.values()) >= 250 / 2, counts
