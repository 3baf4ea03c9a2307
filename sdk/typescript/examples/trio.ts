/**
 * A Planner, a Coder and a Critic — three agents on the task API — and one
 * Planner → Coder → Critic saga for them. Deterministic: no model needed.
 *
 *   fabric dev
 *   node dist/examples/trio.js [address]
 */
import { Client, type Handler, type Task } from "../src/index.js";

const client = new Client(process.argv[2]);
let sagaId = "";
let approved: () => void = () => undefined;
const done = new Promise<void>((resolve) => (approved = resolve));

function traced(name: string, act: (task: Task) => Record<string, unknown>): Handler {
  return async (task) => {
    const output = act(task);
    console.log(`${name.padEnd(8)} ${task.action.padEnd(9)} ${task.key}: ${JSON.stringify(output)}`);
    if (task.sagaId === sagaId && output.verdict === "approved") approved();
    return output;
  };
}

const workers = [
  client.tasks.worker("planner", traced("planner", (task) => ({ steps: ["write it", "test it"], for: task.input.task }))),
  client.tasks.worker(
    "coder",
    // The critic's notes come back on the second visit.
    traced("coder", (task) => ({ change: `patch v${task.visit} for ${task.input.task}`, addresses: task.input.critique?.notes ?? null })),
  ),
  client.tasks.worker(
    "critic",
    traced("critic", (task) =>
      task.input.change.addresses === null ? { verdict: "changes_requested", notes: "add a test" } : { verdict: "approved" },
    ),
  ),
];
const running = workers.map((w) => w.run());
sagaId = await client.tasks.startSaga("plan-code-critique", { task: "add a health check" });
console.log(`started saga ${sagaId}`);
const timeout = setTimeout(() => {
  console.error("no approval within 60 s");
  process.exit(1);
}, 60_000);
await done;
clearTimeout(timeout);
await Promise.all(workers.map((w) => w.stop()));
await Promise.all(running);
console.log(`saga ${sagaId}: the critic approved`);
