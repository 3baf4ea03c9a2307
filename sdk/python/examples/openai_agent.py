"""A planner agent that asks a model, with the `openai` package, through the
sidecar's egress: the sidecar holds the API key, applies timeouts, retries
and the circuit breaker, and records each call under the task's key — so if
this agent crashes mid-task, the planner that takes the task over gets the
model's answer replayed instead of paying for it again.

Needs `fabric dev` with egress on and an Upstream named `model`, e.g.

    # mesh.yaml
    apiVersion: statefabric.io/v1alpha1
    kind: Upstream
    metadata: {name: model}
    spec:
      url: https://api.openai.com/v1
      headers: [{name: Authorization, value: "Bearer sk-..."}]

    STATEFABRIC_MESH__FILES='["mesh.yaml"]' STATEFABRIC_EGRESS__ENABLED=true fabric dev
    python examples/openai_agent.py [model-name]
"""

import asyncio
import sys
from typing import Any

import openai

import statefabric
from statefabric import Task, egress


async def main(model_name: str) -> None:
    model = openai.AsyncOpenAI(
        base_url=egress.base_url("model"),  # STATEFABRIC_EGRESS_ADDRESS
        api_key="held-by-the-sidecar",
        max_retries=0,  # the sidecar retries, within its retry budget
        http_client=egress.httpx_client(),  # sets the task key for replay
    )
    async with statefabric.Client() as client:
        planned = asyncio.Event()

        async def plan(task: Task) -> dict[str, Any]:
            reply = await model.chat.completions.with_raw_response.create(
                model=model_name,
                messages=[{"role": "user", "content": f"Plan, in three short steps: {task.input['task']}"}],
            )
            replayed = reply.headers.get(egress.REPLAYED_HEADER) == "true"
            text = reply.parse().choices[0].message.content
            print(f"{task.key}{' (replayed)' if replayed else ''}: {text}")
            planned.set()
            return {"steps": text}

        async with client.tasks.worker("planner", plan):
            saga = await client.tasks.start_saga("plan-code-critique", {"task": "add a health check"})
            print(f"started saga {saga}; planning")
            await asyncio.wait_for(planned.wait(), 120)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "gpt-4o-mini"))
