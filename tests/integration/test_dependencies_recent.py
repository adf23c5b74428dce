"""The waiting records a master keeps as it wrote them: a release needs no read of the
record first, and a copy another writer made stale only costs a lost compare-and-set."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import pytest

from streamsched import subjects
from streamsched.model import Envelope, Status
from streamsched.roles.dependencies import RELEASED, Dependencies, RecentRecords, WaitingRecord
from streamsched.roles.placement import ReadyTask
from streamsched.testing import EventLog

pytestmark = pytest.mark.anyio


def _task(task_id: str, body: bytes = b'{"type":"noop"}') -> ReadyTask:
    return ReadyTask(id=task_id, type="noop", priority="medium", region="default", body=body)


def _counting_reads(dependencies: Dependencies, monkeypatch: pytest.MonkeyPatch) -> list[list[str]]:
    """The task ids of every read of waiting records ``dependencies`` makes from now on."""
    reads: list[list[str]] = []
    read = dependencies._records

    async def counted(task_ids: list[str]) -> Any:
        reads.append(list(task_ids))
        return await read(task_ids)

    monkeypatch.setattr(dependencies, "_records", counted)
    return reads


async def _stored(bus: Any, task_id: str) -> WaitingRecord:
    store = await bus.js.key_value(subjects.WAITING_BUCKET)
    entry = await store.get(task_id)
    return msgspec.json.decode(entry.value, type=WaitingRecord)


async def _register(dependencies: Dependencies, task_id: str, depends_on: list[str]) -> None:
    await dependencies.register(_task(task_id), Envelope(type="noop", id=task_id, depends_on=depends_on), time.time())


async def test_the_master_that_registered_a_task_releases_it_without_reading_its_record(settings, bus, events: EventLog, monkeypatch):
    master = Dependencies(settings, bus, source="master-deps")
    await _register(master, "joined", ["left", "right"])
    reads = _counting_reads(master, monkeypatch)
    await master.resolve({"left": Status.SUCCEEDED})
    await master.resolve({"right": Status.SUCCEEDED})
    await events.wait(lambda log: "scheduled" in log.kinds_of("joined"), what="joined released")
    assert reads == []
    stored = await _stored(bus, "joined")
    assert (stored.state, stored.acted, stored.unmet) == (RELEASED, True, [])


async def test_a_record_another_master_changed_is_read_again_and_still_released(settings, bus, events: EventLog, monkeypatch):
    here = Dependencies(settings, bus, source="master-deps")
    there = Dependencies(settings, bus, source="master-deps")
    await _register(here, "joined", ["left", "right"])
    await there.resolve({"left": Status.SUCCEEDED})  # the copy kept here is stale now
    reads = _counting_reads(here, monkeypatch)
    await here.resolve({"right": Status.SUCCEEDED})
    await events.wait(lambda log: "scheduled" in log.kinds_of("joined"), what="joined released")
    assert reads == [["joined"]], "the lost compare-and-set reads the record again"
    stored = await _stored(bus, "joined")
    assert (stored.state, stored.acted, stored.unmet) == (RELEASED, True, [])


def test_recent_records_are_bounded_in_count_and_bytes_and_keep_only_waiting_ones():
    recent = RecentRecords(max_records=2, max_bytes=100)

    def record(task_id: str, size: int = 10, state: str = "waiting") -> WaitingRecord:
        return WaitingRecord(task=_task(task_id, b"x" * size), depends_on=["d"], unmet=["d"], timeout_s=1.0, since=0.0, state=state)

    for task_id in ("a", "b", "c"):
        recent.keep(record(task_id), 1)
    assert recent.take("a") is None and recent.take("b") is not None and recent.take("c") is not None
    recent.keep(record("small"), 1)
    recent.keep(record("big", size=95), 2)  # over the bytes: the oldest goes
    assert recent.take("small") is None and recent.take("big") is not None
    recent.keep(record("ended", state=RELEASED), 3)
    assert recent.take("ended") is None
    assert recent.take("big") is None, "taken out once"
