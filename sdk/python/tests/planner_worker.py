"""A planner agent in its own process, for the test that kills it mid-task:
it asks the model (through the sidecar's egress, with the openai package),
says so on stdout, then hangs as if stuck."""

import asyncio
import sys

import openai

import statefabric
from statefabric import egress


async def main(address: str, egress_address: str) -> None:
    model = openai.AsyncOpenAI(
        base_url=egress.base_url("model", egress_address),
        api_key="the-agent-holds-no-key",
        max_retries=0,
        http_client=egress.httpx_client(),
    )

    async def plan(task: statefabric.Task) -> dict:
        reply = await model.chat.completions.create(
            model="m", messages=[{"role": "user", "content": f"plan {task.input['task']}"}]
        )
        print(f"asked {task.key} {reply.choices[0].message.content}", flush=True)
        await asyncio.sleep(3600)
        return {}

    async with statefabric.Client(address) as client:
        async with client.tasks.worker("planner", plan, concurrency=1):
            print("ready", flush=True)
            await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
