"""A connection to the sidecar in the agent's pod.

The address comes from the argument, else ``STATEFABRIC_ADDRESS`` (which the
injector sets in every app container), else ``127.0.0.1:7400``. Every call
has a deadline: the client's ``timeout`` unless the call says otherwise
(long polls add their wait to it)."""

from __future__ import annotations

import os

import grpc

from .context import Context
from .events import Events
from .locks import Locks
from .sessions import Sessions
from .state.v1 import (
    context_pb2_grpc,
    events_pb2_grpc,
    locks_pb2_grpc,
    sessions_pb2_grpc,
    tasks_pb2_grpc,
)
from .tasks import Tasks

DEFAULT_ADDRESS = "127.0.0.1:7400"
ADDRESS_ENV = "STATEFABRIC_ADDRESS"
# Documents and event batches can be large; the sidecar bounds them itself.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def target(address: str | None = None) -> str:
    """The gRPC target for `address` (``http://host:port`` or ``host:port``)."""
    address = address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS
    if address.startswith("https://"):
        raise ValueError(
            f"{address}: the sidecar listens in plaintext on the pod's loopback; use http://"
        )
    return address.removeprefix("http://").rstrip("/")


class Client:
    """The sidecar's APIs over one channel: :attr:`events`, :attr:`context`,
    :attr:`locks`, :attr:`sessions`, :attr:`tasks`.

    Create it inside a running event loop and close it (or use
    ``async with``) when done."""

    def __init__(self, address: str | None = None, *, timeout: float = 10.0) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.address = target(address)
        self.timeout = timeout
        self._channel = grpc.aio.insecure_channel(
            self.address,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # Reconnect quickly after the sidecar restarts.
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000),
            ],
        )
        self.events = Events(events_pb2_grpc.EventsStub(self._channel), timeout)
        self.context = Context(context_pb2_grpc.SharedContextStub(self._channel), timeout)
        self.locks = Locks(locks_pb2_grpc.LocksStub(self._channel), timeout)
        self.sessions = Sessions(sessions_pb2_grpc.SessionsStub(self._channel), timeout)
        self.tasks = Tasks(tasks_pb2_grpc.TasksStub(self._channel), timeout)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
