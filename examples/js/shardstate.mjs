// shardstate's HTTP API v1 client as plain JavaScript (node 20 runs it as it is; browsers too).
// The typed source is shardstate.ts beside it: the same code with its types. Keep the two in
// step: `node --test examples/js/` checks that they export the same names and methods.
//
//   import { ShardStateClient, ops } from "./shardstate.mjs";
//   const state = new ShardStateClient({ url: process.env.SHARDSTATE_URL, token: process.env.SHARDSTATE_TOKEN });
//   await state.update("orders", "o1", [ops.increment("count"), ops.append("log", "seen")]);
//   for await (const event of state.events({ group: "orders" })) console.log(event.data);

/** @typedef {null | boolean | number | string | any[] | { [key: string]: any }} Json */
/** @typedef {string | string[]} Path */
/** @typedef {{ type: string, path?: Path, value?: Json, by?: number }} UpdateOp */
/** @typedef {{ key: string, value: Json, version: number }} Entry */
/** @typedef {{ old_value: Json, new_value: Json, version: number }} WriteResult */
/** @typedef {{ items: Entry[], next_cursor: string | null }} Page */
/** @typedef {{ group: string, count: number }} GroupCount */
/** @typedef {{ type: "state", event_type: string, scope: string, key: string, old_value: Json, new_value: Json, version: number }} StateEventData */
/** @typedef {{ id: string, event: string, data: StateEventData }} StateEvent */
/** @typedef {{ ifMatch?: number | string, ifNoneMatch?: boolean, idempotencyKey?: string }} WriteOptions */
/** @typedef {{ limit?: number, cursor?: string | null, prefix?: string }} PageOptions */
/** @typedef {{ group?: string, key?: string, lastEventId?: string, signal?: AbortSignal, reconnect?: boolean, onOpen?: () => void }} EventOptions */

/** Builders for update ops. */
export const ops = {
  /** @param {Path} path @param {Json} value @returns {UpdateOp} */
  set: (path, value) => ({ type: "set", path, value }),
  /** @param {{ [key: string]: Json }} value @param {Path} [path] @returns {UpdateOp} */
  merge: (value, path = "") => ({ type: "merge", path, value }),
  /** @param {Path} path @param {number} [by] @returns {UpdateOp} */
  increment: (path, by = 1) => ({ type: "increment", path, by }),
  /** @param {Path} path @param {number} [by] @returns {UpdateOp} */
  decrement: (path, by = 1) => ({ type: "decrement", path, by }),
  /** @param {Path} path @param {Json} value @returns {UpdateOp} */
  append: (path, value) => ({ type: "append", path, value }),
  /** @param {Path} path @returns {UpdateOp} */
  remove: (path) => ({ type: "remove", path }),
};

/** An error the API answered: `{"error": {"type", "message"}}` and the HTTP status. */
export class ShardStateError extends Error {
  /** @param {number} status @param {string} type @param {string} message @param {unknown} [body] */
  constructor(status, type, message, body = null) {
    super(message);
    this.name = type;
    /** @readonly */ this.status = status;
    /** @readonly */ this.type = type;
    /** @readonly */ this.body = body;
  }
}

/** 401: no valid token. */
export class Unauthorized extends ShardStateError {}
/** 400: a bad name, body or parameter. */
export class InvalidInput extends ShardStateError {}
/** 404: no such item (or dead letter). */
export class NotFound extends ShardStateError {}
/** 409: a stored value without a JSON form is read-only over HTTP. */
export class ReadOnly extends ShardStateError {}
/** 412: `If-Match` / `If-None-Match` did not hold. */
export class ConflictError extends ShardStateError {}
/** 413: the value or body is too large. */
export class ValueTooLarge extends ShardStateError {}
/** 422: an update op failed; nothing was written. */
export class UpdateError extends ShardStateError {
  /** @param {number} status @param {string} type @param {string} message @param {unknown} [body] */
  constructor(status, type, message, body = null) {
    super(status, type, message, body);
    const error = /** @type {any} */ (body)?.error ?? {};
    /** @readonly @type {number | null} */ this.opIndex = error.op_index ?? null;
    /** @readonly @type {string | null} */ this.code = error.code ?? null;
  }
}
/** 503: the cluster cannot answer now (try again). */
export class Unavailable extends ShardStateError {}

/** @type {Record<string, typeof ShardStateError>} */
const ERROR_TYPES = {
  Unauthorized,
  InvalidInput,
  NotFound,
  ReadOnly,
  ConflictError,
  ValueTooLarge,
  UpdateError,
  Unavailable,
};
/** @type {Record<number, string>} */
const STATUS_TYPES = {
  400: "InvalidInput",
  401: "Unauthorized",
  404: "NotFound",
  409: "ReadOnly",
  412: "ConflictError",
  413: "ValueTooLarge",
  422: "UpdateError",
  503: "Unavailable",
};

/**
 * The typed error for an error answer (by the body's `type`, else by the status).
 * @param {number} status @param {unknown} body @returns {ShardStateError}
 */
export function errorFor(status, body) {
  const error = /** @type {any} */ (body)?.error;
  const type = error?.type ?? STATUS_TYPES[status] ?? "ShardStateError";
  const cls = ERROR_TYPES[type] ?? ERROR_TYPES[STATUS_TYPES[status] ?? ""] ?? ShardStateError;
  return new cls(status, type, error?.message ?? `HTTP ${status}`, body);
}

/** Parses a Server-Sent Events byte stream into events (`id:`, `event:`, `data:` lines). */
export class SseParser {
  constructor() {
    this.buffer = "";
    this.id = "";
    this.event = "";
    /** @type {string[]} */
    this.data = [];
    /** The last `id:` seen (what `Last-Event-ID` resumes after). */
    this.lastEventId = "";
    /** The server's `retry:` advice, in ms. @type {number | null} */
    this.retry = null;
  }

  /**
   * Feed a chunk of text; returns the events it completed.
   * @param {string} text @returns {{ id: string, event: string, data: string }[]}
   */
  push(text) {
    this.buffer += text;
    const out = [];
    let newline;
    while ((newline = this.buffer.search(/\r\n|\r|\n/)) >= 0) {
      const line = this.buffer.slice(0, newline);
      const width = this.buffer.startsWith("\r\n", newline) ? 2 : 1;
      if (width === 1 && this.buffer[newline] === "\r" && newline + 1 === this.buffer.length) break; // \r\n split
      this.buffer = this.buffer.slice(newline + width);
      if (line === "") {
        if (this.data.length) {
          out.push({ id: this.id, event: this.event || "message", data: this.data.join("\n") });
        }
        this.event = "";
        this.data = [];
        continue;
      }
      if (line.startsWith(":")) continue; // a comment (keep-alive)
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "data") this.data.push(value);
      else if (field === "event") this.event = value;
      else if (field === "id" && !value.includes("\0")) this.id = this.lastEventId = value;
      else if (field === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
    }
    return out;
  }
}

/** @param {number | string} version @returns {string} */
function quoted(version) {
  const text = String(version);
  return text === "*" || text.startsWith('"') ? text : `"${text}"`;
}

/** A client of one cluster's HTTP API v1. */
export class ShardStateClient {
  /** @param {{ url: string, token: string, fetch?: typeof fetch }} options */
  constructor(options) {
    if (!options?.url || !options?.token) throw new TypeError("ShardStateClient needs { url, token }");
    /** @readonly */ this.url = options.url.replace(/\/+$/, "");
    /** @private */ this.token = options.token;
    /** @private */ this.fetcher = options.fetch ?? globalThis.fetch.bind(globalThis);
  }

  /** @private @param {string} group @param {string} [key] */
  itemPath(group, key) {
    const base = `/api/v1/groups/${encodeURIComponent(group)}`;
    return key === undefined ? base : `${base}/items/${encodeURIComponent(key)}`;
  }

  /**
   * One request; an error answer throws its typed error.
   * @param {string} method @param {string} path @param {unknown} [body] @param {Record<string, string>} [headers]
   * @returns {Promise<Response>}
   */
  async request(method, path, body, headers = {}) {
    /** @type {Record<string, string>} */
    const sent = { Authorization: `Bearer ${this.token}`, ...headers };
    /** @type {RequestInit} */
    const init = { method, headers: sent };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      sent["Content-Type"] = "application/json";
    }
    const response = await this.fetcher(this.url + path, init);
    if (!response.ok) {
      const text = await response.text();
      let parsed = null;
      try {
        parsed = text ? JSON.parse(text) : null;
      } catch {
        parsed = { error: { message: text } };
      }
      throw errorFor(response.status, parsed);
    }
    return response;
  }

  /** @private @param {string} method @param {string} path @param {unknown} [body] @param {Record<string, string>} [headers] */
  async json(method, path, body, headers) {
    return (await this.request(method, path, body, headers)).json();
  }

  /** The item's value, or `undefined` if there is none. @param {string} group @param {string} key */
  async get(group, key) {
    return (await this.getEntry(group, key))?.value;
  }

  /**
   * The item with its version, or `undefined` if there is none.
   * @param {string} group @param {string} key @returns {Promise<Entry | undefined>}
   */
  async getEntry(group, key) {
    try {
      return await this.json("GET", this.itemPath(group, key));
    } catch (error) {
      if (error instanceof NotFound) return undefined;
      throw error;
    }
  }

  /**
   * Set the item (`ifMatch`: only at that version; `ifNoneMatch`: only if absent).
   * @param {string} group @param {string} key @param {Json} value @param {WriteOptions} [options]
   * @returns {Promise<WriteResult>}
   */
  async set(group, key, value, options = {}) {
    return this.json("PUT", this.itemPath(group, key), value, writeHeaders(options));
  }

  /**
   * Apply update ops atomically (all or nothing: a failing op throws `UpdateError`).
   * @param {string} group @param {string} key @param {UpdateOp[]} updates @param {WriteOptions} [options]
   * @returns {Promise<WriteResult>}
   */
  async update(group, key, updates, options = {}) {
    return this.json("PATCH", this.itemPath(group, key), { ops: updates }, writeHeaders(options));
  }

  /**
   * Delete the item; returns its old value, or `undefined` if there was none.
   * @param {string} group @param {string} key @param {WriteOptions} [options] @returns {Promise<Json | undefined>}
   */
  async delete(group, key, options = {}) {
    try {
      const answer = await this.json("DELETE", this.itemPath(group, key), undefined, writeHeaders(options));
      return answer.old_value;
    } catch (error) {
      if (error instanceof NotFound) return undefined;
      throw error;
    }
  }

  /** Remove every item of the group; returns how many there were. @param {string} group @returns {Promise<number>} */
  async clear(group) {
    return (await this.json("DELETE", this.itemPath(group))).removed;
  }

  /** Every non-empty group with its item count, sorted by group. @returns {Promise<GroupCount[]>} */
  async groups() {
    return (await this.json("GET", "/api/v1/groups")).groups;
  }

  /** One page of the group's items, in key order. @param {string} group @param {PageOptions} [options] @returns {Promise<Page>} */
  async page(group, options = {}) {
    const query = new URLSearchParams();
    if (options.limit !== undefined) query.set("limit", String(options.limit));
    if (options.cursor) query.set("cursor", options.cursor);
    if (options.prefix) query.set("prefix", options.prefix);
    const suffix = query.toString() ? `?${query}` : "";
    return this.json("GET", `${this.itemPath(group)}/items${suffix}`);
  }

  /**
   * Every item of the group, page after page (in key order).
   * @param {string} group @param {{ limit?: number, prefix?: string }} [options] @returns {AsyncGenerator<Entry>}
   */
  async *items(group, options = {}) {
    /** @type {string | null} */
    let cursor = null;
    do {
      const page = await this.page(group, { ...options, cursor });
      yield* page.items;
      cursor = page.next_cursor;
    } while (cursor);
  }

  /**
   * The live stream of state events (SSE over a streaming `fetch`), until `signal` aborts.
   * Reconnects (resuming after the last event seen) when the stream ends or the network fails,
   * unless `reconnect: false`; an error answer such as 401 is thrown, not retried.
   * @param {EventOptions} [options] @returns {AsyncGenerator<StateEvent>}
   */
  async *events(options = {}) {
    const query = new URLSearchParams();
    if (options.group !== undefined) query.set("group", options.group);
    if (options.key !== undefined) query.set("key", options.key);
    const path = `/api/v1/events${query.toString() ? `?${query}` : ""}`;
    const reconnect = options.reconnect ?? true;
    let lastEventId = options.lastEventId ?? "";
    let delay = 1000;
    while (!options.signal?.aborted) {
      /** @type {Record<string, string>} */
      const headers = { Accept: "text/event-stream" };
      if (lastEventId) headers["Last-Event-ID"] = lastEventId;
      const parser = new SseParser();
      try {
        const response = await this.fetcher(this.url + path, {
          headers: { Authorization: `Bearer ${this.token}`, ...headers },
          signal: options.signal,
        });
        if (!response.ok) {
          throw errorFor(response.status, await response.json().catch(() => null));
        }
        options.onOpen?.();
        const decoder = new TextDecoder();
        for await (const chunk of /** @type {AsyncIterable<Uint8Array>} */ (/** @type {unknown} */ (response.body))) {
          for (const raw of parser.push(decoder.decode(chunk, { stream: true }))) {
            lastEventId = raw.id || lastEventId;
            yield { id: raw.id, event: raw.event, data: JSON.parse(raw.data) };
          }
        }
        delay = parser.retry ?? delay;
      } catch (error) {
        if (options.signal?.aborted) return;
        if (error instanceof ShardStateError || !reconnect) throw error;
      }
      if (!reconnect) return;
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }
}

/** @param {WriteOptions} options @returns {Record<string, string>} */
function writeHeaders(options) {
  /** @type {Record<string, string>} */
  const headers = {};
  if (options.ifMatch !== undefined) headers["If-Match"] = quoted(options.ifMatch);
  if (options.ifNoneMatch) headers["If-None-Match"] = "*";
  if (options.idempotencyKey) headers["Idempotency-Key"] = options.idempotencyKey;
  return headers;
}
