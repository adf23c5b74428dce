"""Deadlines (``deadline``, ``deadline_s``): across all attempts, past it no attempt starts
and no retry is scheduled; the task ends ``dead`` with reason "deadline"."""

from __future__ import annotations

import datetime
import time

import pytest

from streamsched import subjects
from streamsched.eventlog import events as ev
from streamsched.testing import EventLog, all_roles, running

pytestmark = pytest.mark.anyio


async def test_a_deadline_stops_retries(settings, bus, events: EventLog, examples):
    async with running(await all_roles(settings, bus, examples)):
        before = time.time()
        await bus.js.publish(subjects.SUBMIT, b'{"id":"dl","type":"fail","deadline_s":2,"max_attempts":100}')
        final = await events.wait_final("dl", timeout_s=10)
    assert ev.kind(final) == "dead" and final.error.startswith("deadline")
    starts = [e.at for e in events.of_task("dl") if ev.kind(e) == "started"]
    assert 3 <= len(starts) < 100  # retried (backoff 0.05 s doubling to 0.5 s) until the deadline
    assert max(starts) <= before + 2.0 + 0.05


async def test_a_task_queued_past_its_deadline_never_starts(settings, bus, events: EventLog, examples):
    master, regional, projector, worker = await all_roles(settings, bus, examples)
    past = datetime.datetime.fromtimestamp(time.time() + 1, datetime.UTC).isoformat()
    async with running([master, regional, projector]):  # no worker yet: the task waits in WORK
        await bus.js.publish(subjects.SUBMIT, b'{"id":"late","type":"echo","deadline":"%s"}' % past.encode())
        await events.wait(lambda log: "held" in log.kinds_of("late"), what="late held on WORK")
        await events.wait(lambda _log: time.time() > datetime.datetime.fromisoformat(past).timestamp(), timeout_s=3, what="the deadline")
        async with running([worker]):
            final = await events.wait_final("late")
    assert ev.kind(final) == "dead" and final.error.startswith("deadline: no attempt starts after")
    assert "started" not in events.kinds_of("late")
    assert (await bus.js.stream_info(subjects.DLQ_STREAM)).state.messages == 1
