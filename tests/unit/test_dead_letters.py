"""Dead letters always fit (keys and values), and trigger records check their timeout (no Ray)."""

from __future__ import annotations

import math
from typing import Any

import cloudpickle
import pytest

from shardstate import InvalidInput, StateEvent
from shardstate._triggers import trigger_record
from shardstate.cluster.delivery import letter, letter_key, letter_value, tick
from shardstate.shards.validation import MAX_NAME_BYTES, check_name


def event(old: Any = None, new: Any = None) -> StateEvent:
    return StateEvent(
        event_type="state:updated", group_id="g", key="k",
        old_value=old, new_value=new, seq=7, event_id="c/0/7"
    )


def test_a_short_key_is_kept_and_a_long_one_is_hashed() -> None:
    assert letter_key("t", "c/0/7") == "t|c/0/7"
    long = letter_key("n" * MAX_NAME_BYTES, "c/0/7")
    assert check_name(long, "key") == long
    assert long.startswith("#")
    assert long != letter_key("n" * MAX_NAME_BYTES, "c/0/8")  # one letter per event


def test_each_level_keeps_less_and_says_so() -> None:
    item = letter("t", event("a" * 100_000, {"x": "b" * 100_000}), "boom " + "e" * 50_000, 4)
    whole = letter_value(item, 0)
    assert whole["event"]["old_value"] == "a" * 100_000
    assert whole["error"] == item["error"]
    sizes = [len(cloudpickle.dumps(letter_value(item, level))) for level in range(3)]
    assert sizes[0] > sizes[1] > sizes[2]
    assert sizes[1] < 5_000
    short = letter_value(item, 1)
    assert short["event"]["old_value"].startswith("<str, 100")
    assert "'aaaa" in short["event"]["old_value"]
    assert short["event"]["new_value"].startswith("<dict, ")
    assert short["error"].startswith("boom ")
    assert "dead letter truncated" in short["error"]
    assert StateEvent(**short["event"]).seq == 7  # still a valid event for DeadLetter
    tiny = letter_value(item, 2)
    assert ":" not in tiny["event"]["old_value"]  # sizes only
    assert (tiny["trigger"], tiny["attempts"]) == ("t", 4)


def test_numbers_and_none_are_kept_as_they_are() -> None:
    item = letter("t", event(None, 5), "x", 1)
    assert letter_value(item, 2)["event"]["old_value"] is None
    assert letter_value(item, 2)["event"]["new_value"] == 5


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "60", True, None])
def test_a_trigger_timeout_must_be_a_positive_number(bad: Any) -> None:
    with pytest.raises(InvalidInput, match="timeout"):
        trigger_record(print, "g", None, None, "t", bad)


def test_a_trigger_record_stores_its_timeout() -> None:
    assert trigger_record(print, "g", None, None, "t")[1]["timeout"] == 60.0
    assert trigger_record(print, "g", None, None, "t", 2)[1]["timeout"] == 2.0
    assert trigger_record(print, "g", None, None, "t", math.inf)[1]["timeout"] == math.inf


def test_quick_handlers_report_rarely_and_short_timeouts_often() -> None:
    assert tick(None) == 1.0
    assert tick(600.0) == 1.0
    assert tick(0.4) == pytest.approx(0.1)
