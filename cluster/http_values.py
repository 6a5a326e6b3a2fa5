"""Values and names as the HTTP API sees them (pure: no Ray, no I/O).

- A stored value goes out as JSON when it has a JSON form, else as ``{"$type": "python", "repr":
  "..."}`` (read-only over HTTP); a value that does not even unpickle here goes out the same way.
- A body comes in as JSON only (``NaN``/``Infinity`` refused), never as a pickle.
- Group and key names travel percent-encoded in the path, so a name may hold ``/``: they are taken
  from the raw path, segment by segment (see :func:`split_item_path`).
- ``If-Match``/``ETag`` carry a version as ``"<n>"``.
"""

from __future__ import annotations

import json
import pickle
from typing import Any
from urllib.parse import unquote

from shardstate._errors import InvalidInput
from shardstate.shards.update_ops import has_json_form

#: at most this many characters of a Python object's repr are shown
REPR_CHARS = 2000
#: the path prefix under which groups and their items live
GROUPS_PATH = "/api/v1/groups/"


def python_form(text: str) -> dict[str, str]:
    """The JSON stand-in for a value with no JSON form."""
    if len(text) > REPR_CHARS:
        text = text[:REPR_CHARS] + "..."
    return {"$type": "python", "repr": text}


def json_form(value: Any) -> Any:
    """``value`` as JSON can carry it: itself, or its :func:`python_form`."""
    if has_json_form(value):
        return value
    try:
        return python_form(repr(value))
    except Exception as exc:  # a broken __repr__
        return python_form(f"<{type(value).__name__}: repr failed: {exc}>")


def json_form_of_bytes(data: bytes) -> Any:
    """A stored (pickled) value as :func:`json_form` shows it; one that does not unpickle in this
    process (its class's module is missing) is shown as a Python object too."""
    try:
        value = pickle.loads(data)
    except Exception as exc:
        return python_form(f"<undecodable value: {type(exc).__name__}: {exc}>")
    return json_form(value)


def _no_constant(name: str) -> Any:
    raise InvalidInput(f"the body is not JSON: {name} is not a JSON number")


def parse_json(body: bytes, what: str = "the body") -> Any:
    """Parse a request body as strict JSON (UTF-8; no NaN or Infinity); InvalidInput if it is not."""
    if not body.strip():
        raise InvalidInput(f"{what} is empty: send a JSON value")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except InvalidInput:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidInput(f"{what} is not JSON: {exc}") from None


def dumps(value: Any) -> bytes:
    """Compact JSON of an answer (values already in their :func:`json_form`)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def split_item_path(raw_path: str) -> tuple[str, str | None, str | None] | None:
    """``/api/v1/groups/<g>[/items[/<k>]]`` (raw, percent-encoded) → ``(route, group, key)`` with
    the names decoded and ``route`` the path with placeholders (``/api/v1/groups/_/items/_``), or
    None when the path is not under :data:`GROUPS_PATH`."""
    if not raw_path.startswith(GROUPS_PATH):
        return None
    parts = raw_path[len(GROUPS_PATH) :].split("/")
    group = unquote(parts[0], errors="strict")
    if len(parts) == 1:
        return GROUPS_PATH + "_", group, None
    if parts[1] != "items":
        return None
    if len(parts) == 2:
        return GROUPS_PATH + "_/items", group, None
    if len(parts) == 3:
        return GROUPS_PATH + "_/items/_", group, unquote(parts[2], errors="strict")
    return None


def parse_version_header(value: str, header: str) -> int | None:
    """The version an ``If-Match`` names (``"5"``, ``W/"5"`` or ``5``); None for ``*``."""
    text = value.strip()
    if text == "*":
        return None
    if text.startswith("W/"):
        text = text[2:]
    text = text.strip('"')
    if not text.isdigit() or len(text) > 19:
        raise InvalidInput(f'{header} must name one version as an ETag ("5"), got {value!r}')
    return int(text)


def etag(version: int) -> str:
    """The ETag of a version."""
    return f'"{version}"'
