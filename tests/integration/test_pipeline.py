"""The whole path in one process: tasks.submit -> master -> regional -> worker -> projector."""

from __future__ import annotations

import msgspec
import pytest

from streamsched.client import Client
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
