"""Locks through real sidecars: renewal, loss noticed and the guarded work
cancelled, fenced writes refused."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

import statefabric
from statefabric import FencedError, LockLostError, LockNotAcquiredError

from .conftest import Sidecar, postgres_sidecar, unique


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[Sidecar, Sidecar]]:
    """Two agents' sidecars of one tenant, sharing the test Redis's locks."""
    tenant = unique("py-locks")
    a = postgres_sidecar(tenant, "agent-a").start()
    b = postgres_sidecar(tenant, "agent-b").start()
    yield a, b
    a.stop()
    b.stop()


async def test_a_held_lock_outlives_its_lease_by_renewal(client: statefabric.Client) -> None:
    name = unique("repo")
    async with client.locks.hold(name, ttl=0.6) as lock:
        await asyncio.sleep(1.5)  # two and a half leases
        assert not lock.lost
        holder = await client.locks.inspect(name)
        assert holder is not None and holder.token == lock.token
    assert await client.locks.inspect(name) is None, "released at the end of the block"


async def test_another_agent_waits_for_a_held_lock(pair: tuple[Sidecar, Sidecar]) -> None:
    name = unique("repo")
    async with statefabric.Client(pair[0].address) as a, statefabric.Client(pair[1].address) as b:
        async with a.locks.hold(name, ttl=0.6) as lock:
            await asyncio.sleep(1.0)
            with pytest.raises(LockNotAcquiredError):
                async with b.locks.hold(name, ttl=1, wait=0.2):
                    pass
            holder = await b.locks.inspect(name)
            assert holder is not None and (holder.owner, holder.token) == ("agent-a", lock.token)
        async with b.locks.hold(name, ttl=1, wait=1) as next_lock:
            assert next_lock.token > lock.token


async def test_a_lock_lost_while_held_cancels_the_work_and_its_fenced_writes_are_refused(
    pair: tuple[Sidecar, Sidecar],
) -> None:
    async with statefabric.Client(pair[0].address) as client:
        await lost_lock(client, pair[1].address)


async def lost_lock(client: statefabric.Client, other_address: str) -> None:
    name, doc_id = unique("repo"), unique("files")
    await client.context.put(doc_id, {"by": "nobody"})
    successor: dict[str, int] = {}

    def take_over() -> None:
        # Another agent (its own client, its own thread) waits for the lock,
        # gets it once the lease lapses, and writes under its newer token.
        with statefabric.sync.Client(other_address) as other:
            with other.locks.hold(name, ttl=5, wait=5) as lock:
                doc = other.context.get(doc_id)
                other.context.put(doc_id, {"by": "successor"}, base=doc, fence=lock.fence)
                successor["token"] = lock.token

    reached_after_pause = False
    with pytest.raises(LockLostError):
        async with client.locks.hold(name, ttl=0.5) as lock:
            first = lock.fence
            thread = threading.Thread(target=take_over)
            thread.start()
            # A pause past the lease (a stop-the-world GC, a stalled
            # thread): the event loop, and with it renewal, stands still.
            time.sleep(1.5)
            await asyncio.to_thread(thread.join)
            reached_after_pause = True
            await asyncio.sleep(5)  # cancelled as soon as renewal runs
            pytest.fail("the work under a lost lock was not cancelled")
    assert reached_after_pause
    assert successor["token"] > first.token
    with pytest.raises(FencedError):
        doc = await client.context.get(doc_id)
        await client.context.put(doc_id, {"by": "the old holder"}, base=doc, fence=first)
    with pytest.raises(FencedError):
        await client.events.append(unique("s"), "s", [statefabric.NewEvent("Late", {})], fence=first)
    doc = await client.context.get(doc_id)
    assert doc is not None and doc.content == {"by": "successor"}
