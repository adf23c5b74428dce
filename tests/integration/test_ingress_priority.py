"""Priority at the door: ``tasks.submit.<priority>`` beside plain ``tasks.submit``.

The master drains the priority subjects highest first, so a high task published behind a
burst of low ones is taken in ahead of them; plain ``tasks.submit`` keeps working as before;
a body that names another priority than its subject is rejected; a subject of a priority
that is not configured is refused by JetStream; and every intake path works on a priority
subject.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import msgspec
import pytest
from nats.js.errors import NoStreamResponseError

from streamsched import subjects, task
from streamsched.client import Client
from streamsched.eventlog import dlq
from streamsched.eventlog import events as ev
from streamsched.eventlog.state import StateStore
from streamsched.model import Status
from streamsched.roles.master import Master
from streamsched.roles.regional import Regional
from streamsched.testing import EventLog, all_roles, running
from streamsched.transport import streams
from streamsched.transport.bus import Bus

pytestmark = pytest.mark.anyio

#: Lows in the burst (as many as the check of this feature names), and the worker that runs them: 16 slots of 10 ms, so the burst takes
#: seconds to run. A high task that waited behind it in TASKS would start only once the master
#: had read all of it: measured 130-230 lows done by then, against none or 30 when it comes
#: in on its own subject (in one process, where the roles share the test's CPU).
BURST = 20_000
SLOTS = 16
LOW_S = 0.01


@task("test.ingress_nap")
async def ingress_nap(payload: dict[str, float]) -> None:
    await anyio.sleep(payload["seconds"])


def body(**fields: Any) -> bytes:
    return msgspec.json.encode(fields)


def of(events: EventLog, task_id: str, kind: str) -> list[ev.Event]:
    return [e for e in events.of_task(task_id) if ev.kind(e) == kind]


def lows_before(events: EventLog, kind: str, at: float) -> int:
    return sum(1 for e in events.of_kind(kind) if e.task_id.startswith("low-") and e.at <= at)


async def test_a_high_task_published_right_after_a_burst_of_lows_starts_before_1_percent_of_them_finished(settings, bus, events: EventLog, registry):
    lows = [body(id=f"low-{i}", type="test.ingress_nap", payload={"seconds": LOW_S}) for i in range(BURST)]
    async with running(await all_roles(settings, bus, registry, concurrency=SLOTS)):
        failed, _ = await bus.publish_many((subjects.submit("low"), data, None) for data in lows)
        assert failed == 0
        await bus.js.publish(subjects.submit("high"), body(id="the-high", type="echo"))
        published_at = time.time()
        await events.wait(lambda log: bool(of(log, "the-high", "started")), timeout_s=60, what="the high task's start")
    started, taken_in = of(events, "the-high", "started")[0].at, of(events, "the-high", "submitted")[0].at
    done = lows_before(events, "succeeded", started)
    assert done < BURST // 100, f"{done} of {BURST} lows had finished when the high task started"
    # The master took it in ahead of most of the lows still unread when it was published (in
    # arrival order: after all of them). How many it had read by then depends on how fast it
    # kept up with the publisher, so only the backlog left counts.
    unread = BURST - lows_before(events, "submitted", published_at)
    overtaken = lows_before(events, "submitted", taken_in) - (BURST - unread)
    # (The lows it had in hand when the high one came count as overtaking it: up to a window.)
    assert overtaken <= max(unread // 2, settings.master_window), f"{overtaken} of {unread} unread lows taken in first"
    # Neither body names a priority: each got its subject's.
    priorities = {e.task_id: e.priority for e in events.of_kind("submitted") if isinstance(e, ev.Submitted)}
    assert priorities.pop("the-high") == "high" and set(priorities.values()) == {"low"}


async def state_of(bus: Bus, task_id: str) -> Any:
    return await Client(bus, await StateStore.open(bus)).wait(task_id, timeout_s=15)


async def test_plain_submit_keeps_the_body_s_priority_and_a_priority_subject_gives_its_own(settings, bus, events: EventLog, examples):
    async with running(await all_roles(settings, bus, examples)):
        await bus.js.publish(subjects.SUBMIT, body(id="plain", type="echo"))
        await bus.js.publish(subjects.SUBMIT, body(id="plain-high", type="echo", priority="high"))
        await bus.js.publish(subjects.submit("low"), body(id="said-low", type="echo", priority="low"))
        await bus.js.publish(subjects.submit("high"), body(id="unsaid", type="echo"))
        # Dead at once, so its body is kept in DLQ as the worker had it.
        await bus.js.publish(subjects.submit("low"), body(id="dies", type="fail", max_attempts=1))
        priorities = {task_id: (await state_of(bus, task_id)).priority for task_id in ("plain", "plain-high", "said-low", "unsaid", "dies")}
    assert priorities == {"plain": "medium", "plain-high": "high", "said-low": "low", "unsaid": "high", "dies": "low"}
    assert [e.priority for e in of(events, "unsaid", "dispatched")] == ["high"]
    # The body handed on names the priority the subject gave it, so a re-drive keeps it.
    entry = await dlq.show(bus, "dies")
    assert entry is not None and msgspec.json.decode(entry.body)["priority"] == "low"


async def test_a_body_naming_another_priority_than_its_subject_is_rejected_naming_both(settings, bus, events: EventLog, examples):
    async with running(await all_roles(settings, bus, examples)):
        await bus.js.publish(subjects.submit("high"), body(id="two-minds", type="echo", priority="low"))
        # A body that names the default priority names it all the same.
        await bus.js.publish(subjects.submit("low"), body(id="said-medium", type="echo", priority="medium"))
        states = [await state_of(bus, task_id) for task_id in ("two-minds", "said-medium")]
    assert [s.status for s in states] == [Status.REJECTED, Status.REJECTED]
    assert states[0].error == "priority 'low' in the body does not match subject tasks.submit.high (priority 'high'): name one, or the same in both"
    assert "'medium'" in states[1].error and "tasks.submit.low" in states[1].error
    assert not events.of_kind("started")


async def test_a_subject_of_an_unknown_priority_is_refused_and_the_client_sends_that_priority_plain(settings, bus, events: EventLog, examples):
    with pytest.raises(NoStreamResponseError):  # no stream takes it: nothing waits unread
        await bus.js.publish(subjects.submit("urgent"), body(type="echo"))
    client = Client(bus, await StateStore.open(bus), settings)
    async with running(await all_roles(settings, bus, examples)):
        handle = await client.submit("echo", priority="urgent")  # sent on tasks.submit: the master says why not
        state = await client.wait(handle.id, timeout_s=15)
    assert state.status is Status.REJECTED and "unknown priority 'urgent'" in (state.error or "")
    tasks = await bus.js.stream_info(subjects.TASKS_STREAM, subjects_filter=">")
    assert set(tasks.state.subjects or {}) == {subjects.SUBMIT, subjects.REJECTED}


async def test_dependencies_workflows_batches_and_delays_work_on_a_priority_subject(settings, bus, events: EventLog, examples):
    workflow = {"workflow": {"id": "wf", "tasks": [{"id": "a", "type": "echo"}, {"id": "b", "type": "echo", "depends_on": ["a"]}]}}
    mixed = {"workflow": {"id": "wf-mixed", "tasks": [{"id": "a", "type": "echo"}, {"id": "b", "type": "echo", "priority": "low"}]}}
    async with running(await all_roles(settings, bus, examples)):
        await bus.js.publish(subjects.submit("low"), body(id="after", type="echo", depends_on=["first"]))
        await bus.js.publish(subjects.submit("low"), body(id="first", type="echo", delay_s=0.5))
        await bus.js.publish(subjects.submit("high"), msgspec.json.encode(workflow))
        await bus.js.publish(subjects.submit("high"), msgspec.json.encode(mixed))
        batch = {"id": "bt", "batch": [{"type": "echo"}, {"type": "echo", "priority": "high"}]}
        await bus.js.publish(subjects.submit("high"), msgspec.json.encode(batch))
        await bus.js.publish(subjects.submit("low"), body(id="keyed", type="echo", idempotency_key="k-low"))
        done = {task_id: await state_of(bus, task_id) for task_id in ("after", "first", "wf-a", "wf-b", "bt-0", "bt-1", "keyed")}
        refused = await state_of(bus, "wf-mixed")
    assert {task_id: (s.status, s.priority) for task_id, s in done.items()} == {
        "after": (Status.SUCCEEDED, "low"),
        "first": (Status.SUCCEEDED, "low"),
        "wf-a": (Status.SUCCEEDED, "high"),
        "wf-b": (Status.SUCCEEDED, "high"),
        "bt-0": (Status.SUCCEEDED, "high"),
        "bt-1": (Status.SUCCEEDED, "high"),
        "keyed": (Status.SUCCEEDED, "low"),
    }
    assert [e.priority for e in of(events, "after", "scheduled")] == ["low"]  # released by its dependency
    assert [e.priority for e in of(events, "first", "scheduled")] == ["low"]  # fired after its delay
    assert refused.status is Status.REJECTED and "task b" in (refused.error or "") and "tasks.submit.high" in (refused.error or "")


async def test_streams_apply_gives_an_existing_tasks_stream_the_priority_subjects_in_place(settings, bus):
    # A deployment from before the priority subjects: TASKS with plain tasks.submit only.
    old = (await bus.js.stream_info(subjects.TASKS_STREAM)).config
    old.subjects = [subjects.SUBMIT, subjects.REJECTED, subjects.CANCEL]
    for priority in settings.priorities:
        await bus.js.delete_consumer(subjects.TASKS_STREAM, subjects.master_consumer(priority))
    await bus.js.update_stream(old)
    await bus.js.publish(subjects.SUBMIT, body(id="waiting", type="echo"))

    changes = {c.name: c for c in await streams.apply(bus, settings)}
    assert (changes["TASKS"].action, changes["TASKS"].detail) == ("updated", "subjects")
    assert changes["TASKS/master-high"].action == "created" and changes["TASKS/master"].action == "unchanged"
    await bus.js.publish(subjects.submit("high"), body(id="now-high", type="echo"))
    async with running([Master(settings, bus), Regional(settings, bus, "default")]):

        async def both_on_work() -> bool:
            return (await bus.js.stream_info(subjects.WORK_STREAM)).state.messages == 2

        with anyio.fail_after(10):
            while not await both_on_work():
                await anyio.sleep(0.02)
    work = await bus.js.stream_info(subjects.WORK_STREAM, subjects_filter=">")
    assert work.state.subjects == {subjects.work("default", "medium", "echo"): 1, subjects.work("default", "high", "echo"): 1}
