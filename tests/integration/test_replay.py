"""The event log as a tool: rebuild state, tail, history, DLQ re-drive, replay elsewhere."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import anyio
import msgspec
import pytest
from nats.js.api import KeyValueConfig

from streamsched import Retry, current_task, subjects, task
from streamsched.config import Settings
from streamsched.eventlog import dlq as dlq_mod
from streamsched.eventlog import events as ev
from streamsched.eventlog.reader import history, tail
from streamsched.eventlog.replay import replay_submissions
from streamsched.eventlog.state import StateStore
from streamsched.model import Status
from streamsched.registry import Registry
from streamsched.roles import projector as projector_module
from streamsched.roles.projector import MAX_BATCH, Projector
from streamsched.roles.rebuild import compare_states, rebuild_state
from streamsched.testing import EventLog, all_roles, nats_server, running
from streamsched.transport import streams
from streamsched.transport.bus import Bus
from streamsched.transport.reading import ReadStats, Since

pytestmark = pytest.mark.anyio


@task("flaky")
def flaky(payload):
    """Fails its first attempt, except when it is a re-driven copy."""
    if current_task().attempt == 1 and "-r" not in current_task().id:
        raise Retry("first attempt fails", delay_s=0.01)
    return payload


@task("doomed", max_attempts=1)
def doomed(payload):
    """Dies unless re-driven."""
    if "-r" not in current_task().id:
        raise RuntimeError("doomed")
    return "saved"


@pytest.fixture
def registry(examples: Registry) -> Registry:
    registry = Registry([*(examples.get(n) for n in examples.names())])
    registry.add(flaky.__streamsched_task__)
    registry.add(doomed.__streamsched_task__)
    return registry


async def projector_idle(bus: Bus, events: EventLog, outcomes: int) -> None:
    """Wait for ``outcomes`` distinct tasks to finish, then for the projector to fold everything."""

    def finished(log: EventLog) -> int:
        return len({e.task_id for k in ("succeeded", "dead", "failed") for e in log.of_kind(k)})

    await events.wait(lambda log: finished(log) >= outcomes, timeout_s=60, what=f"{outcomes} finished tasks")
    with anyio.fail_after(30):
        while True:
            info = await bus.js.consumer_info("EVENTS", "projector")
            if info.num_pending == 0 and info.num_ack_pending == 0:
                return
            await anyio.sleep(0.05)


async def test_rebuilt_state_equals_the_live_projection_after_retries_and_deaths(settings, bus, events, registry):
    n_ok, n_flaky, n_dead = 1500, 300, 200
    async with running(await all_roles(settings, bus, registry, concurrency=32)):
        for i in range(n_ok):
            await bus.nc.publish("tasks.submit", b'{"id":"ok%d","type":"echo","payload":%d}' % (i, i))
        for i in range(n_flaky):
            await bus.nc.publish("tasks.submit", b'{"id":"fl%d","type":"flaky"}' % i)
        for i in range(n_dead):
            await bus.nc.publish("tasks.submit", b'{"id":"de%d","type":"fail","max_attempts":2}' % i)
        await projector_idle(bus, events, n_ok + n_flaky + n_dead)
        assert len(events.of_kind("retrying")) >= n_flaky + n_dead

        report = await rebuild_state(bus, settings, bucket="tasks_rebuilt")
        assert report.tasks == n_ok + n_flaky + n_dead
        assert await compare_states(bus, "tasks", "tasks_rebuilt") == []

        # Rebuilding the live bucket in place (projector paused meanwhile) gives the same again.
        await rebuild_state(bus, settings)
        assert await compare_states(bus, "tasks", "tasks_rebuilt") == []
        states = await (await StateStore.open(bus)).all(bus)
        assert states["de0"].status is Status.DEAD and "fail always fails" in states["de0"].error
        assert states["fl0"].status is Status.SUCCEEDED and states["fl0"].attempts == 2


async def test_folding_the_same_events_again_changes_nothing(settings, bus, events, registry):
    async with running(await all_roles(settings, bus, registry, concurrency=32)):
        for i in range(50):
            await bus.nc.publish("tasks.submit", b'{"id":"t%d","type":"flaky"}' % i)
        await projector_idle(bus, events, 50)
    before = await (await StateStore.open(bus)).all(bus)
    # Publish every event again (as a redelivery would): the projection must not move.
    async for record in tail(bus):
        await bus.js.publish(f"events.{record.event.task_id}.{record.kind}", ev.encode(record.event))
    async with running([Projector(settings, bus, await StateStore.open(bus))]):
        await projector_idle(bus, events, 0)
    after = await (await StateStore.open(bus)).all(bus)

    def facts(state: Any) -> bytes:  # the copies are new messages: where they are stored is noted too
        return msgspec.json.encode(msgspec.structs.replace(state, event_seqs=[]))

    assert {k: facts(v) for k, v in after.items()} == {k: facts(v) for k, v in before.items()}
    assert all(set(before[k].event_seqs) < set(after[k].event_seqs) for k in before)


async def test_a_burst_larger_than_one_write_batch_is_projected_once_per_task(settings, bus):
    """Each task's pending and final events arrive within the hold window: one KV write per
    task, in batches of at most MAX_BATCH tasks, and every event is acked."""
    n = 2 * MAX_BATCH + 300
    published = []
    for i in range(n):
        task_id = f"b{i}"
        submitted = ev.Submitted(task_id=task_id, at=1.0, type="noop", priority="normal", region="default")
        published.append(await bus.publish(*ev.message([submitted], "test")))
        published.append(await bus.publish(*ev.message([ev.Succeeded(task_id=task_id, at=2.0, attempt=1)], "test")))
    await asyncio.gather(*published)
    store = await StateStore.open(bus)
    projector = Projector(settings, bus, store)
    async with running([projector]):
        with anyio.fail_after(60):
            while (info := await bus.js.consumer_info("EVENTS", "projector")).num_pending or info.num_ack_pending:
                await anyio.sleep(0.05)
    states = await store.all(bus)
    assert len(states) == n and {s.status for s in states.values()} == {Status.SUCCEEDED}
    assert (await bus.js.stream_info("KV_tasks")).state.last_seq == n  # one write per task
    assert projector.applied == 2 * n


async def test_a_message_is_acked_only_once_every_task_it_names_is_written(settings, bus):
    """One message, two tasks: the finished one is written at once, the pending one after
    the hold; acking the message with the first write would lose the second task's events
    in a crash."""
    submitted = [ev.Submitted(task_id=t, at=1.0, type="noop", priority="medium", region="default") for t in ("done", "waits")]
    message = [submitted[0], submitted[1], ev.Succeeded(task_id="done", at=2.0, attempt=1)]
    await (await bus.publish(*ev.message(message, "test")))
    store = await StateStore.open(bus)
    async with running([Projector(settings, bus, store)]):
        with anyio.fail_after(projector_module.HOLD_S / 2):
            while await store.get("done") is None:
                await anyio.sleep(0.01)
        assert await store.get("waits") is None  # held for more events
        assert (await bus.js.consumer_info("EVENTS", "projector")).num_ack_pending == 1
        with anyio.fail_after(10):
            while (await bus.js.consumer_info("EVENTS", "projector")).num_ack_pending:
                await anyio.sleep(0.02)
        state = await store.get("waits")
    assert state is not None and state[0].status is Status.PENDING
    assert (await store.get("done"))[0].status is Status.SUCCEEDED


async def test_states_evicted_from_the_cache_are_read_back_many_at_a_time(settings, bus, monkeypatch):
    """Past CACHE_SIZE a task's next write would fail its compare-and-set: the projector reads
    the stored states first, many in one request (one at a time took seconds per batch), and
    folds onto them."""
    monkeypatch.setattr(projector_module, "CACHE_SIZE", 10)
    n = 300
    store = await StateStore.open(bus)
    asked: list[int] = []
    get_many = store.get_many

    async def counted_get_many(bus, task_ids):
        asked.append(len(task_ids))
        return await get_many(bus, task_ids)

    monkeypatch.setattr(store, "get_many", counted_get_many)
    projector = Projector(settings, bus, store)
    put = projector._put
    puts = 0

    async def counted_put(*args):
        nonlocal puts
        puts += 1
        return await put(*args)

    monkeypatch.setattr(projector, "_put", counted_put)
    gathered = bus.publish_gathered

    async def counted_gathered(publications):
        nonlocal puts
        puts += len(publications)
        return await gathered(publications)

    monkeypatch.setattr(bus, "publish_gathered", counted_gathered)

    async def publish_all(make) -> None:
        await asyncio.gather(*[await bus.publish(*ev.message([make(f"c{i}")], "test")) for i in range(n)])
        with anyio.fail_after(60):
            while (info := await bus.js.consumer_info("EVENTS", "projector")).num_pending or info.num_ack_pending:
                await anyio.sleep(0.05)

    async with running([projector]):
        await publish_all(lambda task_id: ev.Submitted(task_id=task_id, at=1.0, type="noop", priority="low", region="default"))
        assert asked == []  # new tasks: nothing to read
        await publish_all(lambda task_id: ev.Succeeded(task_id=task_id, at=2.0, attempt=1))
    states = await store.all(bus)
    assert len(states) == n
    assert {(s.status, s.type, s.priority) for s in states.values()} == {(Status.SUCCEEDED, "noop", "low")}
    assert sum(asked) >= n - 10 and max(asked) > 1  # the evicted ones, several per request
    assert puts == 2 * n  # write attempts: read before the write, not after a failed one


async def test_get_many_reads_the_last_state_of_each_known_task(bus):
    store = await StateStore.open(bus)
    for task_id, status in (("g1", "pending"), ("g2", "running"), ("g1", "succeeded")):
        await store.kv.put(task_id, msgspec.json.encode({"id": task_id, "status": status}))
    await store.kv.put("g3", b'{"id":"g3","status":"pending"}')
    await store.kv.delete("g3")
    found = await store.get_many(bus, ["g1", "g2", "g3", "nope"])
    assert {task_id: (state.status, revision) for task_id, (state, revision) in found.items()} == {
        "g1": (Status.SUCCEEDED, 3),
        "g2": (Status.RUNNING, 2),
    }
    assert await store.get_many(bus, ["nope"]) == {}


async def test_get_many_reads_one_key_at_a_time_from_a_bucket_without_direct_gets(bus, monkeypatch):
    await bus.js.create_key_value(KeyValueConfig(bucket="plain", history=1, direct=False))
    store = await StateStore.open(bus, "plain")
    await store.kv.put("p1", b'{"id":"p1","status":"running"}')
    one_by_one: list[str] = []
    get = store.get

    async def counted_get(task_id: str):
        one_by_one.append(task_id)
        return await get(task_id)

    monkeypatch.setattr(store, "get", counted_get)
    found = await store.get_many(bus, ["p1", "p2"])
    assert {task_id: (state.status, revision) for task_id, (state, revision) in found.items()} == {"p1": (Status.RUNNING, 1)}
    assert sorted(one_by_one) == ["p1", "p2"]


async def test_corrupt_and_unknown_version_events_are_skipped_and_counted(settings, bus, events, registry):
    roles = await all_roles(settings, bus, registry)
    projector = roles[2]
    async with running(roles):
        await bus.js.publish("events.bad1.started", b"{not json")
        await bus.js.publish("events.bad2.started", b'{"kind":"started","task_id":"bad2","at":1.0,"v":99}')
        # A task id that is no KV key: writing it would fail for ever and hold up the rest.
        await bus.js.publish("events.someone", b'[{"kind":"started","task_id":"a.b","at":1.0}]')
        await bus.nc.publish("tasks.submit", b'{"id":"after","type":"echo"}')
        await projector_idle(bus, events, 1)
        state = await (await StateStore.open(bus)).get("after")
        assert state is not None and state[0].status is Status.SUCCEEDED
    assert projector.stats.skipped == 3
    assert (await bus.js.consumer_info("EVENTS", "projector")).num_ack_pending == 0  # all acked, none stuck
    stats = ReadStats()
    kinds = [r.kind async for r in tail(bus, stats=stats)]
    assert stats.skipped == 2 and "succeeded" in kinds  # readers show the bad id; only the projector cannot use it


async def test_tail_filters_by_task_kind_type_and_start(settings, bus, events, registry):
    async with running(await all_roles(settings, bus, registry, concurrency=32)):
        for i in range(5):
            await bus.nc.publish("tasks.submit", b'{"id":"e%d","type":"echo"}' % i)
            await bus.nc.publish("tasks.submit", b'{"id":"n%d","type":"noop"}' % i)
        await projector_idle(bus, events, 10)

    only_task = [r async for r in tail(bus, task_id="e3")]
    assert {r.event.task_id for r in only_task} == {"e3"}
    assert [r.kind for r in only_task] == ["submitted", "scheduled", "dispatched", "started", "succeeded"]

    succeeded = [r async for r in tail(bus, kind="succeeded")]
    assert len(succeeded) == 10 and {r.kind for r in succeeded} == {"succeeded"}

    noop = [r async for r in tail(bus, task_type="noop", kind="started")]
    assert sorted(r.event.task_id for r in noop) == [f"n{i}" for i in range(5)]

    all_records = [r async for r in tail(bus)]
    middle = all_records[len(all_records) // 2].seq
    later = [r async for r in tail(bus, since=Since(seq=middle))]
    assert later and [(r.seq, r.event) for r in later] == [(r.seq, r.event) for r in all_records if r.seq >= middle]
    assert [r.seq async for r in tail(bus, since=Since.parse("1d"))] == [r.seq for r in all_records]

    timeline = await history(bus, "n1")
    assert [r.kind for r in timeline][-1] == "succeeded"
    assert all(a.event.at <= b.event.at for a, b in itertools.pairwise(timeline))


async def test_an_interrupted_redrive_run_again_redrives_each_dead_task_once(settings, bus, events, registry):
    async with running(await all_roles(settings, bus, registry, concurrency=32)):
        for i in range(6):
            await bus.nc.publish("tasks.submit", b'{"id":"d%d","type":"doomed"}' % i)
        await events.wait_count("dead", 6)
        # The DLQ entry and the `dead` event are published together: either may land first.
        with anyio.fail_after(10):
            while (await bus.js.stream_info("DLQ")).state.messages < 6:
                await anyio.sleep(0.02)
        dead = [e async for e in dlq_mod.entries(bus, task_type="doomed")]
        assert sorted(e.task_id for e in dead) == [f"d{i}" for i in range(6)]
        assert all(e.error and e.attempts == 1 for e in dead)
        shown = await dlq_mod.show(bus, "d0")
        assert shown is not None and (shown.task_id, shown.type, shown.attempts) == ("d0", "doomed", 1)
        assert await dlq_mod.show(bus, "never-dead") is None

        class Interrupted(Exception):
            pass

        done = 0

        def stop_after_three(_n: int) -> None:
            nonlocal done
            done += 1
            if done == 3:
                raise Interrupted

        with pytest.raises(Interrupted):
            await dlq_mod.redrive(bus, dead, progress=stop_after_three)
        # Run it again over the same list (as a rerun of the command with the same filters would).
        remaining = [e async for e in dlq_mod.entries(bus, task_type="doomed")]
        await dlq_mod.redrive(bus, dead)
        assert len(remaining) == 3

        await events.wait(lambda log: len([e for e in log.of_kind("succeeded") if "-r" in e.task_id]) >= 6, timeout_s=20)
        # A sentinel task after everything: once it is done, no late duplicate can still be on its way.
        await bus.nc.publish("tasks.submit", b'{"id":"sentinel","type":"echo"}')
        await events.wait_final("sentinel")

    redriven = [e for e in events.of_kind("submitted") if e.labels.get("redrive_of")]
    assert sorted(e.labels["redrive_of"] for e in redriven) == [f"d{i}" for i in range(6)]
    started = [e.task_id for e in events.of_kind("started") if "-r" in e.task_id]
    assert len(started) == len(set(started)) == 6
    assert [e async for e in dlq_mod.entries(bus, task_type="doomed")] == []


async def test_replaying_a_window_reproduces_its_submissions_in_another_deployment(settings, bus, tmp_path: Path):
    for i in range(20):
        await bus.js.publish("tasks.submit", b'{"id":"r%d","type":"echo","payload":%d}' % (i, i))
    await bus.js.publish("tasks.submit", b'{"type":"noop"}')  # no id: replayed under the id the source gave it
    await bus.js.publish("tasks.submit", b"garbage")  # rejected in the source: not replayed
    await bus.js.publish("tasks.submit.high", b'{"id":"hi","type":"echo"}')  # its priority is its subject's

    with nats_server(tmp_path / "target") as target_server:
        target_settings = Settings.load({}, nats_url=target_server.url)
        target = await Bus.connect(target_server.url, name="target")
        try:
            await streams.apply(target, target_settings)
            first = await replay_submissions(bus, target, since=Since(seq=1))
            again = await replay_submissions(bus, target, since=Since(seq=1))
            stored = [m async for m in _submissions(target)]
        finally:
            await target.close()

    assert (first.sent, first.skipped_invalid) == (22, 1)
    assert again.sent == 0 and again.already_there == 22
    ids = {msgspec.json.decode(body)["id"]: subject for subject, body in stored}
    assert {f"r{i}" for i in range(20)} <= ids.keys() and len(ids) == len(stored) == 22
    assert ids["hi"] == "tasks.submit.high" and ids["r0"] == "tasks.submit"  # each on the subject it came in on


async def test_a_dry_run_replay_sends_nothing(settings, bus):
    await bus.js.publish("tasks.submit", b'{"id":"x","type":"echo"}')
    report = await replay_submissions(bus, None, since=Since(seq=1))
    assert report.selected == 1 and report.sent == 0 and report.ids == ["x"]


async def _submissions(bus: Bus):
    from streamsched.transport.reading import read

    async for stored in read(bus, "TASKS", subjects.SUBMIT_ALL, Since(seq=1)):
        yield stored.subject, stored.data


async def test_tail_with_follow_keeps_delivering_new_events(bus):
    seen: list[str] = []

    async def follow() -> None:
        async for record in tail(bus, kind="started", follow=True):
            seen.append(record.event.task_id)

    await bus.js.publish("events.old.started", ev.encode(ev.Started(task_id="old", at=1.0, attempt=1)))
    async with anyio.create_task_group() as tg:
        tg.start_soon(follow)
        with anyio.fail_after(10):
            while seen != ["old"]:
                await anyio.sleep(0.02)
            await bus.js.publish("events.new.started", ev.encode(ev.Started(task_id="new", at=2.0, attempt=1)))
            await bus.js.publish("events.new.succeeded", ev.encode(ev.Succeeded(task_id="new", at=3.0, attempt=1)))
            while seen != ["old", "new"]:
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()


async def test_a_task_s_history_is_read_from_the_messages_its_state_notes_without_a_scan(settings, bus, events, registry, monkeypatch):
    from streamsched.eventlog import reader

    async with running(await all_roles(settings, bus, registry)):
        for i in range(20):
            await bus.js.publish("tasks.submit", b'{"id":"h%d","type":"echo"}' % i)
        await events.wait(lambda log: len(log.of_kind("succeeded")) == 20, what="the tasks")
        await projector_idle(bus, events, 20)
    found = await (await StateStore.open(bus)).get("h7")
    assert found is not None and found[0].event_seqs == sorted(set(found[0].event_seqs))
    scanned = [(record.seq, record.kind) async for record in tail(bus, task_id="h7")]

    def no_scan(*_args: Any, **_kwargs: Any) -> Any:
        raise AssertionError("the history scanned EVENTS")

    monkeypatch.setattr(reader, "tail", no_scan)
    read = [(record.seq, record.kind) for record in await history(bus, "h7")]
    assert read == scanned and [kind for _, kind in read] == ["submitted", "scheduled", "dispatched", "started", "succeeded"]
    assert {seq for seq, _ in read} == set(found[0].event_seqs)
