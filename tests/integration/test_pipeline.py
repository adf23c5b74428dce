"""The whole path in one process: tasks.submit -> master -> regional -> worker -> projector."""

from __future__ import annotations

import msgspec
import pytest

from streamsched.client import Client
from streamsched.errors import NotFound
from streamsched.eventlog.state import StateStore
from streamsched.model import Status
from streamsched.testing import EventLog, all_roles, running

pytestmark = pytest.mark.anyio


async def test_a_raw_json_submission_runs_and_its_result_is_recorded(settings, bus, events: EventLog, examples):
    async with running(await all_roles(settings, bus, examples)):
        await bus.nc.publish("tasks.submit", b'{"id":"t1","type":"echo","payload":{"hello":"world"}}')
        final = await events.wait_final("t1")
        assert events.kinds_of("t1") == ["submitted", "scheduled", "dispatched", "started", "succeeded"]
        assert msgspec.json.decode(final.result) == {"hello": "world"}
        client = Client(bus, await StateStore.open(bus))
        state = await client.wait("t1", timeout_s=10)
        assert state.status is Status.SUCCEEDED
        assert msgspec.json.decode(state.result) == {"hello": "world"}
        assert (state.type, state.priority, state.region, state.attempts) == ("echo", "medium", "default", 1)
        assert state.submitted_at <= state.started_at <= state.finished_at


async def test_wait_follows_the_tasks_state_in_the_view(settings, bus, examples):
    master, regional, projector, worker = await all_roles(settings, bus, examples)
    client = Client(bus, await StateStore.open(bus))
    async with running([master, regional, worker]):
        await bus.nc.publish("tasks.submit", b'{"id":"np","type":"echo","payload":7}')
        # The task runs, but nothing projects its events yet: the view does not know it.
        with pytest.raises(NotFound, match="no task np"):
            await client.wait("np", timeout_s=1.0)
        async with running([projector]):
            state = await client.wait("np", timeout_s=10)
    assert state.status is Status.SUCCEEDED and msgspec.json.decode(state.result) == 7
    assert (state.type, state.attempts) == ("echo", 1)
    assert (await client.wait("np", timeout_s=1.0)).status is Status.SUCCEEDED  # already final: answered at once


async def test_wait_says_whether_the_task_is_unknown_or_not_done_yet(settings, bus, examples):
    master, regional, projector, _worker = await all_roles(settings, bus, examples)
    client = Client(bus, await StateStore.open(bus))
    with pytest.raises(NotFound, match="no task ghost"):
        await client.wait("ghost", timeout_s=0.3)
    async with running([master, regional, projector]):  # no worker: the task waits on WORK
        await bus.nc.publish("tasks.submit", b'{"id":"queued","type":"echo"}')
        with pytest.raises(TimeoutError, match=r"task queued still (pending|waiting) after"):
            await client.wait("queued", timeout_s=3.0)  # a pending state is written after projector.HOLD_S


async def test_submit_many_stores_every_task_once_and_returns_their_handles(settings, bus, events: EventLog, examples):
    client = Client(bus, await StateStore.open(bus))
    specs = [{"type": "echo", "payload": i, "priority": ("high", "low")[i % 2]} for i in range(250)]
    specs.append({"type": "echo", "id": "named", "payload": "n"})
    async with running(await all_roles(settings, bus, examples)):
        # More tasks than a chunk and a window, so that submit_many waits for room.
        handles = await client.submit_many(specs, window=120)
        assert len({h.id for h in handles}) == 251 and handles[-1].id == "named"
        for handle in handles:
            await events.wait_final(handle.id)
        seventh = await handles[7].status()
        assert seventh is not None and msgspec.json.decode(seventh.result) == 7
        assert await handles[-1].result(timeout_s=10) == "n"
        second = await client.get(handles[1].id)
        assert second is not None and second.priority == "low"
        # The same tasks again: each carries its id as Nats-Msg-Id, so none is stored twice.
        await client.submit_many([{**spec, "id": h.id} for spec, h in zip(specs, handles, strict=True)])
    # Each on its priority's subject (the named one names none: medium).
    info = await bus.js.stream_info("TASKS", subjects_filter="tasks.submit.*")
    assert info.state.subjects == {"tasks.submit.high": 125, "tasks.submit.low": 125, "tasks.submit.medium": 1}


async def test_submit_many_says_when_submissions_were_not_stored(settings, bus):
    client = Client(bus, await StateStore.open(bus))
    with pytest.raises(TypeError, match="priorty"):
        await client.submit_many([{"type": "echo"}] * 150 + [{"type": "echo", "priorty": "high"}])
    # More than a chunk before the typo, and still nothing was sent.
    assert (await bus.js.stream_info("TASKS")).state.messages == 0
    await bus.js.delete_stream("TASKS")  # nothing takes tasks.submit any more: every publish fails
    with pytest.raises(ConnectionError, match="3 of 3 submissions were not stored"):
        await client.submit_many([{"type": "echo"}] * 3)
