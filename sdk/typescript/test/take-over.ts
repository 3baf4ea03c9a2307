/**
 * The other agent of the lost-lock test: waits for the lock on its own
 * sidecar, writes under its token, prints the token.
 */
import { Client } from "../src/index.js";

const [address, name, doc] = process.argv.slice(2) as [string, string, string];
const client = new Client(address);
await client.locks.withLock(name, { ttlMs: 5000, waitMs: 5000 }, async (lock) => {
  const current = await client.context.get(doc);
  await client.context.put(doc, { by: "successor" }, { base: current, fence: lock });
  process.stdout.write(`${lock.token}\n`);
});
