"""Cancellation: delayed, queued and running tasks (async and sync handlers) end `cancelled`
with the reason and never run (on); a finished task is left alone."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import anyio
import msgspec
import pytest

from streamsched import current_task, subjects, task
from streamsched.client import Client
from streamsched.errors import AlreadyFinished, NotFound
from streamsched.eventlog import events as ev
from streamsched.eventlog.state import StateStore
from streamsched.model import Status
from streamsched.roles.cancels import CancelWatch
from streamsched.roles.placement import ReadyTask, place
from streamsched.roles.worker import Worker
from streamsched.testing import EventLog, all_roles, running, wait_drained
from streamsched.transport.bus import Bus

pytestmark = pytest.mark.anyio

#: What the handlers below saw, by task id.
seen: dict[str, list[str]] = {}


@task("test.cancel.async")
async def long_async(payload: Any) -> None:
    """Waits (up to 30 s) to be cancelled, and notes that its cleanup ran."""
    task_id = current_task().id
    seen.setdefault(task_id, []).append("started")
    try:
        await asyncio.sleep(30)
    except asyncio.CancelledError:
        seen[task_id].append("cleanup")
        raise


@task("test.cancel.sync")
def long_sync(payload: Any) -> str:
    """Works in small steps until it sees the cancel flag (up to 30 s)."""
    context = current_task()
    seen.setdefault(context.id, []).append("started")
    deadline = time.monotonic() + 30
    while not context.cancelled and time.monotonic() < deadline:
        time.sleep(0.01)
    seen[context.id].append("saw the flag" if context.cancelled else "gave up")
    return "stopped early"


async def client_of(bus: Bus) -> Client:
    return Client(bus, await StateStore.open(bus))


async def submit(bus: Bus, **fields: Any) -> None:
    await bus.js.publish(subjects.SUBMIT, msgspec.json.encode(fields))


async def wait_status(client: Client, task_id: str, status: Status, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while (state := await client.get(task_id)) is None or state.status is not status:
        assert time.monotonic() < deadline, f"task {task_id} is {state and state.status.value}, not {status.value}"
        await anyio.sleep(0.05)


async def wait_cancel_stored(bus: Bus, task_id: str) -> None:
    """Until the canceller has written the task's id to KV `cancels`."""
    kv = await bus.js.key_value(subjects.CANCELS_BUCKET)
    deadline = time.monotonic() + 10
    while True:
        try:
            await kv.get(task_id)
            return
        except Exception:  # noqa: BLE001 - not there yet
            assert time.monotonic() < deadline, f"no cancel of {task_id} in KV"
            await anyio.sleep(0.05)


def cancelled_event(events: EventLog, task_id: str) -> ev.Cancelled:
    found = [e for e in events.of_task(task_id) if isinstance(e, ev.Cancelled)]
    assert found, f"no cancelled event for {task_id}: {events.kinds_of(task_id)}"
    return found[0]


async def test_a_cancelled_delayed_task_loses_its_schedule_and_never_fires(settings, bus, events: EventLog, registry):
    master, regional, projector, worker = await all_roles(settings, bus, registry)
    client = await client_of(bus)
    now = time.time()
    run_at = now + 2.0
    await place(bus, [ReadyTask(id="later", type="echo", priority="medium", region="default", body=b'{"type":"echo"}', run_at=run_at)], now=now)
    submitted = ev.Submitted(task_id="later", at=now, type="echo", priority="medium", region="default")
    await bus.js.publish(*ev.message([submitted, ev.Waiting(task_id="later", at=now, region="default", until=run_at)], "test"))
    async with running([master, regional, projector, worker]):
        await wait_status(client, "later", Status.WAITING)
        before = await client.cancel("later", reason="not needed any more")
        assert before.status is Status.WAITING
        await events.wait_final("later")
        assert cancelled_event(events, "later").reason == "not needed any more"
        await wait_drained(bus, subjects.TIMERS_STREAM)  # the schedule is purged once the event landed
        await anyio.sleep(max(0.0, run_at + 1.0 - time.time()))  # past its time: nothing fired
        assert (await bus.js.stream_info(subjects.TIMERS_STREAM)).state.messages == 0
        assert "started" not in events.kinds_of("later")
        state = await client.wait("later", timeout_s=5)
    assert (state.status, state.error) == (Status.CANCELLED, "not needed any more")


async def test_a_task_waiting_for_dependencies_is_cancelled_with_its_dependants_and_stays_so(settings, bus, events: EventLog, registry):
    client = await client_of(bus)
    async with running(await all_roles(settings, bus, registry)):
        await submit(bus, id="waiter", type="echo", payload=1, depends_on=["first"])
        await submit(bus, id="after-waiter", type="echo", payload=2, depends_on=["waiter"])
        await wait_status(client, "after-waiter", Status.WAITING)
        await client.cancel("waiter", reason="plan changed")
        await events.wait_final("after-waiter")
        record = msgspec.json.decode((await (await bus.js.key_value(subjects.WAITING_BUCKET)).get("waiter")).value)
        assert (record["state"], record["reason"], record.get("acted")) == ("cancelled", "plan changed", True)  # marked, not deleted
        await submit(bus, id="waiter", type="echo", payload=1, depends_on=["first"])  # a redelivered submission
        await submit(bus, id="first", type="echo", payload=0)  # the dependency comes after all
        await client.wait("first", timeout_s=10)
        await events.wait(lambda log: log.kinds_of("waiter").count("submitted") == 2, what="the second submission of waiter")
        await wait_drained(bus, subjects.SCHED_STREAM)
        await wait_drained(bus, subjects.WORK_STREAM)
        state = await client.get("waiter")
        after = await client.get("after-waiter")
    assert cancelled_event(events, "waiter").reason == "plan changed"
    assert cancelled_event(events, "after-waiter").reason == "dependency waiter ended cancelled"
    assert not {"scheduled", "started"} & set(events.kinds_of("waiter") + events.kinds_of("after-waiter"))
    assert state is not None and (state.status, state.error) == (Status.CANCELLED, "plan changed")
    assert after is not None and after.status is Status.CANCELLED


async def test_cancelling_a_workflow_cancels_its_running_and_waiting_tasks_and_the_workflow_ends_cancelled(settings, bus, events: EventLog, registry):
    client = await client_of(bus)
    spec = {
        "id": "wf-stop",
        "tasks": [
            {"id": "long", "type": "test.cancel.async"},
            {"id": "next", "type": "echo", "depends_on": ["long"]},
            {"id": "last", "type": "echo", "depends_on": ["next"]},
            {"id": "anyway", "type": "echo", "depends_on": ["long"], "on_dependency_failure": "run"},
        ],
    }
    waiting = ["wf-stop-next", "wf-stop-last", "wf-stop-anyway"]
    from .test_cli import cli

    async with running(await all_roles(settings, bus, registry)):
        await client.submit_workflow(spec)
        await wait_status(client, "wf-stop-long", Status.RUNNING)
        for task_id in waiting:
            await wait_status(client, task_id, Status.WAITING)
        result = await cli(settings, "cancel", "wf-stop", "--reason", "stop it all", "--wait", "--timeout", "20", check=False)
        await wait_drained(bus, subjects.SCHED_STREAM)
        await wait_drained(bus, subjects.WORK_STREAM)
        state = await client.get_workflow("wf-stop")
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert lines[0] == "cancel requested for workflow wf-stop (it was running)"
    assert msgspec.json.decode(lines[1])["status"] == "cancelled"
    assert state is not None and state.status == "cancelled" and state.counts == {"cancelled": 4}
    assert seen["wf-stop-long"] == ["started", "cleanup"]
    assert cancelled_event(events, "wf-stop-long").reason == "stop it all"
    for task_id in waiting:
        assert isinstance(await events.wait_final(task_id), ev.Cancelled)
        assert "started" not in events.kinds_of(task_id), task_id


async def test_a_task_cancelled_on_sched_is_cancelled_at_once_and_skipped_by_the_regional_scheduler(settings, bus, events: EventLog, registry):
    master, regional, projector, worker = await all_roles(settings, bus, registry)
    client = await client_of(bus)
    async with running([master, projector]):  # no regional scheduler yet: the task waits on SCHED
        await submit(bus, id="in-sched", type="echo", payload=1)
        await wait_status(client, "in-sched", Status.PENDING)
        await client.cancel("in-sched", reason="changed my mind")
        await wait_status(client, "in-sched", Status.CANCELLED)  # at once, by the canceller
        async with running([regional, worker]):
            await events.wait(lambda log: log.kinds_of("in-sched").count("cancelled") == 2, what="the regional scheduler's cancelled")
            await wait_drained(bus, subjects.SCHED_STREAM)
        state = await client.get("in-sched")
    cancelled = cancelled_event(events, "in-sched")
    assert (cancelled.reason, cancelled.attempt, cancelled.worker) == ("changed my mind", 0, "")
    assert not {"dispatched", "started"} & set(events.kinds_of("in-sched"))
    assert state is not None and (state.status, state.error) == (Status.CANCELLED, "changed my mind")


async def test_a_task_cancelled_on_work_is_cancelled_at_once_and_never_starts_on_a_later_worker(settings, bus, events: EventLog, registry):
    master, regional, projector, worker = await all_roles(settings, bus, registry)
    client = await client_of(bus)
    async with running([master, regional, projector]):  # no worker: the task waits on WORK
        await submit(bus, id="queued", type="echo", payload=1)
        await events.wait(lambda log: "held" in log.kinds_of("queued"), what="queued held (no worker for echo)")
        await wait_status(client, "queued", Status.WAITING)
        await client.cancel("queued", reason="too late")
        await wait_status(client, "queued", Status.CANCELLED)  # at once, with no worker
        async with running([worker]):
            await events.wait(lambda log: log.kinds_of("queued").count("cancelled") == 2, what="the worker's cancelled")
            await wait_drained(bus, subjects.WORK_STREAM)  # termed off WORK, not left for ack_wait
        state = await client.wait("queued", timeout_s=5)
    assert cancelled_event(events, "queued").reason == "too late"
    assert "started" not in events.kinds_of("queued")
    assert (state.status, state.error) == (Status.CANCELLED, "too late")
    assert worker.counts["cancelled"] == 1 and worker.counts["succeeded"] == 0


async def test_a_running_async_handler_is_cancelled_and_may_clean_up(settings, bus, events: EventLog, registry):
    client = await client_of(bus)
    async with running(await all_roles(settings, bus, registry)):
        await submit(bus, id="async-run", type="test.cancel.async", max_attempts=3)
        await wait_status(client, "async-run", Status.RUNNING)
        await client.cancel("async-run", reason="user pressed stop")
        await events.wait_final("async-run")
        state = await client.wait("async-run", timeout_s=5)
        await wait_drained(bus, subjects.WORK_STREAM)
    assert seen["async-run"] == ["started", "cleanup"]
    assert "retrying" not in events.kinds_of("async-run")
    assert cancelled_event(events, "async-run").attempt == 1
    assert (state.status, state.error) == (Status.CANCELLED, "user pressed stop")


async def test_a_running_sync_handler_sees_the_flag_and_its_task_ends_cancelled(settings, bus, events: EventLog, registry):
    client = await client_of(bus)
    async with running(await all_roles(settings, bus, registry)):
        await submit(bus, id="sync-run", type="test.cancel.sync")
        await wait_status(client, "sync-run", Status.RUNNING)
        await client.cancel("sync-run", reason="enough")
        await events.wait_final("sync-run")
        state = await client.wait("sync-run", timeout_s=5)
    assert seen["sync-run"] == ["started", "saw the flag"]
    assert (state.status, state.error) == (Status.CANCELLED, "enough")
    assert msgspec.json.decode(state.result) == "stopped early"  # what it returned after the cancel is kept


async def test_a_delayed_task_cancelled_right_after_submit_is_cancelled_and_never_starts(settings, bus, events: EventLog, registry):
    client = await client_of(bus)
    async with running(await all_roles(settings, bus, registry)):
        handle = await client.submit("echo", 1, delay_s=2.0)
        before = await client.cancel(handle.id, reason="right away")  # no state yet: it waits for one
        state = await client.wait(handle.id, timeout_s=10)
        await anyio.sleep(max(0.0, before.submitted_at + 3.0 - time.time()))  # past its time: nothing fired
        await wait_drained(bus, subjects.TIMERS_STREAM)
    assert before.status is Status.WAITING
    assert (state.status, state.error) == (Status.CANCELLED, "right away")
    assert not {"scheduled", "dispatched", "started"} & set(events.kinds_of(handle.id))


async def test_cancelling_a_finished_or_unknown_task_changes_nothing(settings, bus, events: EventLog, registry):
    client = await client_of(bus)
    async with running(await all_roles(settings, bus, registry)):
        await submit(bus, id="done", type="echo", payload="x")
        await client.wait("done", timeout_s=10)
        with pytest.raises(AlreadyFinished, match="task done already succeeded") as caught:
            await client.cancel("done", reason="too late")
        assert caught.value.status == "succeeded"
        with pytest.raises(NotFound, match="no task ghost"):
            await client.cancel("ghost")
        state = await client.get("done")
    assert state is not None and state.status is Status.SUCCEEDED
    assert "cancelled" not in events.kinds_of("done")
    requests = (await bus.js.stream_info(subjects.TASKS_STREAM, subjects_filter=subjects.CANCEL)).state.subjects
    assert not requests  # nothing was even asked


async def test_the_watch_loads_earlier_cancels_and_forgets_the_oldest_past_its_limit(bus):
    kv = await bus.js.key_value(subjects.CANCELS_BUCKET)
    for n in range(3):
        await kv.put(f"old-{n}", b'{"reason":"r%d"}' % n)
    new: list[str] = []
    watch = CancelWatch(bus, lambda task_id, _reason: new.append(task_id), limit=3)
    await watch.start()
    try:
        assert watch.ids == {"old-0": "r0", "old-1": "r1", "old-2": "r2"} and new == []  # loaded, not announced
        await kv.put("fresh", b'{"reason":"now"}')
        with anyio.fail_after(5):
            while "fresh" not in watch.ids:
                await anyio.sleep(0.02)
        assert new == ["fresh"] and list(watch.ids) == ["old-1", "old-2", "fresh"]
        await kv.delete("old-2")
        with anyio.fail_after(5):
            while "old-2" in watch.ids:
                await anyio.sleep(0.02)
    finally:
        await watch.stop()


async def test_the_cancel_command_says_what_happened_with_its_exit_code(settings, bus, registry):
    from .test_cli import cli

    client = await client_of(bus)
    master, regional, projector, worker = await all_roles(settings, bus, registry)
    async with running([master, regional, projector]):
        await submit(bus, id="cli-done", type="echo", payload=1)
        await submit(bus, id="cli-queued", type="echo", payload=2)
        async with running([worker]):
            await client.wait("cli-done", timeout_s=10)
            await client.wait("cli-queued", timeout_s=10)
        await submit(bus, id="cli-later", type="echo", payload=3)
        await wait_status(client, "cli-later", Status.WAITING)  # held on WORK: no worker for echo
        finished = await cli(settings, "cancel", "cli-done", check=False)
        unknown = await cli(settings, "cancel", "nobody", check=False)
        requested = cli(settings, "cancel", "cli-later", "--reason", "from the shell", "--wait", "--timeout", "20", check=False)
        async with anyio.create_task_group() as tg:
            results: list[Any] = []

            async def cancel_and_keep() -> None:
                results.append(await requested)

            tg.start_soon(cancel_and_keep)
            await wait_cancel_stored(bus, "cli-later")
            async with running([Worker(settings, bus, registry, region="default", concurrency=2)]):
                with anyio.fail_after(20):
                    while not results:
                        await anyio.sleep(0.05)
    assert (finished.returncode, finished.stderr.decode().strip()) == (6, "task cli-done already succeeded: nothing to cancel")
    assert (unknown.returncode, unknown.stderr.decode().strip()) == (3, "error: no task nobody")
    assert results[0].returncode == 0, results[0].stderr.decode()
    lines = results[0].stdout.decode().splitlines()
    assert lines[0] == "cancel requested for cli-later (it was waiting)"
    final = msgspec.json.decode(lines[1])
    assert (final["status"], final["error"]) == ("cancelled", "from the shell")
