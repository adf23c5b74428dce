"""Idempotency keys: a second submission with a taken key stands for the first task, from
the client (which answers with the first task's handle) and from `nats pub` (the master
rejects it as a duplicate of the first task)."""

from __future__ import annotations

import pytest

from streamsched import subjects
from streamsched.client import Client
from streamsched.eventlog import events as ev
from streamsched.eventlog.state import StateStore
from streamsched.roles.idempotency import admits, claim, kv_key
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
    submitted = await bus.js.stream_info(subjects.TASKS_STREAM, subjects_filter=subjects.submit("medium"))
    assert submitted.state.subjects == {subjects.submit("medium"): 2}  # the repeat was never sent


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
        await bus.js.publish(subjects.SUBMIT, b'{"id":"p1","type":"echo","idempotency_key":"k1"}')  # a new submission
        await events.wait(lambda log: "rejected" in log.kinds_of("p1"), what="p1 submitted again is a duplicate")
    assert isinstance(p2, ev.Rejected) and p2.reason == "duplicate of task p1 (idempotency key 'k1')"
    assert isinstance(p3, ev.Rejected) and p3.reason == f"duplicate of task {handle.id} (idempotency key 'pay 7/€')"
    # The same id and key published again (a new submission, not a redelivery) is a duplicate too.
    assert events.kinds_of("p1").count("started") == 1
    assert {e.task_id for e in events.of_kind("started")} == {"p1", handle.id}


async def test_a_key_names_its_submission_so_a_redelivery_goes_on_and_a_resubmission_does_not(bus):
    first = await claim(bus, "k", "t1@7", 60)
    assert first.taken_now and first.holder == "t1" and admits(first, "t1", 7)
    redelivered = await claim(bus, "k", "t1@7", 60)  # the same submission, delivered again
    assert not redelivered.taken_now and admits(redelivered, "t1", 7)
    resubmitted = await claim(bus, "k", "t1@9", 60)  # the same id and key, submitted again
    assert resubmitted.holder == "t1" and not admits(resubmitted, "t1", 9)
    other = await claim(bus, "k", "t2@8", 60)
    assert other.holder == "t1" and not admits(other, "t2", 8)
    by_client = await claim(bus, "c", "t3", 60)  # a client takes it with the id alone
    assert admits(await claim(bus, "c", "t3@4", 60), "t3", 4) and by_client.holder == "t3"
    assert kv_key("a b") != kv_key("a_b") and kv_key("a_b") == "key.a_b"
