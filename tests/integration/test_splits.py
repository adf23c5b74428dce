"""Split tasks: chunks run in parallel and are gathered in chunk order; a dead chunk fails the parent."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from streamsched.eventlog import events as ev
from streamsched.registry import Registry, TaskDef, current_task
from streamsched.testing import EventLog, all_roles, running

pytestmark = pytest.mark.anyio


def _square(payload: Any) -> Any:
    if isinstance(payload, dict):  # a range chunk
        return sum(range(payload["start"], payload["stop"]))
    if payload == "boom":
        raise RuntimeError("this chunk always fails")
    return payload * payload


def _total(payload: Any) -> Any:
    results = current_task().dependency_results
    return {"payload": payload, "ids": list(results), "results": list(results.values())}


def _registry() -> Registry:
    return Registry([TaskDef("square", _square), TaskDef("total", _total)])


async def submit(bus: Any, **task: Any) -> None:
    await bus.js.publish("tasks.submit", msgspec.json.encode(task))


def outcome(events: EventLog, task_id: str) -> ev.Event:
    final = events.final(task_id)
    assert final is not None, f"no outcome of {task_id}: {events.kinds_of(task_id)}"
    return final


async def test_a_100_chunk_split_is_gathered_in_chunk_order_and_its_progress_rises(settings, bus, events: EventLog):
    async with running(await all_roles(settings, bus, _registry(), concurrency=16)):
        await submit(bus, id="sq", type="square", payload="note", split={"chunks": list(range(100)), "gather": "total"})
        await events.wait(lambda log: any(ev.kind(e) == "succeeded" for e in log.of_task("sq")), timeout_s=60, what="the gather")
    result = msgspec.json.decode(outcome(events, "sq").result)
    assert result == {"payload": "note", "ids": [f"sq-c{i}" for i in range(100)], "results": [i * i for i in range(100)]}
    fractions = [e.fraction for e in events.of_task("sq") if isinstance(e, ev.Progress)]
    # One report per resolution that finished chunks (resolutions may overlap, so their
    # records may interleave): each share once, up to 1.
    assert fractions and max(fractions) == 1.0 and len(set(fractions)) == len(fractions)
    assert all(abs(f * 100 - round(f * 100)) < 1e-9 for f in fractions)  # whole chunks done, of 100
    gather_started = min(e.at for e in events.of_task("sq") if ev.kind(e) == "started")
    assert all(outcome(events, f"sq-c{i}").at <= gather_started for i in range(100))


async def test_a_range_split_without_gather_succeeds_with_the_list_of_results(settings, bus, events: EventLog):
    async with running(await all_roles(settings, bus, _registry())):
        await submit(bus, id="rg", type="square", split={"range": [0, 10], "parts": 3})
        await events.wait(lambda log: "succeeded" in log.kinds_of("rg"), timeout_s=30, what="the split")
    assert msgspec.json.decode(outcome(events, "rg").result) == [sum(range(0, 3)), sum(range(3, 6)), sum(range(6, 10))]
    assert "started" not in events.kinds_of("rg")  # nothing to run: the results are its result


async def test_a_dead_chunk_fails_the_parent_naming_the_chunk(settings, bus, events: EventLog):
    async with running(await all_roles(settings, bus, _registry())):
        await submit(bus, id="bad", type="square", max_attempts=2, split={"chunks": [1, "boom", 3], "gather": "total"})
        await events.wait(lambda log: "failed" in log.kinds_of("bad"), timeout_s=30, what="the parent failed")
    failed = outcome(events, "bad")
    assert isinstance(failed, ev.Failed) and failed.error == "chunk bad-c1 ended dead"
    assert events.kinds_of("bad-c1").count("started") == 2  # retried on its own first
    assert "started" not in events.kinds_of("bad")


@pytest.mark.parametrize(
    ("split", "reason"),
    [
        ({"chunks": [1], "range": [0, 2], "parts": 2}, 'either "chunks" or "range"'),
        ({"range": [0, 5]}, 'needs "parts" from 1 to stop - start'),
        ({"chunks": []}, "must make 1 to 1000 chunks"),
        ({"chunks": [1], "fanout": 2}, "not a valid `split`"),
    ],
)
async def test_a_bad_split_is_rejected_with_the_reason(settings, bus, events: EventLog, split, reason):
    async with running(await all_roles(settings, bus, None)):
        await submit(bus, id="s", type="square", split=split)
        rejected = await events.wait_final("s")
    assert isinstance(rejected, ev.Rejected) and reason in rejected.reason, rejected.reason
