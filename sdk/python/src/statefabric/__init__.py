"""The Python client for a Statefabric sidecar.

An agent talks to the sidecar in its pod over localhost gRPC::

    import statefabric
    from statefabric import Expected, NewEvent

    async with statefabric.Client() as client:   # STATEFABRIC_ADDRESS
        await client.events.append("task-42", "task", [NewEvent("Created", {"title": "fix"})],
                                   expected=Expected.NO_STREAM)
        await client.context.update("plan", lambda doc: {**(doc or {}), "steps": 3})
        async with client.locks.hold("repo", ttl=10) as lock:
            await client.context.put("files", {...}, fence=lock)

- :mod:`statefabric.events` — append with expected version, idempotency key
  or fence; read; subscriptions that resume by themselves.
- :mod:`statefabric.context` — documents with version vectors, deltas,
  CRDTs, ``update`` retried on conflict, watches.
- :mod:`statefabric.locks` — locks renewed in the background, fencing
  tokens, work cancelled when the lock is lost.
- :mod:`statefabric.sessions` — values with absolute or sliding TTLs.
- :mod:`statefabric.tasks` — start sagas; workers with heartbeats.
- :mod:`statefabric.egress` — outbound calls through the sidecar, keyed for
  replay.
- :mod:`statefabric.errors` — typed errors; :mod:`statefabric.sync` — a
  synchronous facade.
"""

from . import egress, errors, sync
from .client import Client
from .context import Change, Crdt, Document, MergeType, Written
from .errors import (
    AlreadyExistsError,
    AttemptOverError,
    ConflictError,
    FencedError,
    IdempotencyKeyReusedError,
    InvalidArgumentError,
    LockLostError,
    LockNotAcquiredError,
    NotFoundError,
    OutOfRangeError,
    PermissionDeniedError,
    StatefabricError,
    TooLargeError,
    UnavailableError,
)
from .events import Appended, Checkpoint, Event, Expected, NewEvent, Subscription
from .locks import Fence, HeldLock, LockHolder
from .sessions import Session
from .tasks import Task, TaskFailed, Worker

__all__ = [
    "AlreadyExistsError",
    "Appended",
    "AttemptOverError",
    "Change",
    "Checkpoint",
    "Client",
    "ConflictError",
    "Crdt",
    "Document",
    "Event",
    "Expected",
    "Fence",
    "FencedError",
    "HeldLock",
    "IdempotencyKeyReusedError",
    "InvalidArgumentError",
    "LockHolder",
    "LockLostError",
    "LockNotAcquiredError",
    "MergeType",
    "NewEvent",
    "NotFoundError",
    "OutOfRangeError",
    "PermissionDeniedError",
    "Session",
    "StatefabricError",
    "Subscription",
    "Task",
    "TaskFailed",
    "TooLargeError",
    "UnavailableError",
    "Worker",
    "Written",
    "egress",
    "errors",
    "sync",
]
