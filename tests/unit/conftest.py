"""The unit layer is Ray-free: any attempt to start (or join) Ray here is a test bug."""

from __future__ import annotations

from typing import Any

import pytest
import ray


def _no_ray(*_args: Any, **_kwargs: Any) -> None:
    raise RuntimeError("unit tests must not start Ray")


@pytest.fixture(autouse=True)
def _forbid_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``ray.init`` raise for every unit test."""
    monkeypatch.setattr(ray, "init", _no_ray)
