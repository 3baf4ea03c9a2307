"""Events through real sidecars: expected versions, idempotency keys,
reads, and subscriptions that resume without gaps or duplicates."""

from __future__ import annotations

import asyncio

import pytest

import statefabric
from statefabric import ConflictError, Expected, IdempotencyKeyReusedError, NewEvent

from .conftest import Sidecar, postgres_sidecar, unique


async def test_append_checks_the_expected_version(client: statefabric.Client) -> None:
    stream = unique("task")
    first = await client.events.append(
        stream, "task", [NewEvent("Created", {"title": "t"})], expected=Expected.NO_STREAM
    )
    assert (first.first_version, first.last_version, first.replayed) == (1, 1, False)
    with pytest.raises(ConflictError) as refused:
        await client.events.append(stream, "task", [NewEvent("Again", {})], expected=Expected.NO_STREAM)
    assert refused.value.actual_version == 1
    second = await client.events.append(
        stream, "task", [NewEvent("Started", {"n": 1}), NewEvent("Done", None)], expected=Expected.exact(1)
    )
    assert (second.first_version, second.last_version) == (2, 3)
    events = await client.events.read_stream(stream)
    assert [(e.type, e.stream_version, e.data) for e in events] == [
        ("Created", 1, {"title": "t"}),
        ("Started", 2, {"n": 1}),
        ("Done", 3, None),
    ]
    assert all(e.vector_clock for e in events), "the sidecar ticks each event's clock"


async def test_an_idempotency_key_writes_once(client: statefabric.Client) -> None:
    stream, key = unique("order"), unique("key")
    batch = [NewEvent("Placed", {"sku": "a"})]
    first = await client.events.append(stream, "order", batch, idempotency_key=key)
    again = await client.events.append(stream, "order", batch, idempotency_key=key)
    assert (again.replayed, again.last_version) == (True, first.last_version)
    assert len(await client.events.read_stream(stream)) == 1
    with pytest.raises(IdempotencyKeyReusedError):
        await client.events.append(stream, "order", [NewEvent("Placed", {"sku": "b"})], idempotency_key=key)


async def collect(subscription: statefabric.Subscription, stream: str, count: int) -> list[int]:
    seen: list[int] = []
    async for event in subscription:
        if event.stream_id == stream:
            seen.append(event.data["n"])
            if len(seen) == count:
                return seen
    raise AssertionError("the subscription ended")


async def test_a_subscription_resumes_across_a_sidecar_restart_without_gaps_or_duplicates() -> None:
    sidecar: Sidecar = postgres_sidecar().start()
    try:
        stream = unique("feed")
        async with statefabric.Client(sidecar.address) as client:
            subscription = client.events.subscribe(stream_id=stream)
            reader = asyncio.create_task(collect(subscription, stream, 60))
            for n in range(30):
                await client.events.append(stream, "feed", [NewEvent("N", {"n": n})])
            await asyncio.sleep(0.3)
            # The sidecar goes away mid-feed and comes back on the same port.
            await asyncio.to_thread(sidecar.restart)
            for n in range(30, 60):
                for _ in range(50):
                    try:
                        await client.events.append(stream, "feed", [NewEvent("N", {"n": n})])
                        break
                    except statefabric.UnavailableError:
                        await asyncio.sleep(0.1)
            seen = await asyncio.wait_for(reader, 30)
            assert seen == list(range(60))
            assert subscription.resumes >= 1, "it did resubscribe"
    finally:
        sidecar.stop()


async def test_a_consumer_cut_off_for_falling_behind_resumes_where_it_was() -> None:
    # A one-event buffer and a short lag allowance: a consumer that sleeps
    # is cut off with RESOURCE_EXHAUSTED, and must pick up after its
    # checkpoint.
    sidecar = postgres_sidecar()
    sidecar.env["STATEFABRIC_SIDECAR__SUBSCRIPTION_BUFFER"] = "1"
    sidecar.env["STATEFABRIC_SIDECAR__SUBSCRIBER_LAG_TIMEOUT"] = "100ms"
    sidecar.start()
    try:
        stream = unique("slow")
        async with statefabric.Client(sidecar.address) as client:
            # Enough bytes to fill the HTTP/2 flow-control windows between
            # the sidecar and this client, so the sidecar's buffer does fill.
            pad = "x" * 64 * 1024
            for n in range(0, 160, 8):
                await client.events.append(
                    stream, "feed", [NewEvent("N", {"n": i, "pad": pad}) for i in range(n, n + 8)]
                )
            subscription = client.events.subscribe(stream_id=stream)
            seen: list[int] = []
            async for event in subscription:
                seen.append(event.data["n"])
                if len(seen) % 40 == 1:
                    await asyncio.sleep(1.0)  # falls behind
                if len(seen) == 160:
                    break
            assert seen == list(range(160))
            assert subscription.resumes >= 1, "it was cut off and resumed"
    finally:
        sidecar.stop()
