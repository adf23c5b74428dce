"""Cron schedules: nats-server fires each slot onto timers.due, a master submits one task per
slot (even with two masters), pause/resume/remove act on the live schedule, and a schedule
that cannot be honoured is refused at `add` with the reason, before anything is stored."""

from __future__ import annotations

import datetime
import itertools

import pytest

from streamsched import subjects
from streamsched.client import Client
from streamsched.errors import NotFound, Rejected
from streamsched.eventlog import events as ev
from streamsched.eventlog.state import StateStore
from streamsched.roles.master import Master
from streamsched.testing import EventLog, all_roles, running
from streamsched.transport.bus import Bus

from .test_cli import cli

pytestmark = pytest.mark.anyio


def slot_tasks(events: EventLog, name: str) -> list[ev.Event]:
    return [e for e in events.of_kind("submitted") if isinstance(e, ev.Submitted) and e.labels.get("schedule") == name]


async def live_subjects(bus: Bus) -> dict[str, int]:
    info = await bus.js.stream_info(subjects.TIMERS_STREAM, subjects_filter="timers.cron.>")
    return info.state.subjects or {}


async def test_a_schedule_makes_exactly_one_task_per_slot_with_two_masters(settings, bus, events: EventLog, examples):
    client = Client(bus, await StateStore.open(bus), settings)
    roles = [*await all_roles(settings, bus, examples), Master(settings, bus)]
    async with running(roles):
        await client.add_schedule("tick", "*/1 * * * * *", "echo", {"n": 1})
        await events.wait(lambda log: len(slot_tasks(log, "tick")) >= 4, timeout_s=8, what="4 slots")
        await client.pause_schedule("tick")
        ids = [e.task_id for e in slot_tasks(events, "tick")]
        for task_id in ids:
            assert ev.kind(await events.wait_final(task_id)) == "succeeded"
    assert len(ids) == len(set(ids)), ids  # no slot made two tasks
    slots = sorted(datetime.datetime.strptime(task_id, "tick-%Y%m%dT%H%M%SZ") for task_id in ids)
    assert all((b - a).total_seconds() == 1 for a, b in itertools.pairwise(slots)), ids  # no slot skipped
    # A slot is submitted on its template's priority subject (medium: the template names none).
    submitted = await bus.js.stream_info(subjects.TASKS_STREAM, subjects_filter=">")
    assert {s: n for s, n in (submitted.state.subjects or {}).items() if subjects.is_submit(s)} == {subjects.submit("medium"): len(ids)}


async def test_pause_stops_a_schedule_resume_restarts_it_and_remove_deletes_it(settings, bus, events: EventLog, examples):
    client = Client(bus, await StateStore.open(bus), settings)
    async with running(await all_roles(settings, bus, examples)):
        await client.add_schedule("beat", "@every 1s", "echo", priority="high")
        await events.wait(lambda log: len(slot_tasks(log, "beat")) >= 1, timeout_s=4, what="a first slot")
        paused = await client.pause_schedule("beat")
        assert paused.paused and await live_subjects(bus) == {}
        count = len(slot_tasks(events, "beat"))
        with pytest.raises(AssertionError, match="timed out"):
            await events.wait(lambda log: len(slot_tasks(log, "beat")) > count, timeout_s=2.5, what="no slot while paused")
        await client.resume_schedule("beat")
        await events.wait(lambda log: len(slot_tasks(log, "beat")) > count, timeout_s=4, what="a slot after resume")
        assert [s.name for s in await client.list_schedules()] == ["beat"]
        await client.remove_schedule("beat")
    assert await client.list_schedules() == [] and await live_subjects(bus) == {}
    with pytest.raises(NotFound, match="no schedule 'beat'"):
        await client.remove_schedule("beat")
    assert {e.priority for e in slot_tasks(events, "beat") if isinstance(e, ev.Submitted)} == {"high"}


@pytest.mark.parametrize(
    ("cron", "extra", "reason"),
    [
        ("0 9 * * *", {}, "has 5 fields; schedules take 6, seconds first"),
        ("@every 100ms", {}, "@every must be at least 1s"),
        ("0 0 9 * * *", {"time_zone": "Mars/Olympus"}, "unknown time zone 'Mars/Olympus'"),
        ("@every 5s", {"time_zone": "Europe/Berlin"}, "a time zone applies to cron fields"),
        ("0 0 9 * * *", {"priority": "urgent"}, "unknown priority 'urgent'"),
        ("61 0 9 * * *", {}, "was refused by nats-server"),
    ],
)
async def test_a_schedule_that_cannot_be_honoured_is_refused_with_the_reason(settings, bus, cron, extra, reason):
    client = Client(bus, await StateStore.open(bus), settings)
    with pytest.raises(Rejected, match=reason):
        await client.add_schedule("bad", cron, "echo", **extra)
    assert await client.list_schedules() == [] and await live_subjects(bus) == {}


async def test_the_schedule_commands_add_list_pause_and_refuse(settings, bus):
    added = await cli(settings, "schedule", "add", "nightly", "--cron", "0 0 3 * * *", "--tz", "Europe/Berlin", "--type", "echo")
    assert "nightly" in added.stdout.decode() and "active" in added.stdout.decode()
    await cli(settings, "schedule", "pause", "nightly")
    listed = (await cli(settings, "schedule", "list")).stdout.decode()
    assert "nightly" in listed and "paused" in listed and "Europe/Berlin" in listed
    refused = await cli(settings, "schedule", "add", "x", "--cron", "0 3 * * *", "--type", "echo", check=False)
    assert refused.returncode == 2 and "has 5 fields" in refused.stderr.decode()
    await cli(settings, "schedule", "remove", "nightly")
    assert (await cli(settings, "schedule", "list")).stdout.decode() == ""
