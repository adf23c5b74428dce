"""SCHED batches: the tasks a master routes in one loop tick to one subject share a
message, and the regional scheduler releases each of them onto WORK on its own."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from streamsched import subjects
from streamsched.roles import sched_batches
from streamsched.roles.master import Master
from streamsched.roles.sched_batches import TaskBatcher
from streamsched.testing import EventLog, all_roles, running, wait_drained
from streamsched.transport import wire
from streamsched.transport.bus import Bus

pytestmark = pytest.mark.anyio

MEDIUM = subjects.sched("default", "medium")


def sched_headers(task_id: str) -> bytes:
    """The header block a master gives a task on SCHED."""
    return (
        f"NATS/1.0\r\n{subjects.H_MSG_ID}: {subjects.msg_id(task_id, 'sched')}\r\n{subjects.H_TASK_ID}: {task_id}\r\n"
        f"{subjects.H_TYPE}: echo\r\n{subjects.H_PRIORITY}: medium\r\n{subjects.H_REGION}: default\r\n\r\n"
    ).encode()


def body(task_id: str) -> bytes:
    return json.dumps({"id": task_id, "type": "echo", "payload": task_id}).encode()


async def sched_messages(bus: Bus) -> list:
    """Every message still on SCHED, oldest first."""
    state = (await bus.js.stream_info(subjects.SCHED_STREAM)).state
    return [await bus.js.get_msg(subjects.SCHED_STREAM, seq) for seq in range(state.first_seq, state.last_seq + 1)] if state.messages else []


async def test_tasks_of_one_tick_share_a_message_and_a_lone_task_goes_as_itself(bus):
    batcher = TaskBatcher(bus)
    high = subjects.sched("default", "high")
    together = [batcher.add(MEDIUM, body(t), sched_headers(t)) for t in ("t1", "t2", "t3")]
    alone = batcher.add(high, body("h1"), sched_headers("h1"))
    assert len(set(together)) == 1 and alone is not together[0]
    later = batcher.add(MEDIUM, body("t4"), sched_headers("t4"))  # same tick: joins the batch
    assert later is together[0]
    await asyncio.wait_for(asyncio.gather(later, alone), timeout=5)
    next_tick = batcher.add(MEDIUM, body("t5"), sched_headers("t5"))
    await asyncio.wait_for(next_tick, timeout=5)

    batch, single, plain = await sched_messages(bus)
    assert batch.subject == MEDIUM and batch.headers[subjects.H_BATCH] == "4"
    assert batch.headers[subjects.H_MSG_ID].startswith("batch:")
    assert sched_batches.decode(batch.data) == [(sched_headers(t), body(t)) for t in ("t1", "t2", "t3", "t4")]
    for msg, task_id in ((single, "h1"), (plain, "t5")):  # exactly what a task alone always was
        assert msg.data == body(task_id) and subjects.H_BATCH not in msg.headers
        assert msg.headers[subjects.H_MSG_ID] == subjects.msg_id(task_id, "sched")
        assert msg.headers[subjects.H_TASK_ID] == task_id


async def test_a_full_batch_is_sealed_and_the_rest_goes_in_the_next(bus, monkeypatch):
    monkeypatch.setattr(sched_batches, "MAX_TASKS", 2)
    batcher = TaskBatcher(bus)
    recordings = [batcher.add(MEDIUM, body(f"t{i}"), sched_headers(f"t{i}")) for i in range(5)]
    await asyncio.wait_for(asyncio.gather(*set(recordings)), timeout=5)
    stored = await sched_messages(bus)
    assert [m.headers.get(subjects.H_BATCH) for m in stored] == ["2", "2", None]
    assert stored[2].headers[subjects.H_TASK_ID] == "t4"


async def test_a_burst_is_handed_over_in_batches_and_every_task_runs_once(settings, bus, events: EventLog, examples):
    task_ids = [f"burst-{n:03d}" for n in range(300)]
    failed, _ = await bus.publish_many((subjects.SUBMIT, body(t), None) for t in task_ids)
    assert failed == 0
    async with running([Master(settings, bus)]):  # the region is not reading yet: batches stay in SCHED
        await events.wait_count("scheduled", len(task_ids))
    stored = await sched_messages(bus)
    batches = [m for m in stored if subjects.H_BATCH in (m.headers or {})]
    assert batches, "a burst of 300 was handed over one message per task"
    assert len(stored) < len(task_ids)
    in_sched = [wire.header_value(headers, subjects.H_TASK_ID) for m in batches for headers, _ in sched_batches.decode(m.data)]
    in_sched += [m.headers[subjects.H_TASK_ID] for m in stored if m not in batches]
    assert sorted(in_sched) == task_ids  # every task handed over, once

    roles = await all_roles(settings, bus, examples, concurrency=32)
    async with running(roles[1:]):  # regional, projector, worker
        await events.wait_count("succeeded", len(task_ids), timeout_s=30)
        assert roles[1].released == len(task_ids)
    assert sorted(e.task_id for e in events.of_kind("started")) == task_ids  # each ran once
    # Released onto WORK once each: "held" where the regional got there before the worker registered.
    assert sorted(e.task_id for e in events.of_kind("dispatched") + events.of_kind("held")) == task_ids
    for stream in (subjects.SCHED_STREAM, subjects.WORK_STREAM):
        await wait_drained(bus, stream)


async def test_a_task_handed_over_twice_in_different_batches_runs_once(settings, bus, events: EventLog, examples):
    # As after a master crashed before acking its submissions: they come back and are
    # batched again, under another batch id, so SCHED keeps both copies; WORK drops the
    # second by the task's own msg id.
    twice = ["dup-1", "dup-2"]
    first, second = TaskBatcher(bus), TaskBatcher(bus)
    await asyncio.gather(*{first.add(MEDIUM, body(t), sched_headers(t)) for t in twice})
    await asyncio.gather(*{second.add(MEDIUM, body(t), sched_headers(t)) for t in [*twice, "new-1"]})
    assert len(await sched_messages(bus)) == 2

    async with running((await all_roles(settings, bus, examples))[1:]):
        await events.wait_count("succeeded", 3)
        # The second copies were released too ("held" where the regional got there before the worker)...
        await events.wait(lambda log: len(log.of_kind("dispatched")) + len(log.of_kind("held")) == 5, what="5 released onto WORK")
    assert sorted(e.task_id for e in events.of_kind("started")) == ["dup-1", "dup-2", "new-1"]  # ...and ran once
    await wait_drained(bus, subjects.WORK_STREAM)  # acks are settled by the server after the outcome events


async def test_an_unreadable_batch_or_a_task_without_an_id_is_dropped_and_the_rest_runs(settings, bus, events: EventLog, examples):
    # SCHED is written by masters only; what comes from elsewhere cannot be routed, and
    # TASKS still has every submission for inspection. The regional scheduler goes on.
    no_id = b"NATS/1.0\r\n\r\n"
    batch_of = f"NATS/1.0\r\n{subjects.H_MSG_ID}: %s\r\n{subjects.H_BATCH}: 2\r\n\r\n"
    for data, headers in [
        (b"not msgpack", (batch_of % "b1").encode()),
        (msgspec.msgpack.encode([(no_id, body("lost")), (sched_headers("ok-1"), body("ok-1"))]), (batch_of % "b2").encode()),
        (body("plain"), None),
        (body("ok-2"), sched_headers("ok-2")),
    ]:
        await (await bus.publish(MEDIUM, data, headers))

    roles = (await all_roles(settings, bus, examples))[1:]
    async with running(roles):
        await events.wait_count("succeeded", 2)
        await wait_drained(bus, subjects.SCHED_STREAM)  # the bad ones terminated
    assert sorted(e.task_id for e in events.of_kind("started")) == ["ok-1", "ok-2"]
    assert roles[0].released == 2
