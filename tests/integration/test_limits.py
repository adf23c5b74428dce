"""Concurrency keys, rate limits and fair shares, enforced across two regional schedulers and
two workers: a key of 3 never has 4 running, a rate limit holds within 10 %, a tenant's
trickle is not held back by another tenant's flood, and a task held back by its limits uses
no worker slot and no attempt."""

from __future__ import annotations

import time
from typing import Any

import anyio
import msgspec
import pytest

from streamsched import subjects
from streamsched.client import Client
from streamsched.eventlog import events as ev
from streamsched.eventlog.state import StateStore
from streamsched.model import Status
from streamsched.registry import Registry, TaskDef
from streamsched.roles import limits
from streamsched.roles.admission import Admission
from streamsched.roles.limits import SlotValue
from streamsched.roles.master import Master
from streamsched.roles.projector import Projector
from streamsched.roles.regional import Regional
from streamsched.roles.worker import Worker
from streamsched.testing import EventLog, running
from streamsched.transport.bus import Bus
from streamsched.transport.kv_watch import bucket_values

pytestmark = pytest.mark.anyio

REGION = "default"


class Gauge:
    """How many handlers run at once, by key, and the most seen."""

    def __init__(self) -> None:
        self.now: dict[str, int] = {}
        self.most: dict[str, int] = {}

    def handlers(self, nap_s: float) -> Registry:
        async def keyed(payload: Any) -> Any:
            key = payload["key"]
            self.now[key] = self.now.get(key, 0) + 1
            self.most[key] = max(self.most.get(key, 0), self.now[key])
            try:
                await anyio.sleep(nap_s)
            finally:
                self.now[key] -= 1
            return payload

        async def plain(payload: Any) -> Any:
            return payload

        return Registry([TaskDef("test.keyed", keyed), TaskDef("test.plain", plain), TaskDef("test.rated", plain)])


async def cluster(settings: Any, bus: Bus, registry: Registry, concurrency: int = 8) -> list[Any]:
    """A master, two regional schedulers of one region, a projector and two workers."""
    workers = [Worker(settings, bus, registry, region=REGION, concurrency=concurrency) for _ in range(2)]
    schedulers = [Regional(settings, bus, REGION) for _ in range(2)]
    return [Master(settings, bus), *schedulers, Projector(settings, bus, await StateStore.open(bus)), *workers]


async def publish(bus: Bus, **task: Any) -> None:
    await bus.js.publish(subjects.SUBMIT, msgspec.json.encode(task))


def of(events: EventLog, kind: str, prefix: str) -> list[ev.Event]:
    return [e for e in events.of_kind(kind) if e.task_id.startswith(prefix)]


async def test_a_concurrency_key_of_3_never_has_4_running_and_its_waiting_tasks_use_no_slot_or_attempt(settings, bus, events: EventLog):
    settings = msgspec.structs.replace(settings, concurrency_limits={"tenant-a": 3})
    gauge = Gauge()
    async with running(await cluster(settings, bus, gauge.handlers(nap_s=0.05))):
        for i in range(40):
            await publish(bus, id=f"a-{i}", type="test.keyed", payload={"key": "tenant-a"}, concurrency_key="tenant-a")
        # A key with its own limit, in the body.
        for i in range(10):
            await publish(bus, id=f"b-{i}", type="test.keyed", payload={"key": "b"}, concurrency_key="b", concurrency_limit=1)
        # Plain tasks sent after them run at once beside them: the keyed ones waiting hold no slot.
        for i in range(30):
            await publish(bus, id=f"plain-{i}", type="test.plain")
        await events.wait(lambda log: len(of(log, "succeeded", "plain-")) == 30, timeout_s=30, what="the plain tasks")
        assert len(of(events, "succeeded", "a-")) < 40  # the key's tasks are still going
        await events.wait(lambda log: len(of(log, "succeeded", "a-")) + len(of(log, "succeeded", "b-")) == 50, timeout_s=60, what="the keyed tasks")
        waited = await Client(bus, await StateStore.open(bus), settings).wait("a-39", timeout_s=10)
    assert gauge.most == {"tenant-a": 3, "b": 1}
    # Each ran in its first attempt: waiting for its slot used none.
    assert {e.attempt for e in [*of(events, "started", "a-"), *of(events, "started", "b-")]} == {1}
    assert not of(events, "retrying", "a-") and not of(events, "dead", "")
    # Each keyed task was parked with the reason, then admitted.
    held = [e for e in of(events, "held", "a-") if isinstance(e, ev.Held)]
    assert len(held) == 40 and "concurrency key 'tenant-a' (at most 3 at once)" in held[0].reason
    assert len(of(events, "dispatched", "a-")) == 40
    assert waited.status is Status.SUCCEEDED and waited.waiting_reason is None
    # Every slot was given back (the workers free them as the outcomes land).
    with anyio.fail_after(5):
        while [key for key in await bucket_values(bus, subjects.LIMITS_BUCKET) if key.startswith("c.")]:
            await anyio.sleep(0.02)


async def test_a_rate_limit_holds_within_10_percent_across_two_schedulers(settings, bus, events: EventLog):
    settings = msgspec.structs.replace(settings, rate_limits={"test.rated": 20.0, "slow-api": 5.0})
    gauge = Gauge()
    async with running(await cluster(settings, bus, gauge.handlers(nap_s=0))):
        for i in range(80):
            await publish(bus, id=f"r-{i}", type="test.rated")
        # A rate key puts a task of another type under that limit.
        for i in range(4):
            await publish(bus, id=f"k-{i}", type="test.plain", rate_key="slow-api")
        await publish(bus, id="free", type="test.plain")
        await events.wait(lambda log: len(of(log, "started", "r-")) + len(of(log, "started", "k-")) == 84, timeout_s=30, what="the rated tasks")
    starts = sorted(e.at for e in of(events, "started", "r-"))
    # The bucket holds a tenth of a second's worth (2 tokens): the first ones go at once.
    rate = (len(starts) - 3) / (starts[-1] - starts[2])
    assert 18.0 <= rate <= 22.0, f"{rate:.1f} tasks/s against a limit of 20"
    keyed = sorted(e.at for e in of(events, "started", "k-"))
    assert keyed[-1] - keyed[0] >= 3 / 5 * 0.9  # four at 5/s, the first at once
    assert of(events, "started", "free")[0].at < starts[20]  # a type without a limit is not held back


async def test_a_tenant_s_trickle_is_not_held_back_by_another_tenant_s_flood(settings, bus, events: EventLog):
    settings = msgspec.structs.replace(settings, fairness_window=8)
    gauge = Gauge()
    flood = 800  # 8 slots of 20 ms run it in 2 s: the trickle's way through the roles takes a fraction of that
    async with running(await cluster(settings, bus, gauge.handlers(nap_s=0.02), concurrency=4)):
        flooding = ({"id": f"a-{i}", "type": "test.keyed", "payload": {"key": "a"}, "fairness_key": "tenant-a"} for i in range(flood))
        bodies = (msgspec.json.encode(task) for task in flooding)
        failed, _ = await bus.publish_many((subjects.SUBMIT, body, None) for body in bodies)
        assert failed == 0
        for i in range(3):
            await publish(bus, id=f"b-{i}", type="test.keyed", payload={"key": "b"}, fairness_key="tenant-b")
        await events.wait(lambda log: len(of(log, "succeeded", "")) == flood + 3, timeout_s=60, what="every task")
    b_sent = min(e.at for e in of(events, "submitted", "b-"))
    b_done = max(e.at for e in of(events, "succeeded", "b-"))
    a_done = [e.at for e in of(events, "succeeded", "a-")]
    waiting = flood - sum(1 for at in a_done if at <= b_sent)
    overtaken = sum(1 for at in a_done if b_sent < at <= b_done)
    # In arrival order the trickle would wait for all the flood still waiting; with shares it
    # waits for a window's worth and its lottery draws.
    assert waiting > flood // 2
    assert overtaken < waiting // 4, f"{overtaken} of the flood's {waiting} waiting tasks finished before the trickle"
    assert {e.attempt for e in of(events, "started", "")} == {1}


async def test_a_parked_task_can_be_cancelled_and_never_starts(settings, bus, events: EventLog):
    settings = msgspec.structs.replace(settings, concurrency_limits={"one": 1})
    gauge = Gauge()
    client = Client(bus, await StateStore.open(bus), settings)
    async with running(await cluster(settings, bus, gauge.handlers(nap_s=2.0))):  # the second waits that long
        await publish(bus, id="first", type="test.keyed", payload={"key": "one"}, concurrency_key="one")
        await publish(bus, id="second", type="test.keyed", payload={"key": "one"}, concurrency_key="one")
        await events.wait(lambda log: "held" in log.kinds_of("second") and "started" in log.kinds_of("first"), what="second parked")
        lanes, keys = await client.limits()  # what `streamsched limits list` shows
        assert [(lane.type, lane.parked, lane.region) for lane in lanes] == [("test.keyed", 1, REGION)]
        assert lanes[0].waiting_for == "a slot of concurrency key 'one' (at most 1 at once)"
        assert [(key.key, key.held, key.tasks) for key in keys] == [("one", 1, ["first"])]
        await client.cancel("second", reason="not needed")
        await events.wait(lambda log: "cancelled" in log.kinds_of("second") and "succeeded" in log.kinds_of("first"), what="the cancel")
        state = await client.wait("second", timeout_s=10)
        with anyio.fail_after(10):  # the next pass takes it off its lane; the first task's slot is free
            while await client.limits() != ([], []):
                await anyio.sleep(0.05)
    assert state.status is Status.CANCELLED
    assert "started" not in events.kinds_of("second")


async def test_a_slot_left_by_a_finished_task_is_swept(settings, bus, events: EventLog):
    settings = msgspec.structs.replace(settings, concurrency_limits={"one": 1})
    gauge = Gauge()
    roles = await cluster(settings, bus, gauge.handlers(nap_s=0))
    kv = await bus.js.key_value(subjects.LIMITS_BUCKET)
    async with running(roles):
        await publish(bus, id="done", type="test.plain")
        await events.wait(lambda log: "succeeded" in log.kinds_of("done"), what="a finished task")
        client = Client(bus, await StateStore.open(bus), settings)
        await client.wait("done", timeout_s=10)
        # As if its worker died between recording the outcome and freeing its slot: the key's only slot.
        gates = limits.gates(settings, "test.keyed", "c=one")
        assert gates is not None and gates.slots is not None
        await kv.create(f"{gates.slots.prefix}.0", msgspec.json.encode(SlotValue("done")))
        await publish(bus, id="behind", type="test.keyed", payload={"key": "one"}, concurrency_key="one")
        await events.wait(lambda log: "held" in log.kinds_of("behind"), what="the task behind it parked")
        admissions = [role.admission for role in roles if isinstance(role, Regional)]
        started = time.monotonic()
        for admission in admissions:
            admission.sweep_after_s = 0.0  # the task finished a moment ago: by default its slot waits a minute
            await admission._sweep()  # what each does every SWEEP_S
        await events.wait(lambda log: "succeeded" in log.kinds_of("behind"), timeout_s=10, what="the task behind, once the slot is swept")
    assert time.monotonic() - started < 10
    assert isinstance(admissions[0], Admission)


async def test_a_parked_task_that_holds_a_slot_already_is_admitted_with_it(settings, bus, events: EventLog):
    # As if a scheduler took the key's only slot for the task and died before publishing it:
    # the task must not wait for a second slot, which the first one (its own) blocks.
    settings = msgspec.structs.replace(settings, concurrency_limits={"one": 1})
    gauge = Gauge()
    kv = await bus.js.key_value(subjects.LIMITS_BUCKET)
    gates = limits.gates(settings, "test.keyed", "c=one")
    assert gates is not None and gates.slots is not None
    await kv.create(f"{gates.slots.prefix}.0", msgspec.json.encode(SlotValue("mine", "one")))
    async with running(await cluster(settings, bus, gauge.handlers(nap_s=0))):
        await publish(bus, id="mine", type="test.keyed", payload={"key": "one"}, concurrency_key="one")
        await publish(bus, id="next", type="test.keyed", payload={"key": "one"}, concurrency_key="one")
        await events.wait(lambda log: "succeeded" in log.kinds_of("mine") and "succeeded" in log.kinds_of("next"), timeout_s=15, what="both tasks")
    assert gauge.most == {"one": 1}


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"concurrency_key": "nolimit"}, "concurrency key 'nolimit' has no limit"),
        ({"concurrency_limit": 2}, "`concurrency_limit` needs a `concurrency_key`"),
        ({"concurrency_key": "k", "concurrency_limit": 0}, "`concurrency_limit` must be between 1 and 1000"),
        ({"rate_key": "unknown"}, "rate key 'unknown' names no rate limit"),
        ({"fairness_key": "has space"}, "`fairness_key` 'has space' is not valid"),
    ],
)
async def test_invalid_limits_are_rejected_with_the_reason(settings, bus, fields: dict[str, Any], reason: str):
    client = Client(bus, await StateStore.open(bus), settings)
    async with running([Master(settings, bus), Projector(settings, bus, await StateStore.open(bus))]):
        await publish(bus, id="bad", type="echo", **fields)
        state = await client.wait("bad", timeout_s=10)
    assert state.status is Status.REJECTED and reason in (state.error or "")
