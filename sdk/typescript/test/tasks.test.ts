/**
 * Saga tasks through `fabric dev`: a Planner → Coder → Critic trio runs a
 * saga to DONE; a failing handler's task is retried; a worker killed
 * mid-task has its task handed to another worker under the same key, whose
 * model call is then replayed by the egress; stopping drains.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createInterface } from "node:readline";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { Client, type Handler, TaskFailed, egress } from "../src/index.js";
import { ModelUpstream, type Sidecar, devSidecar, sleep, unique } from "./harness.js";

let dev: Sidecar;
let client: Client;
before(async () => {
  dev = await (await devSidecar()).start();
  client = new Client(dev.address);
});
after(async () => dev.stop());

async function sagaStatus(sidecar: Sidecar, id: string): Promise<string | undefined> {
  const response = await fetch(`http://${sidecar.env.STATEFABRIC_API__LISTEN}/v1/sagas/${id}`);
  if (response.status !== 200) return undefined;
  return ((await response.json()) as { saga: { instance: { status: string } } }).saga.instance.status;
}

async function untilEnded(sidecar: Sidecar, id: string, withinMs = 30_000): Promise<string> {
  const deadline = Date.now() + withinMs;
  for (;;) {
    const status = await sagaStatus(sidecar, id);
    if (status && ["DONE", "FAILED", "COMPENSATED"].includes(status)) return status;
    if (Date.now() > deadline) throw new Error(`saga ${id} did not end (last: ${status})`);
    await sleep(200);
  }
}

/** Runs saga `id` of the built-in definition with the three workers; returns how it ended. */
async function runSaga(id: string, planner: Handler, coder: Handler, critic: Handler): Promise<string> {
  const workers = [
    client.tasks.worker("planner", planner),
    client.tasks.worker("coder", coder),
    client.tasks.worker("critic", critic),
  ];
  const running = workers.map((w) => w.run());
  try {
    await client.tasks.startSaga("plan-code-critique", { task: "add a health check" }, { sagaId: id });
    return await untilEnded(dev, id);
  } finally {
    await Promise.all(workers.map((w) => w.stop()));
    await Promise.all(running);
  }
}

test("a planner, coder, critic trio runs a saga to DONE", async () => {
  const saga = unique("trio");
  const handled: string[] = [];
  let critiques = 0;
  const status = await runSaga(
    saga,
    async (task) => {
      if (task.sagaId === saga) handled.push(task.action);
      return { steps: ["write it", "test it"] };
    },
    async (task) => {
      if (task.sagaId === saga) handled.push(task.action);
      return { change: `patch ${task.visit} for ${task.input.task}` };
    },
    async (task) => {
      if (task.sagaId !== saga) return { verdict: "approved" };
      handled.push(task.action);
      critiques++;
      assert.match(task.input.change.change, /^patch/);
      return { verdict: critiques === 1 ? "changes_requested" : "approved" };
    },
  );
  assert.equal(status, "DONE");
  assert.deepEqual(handled, ["plan", "code", "critique", "code", "critique"]);
});

test("a failing handler fails the task and the engine retries it", async () => {
  const saga = unique("flaky");
  const attempts: number[] = [];
  const status = await runSaga(
    saga,
    async (task) => {
      if (task.sagaId !== saga) return {};
      attempts.push(task.attempt);
      if (task.attempt === 1) throw new TaskFailed("the model was unavailable");
      return { steps: [] };
    },
    async () => ({ change: "c" }),
    async () => ({ verdict: "approved" }),
  );
  assert.equal(status, "DONE");
  assert.deepEqual(attempts, [1, 2]);
});

test("a worker killed mid-task hands it on under the same key, and its model call is replayed", async () => {
  const model = await ModelUpstream.start();
  const sidecar = await (await model.devWithEgress()).start();
  const agent = spawn(
    process.execPath,
    [fileURLToPath(new URL("./planner-worker.js", import.meta.url)), sidecar.address, sidecar.egress],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  try {
    const lines = createInterface({ input: agent.stdout })[Symbol.asyncIterator]();
    assert.equal((await lines.next()).value, "ready");
    const other = new Client(sidecar.address);
    const saga = await other.tasks.startSaga("plan-code-critique", { task: "fix the build" });
    const asked = String((await lines.next()).value);
    const [, firstKey, firstAnswer] = /^asked (\S+) (.*)$/.exec(asked) ?? [];
    assert.ok(firstKey?.startsWith(`${saga}/PLAN/1/1`), asked);
    assert.equal(model.calls.length, 1);
    assert.equal(model.calls[0]?.authorization, "Bearer sk-held-by-the-sidecar");
    assert.equal(model.calls[0]?.taskKey, `${firstKey}/call-1`);

    // The agent dies mid-task (no goodbye: SIGKILL).
    const exited = new Promise((resolve) => agent.once("exit", resolve));
    agent.kill("SIGKILL");
    await exited;
    const killedAt = Date.now();

    // Another planner gets the same attempt under the same key long before
    // the step's two-minute lease runs out, and its identical model call is
    // answered from the record.
    let seen: { key: string; answer: string; replayed: boolean } | undefined;
    const worker = other.tasks.worker(
      "planner",
      async (task) => {
        const response = await egress.fetch(`${egress.baseUrl("model", sidecar.egress)}/chat/completions`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ model: "m", messages: [{ role: "user", content: `plan ${task.input.task}` }] }),
        });
        const body = (await response.json()) as { choices: { message: { content: string } }[] };
        seen = {
          key: task.key,
          answer: body.choices[0]?.message.content ?? "",
          replayed: response.headers.get(egress.REPLAYED_HEADER) === "true",
        };
        return { steps: [seen.answer] };
      },
      { concurrency: 1 },
    );
    const running = worker.run();
    const deadline = Date.now() + 30_000;
    while (!seen && Date.now() < deadline) await sleep(100);
    await worker.stop();
    await running;
    assert.ok(seen, "the task came to the other worker");
    assert.equal(seen.key, firstKey);
    assert.ok(Date.now() - killedAt < 20_000);
    assert.deepEqual([seen.answer, seen.replayed], [firstAnswer, true]);
    assert.equal(model.calls.length, 1, "the model was not called again");
  } finally {
    agent.kill("SIGKILL");
    await sidecar.stop();
    await model.close();
  }
});

test("a saga's trace context reaches its tasks and their egress calls", async () => {
  const model = await ModelUpstream.start();
  const sidecar = await (await model.devWithEgress()).start();
  const trace = "00-9bf92f3577b34da6a3ce929d0e0e4736-40f067aa0ba902b7-01";
  try {
    const c = new Client(sidecar.address);
    let seen: string | undefined;
    const worker = c.tasks.worker("planner", async (task) => {
      await egress.fetch(`${egress.baseUrl("model", sidecar.egress)}/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ model: "m", messages: [{ role: "user", content: "plan" }] }),
      });
      seen = task.traceparent;
      return { steps: [] };
    });
    const running = worker.run();
    await c.tasks.startSaga("plan-code-critique", { task: "t" }, { traceparent: trace });
    const deadline = Date.now() + 30_000;
    while (!seen && Date.now() < deadline) await sleep(50);
    await worker.stop();
    await running;
    assert.equal(seen, trace, "no spans exported: the caller's context as sent");
    assert.equal(model.calls[0]?.traceparent, trace, "the model call is in the saga's trace");
  } finally {
    await sidecar.stop();
    await model.close();
  }
});

test("stopping a worker lets its running handler finish", async () => {
  const sidecar = await (await devSidecar()).start();
  try {
    const c = new Client(sidecar.address);
    let started = false;
    let finished = false;
    const worker = c.tasks.worker("planner", async () => {
      started = true;
      await sleep(1000);
      finished = true;
      return { steps: [] };
    });
    const running = worker.run();
    await c.tasks.startSaga("plan-code-critique", { task: "t" });
    while (!started) await sleep(50);
    await worker.stop();
    await running;
    assert.ok(finished);
    assert.equal(worker.answered, 1);
    const coder = await c.tasks.poll("coder", 1, 10_000);
    assert.deepEqual(
      coder.map((t) => t.step),
      ["CODE"],
    );
  } finally {
    await sidecar.stop();
  }
});

test("saga requests are refused clearly", async () => {
  await assert.rejects(
    client.tasks.startSaga("plan-code-critique", [1] as unknown as Record<string, unknown>),
    (e: unknown) => e instanceof Error && "field" in e && e.field === "data",
  );
  const saga = unique("saga");
  await client.tasks.startSaga("plan-code-critique", { task: "t" }, { sagaId: saga });
  const { AlreadyExistsError, InvalidArgumentError, NotFoundError } = await import("../src/index.js");
  await assert.rejects(client.tasks.startSaga("plan-code-critique", { task: "t" }, { sagaId: saga }), AlreadyExistsError);
  await assert.rejects(client.tasks.poll("plan ner"), InvalidArgumentError);
  await assert.rejects(client.tasks.complete(`${unique("nosaga")}/PLAN/1/1`, {}), NotFoundError);
});
