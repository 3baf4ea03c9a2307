"""Typed errors: every gRPC status the sidecar returns becomes one of these,
in one place (:func:`from_rpc_error`), so callers act on a type instead of
parsing messages.

The sidecar's messages say what was wrong and name the offending field or
value; they are kept whole in :attr:`StatefabricError.message`."""

from __future__ import annotations

import json
import re
from typing import Any

import grpc


class StatefabricError(Exception):
    """Base of every error this SDK raises."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code

    @property
    def transient(self) -> bool:
        """Whether the same call later may succeed."""
        return False


class ConflictError(StatefabricError):
    """The write's expectation was stale (FAILED_PRECONDITION): a stream's
    expected version, or a context document's version vector. Nothing was
    written. :attr:`current_vector` / :attr:`actual_version` carry what the
    store holds now, when the message names it."""

    @property
    def current_vector(self) -> dict[str, int] | None:
        match = re.search(r"version vector is now (\{.*\})", self.message)
        if match is None:
            return None
        try:
            parsed: Any = json.loads(match.group(1))
        except ValueError:
            return None
        return {str(k): int(v) for k, v in parsed.items()} if isinstance(parsed, dict) else None

    @property
    def actual_version(self) -> int | None:
        """The stream's version now (None if the message says it is absent)."""
        match = re.search(r"but the stream is at version (\d+)", self.message)
        return int(match.group(1)) if match else None


class FencedError(ConflictError):
    """The write carried a lock's fencing token older than one already used:
    someone else holds (or held) the lock since. Nothing was written."""


class LockLostError(StatefabricError):
    """A held lock was lost (its renewal was refused, or the lease ran out
    before a renewal got through). Work guarded by it must stop."""


class LockNotAcquiredError(StatefabricError):
    """The lock stayed taken for the whole wait."""


class AttemptOverError(ConflictError):
    """The task attempt is over (answered, timed out or cancelled): stop
    working on it; an answer would change nothing."""


class InvalidArgumentError(StatefabricError):
    """The request was refused as invalid (INVALID_ARGUMENT); the message
    names the field. :attr:`field` is set when this SDK refused it itself."""

    def __init__(
        self, message: str, code: grpc.StatusCode | None = None, field: str | None = None
    ) -> None:
        super().__init__(message, code)
        self.field = field


class AlreadyExistsError(InvalidArgumentError):
    """ALREADY_EXISTS: e.g. a saga id in use."""


class IdempotencyKeyReusedError(InvalidArgumentError):
    """The idempotency key was already used for a different request."""


class NotFoundError(StatefabricError):
    """NOT_FOUND: no such stream, document, session, definition or task."""


class TooLargeError(StatefabricError):
    """RESOURCE_EXHAUSTED: over a size or count limit."""


class OutOfRangeError(StatefabricError):
    """OUT_OF_RANGE: a counter increment that would leave the signed 64-bit
    range; nothing was written."""


class PermissionDeniedError(StatefabricError):
    """PERMISSION_DENIED / UNAUTHENTICATED (e.g. the tenant is not registered)."""


class UnavailableError(StatefabricError):
    """Transient: UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED (a duplicate still
    in progress). Retrying later may succeed."""

    @property
    def transient(self) -> bool:
        return True


_BY_CODE: dict[grpc.StatusCode, type[StatefabricError]] = {
    grpc.StatusCode.FAILED_PRECONDITION: ConflictError,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgumentError,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExistsError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: TooLargeError,
    grpc.StatusCode.OUT_OF_RANGE: OutOfRangeError,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDeniedError,
    grpc.StatusCode.UNAUTHENTICATED: PermissionDeniedError,
    grpc.StatusCode.UNAVAILABLE: UnavailableError,
    grpc.StatusCode.DEADLINE_EXCEEDED: UnavailableError,
    grpc.StatusCode.ABORTED: UnavailableError,
}


def from_rpc_error(error: grpc.aio.AioRpcError) -> StatefabricError:
    """The typed error for a failed call."""
    code = error.code()
    message = error.details() or code.name
    kind = _BY_CODE.get(code, StatefabricError)
    if kind is ConflictError:
        if "fencing token" in message:
            kind = FencedError
        elif "no longer current" in message:
            kind = AttemptOverError
    elif kind is InvalidArgumentError and "idempotency key" in message and "already used" in message:
        kind = IdempotencyKeyReusedError
    return kind(message, code)
