"""Delayed tasks (``delay_s``, ``run_at``): held by nats-server as message schedules in TIMERS,
queued by a master when they fire, not a moment before; across a restart of every role too."""

from __future__ import annotations

import datetime
import time

import anyio
import pytest

from streamsched import subjects
from streamsched.client import Client
from streamsched.eventlog import events as ev
from streamsched.eventlog.state import StateStore
from streamsched.model import Status, TaskState
from streamsched.testing import EventLog, all_roles, running

pytestmark = pytest.mark.anyio


def started_of(events: EventLog, task_id: str) -> ev.Event:
    return next(e for e in events.of_task(task_id) if ev.kind(e) == "started")


async def wait_status(client: Client, task_id: str, status: Status, *, timeout_s: float = 5.0) -> TaskState:
    with anyio.fail_after(timeout_s):
        while (state := await client.get(task_id)) is None or state.status is not status:
            await anyio.sleep(0.05)
    return state


async def test_a_delayed_task_starts_no_earlier_than_its_delay_and_waits_meanwhile(settings, bus, events: EventLog, examples):
    client = Client(bus, await StateStore.open(bus))
    async with running(await all_roles(settings, bus, examples)):
        before = time.time()
        await bus.js.publish(subjects.SUBMIT, b'{"id":"d3","type":"echo","delay_s":3}')
        waiting = await wait_status(client, "d3", Status.WAITING)
        assert waiting.not_before is not None and before + 3 <= waiting.not_before <= time.time() + 3
        await events.wait_final("d3", timeout_s=10)
        started = started_of(events, "d3")
        assert waiting.not_before <= started.at <= waiting.not_before + 1.0
        assert events.kinds_of("d3")[:3] == ["submitted", "waiting", "scheduled"]


async def test_run_at_holds_a_task_until_that_time_in_any_zone(settings, bus, events: EventLog, examples):
    at = time.time() + 2.5
    berlin = datetime.timezone(datetime.timedelta(hours=2))
    run_at = datetime.datetime.fromtimestamp(at, berlin).isoformat(timespec="milliseconds")
    async with running(await all_roles(settings, bus, examples)):
        await bus.js.publish(subjects.SUBMIT, b'{"id":"at1","type":"echo","run_at":"%s"}' % run_at.encode())
        await events.wait_final("at1", timeout_s=10)
    started = started_of(events, "at1")
    assert at - 0.01 <= started.at <= at + 1.0


async def test_a_time_in_the_past_runs_at_once(settings, bus, events: EventLog, examples):
    async with running(await all_roles(settings, bus, examples)):
        await bus.js.publish(subjects.SUBMIT, b'{"id":"past","type":"echo","run_at":"2001-01-01T00:00:00Z"}')
        await events.wait_final("past", timeout_s=5)
    assert "waiting" not in events.kinds_of("past")


async def test_a_delayed_task_fires_after_a_restart_of_every_role(settings, bus, events: EventLog, examples):
    async with running(await all_roles(settings, bus, examples)):
        await bus.js.publish(subjects.SUBMIT, b'{"id":"r1","type":"echo","delay_s":1.5}')
        await events.wait(lambda log: "waiting" in log.kinds_of("r1"), what="r1 waiting")
    # Every role is down. nats-server fires the schedule onto timers.due, where it waits.
    with anyio.fail_after(5):
        while not (await bus.js.stream_info(subjects.TIMERS_STREAM, subjects_filter=subjects.TIMERS_DUE)).state.subjects:
            await anyio.sleep(0.05)
    assert "started" not in events.kinds_of("r1")
    restarted = time.time()
    async with running(await all_roles(settings, bus, examples)):
        await events.wait_final("r1", timeout_s=5)
    assert started_of(events, "r1").at - restarted < 1.0, [(ev.kind(e), round(e.at - restarted, 3)) for e in events.of_task("r1")]
    assert events.kinds_of("r1")[-1] == "succeeded"
