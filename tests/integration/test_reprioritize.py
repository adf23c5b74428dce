"""Reprioritizing a task that has not started: it moves ahead of its old level's backlog,
runs once at its new priority, and a copy made before the change is moved, not run."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

from streamsched import current_task, subjects
from streamsched.client import Client
from streamsched.errors import AlreadyFinished, NotFound
from streamsched.eventlog import events as ev
from streamsched.eventlog.state import StateStore
from streamsched.registry import Registry, TaskDef
from streamsched.roles.master import Master
from streamsched.roles.placement import sched_headers
from streamsched.roles.projector import Projector
from streamsched.roles.regional import Regional
from streamsched.roles.reprioritize import Override
from streamsched.roles.worker import Worker
from streamsched.testing import EventLog, running, wait_drained
from streamsched.transport.bus import Bus

pytestmark = pytest.mark.anyio

REGION = "default"


def recording(priorities: dict[str, list[str]], seconds: float = 0.0) -> Registry:
    """``test.step``: sleeps ``seconds``; records the priority each task ran at."""

    async def step(payload: Any) -> None:
        context = current_task()
        priorities.setdefault(context.id, []).append(context.priority)
        if seconds:
            await anyio.sleep(seconds)

    return Registry([TaskDef("test.step", step)])


async def routing(settings: Any, bus: Bus) -> list[Any]:
    return [Master(settings, bus), Regional(settings, bus, REGION), Projector(settings, bus, await StateStore.open(bus))]


def body(task_id: str, priority: str = "low", **more: Any) -> bytes:
    return msgspec.json.encode({"id": task_id, "type": "test.step", "priority": priority, **more})


async def test_a_low_task_behind_a_4000_task_backlog_moves_ahead_and_runs_once_at_high(settings, bus, events: EventLog):
    ran: dict[str, list[str]] = {}
    # Eight slots of 10 ms, nothing prefetched: the backlog waits on WORK, about 5 s of it.
    worker = Worker(settings, bus, recording(ran, 0.01), region=REGION, concurrency=8, prefetch=0)
    client = Client(bus, await StateStore.open(bus), settings=settings)
    backlog = [f"b{i}" for i in range(4000)]
    async with running([*await routing(settings, bus), worker]):
        failed, _ = await bus.publish_many((subjects.submit("low"), body(task_id), None) for task_id in [*backlog, "target"])
        assert failed == 0
        await events.wait(lambda log: "dispatched" in log.kinds_of("target"), timeout_s=30, what="the target on WORK")
        assert "started" not in events.kinds_of("target")
        await client.reprioritize("target", "high")
        await events.wait(lambda log: "succeeded" in log.kinds_of("target"), timeout_s=30, what="the target's success")
        started = min(e.at for e in events.of_task("target") if isinstance(e, ev.Started))
        done_before = sum(1 for e in events.of_kind("succeeded") if e.task_id != "target" and e.at < started)
        await events.wait_count("succeeded", len(backlog) + 1, timeout_s=60)
    assert done_before < len(backlog) // 2, f"{done_before} of {len(backlog)} had finished when the target started"
    assert ran["target"] == ["high"]  # once, at its new priority
    assert all(len(ran[task_id]) == 1 for task_id in backlog)
    assert [e.priority for e in events.of_task("target") if isinstance(e, ev.Reprioritized)] == ["high"]
    state = await client.get("target")
    assert state is not None and state.priority == "high"
    await wait_drained(bus, subjects.WORK_STREAM)


async def test_a_copy_made_before_the_change_is_moved_to_the_new_priority_not_run(settings, bus, events: EventLog):
    ran: dict[str, list[str]] = {}
    kv = await bus.js.key_value(subjects.PRIORITIES_BUCKET)
    await kv.put("old-copy", msgspec.json.encode(Override(priority="high", generation=7)))
    # As a regional scheduler released it before the override: at low, without a generation.
    headers = sched_headers("old-copy", "test.step", "low", REGION, hop="work")
    await bus.js.publish(subjects.work(REGION, "low", "test.step"), body("old-copy"), headers=_as_dict(headers))
    async with running([Projector(settings, bus, await StateStore.open(bus)), Worker(settings, bus, recording(ran), region=REGION, concurrency=2)]):
        await events.wait(lambda log: "succeeded" in log.kinds_of("old-copy"), what="the moved copy's success")
    assert ran["old-copy"] == ["high"]
    await wait_drained(bus, subjects.WORK_STREAM)


async def test_a_task_waiting_for_its_dependencies_is_released_at_its_new_priority(settings, bus, events: EventLog):
    ran: dict[str, list[str]] = {}
    client = Client(bus, await StateStore.open(bus), settings=settings)
    async with running([*await routing(settings, bus), Worker(settings, bus, recording(ran), region=REGION, concurrency=2)]):
        await bus.js.publish(subjects.SUBMIT, body("child", depends_on=["parent"]))
        await events.wait(lambda log: "waiting" in log.kinds_of("child"), what="the child waiting")
        await client.reprioritize("child", "high")
        await events.wait(lambda log: "reprioritized" in log.kinds_of("child"), what="the child reprioritized")
        await bus.js.publish(subjects.SUBMIT, body("parent"))
        await events.wait(lambda log: "succeeded" in log.kinds_of("child"), what="the child's success")
    assert ran["child"] == ["high"]


async def test_reprioritize_refuses_unknown_tasks_finished_tasks_and_unknown_priorities(settings, bus, events: EventLog):
    client = Client(bus, await StateStore.open(bus), settings=settings)
    with pytest.raises(NotFound):
        await client.reprioritize("nobody", "high")
    with pytest.raises(ValueError, match="unknown priority"):
        await client.reprioritize("nobody", "urgent")
    ran: dict[str, list[str]] = {}
    async with running([*await routing(settings, bus), Worker(settings, bus, recording(ran), region=REGION, concurrency=2)]):
        await bus.js.publish(subjects.SUBMIT, body("done"))
        await client.wait("done", timeout_s=10)
        with pytest.raises(AlreadyFinished):
            await client.reprioritize("done", "high")


def _as_dict(headers: bytes) -> dict[str, str]:
    lines = headers.decode().split("\r\n")[1:]
    return dict(line.split(": ", 1) for line in lines if line)


async def test_with_aging_a_queued_low_task_rises_a_level_each_aging_s_and_runs_once_at_the_top(settings, bus, events: EventLog):
    aging = msgspec.structs.replace(settings, aging_s=0.4)
    ran: dict[str, list[str]] = {}
    async with running(await routing(aging, bus)):  # no worker yet: the task waits on WORK
        await bus.js.publish(subjects.submit("low"), body("patient"))
        await events.wait(lambda log: "held" in log.kinds_of("patient"), what="the low task on WORK")
        queued = max(e.at for e in events.of_task("patient") if ev.kind(e) == "held")
        await events.wait(
            lambda log: [e.priority for e in log.of_task("patient") if isinstance(e, ev.Reprioritized)] == ["medium", "high"],
            timeout_s=10,
            what="two reprioritized events, to medium then to high",
        )
        rises = [e for e in events.of_task("patient") if isinstance(e, ev.Reprioritized)]
        # Each rise after it had waited aging_s at its level (and within a few passes of it).
        assert rises[0].at - queued >= aging.aging_s and rises[1].at - rises[0].at >= aging.aging_s
        async with running([Worker(aging, bus, recording(ran), region=REGION, concurrency=2)]):
            await events.wait(lambda log: "succeeded" in log.kinds_of("patient"), what="the aged task's success")
    assert ran["patient"] == ["high"]
    await wait_drained(bus, subjects.WORK_STREAM)
