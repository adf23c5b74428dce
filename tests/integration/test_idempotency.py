"""Idempotency keys: a second submission with a taken key stands for the first task, from
the client (which answers with the first task's handle) and from `nats pub` (the master
rejects it as a duplicate of the first task)."""

from __future__ import annotations

import pytest

from streamsched import subjects
from streamsched.client import Client
from streamsched.eventlog import events as ev
from streamsched.eventlog.state import StateStore
from streamsched.roles.idempotency import claim, kv_key
from streamsched.testing import EventLog, all_roles, running

pytestmark = pytest.mark.anyio


async def test_the_client_gets_the_first_task_for_a_taken_key_and_only_it_runs(settings, bus, events: EventLog, examples):
    client = Client(bus, await StateStore.open(bus), settings)
    async with running(await all_roles(settings, bus, examples)):
        first = await client.submit("echo", 1, idempotency_key="order-42")
        again = await client.submit("echo", 2, idempotency_key="order-42")
        other = await client.submit("echo", 3, idempotency_key="order-43")
        assert again.id == first.id != other.id
        assert await first.result(timeout_s=10) == 1
        assert await other.result(timeout_s=10) == 3
    assert len(events.of_kind("started")) == 2
    submitted = await bus.js.stream_info(subjects.TASKS_STREAM, subjects_filter=subjects.SUBMIT)
    assert submitted.state.subjects == {subjects.SUBMIT: 2}  # the repeat was never sent


async def test_the_master_rejects_a_raw_duplicate_naming_the_first_task(settings, bus, events: EventLog, examples):
    client = Client(bus, await StateStore.open(bus), settings)
    async with running(await all_roles(settings, bus, examples)):
        handle = await client.submit("echo", "c", idempotency_key="pay 7/€")  # hashed: not a valid KV key
        await bus.js.publish(subjects.SUBMIT, b'{"id":"p1","type":"echo","idempotency_key":"k1"}')
        await events.wait_final("p1")
        await bus.js.publish(subjects.SUBMIT, b'{"id":"p2","type":"echo","idempotency_key":"k1"}')
        await bus.js.publish(subjects.SUBMIT, '{"id":"p3","type":"echo","idempotency_key":"pay 7/€"}'.encode())
        p2, p3 = await events.wait_final("p2"), await events.wait_final("p3")
        await events.wait_final(handle.id)
    assert isinstance(p2, ev.Rejected) and p2.reason == "duplicate of task p1 (idempotency key 'k1')"
    assert isinstance(p3, ev.Rejected) and p3.reason == f"duplicate of task {handle.id} (idempotency key 'pay 7/€')"
    assert {e.task_id for e in events.of_kind("started")} == {"p1", handle.id}


async def test_a_key_taken_again_by_its_own_task_still_names_it(bus):
    # A redelivered submission takes its key again: it must not count as its own duplicate.
    assert await claim(bus, "k", "t1", 60) == "t1"
    assert await claim(bus, "k", "t1", 60) == "t1"
    assert await claim(bus, "k", "t2", 60) == "t1"
    assert kv_key("a b") != kv_key("a_b") and kv_key("a_b") == "key.a_b"
