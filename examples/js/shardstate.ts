/**
 * A small typed client for shardstate's HTTP API v1 (the cluster console), over `fetch`, with no
 * dependencies. `shardstate.mjs` beside it is the same client as plain JavaScript (runs on node 20
 * as it is); keep the two in step (`node --test examples/js/` checks they export the same names).
 *
 * ```ts
 * const state = new ShardStateClient({ url: process.env.SHARDSTATE_URL!, token: process.env.SHARDSTATE_TOKEN! });
 * await state.update("orders", "o1", [ops.increment("count"), ops.append("log", "seen")]);
 * for await (const event of state.events({ group: "orders" })) console.log(event.data);
 * ```
 */

/** A JSON value as the API stores and returns it. */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** An update op's path: one field (`"count"`; `""` is the whole value) or nested fields. */
export type Path = string | string[];

/** One atomic update op, in the wire shape the API takes. */
export type UpdateOp =
  | { type: "set"; path: Path; value: Json }
  | { type: "merge"; path?: Path; value: { [key: string]: Json } }
  | { type: "increment" | "decrement"; path: Path; by?: number }
  | { type: "append"; path?: Path; value: Json }
  | { type: "remove"; path: Path };

/** Builders for update ops. */
export const ops = {
  set: (path: Path, value: Json): UpdateOp => ({ type: "set", path, value }),
  merge: (value: { [key: string]: Json }, path: Path = ""): UpdateOp => ({ type: "merge", path, value }),
  increment: (path: Path, by = 1): UpdateOp => ({ type: "increment", path, by }),
  decrement: (path: Path, by = 1): UpdateOp => ({ type: "decrement", path, by }),
  append: (path: Path, value: Json): UpdateOp => ({ type: "append", path, value }),
  remove: (path: Path): UpdateOp => ({ type: "remove", path }),
};

/** A stored item with its version (the `ETag` is `"<version>"`). */
export interface Entry<T = Json> {
  key: string;
  value: T;
  version: number;
}

/** What a write answers: the value before, the value now, the new version. */
export interface WriteResult<T = Json> {
  old_value: Json;
  new_value: T;
  version: number;
}

/** One page of a group's items, in key order; `next_cursor` is null on the last page. */
export interface Page<T = Json> {
  items: Entry<T>[];
  next_cursor: string | null;
}

/** A group and how many items it holds. */
export interface GroupCount {
  group: string;
  count: number;
}

/** The `data` of a state event (the iii engine's payload; `version` is the event's sequence number). */
export interface StateEventData {
  type: "state";
  event_type: "state:created" | "state:updated" | "state:deleted";
  scope: string;
  key: string;
  old_value: Json;
  new_value: Json;
  version: number;
}

/** One Server-Sent Event of the stream: its `id` (the event_id), its `event` name and its data. */
export interface StateEvent {
  id: string;
  event: string;
  data: StateEventData;
}

export interface ClientOptions {
  /** The console's URL, as `start_console()` / `shardstate console` print it. */
  url: string;
  /** The cluster's bearer token. */
  token: string;
  /** A `fetch` to use instead of the global one. */
  fetch?: typeof fetch;
}

export interface WriteOptions {
  /** Write only if the item has this version (412 `ConflictError` otherwise). */
  ifMatch?: number | string;
  /** `set` only: create only, if the item does not exist (412 otherwise). */
  ifNoneMatch?: boolean;
  /** Makes a retried write apply once. */
  idempotencyKey?: string;
}

export interface PageOptions {
  limit?: number;
  cursor?: string | null;
  prefix?: string;
}

export interface EventOptions {
  group?: string;
  key?: string;
  /** Resume after this event_id (sent as `Last-Event-ID`). */
  lastEventId?: string;
  /** Stops the stream (the iterator then ends). */
  signal?: AbortSignal;
  /** Reconnect (resuming after the last event seen) when the stream ends or the network fails
   * (default true; an error answer such as 401 is thrown, not retried). */
  reconnect?: boolean;
  /** Called each time the stream is open (its response arrived), before any of its events. */
  onOpen?: () => void;
}

/** An error the API answered: `{"error": {"type", "message"}}` and the HTTP status. */
export class ShardStateError extends Error {
  readonly status: number;
  readonly type: string;
  readonly body: unknown;

  constructor(status: number, type: string, message: string, body: unknown = null) {
    super(message);
    this.name = type;
    this.status = status;
    this.type = type;
    this.body = body;
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
  readonly opIndex: number | null;
  readonly code: string | null;

  constructor(status: number, type: string, message: string, body: unknown = null) {
    super(status, type, message, body);
    const error = (body as { error?: { op_index?: number; code?: string } } | null)?.error ?? {};
    this.opIndex = error.op_index ?? null;
    this.code = error.code ?? null;
  }
}
/** 503: the cluster cannot answer now (try again). */
export class Unavailable extends ShardStateError {}

const ERROR_TYPES: Record<string, typeof ShardStateError> = {
  Unauthorized,
  InvalidInput,
  NotFound,
  ReadOnly,
  ConflictError,
  ValueTooLarge,
  UpdateError,
  Unavailable,
};
const STATUS_TYPES: Record<number, string> = {
  400: "InvalidInput",
  401: "Unauthorized",
  404: "NotFound",
  409: "ReadOnly",
  412: "ConflictError",
  413: "ValueTooLarge",
  422: "UpdateError",
  503: "Unavailable",
};

/** The typed error for an error answer (by the body's `type`, else by the status). */
export function errorFor(status: number, body: unknown): ShardStateError {
  const error = (body as { error?: { type?: string; message?: string } } | null)?.error;
  const type = error?.type ?? STATUS_TYPES[status] ?? "ShardStateError";
  const cls = ERROR_TYPES[type] ?? ERROR_TYPES[STATUS_TYPES[status] ?? ""] ?? ShardStateError;
  return new cls(status, type, error?.message ?? `HTTP ${status}`, body);
}

/** Parses a Server-Sent Events byte stream into events (`id:`, `event:`, `data:` lines). */
export class SseParser {
  private buffer = "";
  private id = "";
  private event = "";
  private data: string[] = [];
  /** The last `id:` seen (what `Last-Event-ID` resumes after). */
  lastEventId = "";
  /** The server's `retry:` advice, in ms. */
  retry: number | null = null;

  /** Feed a chunk of text; returns the events it completed. */
  push(text: string): { id: string; event: string; data: string }[] {
    this.buffer += text;
    const out: { id: string; event: string; data: string }[] = [];
    let newline: number;
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

function quoted(version: number | string): string {
  const text = String(version);
  return text === "*" || text.startsWith('"') ? text : `"${text}"`;
}

/** A client of one cluster's HTTP API v1. */
export class ShardStateClient {
  readonly url: string;
  private readonly token: string;
  private readonly fetcher: typeof fetch;

  constructor(options: ClientOptions) {
    if (!options.url || !options.token) throw new TypeError("ShardStateClient needs { url, token }");
    this.url = options.url.replace(/\/+$/, "");
    this.token = options.token;
    this.fetcher = options.fetch ?? globalThis.fetch.bind(globalThis);
  }

  private itemPath(group: string, key?: string): string {
    const base = `/api/v1/groups/${encodeURIComponent(group)}`;
    return key === undefined ? base : `${base}/items/${encodeURIComponent(key)}`;
  }

  /** One request; an error answer throws its typed error. */
  async request(method: string, path: string, body?: unknown, headers: Record<string, string> = {}): Promise<Response> {
    const init: RequestInit = { method, headers: { Authorization: `Bearer ${this.token}`, ...headers } };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      (init.headers as Record<string, string>)["Content-Type"] = "application/json";
    }
    const response = await this.fetcher(this.url + path, init);
    if (!response.ok) {
      const text = await response.text();
      let parsed: unknown = null;
      try {
        parsed = text ? JSON.parse(text) : null;
      } catch {
        parsed = { error: { message: text } };
      }
      throw errorFor(response.status, parsed);
    }
    return response;
  }

  private async json<T>(method: string, path: string, body?: unknown, headers?: Record<string, string>): Promise<T> {
    return (await (await this.request(method, path, body, headers)).json()) as T;
  }

  /** The item's value, or `undefined` if there is none. */
  async get<T = Json>(group: string, key: string): Promise<T | undefined> {
    return (await this.getEntry<T>(group, key))?.value;
  }

  /** The item with its version, or `undefined` if there is none. */
  async getEntry<T = Json>(group: string, key: string): Promise<Entry<T> | undefined> {
    try {
      return await this.json<Entry<T>>("GET", this.itemPath(group, key));
    } catch (error) {
      if (error instanceof NotFound) return undefined;
      throw error;
    }
  }

  /** Set the item (`ifMatch`: only at that version; `ifNoneMatch`: only if absent). */
  async set<T = Json>(group: string, key: string, value: T, options: WriteOptions = {}): Promise<WriteResult<T>> {
    return this.json("PUT", this.itemPath(group, key), value, writeHeaders(options));
  }

  /** Apply update ops atomically (all or nothing: a failing op throws `UpdateError`). */
  async update<T = Json>(group: string, key: string, updates: UpdateOp[], options: WriteOptions = {}): Promise<WriteResult<T>> {
    return this.json("PATCH", this.itemPath(group, key), { ops: updates }, writeHeaders(options));
  }

  /** Delete the item; returns its old value, or `undefined` if there was none. */
  async delete(group: string, key: string, options: WriteOptions = {}): Promise<Json | undefined> {
    try {
      const answer = await this.json<{ old_value: Json }>("DELETE", this.itemPath(group, key), undefined, writeHeaders(options));
      return answer.old_value;
    } catch (error) {
      if (error instanceof NotFound) return undefined;
      throw error;
    }
  }

  /** Remove every item of the group; returns how many there were. */
  async clear(group: string): Promise<number> {
    return (await this.json<{ removed: number }>("DELETE", this.itemPath(group))).removed;
  }

  /** Every non-empty group with its item count, sorted by group. */
  async groups(): Promise<GroupCount[]> {
    return (await this.json<{ groups: GroupCount[] }>("GET", "/api/v1/groups")).groups;
  }

  /** One page of the group's items, in key order. */
  async page<T = Json>(group: string, options: PageOptions = {}): Promise<Page<T>> {
    const query = new URLSearchParams();
    if (options.limit !== undefined) query.set("limit", String(options.limit));
    if (options.cursor) query.set("cursor", options.cursor);
    if (options.prefix) query.set("prefix", options.prefix);
    const suffix = query.toString() ? `?${query}` : "";
    return this.json("GET", `${this.itemPath(group)}/items${suffix}`);
  }

  /** Every item of the group, page after page (in key order). */
  async *items<T = Json>(group: string, options: Omit<PageOptions, "cursor"> = {}): AsyncGenerator<Entry<T>> {
    let cursor: string | null = null;
    do {
      const page: Page<T> = await this.page<T>(group, { ...options, cursor });
      yield* page.items;
      cursor = page.next_cursor;
    } while (cursor);
  }

  /** The live stream of state events (SSE over a streaming `fetch`), until `signal` aborts. */
  async *events(options: EventOptions = {}): AsyncGenerator<StateEvent> {
    const query = new URLSearchParams();
    if (options.group !== undefined) query.set("group", options.group);
    if (options.key !== undefined) query.set("key", options.key);
    const path = `/api/v1/events${query.toString() ? `?${query}` : ""}`;
    const reconnect = options.reconnect ?? true;
    let lastEventId = options.lastEventId ?? "";
    let delay = 1000;
    while (!options.signal?.aborted) {
      const headers: Record<string, string> = { Accept: "text/event-stream" };
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
        for await (const chunk of response.body as unknown as AsyncIterable<Uint8Array>) {
          for (const raw of parser.push(decoder.decode(chunk, { stream: true }))) {
            lastEventId = raw.id || lastEventId;
            yield { id: raw.id, event: raw.event, data: JSON.parse(raw.data) as StateEventData };
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

function writeHeaders(options: WriteOptions): Record<string, string> {
  const headers: Record<string, string> = {};
  if (options.ifMatch !== undefined) headers["If-Match"] = quoted(options.ifMatch);
  if (options.ifNoneMatch) headers["If-None-Match"] = "*";
  if (options.idempotencyKey) headers["Idempotency-Key"] = options.idempotencyKey;
  return headers;
}
