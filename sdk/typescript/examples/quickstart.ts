/**
 * A tour of the TypeScript SDK against a running sidecar.
 *
 *   fabric dev                                   # in one terminal
 *   node dist/examples/quickstart.js [address]   # default: STATEFABRIC_ADDRESS or 127.0.0.1:7400
 */
import { randomUUID } from "node:crypto";
import { Client, ConflictError, Crdt, MergeType } from "../src/index.js";

const run = randomUUID().slice(0, 8);
const client = new Client(process.argv[2]);

// Events: a stream per aggregate, appended with an expected version.
const stream = `task-${run}`;
await client.events.append(stream, "task", [{ type: "TaskCreated", data: { title: "fix the build" } }], {
  expected: "noStream",
});
try {
  await client.events.append(stream, "task", [{ type: "TaskCreated", data: {} }], { expected: "noStream" });
} catch (error) {
  if (!(error instanceof ConflictError)) throw error;
  console.log(`a second creation is refused: ${error.message}`);
}
// The same key twice writes once.
for (let i = 0; i < 2; i++) {
  const written = await client.events.append(stream, "task", [{ type: "TaskStarted", data: { by: "planner" } }], {
    idempotencyKey: `start-${run}`,
  });
  console.log(`append with a key: version ${written.lastVersion}, replayed=${written.replayed}`);
}
for (const event of await client.events.readStream(stream)) {
  console.log(`  ${event.streamVersion}: ${event.type} ${JSON.stringify(event.data)}`);
}

// Context: read-modify-write that retries when someone else wrote first.
const plan = `plan-${run}`;
await client.context.update(plan, () => ({ steps: ["write it"] }));
await client.context.update(plan, (doc: { steps: string[] }) => ({ steps: [...doc.steps, "test it"] }));
const doc = await client.context.get(plan);
console.log(`plan at revision ${doc?.revision}: ${JSON.stringify(doc?.content)}`);

// A CRDT counter: concurrent increments merge.
const counter = `tokens-${run}`;
await Promise.all(
  Array.from({ length: 5 }, () => client.context.merge(counter, MergeType.PN_COUNTER, [Crdt.increment(10)])),
);
console.log(`tokens used: ${(await client.context.get(counter))?.content}`);

// A lock, renewed while held; writes under it carry its fencing token.
await client.locks.withLock(`repo-${run}`, { ttlMs: 5000 }, async (lock) => {
  await client.context.put(`files-${run}`, { "main.ts": "console.log()" }, { fence: lock });
  console.log(`wrote under lock ${lock.name} with token ${lock.token}`);
});

// Sessions expire on their own.
const expires = await client.sessions.put("conversation", `chat-${run}`, "hello");
console.log(`session expires in ${Math.round(expires / 1000)} s`);
