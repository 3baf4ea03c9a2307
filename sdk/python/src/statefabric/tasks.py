"""Sagas from an agent's side: start sagas, and take and answer the tasks the
saga engine dispatches to an agent type.

:meth:`Tasks.worker` is the loop most agents want::

    async def plan(task: Task) -> dict:
        return {"steps": [...]}

    async with client.tasks.worker("planner", plan, concurrency=4):
        await stop_requested.wait()

It streams the agent type's tasks, runs the handler for each (at most
`concurrency` at once), heartbeats while the handler runs so the lease does
not lapse, completes the task with what the handler returns or fails it
with what it raises, and sets the task key on the egress calls the handler
makes (:mod:`statefabric.egress`). It reconnects when the sidecar goes away.
Stopping lets running handlers finish (up to `drain_timeout`), then closes
the stream: the sidecar offers every task it handed out and this worker did
not answer to another worker at once, under the same key — as it does when
a worker dies. A task's key is its idempotency key: a handler must give a
repeat of the same key no second effect."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from . import egress
from ._backoff import Backoff
from ._rpc import unary
from .errors import AttemptOverError, InvalidArgumentError, StatefabricError, from_rpc_error
from .state.v1 import tasks_pb2 as pb
from .state.v1 import tasks_pb2_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Task:
    """One attempt of a saga step (or of its compensation)."""

    #: The idempotency key: saga/step/visit/attempt[/undo].
    key: str
    saga_id: str
    step: str
    visit: int
    attempt: int
    compensation: bool
    agent_type: str
    action: str
    input: Any
    #: Seconds to answer or heartbeat within.
    timeout: float
    #: The saga's W3C trace context ("" when none): the worker sends it with
    #: the task's heartbeats, answer and egress calls.
    traceparent: str = ""

    @staticmethod
    def from_pb(raw: pb.Task) -> Task:
        return Task(
            key=raw.key,
            saga_id=raw.saga_id,
            step=raw.step,
            visit=raw.visit,
            attempt=raw.attempt,
            compensation=raw.compensation,
            agent_type=raw.agent_type,
            action=raw.action,
            input=json.loads(raw.input_json) if raw.input_json else None,
            timeout=raw.timeout_ms / 1000,
            traceparent=raw.traceparent,
        )


def _traced(traceparent: str) -> tuple[tuple[str, str], ...] | None:
    """Call metadata putting the call in the saga's trace."""
    return (("traceparent", traceparent),) if traceparent else None


class TaskFailed(Exception):
    """Raise from a handler to fail the task with this reason (any other
    exception fails it too, with its type and message)."""


Handler = Callable[[Task], Awaitable[Any]] | Callable[[Task], Any]


class Tasks:
    """The ``Tasks`` service."""

    def __init__(self, stub: tasks_pb2_grpc.TasksStub, timeout: float) -> None:
        self._stub, self._timeout = stub, timeout

    async def start_saga(
        self,
        definition: str,
        data: dict[str, Any] | None = None,
        *,
        saga_id: str | None = None,
        traceparent: str = "",
    ) -> str:
        """Starts a saga of `definition` (its latest version) with `data` (a
        JSON object); returns its id. With `saga_id`, a repeat raises
        :class:`~statefabric.errors.AlreadyExistsError`. With `traceparent`
        (W3C), the saga's tasks carry that trace context."""
        if data is not None and not isinstance(data, dict):
            raise InvalidArgumentError("saga data must be a JSON object", field="data")
        request = pb.StartSagaRequest(
            definition=definition, saga_id=saga_id or "", data_json=json.dumps(data or {}).encode()
        )
        r: pb.StartSagaResponse = await unary(
            self._stub.StartSaga, request, self._timeout, _traced(traceparent)
        )
        return r.saga_id

    async def poll(self, agent_type: str, max: int = 1, wait: float = 0.0) -> list[Task]:
        """Up to `max` tasks, waiting up to `wait` seconds for the first."""
        request = pb.PollTasksRequest(agent_type=agent_type, max=max, wait_ms=round(wait * 1000))
        r = await unary(self._stub.PollTasks, request, self._timeout + wait)
        return [Task.from_pb(t) for t in r.tasks]

    async def heartbeat(self, key: str, *, traceparent: str = "") -> float:
        """Pushes the task's deadline a full timeout ahead; returns the
        seconds left. :class:`AttemptOverError` when the attempt is over."""
        r: pb.HeartbeatResponse = await unary(
            self._stub.Heartbeat, pb.HeartbeatRequest(key=key), self._timeout, _traced(traceparent)
        )
        return r.deadline_in_ms / 1000

    async def complete(self, key: str, output: Any = None, *, traceparent: str = "") -> None:
        """Answers with `output` (JSON); :class:`AttemptOverError` when the
        attempt is over. Repeating the same answer is accepted."""
        request = pb.CompleteTaskRequest(key=key, output_json=json.dumps(output).encode())
        await unary(self._stub.CompleteTask, request, self._timeout, _traced(traceparent))

    async def fail(self, key: str, error: str, *, traceparent: str = "") -> None:
        """Answers with a failure; the engine retries per the step's policy."""
        request = pb.FailTaskRequest(key=key, error=error)
        await unary(self._stub.FailTask, request, self._timeout, _traced(traceparent))

    def stream(self, agent_type: str, max_in_flight: int = 16, worker: str = "") -> Any:
        """The raw task stream (an async iterator of ``tasks_pb2.Task``);
        :meth:`worker` is what most agents want."""
        return self._stub.StreamTasks(
            pb.StreamTasksRequest(agent_type=agent_type, max_in_flight=max_in_flight, worker=worker)
        )

    def worker(
        self,
        agent_type: str,
        handler: Handler,
        *,
        concurrency: int = 4,
        name: str = "",
        drain_timeout: float = 30.0,
    ) -> Worker:
        """A worker running `handler` for every task of `agent_type`; see the
        module doc. Use it with ``async with``, or :meth:`Worker.run` and
        :meth:`Worker.stop`."""
        if not 1 <= concurrency <= 1000:
            raise InvalidArgumentError("concurrency is 1 to 1000", field="concurrency")
        return Worker(self, agent_type, handler, concurrency, name, drain_timeout)


class Worker:
    def __init__(
        self,
        tasks: Tasks,
        agent_type: str,
        handler: Handler,
        concurrency: int,
        name: str,
        drain_timeout: float,
    ) -> None:
        self._tasks, self.agent_type, self._handler = tasks, agent_type, handler
        self._concurrency, self._name, self._drain_timeout = concurrency, name, drain_timeout
        self._stopping = asyncio.Event()
        self._running: dict[str, asyncio.Task[None]] = {}
        self._main: asyncio.Task[None] | None = None
        #: Tasks answered by this worker (completed or failed).
        self.answered = 0

    def stop(self) -> None:
        """Stops taking tasks; :meth:`run` returns once running handlers are
        done (or cancelled after `drain_timeout`)."""
        self._stopping.set()

    async def run(self) -> None:
        """Works until :meth:`stop`. Raises only for what reconnecting cannot
        fix (an invalid agent type, a refused tenant)."""
        backoff = Backoff(first=0.1, most=5.0)
        stop = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                call = self._tasks.stream(self.agent_type, self._concurrency, self._name)
                try:
                    await self._consume(call, stop, backoff)
                except grpc.aio.AioRpcError as error:
                    typed = from_rpc_error(error)
                    if not typed.transient and error.code() not in (
                        grpc.StatusCode.INTERNAL,
                        grpc.StatusCode.UNKNOWN,
                        grpc.StatusCode.CANCELLED,
                    ):
                        raise typed from None
                    log.info("task stream for %s ended (%s); reconnecting", self.agent_type, typed.message)
                    call.cancel()
                    await asyncio.sleep(backoff.next())
                    continue
                # Stopping: handlers finish while the stream stays open, so
                # the sidecar does not offer their tasks to others meanwhile.
                await self._drain()
                call.cancel()
        finally:
            stop.cancel()
            for task in self._running.values():
                task.cancel()

    async def _consume(self, call: Any, stop: asyncio.Future[Any], backoff: Backoff) -> None:
        messages = call.__aiter__()
        while True:
            next_message = asyncio.ensure_future(messages.__anext__())
            done, _ = await asyncio.wait({next_message, stop}, return_when=asyncio.FIRST_COMPLETED)
            if next_message not in done:
                next_message.cancel()
                return
            try:
                raw = next_message.result()
            except StopAsyncIteration:
                raise grpc.aio.AioRpcError(
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.aio.Metadata(),
                    grpc.aio.Metadata(),
                    "the task stream ended",
                ) from None
            backoff.reset()
            task = Task.from_pb(raw)
            if task.key in self._running:
                # Handed out again after a reconnect while still running here.
                continue
            self._running[task.key] = asyncio.create_task(self._run_one(task), name=task.key)

    async def _drain(self) -> None:
        running = list(self._running.values())
        if not running:
            return
        _, pending = await asyncio.wait(running, timeout=self._drain_timeout)
        for task in pending:
            task.cancel()
        if pending:
            log.warning(
                "%d %s task(s) still running after %.0f s: cancelled, offered to other workers",
                len(pending),
                self.agent_type,
                self._drain_timeout,
            )
            await asyncio.wait(pending)

    async def _call_handler(self, task: Task) -> Any:
        with egress.task_scope(task.key, task.traceparent):
            if inspect.iscoroutinefunction(self._handler):
                return await self._handler(task)
            result = await asyncio.to_thread(self._handler, task)
            if inspect.isawaitable(result):
                result = await result
            return result

    async def _run_one(self, task: Task) -> None:
        work = asyncio.create_task(self._call_handler(task))
        try:
            every = max(0.05, task.timeout / 3)
            while True:
                done, _ = await asyncio.wait({work}, timeout=every)
                if done:
                    break
                try:
                    await self._tasks.heartbeat(task.key, traceparent=task.traceparent)
                except AttemptOverError:
                    log.info("task %s is over (timed out or cancelled); stopping its handler", task.key)
                    work.cancel()
                    return
                except StatefabricError as error:
                    log.warning("heartbeat for %s failed: %s", task.key, error.message)
            await self._answer(task, work)
        except asyncio.CancelledError:
            if not work.done():
                work.cancel()
            raise
        finally:
            self._running.pop(task.key, None)

    async def _answer(self, task: Task, work: asyncio.Task[Any]) -> None:
        try:
            output = work.result()
            json.dumps(output)
        except (TaskFailed, Exception) as error:
            reason = str(error) if isinstance(error, TaskFailed) else f"{type(error).__name__}: {error}"
            answer = self._tasks.fail(
                task.key, reason or type(error).__name__, traceparent=task.traceparent
            )
        else:
            answer = self._tasks.complete(task.key, output, traceparent=task.traceparent)
        try:
            await answer
            self.answered += 1
        except AttemptOverError:
            log.info("task %s was answered elsewhere or is over; this answer changes nothing", task.key)
        except StatefabricError as error:
            log.warning("could not answer task %s: %s", task.key, error.message)

    async def __aenter__(self) -> Worker:
        self._main = asyncio.create_task(self.run(), name=f"statefabric-worker-{self.agent_type}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.stop()
        if self._main is not None:
            await self._main
