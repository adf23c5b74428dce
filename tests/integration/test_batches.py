"""Batch submissions: `{"batch": [...]}` is checked whole and stored all or nothing
(JetStream's atomic batch publish), from `nats pub`, the client and `submit --file`."""

from __future__ import annotations

import msgspec
import pytest

from streamsched import subjects
from streamsched.client import Client
from streamsched.errors import Rejected
from streamsched.eventlog import events as ev
from streamsched.eventlog.state import StateStore
from streamsched.roles.batches import place_atomically
from streamsched.roles.placement import ReadyTask
from streamsched.testing import EventLog, all_roles, running, wait_drained

from .test_cli import cli

pytestmark = pytest.mark.anyio


def batch(*tasks: dict[str, object], batch_id: str | None = None) -> bytes:
    message: dict[str, object] = {"batch": list(tasks)}
    if batch_id is not None:
        message["id"] = batch_id
    return msgspec.json.encode(message)


async def test_a_batch_id_used_again_is_a_new_batch(settings, bus, events: EventLog, examples):
    async with running(await all_roles(settings, bus, examples)):
        await bus.js.publish(subjects.SUBMIT, batch({"id": "x1", "type": "echo", "payload": 1}, batch_id="nightly"))
        await events.wait_final("x1")
        await bus.js.publish(subjects.SUBMIT, batch({"id": "x2", "type": "echo", "payload": 2}, batch_id="nightly"))
        second = await events.wait_final("x2")
    assert isinstance(second, ev.Succeeded)  # stored and run, not taken for a redelivery of the first


async def test_a_batch_with_one_invalid_task_is_rejected_whole_naming_it(settings, bus, events: EventLog, examples):
    good = [{"id": f"g{i}", "type": "echo", "payload": i} for i in range(5)]
    async with running(await all_roles(settings, bus, examples)):
        await bus.js.publish(subjects.SUBMIT, batch(*good[:3], {"id": "bad", "type": "echo", "priority": "urgent"}, *good[3:], batch_id="b1"))
        rejected = await events.wait_final("b1")
        await bus.js.publish(subjects.SUBMIT, b'{"type":"echo","id":"after"}')  # the master moved on
        await events.wait_final("after")
    assert isinstance(rejected, ev.Rejected)
    assert rejected.reason == "batch rejected: task 3 (id 'bad') is invalid: unknown priority 'urgent' (expected one of high, medium, low)"
    assert not any(events.of_task(task["id"]) for task in good)  # no task of it was taken in
    assert (await bus.js.stream_info(subjects.SCHED_STREAM)).state.messages == 0


async def test_a_valid_batch_runs_every_task(settings, bus, events: EventLog, examples):
    tasks = [{"type": "echo", "payload": i, "priority": ("high", "low")[i % 2]} for i in range(300)]
    tasks.append({"id": "later", "type": "echo", "payload": "l", "delay_s": 1})
    async with running(await all_roles(settings, bus, examples)):
        await bus.js.publish(subjects.SUBMIT, batch(*tasks, batch_id="b2"))
        succeeded = await events.wait_count("succeeded", 301, timeout_s=20)
    ids = {e.task_id for e in succeeded}
    assert ids == {f"b2-{i}" for i in range(300)} | {"later"}
    assert events.kinds_of("later")[:3] == ["submitted", "waiting", "scheduled"]
    results = {e.task_id: msgspec.json.decode(e.result) for e in succeeded if isinstance(e, ev.Succeeded)}
    assert results["b2-7"] == 7


async def test_a_redelivered_batch_is_stored_once(settings, bus):
    tasks = [ReadyTask(id=f"r{i}", type="echo", priority=("high", "low")[i % 2], region="default", body=b"{}") for i in range(200)]
    await place_atomically(bus, tasks, "rb", now=0.0)
    stored = (await bus.js.stream_info(subjects.SCHED_STREAM, subjects_filter=">")).state
    assert stored.subjects == {"sched.default.high": 2, "sched.default.low": 2}  # 64 tasks a message at most
    await place_atomically(bus, tasks, "rb", now=0.0)  # the batch's messages are all duplicates: stored already
    assert (await bus.js.stream_info(subjects.SCHED_STREAM)).state.messages == 4


async def test_client_submit_many_atomic_checks_every_task_before_sending(settings, bus, events: EventLog, examples):
    client = Client(bus, await StateStore.open(bus), settings)
    with pytest.raises(Rejected, match=r"task 1 \(id 'x'\) is invalid: unknown region 'mars'"):
        await client.submit_many([{"type": "echo"}, {"type": "echo", "id": "x", "region": "mars"}], atomic=True)
    assert (await bus.js.stream_info(subjects.TASKS_STREAM)).state.messages == 0
    async with running(await all_roles(settings, bus, examples)):
        handles = await client.submit_many([{"type": "echo", "payload": i} for i in range(20)], atomic=True)
        assert [await h.result(timeout_s=10) for h in handles] == list(range(20))
    assert (await bus.js.stream_info(subjects.TASKS_STREAM)).state.messages == 1


async def test_submit_file_reports_bad_lines_first_and_submits_a_jsonl_file(settings, bus, events: EventLog, examples, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"type": "echo"}\nnot json\n{"type": "echo", "priorty": "high"}\n')
    refused = await cli(settings, "submit", "--file", str(bad), check=False)
    err = refused.stderr.decode()
    assert refused.returncode == 2 and "line 2:" in err and "line 3:" in err and "priorty" in err
    assert (await bus.js.stream_info(subjects.TASKS_STREAM)).state.messages == 0
    good = tmp_path / "tasks.jsonl"
    good.write_text("".join(f'{{"type": "echo", "id": "f{i}", "payload": {i}}}\n' for i in range(30)) + "\n")
    async with running(await all_roles(settings, bus, examples)):
        out = (await cli(settings, "submit", "--file", str(good), "--atomic")).stdout.decode()
        await events.wait_count("succeeded", 30)
        one_by_one = tmp_path / "more.jsonl"
        one_by_one.write_text('{"type": "echo", "payload": 1}\n{"type": "echo", "id": "m2"}\n')
        more = (await cli(settings, "submit", "--file", str(one_by_one))).stdout.decode().split()
        await events.wait_count("succeeded", 32)
        await wait_drained(bus, subjects.WORK_STREAM)
    assert out.split() == [f"f{i}" for i in range(30)]
    assert len(more) == 2 and more[1] == "m2"
    assert (await bus.js.stream_info(subjects.TASKS_STREAM)).state.messages == 3  # one batch, two tasks
