"""The one place calls go out: a deadline on every call, the idempotency-key
header, and failures turned into typed errors."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import grpc

from .errors import InvalidArgumentError, from_rpc_error

Response = TypeVar("Response")

IDEMPOTENCY_KEY_HEADER = "idempotency-key"


def key_metadata(idempotency_key: str | None) -> Sequence[tuple[str, str]] | None:
    """Request metadata carrying `idempotency_key`, checked first: gRPC
    metadata values must be printable ASCII."""
    if idempotency_key is None:
        return None
    if not idempotency_key or not all(" " <= c <= "~" for c in idempotency_key):
        raise InvalidArgumentError(
            "idempotency_key must be non-empty printable ASCII", field="idempotency_key"
        )
    return ((IDEMPOTENCY_KEY_HEADER, idempotency_key),)


async def unary(
    method: Callable[..., Awaitable[Response]],
    request: Any,
    timeout: float,
    metadata: Sequence[tuple[str, str]] | None = None,
) -> Response:
    """Calls `method` within `timeout` seconds; a refusal raises its typed
    error."""
    try:
        return await method(request, timeout=timeout, metadata=metadata)
    except grpc.aio.AioRpcError as error:
        raise from_rpc_error(error) from None
