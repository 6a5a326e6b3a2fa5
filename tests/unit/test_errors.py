"""The error family: hierarchy, attributes, and pickling across actor boundaries."""

from __future__ import annotations

import pickle

import cloudpickle
import pytest

import shardstate
from shardstate._errors import (
    ERROR_CLASSES,
    ConflictError,
    DecodeError,
    Deferred,
    InvalidInput,
    NotPrimary,
    ShardLoading,
    StaleShardMap,
    StateError,
    Unavailable,
    UpdateError,
    ValueTooLarge,
)


def make(cls: type[StateError]) -> StateError:
    if cls is ValueTooLarge:
        return ValueTooLarge("too big", 1234, 1000)
    if cls is UpdateError:
        return UpdateError("cannot increment a str", 3, "not_number")
    return cls(f"{cls.__name__} happened")


ATTRS = ("args", "message", "retriable", "op_index", "code", "size", "limit")


def attrs(exc: StateError) -> dict[str, object]:
    return {name: getattr(exc, name, "<none>") for name in ATTRS} | {"str": str(exc), "type": type(exc)}


def test_error_classes_are_the_family() -> None:
    assert set(ERROR_CLASSES) == {
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
    }


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("dumps", [pickle.dumps, cloudpickle.dumps], ids=["pickle", "cloudpickle"])
def test_round_trip(cls: type[StateError], dumps: object) -> None:
    exc = make(cls)
    back = pickle.loads(dumps(exc))  # type: ignore[operator]
    assert type(back) is cls
    assert attrs(back) == attrs(exc)
    assert back.message == exc.message != ""
    # and it is still raisable and catchable as a StateError
    with pytest.raises(StateError):
        raise back


def test_attributes() -> None:
    too_big = ValueTooLarge("value is 1234 bytes", 1234, 1000)
    assert (too_big.size, too_big.limit, too_big.message) == (1234, 1000, "value is 1234 bytes")
    assert str(too_big) == "value is 1234 bytes"
    failed = UpdateError("cannot increment a str", 3, "not_number")
    assert (failed.op_index, failed.code, failed.message) == (3, "not_number", "cannot increment a str")
    assert str(failed) == "op 3 (not_number): cannot increment a str"
    assert UpdateError("x").op_index == 0
    assert UpdateError("x").code == "bad_op"
    assert StateError().message == ""
    assert InvalidInput("bad key").message == "bad key"


def test_retriable() -> None:
    assert Unavailable("down").retriable is True
    assert StaleShardMap("moved").retriable is True
    for cls in (StateError, InvalidInput, ValueTooLarge, UpdateError, ConflictError):
        assert make(cls).retriable is False


def test_hierarchy() -> None:
    for cls in ERROR_CLASSES:
        assert issubclass(cls, StateError)
        assert issubclass(cls, Exception)
    assert issubclass(ValueTooLarge, InvalidInput)
    assert issubclass(InvalidInput, ValueError)
    assert issubclass(ValueTooLarge, ValueError)
    assert issubclass(StaleShardMap, Unavailable)
    assert issubclass(ShardLoading, Unavailable)
    assert ShardLoading("loading, 5%").retriable is True
    assert not issubclass(UpdateError, InvalidInput)
    assert not issubclass(ConflictError, InvalidInput)
    assert not issubclass(Unavailable, InvalidInput)
    with pytest.raises(ValueError, match="too big"):
        raise ValueTooLarge("too big", 2, 1)


def test_public_names_are_the_same_classes() -> None:
    assert shardstate.StateError is StateError
    assert shardstate.InvalidInput is InvalidInput
    assert shardstate.ValueTooLarge is ValueTooLarge
    assert shardstate.UpdateError is UpdateError
    assert shardstate.ConflictError is ConflictError
    assert shardstate.Unavailable is Unavailable
