"""Events of many tasks share EVENTS messages: what one loop tick records goes in one."""

from __future__ import annotations

import asyncio

import pytest

from streamsched import subjects
from streamsched.eventlog import events as ev
from streamsched.eventlog import recorder as recorder_module
from streamsched.eventlog.recorder import EventRecorder
from streamsched.transport.bus import Bus

pytestmark = pytest.mark.anyio


def scheduled(task_id: str) -> ev.Event:
    return ev.Scheduled(task_id=task_id, at=1.0, region="default", priority="medium")


async def stored_messages(bus: Bus) -> list[tuple[str, list[ev.Event], str]]:
    """``(subject, events, msg id)`` of every EVENTS message, in order."""
    last = (await bus.js.stream_info(subjects.EVENTS_STREAM)).state.last_seq
    out = []
    for seq in range(1, last + 1):
        msg = await bus.js.get_msg(subjects.EVENTS_STREAM, seq)
        out.append((msg.subject, ev.decode_all(msg.data), (msg.headers or {}).get(subjects.H_MSG_ID, "")))
    return out


async def test_events_recorded_in_one_loop_tick_share_one_message(bus):
    recorder = EventRecorder(bus, "test")
    submitted = ev.Submitted(task_id="t1", at=1.0, type="echo", priority="medium", region="default")
    first = recorder.record([submitted, scheduled("t1")])
    second = recorder.record([scheduled("t2")])
    assert first is second  # the same message
    await first
    later = recorder.record([scheduled("t3")])
    assert later is not first
    await later

    stored = await stored_messages(bus)
    assert [(subject, events) for subject, events, _ in stored] == [
        ("events.test", [submitted, scheduled("t1"), scheduled("t2")]),
        ("events.test", [scheduled("t3")]),
    ]
    assert len({msg_id for _, _, msg_id in stored}) == 2 and all(stored[0][2])  # each with its own msg id


async def test_a_full_message_is_sealed_and_the_rest_goes_in_the_next(bus, monkeypatch):
    monkeypatch.setattr(recorder_module, "MAX_EVENTS", 3)
    recorder = EventRecorder(bus, "test")
    futures = [recorder.record([scheduled(f"t{i}")]) for i in range(7)]
    await asyncio.gather(*set(futures))
    stored = await stored_messages(bus)
    assert [[e.task_id for e in events] for _, events, _ in stored] == [["t0", "t1", "t2"], ["t3", "t4", "t5"], ["t6"]]


async def test_more_events_than_a_message_holds_go_into_several_and_land_together(bus, monkeypatch):
    monkeypatch.setattr(recorder_module, "MAX_EVENTS", 3)
    recorder = EventRecorder(bus, "test")
    first = recorder.record([scheduled("t0")])
    many = recorder.record([scheduled(f"t{i}") for i in range(1, 8)])
    await asyncio.wait_for(many, timeout=5)
    assert first.done and many.done and many.error is None
    stored = await stored_messages(bus)
    assert [[e.task_id for e in events] for _, events, _ in stored] == [["t0"], ["t1", "t2", "t3"], ["t4", "t5", "t6"], ["t7"]]


async def test_a_failed_publish_is_sent_again_under_the_same_msg_id(bus, monkeypatch):
    publish_all = bus.publish_all
    calls: list[dict[str, str]] = []

    def flaky_publish_all(publications, callback, also=()):
        calls.append(publications[0][2])
        if len(calls) == 1:  # as if the PubAck were lost in a reconnect
            callback(ConnectionError("PubAck lost"))
            return
        publish_all(publications, callback, also)

    monkeypatch.setattr(recorder_module, "REPUBLISH_DELAYS_S", (0.05,))
    monkeypatch.setattr(bus, "publish_all", flaky_publish_all)
    recorder = EventRecorder(bus, "test")
    await asyncio.wait_for(recorder.record([scheduled("t1")]), timeout=5)
    assert len(calls) == 2 and calls[0][subjects.H_MSG_ID] == calls[1][subjects.H_MSG_ID]
    assert [events for _, events, _ in await stored_messages(bus)] == [[scheduled("t1")]]


async def test_a_message_that_fails_every_try_fails_its_waiters(bus, monkeypatch):
    monkeypatch.setattr(recorder_module, "REPUBLISH_DELAYS_S", (0.01, 0.01))
    tries: list[int] = []

    def failing_publish_all(publications, callback, also=()):
        tries.append(1)
        callback(ConnectionError("no stream"))

    monkeypatch.setattr(bus, "publish_all", failing_publish_all)
    recording = EventRecorder(bus, "test").record([scheduled("t1")])
    with pytest.raises(ConnectionError, match="no stream"):
        await asyncio.wait_for(recording, timeout=5)
    assert len(tries) == 3  # the first try and one per delay


async def test_an_event_that_would_overfill_a_message_starts_the_next(bus, monkeypatch):
    big = ev.Failed(task_id="big", at=1.0, attempt=1, error="x" * 600)
    monkeypatch.setattr(recorder_module, "MAX_BYTES", 1000)
    recorder = EventRecorder(bus, "test")
    futures = [recorder.record([scheduled("t1")]), recorder.record([big]), recorder.record([big]), recorder.record([scheduled("t2")])]
    await asyncio.gather(*set(futures))
    stored = await stored_messages(bus)
    assert [[e.task_id for e in events] for _, events, _ in stored] == [["t1", "big"], ["big", "t2"]]


async def test_with_partitions_each_message_holds_the_events_of_one_partitions_tasks(bus):
    recorder = EventRecorder(bus, "test", partitions=4)
    ids = [f"p{i}" for i in range(40)]
    # One call spanning the partitions: one recording that lands when all its messages have.
    spanning = recorder.record([scheduled(task_id) for task_id in ids])
    await asyncio.wait_for(spanning, timeout=5)
    # A task's events go to one partition, so a call for one task joins that partition's message.
    alone = recorder.record([scheduled("p0")])
    assert alone is recorder._open[subjects.event_partition("p0", 4)]
    await alone

    stored = await stored_messages(bus)
    by_subject = {subject: [e.task_id for e in events] for subject, events, _ in stored[:-1]}
    expected = {f"events.test.{k}": [t for t in ids if subjects.event_partition(t, 4) == k] for k in range(4)}
    assert by_subject == {subject: tasks for subject, tasks in expected.items() if tasks}
    assert len(by_subject) == 4  # 40 ids fill every partition
    assert stored[-1][0] == f"events.test.{subjects.event_partition('p0', 4)}"
    assert len({msg_id for _, _, msg_id in stored}) == len(stored)  # each message its own msg id


async def test_with_partitions_recording_no_events_lands_at_once(bus):
    recording = EventRecorder(bus, "test", partitions=2).record([])
    assert recording.done and recording.error is None
