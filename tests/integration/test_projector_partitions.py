"""Projector partitions: the recorders put each task's events in one partition, each
partition has its own durable on EVENTS, and a projector reading one folds only its tasks,
so projectors split the view's work without meeting on a key."""

from __future__ import annotations

from dataclasses import replace

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
from streamsched.roles import projector as projector_module
from streamsched.roles.projector import Projector
from streamsched.roles.rebuild import rebuild_state
from streamsched.testing import running
from streamsched.transport import streams
from streamsched.transport.bus import Bus
from streamsched.transport.streams import Change

from .test_cli import cli

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


async def events_last_seq(bus: Bus) -> int:
    return (await bus.js.stream_info(subjects.EVENTS_STREAM)).state.last_seq


async def test_new_partitions_start_where_the_one_durable_stood_and_fold_only_what_it_had_not(settings: Settings, bus: Bus):
    folded, unfolded = [f"a{i}" for i in range(50)], [f"b{i}" for i in range(50)]
    store = await StateStore.open(bus)
    await record_runs(bus, folded, 1)
    async with running([Projector(settings, bus, store)]):
        await folded_everything(bus, [subjects.PROJECTOR_CONSUMER])
    floor = await events_last_seq(bus)
    await record_runs(bus, unfolded, 1)  # by recorders still on one partition, before their restart

    chosen, changes = await partitioned(bus, settings, 2)
    created = {change.name: change.detail for change in changes if change.action == "created"}
    assert set(created) == {"EVENTS/projector-0", "EVENTS/projector-1"} and f"sequence {floor + 1}" in created["EVENTS/projector-0"]
    # Its unfolded events are on `events.test`, which partition 0 reads from there: nothing is lost by deleting it.
    assert [change.name for change in changes if change.action == "deleted"] == ["EVENTS/projector"]

    async with running([Projector(chosen, bus, store, consumer=name) for name in subjects.projector_consumers(2)]):
        await folded_everything(bus, subjects.projector_consumers(2))
    infos = [await bus.js.consumer_info(subjects.EVENTS_STREAM, name) for name in subjects.projector_consumers(2)]
    # The two messages of the second run, and none of the history before them.
    assert sum(info.delivered.consumer_seq for info in infos) == await events_last_seq(bus) - floor == 2
    states = await store.all(bus)
    assert len(states) == 100 and {state.status for state in states.values()} == {Status.SUCCEEDED}


async def test_a_dropped_partitions_durable_is_kept_until_it_has_folded_its_events(settings: Settings, bus: Bus):
    three, _ = await partitioned(bus, settings, 3)
    ids = [f"c{i}" for i in range(60)]
    await record_runs(bus, ids, 3)

    _, changes = await partitioned(bus, settings, 2)
    kept = [change for change in changes if change.name == "EVENTS/projector-2"]
    assert [change.action for change in kept] == ["kept"] and "2 messages not folded" in kept[0].detail
    assert set(await projector_durables(bus)) == {"projector-0", "projector-1", "projector-2"}

    # Its projector, still running on three partitions, folds them: the next apply deletes it.
    store = await StateStore.open(bus)
    async with running([Projector(three, bus, store, consumer=subjects.projector_consumer(2))]):
        await folded_everything(bus, [subjects.projector_consumer(2)])
    _, changes = await partitioned(bus, settings, 2)
    assert [(change.name, change.action) for change in changes if change.action in ("kept", "deleted")] == [("EVENTS/projector-2", "deleted")]
    assert set(await projector_durables(bus)) == {"projector-0", "projector-1"}


async def test_streams_apply_prints_a_kept_durable_and_prune_projectors_deletes_it(settings: Settings, bus: Bus):
    await partitioned(bus, settings, 3)
    await record_runs(bus, [f"d{i}" for i in range(60)], 3)
    two = msgspec.structs.replace(settings, projector_partitions=2)
    kept = (await cli(two, "streams", "apply")).stdout.decode()
    assert "kept      consumer EVENTS/projector-2 (projector_partitions is 2; its 2 messages not folded yet" in kept, kept
    pruned = (await cli(two, "streams", "apply", "--prune-projectors")).stdout.decode()
    assert "deleted   consumer EVENTS/projector-2 (projector_partitions is 2; it had 2 messages not folded: `streamsched replay" in pruned
    assert set(await projector_durables(bus)) == {"projector-0", "projector-1"}


async def test_apply_updates_a_durable_made_at_a_start_sequence_keeping_its_start(settings: Settings, bus: Bus):
    await record_runs(bus, ["e1"], 1)
    async with running([Projector(settings, bus, await StateStore.open(bus))]):
        await folded_everything(bus, [subjects.PROJECTOR_CONSUMER])
    chosen, _ = await partitioned(bus, settings, 2)
    info = await bus.js.consumer_info(subjects.EVENTS_STREAM, "projector-1")
    start = info.config.opt_start_seq
    assert start == await events_last_seq(bus) + 1 == 3
    # As if an older version had made it with another window: apply brings it back in place.
    await bus.js.add_consumer(subjects.EVENTS_STREAM, replace(info.config, max_ack_pending=7))
    changes = {change.name: change for change in await streams.apply(bus, chosen)}
    assert (changes["EVENTS/projector-1"].action, changes["EVENTS/projector-1"].detail) == ("updated", "max_ack_pending")
    after = (await bus.js.consumer_info(subjects.EVENTS_STREAM, "projector-1")).config
    assert after.max_ack_pending == streams.PROJECTOR_WINDOW and after.opt_start_seq == start


async def test_a_projector_without_its_durable_says_so_and_folds_once_apply_makes_it(
    settings: Settings, bus: Bus, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(projector_module, "DURABLE_CHECK_S", 0.05)
    chosen = msgspec.structs.replace(settings, projector_partitions=2)  # not applied yet: only `projector` exists
    ids = [f"f{i}" for i in range(40)]
    await record_runs(bus, ids, 2)
    store = await StateStore.open(bus)
    async with running([Projector(chosen, bus, store, consumer=subjects.projector_consumer(1))]):
        with anyio.fail_after(10):
            while "EVENTS has no durable projector-1" not in caplog.text:
                await anyio.sleep(0.02)
        assert "STREAMSCHED_PROJECTOR_PARTITIONS=2" in caplog.text
        await streams.apply(bus, chosen)
        await folded_everything(bus, [subjects.projector_consumer(1)])
    mine = {task_id for task_id in ids if subjects.event_partition(task_id, 2) == 1}
    assert set(await store.all(bus)) == mine


async def test_lag_seconds_counts_an_unfolded_event_on_partition_zeros_unpartitioned_subject(settings: Settings, bus: Bus):
    await partitioned(bus, settings, 2)
    await (await bus.publish(*ev.message([submitted("g1")], "tool")))  # on `events.tool`, partition 0's second filter
    with anyio.fail_after(10):
        while (await projector_lag(bus))[1].samples[0].value < 0.2:  # its age grows from 0 while it waits
            await anyio.sleep(0.05)
