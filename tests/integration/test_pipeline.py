"""The whole path in one process: tasks.submit -> master -> regional -> worker -> projector."""

from __future__ import annotations

import msgspec
import pytest

from streamsched.client import Client
from streamsched.errors import NotFound
from streamsched.model import Status
from streamsched.state import StateStore
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
        with pytest.raises(TimeoutError, match="task queued still (pending|scheduled) after"):
            await client.wait("queued", timeout_s=3.0)  # a pending state is written after projector.HOLD_S
