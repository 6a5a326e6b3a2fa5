// An example step in JavaScript: read a value, update it with atomic ops (increment, merge,
// append), watch its group's events and print them, then exit. Runs on node 20 as it is:
//
//   SHARDSTATE_URL=http://127.0.0.1:8300 SHARDSTATE_TOKEN=... node examples/js/example_step.mjs
//
// (`shardstate console` or `state.start_console()` give the URL and token.) Optional:
// SHARDSTATE_GROUP (default "js-example"), SHARDSTATE_KEY ("counter"), SHARDSTATE_STEPS (how many
// updates, 5), SHARDSTATE_TIMEOUT (seconds to wait for the events of its own updates, 30).
//
// Output, one line each: `READ <json>`, `UPDATED <json>`, `EVENT <json>`, then `DONE <json>`.
// Exit code 0; 2 if its own updates' events did not all arrive in time.

import { ShardStateClient, ops } from "./shardstate.mjs";

const env = process.env;
const state = new ShardStateClient({ url: env.SHARDSTATE_URL ?? "", token: env.SHARDSTATE_TOKEN ?? "" });
const group = env.SHARDSTATE_GROUP ?? "js-example";
const key = env.SHARDSTATE_KEY ?? "counter";
const steps = Number(env.SHARDSTATE_STEPS ?? 5);
const timeout = Number(env.SHARDSTATE_TIMEOUT ?? 30) * 1000;

const print = (tag, value) => console.log(`${tag} ${JSON.stringify(value)}`);

// Watch first, so the stream sees every update this step makes.
const stop = new AbortController();
const mine = new Set(Array.from({ length: steps }, (_, i) => `js-${i}`));
let opened;
const open = new Promise((resolve) => (opened = resolve));
const watching = (async () => {
  for await (const event of state.events({ group, signal: stop.signal, onOpen: opened })) {
    print("EVENT", { id: event.id, ...event.data });
    const log = event.data.key === key ? event.data.new_value?.log : undefined;
    if (Array.isArray(log)) for (const entry of log) mine.delete(entry);
    if (!mine.size) return true;
  }
  return false;
})();

await Promise.race([open, watching]);

// Read: the value with its version (the item may not exist yet).
const entry = await state.getEntry(group, key);
print("READ", entry ?? null);
if (entry === undefined) {
  try {
    await state.set(group, key, { count: 0, log: [] }, { ifNoneMatch: true }); // create only
  } catch (error) {
    if (error.type !== "ConflictError") throw error; // someone else created it first: fine
  }
}

// Update: each step increments, merges and appends in one atomic write.
for (let i = 0; i < steps; i++) {
  const result = await state.update(group, key, [
    ops.increment("count", 1),
    ops.merge({ last_writer: "js", step: i }, "meta"),
    ops.append("log", `js-${i}`),
  ]);
  print("UPDATED", { version: result.version, count: result.new_value.count });
}

const timer = setTimeout(() => stop.abort(), timeout);
const complete = await watching.catch((error) => {
  if (error.name !== "AbortError") throw error;
  return false;
});
clearTimeout(timer);
stop.abort();
const final = await state.getEntry(group, key);
print("DONE", { complete, missing: [...mine], value: final?.value ?? null, version: final?.version ?? null });
process.exit(complete ? 0 : 2);
