"""Names and values: check_name, encode_value / check_size / decode_value."""

from __future__ import annotations

import pickle
import threading
from typing import Any

import cloudpickle
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardstate import InvalidInput, StateError, ValueTooLarge
from shardstate.shards.validation import (
    DEFAULT_MAX_VALUE_SIZE,
    MAX_NAME_BYTES,
    check_name,
    check_size,
    decode_value,
    encode_value,
)


def test_limits() -> None:
    assert MAX_NAME_BYTES == 512
    assert DEFAULT_MAX_VALUE_SIZE == 16 * 1024 * 1024


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "a" * 512,
        "é" * 256,  # 2 bytes each: 512 bytes
        "€" * 170 + "ab",  # 3 bytes each: 510 + 2
        "😀" * 128,  # 4 bytes each: 512 bytes
        "merge:job-42",
        " ",
        "\U0010ffff",
        "a.b/c\\d\n",
    ],
)
def test_valid_names(name: str) -> None:
    assert check_name(name, "key") is name


@pytest.mark.parametrize(
    "name",
    [
        "a" * 513,
        "é" * 256 + "a",  # 257 chars, 513 bytes
        "é" * 257,  # 257 chars (fewer than 512), 514 bytes: bytes are counted, not characters
        "€" * 171,  # 171 chars, 513 bytes
        "😀" * 128 + "a",
        "😀" * 129,
        "",
        "\x00",
        "a\x00b",
        "\ud800",  # lone surrogate
        "ok\udfff",
        None,
        1,
        b"key",
        ["key"],
    ],
)
def test_invalid_names(name: Any) -> None:
    with pytest.raises(InvalidInput) as info:
        check_name(name, "group_id")
    assert type(info.value) is InvalidInput
    assert "group_id" in str(info.value)


# every code point (surrogates included), with lone surrogates and NUL made frequent
NAME_CHARS = st.characters(codec=None, exclude_categories=()) | st.sampled_from(["\ud800", "\udfff", "\x00"])


@settings(max_examples=200, deadline=None)
@given(name=st.text(NAME_CHARS, max_size=200) | st.text("aé€😀\x00", min_size=120, max_size=520))
def test_check_name_property(name: str) -> None:
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        size = None
    should_pass = size is not None and 0 < size <= 512 and "\x00" not in name
    if should_pass:
        assert check_name(name, "key") == name
    else:
        with pytest.raises(InvalidInput):
            check_name(name, "key")


def test_encode_value_of_an_unpicklable_object() -> None:
    with pytest.raises(InvalidInput) as info:
        encode_value(threading.Lock())
    assert type(info.value) is InvalidInput
    assert isinstance(info.value, ValueError)
    assert isinstance(info.value, StateError)
    with pytest.raises(InvalidInput):
        encode_value({"ok": 1, "lock": threading.Lock()})


def test_encode_value_round_trips_what_cloudpickle_can() -> None:
    for value in [None, 0, "s", {"a": [1, 2.5, None]}, (1, 2), {1, 2}, b"x"]:
        data = encode_value(value)
        assert isinstance(data, bytes)
        assert decode_value(data) == value
    double = decode_value(encode_value(lambda x: 2 * x))  # a lambda: cloudpickle, plain pickle loads it
    assert double(21) == 42
    assert decode_value(None) is None


def test_encode_value_too_large() -> None:
    value = "x" * 1000
    size = len(cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL))
    assert encode_value(value, max_size=size) == cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(ValueTooLarge) as info:
        encode_value(value, max_size=size - 1)
    assert (info.value.size, info.value.limit) == (size, size - 1)
    assert isinstance(info.value, InvalidInput)
    assert str(size) in str(info.value)
    assert str(size - 1) in str(info.value)
    with pytest.raises(ValueTooLarge) as info:
        encode_value(value, max_size=100)
    assert (info.value.size, info.value.limit) == (size, 100)


def test_check_size() -> None:
    assert check_size(b"abc", 3) == b"abc"
    assert check_size(b"", 0) == b""
    with pytest.raises(ValueTooLarge) as info:
        check_size(b"abcd", 3)
    assert (info.value.size, info.value.limit) == (4, 3)
