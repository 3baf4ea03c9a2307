"""Session state: small values per conversation or task that expire by their
namespace's absolute or sliding TTL (declared in the sidecar's config)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ._rpc import unary
from .errors import NotFoundError
from .state.v1 import sessions_pb2 as pb
from .state.v1 import sessions_pb2_grpc


@dataclass(frozen=True)
class Session:
    value: bytes
    #: Seconds until it expires.
    expires_in: float


class Sessions:
    """The ``Sessions`` service."""

    def __init__(self, stub: sessions_pb2_grpc.SessionsStub, timeout: float) -> None:
        self._stub, self._timeout = stub, timeout

    async def put(
        self, namespace: str, id: str, value: bytes | str, ttl: float | None = None
    ) -> float:
        """Writes the session; returns the seconds until it expires."""
        request = pb.PutSessionRequest(
            namespace=namespace,
            id=id,
            value=value.encode() if isinstance(value, str) else value,
        )
        if ttl is not None:
            request.ttl_ms = round(ttl * 1000)
        r: pb.PutSessionResponse = await unary(self._stub.PutSession, request, self._timeout)
        return r.expires_in_ms / 1000

    async def get(self, namespace: str, id: str) -> Session | None:
        """The session, or None when absent or expired (extends a sliding one)."""
        try:
            r: pb.GetSessionResponse = await unary(
                self._stub.GetSession, pb.GetSessionRequest(namespace=namespace, id=id), self._timeout
            )
        except NotFoundError:
            return None
        return Session(r.value, r.expires_in_ms / 1000)

    async def get_many(self, namespace: str, ids: Sequence[str]) -> dict[str, Session]:
        """Many sessions of one namespace in one call (at most 1,000 ids): the
        live ones by id, in the order asked; absent and expired ones are left
        out. Sliding ones are extended by the read."""
        r: pb.GetSessionsResponse = await unary(
            self._stub.GetSessions,
            pb.GetSessionsRequest(namespace=namespace, ids=list(ids)),
            self._timeout,
        )
        return {s.id: Session(s.value, s.expires_in_ms / 1000) for s in r.sessions}

    async def delete(self, namespace: str, id: str) -> bool:
        """False when there was nothing (left) to delete."""
        r: pb.DeleteSessionResponse = await unary(
            self._stub.DeleteSession,
            pb.DeleteSessionRequest(namespace=namespace, id=id),
            self._timeout,
        )
        return r.existed
