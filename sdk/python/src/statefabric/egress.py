"""The agent's outbound calls through its sidecar's egress listener.

The sidecar routes ``<STATEFABRIC_EGRESS_ADDRESS>/<upstream>/<path>`` to the
Upstream of that name, adding its credentials (the agent holds none), with
timeouts, retries and circuit breaking — and replay: a call carrying a saga
task key is recorded, and the same call under the same key (the task handed
to another worker after this one crashed) is answered from the record
without reaching the upstream.

While a :class:`~statefabric.tasks.Worker` handler runs, :func:`task_headers`
gives the key for the next call: the task's key and the call's number within
the attempt (``<task key>/call-<n>``), so a deterministic handler run again
makes the same keyed calls in the same order. :func:`httpx_client` sets it on
every request; hand that client to the ``openai`` package::

    openai.AsyncOpenAI(base_url=egress.base_url("openai"), api_key="unused",
                       http_client=egress.httpx_client())
"""

from __future__ import annotations

import contextvars
import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

TASK_KEY_HEADER = "x-statefabric-task-key"
REPLAYED_HEADER = "x-statefabric-replayed"
ERROR_HEADER = "x-statefabric-egress-error"
ADDRESS_ENV = "STATEFABRIC_EGRESS_ADDRESS"
DEFAULT_ADDRESS = "http://127.0.0.1:7480"


@dataclass
class _TaskCalls:
    key: str
    traceparent: str = ""
    numbers: Iterator[int] = field(default_factory=lambda: itertools.count(1))


_current: contextvars.ContextVar[_TaskCalls | None] = contextvars.ContextVar(
    "statefabric_task_calls", default=None
)


@contextmanager
def task_scope(key: str, traceparent: str = "") -> Iterator[None]:
    """Marks the code inside as working on the task `key`, in the saga's
    trace `traceparent` (the worker does this around every handler)."""
    token = _current.set(_TaskCalls(key, traceparent))
    try:
        yield
    finally:
        _current.reset(token)


def current_task_key() -> str | None:
    calls = _current.get()
    return calls.key if calls else None


def task_headers() -> dict[str, str]:
    """The headers for the next outbound call: the task key and the saga's
    trace context (an agent's own tracing, when it sets `traceparent`,
    wins); empty outside a task handler."""
    calls = _current.get()
    if calls is None:
        return {}
    headers = {TASK_KEY_HEADER: f"{calls.key}/call-{next(calls.numbers)}"}
    if calls.traceparent:
        headers["traceparent"] = calls.traceparent
    return headers


def base_url(upstream: str, address: str | None = None) -> str:
    """The URL an HTTP client uses for `upstream` through the sidecar."""
    address = address or os.environ.get(ADDRESS_ENV) or DEFAULT_ADDRESS
    if not address.startswith(("http://", "https://")):
        address = f"http://{address}"
    return f"{address.rstrip('/')}/{upstream}"


def _stamp(request: httpx.Request) -> None:
    for name, value in task_headers().items():
        request.headers.setdefault(name, value)


async def _astamp(request: httpx.Request) -> None:
    _stamp(request)


def httpx_client(**options: Any) -> httpx.AsyncClient:
    """An ``httpx.AsyncClient`` that sets the task key on every request made
    inside a task handler (needs ``httpx``: ``statefabric[egress]``)."""
    import httpx

    hooks = options.pop("event_hooks", {})
    hooks.setdefault("request", []).append(_astamp)
    options.setdefault("timeout", httpx.Timeout(600.0, connect=10.0))
    return httpx.AsyncClient(event_hooks=hooks, **options)


def httpx_sync_client(**options: Any) -> httpx.Client:
    """As :func:`httpx_client`, synchronous."""
    import httpx

    hooks = options.pop("event_hooks", {})
    hooks.setdefault("request", []).append(_stamp)
    options.setdefault("timeout", httpx.Timeout(600.0, connect=10.0))
    return httpx.Client(event_hooks=hooks, **options)
