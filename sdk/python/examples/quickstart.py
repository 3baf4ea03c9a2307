"""A tour of the Python SDK against a running sidecar.

    fabric dev                              # in one terminal
    python examples/quickstart.py [address] # in another (default: STATEFABRIC_ADDRESS or 127.0.0.1:7400)
"""

import asyncio
import sys
import uuid

import statefabric
from statefabric import ConflictError, Crdt, Expected, MergeType, NewEvent


async def main(address: str | None) -> None:
    run = uuid.uuid4().hex[:8]
    async with statefabric.Client(address) as client:
        # Events: a stream per aggregate, appended with an expected version.
        stream = f"task-{run}"
        await client.events.append(
            stream, "task", [NewEvent("TaskCreated", {"title": "fix the build"})], expected=Expected.NO_STREAM
        )
        try:
            await client.events.append(stream, "task", [NewEvent("TaskCreated", {})], expected=Expected.NO_STREAM)
        except ConflictError as conflict:
            print(f"a second creation is refused: {conflict.message}")
        # The same key twice writes once.
        for _ in range(2):
            written = await client.events.append(
                stream, "task", [NewEvent("TaskStarted", {"by": "planner"})], idempotency_key=f"start-{run}"
            )
            print(f"append with a key: version {written.last_version}, replayed={written.replayed}")
        for event in await client.events.read_stream(stream):
            print(f"  {event.stream_version}: {event.type} {event.data}")

        # Context: read-modify-write that retries when someone else wrote first.
        plan = f"plan-{run}"
        await client.context.update(plan, lambda doc: {"steps": ["write it"]})
        await client.context.update(plan, lambda doc: {**doc, "steps": [*doc["steps"], "test it"]})
        doc = await client.context.get(plan)
        assert doc is not None
        print(f"plan at revision {doc.revision}: {doc.content} (vector {doc.vector})")

        # A CRDT counter: concurrent increments merge.
        counter = f"tokens-{run}"
        await asyncio.gather(
            *(client.context.merge(counter, MergeType.PN_COUNTER, [Crdt.increment(10)]) for _ in range(5))
        )
        total = await client.context.get(counter)
        print(f"tokens used: {total.content if total else None}")

        # A lock, renewed while held; writes under it carry its fencing token.
        async with client.locks.hold(f"repo-{run}", ttl=5) as lock:
            await client.context.put(f"files-{run}", {"main.py": "print()"}, fence=lock)
            print(f"wrote under lock {lock.name} with token {lock.token}")

        # Sessions expire on their own.
        expires = await client.sessions.put("conversation", f"chat-{run}", b"hello")
        print(f"session expires in {expires:.0f} s")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else None))
