// `node --test examples/js/`: the client's pure parts against a fake fetch (no server), and the
// check that shardstate.ts and shardstate.mjs stay in step.

import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";

import {
  ConflictError,
  NotFound,
  ShardStateClient,
  ShardStateError,
  SseParser,
  Unauthorized,
  UpdateError,
  errorFor,
  ops,
} from "./shardstate.mjs";

const here = new URL(".", import.meta.url);

function fakeFetch(answers) {
  const calls = [];
  const fetch = async (url, init = {}) => {
    calls.push({ url, init });
    const [status, body, headers] = answers.shift();
    return new Response(body === undefined ? null : JSON.stringify(body), { status, headers });
  };
  return { fetch, calls };
}

test("the SSE parser reads id, event and data across chunk boundaries", () => {
  const parser = new SseParser();
  const text = 'retry: 1000\n: connected\n\nid: c/1/7\nevent: state\ndata: {"a":\ndata: 1}\n\nid: c/1/8\r\nevent: state\r\ndata: {}\r\n\r\n';
  const events = [];
  for (let i = 0; i < text.length; i += 5) events.push(...parser.push(text.slice(i, i + 5)));
  assert.deepEqual(events, [
    { id: "c/1/7", event: "state", data: '{"a":\n1}' },
    { id: "c/1/8", event: "state", data: "{}" },
  ]);
  assert.equal(parser.lastEventId, "c/1/8");
  assert.equal(parser.retry, 1000);
});

test("error answers become typed errors by their type, else by status", () => {
  const conflict = errorFor(412, { error: { type: "ConflictError", message: "version 3, not 2" } });
  assert.ok(conflict instanceof ConflictError && conflict instanceof ShardStateError);
  assert.equal(conflict.status, 412);
  assert.equal(conflict.message, "version 3, not 2");
  const update = errorFor(422, { error: { type: "UpdateError", message: "no", op_index: 1, code: "not_number" } });
  assert.ok(update instanceof UpdateError);
  assert.deepEqual([update.opIndex, update.code], [1, "not_number"]);
  assert.ok(errorFor(401, null) instanceof Unauthorized);
  const odd = errorFor(500, { error: { type: "SomethingNew", message: "?" } });
  assert.equal(odd.constructor, ShardStateError);
  assert.equal(odd.type, "SomethingNew");
});

test("writes send the token, the conditions and encoded names", async () => {
  const { fetch, calls } = fakeFetch([
    [200, { old_value: null, new_value: { n: 1 }, version: 4 }],
    [200, { old_value: null, new_value: 1, version: 1 }],
    [200, { old_value: { n: 1 }, new_value: { n: 2 }, version: 5 }],
  ]);
  const state = new ShardStateClient({ url: "http://h:1/", token: "T", fetch });
  await state.set("a/b", "k 1", { n: 1 }, { ifMatch: 3 });
  await state.set("g", "k", 1, { ifNoneMatch: true, idempotencyKey: "op-1" });
  await state.update("g", "k", [ops.increment("n"), ops.merge({ x: 1 }), ops.append("log", "e")]);
  assert.equal(calls[0].url, "http://h:1/api/v1/groups/a%2Fb/items/k%201");
  assert.equal(calls[0].init.method, "PUT");
  assert.equal(calls[0].init.headers.Authorization, "Bearer T");
  assert.equal(calls[0].init.headers["If-Match"], '"3"');
  assert.equal(calls[0].init.body, '{"n":1}');
  assert.equal(calls[1].init.headers["If-None-Match"], "*");
  assert.equal(calls[1].init.headers["Idempotency-Key"], "op-1");
  assert.equal(calls[2].init.method, "PATCH");
  assert.deepEqual(JSON.parse(calls[2].init.body), {
    ops: [
      { type: "increment", path: "n", by: 1 },
      { type: "merge", path: "", value: { x: 1 } },
      { type: "append", path: "log", value: "e" },
    ],
  });
});

test("absent items read as undefined; other errors are thrown", async () => {
  const missing = { error: { type: "NotFound", message: "no key" } };
  const { fetch } = fakeFetch([
    [404, missing],
    [404, missing],
    [412, { error: { type: "ConflictError", message: "changed" } }],
  ]);
  const state = new ShardStateClient({ url: "http://h:1", token: "T", fetch });
  assert.equal(await state.get("g", "k"), undefined);
  assert.equal(await state.delete("g", "k"), undefined);
  await assert.rejects(state.set("g", "k", 1, { ifMatch: 1 }), ConflictError);
});

test("items walks every page with its cursor", async () => {
  const { fetch, calls } = fakeFetch([
    [200, { items: [{ key: "a", value: 1, version: 1 }], next_cursor: "c1" }],
    [200, { items: [{ key: "b", value: 2, version: 1 }], next_cursor: null }],
  ]);
  const state = new ShardStateClient({ url: "http://h:1", token: "T", fetch });
  const keys = [];
  for await (const item of state.items("g", { limit: 1, prefix: "p" })) keys.push(item.key);
  assert.deepEqual(keys, ["a", "b"]);
  assert.equal(calls[0].url, "http://h:1/api/v1/groups/g/items?limit=1&prefix=p");
  assert.equal(calls[1].url, "http://h:1/api/v1/groups/g/items?limit=1&cursor=c1&prefix=p");
  assert.ok(NotFound);
});

test("events resume with Last-Event-ID and end when the stream ends", async () => {
  const body = 'id: c/0/5\nevent: state\ndata: {"type":"state","key":"k","version":5}\n\n';
  const calls = [];
  const fetch = async (url, init) => {
    calls.push({ url, init });
    return new Response(body, { status: 200, headers: { "Content-Type": "text/event-stream" } });
  };
  const state = new ShardStateClient({ url: "http://h:1", token: "T", fetch });
  const seen = [];
  for await (const event of state.events({ group: "g", lastEventId: "c/0/4", reconnect: false })) seen.push(event);
  assert.deepEqual(seen, [{ id: "c/0/5", event: "state", data: { type: "state", key: "k", version: 5 } }]);
  assert.equal(calls[0].url, "http://h:1/api/v1/events?group=g");
  assert.equal(calls[0].init.headers["Last-Event-ID"], "c/0/4");
});

test("shardstate.ts and shardstate.mjs export the same names and methods", () => {
  const ts = readFileSync(new URL("shardstate.ts", here), "utf8");
  const js = readFileSync(new URL("shardstate.mjs", here), "utf8");
  const exported = (src) => [...src.matchAll(/^export (?:class|function|const) (\w+)/gm)].map((m) => m[1]).sort();
  assert.deepEqual(exported(ts), exported(js));
  const methods = (src) =>
    [...src.matchAll(/^ {2}(?:(?:private|readonly) )?(?:async \*?|\*)?(\w+)(?:<[^(]*>)?\(/gm)]
      .map((m) => m[1])
      .filter((name) => name !== "constructor")
      .sort();
  assert.deepEqual(methods(ts), methods(js));
  const opsOf = (src) => [...src.slice(src.indexOf("export const ops")).matchAll(/^ {2}(\w+): \(/gm)].map((m) => m[1]);
  assert.deepEqual(opsOf(ts), opsOf(js));
  assert.deepEqual(opsOf(js), Object.keys(ops));
});
