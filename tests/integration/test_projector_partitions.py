"""Projector partitions: the recorders put each task's events in one partition, each
partition has its own durable on EVENTS, and a projector reading one folds only its tasks,
so projectors split the view's work without meeting on a key."""

from __future__ import annotations

import anyio
import msgspec
import pytest

from streamsched import subjects
from streamsched.config import Settings
from streamsched.eventlog import events as ev
from streamsched.eventlog.recorder import EventRecorder
from streamsched.eventlog.state import StateStore
from streamsched.metrics import projector_lag
from streamsched.model import Status
from streamsched.roles.projector import Projector
from streamsched.roles.rebuild import rebuild_state
from streamsched.testing import running
from streamsched.transport import streams
from streamsched.transport.bus import Bus
from streamsched.transport.streams import Change

pytestmark = pytest.mark.anyio


async def partitioned(bus: Bus, settings: Settings, partitions: int) -> tuple[Settings, list[Change]]:
    """``settings`` with ``partitions``, applied (as ``streams apply`` with that setting)."""
    chosen = msgspec.structs.replace(settings, projector_partitions=partitions)
    return chosen, await streams.apply(bus, chosen)


async def projector_durables(bus: Bus) -> dict[str, list[str]]:
    """The projector durables on EVENTS, with their filter subjects."""
    return {
        info.name: info.config.filter_subjects or [info.config.filter_subject or ""]
        for info in await bus.js.consumers_info(subjects.EVENTS_STREAM)
        if subjects.is_projector_consumer(info.name)
    }


async def folded_everything(bus: Bus, consumers: list[str]) -> None:
    with anyio.fail_after(60):
        while True:
            infos = [await bus.js.consumer_info(subjects.EVENTS_STREAM, name) for name in consumers]
            if all(not info.num_pending and not info.num_ack_pending for info in infos):
                return
            await anyio.sleep(0.05)


def submitted(task_id: str) -> ev.Event:
    return ev.Submitted(task_id=task_id, at=1.0, type="noop", priority="medium", region="default")


def succeeded(task_id: str) -> ev.Event:
    return ev.Succeeded(task_id=task_id, at=2.0, attempt=1)


async def record_runs(bus: Bus, ids: list[str], partitions: int) -> None:
    """Record that each of ``ids`` was submitted and then succeeded, as the roles would, in two calls."""
    recorder = EventRecorder(bus, "test", partitions=partitions)
    await recorder.record([submitted(task_id) for task_id in ids])
    await recorder.record([succeeded(task_id) for task_id in ids])


async def test_each_partitions_projector_folds_only_its_tasks_and_writes_each_task_once(settings: Settings, bus: Bus):
    chosen, _ = await partitioned(bus, settings, 2)
    ids = [f"t{i}" for i in range(600)]
    await record_runs(bus, ids, 2)
    store = await StateStore.open(bus)
    projectors = [Projector(chosen, bus, store, consumer=subjects.projector_consumer(k)) for k in range(2)]
    async with running(projectors):
        await folded_everything(bus, subjects.projector_consumers(2))
    states = await store.all(bus)
    assert len(states) == len(ids) and {state.status for state in states.values()} == {Status.SUCCEEDED}
    # One write per task: the two projectors never met on a key (a lost compare-and-set writes again).
    assert (await bus.js.stream_info(f"KV_{subjects.STATE_BUCKET}")).state.last_seq == len(ids)
    for k, projector in enumerate(projectors):
        mine = {task_id for task_id in ids if subjects.event_partition(task_id, 2) == k}
        assert set(projector.cache) == mine and len(mine) > len(ids) // 4


async def test_events_published_without_a_partition_are_folded_by_partition_zeros_projector(settings: Settings, bus: Bus):
    chosen, _ = await partitioned(bus, settings, 2)
    # A task of partition 1, its events published on `events.tool` (as ev.message does) by a tool or an older recorder.
    task_id = next(t for t in (f"u{i}" for i in range(20)) if subjects.event_partition(t, 2) == 1)
    await (await bus.publish(*ev.message([submitted(task_id), succeeded(task_id)], "tool")))
    store = await StateStore.open(bus)
    async with running([Projector(chosen, bus, store, consumer=subjects.projector_consumer(0))]):
        await folded_everything(bus, [subjects.projector_consumer(0)])
    state = await store.get(task_id)
    assert state is not None and state[0].status is Status.SUCCEEDED


async def test_apply_makes_a_durable_per_partition_and_deletes_those_of_another_count(settings: Settings, bus: Bus):
    assert await projector_durables(bus) == {"projector": ["events.>"]}  # the fixture applied one partition
    _, changes = await partitioned(bus, settings, 3)
    assert await projector_durables(bus) == {"projector-0": ["events.*.0", "events.*"], "projector-1": ["events.*.1"], "projector-2": ["events.*.2"]}
    assert [str(change) for change in changes if change.action == "deleted"] == ["deleted   consumer EVENTS/projector (projector_partitions is 3)"]
    assert sorted(change.name for change in changes if change.action == "created") == [f"EVENTS/projector-{k}" for k in range(3)]
    _, again = await partitioned(bus, settings, 3)
    assert {change.action for change in again if "projector" in change.name} == {"unchanged"}
    _, back = await partitioned(bus, settings, 1)
    assert await projector_durables(bus) == {"projector": ["events.>"]}
    assert sorted(change.name for change in back if change.action == "deleted") == [f"EVENTS/projector-{k}" for k in range(3)]


async def test_lag_sums_the_partitions_and_a_rebuild_pauses_and_resumes_every_partition(settings: Settings, bus: Bus):
    chosen, _ = await partitioned(bus, settings, 2)
    ids = [f"r{i}" for i in range(40)]
    await record_runs(bus, ids, 2)
    stored = (await bus.js.stream_info(subjects.EVENTS_STREAM)).state.messages
    assert stored == 4  # two messages a call, one per partition
    messages, seconds = await projector_lag(bus)
    assert messages.samples[0].value == stored and seconds.samples[0].value >= 0

    # No projector runs: the rebuild folds EVENTS itself, pausing both partitions' durables meanwhile.
    report = await rebuild_state(bus, chosen, timeout_s=60)
    assert report.tasks == len(ids)
    states = await (await StateStore.open(bus)).all(bus)
    assert {state.status for state in states.values()} == {Status.SUCCEEDED} and len(states) == len(ids)
    for name in subjects.projector_consumers(2):
        assert not (await bus.js.consumer_info(subjects.EVENTS_STREAM, name)).paused
