"""A worker takes only the task types it has handlers for: two pools with different handler
modules share a region without a task dying for want of a handler, and a task of a type no
worker loads waits in WORK until one starts."""

from __future__ import annotations

from collections import Counter
from typing import Any

import anyio
import msgspec
import pytest

from streamsched import subjects, task
from streamsched.eventlog.state import StateStore
from streamsched.registry import Registry, TaskDef
from streamsched.roles.master import Master
from streamsched.roles.projector import Projector
from streamsched.roles.regional import Regional
from streamsched.roles.worker import Worker
from streamsched.testing import EventLog, running
from streamsched.transport import streams
from streamsched.transport.bus import Bus
from streamsched.transport.pull import Puller

pytestmark = pytest.mark.anyio

REGION = "default"


def pool(ran: Counter[str], *types: str) -> Registry:
    """A registry whose handlers count, by type, the tasks this pool ran."""

    def handler(task_type: str) -> Any:
        async def run(payload: Any) -> Any:
            ran[task_type] += 1
            return payload

        return run

    return Registry([TaskDef(task_type, handler(task_type)) for task_type in types])


async def submit(bus: Bus, task_id: str, task_type: str, priority: str = "medium") -> None:
    await bus.js.publish(subjects.SUBMIT, msgspec.json.encode({"id": task_id, "type": task_type, "priority": priority, "payload": task_id}))


async def routing(settings: Any, bus: Bus) -> list[Any]:
    return [Master(settings, bus), Regional(settings, bus, REGION), Projector(settings, bus, await StateStore.open(bus))]


async def test_two_pools_with_different_handlers_in_one_region_run_only_their_own_types(settings, bus, events: EventLog):
    billing_ran: Counter[str] = Counter()
    reports_ran: Counter[str] = Counter()
    # The pools share one type: both read its durables, and each task of it runs once.
    billing = Worker(settings, bus, pool(billing_ran, "billing.charge", "common.ping"), region=REGION, concurrency=8)
    reports = Worker(settings, bus, pool(reports_ran, "reports.build", "common.ping"), region=REGION, concurrency=8)
    kinds = ("billing.charge", "reports.build", "common.ping")
    async with running([*await routing(settings, bus), billing, reports]):
        for i in range(60):
            for n, task_type in enumerate(kinds):
                await submit(bus, f"t{n}-{i}", task_type, priority=settings.priorities[i % len(settings.priorities)])
        await events.wait_count("succeeded", 180, timeout_s=30)
    assert billing_ran["billing.charge"] == 60 and "reports.build" not in billing_ran
    assert reports_ran["reports.build"] == 60 and "billing.charge" not in reports_ran
    assert billing_ran["common.ping"] + reports_ran["common.ping"] == 60
    # No task was taken by a worker without its handler: nothing retried or dead-lettered.
    assert not events.of_kind("retrying") and not events.of_kind("dead")
    assert (await bus.js.stream_info(subjects.DLQ_STREAM)).state.messages == 0


async def test_a_task_of_a_type_no_worker_loads_waits_and_runs_when_its_worker_starts(settings, bus, events: EventLog):
    ran: Counter[str] = Counter()
    others = Worker(settings, bus, pool(ran, "billing.charge"), region=REGION, concurrency=4)
    async with running([*await routing(settings, bus), others]):
        await submit(bus, "orphan", "reports.build")
        await submit(bus, "after", "billing.charge")
        # The task submitted after it ran: the worker that cannot run the orphan never took it.
        await events.wait(lambda log: "succeeded" in log.kinds_of("after"), what="the billing task's success")
        waiting_on = subjects.work(REGION, "medium", "reports.build")
        info = await bus.js.stream_info(subjects.WORK_STREAM, subjects_filter=waiting_on)
        assert info.state.subjects == {waiting_on: 1}
        assert events.kinds_of("orphan") == ["submitted", "scheduled", "held"]
        (held,) = events.of_kind("held")
        assert held.reason == "no worker for type reports.build in region default"
        late = Worker(settings, bus, pool(ran, "reports.build"), region=REGION, concurrency=4)
        async with running([late]):
            await events.wait(lambda log: "succeeded" in log.kinds_of("orphan"), what="the orphan's success once its worker started")
    assert ran == Counter({"billing.charge": 1, "reports.build": 1})
    assert not events.of_kind("retrying") and not events.of_kind("dead")


async def test_a_worker_with_less_credit_than_levels_finds_the_level_with_a_backlog_in_one_request(settings, bus):
    types = [f"kind.t{i}" for i in range(12)]
    worker = Worker(settings, bus, pool(Counter(), *types), region=REGION, concurrency=1, prefetch=0)
    puller: Puller = worker.puller
    assert puller.capacity < len(puller.levels)  # one slot, 3 priorities x 12 types
    await streams.ensure_work_consumers(bus, settings, REGION, types)
    for level in puller.levels:
        level.hot = False
    assert not await puller.probe()
    await bus.js.publish(subjects.work(REGION, "low", "kind.t11"), b"{}", headers={subjects.H_TASK_ID: "x", subjects.H_TYPE: "kind.t11"})
    with anyio.fail_after(5):
        assert await puller.probe()
    assert [level.consumer for level in puller.levels if level.hot] == [subjects.work_consumer(REGION, "low", "kind.t11")]


def test_a_task_type_must_be_dotted_words_that_make_a_subject():
    assert subjects.is_type("emails.send") and subjects.is_type("a:b/c-d_e") and subjects.is_type("noop")
    for bad in ("", ".", "a..b", ".a", "a.", "a b", "a.*", "a.>", "x" * 201):
        assert not subjects.is_type(bad), bad
    with pytest.raises(ValueError, match="not valid"):
        task("a..b")
    # Consumer names take no dots or slashes, and two spellings never share one.
    names = {subjects.work_consumer(REGION, "high", t) for t in ("a.b", "a_b", "a/b", "a:b")}
    assert len(names) == 4 and not any("." in n or "/" in n for n in names)
