/** The examples run as a user would run them, against `fabric dev`. */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { type Sidecar, devSidecar } from "./harness.js";

const run = promisify(execFile);
let dev: Sidecar;
before(async () => {
  dev = await (await devSidecar()).start();
});
after(async () => dev.stop());

async function example(name: string, env: Record<string, string>, ...args: string[]): Promise<string> {
  const path = fileURLToPath(new URL(`../examples/${name}.js`, import.meta.url));
  const { stdout } = await run(process.execPath, [path, ...args], { env: { ...process.env, ...env }, timeout: 120_000 });
  return stdout;
}

test("the quickstart runs", async () => {
  const out = await example("quickstart", { STATEFABRIC_ADDRESS: `http://${dev.address}` });
  assert.match(out, /a second creation is refused/);
  assert.match(out, /replayed=true/);
  assert.match(out, /tokens used: 50/);
});

test("the trio runs a saga to approval", async () => {
  const out = await example("trio", {}, dev.address);
  assert.match(out, /the critic approved/);
  assert.equal(out.match(/coder +code/g)?.length, 2, out);
});
