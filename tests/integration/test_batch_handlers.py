"""Batch handlers: one call for many tasks of a type, each task still recorded, acked and
retried on its own."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from streamsched import current_batch, subjects, task
from streamsched.client import Client
from streamsched.eventlog.state import StateStore
from streamsched.testing import EventLog, all_roles, running, wait_drained

pytestmark = pytest.mark.anyio

#: The payloads of each call, in order.
calls: list[list[int]] = []


@task("test.batch.double", batch_size=10, batch_wait_s=0.1)
async def double_all(payloads: list[int]) -> list[Any]:
    """Doubles each payload; 13 fails its first attempt alone (an exception in its place)."""
    calls.append(list(payloads))
    contexts = current_batch()
    assert len(contexts) == len(payloads)
    return [ValueError("unlucky") if p == 13 and ctx.attempt == 1 else p * 2 for p, ctx in zip(payloads, contexts, strict=True)]


@task("test.batch.broken", batch_size=5, batch_wait_s=0.05, max_attempts=2)
def broken(payloads: list[int]) -> list[int]:
    """A sync batch handler that raises: every task of the call is retried, then dead."""
    raise RuntimeError(f"down for {len(payloads)}")


async def test_a_burst_is_handled_in_batches_and_each_task_ends_with_its_own_result(settings, bus, events: EventLog, registry):
    calls.clear()
    client = Client(bus, await StateStore.open(bus))
    async with running(await all_roles(settings, bus, registry, concurrency=8)):
        handles = await client.submit_many({"type": "test.batch.double", "id": f"b{n}", "payload": n} for n in range(40))
        states = {h.id: await client.wait(h.id, timeout_s=20) for h in handles}
        await wait_drained(bus, subjects.WORK_STREAM)
    assert {s.status.value for s in states.values()} == {"succeeded"}
    assert {task_id: msgspec.json.decode(s.result) for task_id, s in states.items()} == {f"b{n}": 2 * n for n in range(40)}
    assert max(map(len, calls)) > 1, calls  # batches, not one task per call
    assert max(map(len, calls)) <= 8  # never more than the worker's slots (batch_size 10 > concurrency 8)
    assert sorted(p for call in calls for p in call) == sorted([*range(40), 13])  # 13 ran twice, the rest once
    assert events.kinds_of("b13").count("retrying") == 1 and states["b13"].attempts == 2
    assert all("retrying" not in events.kinds_of(f"b{n}") for n in range(40) if n != 13)


async def test_an_exception_raised_by_a_batch_handler_is_every_tasks_error(settings, bus, events: EventLog, registry):
    client = Client(bus, await StateStore.open(bus))
    async with running(await all_roles(settings, bus, registry)):
        handles = await client.submit_many({"type": "test.batch.broken", "id": f"x{n}", "payload": n} for n in range(4))
        states = [await client.wait(h.id, timeout_s=20) for h in handles]
    assert [s.status.value for s in states] == ["dead"] * 4
    assert all("RuntimeError: down for" in (s.error or "") for s in states)
    assert all(events.kinds_of(h.id).count("retrying") == 1 for h in handles)  # each retried on its own
