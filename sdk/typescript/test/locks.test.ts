/**
 * Locks through two agents' sidecars of one tenant on the test Redis:
 * renewal, waiting, and a lock lost while held — the work's signal aborted,
 * withLock rejecting, the old holder's fenced writes refused.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { Client, FencedError, LockLostError, LockNotAcquiredError } from "../src/index.js";
import { type Sidecar, postgresSidecar, sleep, unique } from "./harness.js";

let a: Sidecar;
let b: Sidecar;
before(async () => {
  const tenant = unique("ts-locks");
  a = await (await postgresSidecar(tenant, "agent-a")).start();
  b = await (await postgresSidecar(tenant, "agent-b")).start();
});
after(async () => {
  await a.stop();
  await b.stop();
});

test("a held lock outlives its lease by renewal, and the other agent waits", async () => {
  const [ca, cb] = [new Client(a.address), new Client(b.address)];
  const name = unique("repo");
  const token = await ca.locks.withLock(name, { ttlMs: 600 }, async (lock, signal) => {
    await sleep(1500); // two and a half leases
    assert.equal(signal.aborted, false);
    await assert.rejects(cb.locks.withLock(name, { ttlMs: 1000, waitMs: 200 }, async () => undefined), LockNotAcquiredError);
    const holder = await cb.locks.inspect(name);
    assert.deepEqual([holder?.owner, holder?.token], ["agent-a", lock.token]);
    return lock.token;
  });
  assert.equal(await ca.locks.inspect(name), undefined, "released at the end");
  const next = await cb.locks.acquire(name, { ttlMs: 1000, waitMs: 1000 });
  assert.ok(next && next.token > token);
  await next.release();
});

/** Blocks this thread (and so the event loop, and renewal) for `ms`. */
function pause(ms: number): void {
  Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, ms);
}

test("a lock lost while held aborts the work and its fenced writes are refused", async () => {
  const client = new Client(a.address);
  const [name, doc] = [unique("repo"), unique("files")];
  await client.context.put(doc, { by: "nobody" });
  let first: { lock: string; token: bigint } | undefined;
  let successor: Promise<bigint> | undefined;
  let abortedWith: unknown;
  await assert.rejects(
    client.locks.withLock(name, { ttlMs: 500 }, async (lock, signal) => {
      first = lock.fence;
      signal.addEventListener("abort", () => (abortedWith = signal.reason));
      // Another agent, its own process and sidecar, waits for the lock and
      // writes under its newer token once the lease lapses.
      successor = takeOver(b.address, name, doc);
      // A pause past the lease (a long synchronous step, a GC pause): the
      // event loop, and with it renewal, stands still.
      pause(1500);
      await sleep(10_000);
      assert.fail("withLock did not give up on a lost lock");
    }),
    LockLostError,
  );
  assert.ok(abortedWith instanceof LockLostError, "the work's signal aborted");
  const successorToken = await successor;
  assert.ok(first && successorToken !== undefined && successorToken > first.token);
  const current = await client.context.get(doc);
  await assert.rejects(client.context.put(doc, { by: "the old holder" }, { base: current, fence: first }), FencedError);
  await assert.rejects(client.events.append(unique("s"), "s", [{ type: "Late", data: {} }], { fence: first }), FencedError);
  assert.deepEqual((await client.context.get(doc))?.content, { by: "successor" });
});

/** Runs take-over.js: resolves with the token it wrote under. */
function takeOver(address: string, name: string, doc: string): Promise<bigint> {
  const child = spawn(process.execPath, [fileURLToPath(new URL("./take-over.js", import.meta.url)), address, name, doc], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  let out = "";
  child.stdout.on("data", (chunk) => (out += chunk));
  return new Promise((resolve, reject) =>
    child.once("exit", (code) => (code === 0 ? resolve(BigInt(out.trim())) : reject(new Error(`take-over exited ${code}`)))),
  );
}
