"""Progress reports from handlers: recorded as `progress` events, rate-limited per task,
folded into the state and shown by `task history`."""

from __future__ import annotations

import threading
from typing import Any

import anyio
import pytest

from streamsched import current_task, subjects, task
from streamsched.client import Client
from streamsched.eventlog import events as ev
from streamsched.eventlog import reader as eventlog
from streamsched.eventlog.state import StateStore
from streamsched.model import Status
from streamsched.registry import TaskContext
from streamsched.testing import EventLog, all_roles, running

pytestmark = pytest.mark.anyio

#: Set by the test to let the burst handler return.
release = threading.Event()


@task("test.progress.burst")
def burst(payload: Any) -> int:
    """1,000 reports in a tight loop, then waits (up to 10 s) to be let go."""
    context = current_task()
    for step in range(1000):
        context.progress(step / 999, f"step {step}")
    release.wait(10)
    return 1000


@task("test.progress.steps")
async def steps(payload: Any) -> str:
    context = current_task()
    context.progress(0.25, "a quarter")
    await anyio.sleep(0.7)  # longer than the interval: each report is an event
    context.progress(None, "only a message")
    await anyio.sleep(0.7)
    return "done"


async def test_a_burst_of_reports_records_a_few_events_and_the_state_shows_the_latest(settings, bus, events: EventLog, registry):
    release.clear()
    client = Client(bus, await StateStore.open(bus))
    async with running(await all_roles(settings, bus, registry)):
        await bus.js.publish(subjects.SUBMIT, b'{"id":"burst","type":"test.progress.burst"}')
        with anyio.fail_after(10):
            while (state := await client.get("burst")) is None or state.progress != 1.0:
                await anyio.sleep(0.05)
        assert state.status is Status.RUNNING and state.progress_message == "step 999"
        release.set()
        await events.wait_final("burst")
        history = await eventlog.history(bus, "burst")
    reports = [e for e in events.of_task("burst") if isinstance(e, ev.Progress)]
    assert 1 <= len(reports) <= 3, [(r.fraction, r.message) for r in reports]  # the first at once, then the latest per 0.5 s
    assert (reports[-1].fraction, reports[-1].message, reports[-1].attempt) == (1.0, "step 999", 1)
    assert any("progress" in line and "fraction=1.000" in line and "message=step 999" in line for line in map(eventlog.format_record, history))


async def test_reports_further_apart_than_the_interval_are_each_recorded(settings, bus, events: EventLog, registry):
    client = Client(bus, await StateStore.open(bus))
    async with running(await all_roles(settings, bus, registry)):
        await bus.js.publish(subjects.SUBMIT, b'{"id":"steps","type":"test.progress.steps"}')
        await events.wait_final("steps")
        state = await client.wait("steps", timeout_s=5)
    reports = [(e.fraction, e.message) for e in events.of_task("steps") if isinstance(e, ev.Progress)]
    assert reports == [(0.25, "a quarter"), (None, "only a message")]
    assert (state.status, state.progress, state.progress_message) == (Status.SUCCEEDED, 0.25, "only a message")


def test_a_fraction_outside_0_to_1_or_a_report_outside_a_worker_is_refused():
    context = TaskContext(id="t", type="x", attempt=1, max_attempts=1, priority="medium", region="default", worker="w")
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="between 0 and 1"):
            context.progress(bad)
    with pytest.raises(RuntimeError, match="needs a task run by a worker"):
        context.progress(0.5)
    assert context.cancelled is False
