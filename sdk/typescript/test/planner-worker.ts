/**
 * A planner agent in its own process, for the test that kills it mid-task:
 * asks the model through the sidecar's egress, says so, then hangs.
 */
import { Client, egress } from "../src/index.js";

const [address, egressAddress] = process.argv.slice(2) as [string, string];
const client = new Client(address);
const worker = client.tasks.worker(
  "planner",
  async (task) => {
    const response = await egress.fetch(`${egress.baseUrl("model", egressAddress)}/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "m", messages: [{ role: "user", content: `plan ${task.input.task}` }] }),
    });
    const answer = (await response.json()) as { choices: { message: { content: string } }[] };
    process.stdout.write(`asked ${task.key} ${answer.choices[0]?.message.content}\n`);
    await new Promise(() => undefined); // stuck
  },
  { concurrency: 1 },
);
void worker.run();
process.stdout.write("ready\n");
