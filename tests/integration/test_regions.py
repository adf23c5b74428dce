"""Regions against a real server: regional schedulers register with their region's headroom,
the master routes by health, pinned tasks wait or fail over, a redelivery goes where its
first copy went."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any

import msgspec
import pytest

from streamsched import subjects
from streamsched.client import Client
from streamsched.config import Settings
from streamsched.eventlog.state import StateStore, encode_state
from streamsched.model import Status, TaskState
from streamsched.registry import Registry, TaskDef
from streamsched.roles.master import Master
from streamsched.roles.projector import Projector
from streamsched.roles.region_registry import RegionInfo, live_regions
from streamsched.roles.regional import Regional
from streamsched.roles.worker import Worker
from streamsched.testing import EventLog, running
from streamsched.transport import streams, wire
from streamsched.transport.bus import Bus

from .test_cli import cli
from .test_worker_registry import eventually, until

pytestmark = pytest.mark.anyio

#: Heartbeats this often here, so registrations show and vanish within a second or two.
HEARTBEAT_S = 0.2


@pytest.fixture
async def two(settings: Settings, bus: Bus) -> Settings:
    """Regions eu and us, quick heartbeats, applied to the streams."""
    regions = msgspec.structs.replace(settings, regions=("eu", "us"), worker_heartbeat_s=HEARTBEAT_S)
    await streams.apply(bus, regions)
    return regions


async def schedulers(settings: Settings, bus: Bus) -> list[Any]:
    """Master, projector and a regional scheduler per region."""
    return [
        Master(settings, bus),
        Projector(settings, bus, await StateStore.open(bus)),
        *(Regional(settings, bus, region) for region in settings.regions),
    ]


def only(*types: str) -> Registry:
    async def run(payload: Any) -> Any:
        return payload

    return Registry([TaskDef(task_type, run) for task_type in types])


async def test_a_regional_scheduler_registers_its_regions_backlog_and_worker_capacity_and_deregisters_when_it_stops(two, bus):
    # WORK durables of type echo in both regions, and no worker that runs echo: the tasks stay there.
    for region in two.regions:
        await streams.ensure_work_consumers(bus, two, region, ["echo"])
    for n in range(3):
        await bus.js.publish(subjects.work("eu", "medium", "echo"), b"{}", headers={subjects.H_MSG_ID: f"eu-{n}"})
    await bus.js.publish(subjects.work("us", "low", "echo"), b"{}", headers={subjects.H_MSG_ID: "us-0"})
    regional = Regional(two, bus, "eu")
    worker = Worker(two, bus, only("other"), region="eu", concurrency=3)
    async with running([regional, worker]):
        [info] = await eventually(
            lambda: live_regions(bus), lambda found: len(found) == 1 and found[0].workers == 1, what="eu registered with its worker"
        )
        assert (info.region, info.id, info.heartbeat_s) == ("eu", regional.presence.id, HEARTBEAT_S)
        assert (info.backlog, info.ack_pending, info.workers, info.capacity, info.running, info.waiting) == (3, 0, 1, 3, 0, 0)
        assert info.key == subjects.region_key("eu", regional.presence.id)
    assert await live_regions(bus) == [], "deleted on the way out, not left to expire"


async def test_tasks_that_name_no_region_run_where_a_worker_is_and_spread_over_both_regions_once_both_have_one(two, bus, events: EventLog):
    client = Client(bus, await StateStore.open(bus), settings=two)
    roles = await schedulers(two, bus)
    master = roles[0]
    async with running([*roles, Worker(two, bus, only("echo"), region="us", concurrency=8)]):
        await until(lambda: master.router.healthy == ("us",), what="us healthy, eu not")
        assert master.router.unhealthy == {"eu": "no live worker"}
        for n in range(20):
            await client.submit("echo", n, id=f"first-{n}")
        states = [await client.wait(f"first-{n}", timeout_s=20) for n in range(20)]
        assert {(state.status, state.region) for state in states} == {(Status.SUCCEEDED, "us")}

        async with running([Worker(two, bus, only("echo"), region="eu", concurrency=8)]):
            await until(lambda: master.router.healthy == ("eu", "us"), what="both regions healthy")
            for n in range(40):
                await client.submit("echo", n, id=f"then-{n}")
            regions = Counter([(await client.wait(f"then-{n}", timeout_s=20)).region for n in range(40)])
    assert regions["eu"] > 0 and regions["us"] > 0, regions
    assert not events.of_kind("stranded") and not events.of_kind("rerouted")


async def test_a_task_pinned_to_a_region_without_a_worker_waits_there_with_the_reason_or_runs_elsewhere_when_it_may(two, bus, events: EventLog):
    client = Client(bus, await StateStore.open(bus), settings=two)
    roles = await schedulers(two, bus)
    master = roles[0]
    async with running([*roles, Worker(two, bus, only("echo"), region="us", concurrency=4)]):
        await until(lambda: master.router.unhealthy == {"eu": "no live worker"}, what="eu without a worker")
        await client.submit("echo", "held", id="pinned-wait", region="eu")
        await client.submit("echo", "moved", id="pinned-any", region="eu", region_failover="any")

        moved = await client.wait("pinned-any", timeout_s=20)
        assert (moved.status, moved.region, moved.stranded) == (Status.SUCCEEDED, "us", None)
        assert moved.rerouted == "region eu has no live worker; sent to us (region_failover any)"
        [rerouted] = events.of_kind("rerouted")
        assert (rerouted.task_id, rerouted.requested, rerouted.region) == ("pinned-any", "eu", "us")

        held = await eventually(
            lambda: client.get("pinned-wait"), lambda state: state is not None and state.stranded is not None, what="the reason in the state"
        )
        # eu's scheduler released it onto WORK, where no worker handles echo yet: held there.
        assert held is not None and (held.region, held.status) == ("eu", Status.WAITING)
        assert held.waiting_reason == "no worker for type echo in region eu"
        assert held.stranded == "region eu has no live worker; waiting there (region_failover wait)"
        shown = json.loads((await cli(two, "status", "pinned-wait", "--json")).stdout)
        assert shown["stranded"] == held.stranded

        async with running([Worker(two, bus, only("echo"), region="eu", concurrency=4)]):
            ran = await client.wait("pinned-wait", timeout_s=20)
    assert (ran.status, ran.region, ran.stranded) == (Status.SUCCEEDED, "eu", None)
    assert events.kinds_of("pinned-wait")[:3] == ["submitted", "scheduled", "stranded"]


async def test_one_region_routes_as_before_and_records_nothing_for_tasks_that_name_no_region(settings, bus, events: EventLog, examples):
    quick = msgspec.structs.replace(settings, worker_heartbeat_s=HEARTBEAT_S)
    client = Client(bus, await StateStore.open(bus), settings=quick)
    roles = await schedulers(quick, bus)
    master = roles[0]
    async with running(roles):  # no worker yet: the region is not healthy
        await until(lambda: master.router.unhealthy == {"default": "no live worker"}, what="default without a worker")
        await client.submit("echo", 1, id="alone")
        await events.wait(lambda log: "held" in log.kinds_of("alone"), what="alone released onto WORK (held: no worker)")
        async with running([Worker(quick, bus, examples, region="default", concurrency=2)]):
            state = await client.wait("alone", timeout_s=20)
    assert (state.status, state.region, state.stranded) == (Status.SUCCEEDED, "default", None)
    assert events.kinds_of("alone") == ["submitted", "scheduled", "held", "started", "succeeded"]


def redelivered(subject: str, data: bytes, stream_seq: int) -> wire.Delivery:
    """A submission as a second delivery of the master's consumer (its ack goes nowhere)."""
    return wire.Delivery(subject, f"$JS.ACK.TASKS.master.2.{stream_seq}.{stream_seq}.{time.time_ns()}.0", data, None)


async def test_a_redelivered_submission_goes_where_its_first_copy_went_whatever_the_routing_says_now(two, bus):
    # eu has a scheduler and a worker, us only a scheduler: the table sends everything to eu.
    kv = await bus.js.key_value(subjects.REGIONS_BUCKET)
    now = time.time()
    for region, workers in (("eu", 1), ("us", 0)):
        info = RegionInfo(id=f"s-{region}", region=region, host="h", pid=1, version="t", started_at=now, heartbeat_at=now, heartbeat_s=60.0)
        await kv.put(info.key, msgspec.json.encode(msgspec.structs.replace(info, workers=workers, capacity=workers * 4)))
    # Its first copy went to us (as its state in KV tasks says).
    states = await bus.js.key_value(subjects.STATE_BUCKET)
    await states.put("went-to-us", encode_state(TaskState(id="went-to-us", status=Status.PENDING, region="us")))
    master = Master(two, bus)
    async with running([master]):
        await until(lambda: master.router.healthy == ("eu",), what="eu healthy")
        for task_id, seq in (("went-to-us", 1001), ("never-seen", 1002)):
            master._on_message(1, redelivered(subjects.SUBMIT, msgspec.json.encode({"id": task_id, "type": "echo"}), seq))
        await bus.js.publish(subjects.SUBMIT, msgspec.json.encode({"id": "first-time", "type": "echo"}))

        async def in_sched() -> dict[str, int]:
            return (await bus.js.stream_info(subjects.SCHED_STREAM, subjects_filter="sched.>")).state.subjects or {}

        await eventually(in_sched, lambda found: sum(found.values()) == 3, what="three tasks on SCHED")
    found = await in_sched()
    assert found == {"sched.us.medium": 1, "sched.eu.medium": 2}, found


async def test_without_the_regions_bucket_the_schedulers_still_route_and_run_tasks(settings, bus, examples):
    two = msgspec.structs.replace(settings, regions=("eu", "us"))
    await streams.apply(bus, two)
    await bus.js.delete_key_value(subjects.REGIONS_BUCKET)  # as after an upgrade, streams not applied since
    client = Client(bus, await StateStore.open(bus), settings=two)
    roles = await schedulers(two, bus)
    async with running([*roles, *(Worker(two, bus, examples, region=region, concurrency=2) for region in two.regions)]):
        handles = [await client.submit("echo", n) for n in range(6)]
        states = [await client.wait(handle.id, timeout_s=20) for handle in handles]
    assert {state.status for state in states} == {Status.SUCCEEDED}
    assert roles[0].router.table == ("eu", "us"), "the hash over the configured regions"
