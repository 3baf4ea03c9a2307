"""A Planner, a Coder and a Critic — three agents on the task API — and one
Planner → Coder → Critic saga for them. Deterministic: no model needed (see
openai_agent.py for an agent that calls one through the sidecar).

    fabric dev
    python examples/trio.py [address]
"""

import asyncio
import sys
from typing import Any

import statefabric
from statefabric import Task


async def planner(task: Task) -> dict[str, Any]:
    return {"steps": ["write it", "test it"], "for": task.input["task"]}


async def coder(task: Task) -> dict[str, Any]:
    # The critic's notes come back on the second visit.
    notes = (task.input.get("critique") or {}).get("notes")
    return {"change": f"patch v{task.visit} for {task.input['task']}", "addresses": notes}


async def critic(task: Task) -> dict[str, Any]:
    if task.input["change"]["addresses"] is None:
        return {"verdict": "changes_requested", "notes": "add a test"}
    return {"verdict": "approved"}


async def main(address: str | None) -> None:
    async with statefabric.Client(address) as client:
        done = asyncio.Event()
        saga_id = ""

        def traced(name: str, handler: Any) -> Any:
            async def run(task: Task) -> Any:
                output = await handler(task)
                print(f"{name:8} {task.action:9} {task.key}: {output}")
                if task.saga_id == saga_id and output.get("verdict") == "approved":
                    done.set()
                return output

            return run

        async with (
            client.tasks.worker("planner", traced("planner", planner)),
            client.tasks.worker("coder", traced("coder", coder)),
            client.tasks.worker("critic", traced("critic", critic)),
        ):
            saga_id = await client.tasks.start_saga("plan-code-critique", {"task": "add a health check"})
            print(f"started saga {saga_id}")
            await asyncio.wait_for(done.wait(), 60)
        print(f"saga {saga_id}: the critic approved")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
