"""The HTTP API v1 against a live console actor (uvicorn in a Ray actor) of the session cluster."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
import ray
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shardstate
from shardstate.cluster.console import ConsoleWarning, find_console

pytestmark = pytest.mark.timeout(240)


def item_url(group: str, key: str | None = None) -> str:
    path = f"/api/v1/groups/{quote(group, safe='')}/items"
    return path if key is None else f"{path}/{quote(key, safe='')}"


class Unpicklable:
    """A value with no JSON form (a Python object)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __repr__(self) -> str:
        return f"Unpicklable({self.n})"


# -- auth ---------------------------------------------------------------------------------------
ROUTES = [
    ("GET", "/api/v1/groups"),
    ("GET", "/api/v1/groups/g/items"),
    ("GET", "/api/v1/groups/g/items/k"),
    ("PUT", "/api/v1/groups/g/items/k"),
    ("PATCH", "/api/v1/groups/g/items/k"),
    ("DELETE", "/api/v1/groups/g/items/k"),
    ("DELETE", "/api/v1/groups/g"),
    ("GET", "/api/v1/events"),
    ("GET", "/api/v1/cluster"),
    ("GET", "/api/v1/openapi.json"),
    ("POST", "/api/v1/dead-letters/retry"),
    ("GET", "/api/v1/no-such-route"),
    ("GET", "/static/app.js"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
@pytest.mark.parametrize("auth", [None, "Bearer wrong-token", "Basic abc", "Bearer x"])
def test_every_route_needs_the_token(
    console: shardstate.ConsoleInfo, state: shardstate.StateClient, method: str, path: str, auth: str | None
) -> None:
    state.set("g", "k", {"v": 1})
    headers = {} if auth is None else {"Authorization": auth}
    response = httpx.request(
        method, console.url.rstrip("/") + path, headers=headers, json={"v": 2}, timeout=30
    )
    assert response.status_code == 401
    if path.startswith("/api/"):
        assert response.json()["error"]["type"] == "Unauthorized"
    assert state.get("g", "k") == {"v": 1}  # nothing changed


def test_the_page_without_a_token_is_a_login_form(console: shardstate.ConsoleInfo) -> None:
    response = httpx.get(console.url, timeout=30)
    assert response.status_code == 401
    assert 'name="token"' in response.text
    assert httpx.get(console.url, params={"token": "nope"}, timeout=30).status_code == 401


def test_token_in_the_url_sets_a_cookie_that_then_authenticates(
    console: shardstate.ConsoleInfo, state: shardstate.StateClient, group: str
) -> None:
    with httpx.Client(base_url=console.url, timeout=30) as browser:
        response = browser.get("/", params={"token": console.token})
        assert response.status_code == 303
        assert response.headers["location"] == "/"
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie
        assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
        assert browser.get("/api/v1/groups").status_code == 200
        # a write by cookie needs the CSRF header
        refused = browser.put(item_url(group, "k"), json=1)
        assert refused.status_code == 401
        assert state.get(group, "k") is None
        accepted = browser.put(item_url(group, "k"), json=1, headers={"X-Shardstate": "1"})
        assert accepted.status_code == 200
        assert state.get(group, "k") == 1


def test_responses_carry_security_headers(http: httpx.Client) -> None:
    response = http.get("/api/v1/groups")
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "default-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["cache-control"] == "no-store"


# -- groups and items ---------------------------------------------------------------------------
def test_groups_have_real_counts(http: httpx.Client, state: shardstate.StateClient, group: str) -> None:
    state.set_many(group, {f"k{i}": i for i in range(37)})
    other = group + ":sub"
    state.set(other, "x", 1)
    groups = {g["group"]: g["count"] for g in http.get("/api/v1/groups").json()["groups"]}
    assert groups[group] == 37
    assert groups[other] == 1
    listed = [g["group"] for g in http.get("/api/v1/groups").json()["groups"]]
    assert listed == sorted(listed)
    assert not any(g.startswith("__shardstate") for g in listed)
    state.delete(group, "k0")
    groups = {g["group"]: g["count"] for g in http.get("/api/v1/groups").json()["groups"]}
    assert groups[group] == 36
    assert http.delete(f"/api/v1/groups/{quote(other, safe='')}").json() == {"removed": 1}
    assert other not in {g["group"] for g in http.get("/api/v1/groups").json()["groups"]}


def test_get_put_patch_delete_one_item(http: httpx.Client, state: shardstate.StateClient, group: str) -> None:
    key = "a/b c:é"  # a slash, a space and non-ASCII travel percent-encoded
    assert http.get(item_url(group, key)).status_code == 404
    put = http.put(item_url(group, key), json={"n": 1, "tags": ["x"]})
    assert put.status_code == 200
    body = put.json()
    assert body["old_value"] is None
    assert body["new_value"] == {"n": 1, "tags": ["x"]}
    assert state.get(group, key) == {"n": 1, "tags": ["x"]}
    got = http.get(item_url(group, key))
    assert got.json() == {"key": key, "value": {"n": 1, "tags": ["x"]}, "version": body["version"]}
    assert got.headers["etag"] == f'"{body["version"]}"'
    assert state.get_entry(group, key).version == body["version"]

    ops = [{"type": "increment", "path": "n", "by": 4}, {"type": "append", "path": "tags", "value": "y"}]
    patched = http.patch(item_url(group, key), json={"ops": ops})
    assert patched.status_code == 200
    assert patched.json()["old_value"] == {"n": 1, "tags": ["x"]}
    assert patched.json()["new_value"] == {"n": 5, "tags": ["x", "y"]}
    assert patched.json()["version"] == state.get_entry(group, key).version

    deleted = http.delete(item_url(group, key))
    assert deleted.json() == {"old_value": {"n": 5, "tags": ["x", "y"]}}
    assert state.get(group, key) is None
    assert http.delete(item_url(group, key)).status_code == 404


def test_patch_that_fails_is_422_with_op_index_and_changes_nothing(
    http: httpx.Client, state: shardstate.StateClient, group: str
) -> None:
    state.set(group, "k", {"n": 1, "s": "text"})
    ops = [{"type": "increment", "path": "n"}, {"type": "increment", "path": "s"}]
    response = http.patch(item_url(group, "k"), json={"ops": ops})
    assert response.status_code == 422
    error = response.json()
    assert error["error"]["type"] == "UpdateError"
    assert (error["error"]["op_index"], error["error"]["code"]) == (1, "not_number")
    assert (error["op_index"], error["code"]) == (1, "not_number")
    assert state.get(group, "k") == {"n": 1, "s": "text"}
    bad_op = http.patch(item_url(group, "k"), json={"ops": [{"type": "explode", "path": "n"}]})
    assert bad_op.status_code in (400, 422)
    assert state.get(group, "k") == {"n": 1, "s": "text"}


def test_if_match_and_if_none_match(http: httpx.Client, state: shardstate.StateClient, group: str) -> None:
    created = http.put(item_url(group, "k"), json=1, headers={"If-None-Match": "*"})
    assert created.status_code == 200
    again = http.put(item_url(group, "k"), json=2, headers={"If-None-Match": "*"})
    assert again.status_code == 412
    assert again.json()["error"]["type"] == "ConflictError"
    version = created.json()["version"]
    stale = http.put(item_url(group, "k"), json=3, headers={"If-Match": f'"{version + 1000}"'})
    assert stale.status_code == 412
    assert state.get(group, "k") == 1
    fresh = http.put(item_url(group, "k"), json=3, headers={"If-Match": f'"{version}"'})
    assert fresh.status_code == 200
    assert state.get(group, "k") == 3
    patch_stale = http.patch(
        item_url(group, "k"),
        json={"ops": [{"type": "set", "path": "", "value": 9}]},
        headers={"If-Match": '"1"'},
    )
    assert patch_stale.status_code == 412
    delete_stale = http.delete(item_url(group, "k"), headers={"If-Match": f'"{version}"'})
    assert delete_stale.status_code == 412
    assert state.get(group, "k") == 3
    assert http.put(item_url(group, "absent"), json=1, headers={"If-Match": "*"}).status_code == 412
    assert state.get(group, "absent") is None
    current = fresh.json()["version"]
    assert http.delete(item_url(group, "k"), headers={"If-Match": f'"{current}"'}).status_code == 200
    assert state.get(group, "k") is None


def test_cas_race_two_writers_one_wins(
    console: shardstate.ConsoleInfo, state: shardstate.StateClient, group: str
) -> None:
    """Many rounds: two writers PUT with the same If-Match at once; exactly one wins each round."""
    headers = {"Authorization": f"Bearer {console.token}"}
    clients = [httpx.Client(base_url=console.url, headers=headers, timeout=60) for _ in range(2)]
    try:
        for round_ in range(25):
            version = (
                state.set(group, "doc", {"round": round_, "by": None})
                and state.get_entry(group, "doc").version
            )
            barrier = threading.Barrier(2)
            statuses: list[int] = [0, 0]

            def write(
                i: int,
                version: int = version,
                round_: int = round_,
                barrier: threading.Barrier = barrier,
                statuses: list[int] = statuses,
            ) -> None:
                barrier.wait()
                response = clients[i].put(
                    item_url(group, "doc"),
                    json={"round": round_, "by": i},
                    headers={"If-Match": f'"{version}"'},
                )
                statuses[i] = response.status_code

            threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert sorted(statuses) == [200, 412], statuses
            winner = statuses.index(200)
            assert state.get(group, "doc") == {"round": round_, "by": winner}
    finally:
        for client in clients:
            client.close()


def test_python_objects_show_as_read_only(
    http: httpx.Client, state: shardstate.StateClient, group: str
) -> None:
    state.set(group, "obj", Unpicklable(3))
    state.set(group, "tuple", (1, 2))
    state.set(group, "nan", float("nan"))
    items = {i["key"]: i["value"] for i in http.get(item_url(group)).json()["items"]}
    assert items["obj"] == {"$type": "python", "repr": "Unpicklable(3)"}
    assert items["tuple"] == {"$type": "python", "repr": "(1, 2)"}
    assert items["nan"] == {"$type": "python", "repr": "nan"}
    assert http.get(item_url(group, "obj")).json()["value"]["$type"] == "python"
    for response in (
        http.put(item_url(group, "obj"), json=1),
        http.patch(item_url(group, "tuple"), json={"ops": [{"type": "set", "path": "a", "value": 1}]}),
        http.delete(item_url(group, "obj")),
    ):
        assert response.status_code == 409
        assert response.json()["error"]["type"] == "ReadOnly"
    assert state.get(group, "obj").n == 3
    assert state.get(group, "tuple") == (1, 2)


@pytest.mark.parametrize(
    ("method", "path", "body", "headers"),
    [
        ("PUT", "/api/v1/groups/g/items/k", b"{not json", {}),
        ("PUT", "/api/v1/groups/g/items/k", b"", {}),
        ("PUT", "/api/v1/groups/g/items/k", b"NaN", {}),
        ("PUT", "/api/v1/groups/g/items/k", b'{"a": Infinity}', {}),
        ("PUT", "/api/v1/groups/g/items/k", b"\xff\xfe", {}),
        ("PUT", "/api/v1/groups/g%00x/items/k", b"1", {}),
        ("PUT", "/api/v1/groups/g/items/" + "x" * 600, b"1", {}),
        ("PUT", "/api/v1/groups/g/items/k%ff", b"1", {}),
        ("PUT", "/api/v1/groups/__shardstate:triggers/items/k", b"1", {}),
        ("DELETE", "/api/v1/groups/__shardstate:triggers", b"", {}),
        ("PUT", "/api/v1/groups/g/items/k", b"1", {"If-Match": "not-a-version"}),
        ("PUT", "/api/v1/groups/g/items/k", b"1", {"If-None-Match": '"3"'}),
        ("PATCH", "/api/v1/groups/g/items/k", b'{"ops": "increment"}', {}),
        ("PATCH", "/api/v1/groups/g/items/k", b"[1]", {}),
        ("GET", "/api/v1/groups/g/items?limit=0", b"", {}),
        ("GET", "/api/v1/groups/g/items?limit=abc", b"", {}),
        ("GET", "/api/v1/groups/g/items?limit=100000", b"", {}),
        ("GET", "/api/v1/groups/g/items?cursor=!!!", b"", {}),
        ("GET", "/api/v1/events?group=", b"", {}),
        ("POST", "/api/v1/dead-letters/retry", b'{"trigger": 1}', {}),
    ],
)
def test_bad_requests_are_400_and_change_nothing(
    http: httpx.Client,
    state: shardstate.StateClient,
    method: str,
    path: str,
    body: bytes,
    headers: dict[str, str],
) -> None:
    state.set("g", "k", "before")
    before = state.group_counts()
    response = http.request(method, path, content=body, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "InvalidInput"
    assert state.get("g", "k") == "before"
    assert state.group_counts() == before


def test_too_large_bodies_are_413_before_anything_is_stored(
    http: httpx.Client, state: shardstate.StateClient, group: str
) -> None:
    limit = state.config["max_value_size"] + (1 << 20)
    # a declared length over the limit is refused before the body is read (raw socket: no body sent)
    host, port = http.base_url.host, http.base_url.port
    with socket.create_connection((host, port), timeout=30) as raw:
        token = http.headers["authorization"]
        raw.sendall(
            f"PUT {item_url(group, 'k')} HTTP/1.1\r\nHost: x\r\nAuthorization: {token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {limit + 1}\r\n\r\n".encode()
        )
        assert raw.recv(4096).split(b"\r\n", 1)[0] == b"HTTP/1.1 413 Request Entity Too Large"
    big = b'"' + b"x" * (limit + 10) + b'"'

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked; refused while it is read
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]

    streamed = http.put(item_url(group, "k"), content=chunks())
    assert streamed.status_code == 413
    assert streamed.json()["error"]["type"] == "ValueTooLarge"
    # within the body limit but over max_value_size once stored: ValueTooLarge from the client's check
    value = "y" * (state.config["max_value_size"] + 10)
    assert http.put(item_url(group, "k2"), json=value).status_code == 413
    assert state.get(group, "k") is None
    assert state.get(group, "k2") is None


def test_idempotency_key_applies_a_retried_write_once(
    http: httpx.Client, state: shardstate.StateClient, group: str
) -> None:
    ops = {"ops": [{"type": "increment", "path": "n"}]}
    first = http.patch(item_url(group, "c"), json=ops, headers={"Idempotency-Key": "retry-1"})
    second = http.patch(item_url(group, "c"), json=ops, headers={"Idempotency-Key": "retry-1"})
    assert first.status_code == second.status_code == 200
    assert state.get(group, "c") == {"n": 1}
    assert second.json()["new_value"] == {"n": 1}


# -- paging ---------------------------------------------------------------------------------------
def test_prefix_and_pages(http: httpx.Client, state: shardstate.StateClient, group: str) -> None:
    keys = [f"user:{i:03}" for i in range(120)] + [f"order:{i:03}" for i in range(30)]
    state.set_many(group, {k: {"k": k} for k in keys})
    seen: list[str] = []
    cursor = None
    while True:
        params: dict[str, Any] = {"limit": 50, "prefix": "user:"}
        if cursor:
            params["cursor"] = cursor
        page = http.get(item_url(group), params=params).json()
        seen += [i["key"] for i in page["items"]]
        assert all(i["value"] == {"k": i["key"]} and i["version"] > 0 for i in page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == sorted(k for k in keys if k.startswith("user:"))
    everything = http.get(item_url(group), params={"limit": 1000}).json()
    assert [i["key"] for i in everything["items"]] == sorted(keys)
    assert everything["next_cursor"] is None
    assert http.get(item_url(group), params={"prefix": "nothing"}).json() == {
        "items": [],
        "next_cursor": None,
    }
    assert http.get(item_url("no-such-group-" + group)).json() == {"items": [], "next_cursor": None}


def test_pagination_over_10000_items_while_writers_run(
    http: httpx.Client, state: shardstate.StateClient, group: str
) -> None:
    """Every key that exists for the whole scan comes exactly once, while writers create, update
    and delete other keys (and rewrite the scanned ones) of the same group."""
    stable = {f"s{i:05}": i for i in range(10_000)}
    state.set_many(group, stable)
    stop = threading.Event()
    writes = [0]

    def writer(seed: int) -> None:
        client = shardstate.connect(cluster=state.cluster)
        i = 0
        while not stop.is_set():
            i += 1
            churn = f"c{seed}-{i % 300:03}"
            client.set(group, churn, i)  # new keys all over the key space ("c" < "s" < "t")
            client.set(group, f"t{seed}-{i:06}", i)
            if i % 3 == 0:
                client.delete(group, f"c{seed}-{(i * 7) % 300:03}")
            client.update(group, f"s{(i * 37) % 10_000:05}", [{"type": "set", "path": "", "value": -i}])
            writes[0] += 1

    threads = [threading.Thread(target=writer, args=(n,), daemon=True) for n in range(2)]
    for t in threads:
        t.start()
    try:
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            params: dict[str, Any] = {"limit": 250}
            if cursor:
                params["cursor"] = cursor
            page = http.get(item_url(group), params=params).json()
            pages += 1
            seen += [i["key"] for i in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert writes[0] > 0
    assert len(seen) == len(set(seen)), "a key came twice"
    assert seen == sorted(seen)
    missing = set(stable) - set(seen)
    assert not missing, f"{len(missing)} keys that existed for the whole scan were skipped"
    assert pages >= 40


# -- events ---------------------------------------------------------------------------------------
def test_sse_delivers_a_write_and_filters_by_group_and_key(
    sse: Callable[..., Any], state: shardstate.StateClient, group: str
) -> None:
    by_group = sse({"group": group})
    by_key = sse({"group": group, "key": "watched"})
    everything = sse()
    state.set(group + "-other", "x", 0)
    state.set(group, "plain", {"a": 1})
    state.update(group, "watched", [{"type": "increment", "path": "n"}])
    state.delete(group, "plain")
    events = by_group.take(3)
    assert [(e["data"]["event_type"], e["data"]["key"]) for e in events] == [
        ("state:created", "plain"),
        ("state:created", "watched"),
        ("state:deleted", "plain"),
    ]
    first = events[0]
    assert first["event"] == "state"
    assert first["data"]["type"] == "state"
    assert first["data"]["scope"] == group
    assert first["data"]["new_value"] == {"a": 1}
    assert first["data"]["version"] == state.get_entry(group, "watched").version - 1
    assert first["id"].startswith(f"{state.cluster}/")
    keyed = by_key.take(1)[0]
    assert keyed["data"]["key"] == "watched"
    assert keyed["data"]["new_value"] == {"n": 1}
    assert by_key.events.empty() or by_key.events.get(timeout=1)["data"]["key"] == "watched"
    scopes = [e["data"]["scope"] for e in everything.take(4)]
    assert group + "-other" in scopes
    assert scopes.count(group) == 3


def test_sse_event_arrives_soon_after_the_write(
    sse: Callable[..., Any], state: shardstate.StateClient, group: str
) -> None:
    """Latency is measured by bench/sse_latency.py; here only that it arrives (generous bound)."""
    reader = sse({"group": group})
    for i in range(5):
        state.set(group, "k", i)
        event = reader.take(1, timeout=30)[0]
        assert event["data"]["new_value"] == i


@pytest.mark.parametrize("filtered", [True, False])
def test_sse_resumes_after_last_event_id(
    sse: Callable[..., Any], state: shardstate.StateClient, group: str, filtered: bool
) -> None:
    params = {"group": group} if filtered else {}
    reader = sse(params)
    for i in range(3):
        state.set(group, f"k{i}", i)
    taken = [e for e in reader.take(3 if filtered else 3) if e["data"]["scope"] == group]
    assert [e["data"]["key"] for e in taken] == ["k0", "k1", "k2"]
    reader.close()
    last = taken[1]["id"]  # resume after k1: k2 comes again, then what was written while away
    for i in range(3, 6):
        state.set(group, f"k{i}", i)
    resumed = sse(params, last_id=last)
    got = [e for e in resumed.take(4) if e["data"]["scope"] == group]
    assert [e["data"]["key"] for e in got] == ["k2", "k3", "k4", "k5"]


def test_sse_with_a_bad_last_event_id_is_400(http: httpx.Client) -> None:
    response = http.get("/api/v1/events", headers={"Last-Event-ID": "garbage"})
    assert response.status_code == 400


# -- cluster, openapi, console lifecycle ----------------------------------------------------------
def test_cluster_view(http: httpx.Client, state: shardstate.StateClient, group: str) -> None:
    state.set(group, "k", 1)
    view = http.get("/api/v1/cluster").json()
    assert view["cluster"] == state.cluster
    assert len(view["shards"]) == len(state.shard_info())
    shard = view["shards"][0]
    for field in ("index", "node", "role", "epoch", "keys", "ops_per_s"):
        assert field in shard
    assert view["keys"] == sum(s["keys"] for s in view["shards"]) >= 1
    assert any(n["alive"] for n in view["nodes"])
    assert {"triggers", "dead_letters", "trigger_lag"} <= set(view)


def test_openapi_document_lists_the_routes(http: httpx.Client) -> None:
    doc = http.get("/api/v1/openapi.json").json()
    paths = doc["paths"]
    for path in (
        "/api/v1/groups",
        "/api/v1/groups/{group}/items",
        "/api/v1/groups/{group}/items/{key}",
        "/api/v1/groups/{group}",
        "/api/v1/events",
        "/api/v1/cluster",
    ):
        assert path in paths, path
    assert {"get", "put", "patch", "delete"} <= set(paths["/api/v1/groups/{group}/items/{key}"])


def test_start_console_again_returns_the_running_one(
    console: shardstate.ConsoleInfo, state: shardstate.StateClient
) -> None:
    again = state.start_console(port=0)
    assert again == console


@pytest.mark.parametrize(
    ("host", "port"), [("", 80), ("127.0.0.1", -1), ("127.0.0.1", 70000), ("a b", 1), (1, 1)]
)
def test_bad_console_addresses_are_invalid_input(new_cluster: dict[str, str], host: Any, port: Any) -> None:
    client = shardstate.connect(
        cluster=new_cluster["cluster"], shards=1, storage=new_cluster["storage"], durability="memory"
    )
    with pytest.raises(shardstate.InvalidInput):
        client.start_console(host=host, port=port)
    assert find_console(new_cluster["cluster"]) is None


def test_a_taken_port_is_unavailable_and_leaves_no_actor(new_cluster: dict[str, str]) -> None:
    client = shardstate.connect(
        cluster=new_cluster["cluster"], shards=1, storage=new_cluster["storage"], durability="memory"
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        with pytest.raises(shardstate.Unavailable):
            client.start_console(port=taken.getsockname()[1])
    deadline = time.monotonic() + 30
    while find_console(new_cluster["cluster"]) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert find_console(new_cluster["cluster"]) is None


def test_binding_beyond_loopback_warns(new_cluster: dict[str, str]) -> None:
    client = shardstate.connect(
        cluster=new_cluster["cluster"], shards=1, storage=new_cluster["storage"], durability="memory"
    )
    with pytest.warns(ConsoleWarning):
        info = client.start_console(host="0.0.0.0", port=0)
    assert "0.0.0.0" not in info.url  # the node's address is shown instead
    assert httpx.get(info.url + "api/v1/groups", timeout=30).status_code == 401


def test_a_killed_console_comes_back_with_the_same_token(new_cluster: dict[str, str]) -> None:
    client = shardstate.connect(
        cluster=new_cluster["cluster"], shards=1, storage=new_cluster["storage"], durability="memory"
    )
    client.set("g", "k", 1)
    info = client.start_console(port=0)
    pid = ray.get(find_console(new_cluster["cluster"]).info.remote())["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while True:
        try:
            again = client.start_console(port=0)
            response = httpx.get(
                again.url + "api/v1/groups/g/items/k",
                headers={"Authorization": f"Bearer {again.token}"},
                timeout=10,
            )
            if response.status_code == 200:
                break
        except (shardstate.Unavailable, httpx.HTTPError):
            pass
        assert time.monotonic() < deadline, "the console did not come back"
        time.sleep(0.5)
    assert again.token == info.token
    assert response.json()["value"] == 1
    assert ray.get(find_console(new_cluster["cluster"]).info.remote())["pid"] != pid


def test_shutdown_stops_the_console(new_cluster: dict[str, str]) -> None:
    client = shardstate.connect(
        cluster=new_cluster["cluster"], shards=1, storage=new_cluster["storage"], durability="memory"
    )
    info = client.start_console(port=0)
    assert find_console(new_cluster["cluster"]) is not None
    shardstate.shutdown(new_cluster["cluster"])
    assert find_console(new_cluster["cluster"]) is None
    with pytest.raises(httpx.HTTPError):
        httpx.get(info.url, timeout=5)


def test_unique_names_do_not_collide(http: httpx.Client, state: shardstate.StateClient) -> None:
    group = f"a/b-{uuid.uuid4().hex}"
    assert http.put(item_url(group, "x/y"), json=1).status_code == 200
    assert state.get(group, "x/y") == 1
    assert state.get(group, "x") is None


# -- fuzzing: whatever a client sends, the answer is a typed 4xx or a 200, never a 5xx -------------
NAMES = st.text(st.characters(codec="utf-8"), min_size=0, max_size=40) | st.sampled_from(
    ["g", "fuzz", "__shardstate:triggers", "a/b", "%", "..", "x" * 600]
)
BODIES = st.one_of(
    st.binary(max_size=200),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=10,
    ).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {
            "ops": st.lists(
                st.fixed_dictionaries(
                    {
                        "type": st.sampled_from(["increment", "set", "merge", "append", "remove", "bogus"]),
                        "path": NAMES,
                        "value": st.integers() | st.text(max_size=5),
                    }
                ),
                max_size=3,
            )
        }
    ).map(lambda v: json.dumps(v).encode()),
)
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "If-Match": st.sampled_from(['"1"', "*", 'W/"3"', "junk", '"99999999999999999999999"']),
        "If-None-Match": st.sampled_from(["*", '"1"']),
        "Idempotency-Key": st.text(
            st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=300
        ),
        "Last-Event-ID": st.sampled_from(["x/0/1", "garbage", "a/b/c"]),
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    method=st.sampled_from(["GET", "PUT", "PATCH", "DELETE", "POST", "HEAD"]),
    group=NAMES,
    key=st.none() | NAMES,
    query=st.dictionaries(st.sampled_from(["limit", "cursor", "prefix", "group", "key"]), NAMES, max_size=3),
    body=BODIES,
    headers=HEADERS,
)
def test_fuzzed_requests_get_typed_answers(
    console: shardstate.ConsoleInfo,
    method: str,
    group: str,
    key: str | None,
    query: dict[str, str],
    body: bytes,
    headers: dict[str, str],
) -> None:
    path = f"/api/v1/groups/{quote(group, safe='')}"
    if key is not None:
        path += f"/items/{quote(key, safe='')}"
    headers = {**headers, "Authorization": f"Bearer {console.token}"}
    with httpx.Client(base_url=console.url, timeout=60) as client:
        response = client.request(method, path, params=query, content=body, headers=headers)
    assert response.status_code < 500, (response.status_code, response.text[:500])
    assert response.status_code in (200, 400, 404, 405, 409, 412, 413, 422), response.text[:500]
    if response.status_code >= 400 and method != "HEAD" and response.status_code != 405:
        error = response.json()["error"]
        assert isinstance(error["type"], str)
        assert isinstance(error["message"], str)
