"""Event streams: append with an expected version (and an idempotency key or
a lock's fence), read back, and follow the tenant's feed.

A subscription resumes by itself: when the connection drops (the sidecar
restarted) or the sidecar cuts a slow consumer off (RESOURCE_EXHAUSTED), it
subscribes again after the checkpoint of the last event it handed out, so
the caller sees every event once, in commit order, without gaps."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import grpc

from ._backoff import Backoff
from ._rpc import key_metadata, unary
from .errors import InvalidArgumentError, StatefabricError, from_rpc_error
from .locks import Fence, fence_of
from .state.v1 import events_pb2 as pb
from .state.v1 import events_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    """A place in the commit-ordered feed; opaque, pass back what an
    :class:`Event` carried."""

    commit: int
    position: int


@dataclass(frozen=True)
class Expected:
    """What the writer believes about the stream before appending."""

    ANY: ClassVar[Expected]
    NO_STREAM: ClassVar[Expected]
    STREAM_EXISTS: ClassVar[Expected]

    kind: str
    version: int = 0

    def to_pb(self) -> pb.ExpectedVersion:
        if self.kind == "exact":
            return pb.ExpectedVersion(exact=self.version)
        if self.kind == "no_stream":
            return pb.ExpectedVersion(no_stream=pb.Empty())
        if self.kind == "stream_exists":
            return pb.ExpectedVersion(stream_exists=pb.Empty())
        return pb.ExpectedVersion(any=pb.Empty())

    @staticmethod
    def exact(version: int) -> Expected:
        """The stream's last event must have exactly this version (1 or more)."""
        if version < 1:
            raise InvalidArgumentError("an exact expected version is 1 or more", field="expected")
        return Expected("exact", version)


Expected.ANY = Expected("any")
Expected.NO_STREAM = Expected("no_stream")
Expected.STREAM_EXISTS = Expected("stream_exists")


@dataclass(frozen=True)
class NewEvent:
    """An event to append; `data` is anything JSON-serialisable."""

    type: str
    data: Any
    id: str = ""
    schema_version: int = 1
    correlation_id: str = ""
    causation_id: str = ""
    traceparent: str = ""
    extra: dict[str, Any] | None = None

    def to_pb(self) -> pb.NewEvent:
        return pb.NewEvent(
            id=self.id,
            event_type=self.type,
            schema_version=self.schema_version,
            data_json=json.dumps(self.data).encode(),
            metadata=pb.EventMetadata(
                correlation_id=self.correlation_id,
                causation_id=self.causation_id,
                traceparent=self.traceparent,
                extra_json=json.dumps(self.extra).encode() if self.extra else b"",
            ),
        )


@dataclass(frozen=True)
class Event:
    """An event as stored."""

    id: str
    stream_id: str
    stream_type: str
    type: str
    schema_version: int
    data: Any
    stream_version: int
    global_position: int
    checkpoint: Checkpoint
    created_at: str
    correlation_id: str = ""
    causation_id: str = ""
    traceparent: str = ""
    vector_clock: dict[str, int] = field(default_factory=dict)
    extra: dict[str, Any] | None = None

    @staticmethod
    def from_pb(raw: pb.RecordedEvent) -> Event:
        meta = raw.metadata
        return Event(
            id=raw.id,
            stream_id=raw.stream_id,
            stream_type=raw.stream_type,
            type=raw.event_type,
            schema_version=raw.schema_version,
            data=json.loads(raw.data_json) if raw.data_json else None,
            stream_version=raw.stream_version,
            global_position=raw.global_position,
            checkpoint=Checkpoint(raw.checkpoint.commit, raw.checkpoint.position),
            created_at=raw.created_at,
            correlation_id=meta.correlation_id,
            causation_id=meta.causation_id,
            traceparent=meta.traceparent,
            vector_clock=dict(meta.vector_clock),
            extra=json.loads(meta.extra_json) if meta.extra_json else None,
        )


@dataclass(frozen=True)
class Appended:
    first_version: int
    last_version: int
    first_position: int
    last_position: int
    #: True when an idempotency key matched: nothing new was written.
    replayed: bool


# Statuses after which a subscription subscribes again: the sidecar went
# away or restarted, or cut this consumer off for falling behind.
_RESUMABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.CANCELLED,
}


class Subscription:
    """An async iterator over a feed's events that resumes after
    disconnects. :attr:`checkpoint` is the last event handed out (persist it
    to resume across restarts of the agent); :attr:`resumes` counts how
    often it subscribed again."""

    def __init__(
        self,
        stub: events_pb2_grpc.EventsStub,
        after: Checkpoint | None,
        stream_id: str | None,
        max_backoff: float,
    ) -> None:
        self._stub, self._stream_id = stub, stream_id
        self.checkpoint = after
        self.resumes = 0
        self._backoff = Backoff(most=max_backoff)
        self._call: Any = None

    def _open(self) -> Any:
        after = (
            pb.Checkpoint(commit=self.checkpoint.commit, position=self.checkpoint.position)
            if self.checkpoint
            else None
        )
        if self._stream_id is None:
            return self._stub.SubscribeAll(pb.SubscribeAllRequest(after=after))
        return self._stub.SubscribeStream(
            pb.SubscribeStreamRequest(stream_id=self._stream_id, after=after)
        )

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._events()

    async def _events(self) -> AsyncIterator[Event]:
        while True:
            self._call = self._open()
            try:
                async for raw in self._call:
                    event = Event.from_pb(raw)
                    self.checkpoint = event.checkpoint
                    self._backoff.reset()
                    yield event
                return
            except grpc.aio.AioRpcError as error:
                if error.code() not in _RESUMABLE:
                    raise from_rpc_error(error) from None
                log.info(
                    "subscription ended (%s: %s); resuming after %s",
                    error.code().name,
                    error.details(),
                    self.checkpoint,
                )
            finally:
                self._call.cancel()
            self.resumes += 1
            await asyncio.sleep(self._backoff.next())

    def close(self) -> None:
        if self._call is not None:
            self._call.cancel()


class Events:
    """The ``Events`` service."""

    def __init__(self, stub: events_pb2_grpc.EventsStub, timeout: float) -> None:
        self._stub, self._timeout = stub, timeout

    async def append(
        self,
        stream_id: str,
        stream_type: str,
        events: Sequence[NewEvent],
        *,
        expected: Expected = Expected.ANY,
        idempotency_key: str | None = None,
        fence: Fence | Any | None = None,
        timeout: float | None = None,
    ) -> Appended:
        """Appends `events` to one stream atomically if `expected` holds
        (else :class:`~statefabric.errors.ConflictError`). With
        `idempotency_key`, at most once: a repeat returns the first result
        with ``replayed`` set. With `fence` (a held lock, or a
        :class:`Fence`), refused once a newer holder of the lock wrote."""
        if not events:
            raise InvalidArgumentError("append at least one event", field="events")
        request = pb.AppendEventsRequest(
            stream_id=stream_id,
            stream_type=stream_type,
            expected=expected.to_pb(),
            events=[e.to_pb() for e in events],
            fence=fence_of(fence),
        )
        r = await unary(
            self._stub.AppendEvents,
            request,
            timeout or self._timeout,
            key_metadata(idempotency_key),
        )
        return Appended(
            r.first_version, r.last_version, r.first_position, r.last_position, r.replayed
        )

    async def read_stream(
        self, stream_id: str, from_version: int = 1, limit: int = 100, *, timeout: float | None = None
    ) -> list[Event]:
        r = await unary(
            self._stub.ReadStream,
            pb.ReadStreamRequest(stream_id=stream_id, from_version=from_version, limit=limit),
            timeout or self._timeout,
        )
        return [Event.from_pb(e) for e in r.events]

    async def read_all(
        self, from_position: int = 1, limit: int = 100, *, timeout: float | None = None
    ) -> list[Event]:
        r = await unary(
            self._stub.ReadAll,
            pb.ReadAllRequest(from_position=from_position, limit=limit),
            timeout or self._timeout,
        )
        return [Event.from_pb(e) for e in r.events]

    def subscribe(
        self,
        after: Checkpoint | None = None,
        *,
        stream_id: str | None = None,
        max_backoff: float = 2.0,
    ) -> Subscription:
        """The tenant's events (or one stream's) after `after` (from the
        beginning when None), live, resuming by itself. Iterate it with
        ``async for``."""
        return Subscription(self._stub, after, stream_id, max_backoff)


__all__ = [
    "Appended",
    "Checkpoint",
    "Event",
    "Events",
    "Expected",
    "NewEvent",
    "StatefabricError",
    "Subscription",
]
