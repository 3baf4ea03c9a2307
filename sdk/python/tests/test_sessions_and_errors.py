"""Sessions, and bad input refused with typed errors that change nothing."""

from __future__ import annotations

import pytest

import statefabric
from statefabric import (
    AlreadyExistsError,
    ConflictError,
    Expected,
    InvalidArgumentError,
    NewEvent,
    NotFoundError,
    TooLargeError,
)

from .conftest import unique


async def test_sessions_round_trip_and_expire(client: statefabric.Client) -> None:
    sid = unique("conv")
    ttl = await client.sessions.put("conversation", sid, b"hello", ttl=60)
    assert 59 <= ttl <= 60
    got = await client.sessions.get("conversation", sid)
    assert got is not None and got.value == b"hello"
    assert await client.sessions.delete("conversation", sid)
    assert await client.sessions.get("conversation", sid) is None
    assert not await client.sessions.delete("conversation", sid)


async def test_many_sessions_are_read_in_one_call(client: statefabric.Client) -> None:
    a, b = unique("conv"), unique("conv")
    await client.sessions.put("conversation", a, b"first")
    await client.sessions.put("conversation", b, b"second")
    got = await client.sessions.get_many("conversation", [b, unique("absent"), a])
    assert list(got) == [b, a]
    assert got[a].value == b"first" and got[b].value == b"second"
    assert got[a].expires_in > 60
    with pytest.raises(InvalidArgumentError):
        await client.sessions.get_many("conversation", [f"s{i}" for i in range(1001)])


async def test_bad_input_is_refused_with_a_typed_error_and_writes_nothing(client: statefabric.Client) -> None:
    stream = unique("bad")
    with pytest.raises(InvalidArgumentError) as bad_type:
        await client.events.append(stream, "t", [NewEvent("has space", {})])
    assert "event" in bad_type.value.message.lower()
    with pytest.raises(InvalidArgumentError):
        await client.events.append("a stream/with spaces", "t", [NewEvent("E", {})])
    with pytest.raises(InvalidArgumentError) as empty:
        await client.events.append(stream, "t", [])
    assert empty.value.field == "events"
    with pytest.raises(InvalidArgumentError) as key:
        await client.events.append(stream, "t", [NewEvent("E", {})], idempotency_key="ключ")
    assert key.value.field == "idempotency_key"
    with pytest.raises(TooLargeError):
        await client.events.append(stream, "t", [NewEvent("E", {"x": "y" * (2 * 1024 * 1024)})])
    with pytest.raises(ConflictError):
        await client.events.append(stream, "t", [NewEvent("E", {})], expected=Expected.exact(5))
    with pytest.raises(NotFoundError):
        await client.events.read_stream(stream)  # nothing was written

    with pytest.raises(InvalidArgumentError):
        await client.sessions.put("no-such-namespace", "s", b"v")
    with pytest.raises(InvalidArgumentError):
        await client.context.patch(unique("d"), [{"op": "explode"}], base={})
    with pytest.raises(InvalidArgumentError):
        await client.locks.acquire("", ttl=1)
    with pytest.raises(NotFoundError):
        await client.tasks.start_saga("no-such-definition", {})


async def test_saga_requests_refused_clearly(dev_client: statefabric.Client) -> None:
    with pytest.raises(InvalidArgumentError) as not_object:
        await dev_client.tasks.start_saga("plan-code-critique", [1])  # type: ignore[arg-type]
    assert not_object.value.field == "data"
    saga = unique("saga")
    await dev_client.tasks.start_saga("plan-code-critique", {"task": "t"}, saga_id=saga)
    with pytest.raises(AlreadyExistsError):
        await dev_client.tasks.start_saga("plan-code-critique", {"task": "t"}, saga_id=saga)
    with pytest.raises(InvalidArgumentError):
        await dev_client.tasks.poll("plan ner")
    with pytest.raises(NotFoundError):
        await dev_client.tasks.complete(f"{unique('nosaga')}/PLAN/1/1", {})
