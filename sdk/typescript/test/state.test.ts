/**
 * Events, context, sessions and bad input through real sidecars: `fabric
 * dev` and a sidecar on the test Postgres and Redis.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import {
  Client,
  ConflictError,
  Crdt,
  IdempotencyKeyReusedError,
  InvalidArgumentError,
  MergeType,
  NotFoundError,
  OutOfRangeError,
  TooLargeError,
  type Subscription,
} from "../src/index.js";
import { type Sidecar, devSidecar, postgresSidecar, sleep, unique } from "./harness.js";

for (const kind of ["fabric-dev", "postgres-redis"] as const) {
  describe(kind, () => {
    let sidecar: Sidecar;
    let client: Client;
    before(async () => {
      sidecar = await (kind === "fabric-dev" ? devSidecar() : postgresSidecar()).then((s) => s.start());
      client = new Client(sidecar.address);
    });
    after(async () => sidecar.stop());

    test("append checks the expected version", async () => {
      const stream = unique("task");
      const first = await client.events.append(stream, "task", [{ type: "Created", data: { title: "t" } }], {
        expected: "noStream",
      });
      assert.deepEqual([first.firstVersion, first.lastVersion, first.replayed], [1, 1, false]);
      await assert.rejects(
        client.events.append(stream, "task", [{ type: "Again", data: {} }], { expected: "noStream" }),
        (error: unknown) => error instanceof ConflictError && error.actualVersion === 1,
      );
      const second = await client.events.append(
        stream,
        "task",
        [
          { type: "Started", data: { n: 1 } },
          { type: "Done", data: null },
        ],
        { expected: { exact: 1 } },
      );
      assert.deepEqual([second.firstVersion, second.lastVersion], [2, 3]);
      const events = await client.events.readStream(stream);
      assert.deepEqual(
        events.map((e) => [e.type, e.streamVersion, e.data]),
        [
          ["Created", 1, { title: "t" }],
          ["Started", 2, { n: 1 }],
          ["Done", 3, null],
        ],
      );
    });

    test("an idempotency key writes once", async () => {
      const [stream, key] = [unique("order"), unique("key")];
      const batch = [{ type: "Placed", data: { sku: "a" } }];
      const first = await client.events.append(stream, "order", batch, { idempotencyKey: key });
      const again = await client.events.append(stream, "order", batch, { idempotencyKey: key });
      assert.deepEqual([again.replayed, again.lastVersion], [true, first.lastVersion]);
      await assert.rejects(
        client.events.append(stream, "order", [{ type: "Placed", data: { sku: "b" } }], { idempotencyKey: key }),
        IdempotencyKeyReusedError,
      );
    });

    test("reads after the first apply deltas to the local copy", async () => {
      const id = unique("plan");
      const big = { steps: Array.from({ length: 50 }, (_, i) => `step ${i}: ${"x".repeat(200)}`), owner: "planner" };
      await client.context.put(id, big);
      const first = await client.context.get(id);
      assert.deepEqual(first?.content, big);
      const other = new Client(sidecar.address);
      const current = await other.context.get(id);
      assert.ok(current);
      await other.context.patch(id, [{ op: "replace", path: "/owner", value: "coder" }], { base: current });
      const second = await client.context.get(id);
      assert.deepEqual(second?.content, { ...big, owner: "coder" });
      assert.ok(second && first && second.revision > first.revision);
    });

    test("many documents are read in one call", async () => {
      const [a, b, never] = [unique("a"), unique("b"), unique("never")];
      await client.context.put(a, { n: 1 });
      await client.context.put(b, { n: 2 });
      const docs = await client.context.getMany([b, never, a]);
      assert.deepEqual(
        docs.map((d) => [d.id, d.content]),
        [
          [b, { n: 2 }],
          [a, { n: 1 }],
        ],
      );
      await assert.rejects(
        client.context.getMany([a, "has space"]),
        (error: unknown) => error instanceof InvalidArgumentError && String(error.message).includes("document_ids[1]"),
      );
    });

    test("a stale write is a conflict carrying the current vector", async () => {
      const id = unique("doc");
      await client.context.put(id, { v: 1 });
      const read = await client.context.get(id);
      const newer = await client.context.put(id, { v: 2 }, { base: read });
      await assert.rejects(
        client.context.put(id, { v: 3 }, { base: read }),
        (error: unknown) => error instanceof ConflictError && JSON.stringify(error.currentVector) === JSON.stringify(newer.vector),
      );
    });

    test("update retries on conflict and loses no increment", async () => {
      const id = unique("tally");
      await client.context.put(id, { n: 0 });
      let conflicts = 0;
      const clients = Array.from({ length: 4 }, () => {
        const c = new Client(sidecar.address);
        // Count the conflicts update meets (and retries).
        const put = c.context.put.bind(c.context);
        c.context.put = async (...args: Parameters<typeof put>) => {
          try {
            return await put(...args);
          } catch (error) {
            if (error instanceof ConflictError) conflicts++;
            throw error;
          }
        };
        return c;
      });
      await Promise.all(
        clients.map(async (c) => {
          for (let i = 0; i < 5; i++) {
            await c.context.update(id, (doc: { n: number }) => ({ n: doc.n + 1 }), { attempts: 100 });
          }
        }),
      );
      const final = await client.context.get(id);
      assert.deepEqual(final?.content, { n: 20 });
      assert.ok(conflicts > 0, "the writers did collide, and update retried");
    });

    test("CRDT documents merge and a counter refuses to overflow", async () => {
      const counter = unique("counter");
      await client.context.merge(counter, MergeType.PN_COUNTER, [Crdt.increment(5), Crdt.increment(-2)]);
      assert.equal((await client.context.get(counter))?.content, 3);
      await assert.rejects(
        client.context.merge(counter, MergeType.PN_COUNTER, [Crdt.increment(2n ** 63n - 1n)]),
        (error: unknown) => error instanceof OutOfRangeError && error.message.includes(counter),
      );
      assert.equal((await client.context.get(counter))?.content, 3, "nothing of the refused request was written");
      const tags = unique("tags");
      await client.context.merge(tags, MergeType.OR_SET, [Crdt.add("a"), Crdt.add("b")]);
      await client.context.merge(tags, MergeType.OR_SET, [Crdt.remove("a")]);
      assert.deepEqual((await client.context.get(tags))?.content, ["b"]);
    });

    test("watch sees each change", async () => {
      const id = unique("watched");
      await client.context.put(id, { v: 0 });
      const stop = new AbortController();
      const seen: number[] = [];
      const watching = (async () => {
        for await (const change of client.context.watch(id, 0, stop.signal)) {
          seen.push((change.content as { v: number }).v);
          if (seen.at(-1) === 3) return;
        }
      })();
      await sleep(300);
      for (const v of [1, 2, 3]) await client.context.update(id, () => ({ v }));
      await watching;
      stop.abort();
      assert.equal(seen.at(-1), 3);
      assert.deepEqual(seen, [...seen].sort());
    });

    test("sessions round-trip and are deleted", async () => {
      const id = unique("conv");
      const ttl = await client.sessions.put("conversation", id, "hello", { ttlMs: 60_000 });
      assert.ok(ttl > 59_000 && ttl <= 60_000);
      const got = await client.sessions.get("conversation", id);
      assert.equal(new TextDecoder().decode(got?.value), "hello");
      assert.equal(await client.sessions.delete("conversation", id), true);
      assert.equal(await client.sessions.get("conversation", id), undefined);
    });

    test("many sessions are read in one call", async () => {
      const [a, b] = [unique("conv"), unique("conv")];
      await client.sessions.put("conversation", a, "first");
      await client.sessions.put("conversation", b, "second");
      const got = await client.sessions.getMany("conversation", [b, unique("absent"), a]);
      assert.deepEqual([...got.keys()], [b, a]);
      assert.equal(new TextDecoder().decode(got.get(a)?.value), "first");
      assert.ok((got.get(b)?.expiresInMs ?? 0) > 60_000);
      await assert.rejects(
        client.sessions.getMany("conversation", Array.from({ length: 1001 }, (_, i) => `s${i}`)),
        InvalidArgumentError,
      );
    });

    test("bad input is refused with a typed error and writes nothing", async () => {
      const stream = unique("bad");
      await assert.rejects(client.events.append(stream, "t", [{ type: "has space", data: {} }]), InvalidArgumentError);
      await assert.rejects(client.events.append(stream, "t", []), (e: unknown) => e instanceof InvalidArgumentError && e.field === "events");
      await assert.rejects(
        client.events.append(stream, "t", [{ type: "E", data: {} }], { idempotencyKey: "ключ" }),
        (e: unknown) => e instanceof InvalidArgumentError && e.field === "idempotencyKey",
      );
      await assert.rejects(
        client.events.append(stream, "t", [{ type: "E", data: { x: "y".repeat(2 * 1024 * 1024) } }]),
        TooLargeError,
      );
      await assert.rejects(client.events.append(stream, "t", [{ type: "E", data: {} }], { expected: { exact: 5 } }), ConflictError);
      await assert.rejects(client.events.readStream(stream), NotFoundError, "nothing was written");
      await assert.rejects(client.sessions.put("no-such-namespace", "s", "v"), InvalidArgumentError);
      await assert.rejects(client.context.patch(unique("d"), [{ op: "explode" }], { base: {} }), InvalidArgumentError);
      await assert.rejects(client.locks.acquire("", { ttlMs: 1000 }), InvalidArgumentError);
      await assert.rejects(client.tasks.startSaga("no-such-definition", {}), NotFoundError);
    });
  });
}

async function collect(subscription: Subscription, stream: string, count: number): Promise<number[]> {
  const seen: number[] = [];
  for await (const event of subscription) {
    if (event.streamId !== stream) continue;
    seen.push((event.data as { n: number }).n);
    if (seen.length === count) return seen;
  }
  throw new Error("the subscription ended");
}

test("a subscription resumes across a sidecar restart without gaps or duplicates", async () => {
  const sidecar = await (await postgresSidecar()).start();
  try {
    const client = new Client(sidecar.address);
    const stream = unique("feed");
    const stop = new AbortController();
    const subscription = client.events.subscribe({ streamId: stream, signal: stop.signal });
    const reading = collect(subscription, stream, 60);
    for (let n = 0; n < 30; n++) await client.events.append(stream, "feed", [{ type: "N", data: { n } }]);
    await sleep(300);
    await sidecar.restart();
    for (let n = 30; n < 60; n++) {
      for (let attempt = 0; ; attempt++) {
        try {
          await client.events.append(stream, "feed", [{ type: "N", data: { n } }]);
          break;
        } catch (error) {
          if (attempt > 50) throw error;
          await sleep(100);
        }
      }
    }
    assert.deepEqual(await reading, Array.from({ length: 60 }, (_, i) => i));
    assert.ok(subscription.resumes >= 1, "it did resubscribe");
    stop.abort();
  } finally {
    await sidecar.stop();
  }
});

test("a consumer cut off for falling behind resumes where it was", async () => {
  const sidecar = await postgresSidecar();
  sidecar.env.STATEFABRIC_SIDECAR__SUBSCRIPTION_BUFFER = "1";
  sidecar.env.STATEFABRIC_SIDECAR__SUBSCRIBER_LAG_TIMEOUT = "100ms";
  await sidecar.start();
  try {
    const client = new Client(sidecar.address);
    const stream = unique("slow");
    // Enough bytes to fill the HTTP/2 flow-control windows, so the
    // sidecar's buffer does fill.
    const pad = "x".repeat(64 * 1024);
    for (let n = 0; n < 160; n += 8) {
      await client.events.append(
        stream,
        "feed",
        Array.from({ length: 8 }, (_, i) => ({ type: "N", data: { n: n + i, pad } })),
      );
    }
    const stop = new AbortController();
    const subscription = client.events.subscribe({ streamId: stream, signal: stop.signal });
    const seen: number[] = [];
    for await (const event of subscription) {
      seen.push((event.data as { n: number }).n);
      if (seen.length % 40 === 1) await sleep(1000); // falls behind
      if (seen.length === 160) break;
    }
    stop.abort();
    assert.deepEqual(seen, Array.from({ length: 160 }, (_, i) => i));
    assert.ok(subscription.resumes >= 1, "it was cut off and resumed");
  } finally {
    await sidecar.stop();
  }
});
