"""Shared context documents: reads that fetch only a compressed delta from
the copy this client already has, writes against a version vector, CRDT
updates, read-modify-write that retries on conflict, and watches.

Every document carries a version vector (writer id -> writes seen). A plain
document's write names the vector it read (`base`) and is refused with
:class:`~statefabric.errors.ConflictError` if another writer got in first;
:meth:`Context.update` does the read-modify-write loop for you. A document
created with a CRDT merge type merges concurrent writes instead."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import enum
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import jsonpatch
import zstandard

from ._backoff import Backoff
from ._rpc import key_metadata, unary
from .errors import ConflictError, FencedError, InvalidArgumentError, NotFoundError, from_rpc_error
from .locks import Fence, HeldLock, fence_of
from .state.v1 import context_pb2 as pb
from .state.v1 import context_pb2_grpc

log = logging.getLogger(__name__)

Vector = Mapping[str, int]


class MergeType(enum.IntEnum):
    """How concurrent writes to a document combine (fixed at creation)."""

    #: Concurrent writes conflict.
    NONE = pb.MERGE_TYPE_NONE
    #: Last writer wins the whole value.
    LWW_REGISTER = pb.MERGE_TYPE_LWW_REGISTER
    #: Last writer wins per key of a JSON object.
    LWW_MAP = pb.MERGE_TYPE_LWW_MAP
    #: A set of JSON values; a remove removes only what its writer had seen.
    OR_SET = pb.MERGE_TYPE_OR_SET
    #: An integer writers add to and subtract from.
    PN_COUNTER = pb.MERGE_TYPE_PN_COUNTER


@dataclass(frozen=True)
class Document:
    id: str
    merge: MergeType
    content: Any
    vector: dict[str, int]
    revision: int
    updated_at: str


def _document(r: pb.GetContextResponse, content: Any) -> Document:
    """A document from the sidecar's answer, its content already resolved."""
    return Document(r.document_id, MergeType(r.merge_type), content, dict(r.vector.counters), r.revision, r.updated_at)


@dataclass(frozen=True)
class Written:
    revision: int
    vector: dict[str, int]
    #: True when an idempotency key matched an earlier write.
    replayed: bool


@dataclass(frozen=True)
class Change:
    """One change seen by :meth:`Context.watch`."""

    revision: int
    vector: dict[str, int]
    deleted: bool
    content: Any


def _json(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


class Crdt:
    """CRDT operations for :meth:`Context.merge`."""

    @staticmethod
    def set(value: Any) -> pb.CrdtOp:
        """LWW register: the new value."""
        return pb.CrdtOp(set_json=_json(value))

    @staticmethod
    def put(key: str, value: Any) -> pb.CrdtOp:
        """LWW map: set a key."""
        return pb.CrdtOp(map_put=pb.MapPut(key=key, value_json=_json(value)))

    @staticmethod
    def remove_key(key: str) -> pb.CrdtOp:
        """LWW map: remove a key."""
        return pb.CrdtOp(map_remove=key)

    @staticmethod
    def add(element: Any) -> pb.CrdtOp:
        """OR-set: add an element."""
        return pb.CrdtOp(add_json=_json(element))

    @staticmethod
    def remove(element: Any) -> pb.CrdtOp:
        """OR-set: remove an element as this sidecar sees it."""
        return pb.CrdtOp(remove_json=_json(element))

    @staticmethod
    def increment(by: int) -> pb.CrdtOp:
        """PN-counter: add `by` (negative to subtract). Leaving the signed
        64-bit range is refused with OutOfRangeError, never wrapped."""
        if not -(2**63) <= by < 2**63:
            raise InvalidArgumentError("an increment is a signed 64-bit integer", field="increment")
        return pb.CrdtOp(increment=by)


def apply_delta(base: Any, compressed: bytes) -> Any:
    """`base` with a zstd-compressed JSON Patch (RFC 6902) applied."""
    try:
        raw = zstandard.ZstdDecompressor().decompressobj().decompress(compressed)
        patch = json.loads(raw)
        return jsonpatch.apply_patch(base, patch)
    except (zstandard.ZstdError, ValueError, jsonpatch.JsonPatchException) as error:
        raise InvalidArgumentError(f"the sidecar's delta does not apply: {error}") from error


def _merge_type(merge: MergeType) -> Any:
    """The wire enum (the generated stubs type it by name; the value is
    the same integer)."""
    return int(merge)


def _vector(base: Vector | Document | None) -> pb.VersionVector:
    if isinstance(base, Document):
        base = base.vector
    return pb.VersionVector(counters=dict(base or {}))


def _written(r: pb.ContextWriteResponse) -> Written:
    return Written(r.revision, dict(r.vector.counters), r.replayed)


class Context:
    """The ``SharedContext`` service, with a local copy of the documents read
    (at most `local_copies`, least recently used out) so a repeated read
    transfers only what changed."""

    def __init__(
        self,
        stub: context_pb2_grpc.SharedContextStub,
        timeout: float,
        local_copies: int = 256,
    ) -> None:
        self._stub, self._timeout = stub, timeout
        self._copies: OrderedDict[str, Document] = OrderedDict()
        self._max_copies = local_copies

    def _remember(self, doc: Document | None, id: str) -> None:
        if doc is None or self._max_copies == 0:
            self._copies.pop(id, None)
            return
        self._copies[id] = doc
        self._copies.move_to_end(id)
        while len(self._copies) > self._max_copies:
            self._copies.popitem(last=False)

    async def get(self, id: str) -> Document | None:
        """The document (None when absent or deleted). When this client has
        read it before, the sidecar sends only a compressed delta."""
        known = self._copies.get(id)
        request = pb.GetContextRequest(document_id=id, known_revision=known.revision if known else 0)
        try:
            r = await unary(self._stub.GetContext, request, self._timeout)
        except NotFoundError:
            self._remember(None, id)
            return None
        if r.deleted:
            self._remember(None, id)
            return None
        body = r.WhichOneof("body")
        if body == "delta_zstd" and known is not None:
            content = apply_delta(copy.deepcopy(known.content), r.delta_zstd)
        elif body == "content_json":
            content = json.loads(r.content_json)
        elif known is not None and r.revision == known.revision:
            content = copy.deepcopy(known.content)
        else:
            content = None
        return self._keep(id, _document(r, content))

    def _keep(self, id: str, doc: Document) -> Document:
        """Keeps `doc` as the local copy of `id`; the caller gets a copy of its own."""
        self._remember(doc, id)
        return dataclasses.replace(doc, content=copy.deepcopy(doc.content))

    async def get_many(self, ids: Sequence[str]) -> list[Document]:
        """Many documents in one call (at most 1,000 ids): those that exist,
        in the order asked; absent and deleted ones are left out."""
        r = await unary(self._stub.GetContexts, pb.GetContextsRequest(document_ids=list(ids)), self._timeout)
        found = []
        for d in r.documents:
            found.append(self._keep(d.document_id, _document(d, json.loads(d.content_json))))
        for missing in r.missing:
            self._remember(None, missing)
        return found

    async def put(
        self,
        id: str,
        content: Any,
        *,
        base: Vector | Document | None = None,
        merge: MergeType = MergeType.NONE,
        idempotency_key: str | None = None,
        fence: Fence | HeldLock | None = None,
    ) -> Written:
        """Creates (`base` empty) or replaces a document if nothing changed
        since `base` was read; sets an LWW register."""
        request = pb.PutContextRequest(
            document_id=id,
            merge_type=_merge_type(merge),
            base=_vector(base),
            content_json=_json(content),
            fence=fence_of(fence),
        )
        return _written(
            await unary(self._stub.PutContext, request, self._timeout, key_metadata(idempotency_key))
        )

    async def patch(
        self,
        id: str,
        operations: Sequence[Mapping[str, Any]],
        *,
        base: Vector | Document,
        idempotency_key: str | None = None,
        fence: Fence | HeldLock | None = None,
    ) -> Written:
        """Applies a JSON Patch (RFC 6902) to a plain document if nothing
        changed since `base`."""
        request = pb.PatchContextRequest(
            document_id=id, base=_vector(base), patch_json=_json(list(operations)), fence=fence_of(fence)
        )
        return _written(
            await unary(self._stub.PatchContext, request, self._timeout, key_metadata(idempotency_key))
        )

    async def merge(
        self,
        id: str,
        merge: MergeType,
        operations: Sequence[pb.CrdtOp],
        *,
        idempotency_key: str | None = None,
        fence: Fence | HeldLock | None = None,
    ) -> Written:
        """Applies CRDT operations (:class:`Crdt`); concurrent merges
        combine instead of conflicting."""
        if merge == MergeType.NONE:
            raise InvalidArgumentError("merge needs a CRDT merge type", field="merge")
        request = pb.MergeContextRequest(
            document_id=id, merge_type=_merge_type(merge), ops=list(operations), fence=fence_of(fence)
        )
        return _written(
            await unary(self._stub.MergeContext, request, self._timeout, key_metadata(idempotency_key))
        )

    async def delete(
        self,
        id: str,
        *,
        base: Vector | Document,
        idempotency_key: str | None = None,
        fence: Fence | HeldLock | None = None,
    ) -> Written:
        request = pb.DeleteContextRequest(document_id=id, base=_vector(base), fence=fence_of(fence))
        written = _written(
            await unary(self._stub.DeleteContext, request, self._timeout, key_metadata(idempotency_key))
        )
        self._remember(None, id)
        return written

    async def update(
        self,
        id: str,
        change: Callable[[Any], Any] | Callable[[Any], Awaitable[Any]],
        *,
        attempts: int = 10,
        fence: Fence | HeldLock | None = None,
    ) -> Written:
        """Read-modify-write of a plain document: reads it, calls
        ``change(content)`` (None when absent; it returns the new content, or
        None after changing it in place; it may be async), and writes against
        the vector read. When another writer got in first, does it all again,
        up to `attempts` times with a short jittered pause, then raises the
        last :class:`ConflictError`."""
        backoff = Backoff(first=0.005, most=0.2)
        last: ConflictError | None = None
        for _ in range(max(1, attempts)):
            doc = await self.get(id)
            content = copy.deepcopy(doc.content) if doc else None
            result = change(content)
            if asyncio.iscoroutine(result):
                result = await result
            new = content if result is None else result
            try:
                return await self.put(id, new, base=doc.vector if doc else None, fence=fence)
            except FencedError:
                raise
            except ConflictError as error:
                last = error
                await asyncio.sleep(backoff.next())
        raise last or ConflictError(f"context document {id}: no attempt made")

    async def watch(self, id: str, after_revision: int = 0) -> AsyncIterator[Change]:
        """The document's changes after `after_revision`, as they happen
        (first its current state when newer). Resumes after a disconnect
        from the last revision seen."""
        backoff = Backoff()
        while True:
            call = self._stub.WatchContext(
                pb.WatchContextRequest(document_id=id, after_revision=after_revision)
            )
            try:
                async for raw in call:
                    after_revision = raw.revision
                    backoff.reset()
                    yield Change(
                        raw.revision,
                        dict(raw.vector.counters),
                        raw.deleted,
                        json.loads(raw.content_json) if raw.content_json else None,
                    )
                return
            except grpc.aio.AioRpcError as error:
                if error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                    raise from_rpc_error(error) from None
                log.info("watch of %s ended (%s); resuming after revision %d", id, error.code().name, after_revision)
            finally:
                call.cancel()
            await asyncio.sleep(backoff.next())
