"""Locks with leases and fencing tokens, renewed in the background.

``async with client.locks.hold("repo", ttl=10) as lock:`` takes the lock
(waiting up to `wait`), renews it every third of its lease while the block
runs, and releases it at the end. If the lock is lost — a renewal refused
because someone else holds it now, or the lease running out before a
renewal got through (the process was paused, the sidecar unreachable) —
the block is cancelled at once and :class:`~statefabric.errors.LockLostError`
is raised out of it. Writes guarded by the lock pass ``fence=lock``: once a
newer holder has written, they are refused with
:class:`~statefabric.errors.FencedError`, even if the old holder did not
notice its loss in time. A lease alone cannot give that guarantee."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc

from ._rpc import unary
from .errors import LockLostError, LockNotAcquiredError, StatefabricError
from .state.v1 import events_pb2, locks_pb2_grpc
from .state.v1 import locks_pb2 as pb

log = logging.getLogger(__name__)

_MS_MAX = 2**32 - 1


def _ms(seconds: float) -> int:
    return max(0, min(_MS_MAX, round(seconds * 1000)))


@dataclass(frozen=True)
class Fence:
    """A lock's name and the token of one grant of it."""

    lock: str
    token: int


def fence_of(guard: Fence | HeldLock | Any | None) -> events_pb2.Fence | None:
    """The wire form of a write's guard (a :class:`Fence` or a held lock)."""
    if guard is None:
        return None
    if isinstance(guard, HeldLock):
        guard = guard.fence
    if not isinstance(guard, Fence):
        raise TypeError(f"fence must be a Fence or a HeldLock, not {type(guard).__name__}")
    return events_pb2.Fence(lock=guard.lock, token=guard.token)


@dataclass(frozen=True)
class LockHolder:
    owner: str
    token: int
    expires_in: float


class HeldLock:
    """A lock this process holds. Use it as an async context manager (see
    the module doc) or call :meth:`release` yourself."""

    def __init__(self, stub: locks_pb2_grpc.LocksStub, lease: pb.Lease, ttl: float, timeout: float):
        self._stub, self._ttl, self._timeout = stub, ttl, timeout
        self.name: str = lease.name
        self.token: int = lease.token
        self._lost = asyncio.Event()
        self._released = False
        self._guarded: asyncio.Task[Any] | None = None
        self._cancelled_guarded = False
        self._renewer = asyncio.get_running_loop().create_task(self._renew(time.monotonic()))

    @property
    def fence(self) -> Fence:
        """The fencing token to pass with guarded writes (``fence=lock``)."""
        return Fence(self.name, self.token)

    @property
    def lost(self) -> bool:
        return self._lost.is_set()

    async def wait_lost(self) -> None:
        """Returns when the lock is lost (never, while it is held)."""
        await self._lost.wait()

    async def _renew(self, granted_at: float) -> None:
        expires = granted_at + self._ttl
        try:
            while True:
                await asyncio.sleep(self._ttl / 3)
                if time.monotonic() >= expires:
                    # Paused past the lease: someone else may hold it now.
                    break
                sent = time.monotonic()
                request = pb.RenewRequest(name=self.name, token=self.token, ttl_ms=_ms(self._ttl))
                try:
                    await unary(self._stub.Renew, request, max(0.05, expires - sent))
                    expires = sent + self._ttl
                except StatefabricError as error:
                    if error.code == grpc.StatusCode.FAILED_PRECONDITION:
                        break
                    # Transient: keep trying while the lease may still be ours.
                    log.warning("renewing lock %s failed: %s", self.name, error.message)
        except asyncio.CancelledError:
            return
        self._on_lost()

    def _on_lost(self) -> None:
        log.warning("lock %s (token %d) is lost", self.name, self.token)
        self._lost.set()
        if self._guarded is not None and not self._guarded.done():
            self._cancelled_guarded = True
            self._guarded.cancel()

    async def release(self) -> None:
        """Stops renewing and lets go. Releasing a lost lock does nothing."""
        if self._released:
            return
        self._released = True
        self._renewer.cancel()
        if self.lost:
            return
        try:
            await unary(
                self._stub.Release, pb.ReleaseRequest(name=self.name, token=self.token), self._timeout
            )
        except StatefabricError as error:
            if error.code != grpc.StatusCode.FAILED_PRECONDITION:
                raise

    async def __aenter__(self) -> HeldLock:
        self._guarded = asyncio.current_task()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        guarded, self._guarded = self._guarded, None
        await self.release()
        if self._cancelled_guarded:
            if guarded is not None:
                guarded.uncancel()
            raise LockLostError(
                f"lock {self.name} (token {self.token}) was lost while held; the guarded work was cancelled"
            ) from exc
        if self.lost and exc_type is None:
            raise LockLostError(f"lock {self.name} (token {self.token}) was lost while held")


class Locks:
    """The ``Locks`` service."""

    def __init__(self, stub: locks_pb2_grpc.LocksStub, timeout: float) -> None:
        self._stub, self._timeout = stub, timeout

    async def acquire(self, name: str, ttl: float = 10.0, wait: float = 0.0) -> HeldLock | None:
        """Takes `name` for `ttl` seconds, waiting up to `wait`; None if it
        stayed taken. The lock renews itself until released."""
        request = pb.AcquireRequest(name=name, ttl_ms=_ms(ttl), wait_ms=_ms(wait))
        r = await unary(self._stub.Acquire, request, self._timeout + wait)
        if not r.acquired:
            return None
        return HeldLock(self._stub, r.lease, ttl, self._timeout)

    def hold(self, name: str, ttl: float = 10.0, wait: float = 0.0) -> Holding:
        """``async with locks.hold(name, ttl, wait) as lock:`` — see the
        module doc. Raises :class:`LockNotAcquiredError` when the lock stayed
        taken for `wait` seconds."""
        return Holding(self, name, ttl, wait)

    async def inspect(self, name: str) -> LockHolder | None:
        r = await unary(self._stub.Inspect, pb.InspectRequest(name=name), self._timeout)
        return LockHolder(r.owner, r.token, r.expires_in_ms / 1000) if r.held else None


class Holding:
    """What :meth:`Locks.hold` returns: takes the lock on entry."""

    def __init__(self, locks: Locks, name: str, ttl: float, wait: float) -> None:
        self._locks, self._name, self._ttl, self._wait = locks, name, ttl, wait
        self._held: HeldLock | None = None

    async def __aenter__(self) -> HeldLock:
        held = await self._locks.acquire(self._name, self._ttl, self._wait)
        if held is None:
            raise LockNotAcquiredError(f"lock {self._name} stayed taken for {self._wait} s")
        self._held = held
        return await held.__aenter__()

    async def __aexit__(self, *exc_info: Any) -> None:
        if self._held is not None:
            await self._held.__aexit__(*exc_info)
