"""A thin synchronous facade over the async client, for scripts and
frameworks without an event loop: the async client runs on a private loop in
a background thread, and each call here waits for its result.

    with statefabric.sync.Client() as client:
        client.events.append("task-1", "task", [NewEvent("Created", {})])
        with client.locks.hold("repo", ttl=10) as lock:
            client.context.put("plan", {"steps": []}, fence=lock.fence)

Everything the async client does is here with the same names and
arguments; iterators (subscriptions, watches) become plain iterators. A
lost lock cannot interrupt synchronous code: check ``lock.lost`` between
steps; leaving the block raises LockLostError when it was lost, and fenced
writes are refused either way. Workers need the async client."""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from types import TracebackType
from typing import Any, TypeVar

from . import client as aio
from .errors import LockLostError, LockNotAcquiredError
from .locks import Fence, HeldLock

T = TypeVar("T")


class _Loop:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="statefabric-sync", daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def iterate(self, iterator: AsyncIterator[T]) -> Iterator[T]:
        async def step() -> tuple[bool, T | None]:
            try:
                return True, await iterator.__anext__()
            except StopAsyncIteration:
                return False, None

        while True:
            more, item = self.run(step())
            if not more:
                return
            yield item  # type: ignore[misc]

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


class SyncHeldLock:
    """A held lock, renewed in the background; see the module doc."""

    def __init__(self, loop: _Loop, held: HeldLock) -> None:
        self._loop, self._held = loop, held

    @property
    def name(self) -> str:
        return self._held.name

    @property
    def token(self) -> int:
        return self._held.token

    @property
    def fence(self) -> Fence:
        return self._held.fence

    @property
    def lost(self) -> bool:
        return self._held.lost

    def release(self) -> None:
        self._loop.run(self._held.release())

    def __enter__(self) -> SyncHeldLock:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
        if self.lost and exc_type is None:
            raise LockLostError(f"lock {self.name} (token {self.token}) was lost while held")


class _Service:
    """Runs a service's coroutine methods on the loop; async iterators become
    iterators."""

    def __init__(self, loop: _Loop, service: Any) -> None:
        self._loop, self._service = loop, service

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._service, name)
        if not callable(attr):
            return attr
        if inspect.iscoroutinefunction(attr):

            @functools.wraps(attr)
            def call(*args: Any, **kwargs: Any) -> Any:
                return self._wrap(self._loop.run(attr(*args, **kwargs)))

            return call

        @functools.wraps(attr)
        def plain(*args: Any, **kwargs: Any) -> Any:
            result = attr(*args, **kwargs)
            if hasattr(result, "__anext__") or inspect.isasyncgen(result):
                return self._loop.iterate(result)
            if hasattr(result, "__aiter__"):
                return self._loop.iterate(result.__aiter__())
            return result

        return plain

    def _wrap(self, result: Any) -> Any:
        return SyncHeldLock(self._loop, result) if isinstance(result, HeldLock) else result


class _Locks(_Service):
    def hold(self, name: str, ttl: float = 10.0, wait: float = 0.0) -> SyncHeldLock:
        held = self._loop.run(self._service.acquire(name, ttl, wait))
        if held is None:
            raise LockNotAcquiredError(f"lock {name} stayed taken for {wait} s")
        return SyncHeldLock(self._loop, held)


class Client:
    """The synchronous client: :attr:`events`, :attr:`context`,
    :attr:`locks`, :attr:`sessions`, :attr:`tasks` (without workers)."""

    def __init__(self, address: str | None = None, *, timeout: float = 10.0) -> None:
        self._loop = _Loop()

        async def make() -> aio.Client:
            return aio.Client(address, timeout=timeout)

        self._client = self._loop.run(make())
        self.events = _Service(self._loop, self._client.events)
        self.context = _Service(self._loop, self._client.context)
        self.locks = _Locks(self._loop, self._client.locks)
        self.sessions = _Service(self._loop, self._client.sessions)
        self.tasks = _Service(self._loop, self._client.tasks)

    def close(self) -> None:
        self._loop.run(self._client.close())
        self._loop.stop()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = ["Client", "SyncHeldLock"]
