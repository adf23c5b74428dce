"""The blocking client: its calls return what the async client's return, raise the same typed
exceptions, run side by side from several threads, and fail clearly once it is closed.

The roles run in the test's event loop; the SyncClient runs its own in a thread of its own,
so the test calls it from yet another thread (``anyio.to_thread``), as a Django view would."""

from __future__ import annotations

import inspect
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio
import anyio.to_thread
import pytest

from streamsched.client import Client, Workflow
from streamsched.config import Settings
from streamsched.errors import AlreadyFinished, NotFound, Rejected, Unavailable
from streamsched.model import Status
from streamsched.registry import Registry
from streamsched.sync_client import SyncClient, SyncTaskHandle
from streamsched.testing import all_roles, running
from streamsched.transport.bus import Bus
from streamsched.transport.server import free_port

pytestmark = pytest.mark.anyio

T = TypeVar("T")


async def in_thread(call: Callable[[], T]) -> T:
    return await anyio.to_thread.run_sync(call)


@asynccontextmanager
async def sync_client(settings: Settings, **options: float) -> AsyncIterator[SyncClient]:
    client = await in_thread(lambda: SyncClient.connect(settings.nats_url, settings=settings, **options))
    try:
        yield client
    finally:
        await in_thread(client.close)


def loop_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name == "streamsched-client-loop"]


def test_the_sync_client_has_every_public_method_of_the_async_one_with_the_same_parameters() -> None:
    def parameters(function: Callable[..., object]) -> list[tuple[str, object, object]]:
        return [(p.name, p.kind, p.default) for p in inspect.signature(function).parameters.values()]

    public = [name for name in vars(Client) if not name.startswith("_") and name not in ("connect", "close", "submit_subject")]
    assert "submit" in public and "wait_workflow" in public
    for name in public:
        assert parameters(getattr(SyncClient, name)) == parameters(getattr(Client, name)), name


async def test_a_task_submitted_from_a_thread_returns_its_result(settings: Settings, bus: Bus, examples: Registry) -> None:
    async with running(await all_roles(settings, bus, examples)), sync_client(settings) as client:
        handle = await in_thread(lambda: client.submit("echo", {"hello": "world"}, priority="high"))
        assert isinstance(handle, SyncTaskHandle)
        assert await in_thread(lambda: handle.result(timeout_s=10)) == {"hello": "world"}
        state = await in_thread(handle.status)
        assert state is not None and state.status is Status.SUCCEEDED and state.priority == "high"
        assert await in_thread(lambda: client.get(handle.id)) == state

        wf = Workflow("sync-wf")
        first = wf.task("echo", 1)
        wf.task("echo", 2, id="second", depends_on=[first])
        workflow = await in_thread(lambda: client.submit_workflow(wf))
        finished = await in_thread(lambda: workflow.wait(timeout_s=10))
        assert finished.status == "succeeded"
        assert (await in_thread(lambda: client.wait(workflow.task_id("second"), timeout_s=5))).status is Status.SUCCEEDED


async def test_typed_exceptions_cross_the_thread(settings: Settings, bus: Bus, examples: Registry) -> None:
    async with running(await all_roles(settings, bus, examples)), sync_client(settings) as client:
        with pytest.raises(NotFound, match="no task nobody-knows-me"):
            await in_thread(lambda: client.cancel("nobody-knows-me"))
        with pytest.raises(Rejected):
            await in_thread(lambda: client.add_schedule("five-fields", "*/5 * * * *", "echo"))
        assert await in_thread(client.list_schedules) == []
        done = await in_thread(lambda: client.submit("echo", 1))
        await in_thread(lambda: done.result(timeout_s=10))
        with pytest.raises(AlreadyFinished) as finished:
            await in_thread(lambda: client.cancel(done.id))
        assert finished.value.status == "succeeded"


async def test_a_waiting_call_does_not_hold_up_other_threads(settings: Settings, bus: Bus, examples: Registry) -> None:
    """One thread waits (3 s) for a task that never comes; three others submit and get their
    results meanwhile: no call waits for another's answer."""
    async with running(await all_roles(settings, bus, examples)), sync_client(settings) as client:
        waiting = threading.Event()
        ended: dict[str, float] = {}

        def wait_for_nothing() -> None:
            waiting.set()
            with pytest.raises(NotFound):
                client.wait("never-submitted", timeout_s=3.0)
            ended["waiter"] = time.monotonic()

        def submit_and_collect(n: int) -> None:
            assert waiting.wait(10)
            handles = [client.submit("echo", [n, i]) for i in range(10)]
            assert [handle.result(timeout_s=10) for handle in handles] == [[n, i] for i in range(10)]
            ended[f"submitter {n}"] = time.monotonic()

        async with anyio.create_task_group() as tg:
            tg.start_soon(in_thread, wait_for_nothing)
            for n in range(3):
                tg.start_soon(in_thread, lambda n=n: submit_and_collect(n))
        assert len(ended) == 4
        assert all(at < ended["waiter"] for who, at in ended.items() if who != "waiter")


async def test_a_closed_client_refuses_calls_and_ends_the_one_in_flight(settings: Settings, bus: Bus) -> None:
    client = await in_thread(lambda: SyncClient.connect(settings.nats_url, settings=settings))
    assert len(loop_threads()) == 1
    outcome: list[BaseException] = []

    def wait_long() -> None:
        try:
            client.wait("never-submitted", timeout_s=30.0)
        except BaseException as exc:  # noqa: BLE001 - the test looks at whatever ended it
            outcome.append(exc)

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(in_thread, wait_long)
        await in_thread(lambda: client.get("anything"))  # the waiter has had time to start its watch
        await in_thread(client.close)
    assert time.monotonic() - started < 10
    assert len(outcome) == 1 and isinstance(outcome[0], RuntimeError), outcome
    with pytest.raises(RuntimeError, match="closed"):
        await in_thread(lambda: client.get("anything"))
    await in_thread(client.close)  # again: nothing happens
    assert loop_threads() == []


async def test_an_unreachable_server_raises_unavailable_and_leaves_no_thread() -> None:
    with pytest.raises(Unavailable):
        await in_thread(lambda: SyncClient.connect(f"nats://127.0.0.1:{free_port()}"))
    assert loop_threads() == []


async def test_a_call_the_loop_does_not_answer_gives_up_after_call_timeout_s(settings: Settings, bus: Bus) -> None:
    cancelled = threading.Event()

    async def stuck() -> None:
        try:
            await anyio.sleep(30)
        finally:
            cancelled.set()

    async with sync_client(settings, call_timeout_s=0.3) as client:
        started = time.monotonic()
        with pytest.raises(TimeoutError, match=r"no answer from the client's event loop within 0\.3s"):
            await in_thread(lambda: client._run(stuck()))
        assert time.monotonic() - started < 5
        assert await in_thread(lambda: cancelled.wait(5)), "the stuck call was not cancelled on the loop"
        assert await in_thread(lambda: client.get("anything")) is None  # the client still works


async def test_a_client_carried_across_a_fork_refuses_calls(settings: Settings, bus: Bus) -> None:
    """Its loop thread stayed in the parent; in the child a call would never be answered."""
    async with sync_client(settings) as client:
        client._pid = -1  # as a forked child sees it: another process connected it
        with pytest.raises(RuntimeError, match="connected in another process"):
            await in_thread(lambda: client.get("anything"))
        client._pid = os.getpid()
