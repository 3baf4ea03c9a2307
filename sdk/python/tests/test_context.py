"""Context documents through real sidecars: deltas applied to the local
copy, conflicts retried by update, CRDTs, watches."""

from __future__ import annotations

import asyncio

import pytest

import statefabric
from statefabric import ConflictError, Crdt, MergeType, OutOfRangeError

from .conftest import unique


async def test_reads_after_the_first_apply_deltas_to_the_local_copy(client: statefabric.Client) -> None:
    doc_id = unique("plan")
    big = {"steps": [f"step {i}: " + "x" * 200 for i in range(50)], "owner": "planner"}
    await client.context.put(doc_id, big)
    first = await client.context.get(doc_id)
    assert first is not None and first.content == big
    # Another client changes one field; this client's next read gets the
    # change as a delta against its copy and rebuilds the whole document.
    async with statefabric.Client(client.address) as other:
        current = await other.context.get(doc_id)
        assert current is not None
        await other.context.patch(
            doc_id, [{"op": "replace", "path": "/owner", "value": "coder"}], base=current
        )
    second = await client.context.get(doc_id)
    assert second is not None
    assert second.content == {**big, "owner": "coder"}
    assert second.revision > first.revision
    # The copy handed out is the caller's: changing it changes nothing here.
    second.content["owner"] = "mutated"
    third = await client.context.get(doc_id)
    assert third is not None and third.content["owner"] == "coder"


async def test_a_stale_write_is_a_conflict_carrying_the_current_vector(client: statefabric.Client) -> None:
    doc_id = unique("doc")
    await client.context.put(doc_id, {"v": 1})
    read = await client.context.get(doc_id)
    assert read is not None
    newer = await client.context.put(doc_id, {"v": 2}, base=read)
    with pytest.raises(ConflictError) as refused:
        await client.context.put(doc_id, {"v": 3}, base=read)
    assert refused.value.current_vector == newer.vector


async def test_update_retries_on_conflict_and_loses_no_increment(client: statefabric.Client) -> None:
    doc_id = unique("tally")
    await client.context.put(doc_id, {"n": 0})
    clients = [statefabric.Client(client.address) for _ in range(4)]
    conflicts = 0

    def bump(doc: dict[str, int]) -> None:
        doc["n"] += 1

    async def writer(c: statefabric.Client) -> None:
        for _ in range(5):
            # Each client reads first, so concurrent writers collide and
            # update must retry.
            await c.context.update(doc_id, bump, attempts=50)

    original_put = statefabric.context.Context.put

    async def counting_put(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        nonlocal conflicts
        try:
            return await original_put(self, *args, **kwargs)
        except ConflictError:
            conflicts += 1
            raise

    statefabric.context.Context.put = counting_put  # type: ignore[method-assign]
    try:
        await asyncio.gather(*(writer(c) for c in clients))
    finally:
        statefabric.context.Context.put = original_put  # type: ignore[method-assign]
        for c in clients:
            await c.close()
    final = await client.context.get(doc_id)
    assert final is not None and final.content == {"n": 20}
    assert conflicts > 0, "the writers did collide, and update retried"


async def test_crdt_documents_merge_and_a_counter_refuses_to_overflow(client: statefabric.Client) -> None:
    counter = unique("counter")
    await client.context.merge(counter, MergeType.PN_COUNTER, [Crdt.increment(5), Crdt.increment(-2)])
    doc = await client.context.get(counter)
    assert doc is not None and doc.content == 3 and doc.merge == MergeType.PN_COUNTER
    with pytest.raises(OutOfRangeError) as refused:
        await client.context.merge(counter, MergeType.PN_COUNTER, [Crdt.increment(2**63 - 1)])
    assert counter in refused.value.message
    still = await client.context.get(counter)
    assert still is not None and still.content == 3, "nothing of the refused request was written"

    tags = unique("tags")
    await client.context.merge(tags, MergeType.OR_SET, [Crdt.add("a"), Crdt.add("b")])
    await client.context.merge(tags, MergeType.OR_SET, [Crdt.remove("a")])
    doc = await client.context.get(tags)
    assert doc is not None and doc.content == ["b"]

    fields = unique("fields")
    await client.context.merge(fields, MergeType.LWW_MAP, [Crdt.put("x", 1), Crdt.put("y", {"z": True})])
    await client.context.merge(fields, MergeType.LWW_MAP, [Crdt.remove_key("x")])
    doc = await client.context.get(fields)
    assert doc is not None and doc.content == {"y": {"z": True}}


async def test_watch_sees_each_change(client: statefabric.Client) -> None:
    doc_id = unique("watched")
    await client.context.put(doc_id, {"v": 0})
    seen: list[int] = []

    async def watch() -> None:
        async for change in client.context.watch(doc_id):
            seen.append(change.content["v"])
            if change.content["v"] == 3:
                return

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.3)
    for v in (1, 2, 3):
        await client.context.update(doc_id, lambda d, v=v: {"v": v})
    await asyncio.wait_for(watcher, 10)
    assert seen[-1] == 3 and seen == sorted(seen)


async def test_many_documents_are_read_in_one_call(client: statefabric.Client) -> None:
    a, b, never = unique("a"), unique("b"), unique("never")
    await client.context.put(a, {"n": 1})
    await client.context.put(b, {"n": 2})
    docs = await client.context.get_many([b, never, a])
    assert [(d.id, d.content) for d in docs] == [(b, {"n": 2}), (a, {"n": 1})]
    # Each is now a local copy: a later read of one gets a delta against it.
    again = await client.context.get(a)
    assert again is not None and again.content == {"n": 1}
    with pytest.raises(statefabric.InvalidArgumentError) as refused:
        await client.context.get_many([a, "has space"])
    assert "document_ids[1]" in str(refused.value)
