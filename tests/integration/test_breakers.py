"""Circuit breakers per task type and region: a failing type is held back on WORK (not run,
not failed, not dead-lettered) while other types flow, probes after the cool-down close it,
and an operator can force one open or closed."""

from __future__ import annotations

from typing import Any

import anyio
import msgspec
import pytest

from streamsched import subjects
from streamsched.client import Client
from streamsched.eventlog.state import StateStore
from streamsched.registry import Registry, TaskDef
from streamsched.roles.breakers import Breaker
from streamsched.roles.master import Master
from streamsched.roles.projector import Projector
from streamsched.roles.regional import Regional
from streamsched.roles.worker import Worker
from streamsched.testing import EventLog, running
from streamsched.transport.bus import Bus

pytestmark = pytest.mark.anyio

REGION = "default"
#: Whether the "flaky" handler fails (module level, so a test can mend it mid-run).
FLAKY_FAILS = {"now": True}


def handlers() -> Registry:
    async def flaky(payload: Any) -> Any:
        if FLAKY_FAILS["now"]:
            raise RuntimeError("downstream is down")
        return payload

    async def steady(payload: Any) -> Any:
        return payload

    return Registry([TaskDef("flaky", flaky), TaskDef("steady", steady)])


async def submit(bus: Bus, task_id: str, task_type: str, max_attempts: int = 50) -> None:
    body = {"id": task_id, "type": task_type, "payload": task_id, "max_attempts": max_attempts}
    await bus.js.publish(subjects.SUBMIT, msgspec.json.encode(body))


async def wait_breaker(client: Client, task_type: str, state: str, timeout_s: float = 15.0) -> Breaker:
    with anyio.fail_after(timeout_s):
        while True:
            for breaker in await client.breakers():
                if breaker.type == task_type and breaker.region == REGION and breaker.state == state:
                    return breaker
            await anyio.sleep(0.05)


async def roles(settings: Any, bus: Bus) -> list[Any]:
    worker = Worker(settings, bus, handlers(), region=REGION, concurrency=4)
    return [Master(settings, bus), Regional(settings, bus, REGION), Projector(settings, bus, await StateStore.open(bus)), worker]


async def test_a_failing_type_is_held_back_while_others_flow_and_resumes_after_a_probe(settings, bus, events: EventLog):
    FLAKY_FAILS["now"] = True
    fast = msgspec.structs.replace(settings, worker_heartbeat_s=0.2, breaker_failures_in_row=3, breaker_cooldown_s=2.0)
    client = Client(bus, await StateStore.open(bus), fast)
    async with running(await roles(fast, bus)):
        for i in range(3):
            await submit(bus, f"flaky-{i}", "flaky")
        opened = await wait_breaker(client, "flaky", "open")
        assert opened.failed >= 3 and "in a row" in opened.reason
        # While it is open: new flaky tasks wait on WORK, steady ones run.
        for i in range(5):
            await submit(bus, f"held-{i}", "flaky", max_attempts=1)  # one attempt: a run that failed would be dead
        for i in range(10):
            await submit(bus, f"steady-{i}", "steady")
        await events.wait(lambda log: all("succeeded" in log.kinds_of(f"steady-{i}") for i in range(10)), what="the steady tasks")
        assert (await wait_breaker(client, "flaky", "open")).since == opened.since
        for i in range(5):
            assert "started" not in events.kinds_of(f"held-{i}"), events.kinds_of(f"held-{i}")
        pending = 0
        for priority in fast.priorities:
            info = await bus.js.consumer_info(subjects.WORK_STREAM, subjects.work_consumer(REGION, priority, "flaky"))
            pending += info.num_pending or 0
            assert info.paused
        assert pending >= 5  # held on WORK, undelivered
        # Mended: after the cool-down a probe succeeds, the breaker closes, everything runs.
        FLAKY_FAILS["now"] = False
        await wait_breaker(client, "flaky", "closed", timeout_s=20)
        everything = [f"flaky-{i}" for i in range(3)] + [f"held-{i}" for i in range(5)]
        await events.wait(lambda log: all("succeeded" in log.kinds_of(t) for t in everything), timeout_s=20, what="the held tasks")
    assert not events.of_kind("dead") and not events.of_kind("failed")
    assert (await bus.js.stream_info(subjects.DLQ_STREAM)).state.messages == 0
    breaker = (await client.breakers())[0]
    states = [change.state for change in breaker.history]
    assert states[0] == "open" and states[-1] == "closed" and states[-2] == "half-open"  # a late failure may reopen it once more
    # The normal config is back on the durables.
    info = await bus.js.consumer_info(subjects.WORK_STREAM, subjects.work_consumer(REGION, "medium", "flaky"))
    assert info.config.max_ack_pending == fast.work_max_ack_pending and not info.paused


async def test_a_breaker_forced_open_holds_its_type_until_forced_closed(settings, bus, events: EventLog):
    fast = msgspec.structs.replace(settings, worker_heartbeat_s=0.2)
    client = Client(bus, await StateStore.open(bus), fast)
    started = await roles(fast, bus)
    keeper = started[0].breakers
    async with running(started):
        [forced] = await client.open_breaker("steady", region=REGION)
        assert forced.state == "open" and forced.forced and forced.until == 0
        await submit(bus, "held", "steady")
        await submit(bus, "after", "flaky")
        FLAKY_FAILS["now"] = False
        await events.wait(lambda log: "succeeded" in log.kinds_of("after"), what="the task of the other type")
        # The master's passes leave a forced breaker alone: three of them go by.
        ticks = keeper.ticks
        with anyio.fail_after(10):
            while keeper.ticks < ticks + 3:
                await anyio.sleep(0.02)
        assert "started" not in events.kinds_of("held")
        assert (await wait_breaker(client, "steady", "open")).forced
        [closed] = await client.close_breaker("steady", region=REGION)
        assert closed.state == "closed" and closed.forced
        await events.wait(lambda log: "succeeded" in log.kinds_of("held"), what="the held task")
