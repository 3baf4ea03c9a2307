"""Saga tasks through `fabric dev`: a Planner → Coder → Critic trio of
workers runs a saga to DONE; a worker killed mid-task has its task handed to
another worker under the same key, whose model call is then replayed by the
sidecar's egress instead of reaching the model again."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

import statefabric
from statefabric import Task, TaskFailed, egress

from .conftest import Sidecar, dev_sidecar, unique
from .model_upstream import ModelUpstream, dev_with_egress


def saga_status(api: str, saga_id: str) -> str | None:
    try:
        with urllib.request.urlopen(f"{api}/v1/sagas/{saga_id}", timeout=2) as response:
            return json.load(response)["saga"]["instance"]["status"]
    except OSError:
        return None


async def until_status(api: str, saga_id: str, wanted: set[str], within: float = 30) -> str:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        status = await asyncio.to_thread(saga_status, api, saga_id)
        if status in wanted:
            return status
        await asyncio.sleep(0.2)
    raise AssertionError(f"saga {saga_id} not {wanted} within {within} s (last: {status})")


def api_of(sidecar: Sidecar) -> str:
    return "http://" + sidecar.env["STATEFABRIC_API__LISTEN"]


async def run_saga(
    dev: Sidecar, client: statefabric.Client, saga: str, planner: Any, coder: Any, critic: Any
) -> str:
    """Runs saga `saga` of the built-in definition with the three workers;
    returns how it ended."""
    tasks = client.tasks
    async with (
        tasks.worker("planner", planner),
        tasks.worker("coder", coder),
        tasks.worker("critic", critic),
    ):
        await tasks.start_saga("plan-code-critique", {"task": "add a health check"}, saga_id=saga)
        return await until_status(api_of(dev), saga, {"DONE", "FAILED", "COMPENSATED"})


async def test_a_planner_coder_critic_trio_runs_a_saga_to_done(
    dev: Sidecar, dev_client: statefabric.Client
) -> None:
    handled: list[tuple[str, str]] = []
    critiques = 0
    saga = unique("trio")

    async def planner(task: Task) -> dict[str, Any]:
        if task.saga_id != saga:
            return {"steps": []}  # another test's saga on the shared sidecar
        handled.append((task.agent_type, task.action))
        return {"steps": ["write it", "test it"], "for": task.input["task"]}

    def coder(task: Task) -> dict[str, Any]:  # a sync handler runs in a thread
        if task.saga_id == saga:
            handled.append((task.agent_type, task.action))
        return {"change": f"patch {task.visit} for {task.input['task']}"}

    async def critic(task: Task) -> dict[str, Any]:
        nonlocal critiques
        if task.saga_id != saga:
            return {"verdict": "approved"}
        handled.append((task.agent_type, task.action))
        critiques += 1
        assert task.input["change"]["change"].startswith("patch")
        return {"verdict": "changes_requested" if critiques == 1 else "approved"}

    assert await run_saga(dev, dev_client, saga, planner, coder, critic) == "DONE"
    assert handled == [
        ("planner", "plan"),
        ("coder", "code"),
        ("critic", "critique"),
        ("coder", "code"),
        ("critic", "critique"),
    ]


async def test_a_failing_handler_fails_the_task_and_the_engine_retries_it(
    dev: Sidecar, dev_client: statefabric.Client
) -> None:
    attempts: list[int] = []

    saga = unique("flaky")

    async def flaky_planner(task: Task) -> dict[str, Any]:
        if task.saga_id != saga:
            return {"steps": []}
        attempts.append(task.attempt)
        if task.attempt == 1:
            raise TaskFailed("the model was unavailable")
        return {"steps": []}

    async def coder(task: Task) -> dict[str, Any]:
        return {"change": "c"}

    async def critic(task: Task) -> dict[str, Any]:
        return {"verdict": "approved"}

    assert await run_saga(dev, dev_client, saga, flaky_planner, coder, critic) == "DONE"
    assert attempts == [1, 2]


@pytest.fixture
def model() -> Iterator[ModelUpstream]:
    upstream = ModelUpstream()
    yield upstream
    upstream.close()


async def test_a_worker_killed_mid_task_hands_it_on_under_the_same_key_and_its_model_call_is_replayed(
    model: ModelUpstream,
) -> None:
    sidecar = dev_with_egress(model).start()
    egress_address = sidecar.egress
    agent = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("planner_worker.py")), sidecar.address, egress_address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert agent.stdout is not None
        assert (await asyncio.to_thread(agent.stdout.readline)).strip() == "ready"
        async with statefabric.Client(sidecar.address) as client:
            saga = await client.tasks.start_saga("plan-code-critique", {"task": "fix the build"})
            line = await asyncio.wait_for(asyncio.to_thread(agent.stdout.readline), 30)
            _, first_key, first_answer = line.strip().split(" ", 2)
            assert first_key.startswith(f"{saga}/PLAN/1/1"), line
            assert len(model.calls) == 1
            assert model.calls[0]["authorization"] == "Bearer sk-held-by-the-sidecar"
            assert model.calls[0]["task_key"] == f"{first_key}/call-1"

            # The agent dies mid-task (no goodbye: SIGKILL).
            agent.send_signal(signal.SIGKILL)
            agent.wait()
            killed_at = time.monotonic()

            # Another planner gets the same attempt under the same key long
            # before the step's two-minute lease would have run out, and
            # its identical model call is answered from the record.
            seen: asyncio.Queue[tuple[str, str, bool]] = asyncio.Queue()
            model_client = openai.AsyncOpenAI(
                base_url=egress.base_url("model", egress_address),
                api_key="the-agent-holds-no-key",
                max_retries=0,
                http_client=egress.httpx_client(),
            )

            async def plan(task: Task) -> dict[str, Any]:
                raw = await model_client.chat.completions.with_raw_response.create(
                    model="m", messages=[{"role": "user", "content": f"plan {task.input['task']}"}]
                )
                reply = raw.parse()
                replayed = raw.headers.get(egress.REPLAYED_HEADER) == "true"
                await seen.put((task.key, reply.choices[0].message.content or "", replayed))
                return {"steps": [reply.choices[0].message.content]}

            async with client.tasks.worker("planner", plan, concurrency=1):
                key, answer, replayed = await asyncio.wait_for(seen.get(), 30)
            assert key == first_key
            assert time.monotonic() - killed_at < 20
            assert (answer, replayed) == (first_answer, True)
            assert len(model.calls) == 1, "the model was not called again"
            await model_client.close()
    finally:
        if agent.poll() is None:
            agent.kill()
        sidecar.stop()


async def test_a_sagas_trace_context_reaches_its_tasks_and_their_egress_calls(
    model: ModelUpstream,
) -> None:
    sidecar = dev_with_egress(model).start()
    trace = "00-7bf92f3577b34da6a3ce929d0e0e4736-30f067aa0ba902b7-01"
    try:
        async with statefabric.Client(sidecar.address) as client:
            seen: asyncio.Queue[Task] = asyncio.Queue()
            model_client = openai.AsyncOpenAI(
                base_url=egress.base_url("model", sidecar.egress),
                api_key="unused",
                max_retries=0,
                http_client=egress.httpx_client(),
            )

            async def plan(task: Task) -> dict[str, Any]:
                await model_client.chat.completions.create(
                    model="m", messages=[{"role": "user", "content": "plan"}]
                )
                await seen.put(task)
                return {"steps": []}

            async with client.tasks.worker("planner", plan):
                saga = await client.tasks.start_saga(
                    "plan-code-critique", {"task": "t"}, traceparent=trace
                )
                task = await asyncio.wait_for(seen.get(), 30)
            await model_client.close()
        assert task.saga_id == saga
        assert task.traceparent == trace, "the sidecar exports no spans: the caller's context as sent"
        assert model.calls[0]["traceparent"] == trace, "the model call is in the saga's trace"
    finally:
        sidecar.stop()


async def test_stopping_a_worker_lets_its_running_handler_finish() -> None:
    sidecar = dev_sidecar().start()
    try:
        async with statefabric.Client(sidecar.address) as client:
            started, finished = asyncio.Event(), asyncio.Event()

            async def slow_planner(task: Task) -> dict[str, Any]:
                started.set()
                await asyncio.sleep(1.0)
                finished.set()
                return {"steps": []}

            worker = client.tasks.worker("planner", slow_planner)
            runner = asyncio.create_task(worker.run())
            await client.tasks.start_saga("plan-code-critique", {"task": "t"}, saga_id=unique("s"))
            await asyncio.wait_for(started.wait(), 15)
            worker.stop()
            await asyncio.wait_for(runner, 10)
            assert finished.is_set() and worker.answered == 1
            # The plan was answered: the saga moved on to the coder.
            coder_tasks = await client.tasks.poll("coder", wait=10)
            assert [t.step for t in coder_tasks] == ["CODE"]
    finally:
        sidecar.stop()
