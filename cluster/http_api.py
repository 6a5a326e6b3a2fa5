"""The HTTP API v1 and the web console's pages: a FastAPI app around one async state client.

Served by the console actor (:mod:`shardstate.cluster.console`) with uvicorn. Every request passes
:class:`Gate` first, a plain ASGI middleware that

- authenticates it: ``Authorization: Bearer <token>``, or the console's cookie (set by ``GET
  /?token=...``), compared in constant time; anything else is 401 before a byte of the body is read.
  Requests that change state and came with the cookie must also carry ``X-Shardstate: 1``, which a
  page on another origin cannot send (a CSRF guard);
- refuses a body whose declared length exceeds the limit (413; a body that turns out longer while
  it is read is refused the same way, see :func:`read_body`);
- takes group and key names from the raw path, so percent-encoded names may hold ``/``.

Values are JSON in and out; the server never unpickles a byte it received. Errors are
``{"error": {"type": "<StateError subclass>", "message": ...}}``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections import OrderedDict
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, MutableMapping
from importlib import resources
from typing import Any
from urllib.parse import parse_qs

import ray
from fastapi import FastAPI, Query
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, RedirectResponse, Response, StreamingResponse

from shardstate._client import AsyncStateClient
from shardstate._errors import (
    ConflictError,
    InvalidInput,
    NotFound,
    ReadOnly,
    StateError,
    Unavailable,
    UpdateError,
    ValueTooLarge,
)
from shardstate._requests import Request as ShardRequest
from shardstate._requests import delete_request, set_request, update_request
from shardstate._watch import AsyncWatcher
from shardstate.cluster.http_values import (
    dumps,
    etag,
    json_form,
    json_form_of_bytes,
    parse_json,
    parse_version_header,
    split_item_path,
)
from shardstate.cluster.slots import slot_of
from shardstate.shards.validation import check_name

log = logging.getLogger("shardstate.console")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

COOKIE = "shardstate_token"
CSRF_HEADER = b"x-shardstate"
#: bytes of a body beyond the cluster's max value size (JSON is larger than its pickle, and ops)
BODY_SLACK = 1 << 20
#: SSE: a comment line this often keeps proxies from closing an idle stream
SSE_KEEPALIVE = 15.0
#: SSE: how many event_id -> (shard -> seq) resume points are remembered for Last-Event-ID
RESUME_POINTS = 50_000
#: seconds the cluster view (shards, nodes, triggers) is reused between requests
CLUSTER_TTL = 1.0
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
STATIC = "console_static"

STATUS: list[tuple[type[StateError], int]] = [
    (ValueTooLarge, 413),
    (InvalidInput, 400),
    (UpdateError, 422),
    (ReadOnly, 409),
    (ConflictError, 412),
    (NotFound, 404),
    (Unavailable, 503),
]


class Unauthorized(StateError):
    """No valid token (HTTP 401)."""


class BodyTooLarge(ValueTooLarge):
    """A request body larger than the server accepts (HTTP 413)."""


def status_of(exc: StateError) -> int:
    """The HTTP status of a StateError."""
    if isinstance(exc, Unauthorized):
        return 401
    for cls, status in STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def error_body(exc: StateError) -> dict[str, Any]:
    """The JSON error document of ``exc`` (UpdateError adds ``op_index`` and ``code``)."""
    error: dict[str, Any] = {"type": type(exc).__name__, "message": exc.message or str(exc)}
    body: dict[str, Any] = {"error": error}
    if isinstance(exc, UpdateError):
        error.update(op_index=exc.op_index, code=exc.code)
        body.update(op_index=exc.op_index, code=exc.code)
    if isinstance(exc, BodyTooLarge):
        error["type"] = "ValueTooLarge"
    return body


def error_response(exc: StateError) -> Response:
    """``exc`` as a JSON error response."""
    return Response(dumps(error_body(exc)), status_of(exc), media_type="application/json")


LOGIN_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>shardstate console</title>
<style>body{font:15px system-ui,sans-serif;max-width:28em;margin:4em auto;color:#222}
input{width:100%;padding:.5em;font:inherit;box-sizing:border-box}
button{margin-top:.8em;padding:.5em 1.2em}</style>
</head><body><h1>shardstate console</h1><p>This console needs the cluster's token
(<code>shardstate console</code> prints it).</p>
<form method="get" action="/"><label for="token">Token</label>
<input id="token" name="token" type="password" autocomplete="off" autofocus>
<button type="submit" id="login">Open</button></form></body></html>"""


class Gate:
    """Authentication, body-size limit, name extraction and security headers, before the app."""

    def __init__(self, app: ASGIApp, token: str, max_body: int) -> None:
        self.app = app
        self.token = token.encode()
        self.max_body = max_body

    def _valid(self, presented: bytes | None) -> bool:
        return presented is not None and hmac.compare_digest(presented, self.token)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        method = scope["method"]
        path = scope["path"]
        bearer = headers.get(b"authorization", b"")
        token = bearer[7:].strip() if bearer[:7].lower() == b"bearer " else None
        by_cookie = False
        if not self._valid(token):
            token = _cookie(headers.get(b"cookie", b""), COOKIE)
            by_cookie = True
        if path == "/" and method == "GET":
            offered = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("token")
            if offered:
                if self._valid(offered[0].encode()):
                    response: Response = RedirectResponse("/", 303)
                    response.set_cookie(COOKIE, offered[0], httponly=True, samesite="strict", path="/")
                else:
                    response = HTMLResponse(LOGIN_PAGE, 401)
                await _secured(response)(scope, receive, send)
                return
        if not self._valid(token):
            if method == "GET" and not path.startswith("/api/"):
                await _secured(HTMLResponse(LOGIN_PAGE, 401))(scope, receive, send)
            else:
                denied = Unauthorized("missing or wrong bearer token (Authorization: Bearer <token>)")
                await _secured(error_response(denied))(scope, receive, send)
            return
        if by_cookie and method not in SAFE_METHODS and headers.get(CSRF_HEADER) != b"1":
            denied = Unauthorized("a request authenticated by the console's cookie needs 'X-Shardstate: 1'")
            await _secured(error_response(denied))(scope, receive, send)
            return
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_body):
            too_large = BodyTooLarge(f"the request body is larger than {self.max_body} bytes")
            await _secured(error_response(too_large))(scope, receive, send)
            return
        try:
            names = split_item_path(scope.get("raw_path", path.encode()).decode("latin-1"))
        except UnicodeDecodeError:
            await _secured(error_response(InvalidInput("a name in the path is not UTF-8")))(
                scope, receive, send
            )
            return
        if names is not None:
            scope = dict(scope, path=names[0], raw_path=names[0].encode(), shardstate_names=names[1:])

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_secured)


SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
]


def _secured(response: Response) -> Response:
    for name, value in SECURITY_HEADERS:
        response.headers[name.decode()] = value.decode()
    return response


def _cookie(raw: bytes, name: str) -> bytes | None:
    for part in raw.split(b";"):
        key, _, value = part.strip().partition(b"=")
        if key == name.encode():
            return value
    return None


def names(request: Request) -> tuple[str, str | None]:
    """The group (and key) a request names, decoded from the raw path and checked."""
    group, key = request.scope.get("shardstate_names", (None, None))
    check_name(group, "group_id")
    if key is not None:
        check_name(key, "key")
    return group, key


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it grows past ``limit`` bytes."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _version_of(payload: tuple[Any, ...]) -> int | None:
    return payload[2] if len(payload) > 2 else None


class Api:
    """The routes' shared state: the client, the limits, the cluster view, SSE resume points."""

    def __init__(self, client: AsyncStateClient, max_body: int) -> None:
        self.client = client
        self.max_body = max_body
        self.resume_points: OrderedDict[str, dict[int, int]] = OrderedDict()
        self._cluster: tuple[float, dict[str, Any]] | None = None
        self._rates: dict[int, tuple[float, int]] = {}
        self._cluster_lock = asyncio.Lock()

    async def run(self, req: ShardRequest) -> Any:
        """Send one request through the client's lanes (coalesced like any client's)."""
        return await self.client._run(req)

    # -- writes with the HTTP API's options: JSON-only targets, the new version returned ------------
    @staticmethod
    def http_write(req: ShardRequest) -> ShardRequest:
        opts = req.cmd[4]
        opts["json_only"] = True
        opts["version"] = True
        return req._replace(decode=lambda payload: payload)

    async def current_version(self, group: str, key: str) -> int:
        """The key's version now (0: absent)."""
        entry = await self.client.get_entry(group, key)
        return 0 if entry is None else entry.version

    def remember(self, event_id: str, marks: dict[int, int]) -> None:
        """Where every followed shard was when ``event_id`` was sent (for Last-Event-ID)."""
        points = self.resume_points
        points[event_id] = marks
        if len(points) > RESUME_POINTS:
            points.popitem(last=False)


def build_app(client: AsyncStateClient, token: str, max_value_size: int) -> ASGIApp:
    """The console's ASGI app: the FastAPI routes behind :class:`Gate`."""
    max_body = max_value_size + BODY_SLACK
    api = Api(client, max_body)
    app = FastAPI(
        title="shardstate HTTP API",
        version="1",
        openapi_url="/api/v1/openapi.json",
        docs_url=None,
        redoc_url=None,
        description="Groups → keys → JSON values on a shardstate cluster. Every route needs "
        "`Authorization: Bearer <token>`.",
    )
    app.state.api = api

    @app.exception_handler(StateError)
    async def on_state_error(_request: Request, exc: StateError) -> Response:
        return error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_request: Request, exc: StarletteHTTPException) -> Response:
        cls = NotFound if exc.status_code == 404 else InvalidInput
        body = {"error": {"type": cls.__name__, "message": str(exc.detail)}}
        return Response(dumps(body), exc.status_code, headers=exc.headers, media_type="application/json")

    @app.exception_handler(RequestValidationError)
    async def on_bad_request(_request: Request, exc: RequestValidationError) -> Response:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return error_response(InvalidInput(problems or "bad request"))

    @app.get("/api/v1/groups", summary="Every non-empty group with its item count")
    async def list_groups() -> Response:
        counts = await client.group_counts()
        return _json({"groups": [{"group": g, "count": n} for g, n in counts.items()]})

    @app.get("/api/v1/groups/{group}/items", summary="A page of a group's items, in key order")
    async def list_items(
        request: Request,
        group: str,
        limit: int = Query(100, ge=1, le=1000),
        cursor: str | None = None,
        prefix: str | None = None,
    ) -> Response:
        group_id, _ = names(request)
        page = await client.page(group_id, limit=limit, cursor=cursor or None, prefix=prefix or None)
        items = [{"key": i.key, "value": json_form(i.value), "version": i.version} for i in page.items]
        return _json({"items": items, "next_cursor": page.next_cursor})

    @app.get("/api/v1/groups/{group}/items/{key}", summary="One item, with its version as ETag")
    async def get_item(request: Request, group: str, key: str) -> Response:
        group_id, item = names(request)
        assert item is not None
        entry = await api.run(_raw_entry(group_id, item))
        if entry is None:
            raise NotFound(f"{group_id!r} has no key {item!r}")
        data, version = entry[0], entry[1]
        body = {"key": item, "value": json_form_of_bytes(data), "version": version}
        return _json(body, headers={"ETag": etag(version)})

    @app.put("/api/v1/groups/{group}/items/{key}", summary="Set an item (If-Match / If-None-Match: *)")
    async def put_item(request: Request, group: str, key: str) -> Response:
        group_id, item = names(request)
        assert item is not None
        value = parse_json(await read_body(request, max_body))
        op_id = request.headers.get("idempotency-key")
        expected = await _precondition(api, request, group_id, item)
        req = set_request(group_id, item, value, max_value_size, op_id=op_id, expected_version=expected)
        payload = await api.run(api.http_write(req))
        old, version = payload[0], _version_of(payload)
        version = version if version is not None else await api.current_version(group_id, item)
        body = {"old_value": None if old is None else json_form_of_bytes(old), "new_value": value}
        return _json({**body, "version": version}, headers={"ETag": etag(version)})

    @app.patch("/api/v1/groups/{group}/items/{key}", summary="Apply update ops atomically")
    async def patch_item(request: Request, group: str, key: str) -> Response:
        group_id, item = names(request)
        assert item is not None
        body = parse_json(await read_body(request, max_body))
        if not isinstance(body, dict) or not isinstance(body.get("ops"), list):
            raise InvalidInput('the body must be {"ops": [UpdateOp, ...]}')
        op_id = request.headers.get("idempotency-key")
        expected = await _precondition(api, request, group_id, item)
        req = update_request(group_id, item, body["ops"], op_id=op_id, expected_version=expected)
        payload = await api.run(api.http_write(req))
        old, new, version = payload[0], payload[1], _version_of(payload)
        version = version if version is not None else await api.current_version(group_id, item)
        answer = {
            "old_value": None if old is None else json_form_of_bytes(old),
            "new_value": None if new is None else json_form_of_bytes(new),
            "version": version,
        }
        return _json(answer, headers={"ETag": etag(version)})

    @app.delete("/api/v1/groups/{group}/items/{key}", summary="Delete an item (If-Match honoured)")
    async def delete_item(request: Request, group: str, key: str) -> Response:
        group_id, item = names(request)
        assert item is not None
        op_id = request.headers.get("idempotency-key")
        expected = await _precondition(api, request, group_id, item)
        req = delete_request(group_id, item, op_id=op_id, expected_version=expected)
        opts = req.cmd[4]
        opts["json_only"] = True
        old = await api.run(req._replace(decode=lambda payload: payload))
        if old is None:
            raise NotFound(f"{group_id!r} has no key {item!r}")
        return _json({"old_value": json_form_of_bytes(old)})

    @app.delete("/api/v1/groups/{group}", summary="Remove every item of a group")
    async def clear_group(request: Request, group: str) -> Response:
        group_id, _ = names(request)
        return _json({"removed": await client.clear(group_id)})

    @app.get("/api/v1/events", summary="Server-Sent Events of state changes (resumable)")
    async def events(request: Request, group: str | None = None, key: str | None = None) -> Response:
        if group is not None:
            check_name(group, "group")
        if key is not None:
            check_name(key, "key")
        last = request.headers.get("last-event-id") or request.query_params.get("last_event_id")
        marks = await _resume_marks(api, last, group)
        stream = _sse(api, request, group, key, marks)
        # The first line comes once the starting point is taken: before the response headers, which
        # a browser's EventSource already announces as "open" (the web console then shows "live").
        first = await anext(stream)
        return StreamingResponse(
            _then(first, stream), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"}
        )

    @app.get("/api/v1/cluster", summary="Shards, nodes, triggers, dead letters and rates")
    async def cluster_view() -> Response:
        return _json(await _cluster_view(api))

    @app.post(
        "/api/v1/dead-letters/retry",
        summary="Run a dead letter's handler again: {retried: true} (removed), or {retried: false, "
        "error, attempts} (it failed again and stays); 404 if there is no such dead letter",
    )
    async def retry_dead_letter(request: Request) -> Response:
        body = parse_json(await read_body(request, max_body))
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("trigger"), str)
            or not isinstance(body.get("event_id"), str)
        ):
            raise InvalidInput('the body must be {"trigger": str, "event_id": str}')
        trigger, event_id = body["trigger"], body["event_id"]
        if await client.retry_dead_letter(trigger, event_id):
            return _json({"retried": True})
        # False: no such dead letter, or the handler failed again (the letter stays, updated)
        for letter in await client.list_dead_letters():
            if letter.trigger == trigger and letter.event.event_id == event_id:
                return _json({"retried": False, "error": letter.error, "attempts": letter.attempts})
        raise NotFound(f"no dead letter {event_id!r} of trigger {trigger!r}")

    @app.get("/", include_in_schema=False)
    async def index() -> Response:
        return _static("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        return _static(name)

    return Gate(app, token, max_body)


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(body), status, headers=headers, media_type="application/json")


def _static(name: str) -> Response:
    folder = resources.files("shardstate").joinpath(STATIC)
    if "/" in name or name.startswith(".") or not folder.joinpath(name).is_file():
        raise NotFound(f"no file {name!r}")
    with resources.as_file(folder.joinpath(name)) as path:
        return FileResponse(path)


def _raw_entry(group_id: str, key: str) -> ShardRequest:
    from shardstate._requests import entry_request

    return entry_request(group_id, key)._replace(decode=lambda payload: payload)


async def _precondition(api: Api, request: Request, group_id: str, key: str) -> int | None:
    """The version a write must find (``If-Match``; ``If-None-Match: *``: 0, absent), or None."""
    match = request.headers.get("if-match")
    none_match = request.headers.get("if-none-match")
    if none_match is not None:
        if none_match.strip() != "*":
            raise InvalidInput("If-None-Match supports only '*' (create only)")
        if match is not None:
            raise InvalidInput("send If-Match or If-None-Match, not both")
        return 0
    if match is None:
        return None
    version = parse_version_header(match, "If-Match")
    if version is None:  # "*": it must exist, in whatever version it has now
        version = await api.current_version(group_id, key)
        if version == 0:
            raise ConflictError(f"{group_id!r}/{key!r} does not exist (If-Match: *)", 0, 0)
    return version


def _event_id_parts(event_id: str) -> tuple[int, int] | None:
    parts = event_id.rsplit("/", 2)
    if len(parts) != 3 or not parts[1].isdigit() or not parts[2].isdigit():
        return None
    return int(parts[1]), int(parts[2])


async def _resume_marks(api: Api, last: str | None, group: str | None) -> dict[int, int] | None:
    """Where a stream resumes after ``last`` (Last-Event-ID): every shard's position when it was
    sent, if this console sent it; else its own shard's, the others from now."""
    if not last:
        return None
    known = api.resume_points.get(last)
    if known is not None:
        return dict(known)
    parts = _event_id_parts(last)
    if parts is None:
        raise InvalidInput(f"Last-Event-ID is not an event_id: {last!r}")
    shard, seq = parts
    if group is not None:
        view = api.client._link.view_now() or await api.client._link.refresh_async()
        if view.owners[slot_of(group)] != shard:
            return None
    return {shard: seq}


async def _sse(
    api: Api, request: Request, group: str | None, key: str | None, marks: dict[int, int] | None
) -> AsyncGenerator[bytes, None]:
    """The event stream: the starting point is taken before the first line (``retry`` and a
    comment) is sent, then one ``id``/``event``/``data`` block per matching event."""
    watcher = AsyncWatcher(api.client._link, group, 0.05, marks)
    try:
        await watcher.start()
        position = dict(watcher.starts)  # a resume point names every followed shard
        yield b"retry: 1000\n: connected\n\n"
        while True:
            try:
                event = await asyncio.wait_for(watcher.queue.get(), SSE_KEEPALIVE)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                yield b": keep-alive\n\n"
                continue
            position[event.shard] = event.seq
            if key is not None and event.key != key:
                continue
            api.remember(event.event_id, dict(position))
            data = {**event.to_wire(), "version": event.seq}
            data["old_value"] = json_form(data["old_value"])
            data["new_value"] = json_form(data["new_value"])
            yield b"id: %s\nevent: state\ndata: %s\n\n" % (event.event_id.encode(), dumps(data))
    finally:
        await watcher.close()


async def _then(first: bytes, rest: AsyncGenerator[bytes, None]) -> AsyncIterator[bytes]:
    """``first``, then the rest of a started stream (closed with this one)."""
    try:
        yield first
        async for chunk in rest:
            yield chunk
    finally:
        await rest.aclose()


async def _cluster_view(api: Api) -> dict[str, Any]:
    """Shards, nodes, triggers, dead letters and rates (cached for :data:`CLUSTER_TTL`)."""
    async with api._cluster_lock:
        now = time.monotonic()
        if api._cluster is not None and now - api._cluster[0] < CLUSTER_TTL:
            return api._cluster[1]
        client = api.client
        infos, subscribers, triggers, letters, nodes = await asyncio.gather(
            client.shard_info(),
            client._link.ask_async("subscriber_stats"),
            client.list_triggers(),
            client.list_dead_letters(),
            asyncio.to_thread(ray.nodes),
        )
        shards = []
        for info in infos:
            index, commands = info["index"], int(info.get("commands") or 0)
            before = api._rates.get(index)
            rate = 0.0
            if before is not None and now > before[0] and commands >= before[1]:
                rate = (commands - before[1]) / (now - before[0])
            api._rates[index] = (now, commands)
            shards.append(
                {
                    "index": index,
                    "node": info.get("node_id"),
                    "node_ip": info.get("node_ip"),
                    "role": info.get("role"),
                    "epoch": info.get("term") if info.get("term") is not None else info.get("epoch"),
                    "keys": info.get("keys", 0),
                    "groups": info.get("groups", 0),
                    "ops_per_s": round(rate, 1),
                    "unacked_events": info.get("unacked", 0),
                    "phase": info.get("phase"),
                    "members": info.get("members"),
                    "metrics": info.get("metrics") or {},
                }
            )
        lag_events = sum(s["unacked_events"] or 0 for s in shards)
        lags = [s.get("event_lag_s") for s in subscribers if isinstance(s.get("event_lag_s"), dict)]
        lag_seconds = max((float(x.get("p50") or 0.0) for x in lags), default=0.0)
        view = {
            "cluster": client.cluster,
            "shards": shards,
            "nodes": [
                {
                    "node_id": n.get("NodeID"),
                    "address": n.get("NodeManagerAddress"),
                    "alive": bool(n.get("Alive")),
                }
                for n in nodes
            ],
            "keys": sum(s["keys"] or 0 for s in shards),
            "ops_per_s": round(sum(s["ops_per_s"] for s in shards), 1),
            "triggers": [t.model_dump() for t in triggers],
            "trigger_lag": {"events": lag_events, "seconds": lag_seconds},
            "subscribers": [
                {k: s.get(k) for k in ("index", "delivered", "dead_letters", "in_flight", "event_lag_s")}
                for s in subscribers
            ],
            "dead_letters": [
                {
                    "trigger": d.trigger,
                    "event_id": d.event.event_id,
                    "group_id": d.event.group_id,
                    "key": d.event.key,
                    "event_type": d.event.event_type,
                    "error": d.error,
                    "attempts": d.attempts,
                    "at": d.at,
                }
                for d in letters
            ],
        }
        api._cluster = (now, view)
        return view
